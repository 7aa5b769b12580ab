//! Kernels: the shape-sensitive reductions of a transformer, behind one trait.
//!
//! Three implementations:
//! - [`Reference`]: plain loops accumulating in f64, the oracle of the tests (the trait's
//!   default methods call it).
//! - [`Fast`]: shape-dependent kernels as production engines have them. One row takes a GEMV
//!   with 8 accumulators; many rows take a K-blocked GEMM; prefill attention walks KV tiles with
//!   an online softmax while decode attention splits the KV range into a number of splits chosen
//!   from the context length (flash-decoding); RMSNorm blocks its reduction differently from 32
//!   rows on. Each choice changes the order of additions, so prefill and decode drift.
//! - [`Invariant`]: batch-invariant kernels. Every output element is reduced in one fixed order
//!   whatever the number of rows or the query length: the GEMM order for every row count, a fixed
//!   KV split size, one RMSNorm order. Prefill and decode are bitwise equal.
//!
//! Every order is written out in plain Rust (`reduce.rs`), and no kernel relies on
//! floating-point reassociation by the compiler (Rust never does it). The vector kernels (AVX,
//! F16C and FMA, and AVX-512 where present, detected at run time) compute exactly those orders,
//! as the tests check bit for bit: with AVX-512 the GEMM runs blocks of 6 rows × 16 outputs on
//! weights packed per panel, and prefill attention runs blocks of 16 query rows per head over
//! keys transposed once, so that a register holds sixteen keys' lanes, three rows share each key
//! register, and the rows' softmax steps run side by side. A decode step's attention
//! reads each cached key and value once for all the query heads that share it (grouped-query
//! attention), its (KV head, split) pairs in parallel. The GEMM order's lanes use
//! fused multiply-adds: FMA instructions where the CPU has them, the correctly rounded software
//! `mul_add` elsewhere, the same bits on every target (slowly without FMA). The other orders
//! multiply, then add. The softmax and SiLU use the engine's own exponential ([`exp`]), not the C
//! library's, so that no bit depends on which `expf` a machine has.

pub mod exp;
mod fast;
mod invariant;
mod reduce;
mod reference;

pub use fast::Fast;
pub use invariant::Invariant;
#[cfg(target_arch = "x86_64")]
pub(crate) use reduce::has_avx512;
pub use reference::Reference;

use crate::weights::Matrix;

/// Attention geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
}

impl AttnShape {
    /// Values per cached position: the rows of every KV head side by side.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Where the KV head that query head `h` reads starts within a cached row (grouped-query
    /// attention: consecutive query heads share a KV head).
    pub fn kv_offset(&self, h: usize) -> usize {
        h / (self.n_heads / self.n_kv_heads) * self.head_dim
    }

    /// The scores' scale, 1/√head_dim in f32: one definition for every attention path, so
    /// prefill and decode scale by the same bits.
    pub fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

/// The kernels the forward pass needs. Default methods are the reference implementation.
pub trait Kernels: Sync + Send {
    /// Profile name for traces and reports.
    fn name(&self) -> &'static str;

    /// `out[r, o] = Σ_i x[r, i] · w[o, i]` for `rows` rows of `x` (`[rows, w.cols]`).
    fn matmul(&self, x: &[f32], rows: usize, w: &Matrix, out: &mut [f32]) {
        reference::matmul(x, rows, w, out)
    }

    /// Per row: `out = x / sqrt(mean(x²) + eps) · weight`.
    fn rmsnorm(&self, x: &[f32], rows: usize, weight: &[f32], eps: f32, out: &mut [f32]) {
        reference::rmsnorm(x, rows, weight, eps, out)
    }

    /// Causal attention of `rows` query rows at positions `pos0..pos0+rows` over the cached keys
    /// and values `[0, pos0 + rows)` (`[ctx, kv_dim]` each). `q` and `out` are
    /// `[rows, n_heads * head_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn attention(&self, q: &[f32], rows: usize, pos0: usize, k: &[f32], v: &[f32], shape: AttnShape, out: &mut [f32]) {
        reference::attention(q, rows, pos0, k, v, shape, out)
    }
}

/// The kernel profiles a user can choose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// Shape-dependent kernels (drift between prefill and decode).
    Fast,
    /// Batch-invariant kernels (prefill and decode bitwise equal).
    Invariant,
    /// The plain f64-accumulating oracle (slow).
    Reference,
}

impl Profile {
    /// The profile's kernels.
    pub fn kernels(self) -> &'static dyn Kernels {
        match self {
            Profile::Fast => &Fast,
            Profile::Invariant => &Invariant,
            Profile::Reference => &Reference,
        }
    }

    /// Name as written in traces.
    pub fn as_str(self) -> &'static str {
        self.kernels().name()
    }

    /// Parses `fast`, `invariant` or `reference`.
    pub fn parse(name: &str) -> Option<Profile> {
        match name {
            "fast" => Some(Profile::Fast),
            "invariant" => Some(Profile::Invariant),
            "reference" => Some(Profile::Reference),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests;
