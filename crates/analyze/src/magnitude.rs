//! Exact magnitudes of a drift, computed from the dumped rows of both sides, and the impact of
//! drifting logits on the next token.

use driftscope_trace::DType;
use half::{bf16, f16};

/// How far apart two rows are, element by element.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Magnitude {
    /// Largest |a_i - b_i|.
    pub max_abs: f64,
    /// Largest |a_i - b_i| / max(|a_i|, |b_i|) over elements not both zero.
    pub max_rel: f64,
    /// Largest distance in units in the last place of the storage dtype (adjacent values: 1;
    /// +0 and -0: 0).
    pub max_ulp: u64,
    /// a·b / (|a| |b|) (1 for identical rows; NaN when a row is all zeros).
    pub cosine: f64,
    /// |a - b| / |a|.
    pub rel_l2: f64,
    /// |a - b|.
    pub diff_l2: f64,
    /// |a|: the baseline row's L2 norm.
    pub norm: f64,
    /// Number of elements whose bits differ.
    pub n_diff: u64,
    /// Index of the largest |a_i - b_i|.
    pub argmax: u64,
    /// Elements compared.
    pub numel: u64,
}

/// Position of a value on the line of representable values of its dtype: adjacent values are
/// one apart and both zeros are 0.
pub fn ordinal(x: f32, dtype: DType) -> i64 {
    let (bits, sign_bit) = match dtype {
        DType::F32 => (u64::from(x.to_bits()), 1u64 << 31),
        DType::BF16 => (u64::from(bf16::from_f32(x).to_bits()), 1u64 << 15),
        DType::F16 => (u64::from(f16::from_f32(x).to_bits()), 1u64 << 15),
    };
    let mag = (bits & (sign_bit - 1)) as i64;
    if bits & sign_bit != 0 {
        -mag
    } else {
        mag
    }
}

/// Compares two rows stored in `dtype` (values given as f32, exact in that dtype); reductions
/// in f64.
pub fn compare_rows(a: &[f32], b: &[f32], dtype: DType) -> Magnitude {
    let (mut max_abs, mut max_rel, mut max_ulp, mut argmax, mut n_diff) = (0.0f64, 0.0f64, 0u64, 0usize, 0u64);
    let (mut dot, mut na, mut nb, mut nd) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for (i, (&xa, &xb)) in a.iter().zip(b).enumerate() {
        n_diff += u64::from(xa.to_bits() != xb.to_bits());
        let (x, y) = (f64::from(xa), f64::from(xb));
        let d = (x - y).abs();
        if d > max_abs {
            max_abs = d;
            argmax = i;
        }
        let scale = x.abs().max(y.abs());
        if scale > 0.0 {
            max_rel = max_rel.max(d / scale);
        }
        max_ulp = max_ulp.max(ordinal(xa, dtype).abs_diff(ordinal(xb, dtype)));
        dot += x * y;
        na += x * x;
        nb += y * y;
        nd += d * d;
    }
    Magnitude {
        max_abs,
        max_rel,
        max_ulp,
        cosine: dot / (na.sqrt() * nb.sqrt()),
        rel_l2: if na > 0.0 { nd.sqrt() / na.sqrt() } else { nd.sqrt() },
        diff_l2: nd.sqrt(),
        norm: na.sqrt(),
        n_diff,
        argmax: argmax as u64,
        numel: a.len().min(b.len()) as u64,
    }
}

/// What a drift in the logits does to the next token.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct TokenImpact {
    /// Whether both sides pick the same greedy token.
    pub argmax_agree: bool,
    /// The baseline's greedy token.
    pub baseline_argmax: u64,
    /// The candidate's greedy token.
    pub candidate_argmax: u64,
    /// KL(baseline || candidate) of the softmax distributions, in nats.
    pub kl: f64,
    /// Largest |Δ log-probability| over the baseline's top-10 tokens.
    pub max_dlogprob: f64,
}

/// Log-softmax in f64.
fn log_softmax(x: &[f32]) -> Vec<f64> {
    let m = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
    let lse = x.iter().map(|&v| (f64::from(v) - m).exp()).sum::<f64>().ln() + m;
    x.iter().map(|&v| f64::from(v) - lse).collect()
}

fn argmax(x: &[f32]) -> usize {
    (0..x.len()).fold(0, |best, i| if x[i] > x[best] { i } else { best })
}

