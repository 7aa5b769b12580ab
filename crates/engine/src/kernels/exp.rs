//! The engine's exponential: `e^x` for f32, evaluated in f64 by one fixed sequence of
//! operations, so its bits depend neither on the C library (whose `expf` differs between
//! versions and between the variants it picks for a CPU) nor on the path: [`exp`] for one value
//! and [`exp_in_place`] for many (eight per AVX-512 register) give the same bits, as the tests
//! check. Accuracy: within one unit in the last place of the f32 result (the f64 evaluation is
//! good to about 2^-32 relative before the final rounding).
//!
//! Method: `x · log2(e) = k + r` with `k` the nearest integer and `|r| <= 1/2`; then
//! `e^x = 2^k · e^(r · ln 2)`, the second factor by its Taylor polynomial of degree 8 (Horner,
//! multiply then add), the first by building the f64 power of two.

/// Inputs are clamped to this range: below it the result rounds to zero, above it to infinity.
const LO: f32 = -104.0;
const HI: f32 = 89.0;

/// Taylor coefficients 1/n! for n = 8 down to 2 (the terms of degree 1 and 0 are 1).
const C: [f64; 7] = [1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 1.0 / 2.0];

/// `e^x`, the same bits on every machine and in [`exp_in_place`]. NaN stays NaN.
pub fn exp(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    let xd = f64::from(x.clamp(LO, HI));
    let z = xd * std::f64::consts::LOG2_E;
    let k = z.round_ties_even();
    let u = (z - k) * std::f64::consts::LN_2;
    let mut p = C[0];
    for c in &C[1..] {
        p = p * u + c;
    }
    p = p * u + 1.0;
    p = p * u + 1.0;
    let scale = f64::from_bits(((k as i64 + 1023) as u64) << 52);
    (p * scale) as f32
}

