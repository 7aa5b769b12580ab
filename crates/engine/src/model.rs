//! The forward pass of a Llama-family model, read top to bottom in dataflow order:
//! embedding → per layer (RMSNorm → Q/K/V → RoPE → causal GQA attention over the KV cache →
//! output projection → residual → RMSNorm → SwiGLU MLP → residual) → final RMSNorm → LM head.
//!
//! One `forward` serves prefill (many tokens) and decode (one token), as in gpt-fast: the KV
//! cache holds what earlier calls computed. Every intermediate is named by a trace [`Point`]
//! where it is computed; a [`Tracer`] is asked first whether it wants a point, so tracing off
//! costs one branch. Activations and the cache are rounded to the storage dtype at op
//! boundaries, as GPU engines store them.
//!
//! Reference: Touvron et al., "Llama 2" (2023); llama.cpp `llm_build_llama` for the GGUF layout.

use driftscope_trace::{DType, Point};
use half::{bf16, f16};

use crate::config::{Config, RopeLayout};
use crate::fault::Fault;
use crate::kernels::exp::exp_in_place;
use crate::kernels::{AttnShape, Kernels};
use crate::weights::Weights;

/// Observes trace points. The engine calls [`Tracer::wants`] before copying anything.
pub trait Tracer: Send {
    /// Whether the point at this layer (0 for model-global points) should be recorded.
    fn wants(&self, point: Point, layer: u32) -> bool;
    /// One traced row, already rounded to `dtype` (the values are exact in that dtype); `which`
    /// is its index in [`Run::trace_rows`].
    fn record(&mut self, point: Point, layer: u32, which: usize, row: &[f32], dtype: DType);
}

/// Rounds values to the storage dtype (a no-op for f32).
pub fn round_to(x: &mut [f32], dtype: DType) {
    match dtype {
        DType::F32 => {}
        DType::BF16 => x.iter_mut().for_each(|v| *v = bf16::from_f32(*v).to_f32()),
        DType::F16 => x.iter_mut().for_each(|v| *v = f16::from_f32(*v).to_f32()),
    }
}

/// Keys and values of every position computed so far, per layer: `[pos, kv_dim]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
}

impl KvCache {
    /// An empty cache for a model.
    pub fn new(config: &Config) -> KvCache {
        KvCache { k: vec![Vec::new(); config.n_layers], v: vec![Vec::new(); config.n_layers], len: 0 }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keeps only the first `len` positions (for prefix reuse).
    pub fn truncate(&mut self, len: usize, kv_dim: usize) {
        for layer in self.k.iter_mut().chain(self.v.iter_mut()) {
            layer.truncate(len * kv_dim);
        }
        self.len = self.len.min(len);
    }
}

/// How to run a forward call.
pub struct Run<'a> {
    /// The kernel profile.
    pub kernels: &'a dyn Kernels,
    /// Storage dtype of activations and cache.
    pub dtype: DType,
    /// Rows of this call to trace (0-based within the call's stacked rows).
    pub trace_rows: Vec<usize>,
    /// Where traced rows go.
    pub tracer: Option<&'a mut dyn Tracer>,
    /// A bug to commit in this call (the runner sets it for decode steps only).
    pub fault: Option<Fault>,
}

impl<'a> Run<'a> {
    /// A call with no traced row and no fault.
    pub fn quiet(kernels: &'a dyn Kernels, dtype: DType) -> Run<'a> {
        Run { kernels, dtype, trace_rows: vec![], tracer: None, fault: None }
    }
}

/// A model: its shape and its weights.
#[derive(Debug, Clone)]
pub struct Model {
    /// Shape.
    pub config: Config,
    /// Weights.
    pub weights: Weights,
}

/// Records the traced rows of `x` (`[rows, width]`) if the tracer wants the point.
fn trace(run: &mut Run<'_>, point: Point, layer: usize, x: &[f32], width: usize) {
    let Some(tracer) = run.tracer.as_deref_mut() else { return };
    if run.trace_rows.is_empty() || !tracer.wants(point, layer as u32) {
        return;
    }
    for (which, &row) in run.trace_rows.iter().enumerate() {
        tracer.record(point, layer as u32, which, &x[row * width..(row + 1) * width], run.dtype);
    }
}

/// One sequence of a batched forward call: its new tokens and its KV cache.
pub struct Seq<'a> {
    /// Tokens appended in this call.
    pub tokens: &'a [u32],
    /// The sequence's cache (its length is the position of the first token).
    pub cache: &'a mut KvCache,
}

