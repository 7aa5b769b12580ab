//! Batch-invariant kernels: one reduction order per output element, whatever the shape.

use super::reduce::{par_attention_plan, par_matmul, par_matmul_blocked, rmsnorm_with, sumsq_lanes8, DotOrder, KvPlan};
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
        // Every query row alone, whatever the query length: fixed-size splits, merged in order.
        par_attention_plan(q, rows, pos0, k, v, shape, KvPlan::Splits(KV_SPLIT), out);
    }
}
