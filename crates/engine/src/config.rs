//! Model configuration: the hyper-parameters of a Llama-family model (HF config names).

/// How RoPE pairs the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Adjacent pairs `(2i, 2i+1)`: llama.cpp's layout, which GGUF llama weights are permuted for.
    Interleaved,
    /// Halves `(i, i + d/2)`: Hugging Face's `rotate_half`, for safetensors checkpoints.
    Halves,
}

/// The shape of a Llama-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Model name, for reports.
    pub name: String,
    /// Number of decoder layers (`num_hidden_layers`, GGUF `block_count`).
    pub n_layers: usize,
    /// Residual width (`hidden_size`, GGUF `embedding_length`).
    pub hidden: usize,
    /// MLP width (`intermediate_size`, GGUF `feed_forward_length`).
    pub ffn: usize,
    /// Query heads (`num_attention_heads`).
    pub n_heads: usize,
    /// Key/value heads (`num_key_value_heads`; fewer than `n_heads` for grouped-query attention).
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// RoPE base frequency (`rope_theta`).
    pub rope_theta: f64,
    /// RMSNorm epsilon (`rms_norm_eps`).
    pub rms_eps: f32,
    /// Longest context the model was trained for (`max_position_embeddings`).
    pub max_context: usize,
    /// RoPE pairing.
    pub rope_layout: RopeLayout,
}

impl Config {
    /// Width of all query heads together.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of all key (or value) heads together.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Checks the shape is self-consistent; `what` names the source in errors.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("n_layers", self.n_layers),
            ("hidden", self.hidden),
            ("ffn", self.ffn),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab", self.vocab),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("{name} is 0"));
            }
        }
        // Bounds far above any published model, checked before anything is sized from them.
        let limits = [
            ("n_layers", self.n_layers, 1 << 10),
            ("hidden", self.hidden, 1 << 17),
            ("ffn", self.ffn, 1 << 19),
            ("n_heads", self.n_heads, 1 << 10),
            ("n_kv_heads", self.n_kv_heads, 1 << 10),
            ("head_dim", self.head_dim, 1 << 12),
            ("vocab", self.vocab, 1 << 22),
            ("max_context", self.max_context, 1 << 24),
        ];
        for (name, v, limit) in limits {
            if v > limit {
                return Err(format!("{name} {v} is above the limit of {limit}"));
            }
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(format!("n_heads {} is not a multiple of n_kv_heads {}", self.n_heads, self.n_kv_heads));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {} is odd; RoPE needs pairs", self.head_dim));
        }
        let positive = |x: f64| x.is_finite() && x > 0.0;
        if !positive(f64::from(self.rms_eps)) || !positive(self.rope_theta) {
            return Err(format!(
                "rms_eps {} and rope_theta {} must be finite and positive",
                self.rms_eps, self.rope_theta
            ));
        }
        Ok(())
    }
}