impl Model {
    /// Runs `tokens` at positions `cache.len()..`, appends their keys and values to the cache,
    /// and returns the logits of the last row (`[vocab]`).
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, run: &mut Run<'_>) -> Vec<f32> {
        let mut seqs = [Seq { tokens, cache }];
        self.forward_batch(&mut seqs, run).pop().unwrap_or_default()
    }

    /// Runs several sequences in one call, as a serving engine batches requests: their rows are
    /// stacked, so every matmul and norm sees all of them at once, while RoPE, the KV cache and
    /// attention stay per sequence. `run.trace_rows` index the stacked rows. Returns the logits
    /// of each sequence's last row.
    pub fn forward_batch(&self, seqs: &mut [Seq<'_>], run: &mut Run<'_>) -> Vec<Vec<f32>> {
        // The kernels fork and join on rayon's pool. Called from a thread outside the pool, each
        // of them would hand its work over and put the caller to sleep until it is done; a
        // decode step runs hundreds of kernels, and those wake-ups were a fifth of its time. So
        // the whole pass runs on a thread of the pool.
        if rayon::current_thread_index().is_none() {
            return rayon::scope(|_| self.forward_batch_in_pool(seqs, run));
        }
        self.forward_batch_in_pool(seqs, run)
    }

    fn forward_batch_in_pool(&self, seqs: &mut [Seq<'_>], run: &mut Run<'_>) -> Vec<Vec<f32>> {
        let c = &self.config;
        let w = &self.weights;
        let k = run.kernels;
        let t: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        let (d, dt) = (c.hidden, run.dtype);
        let (qd, kvd) = (c.q_dim(), c.kv_dim());
        assert!(seqs.iter().all(|s| !s.tokens.is_empty()), "forward needs at least one token per sequence");
        // Row ranges of the sequences in the stacked rows, and their first positions.
        let mut spans = Vec::with_capacity(seqs.len());
        let mut row0 = 0;
        for s in seqs.iter() {
            spans.push((row0, row0 + s.tokens.len(), s.cache.len));
            row0 += s.tokens.len();
        }

        // x: [t, hidden], the residual stream.
        let mut x = vec![0.0f32; t * d];
        for (row, &tok) in x.chunks_mut(d).zip(seqs.iter().flat_map(|s| s.tokens.iter())) {
            row.copy_from_slice(&w.embed.row(tok as usize));
        }
        round_to(&mut x, dt);
        trace(run, Point::EmbedOut, 0, &x, d);

        let mut h = vec![0.0f32; t * d]; // [t, hidden]: normed input of a sub-block
        let mut q = vec![0.0f32; t * qd]; // [t, n_heads * head_dim]
        let mut kk = vec![0.0f32; t * kvd]; // [t, n_kv_heads * head_dim]
        let mut vv = vec![0.0f32; t * kvd]; // [t, n_kv_heads * head_dim]
        let mut ctx = vec![0.0f32; t * qd]; // [t, n_heads * head_dim]
        let mut proj = vec![0.0f32; t * d]; // [t, hidden]: attn_out or mlp_out
        let mut gate = vec![0.0f32; t * c.ffn]; // [t, ffn]
        let mut up = vec![0.0f32; t * c.ffn]; // [t, ffn]
        let mut act = vec![0.0f32; t * c.ffn]; // [t, ffn]: e^-gate
        let shape = AttnShape { n_heads: c.n_heads, n_kv_heads: c.n_kv_heads, head_dim: c.head_dim };
        // Rotary angles of each sequence's positions, once for all layers (one position late
        // under the injected `rope_pos` bug).
        let late = usize::from(run.fault == Some(Fault::RopePos));
        let ropes: Vec<RopeTable> = spans
            .iter()
            .map(|&(r0, r1, pos0)| RopeTable::new(r1 - r0, c.head_dim, pos0 + late, c.rope_theta))
            .collect();

        for (l, lw) in w.layers.iter().enumerate() {
            trace(run, Point::XIn, l, &x, d);

            k.rmsnorm(&x, t, &lw.attn_norm, c.rms_eps, &mut h);
            round_to(&mut h, dt);
            trace(run, Point::AttnNorm, l, &h, d);

            for (out, m, point) in
                [(&mut q, &lw.wq, Point::Q), (&mut kk, &lw.wk, Point::K), (&mut vv, &lw.wv, Point::V)]
            {
                k.matmul(&h, t, m, out);
                round_to(out, dt);
                trace(run, point, l, out, m.rows);
            }

            for (&(r0, r1, _), table) in spans.iter().zip(&ropes) {
                table.apply(&mut q[r0 * qd..r1 * qd], c.n_heads, c.rope_layout);
                table.apply(&mut kk[r0 * kvd..r1 * kvd], c.n_kv_heads, c.rope_layout);
            }
            round_to(&mut q, dt);
            trace(run, Point::QRope, l, &q, qd);
            round_to(&mut kk, dt);
            trace(run, Point::KRope, l, &kk, kvd);

            for (s, &(r0, r1, pos0)) in seqs.iter_mut().zip(&spans) {
                s.cache.k[l].extend_from_slice(&kk[r0 * kvd..r1 * kvd]);
                s.cache.v[l].extend_from_slice(&vv[r0 * kvd..r1 * kvd]);
                let (kc, vc) = (&s.cache.k[l], &s.cache.v[l]);
                let (q, out) = (&q[r0 * qd..r1 * qd], &mut ctx[r0 * qd..r1 * qd]);
                match run.fault {
                    None => k.attention(q, r1 - r0, pos0, kc, vc, shape, out),
                    Some(fault) => faulty_attention(k, fault, q, r1 - r0, pos0, kc, vc, shape, out),
                }
            }
            round_to(&mut ctx, dt);
            trace(run, Point::AttnCtx, l, &ctx, qd);

            k.matmul(&ctx, t, &lw.wo, &mut proj);
            round_to(&mut proj, dt);
            trace(run, Point::AttnOut, l, &proj, d);

            for (xi, pi) in x.iter_mut().zip(&proj) {
                *xi += pi;
            }
            round_to(&mut x, dt);
            trace(run, Point::XMid, l, &x, d);

            k.rmsnorm(&x, t, &lw.mlp_norm, c.rms_eps, &mut h);
            round_to(&mut h, dt);
            trace(run, Point::MlpNorm, l, &h, d);

            k.matmul(&h, t, &lw.w_gate, &mut gate);
            round_to(&mut gate, dt);
            trace(run, Point::Gate, l, &gate, c.ffn);
            k.matmul(&h, t, &lw.w_up, &mut up);
            round_to(&mut up, dt);
            trace(run, Point::Up, l, &up, c.ffn);

            silu_mul(&mut gate, &up, &mut act);
            round_to(&mut gate, dt);
            trace(run, Point::Act, l, &gate, c.ffn);

            k.matmul(&gate, t, &lw.w_down, &mut proj);
            round_to(&mut proj, dt);
            trace(run, Point::MlpOut, l, &proj, d);

            for (xi, pi) in x.iter_mut().zip(&proj) {
                *xi += pi;
            }
            round_to(&mut x, dt);
        }
        for (s, &(r0, r1, _)) in seqs.iter_mut().zip(&spans) {
            s.cache.len += r1 - r0;
        }

        // Final norm and LM head only for the rows that need them: each sequence's last row, and
        // the traced one.
        let mut rows: Vec<usize> = spans.iter().map(|&(_, r1, _)| r1 - 1).collect();
        for &r in &run.trace_rows {
            if !rows.contains(&r) {
                rows.push(r);
            }
        }
        let sel: Vec<f32> = rows.iter().flat_map(|&r| x[r * d..(r + 1) * d].iter().copied()).collect();
        let mut normed = vec![0.0f32; sel.len()];
        k.rmsnorm(&sel, rows.len(), &w.final_norm, c.rms_eps, &mut normed);
        round_to(&mut normed, dt);
        let head = w.lm_head();
        let mut logits = vec![0.0f32; rows.len() * head.rows];
        k.matmul(&normed, rows.len(), head, &mut logits);
        round_to(&mut logits, dt);
        if !run.trace_rows.is_empty() {
            // The traced rows, as rows of `normed` and `logits`.
            let saved = std::mem::take(&mut run.trace_rows);
            run.trace_rows = saved.iter().filter_map(|r| rows.iter().position(|x| x == r)).collect();
            trace(run, Point::FinalNorm, 0, &normed, d);
            trace(run, Point::Logits, 0, &logits, head.rows);
            run.trace_rows = saved;
        }
        (0..seqs.len()).map(|i| logits[i * head.rows..(i + 1) * head.rows].to_vec()).collect()
    }
}

/// Attention as a buggy decode path computes it (see [`Fault`]): the same kernel over the keys
/// and values the bug leaves it. `kc`/`vc` hold positions `0..pos0 + rows`, as for the kernel.
#[allow(clippy::too_many_arguments)]
fn faulty_attention(
    k: &dyn Kernels,
    fault: Fault,
    q: &[f32],
    rows: usize,
    pos0: usize,
    kc: &[f32],
    vc: &[f32],
    shape: AttnShape,
    out: &mut [f32],
) {
    let kvd = shape.kv_dim();
    match fault {
        // The positions are wrong, not the attention.
        Fault::RopePos => k.attention(q, rows, pos0, kc, vc, shape, out),
        // Only this call's own keys and values: the cache is gone.
        Fault::KvDrop => k.attention(q, rows, 0, &kc[pos0 * kvd..], &vc[pos0 * kvd..], shape, out),
        // The cache read one row short: position pos0 - 1 is missing.
        Fault::CacheOffByOne if pos0 > 0 => {
            let skip = |x: &[f32]| [&x[..(pos0 - 1) * kvd], &x[pos0 * kvd..]].concat();
            k.attention(q, rows, pos0 - 1, &skip(kc), &skip(vc), shape, out)
        }
        Fault::CacheOffByOne => k.attention(q, rows, pos0, kc, vc, shape, out),
        // Each row sees the keys before its own position: a row at position p sees 0..p-1, the
        // rows of a call shifted one key back; a row at position 0 sees none and gets zeros.
        Fault::MaskOffByOne => {
            let qd = shape.n_heads * shape.head_dim;
            let (q, out, rows, pos0) = if pos0 == 0 {
                out[..qd].fill(0.0);
                (&q[qd..], &mut out[qd..], rows - 1, 1)
            } else {
                (q, out, rows, pos0)
            };
            if rows > 0 {
                let keys = (pos0 - 1 + rows) * kvd;
                k.attention(q, rows, pos0 - 1, &kc[..keys], &vc[..keys], shape, out);
            }
        }
    }
}

/// `gate = silu(gate) · up`, elementwise (`act` receives `e^-gate`, the engine's exponential):
/// `gate / (1 + e^-gate) · up`. Large calls (a prefill) run in parallel chunks; every element
/// gets the same operations either way.
fn silu_mul(gate: &mut [f32], up: &[f32], act: &mut [f32]) {
    use rayon::prelude::*;
    /// Elements per parallel chunk; smaller calls (a decode step) run on the calling thread.
    const CHUNK: usize = 16 * 1024;
    let one = |gate: &mut [f32], up: &[f32], act: &mut [f32]| {
        act.iter_mut().zip(gate.iter()).for_each(|(e, g)| *e = -g);
        exp_in_place(act);
        for ((g, u), e) in gate.iter_mut().zip(up).zip(act.iter()) {
            *g = *g / (1.0 + e) * u;
        }
    };
    if gate.len() < 2 * CHUNK {
        return one(gate, up, act);
    }
    gate.par_chunks_mut(CHUNK)
        .zip(up.par_chunks(CHUNK))
        .zip(act.par_chunks_mut(CHUNK))
        .for_each(|((g, u), a)| one(g, u, a));
}

/// Rotary position embeddings for rows at positions `pos0..pos0 + rows`: their cosines and sines,
/// computed once per forward pass and applied to the queries and keys of every layer. Angles are
/// computed in f64 from the position, so every path gets the same ones.
pub struct RopeTable {
    head_dim: usize,
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// The table for `rows` rows from position `pos0`: per row and pair `i`, the angle
    /// `pos · theta^(-2i / head_dim)` in f64, its cosine and sine rounded to f32.
    pub fn new(rows: usize, head_dim: usize, pos0: usize, theta: f64) -> RopeTable {
        let half = head_dim / 2;
        let (mut cos, mut sin) = (Vec::with_capacity(rows * half), Vec::with_capacity(rows * half));
        for r in 0..rows {
            let pos = (pos0 + r) as f64;
            for i in 0..half {
                let angle = pos * theta.powf(-2.0 * i as f64 / head_dim as f64);
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        RopeTable { head_dim, half, cos, sin }
    }

    /// Rotates each head of each row of `x` (`[rows, heads * head_dim]`).
    pub fn apply(&self, x: &mut [f32], heads: usize, layout: RopeLayout) {
        let (half, head_dim) = (self.half, self.head_dim);
        if half == 0 {
            return;
        }
        let width = heads * head_dim;
        for (r, row) in x.chunks_mut(width).enumerate() {
            let (cos, sin) = (&self.cos[r * half..(r + 1) * half], &self.sin[r * half..(r + 1) * half]);
            for head in row.chunks_mut(head_dim) {
                for i in 0..half {
                    let (a, b) = match layout {
                        RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                        RopeLayout::Halves => (i, i + half),
                    };
                    let (x0, x1) = (head[a], head[b]);
                    head[a] = x0 * cos[i] - x1 * sin[i];
                    head[b] = x0 * sin[i] + x1 * cos[i];
                }
            }
        }
    }
}