/// Compares two logit rows.
pub fn token_impact(base: &[f32], cand: &[f32]) -> TokenImpact {
    let (lb, lc) = (log_softmax(base), log_softmax(cand));
    let kl: f64 = lb.iter().zip(&lc).map(|(p, q)| p.exp() * (p - q)).sum();
    let mut top: Vec<usize> = (0..base.len()).collect();
    top.sort_by(|&i, &j| base[j].total_cmp(&base[i]));
    let max_dlogprob = top.iter().take(10).map(|&i| (lb[i] - lc[i]).abs()).fold(0.0, f64::max);
    let (ab, ac) = (argmax(base), argmax(cand));
    TokenImpact {
        argmax_agree: ab == ac,
        baseline_argmax: ab as u64,
        candidate_argmax: ac as u64,
        kl: kl.max(0.0),
        max_dlogprob,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ulp_distance_of_neighbours_zeros_and_signs() {
        let x = 1.5f32;
        let next = f32::from_bits(x.to_bits() + 1);
        assert_eq!(compare_rows(&[x], &[next], DType::F32).max_ulp, 1);
        assert_eq!(compare_rows(&[0.0], &[-0.0], DType::F32).max_ulp, 0);
        assert_eq!(compare_rows(&[0.0], &[-0.0], DType::F32).n_diff, 1, "the bits differ");
        let tiny = f32::from_bits(1);
        assert_eq!(compare_rows(&[tiny], &[-tiny], DType::F32).max_ulp, 2, "across zero");
        let b = bf16::from_f32(1.5);
        let bn = bf16::from_bits(b.to_bits() + 1).to_f32();
        assert_eq!(compare_rows(&[1.5], &[bn], DType::BF16).max_ulp, 1);
        let h = f16::from_f32(-2.0);
        let hn = f16::from_bits(h.to_bits() + 3).to_f32();
        assert_eq!(compare_rows(&[-2.0], &[hn], DType::F16).max_ulp, 3);
    }

    #[test]
    fn magnitudes_of_known_vectors() {
        let a = [3.0f32, -4.0, 0.0, 1.0];
        let b = [3.0f32, -4.5, 0.0, 1.25];
        let m = compare_rows(&a, &b, DType::F32);
        assert_eq!((m.max_abs, m.argmax, m.n_diff, m.numel), (0.5, 1, 2, 4));
        assert!((m.max_rel - 0.25 / 1.25).abs() < 1e-15, "{}", m.max_rel);
        let norm_a = (9.0f64 + 16.0 + 1.0).sqrt();
        assert!((m.rel_l2 - (0.25f64 + 0.0625).sqrt() / norm_a).abs() < 1e-15);
        assert_eq!((m.diff_l2, m.norm), ((0.25f64 + 0.0625).sqrt(), norm_a));
        let dot = 9.0 + 18.0 + 1.25;
        let norm_b = (9.0f64 + 20.25 + 1.5625).sqrt();
        assert!((m.cosine - dot / (norm_a * norm_b)).abs() < 1e-15);
        let same = compare_rows(&a, &a, DType::F32);
        assert_eq!((same.max_abs, same.max_ulp, same.n_diff, same.rel_l2), (0.0, 0, 0, 0.0));
        assert!((same.cosine - 1.0).abs() < 1e-15);
    }

    #[test]
    fn token_impact_of_identical_and_shifted_logits() {
        let l = [1.0f32, 3.0, -2.0, 0.5];
        let same = token_impact(&l, &l);
        assert_eq!(same.kl, 0.0);
        assert_eq!(same.max_dlogprob, 0.0);
        assert!(same.argmax_agree && same.baseline_argmax == 1);
        // A constant shift changes no probability.
        let shifted: Vec<f32> = l.iter().map(|x| x + 10.0).collect();
        let t = token_impact(&l, &shifted);
        assert!(t.kl < 1e-12 && t.max_dlogprob < 1e-12, "{t:?}");
        // Swapping the top two changes the greedy token.
        let swapped = [1.0f32, 0.5, -2.0, 3.0];
        let t = token_impact(&l, &swapped);
        assert!(!t.argmax_agree && t.candidate_argmax == 3 && t.kl > 0.5, "{t:?}");
        // KL against a hand computation.
        let (p, q) = ([0.0f32, 0.0], [0.0f32, (3.0f32).ln()]);
        let want = 0.5 * (0.5f64 / 0.25).ln() + 0.5 * (0.5f64 / 0.75).ln();
        // ln 3 is rounded to f32 in the input: agreement to 1e-7, not to f64 precision.
        assert!((token_impact(&p, &q).kl - want).abs() < 1e-7);
    }
}
