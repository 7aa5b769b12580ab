//! The oracle: plain loops, accumulation in f64, the textbook two-pass softmax.

use super::AttnShape;
use crate::weights::Matrix;

/// The reference profile.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reference;

impl super::Kernels for Reference {
    fn name(&self) -> &'static str {
        "reference"
    }
}

/// `out[r, o] = Σ_i x[r, i] · w[o, i]`, accumulated in f64.
pub fn matmul(x: &[f32], rows: usize, w: &Matrix, out: &mut [f32]) {
    for r in 0..rows {
        let xr = &x[r * w.cols..(r + 1) * w.cols];
        for o in 0..w.rows {
            let s: f64 = xr.iter().zip(w.row(o).iter()).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
            out[r * w.rows + o] = s as f32;
        }
    }
}

/// RMSNorm with the mean of squares in f64.
pub fn rmsnorm(x: &[f32], rows: usize, weight: &[f32], eps: f32, out: &mut [f32]) {
    let n = weight.len();
    for r in 0..rows {
        let xr = &x[r * n..(r + 1) * n];
        let ms: f64 = xr.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / n as f64;
        let inv = 1.0 / (ms + f64::from(eps)).sqrt();
        for i in 0..n {
            out[r * n + i] = (f64::from(xr[i]) * inv * f64::from(weight[i])) as f32;
        }
    }
}

/// Causal grouped-query attention with a two-pass softmax in f64.
pub fn attention(q: &[f32], rows: usize, pos0: usize, k: &[f32], v: &[f32], shape: AttnShape, out: &mut [f32]) {
    let d = shape.head_dim;
    let kv_dim = shape.kv_dim();
    let scale = 1.0 / (d as f64).sqrt();
    for r in 0..rows {
        let ctx = pos0 + r + 1;
        for h in 0..shape.n_heads {
            let qh = &q[(r * shape.n_heads + h) * d..][..d];
            let off = shape.kv_offset(h);
            let scores: Vec<f64> = (0..ctx)
                .map(|j| {
                    let kj = &k[j * kv_dim + off..][..d];
                    qh.iter().zip(kj).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum::<f64>() * scale
                })
                .collect();
            let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let p: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let l: f64 = p.iter().sum();
            for i in 0..d {
                let a: f64 = (0..ctx).map(|j| p[j] * f64::from(v[j * kv_dim + off + i])).sum();
                out[(r * shape.n_heads + h) * d + i] = (a / l) as f32;
            }
        }
    }
}
