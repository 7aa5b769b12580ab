//! Batch-invariant kernels: one reduction order per output element, whatever the shape.

use super::reduce::{
    par_attention, par_matmul, par_matmul_blocked, rmsnorm_with, sumsq_lanes8, DotOrder, KvHead, Softmax,
};
use super::{AttnShape, Kernels};
use crate::weights::Matrix;

/// The `invariant` profile.
#[derive(Debug, Clone, Copy, Default)]
pub struct Invariant;

/// Keys per attention split: fixed, so a query reduces its keys in the same chunks in prefill
/// and in decode (a fixed split *size*, not a fixed number of splits).
pub const KV_SPLIT: usize = 64;

impl Kernels for Invariant {
    fn name(&self) -> &'static str {
        "invariant"
    }

    fn matmul(&self, x: &[f32], rows: usize, w: &Matrix, out: &mut [f32]) {
        // The GEMM order for every row count, one row included (the blocked kernel computes
        // exactly `dot_blocked` per element, so both calls give the same bits).
        if rows == 1 {
            par_matmul(x, rows, w, out, DotOrder::Blocked)
        } else {
            par_matmul_blocked(x, rows, w, out)
        }
    }

    fn rmsnorm(&self, x: &[f32], rows: usize, weight: &[f32], eps: f32, out: &mut [f32]) {
        rmsnorm_with(x, rows, weight, eps, out, sumsq_lanes8)
    }

    fn attention(&self, q: &[f32], rows: usize, pos0: usize, k: &[f32], v: &[f32], shape: AttnShape, out: &mut [f32]) {
        let d = shape.head_dim;
        let stride = shape.n_kv_heads * d;
        let scale = 1.0 / (d as f32).sqrt();
        par_attention(q, rows, pos0, shape, out, |qh, off, ctx, o| {
            let mut total = Softmax::new(d);
            let mut j = 0;
            while j < ctx {
                let j1 = (j + KV_SPLIT).min(ctx);
                let mut part = Softmax::new(d);
                part.absorb(qh, &KvHead { k, v, stride, off }, j, j1, scale);
                total.merge(&part);
                j = j1;
            }
            total.finish(o);
        });
    }
}
