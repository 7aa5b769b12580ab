//! The built-in default model: a small Llama-architecture model whose weights are generated
//! deterministically from a seed, so driftscope's main job needs no download. Its tokenizer is
//! byte-level (token id = UTF-8 byte).

use crate::config::{Config, RopeLayout};
use crate::model::Model;
use crate::weights::{LayerWeights, Matrix, Weights};

/// The seed of the built-in model.
pub const DEFAULT_SEED: u64 = 0x5EED_D81F;

/// SplitMix64: a tiny, well-known generator; enough for reproducible weights.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-a, a).
    fn uniform(&mut self, a: f32) -> f32 {
        let u = (self.next() >> 40) as f32 / (1u64 << 24) as f32;
        (2.0 * u - 1.0) * a
    }

    fn matrix(&mut self, rows: usize, cols: usize) -> Matrix {
        let a = (3.0 / cols as f32).sqrt(); // unit variance of outputs for unit inputs
        Matrix::new(rows, cols, (0..rows * cols).map(|_| self.uniform(a)).collect())
    }

    fn norm(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| 1.0 + self.uniform(0.1)).collect()
    }
}

/// The shape of the built-in model: 4 layers, hidden 128, 4 query heads over 2 KV heads.
pub fn default_config() -> Config {
    Config {
        name: "driftscope-tiny (built-in, seed 0x5EEDD81F)".into(),
        n_layers: 4,
        hidden: 128,
        ffn: 352,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 32,
        vocab: 256,
        rope_theta: 10_000.0,
        rms_eps: 1e-5,
        max_context: 4096,
        rope_layout: RopeLayout::Halves,
    }
}

/// Generates a model of shape `config` from `seed`.
pub fn generate(config: Config, seed: u64) -> Model {
    let mut g = SplitMix(seed);
    let c = &config;
    let embed = Matrix::new(c.vocab, c.hidden, (0..c.vocab * c.hidden).map(|_| g.uniform(1.0)).collect());
    let layers = (0..c.n_layers)
        .map(|_| LayerWeights {
            attn_norm: g.norm(c.hidden),
            wq: g.matrix(c.q_dim(), c.hidden),
            wk: g.matrix(c.kv_dim(), c.hidden),
            wv: g.matrix(c.kv_dim(), c.hidden),
            wo: g.matrix(c.hidden, c.q_dim()),
            mlp_norm: g.norm(c.hidden),
            w_gate: g.matrix(c.ffn, c.hidden),
            w_up: g.matrix(c.ffn, c.hidden),
            w_down: g.matrix(c.hidden, c.ffn),
        })
        .collect();
    let final_norm = g.norm(c.hidden);
    let lm_head = Some(g.matrix(c.vocab, c.hidden));
    Model { weights: Weights { embed, layers, final_norm, lm_head }, config }
}

/// The built-in default model.
pub fn default_model() -> Model {
    generate(default_config(), DEFAULT_SEED)
}
