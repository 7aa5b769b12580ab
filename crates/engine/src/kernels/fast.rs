//! Shape-dependent kernels, as production engines choose them (see the module docs).

use super::reduce::{
    par_attention_plan, par_matmul, par_matmul_blocked, rmsnorm_with, sumsq_blocked128, sumsq_lanes8, DotOrder, KvPlan,
};
use super::{AttnShape, Kernels};
use crate::weights::Matrix;

/// The `fast` profile.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fast;

/// From this many rows on, RMSNorm switches to its blocked reduction.
pub const RMSNORM_BLOCKED_FROM_ROWS: usize = 32;
/// KV tile of the prefill attention kernel.
pub const PREFILL_KV_TILE: usize = 32;

/// Number of KV splits of the decode kernel for a context length: one per 64 keys, at most 8.
pub fn decode_splits(ctx: usize) -> usize {
    ctx.div_ceil(64).clamp(1, 8)
}

impl Kernels for Fast {
    fn name(&self) -> &'static str {
        "fast"
    }

    fn matmul(&self, x: &[f32], rows: usize, w: &Matrix, out: &mut [f32]) {
        if rows == 1 {
            par_matmul(x, rows, w, out, DotOrder::Lanes8) // GEMV
        } else {
            par_matmul_blocked(x, rows, w, out) // GEMM: dot_blocked's order
        }
    }

    fn rmsnorm(&self, x: &[f32], rows: usize, weight: &[f32], eps: f32, out: &mut [f32]) {
        if rows >= RMSNORM_BLOCKED_FROM_ROWS {
            rmsnorm_with(x, rows, weight, eps, out, sumsq_blocked128)
        } else {
            rmsnorm_with(x, rows, weight, eps, out, sumsq_lanes8)
        }
    }

    fn attention(&self, q: &[f32], rows: usize, pos0: usize, k: &[f32], v: &[f32], shape: AttnShape, out: &mut [f32]) {
        if rows == 1 {
            // Flash-decoding: the keys in `decode_splits(ctx)` ranges, each reduced on its own,
            // then the partial softmax states combined.
            let ctx = pos0 + 1;
            par_attention_plan(q, rows, pos0, k, v, shape, KvPlan::Splits(ctx.div_ceil(decode_splits(ctx))), out);
        } else {
            // Flash attention: one pass over KV tiles with an online softmax.
            par_attention_plan(q, rows, pos0, k, v, shape, KvPlan::Tiles(PREFILL_KV_TILE), out);
        }
    }
}