/// [`exp`] of every value, in place: eight at a time with AVX-512 where the CPU has it.
pub fn exp_in_place(xs: &mut [f32]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512 (checked above), which implies AVX.
        done = unsafe { avx512::exp_in_place(xs) };
    }
    for x in &mut xs[done..] {
        *x = exp(*x);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{C, HI, LO};
    use std::arch::x86_64::*;

    /// [`super::exp`] of the values in whole groups of eight; returns how many were done. Each
    /// group is a long chain of dependent operations, so many run side by side: sixteen per step,
    /// then four, then one.
    #[target_feature(enable = "avx512f,avx")]
    pub(super) unsafe fn exp_in_place(xs: &mut [f32]) -> usize {
        // SAFETY: the CPU has AVX-512 (the caller's contract).
        let rest = unsafe { groups::<16>(xs) };
        let rest = unsafe { groups::<4>(rest) };
        unsafe { groups::<1>(rest) };
        xs.len() / 8 * 8
    }

    /// [`super::exp`] of the values in steps of `G` groups of eight side by side; returns the
    /// values left over.
    #[target_feature(enable = "avx512f,avx")]
    #[inline]
    unsafe fn groups<const G: usize>(xs: &mut [f32]) -> &mut [f32] {
        let mut steps = xs.chunks_exact_mut(8 * G);
        for c in &mut steps {
            let p = c.as_mut_ptr();
            // SAFETY: `c` holds 8G f32; unaligned accesses.
            let x: [__m256; G] = std::array::from_fn(|g| unsafe { _mm256_loadu_ps(p.add(8 * g)) });
            for (g, y) in exp8s(x).iter().enumerate() {
                // SAFETY: as for the loads.
                unsafe { _mm256_storeu_ps(p.add(8 * g), *y) };
            }
        }
        steps.into_remainder()
    }

    /// `G` groups of eight lanes of [`super::exp`]: the same operations in the same order, each
    /// step applied to every group before the next (so that the groups' chains overlap, in
    /// loops over arrays that compile to straight code: an array `map` of a closure per group
    /// was compiled as a call per group, 3.6 ns a value).
    #[target_feature(enable = "avx512f,avx")]
    #[inline]
    fn exp8s<const G: usize>(x: [__m256; G]) -> [__m256; G] {
        let mut z = [_mm512_setzero_pd(); G];
        let mut k = [_mm512_setzero_pd(); G];
        let mut u = [_mm512_setzero_pd(); G];
        for g in 0..G {
            // clamp (NaN lanes are computed on anything and replaced at the end)
            let c = _mm256_max_ps(_mm256_min_ps(x[g], _mm256_set1_ps(HI)), _mm256_set1_ps(LO));
            z[g] = _mm512_mul_pd(_mm512_cvtps_pd(c), _mm512_set1_pd(std::f64::consts::LOG2_E));
        }
        for g in 0..G {
            k[g] = _mm512_roundscale_pd::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(z[g]);
            u[g] = _mm512_mul_pd(_mm512_sub_pd(z[g], k[g]), _mm512_set1_pd(std::f64::consts::LN_2));
        }
        let mut p = [_mm512_set1_pd(C[0]); G];
        for &ci in &C[1..] {
            for g in 0..G {
                p[g] = _mm512_add_pd(_mm512_mul_pd(p[g], u[g]), _mm512_set1_pd(ci));
            }
        }
        let one = _mm512_set1_pd(1.0);
        for _ in 0..2 {
            for g in 0..G {
                p[g] = _mm512_add_pd(_mm512_mul_pd(p[g], u[g]), one);
            }
        }
        let mut out = x;
        for g in 0..G {
            // 2^k from its bits: k is an integer of at most 151 in magnitude.
            let e = _mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_cvtpd_epi32(k[g])), _mm512_set1_epi64(1023));
            let y = _mm512_mul_pd(p[g], _mm512_castsi512_pd(_mm512_slli_epi64::<52>(e)));
            out[g] = _mm256_blendv_ps(_mm512_cvtpd_ps(y), x[g], _mm256_cmp_ps::<_CMP_UNORD_Q>(x[g], x[g]));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values across the whole range, the clamps, the subnormal results and the specials.
    fn inputs() -> Vec<f32> {
        let mut v =
            vec![0.0, -0.0, 1.0, -1.0, 0.5, 88.7, 88.72, 88.73, 89.0, 100.0, -87.3, -100.0, -103.9, -104.0, -105.0];
        v.extend([
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
            1e-30,
            -1e-30,
            f32::MAX,
            f32::MIN,
        ]);
        let mut s = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..400_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            // Uniform over [-110, 95], and values spread over all magnitudes.
            v.push((s >> 40) as f32 / (1u64 << 24) as f32 * 205.0 - 110.0);
            v.push(f32::from_bits(s as u32 & 0x42ff_ffff | (s as u32 & 0x8000_0000)));
        }
        v
    }

    #[test]
    fn vector_and_scalar_give_the_same_bits() {
        let xs = inputs();
        let mut ys = xs.clone();
        exp_in_place(&mut ys);
        for (&x, &y) in xs.iter().zip(&ys) {
            assert_eq!(y.to_bits(), exp(x).to_bits(), "exp({x:e})");
        }
        // Every way of splitting a slice into steps of sixteen, four and one group and a tail.
        for n in [1, 7, 8, 31, 32, 33, 95, 127, 128, 129, 161, 200, 383] {
            let mut ys = xs[1000..1000 + n].to_vec();
            exp_in_place(&mut ys);
            for (&x, &y) in xs[1000..].iter().zip(&ys) {
                assert_eq!(y.to_bits(), exp(x).to_bits(), "exp({x:e}) in a slice of {n}");
            }
        }
        let mut nan = [f32::NAN; 9];
        exp_in_place(&mut nan);
        assert!(nan.iter().all(|y| y.is_nan()) && exp(f32::NAN).is_nan());
    }

    #[test]
    fn within_one_ulp_of_the_correctly_rounded_value() {
        let (mut exact, mut total) = (0usize, 0usize);
        for x in inputs() {
            let (got, want) = (exp(x), f64::from(x).exp() as f32);
            let ulps = (got.to_bits() as i64 - want.to_bits() as i64).abs();
            assert!(ulps <= 1, "exp({x:e}) = {got:e}, want {want:e}");
            exact += usize::from(ulps == 0);
            total += 1;
        }
        assert!(exact * 1000 >= total * 999, "{exact} of {total} correctly rounded");
        assert_eq!((exp(0.0), exp(-0.0), exp(f32::NEG_INFINITY), exp(f32::INFINITY)), (1.0, 1.0, 0.0, f32::INFINITY));
    }
}
