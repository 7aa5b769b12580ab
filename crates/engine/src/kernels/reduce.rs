//! Reduction orders shared by the kernels. Each function fixes its order of additions exactly;
//! the kernels differ only in which of these they pick for which shape.

use super::exp::{exp, exp_in_place};

/// Dot product with 8 interleaved accumulators (lane `i % 8`), summed as a balanced tree, then
/// the tail in order: the GEMV order.
pub fn dot_lanes8(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc = [0.0f32; 8];
    let (ac, bc) = (a[..n].chunks_exact(8), b[..n].chunks_exact(8));
    let (ta, tb) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = lanes8_sum(acc);
    for (x, y) in ta.iter().zip(tb) {
        s += x * y;
    }
    s
}

/// K-blocked dot product: blocks of 64, each reduced with 4 interleaved accumulators (each step
/// one fused multiply-add, rounded once) summed pairwise, the block's tail added in order
/// (multiply, then add), block sums added in order: the GEMM order.
///
/// This plain version is the oracle of the tests and the fallback of CPUs without FMA, where
/// `mul_add` is computed in software: slow, and the same bits.
pub fn dot_blocked(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut total = 0.0f32;
    for (xa, xb) in a[..n].chunks(64).zip(b[..n].chunks(64)) {
        let mut acc = [0.0f32; 4];
        let (ac, bc) = (xa.chunks_exact(4), xb.chunks_exact(4));
        let (ta, tb) = (ac.remainder(), bc.remainder());
        for (x, y) in ac.zip(bc) {
            for l in 0..4 {
                acc[l] = x[l].mul_add(y[l], acc[l]);
            }
        }
        let mut block = (acc[0] + acc[1]) + (acc[2] + acc[3]);
        for (x, y) in ta.iter().zip(tb) {
            block += x * y;
        }
        total += block;
    }
    total
}

/// Sum of squares with 8 interleaved accumulators.
pub fn sumsq_lanes8(x: &[f32]) -> f32 {
    dot_lanes8(x, x)
}

/// Sum of squares in blocks of 128, each with 4 accumulators.
pub fn sumsq_blocked128(x: &[f32]) -> f32 {
    let mut total = 0.0f32;
    for block in x.chunks(128) {
        let mut acc = [0.0f32; 4];
        let c = block.chunks_exact(4);
        let tail = c.remainder();
        for v in c {
            for l in 0..4 {
                acc[l] += v[l] * v[l];
            }
        }
        let mut s = (acc[0] + acc[2]) + (acc[1] + acc[3]);
        for v in tail {
            s += v * v;
        }
        total += s;
    }
    total
}

/// A dot product's order of operations: [`dot_lanes8`] (the GEMV order) or [`dot_blocked`] (the
/// GEMM order). Each also reads f16 weights in place, in the same order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DotOrder {
    /// [`dot_lanes8`].
    Lanes8,
    /// [`dot_blocked`].
    Blocked,
}

impl DotOrder {
    /// The dot product of f32 rows.
    pub fn f32(self, a: &[f32], b: &[f32]) -> f32 {
        match self {
            DotOrder::Lanes8 => dot_lanes8(a, b),
            DotOrder::Blocked => {
                #[cfg(target_arch = "x86_64")]
                if has_vector_units() {
                    // One row through the four-row kernel (its other rows repeat it).
                    let n = a.len().min(b.len());
                    // SAFETY: the CPU has AVX and FMA (checked); both slices hold `n` values.
                    return unsafe { avx::dot_blocked_x4(a, [b.as_ptr(); 4], n)[0] };
                }
                dot_blocked(a, b)
            }
        }
    }

    /// The same dot product, bit for bit, with f16 weights widened as they are read (F16C where
    /// the CPU has it, detected at run time).
    pub fn f16(self, a: &[f32], w: &[half::f16]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if has_vector_units() {
            // SAFETY: the CPU has the features these functions are compiled for (checked above).
            return unsafe {
                match self {
                    DotOrder::Lanes8 => f16c::dot_lanes8(a, w),
                    // One row through the four-row kernel (its other rows repeat it), as for f32.
                    DotOrder::Blocked => f16c::dot_blocked_x4(a, [w.as_ptr(); 4], a.len().min(w.len()))[0],
                }
            };
        }
        let mut wide = vec![0.0; w.len()];
        crate::weights::widen_f16(w, &mut wide);
        self.f32(a, &wide)
    }

    /// [`DotOrder::f32`] of `a` with four rows, each with its own bits. The GEMV order runs the
    /// four rows as four independent chains of vector additions (AVX where the CPU has it): one
    /// row alone waits on each addition, four keep the adder busy.
    pub fn f32_x4(self, a: &[f32], w: [&[f32]; 4]) -> [f32; 4] {
        #[cfg(target_arch = "x86_64")]
        if has_vector_units() {
            let (p, n) = (w.map(|r| r.as_ptr()), row_len(a, &w));
            // SAFETY: the CPU has AVX and FMA (checked above).
            return unsafe {
                match self {
                    DotOrder::Lanes8 => avx::dot_lanes8_x4(a, p, n),
                    DotOrder::Blocked => avx::dot_blocked_x4(a, p, n),
                }
            };
        }
        w.map(|r| self.f32(a, r))
    }

    /// [`DotOrder::f16`] of `a` with four rows, each with its own bits (see [`DotOrder::f32_x4`]);
    /// with AVX-512 where the CPU has it (the GEMM order for lengths that are multiples of 64).
    pub fn f16_x4(self, a: &[f32], w: [&[half::f16]; 4]) -> [f32; 4] {
        #[cfg(target_arch = "x86_64")]
        if avx512::available() {
            let (p, n) = (w.map(|r| r.as_ptr()), row_len(a, &w));
            match self {
                // SAFETY: the CPU has AVX-512 F, AVX2 and F16C (checked above).
                DotOrder::Lanes8 => return unsafe { avx512::dot_lanes8_x4_f16(a, p, n) },
                // SAFETY: as above, and `n` is a multiple of 64.
                DotOrder::Blocked if n.is_multiple_of(64) => return unsafe { avx512::dot_blocked_x4_f16(a, p, n) },
                DotOrder::Blocked => {}
            }
        }
        self.f16_x4_256(a, w)
    }

    /// [`DotOrder::f16_x4`] without the AVX-512 kernels (256-bit registers where the CPU has AVX),
    /// so that tests on AVX-512 machines check the kernel other CPUs run.
    pub fn f16_x4_256(self, a: &[f32], w: [&[half::f16]; 4]) -> [f32; 4] {
        #[cfg(target_arch = "x86_64")]
        if has_vector_units() {
            let (p, n) = (w.map(|r| r.as_ptr()), row_len(a, &w));
            // SAFETY: the CPU has the features these functions are compiled for (checked above).
            return unsafe {
                match self {
                    DotOrder::Lanes8 => f16c::dot_lanes8_x4(a, p, n),
                    DotOrder::Blocked => f16c::dot_blocked_x4(a, p, n),
                }
            };
        }
        w.map(|r| self.f16(a, r))
    }
}

/// Whether the CPU has AVX, FMA and F16C (the vector kernels' features; every CPU with FMA has
/// F16C; detected once, then cached).
#[cfg(target_arch = "x86_64")]
pub fn has_vector_units() -> bool {
    std::arch::is_x86_feature_detected!("avx")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

/// The length all of `a` and the rows `w` have (the shortest).
fn row_len<T>(a: &[f32], w: &[&[T]; 4]) -> usize {
    w.iter().fold(a.len(), |m, r| m.min(r.len()))
}

/// How far ahead of its reads a GEMV asks for each of its four rows' weights: 2 KiB. Rows follow
/// one another in memory, so past a row's end this is the start of the next; the hardware
/// prefetcher alone left a decode step at two thirds of the memory's streaming rate (f16,
/// single thread: 94 → 108–115 tok/s on SmolLM2 with this; 1 KiB ahead was slower than none, 4
/// and 8 KiB less good).
#[cfg(target_arch = "x86_64")]
const PREFETCH_BYTES: usize = 2048;

/// Asks for the cache lines [`PREFETCH_BYTES`] ahead of value `i` of four rows, once per cache
/// line of each row (the kernels step through `i` in multiples of 4 values).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_rows<T>(w: [*const T; 4], i: usize) {
    let per_line = 64 / std::mem::size_of::<T>();
    if i.is_multiple_of(per_line) {
        for r in w {
            prefetch_line(r.wrapping_add(i).cast::<u8>().wrapping_add(PREFETCH_BYTES));
        }
    }
}

/// How many keys ahead of its reads a decode step asks for keys (and it asks for the values of
/// the keys it reads, which it needs once the chunk's scores are known). Measured on SmolLM2's
/// shape at 512 keys with the caches flushed between steps (as the weights flush them): no
/// read-ahead 2.0 ms of attention per step, 4 keys 1.37, 8 keys 1.41–1.63, 16 keys 1.27–1.37,
/// 32 keys 1.29–1.31 (two threads); single thread 3.4, 2.2, 2.1, 2.0, 2.1 ms.
const KEYS_AHEAD: usize = 16;

/// Asks for the cache lines of the `n` bytes from `p` on, each line once.
#[inline(always)]
fn prefetch_bytes(p: *const u8, n: usize) {
    let skew = p as usize % 64;
    let start = p.wrapping_sub(skew);
    for line in 0..(skew + n).div_ceil(64) {
        prefetch_line(start.wrapping_add(64 * line));
    }
}

/// Asks for the cache line holding `p` (a hint: it never faults and reads nothing the program
/// sees, so `p` may point anywhere; a no-op off x86-64).
#[inline(always)]
fn prefetch_line(p: *const u8) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
    // SAFETY: a prefetch reads nothing the program sees and never faults; the address is only
    // computed by the callers (wrapping arithmetic), never dereferenced.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
}

/// Whether the AVX-512 kernels run on this CPU (AVX-512 F, AVX2 and F16C; detected once).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512() -> bool {
    avx512::available()
}

/// Sums eight lanes in [`dot_lanes8`]'s tree.
#[inline(always)]
fn lanes8_sum(l: [f32; 8]) -> f32 {
    ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]))
}

#[cfg(target_arch = "x86_64")]
mod avx512;

/// The orders with AVX, FMA and F16C (256-bit registers): the GEMM block, the one- and four-row
/// dot products of both orders, and the attention's value sums; each the plain function's
/// operations in its order.
#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    /// [`super::dot_blocked`] of four input rows with four weight rows (a 4 × 4 block of the
    /// GEMM): one register holds the four lanes of two outputs (the low half one weight row's,
    /// the high half the next one's), so one multiplication and one addition advance two dot
    /// products, each exactly as the scalar code does. `xs` and `ws` point at rows of at least
    /// `k` values.
    #[target_feature(enable = "avx,fma")]
    pub(super) unsafe fn block_dot(xs: [*const f32; 4], ws: [*const f32; 4], k: usize, out: &mut [[f32; 4]; 4]) {
        // Block sums are added to the totals in registers while blocks are whole multiples of
        // four; the one block with a tail (the last) is finished in scalar code.
        let mut tv = [_mm256_setzero_ps(); 2];
        let mut total = [[0.0f32; 4]; 4];
        let mut b = 0;
        while b < k {
            let end = (b + 64).min(k);
            let full = b + (end - b) / 4 * 4;
            let mut acc = [[_mm256_setzero_ps(); 2]; 4];
            let mut i = b;
            while i < full {
                // SAFETY: i + 4 <= k, within every row; unaligned loads.
                unsafe {
                    let w01 = _mm256_loadu2_m128(ws[1].add(i), ws[0].add(i));
                    let w23 = _mm256_loadu2_m128(ws[3].add(i), ws[2].add(i));
                    for (a, x) in acc.iter_mut().zip(xs) {
                        let xv = _mm256_broadcast_ps(&_mm_loadu_ps(x.add(i)));
                        a[0] = _mm256_fmadd_ps(xv, w01, a[0]);
                        a[1] = _mm256_fmadd_ps(xv, w23, a[1]);
                    }
                }
                i += 4;
            }
            if full == end {
                // Two levels of pairwise additions give every block sum `(l0 + l1) + (l2 + l3)`:
                // `tv[h]` holds rows 2h and 2h + 1 in the order of `TOTAL_LANES`.
                let h = acc.map(|a| _mm256_hadd_ps(a[0], a[1]));
                tv[0] = _mm256_add_ps(tv[0], _mm256_hadd_ps(h[0], h[1]));
                tv[1] = _mm256_add_ps(tv[1], _mm256_hadd_ps(h[2], h[3]));
            } else {
                add_lanes(&mut total, &mut tv);
                for r in 0..4 {
                    let mut l = [0.0f32; 16];
                    // SAFETY: `l` holds sixteen f32.
                    unsafe {
                        _mm256_storeu_ps(l.as_mut_ptr(), acc[r][0]);
                        _mm256_storeu_ps(l.as_mut_ptr().add(8), acc[r][1]);
                    }
                    for j in 0..4 {
                        // The register holds outputs 0 and 1 (low, high half), then 2 and 3.
                        let q = &l[4 * j..4 * j + 4];
                        let mut block = (q[0] + q[1]) + (q[2] + q[3]);
                        for t in full..end {
                            // SAFETY: t < k, within both rows.
                            block += unsafe { *xs[r].add(t) * *ws[j].add(t) };
                        }
                        total[r][j] += block;
                    }
                }
            }
            b = end;
        }
        add_lanes(&mut total, &mut tv);
        *out = total;
    }

    /// (row within the pair, output) of each lane of a totals register.
    const TOTAL_LANES: [(usize, usize); 8] = [(0, 0), (0, 2), (1, 0), (1, 2), (0, 1), (0, 3), (1, 1), (1, 3)];

    /// Adds the register totals into `total` (still zero where they are non-zero) and clears them.
    #[target_feature(enable = "avx")]
    fn add_lanes(total: &mut [[f32; 4]; 4], tv: &mut [__m256; 2]) {
        for (h, v) in tv.iter_mut().enumerate() {
            let mut l = [0.0f32; 8];
            // SAFETY: `l` holds eight f32.
            unsafe { _mm256_storeu_ps(l.as_mut_ptr(), *v) };
            for (&(r, j), x) in TOTAL_LANES.iter().zip(l) {
                total[2 * h + r][j] += x;
            }
            *v = _mm256_setzero_ps();
        }
    }

    /// [`super::dot_blocked`] of four f32 rows at once (see [`blocked_x4`]). `w` points at four
    /// rows of at least `n` values, `a` holds at least `n`.
    #[target_feature(enable = "avx,f16c,fma")]
    pub(super) unsafe fn dot_blocked_x4(a: &[f32], w: [*const f32; 4], n: usize) -> [f32; 4] {
        // SAFETY: the caller's pointers hold `n` values each.
        unsafe { blocked_x4(a, w, n, |p, q| _mm256_loadu2_m128(q, p), |p| *p) }
    }

    /// [`super::dot_blocked`] of `a` with four rows at once: one register holds the four lanes of
    /// two rows (low half, high half), so each fused multiply-add advances two rows, each exactly
    /// as the scalar code does; block sums are added up in registers while blocks are whole
    /// multiples of four. `pair(p, q)` gives the four values at `p` (low half) and at `q` (high
    /// half) in one register; `value(p)` gives the value at `p`. `w` points at four rows of at
    /// least `n` values, read ahead ([`super::prefetch_rows`]); `a` holds at least `n`. (F16C too,
    /// so that the f16 version's widening inlines here.)
    #[target_feature(enable = "avx,f16c,fma")]
    #[inline]
    pub(super) unsafe fn blocked_x4<T>(
        a: &[f32],
        w: [*const T; 4],
        n: usize,
        pair: impl Fn(*const T, *const T) -> __m256,
        value: impl Fn(*const T) -> f32,
    ) -> [f32; 4] {
        let mut tv = _mm256_setzero_ps();
        let mut total = [0.0f32; 4];
        let mut b = 0;
        while b < n {
            let end = (b + 64).min(n);
            let full = b + (end - b) / 4 * 4;
            let (mut acc01, mut acc23) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut i = b;
            while i < full {
                super::prefetch_rows(w, i);
                // SAFETY: i + 4 <= n, within `a` and each row; unaligned loads.
                let (av, w01, w23) = unsafe {
                    (
                        _mm256_broadcast_ps(&_mm_loadu_ps(a.as_ptr().add(i))),
                        pair(w[0].add(i), w[1].add(i)),
                        pair(w[2].add(i), w[3].add(i)),
                    )
                };
                acc01 = _mm256_fmadd_ps(av, w01, acc01);
                acc23 = _mm256_fmadd_ps(av, w23, acc23);
                i += 4;
            }
            if full == end {
                // Lanes of `hadd(h, h)`: row 0, row 2, row 0, row 2, row 1, row 3, row 1, row 3,
                // each `(l0 + l1) + (l2 + l3)`.
                let h = _mm256_hadd_ps(acc01, acc23);
                tv = _mm256_add_ps(tv, _mm256_hadd_ps(h, h));
            } else {
                add_rows(&mut total, &mut tv);
                let mut l = [0.0f32; 16];
                // SAFETY: `l` holds sixteen f32.
                unsafe {
                    _mm256_storeu_ps(l.as_mut_ptr(), acc01);
                    _mm256_storeu_ps(l.as_mut_ptr().add(8), acc23);
                }
                for (r, t) in total.iter_mut().enumerate() {
                    let q = &l[4 * r..4 * r + 4];
                    let mut block = (q[0] + q[1]) + (q[2] + q[3]);
                    for (j, &x) in a[..end].iter().enumerate().skip(full) {
                        // SAFETY: j < n, within row r.
                        block += x * value(unsafe { w[r].add(j) });
                    }
                    *t += block;
                }
            }
            b = end;
        }
        add_rows(&mut total, &mut tv);
        total
    }

    /// Adds the register totals of [`blocked_x4`] into `total` (zero where they are non-zero)
    /// and clears them.
    #[target_feature(enable = "avx")]
    fn add_rows(total: &mut [f32; 4], tv: &mut __m256) {
        let mut l = [0.0f32; 8];
        // SAFETY: `l` holds eight f32.
        unsafe { _mm256_storeu_ps(l.as_mut_ptr(), *tv) };
        for (t, lane) in total.iter_mut().zip([0, 4, 1, 5]) {
            *t += l[lane];
        }
        *tv = _mm256_setzero_ps();
    }

    /// [`super::accumulate_values`]: `value(j)` holds at least `acc.len()` values.
    #[target_feature(enable = "avx")]
    pub(super) unsafe fn accumulate_values<'v>(acc: &mut [f32], ps: &[f32], value: &impl Fn(usize) -> &'v [f32]) {
        let d = acc.len();
        let full = d / 8 * 8;
        let mut c = 0;
        while c < full {
            let width = ((full - c) / 8).min(8);
            let mut regs = [_mm256_setzero_ps(); 8];
            for (k, r) in regs.iter_mut().enumerate().take(width) {
                // SAFETY: c + 8k + 8 <= full <= d.
                *r = unsafe { _mm256_loadu_ps(acc.as_ptr().add(c + 8 * k)) };
            }
            for (j, &p) in ps.iter().enumerate() {
                let row = &value(j)[..d];
                let pv = _mm256_set1_ps(p);
                for (k, r) in regs.iter_mut().enumerate().take(width) {
                    // SAFETY: c + 8k + 8 <= d = row.len().
                    *r = _mm256_add_ps(*r, _mm256_mul_ps(pv, unsafe { _mm256_loadu_ps(row.as_ptr().add(c + 8 * k)) }));
                }
            }
            for (k, r) in regs.iter().enumerate().take(width) {
                // SAFETY: as for the loads.
                unsafe { _mm256_storeu_ps(acc.as_mut_ptr().add(c + 8 * k), *r) };
            }
            c += 8 * width;
        }
        if full < d {
            for (j, &p) in ps.iter().enumerate() {
                for (a, &x) in acc[full..].iter_mut().zip(&value(j)[full..d]) {
                    *a += p * x;
                }
            }
        }
    }

    /// [`super::dot_lanes8`] of four f32 rows at once (see [`lanes8_x4`]). `w` points at four
    /// rows of at least `n` values; `a` holds at least `n`.
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn dot_lanes8_x4(a: &[f32], w: [*const f32; 4], n: usize) -> [f32; 4] {
        // SAFETY: the caller's pointers hold `n` values each.
        unsafe { lanes8_x4(a, w, n, |p| _mm256_loadu_ps(p), |p| *p) }
    }

    /// [`super::dot_lanes8`] of `Q` queries with four keys, each key read once for all of them
    /// (the query heads of one KV head in grouped-query attention): every (query, key) pair keeps
    /// its own eight lanes in one register, multiplied then added as the scalar code does, then
    /// summed in `lanes8_sum`'s tree with the tail inputs in order. `keys` point at four rows of
    /// at least `n` values; every query holds at least `n`.
    #[target_feature(enable = "avx")]
    #[inline]
    pub(super) unsafe fn dots_lanes8_q<const Q: usize>(
        qs: [&[f32]; Q],
        keys: [*const f32; 4],
        n: usize,
    ) -> [[f32; 4]; Q] {
        let full = n / 8 * 8;
        let mut acc = [[_mm256_setzero_ps(); 4]; Q];
        let mut i = 0;
        while i < full {
            // SAFETY: i + 8 <= n, within every key and every query; unaligned loads.
            let kv = keys.map(|p| unsafe { _mm256_loadu_ps(p.add(i)) });
            for (a, q) in acc.iter_mut().zip(qs) {
                let qv = unsafe { _mm256_loadu_ps(q.as_ptr().add(i)) };
                for (c, k) in a.iter_mut().zip(kv) {
                    *c = _mm256_add_ps(*c, _mm256_mul_ps(qv, k));
                }
            }
            i += 8;
        }
        let mut out = [[0.0f32; 4]; Q];
        for ((o, a), q) in out.iter_mut().zip(acc).zip(qs) {
            for (r, (o, c)) in o.iter_mut().zip(a).enumerate() {
                let mut l = [0.0f32; 8];
                // SAFETY: `l` holds eight f32.
                unsafe { _mm256_storeu_ps(l.as_mut_ptr(), c) };
                let mut s = super::lanes8_sum(l);
                for (j, &x) in q[..n].iter().enumerate().skip(full) {
                    // SAFETY: j < n, within key r.
                    s += x * unsafe { *keys[r].add(j) };
                }
                *o = s;
            }
        }
        out
    }

    /// [`super::dot_lanes8`] of `a` with four rows at once: each row keeps its own eight lanes in
    /// one register, multiplied then added as the scalar code does. `load(p)` gives the eight
    /// values at `p` in a register; `value(p)` gives the value at `p`. `w` points at four rows of
    /// at least `n` values, read ahead ([`super::prefetch_rows`]); `a` holds at least `n`. (F16C
    /// too, so that the f16 version's widening inlines.)
    #[target_feature(enable = "avx,f16c")]
    #[inline]
    pub(super) unsafe fn lanes8_x4<T>(
        a: &[f32],
        w: [*const T; 4],
        n: usize,
        load: impl Fn(*const T) -> __m256,
        value: impl Fn(*const T) -> f32,
    ) -> [f32; 4] {
        let full = n / 8 * 8;
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i < full {
            super::prefetch_rows(w, i);
            // SAFETY: i + 8 <= n, within `a` and every row; unaligned loads.
            let av = unsafe { _mm256_loadu_ps(a.as_ptr().add(i)) };
            for (c, p) in acc.iter_mut().zip(w) {
                *c = _mm256_add_ps(*c, _mm256_mul_ps(av, load(unsafe { p.add(i) })));
            }
            i += 8;
        }
        let mut out = [0.0f32; 4];
        for (r, (o, c)) in out.iter_mut().zip(acc).enumerate() {
            let mut l = [0.0f32; 8];
            // SAFETY: `l` holds eight f32.
            unsafe { _mm256_storeu_ps(l.as_mut_ptr(), c) };
            let mut s = super::lanes8_sum(l);
            for (j, &x) in a[..n].iter().enumerate().skip(full) {
                // SAFETY: j < n, within row r.
                s += x * value(unsafe { w[r].add(j) });
            }
            *o = s;
        }
        out
    }
}

/// The f16 dot products with F16C: the scalar functions' lanes become one vector register, with
/// the same operations in the same order (fused multiply-adds where the order has them).
#[cfg(target_arch = "x86_64")]
mod f16c {
    use half::f16;
    use std::arch::x86_64::*;

    /// [`super::dot_lanes8`] with f16 weights.
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn dot_lanes8(a: &[f32], w: &[f16]) -> f32 {
        let n = a.len().min(w.len());
        let full = n / 8 * 8;
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i < full {
            // SAFETY: i + 8 <= n, within both slices; unaligned loads.
            let (av, wv) = unsafe {
                (_mm256_loadu_ps(a.as_ptr().add(i)), _mm256_cvtph_ps(_mm_loadu_si128(w.as_ptr().add(i).cast())))
            };
            acc = _mm256_add_ps(acc, _mm256_mul_ps(av, wv));
            i += 8;
        }
        let mut l = [0.0f32; 8];
        // SAFETY: `l` holds eight f32.
        unsafe { _mm256_storeu_ps(l.as_mut_ptr(), acc) };
        let mut s = super::lanes8_sum(l);
        for j in full..n {
            s += a[j] * w[j].to_f32();
        }
        s
    }

    /// [`super::dot_lanes8`] of four f16 rows at once (see [`super::avx::lanes8_x4`]), widened
    /// as they are read. `w` points at four rows of at least `n` values, `a` holds at least `n`.
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn dot_lanes8_x4(a: &[f32], w: [*const f16; 4], n: usize) -> [f32; 4] {
        // SAFETY: the caller's pointers hold `n` values each.
        unsafe { super::avx::lanes8_x4(a, w, n, |p| _mm256_cvtph_ps(_mm_loadu_si128(p.cast())), |p| (*p).to_f32()) }
    }

    /// [`super::dot_blocked`] of four f16 rows at once (see [`super::avx::blocked_x4`]), widened
    /// as they are read. `w` points at four rows of at least `n` values, `a` holds at least `n`.
    #[target_feature(enable = "avx,f16c,fma")]
    pub(super) unsafe fn dot_blocked_x4(a: &[f32], w: [*const f16; 4], n: usize) -> [f32; 4] {
        // Eight f16 of two rows (four each) widened into one register.
        let pair = |p: *const f16, q: *const f16| {
            // SAFETY: the caller passes pointers with four readable f16 each.
            unsafe {
                let lo = _mm_loadl_epi64(p.cast());
                let both = _mm_castpd_si128(_mm_loadh_pd(_mm_castsi128_pd(lo), q.cast()));
                _mm256_cvtph_ps(both)
            }
        };
        // SAFETY: the caller's pointers hold `n` values each.
        unsafe { super::avx::blocked_x4(a, w, n, pair, |p| (*p).to_f32()) }
    }
}

/// Runs `order`'s dot product for every row of `x` and of `w`, in parallel over tiles of output
/// features; the reduction order is the one `order` fixes, whatever the tiling and the storage.
pub fn par_matmul(x: &[f32], rows: usize, w: &crate::weights::Matrix, out: &mut [f32], order: DotOrder) {
    use rayon::prelude::*;
    // Tiles of output features: small for GEMM (the tile's rows stay in cache while every input
    // row passes), larger for GEMV, where a task would otherwise be a few microseconds of work,
    // and there an even share for every thread: the 192-row K/V projections of a 3-KV-head model
    // made one tile of 256 (one thread working), the 576-row ones three (two on one thread).
    let tile_len = if rows == 1 { gemv_tile_len(w.rows, rayon::current_num_threads()) } else { 32 };
    let (k, n) = (w.cols, w.rows);
    assert_eq!(x.len(), rows * k, "matmul input is not [rows, in]");
    assert_eq!(out.len(), rows * n, "matmul output is not [rows, out]");
    let tiles: Vec<Vec<f32>> = (0..n.div_ceil(tile_len))
        .into_par_iter()
        .map(|t| {
            let (o0, o1) = (t * tile_len, ((t + 1) * tile_len).min(n));
            if rows == 1 {
                // GEMV: f16 and f32 rows are read in place, block rows dequantized four at a time
                // in registers (AVX-512) or else into a buffer, bf16 rows one at a time (widened
                // into a buffer that stays in L1).
                match &w.data {
                    crate::weights::Storage::F16(v) => {
                        let row = |o: usize| &v[o * k..(o + 1) * k];
                        return gemv_x4(o0, o1, |os| order.f16_x4(x, os.map(row)), |o| order.f16(x, row(o)));
                    }
                    crate::weights::Storage::F32(v) => {
                        let row = |o: usize| &v[o * k..(o + 1) * k];
                        return gemv_x4(o0, o1, |os| order.f32_x4(x, os.map(row)), |o| order.f32(x, row(o)));
                    }
                    // Block rows dequantized in the kernels' registers (AVX-512: a SmolLM2 Q4_1
                    // decode step went from 7.2 to 4.7 ms with them), else into buffers.
                    #[cfg(target_arch = "x86_64")]
                    crate::weights::Storage::Q4_1(v) if avx512::available() => {
                        // SAFETY: the CPU has AVX-512 (checked).
                        return unsafe { avx512::gemv_blocks(x, v, k / crate::weights::BLOCK, (o0, o1), order) };
                    }
                    #[cfg(target_arch = "x86_64")]
                    crate::weights::Storage::Q8_0(v) if avx512::available() => {
                        // SAFETY: the CPU has AVX-512 (checked).
                        return unsafe { avx512::gemv_blocks(x, v, k / crate::weights::BLOCK, (o0, o1), order) };
                    }
                    crate::weights::Storage::Q4_1(_) | crate::weights::Storage::Q8_0(_) => {
                        return gemv_widened(x, w, (o0, o1), order);
                    }
                    crate::weights::Storage::BF16(_) => {}
                }
                return (o0..o1).map(|o| w.with_rows_f32(o, o + 1, |wr| order.f32(x, wr))).collect();
            }
            // GEMM: the tile's weight rows in f32 (the storage, or widened once for 16-bit storage).
            w.with_rows_f32(o0, o1, |wt| {
                let mut part = Vec::with_capacity(rows * (o1 - o0));
                for r in 0..rows {
                    let xr = &x[r * k..(r + 1) * k];
                    for o in 0..o1 - o0 {
                        part.push(order.f32(xr, &wt[o * k..(o + 1) * k]));
                    }
                }
                part
            })
        })
        .collect();
    scatter_tiles(&tiles, tile_len, rows, n, out);
}

/// The GEMV of rows `o0..o1` of `w` in `order`, each row widened into a buffer that stays in L1
/// (four rows at a time, each row's bytes asked for two rows ahead of its stream), then the f32
/// kernels: the path of block matrices on CPUs without AVX-512 (tested on every CPU).
pub(crate) fn gemv_widened(
    x: &[f32],
    w: &crate::weights::Matrix,
    (o0, o1): (usize, usize),
    order: DotOrder,
) -> Vec<f32> {
    let (k, n) = (w.cols, w.rows);
    let (base, row_bytes) = (w.data.as_ptr(), w.data.row_bytes(k));
    let fill = |o: usize, dst: &mut [f32]| {
        let ahead = base.wrapping_add((o + 2).min(n - 1) * row_bytes);
        prefetch_bytes(ahead, row_bytes);
        w.data.widen_into(o * k, (o + 1) * k, dst)
    };
    let (mut four, mut one) = (vec![0.0f32; 4 * k], vec![0.0f32; k]);
    let rows4 = |os: [usize; 4]| {
        for (j, o) in os.into_iter().enumerate() {
            fill(o, &mut four[j * k..(j + 1) * k]);
        }
        order.f32_x4(x, std::array::from_fn(|j| &four[j * k..(j + 1) * k]))
    };
    let row1 = |o: usize| {
        fill(o, &mut one);
        order.f32(x, &one)
    };
    gemv_x4(o0, o1, rows4, row1)
}

/// Rows per GEMV tile for `n` output rows on `threads` threads: two tiles per thread where that
/// keeps tiles between 16 and 256 rows (multiples of 16), so that every thread gets as many rows.
fn gemv_tile_len(n: usize, threads: usize) -> usize {
    n.div_ceil(2 * threads.max(1)).next_multiple_of(16).clamp(16, 256)
}

#[cfg(test)]
#[test]
fn gemv_tiles_give_every_thread_the_same_rows() {
    // SmolLM2's projections on two threads: K/V 192 rows, Q/O and down 576, gate/up 1536.
    for (n, threads, tiles) in [(192, 2, 4), (576, 2, 4), (1536, 2, 6), (49152, 2, 192), (576, 1, 3), (100, 4, 7)] {
        let len = gemv_tile_len(n, threads);
        assert!(len.is_multiple_of(16) && (16..=256).contains(&len), "n={n}: {len}");
        assert_eq!(n.div_ceil(len), tiles, "n={n} threads={threads}");
    }
}

/// The GEMV results of rows `o0..o1`: `four(rows)` gives the dot products of four rows, `one(row)`
/// of one (the rows left over). The four rows of a call are a
/// quarter of the range apart: four adjacent rows (1 KiB apart) read side by side ran at half the
/// speed of one row on the development machine (the hardware prefetcher follows distant streams
/// better); far apart they beat it.
fn gemv_x4(
    o0: usize,
    o1: usize,
    mut four: impl FnMut([usize; 4]) -> [f32; 4],
    mut one: impl FnMut(usize) -> f32,
) -> Vec<f32> {
    let q = (o1 - o0) / 4;
    let mut part = vec![0.0f32; o1 - o0];
    for o in o0..o0 + q {
        let r = four(std::array::from_fn(|j| o + j * q));
        for (j, v) in r.into_iter().enumerate() {
            part[o - o0 + j * q] = v;
        }
    }
    for o in o0 + 4 * q..o1 {
        part[o - o0] = one(o);
    }
    part
}

/// `par_matmul(x, rows, w, out, DotOrder::Blocked)`, bit for bit, computed a block of input rows
/// × output features at a time: each loaded chunk of `x` and of `w` serves several outputs, and
/// every output element still runs exactly [`dot_blocked`]'s sequence of operations (its own
/// four lane accumulators per 64-block, summed the same way, tails in order). With AVX-512 a
/// block is 6 rows × 16 outputs (`avx512`), else [`MR`] × [`NR`] ([`par_matmul_blocked_4x4`]).
pub fn par_matmul_blocked(x: &[f32], rows: usize, w: &crate::weights::Matrix, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        return avx512::par_matmul(x, rows, w, out);
    }
    par_matmul_blocked_4x4(x, rows, w, out)
}

/// [`par_matmul_blocked`] in blocks of [`MR`] × [`NR`] (AVX and FMA where the CPU has them, else
/// portable code): the kernel of CPUs without AVX-512.
pub fn par_matmul_blocked_4x4(x: &[f32], rows: usize, w: &crate::weights::Matrix, out: &mut [f32]) {
    use rayon::prelude::*;
    const TILE: usize = 32;
    let (k, n) = (w.cols, w.rows);
    assert_eq!(x.len(), rows * k, "matmul input is not [rows, in]");
    assert_eq!(out.len(), rows * n, "matmul output is not [rows, out]");
    let tiles: Vec<Vec<f32>> = (0..n.div_ceil(TILE))
        .into_par_iter()
        .map(|t| {
            let (o0, o1) = (t * TILE, ((t + 1) * TILE).min(n));
            let width = o1 - o0;
            let mut part = vec![0.0f32; rows * width];
            let xrow = |r: usize| &x[r * k..(r + 1) * k];
            w.with_rows_f32(o0, o1, |wt| {
                let wrow = |o: usize| &wt[(o - o0) * k..(o - o0 + 1) * k];
                let mut r = 0;
                while r < rows {
                    let mr = (rows - r).min(MR);
                    let mut o = o0;
                    while o < o1 {
                        let nr = (o1 - o).min(NR);
                        let mut acc = [[0.0f32; NR]; MR];
                        match (mr, nr) {
                            (MR, NR) => block_dot(
                                std::array::from_fn(|i| xrow(r + i)),
                                std::array::from_fn(|j| wrow(o + j)),
                                &mut acc,
                            ),
                            // A partial block through the vector kernel: missing rows and outputs
                            // repeat the last one (every element is its own dot product).
                            #[cfg(target_arch = "x86_64")]
                            _ if has_vector_units() => block_dot(
                                std::array::from_fn(|i| xrow(r + i.min(mr - 1))),
                                std::array::from_fn(|j| wrow(o + j.min(nr - 1))),
                                &mut acc,
                            ),
                            // Without AVX and FMA: element by element.
                            _ => {
                                for (i, a) in acc.iter_mut().enumerate().take(mr) {
                                    for (j, v) in a.iter_mut().enumerate().take(nr) {
                                        *v = dot_blocked(xrow(r + i), wrow(o + j));
                                    }
                                }
                            }
                        }
                        for (i, a) in acc.iter().enumerate().take(mr) {
                            part[(r + i) * width + (o - o0)..][..nr].copy_from_slice(&a[..nr]);
                        }
                        o += nr;
                    }
                    r += mr;
                }
                part
            })
        })
        .collect();
    scatter_tiles(&tiles, TILE, rows, n, out);
}

/// Copies per-tile results (`[rows, tile width]` each, tiles of `tile_len` output features) into
/// `out` (`[rows, n]`).
fn scatter_tiles(tiles: &[Vec<f32>], tile_len: usize, rows: usize, n: usize, out: &mut [f32]) {
    for (t, part) in tiles.iter().enumerate() {
        let (o0, o1) = (t * tile_len, ((t + 1) * tile_len).min(n));
        let width = o1 - o0;
        for r in 0..rows {
            out[r * n + o0..r * n + o1].copy_from_slice(&part[r * width..(r + 1) * width]);
        }
    }
}

/// Input rows per block of [`par_matmul_blocked`].
pub const MR: usize = 4;
/// Output features per block of [`par_matmul_blocked`].
pub const NR: usize = 4;

/// [`dot_blocked`] of every pair (`xs[i]`, `ws[j]`) at once, into `out[i][j]`: with AVX where the
/// CPU has it, else in portable code; the same bits either way.
fn block_dot(xs: [&[f32]; MR], ws: [&[f32]; NR], out: &mut [[f32; NR]; MR]) {
    #[cfg(target_arch = "x86_64")]
    if has_vector_units() {
        let k = xs.iter().chain(ws.iter()).map(|s| s.len()).min().unwrap_or(0);
        // SAFETY: the CPU has AVX (checked above); every row holds at least `k` values.
        unsafe { avx::block_dot(xs.map(|r| r.as_ptr()), ws.map(|r| r.as_ptr()), k, out) };
        return;
    }
    block_dot_portable(xs, ws, out)
}

/// [`block_dot`] in portable code (any R × O).
#[inline(always)]
fn block_dot_portable<const R: usize, const O: usize>(xs: [&[f32]; R], ws: [&[f32]; O], out: &mut [[f32; O]; R]) {
    let k = xs.iter().chain(ws.iter()).map(|s| s.len()).min().unwrap_or(0);
    let mut total = [[0.0f32; O]; R];
    let mut b = 0;
    while b < k {
        let end = (b + 64).min(k);
        let full = b + (end - b) / 4 * 4;
        let mut acc = [[[0.0f32; 4]; O]; R];
        let mut i = b;
        while i < full {
            let wv: [[f32; 4]; O] = std::array::from_fn(|j| [ws[j][i], ws[j][i + 1], ws[j][i + 2], ws[j][i + 3]]);
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = [xs[r][i], xs[r][i + 1], xs[r][i + 2], xs[r][i + 3]];
                for (j, aj) in a.iter_mut().enumerate() {
                    for l in 0..4 {
                        aj[l] = xv[l].mul_add(wv[j][l], aj[l]);
                    }
                }
            }
            i += 4;
        }
        for r in 0..R {
            for j in 0..O {
                let a = acc[r][j];
                let mut block = (a[0] + a[1]) + (a[2] + a[3]);
                for t in full..end {
                    block += xs[r][t] * ws[j][t];
                }
                total[r][j] += block;
            }
        }
        b = end;
    }
    *out = total;
}

/// Per row: `out = x · inv_rms · weight` with `inv_rms = 1 / sqrt(sumsq / n + eps)`.
pub fn rmsnorm_with(
    x: &[f32],
    rows: usize,
    weight: &[f32],
    eps: f32,
    out: &mut [f32],
    sumsq: impl Fn(&[f32]) -> f32 + Sync,
) {
    use rayon::prelude::*;
    let n = weight.len();
    assert_eq!(x.len(), rows * n, "rmsnorm input is not [rows, n]");
    out.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(o, xr)| {
        let inv = 1.0 / (sumsq(xr) / n as f32 + eps).sqrt();
        for ((o, &v), &g) in o.iter_mut().zip(xr).zip(weight) {
            *o = v * inv * g;
        }
    });
}

/// One KV head inside the cache: rows of `stride` values, the head starting at `off`.
pub struct KvHead<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub stride: usize,
    pub off: usize,
}

impl<'a> KvHead<'a> {
    /// Key `j` (`d` values).
    fn key(&self, j: usize, d: usize) -> &'a [f32] {
        &self.k[j * self.stride + self.off..][..d]
    }

    /// The values of keys `j0..`: the closure's `jj` gives key `j0 + jj`'s `d` values.
    fn values(&self, j0: usize, d: usize) -> impl Fn(usize) -> &'a [f32] + use<'a> {
        let (v, stride, off) = (self.v, self.stride, self.off);
        move |jj| &v[(j0 + jj) * stride + off..][..d]
    }
}

/// Running softmax state of one query head: max score, sum of exponentials, weighted values.
#[derive(Debug, Clone)]
pub struct Softmax {
    pub m: f32,
    pub l: f32,
    pub acc: Vec<f32>,
}

impl Softmax {
    pub fn new(d: usize) -> Softmax {
        Softmax { m: f32::NEG_INFINITY, l: 0.0, acc: vec![0.0; d] }
    }

    /// Folds in the keys `[j0, j1)`: scores first, then their max, then exponentials and values
    /// in order, rescaling what was accumulated before when the max grows.
    pub fn absorb(&mut self, q: &[f32], kv: &KvHead<'_>, j0: usize, j1: usize, scale: f32) {
        let d = q.len();
        let key = |j: usize| kv.key(j, d);
        let mut scores: Vec<f32> = Vec::with_capacity(j1 - j0);
        // Scores in the GEMV order (eight lanes), four keys at a time; the same function for
        // every query length, so it never tells prefill from decode.
        let mut j = j0;
        while j + 4 <= j1 {
            scores.extend(DotOrder::Lanes8.f32_x4(q, [key(j), key(j + 1), key(j + 2), key(j + 3)]).map(|s| s * scale));
            j += 4;
        }
        scores.extend((j..j1).map(|j| dot_lanes8(q, key(j)) * scale));
        self.absorb_scores(&mut scores, kv, j0);
    }

    /// [`Softmax::absorb`] of keys `j0..j0 + scores.len()` whose scaled scores are given (and
    /// are overwritten with their exponentials).
    pub fn absorb_scores(&mut self, scores: &mut [f32], kv: &KvHead<'_>, j0: usize) {
        let d = self.acc.len();
        if self.weigh(scores) {
            accumulate_values(&mut self.acc, scores, kv.values(j0, d));
        }
    }

    /// The first half of [`Softmax::absorb_scores`]: the new max, the rescaled state, the
    /// scores' exponentials (written over them) and their sum. What is left is adding the
    /// values weighted by the exponentials; false when no key counts (every score -∞), and
    /// then nothing is left to do.
    fn weigh(&mut self, scores: &mut [f32]) -> bool {
        let m_new = scores.iter().fold(self.m, |m, &s| m.max(s));
        if m_new == f32::NEG_INFINITY {
            return false;
        }
        // When the max stays, the factor is exp(0) = 1 and leaves every bit as it was.
        if m_new != self.m {
            rescale(&mut self.l, &mut self.acc, exp(self.m - m_new));
        }
        // The exponentials, then their sum in order (one loop of each: the sum's chain no longer
        // waits on a call per key).
        for s in scores.iter_mut() {
            *s -= m_new;
        }
        exp_in_place(scores);
        for &p in scores.iter() {
            self.l += p;
        }
        self.m = m_new;
        true
    }

    /// Merges another partial state (of keys after this one's).
    pub fn merge(&mut self, other: &Softmax) {
        if other.m == f32::NEG_INFINITY {
            return;
        }
        let m = self.m.max(other.m);
        combine(&mut self.l, &mut self.acc, other.l, &other.acc, [exp(self.m - m), exp(other.m - m)]);
        self.m = m;
    }

    /// Writes `acc / l`.
    pub fn finish(&self, out: &mut [f32]) {
        divide(out, &self.acc, self.l);
    }
}

/// A softmax state's sum and weighted values times `c` (the max grew: `c = exp(m - m_new)`).
#[inline(always)]
fn rescale(l: &mut f32, acc: &mut [f32], c: f32) {
    *l *= c;
    for a in acc {
        *a *= c;
    }
}

/// Another state's sum and weighted values merged into a state's, each side times its factor:
/// `[ca, cb] = [exp(m - m_max), exp(m_other - m_max)]`.
#[inline(always)]
fn combine(l: &mut f32, acc: &mut [f32], other_l: f32, other_acc: &[f32], [ca, cb]: [f32; 2]) {
    *l = *l * ca + other_l * cb;
    for (a, &b) in acc.iter_mut().zip(other_acc) {
        *a = *a * ca + b * cb;
    }
}

/// `out = acc / l`: the attention output of a finished softmax state.
#[inline(always)]
fn divide(out: &mut [f32], acc: &[f32], l: f32) {
    for (o, &a) in out.iter_mut().zip(acc) {
        *o = a / l;
    }
}

/// `acc += ps[j] * value(j)` for every key `j` in order, each element of `acc` its own chain
/// (AVX-512 or AVX where the CPU has them: sixteen or eight elements per register, up to 128 or
/// 64 held in registers while the keys pass; the same bits as the plain loop).
pub fn accumulate_values<'v>(acc: &mut [f32], ps: &[f32], value: impl Fn(usize) -> &'v [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        // SAFETY: the CPU has AVX-512 (checked above).
        unsafe { avx512::accumulate_values(acc, ps, &value) };
        return;
    }
    accumulate_values_avx(acc, ps, value)
}

/// [`accumulate_values`] without AVX-512: AVX where the CPU has it, else the plain loop.
pub fn accumulate_values_avx<'v>(acc: &mut [f32], ps: &[f32], value: impl Fn(usize) -> &'v [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has AVX (checked above).
        unsafe { avx::accumulate_values(acc, ps, &value) };
        return;
    }
    for (j, &p) in ps.iter().enumerate() {
        for (a, &v) in acc.iter_mut().zip(value(j)) {
            *a += p * v;
        }
    }
}

/// How a query row walks its keys; both walks fold the keys in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvPlan {
    /// One online softmax over tiles of this many keys (flash attention).
    Tiles(usize),
    /// Splits of this many keys, each reduced on its own, merged in order (split-KV).
    Splits(usize),
}

impl KvPlan {
    /// Keys per tile or split.
    pub fn chunk(self) -> usize {
        match self {
            KvPlan::Tiles(n) | KvPlan::Splits(n) => n.max(1),
        }
    }

    /// Attention of the query head `q` over keys `[0, ctx)` of `kv`, into `out`.
    pub fn attend(self, q: &[f32], kv: &KvHead<'_>, ctx: usize, scale: f32, out: &mut [f32]) {
        let mut state = PlanState::new(self, q.len());
        let mut j = 0;
        while j < ctx {
            let j1 = (j + self.chunk()).min(ctx);
            state.fold(|st| st.absorb(q, kv, j, j1, scale));
            j = j1;
        }
        state.total.finish(out);
    }
}

/// A query's state under a plan: the running softmax (tiles) or the merged splits.
struct PlanState {
    plan: KvPlan,
    total: Softmax,
}

impl PlanState {
    fn new(plan: KvPlan, d: usize) -> PlanState {
        PlanState { plan, total: Softmax::new(d) }
    }

    /// Folds in the next chunk of keys: `absorb` adds them to a state.
    fn fold(&mut self, absorb: impl FnOnce(&mut Softmax)) {
        match self.plan {
            KvPlan::Tiles(_) => absorb(&mut self.total),
            KvPlan::Splits(_) => {
                let mut part = Softmax::new(self.total.acc.len());
                absorb(&mut part);
                self.total.merge(&part);
            }
        }
    }
}

/// Causal attention of `rows` query rows (positions `pos0..`) under `plan`, every row the same
/// bits as [`KvPlan::attend`] gives it alone. One row (a decode step) runs
/// [`decode_attention`]: the query heads of a KV head read each key once, and the splits run in
/// parallel. With AVX-512, blocks of query rows of one head share each chunk of keys,
/// transposed once so that scores are computed for sixteen keys at a time; elsewhere row by row.
#[allow(clippy::too_many_arguments)]
pub fn par_attention_plan(
    q: &[f32],
    rows: usize,
    pos0: usize,
    k: &[f32],
    v: &[f32],
    shape: super::AttnShape,
    plan: KvPlan,
    out: &mut [f32],
) {
    if rows == 1 {
        return decode_attention(q, pos0, k, v, shape, plan, out);
    }
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        return attention_blocks(q, rows, pos0, k, v, shape, plan, out);
    }
    let (stride, scale) = (shape.kv_dim(), shape.scale());
    par_attention(q, rows, pos0, shape, out, |qh, off, ctx, o| {
        plan.attend(qh, &KvHead { k, v, stride, off }, ctx, scale, o)
    });
}

/// Attention of one query row (a decode step) under `plan`, every head the bits
/// [`KvPlan::attend`] gives it alone. The query heads of one KV head read each key and value
/// once together ([`absorb_group`]); under a split plan the (KV head, split) pairs run in
/// parallel and each head merges its splits' states in order afterwards; under a tiled plan a
/// KV head's tiles fold in turn, one task per KV head.
fn decode_attention(
    q: &[f32],
    pos0: usize,
    k: &[f32],
    v: &[f32],
    shape: super::AttnShape,
    plan: KvPlan,
    out: &mut [f32],
) {
    use rayon::prelude::*;
    let (d, group) = (shape.head_dim, shape.n_heads / shape.n_kv_heads.max(1));
    let (stride, scale, ctx) = (shape.kv_dim(), shape.scale(), pos0 + 1);
    assert_eq!(q.len(), shape.n_heads * d, "attention q is not [1, n_heads * head_dim]");
    let (chunk, chunks) = (plan.chunk(), ctx.div_ceil(plan.chunk()));
    let per_task = match plan {
        KvPlan::Tiles(_) => chunks,
        KvPlan::Splits(_) => 1,
    };
    let tasks = chunks.div_ceil(per_task);
    let parts: Vec<Vec<Softmax>> = (0..shape.n_kv_heads * tasks)
        .into_par_iter()
        .map(|t| {
            let (g, c0) = (t / tasks, t % tasks * per_task);
            let kv = KvHead { k, v, stride, off: g * d };
            let qs: Vec<&[f32]> = q[g * group * d..(g + 1) * group * d].chunks_exact(d).collect();
            let mut states: Vec<Softmax> = qs.iter().map(|_| Softmax::new(d)).collect();
            for c in c0..(c0 + per_task).min(chunks) {
                absorb_group(&mut states, &qs, &kv, c * chunk, ((c + 1) * chunk).min(ctx), scale);
            }
            states
        })
        .collect();
    for (h, o) in out.chunks_exact_mut(d).enumerate().take(shape.n_heads) {
        let (g, i) = (h / group, h % group);
        let mut state = PlanState::new(plan, d);
        for part in &parts[g * tasks..(g + 1) * tasks] {
            state.fold(|st| st.clone_from(&part[i]));
        }
        state.total.finish(o);
    }
}

/// [`Softmax::absorb`] of keys `[j0, j1)` for the query heads `qs` that share the KV head `kv`
/// (grouped-query attention), `states[h]` being `qs[h]`'s: each key and each value is read once
/// for the whole group, and every head gets the bits of its own `absorb`.
fn absorb_group(states: &mut [Softmax], qs: &[&[f32]], kv: &KvHead<'_>, j0: usize, j1: usize, scale: f32) {
    let (n, d) = (j1.saturating_sub(j0), qs.first().map_or(0, |q| q.len()));
    if n == 0 {
        return;
    }
    let mut scores = vec![0.0f32; qs.len() * n];
    group_scores(qs, kv, j0, j1, scale, &mut scores);
    let mut live: Vec<(&mut [f32], &[f32])> = Vec::with_capacity(qs.len());
    for (st, s) in states.iter_mut().zip(scores.chunks_exact_mut(n)) {
        if st.weigh(s) {
            live.push((&mut st.acc, s));
        }
    }
    accumulate_values_group(&mut live, kv.values(j0, d));
}

/// The scaled scores of the query heads `qs` with keys `[j0, j1)` of `kv`, head `h`'s in
/// `scores[h · n..(h + 1) · n]` (`n = j1 - j0`), each what [`Softmax::absorb`] computes: the GEMV
/// order, four keys at a time read once for up to three heads, the last keys one by one.
fn group_scores(qs: &[&[f32]], kv: &KvHead<'_>, j0: usize, j1: usize, scale: f32, scores: &mut [f32]) {
    let (n, d) = (j1 - j0, qs.first().map_or(0, |q| q.len()));
    for (b, block) in qs.chunks(3).enumerate() {
        let mut j = j0;
        while j + 4 <= j1 {
            if b == 0 {
                for jj in j..j + 4 {
                    let (key, value) = ((jj + KEYS_AHEAD) * kv.stride + kv.off, jj * kv.stride + kv.off);
                    prefetch_bytes(kv.k.as_ptr().wrapping_add(key).cast(), 4 * d);
                    prefetch_bytes(kv.v.as_ptr().wrapping_add(value).cast(), 4 * d);
                }
            }
            let dots = dots_lanes8_group(block, [j, j + 1, j + 2, j + 3].map(|j| kv.key(j, d)));
            for (h, dots) in dots.iter().enumerate().take(block.len()) {
                let at = (3 * b + h) * n + j - j0;
                for (s, x) in scores[at..at + 4].iter_mut().zip(dots) {
                    *s = x * scale;
                }
            }
            j += 4;
        }
        for (h, q) in block.iter().enumerate() {
            for j in j..j1 {
                scores[(3 * b + h) * n + j - j0] = dot_lanes8(q, kv.key(j, d)) * scale;
            }
        }
    }
}

/// [`dot_lanes8`] of up to three queries (`qs`) with four keys, `out[h][r]` for query `h` and
/// key `r`, each key read once (AVX or AVX-512 registers where the CPU has them).
fn dots_lanes8_group(qs: &[&[f32]], keys: [&[f32]; 4]) -> [[f32; 4]; 3] {
    #[cfg(target_arch = "x86_64")]
    let wide = avx512::available();
    #[cfg(not(target_arch = "x86_64"))]
    let wide = false;
    dots_lanes8_group_in(qs, keys, wide)
}

/// [`dots_lanes8_group`], with AVX-512 registers only when `wide` (so that tests on AVX-512
/// machines also check what other CPUs run); `wide` requires AVX-512.
pub(crate) fn dots_lanes8_group_in(qs: &[&[f32]], keys: [&[f32]; 4], wide: bool) -> [[f32; 4]; 3] {
    let mut out = [[0.0f32; 4]; 3];
    #[cfg(target_arch = "x86_64")]
    if has_vector_units() {
        let n = qs.iter().fold(keys.iter().fold(usize::MAX, |m, k| m.min(k.len())), |m, q| m.min(q.len()));
        let p = keys.map(|k| k.as_ptr());
        let wide = wide && avx512::available();
        // SAFETY: the CPU has the features of the kernel called (checked above); every key and
        // every query holds at least `n` values.
        unsafe {
            match qs {
                [a] if wide => out[..1].copy_from_slice(&avx512::dots_lanes8_q([a], p, n)),
                [a] => out[..1].copy_from_slice(&avx::dots_lanes8_q([a], p, n)),
                [a, b] if wide => out[..2].copy_from_slice(&avx512::dots_lanes8_q([a, b], p, n)),
                [a, b] => out[..2].copy_from_slice(&avx::dots_lanes8_q([a, b], p, n)),
                [a, b, c] if wide => out.copy_from_slice(&avx512::dots_lanes8_q([a, b, c], p, n)),
                [a, b, c] => out.copy_from_slice(&avx::dots_lanes8_q([a, b, c], p, n)),
                _ => panic!("dots_lanes8_group takes one to three queries"),
            }
        }
        return out;
    }
    let _ = wide;
    for (o, q) in out.iter_mut().zip(qs) {
        *o = keys.map(|k| dot_lanes8(q, k));
    }
    out
}

/// [`accumulate_values`] for several query heads over the same values: `acc += ps[j] · value(j)`
/// for each `(acc, ps)` of `heads`, every value row read once per block of up to four heads
/// where the CPU has AVX-512; each head the bits of its own call.
fn accumulate_values_group<'v>(heads: &mut [(&mut [f32], &[f32])], value: impl Fn(usize) -> &'v [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        for block in heads.chunks_mut(4) {
            // SAFETY: the CPU has AVX-512 (checked above); `kv.values` rows hold `d` values.
            unsafe {
                match block {
                    [a] => avx512::accumulate_values_q([&mut *a.0], [a.1], &value),
                    [a, b] => avx512::accumulate_values_q([&mut *a.0, &mut *b.0], [a.1, b.1], &value),
                    [a, b, c] => {
                        avx512::accumulate_values_q([&mut *a.0, &mut *b.0, &mut *c.0], [a.1, b.1, c.1], &value)
                    }
                    [a, b, c, e] => avx512::accumulate_values_q(
                        [&mut *a.0, &mut *b.0, &mut *c.0, &mut *e.0],
                        [a.1, b.1, c.1, e.1],
                        &value,
                    ),
                    _ => {}
                }
            }
        }
        return;
    }
    for (acc, ps) in heads.iter_mut() {
        accumulate_values(acc, ps, &value);
    }
}

/// [`par_attention_plan`] in blocks of query rows per head, with AVX-512 scores.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn attention_blocks(
    q: &[f32],
    rows: usize,
    pos0: usize,
    k: &[f32],
    v: &[f32],
    shape: super::AttnShape,
    plan: KvPlan,
    out: &mut [f32],
) {
    use rayon::prelude::*;
    /// Query rows per block: as many as a block's softmax states hold side by side.
    const QB: usize = BlockStates::ROWS;
    let (d, heads) = (shape.head_dim, shape.n_heads);
    let (stride, scale) = (shape.kv_dim(), shape.scale());
    let chunk = plan.chunk();
    assert_eq!(q.len(), rows * heads * d, "attention q is not [rows, n_heads * head_dim]");
    // Keys of each KV head transposed once: row i of head g holds input i of every key (rows of
    // `w` values: the keys, then zeros up to the next sixteen and a spare sixteen).
    let keys = pos0 + rows;
    let w = (keys + 16).div_ceil(16) * 16;
    let mut kt = vec![0.0f32; shape.n_kv_heads * d * w];
    kt.par_chunks_mut(d * w).enumerate().for_each(|(g, kt)| {
        for (j, key) in k[..keys * stride].chunks_exact(stride).enumerate() {
            for (i, &x) in key[g * d..(g + 1) * d].iter().enumerate() {
                kt[i * w + j] = x;
            }
        }
    });
    let blocks = rows.div_ceil(QB);
    let results: Vec<Vec<f32>> = (0..heads * blocks)
        .into_par_iter()
        .map(|t| {
            let (h, b) = (t / blocks, t % blocks);
            let off = shape.kv_offset(h);
            let kv = KvHead { k, v, stride, off };
            // The KV head starting at `off` is the transposed block number off / d.
            let kt = &kt[off * w..(off + d) * w];
            let (r0, r1) = (b * QB, ((b + 1) * QB).min(rows));
            let wc = chunk.div_ceil(16) * 16;
            let mut total = BlockStates::new(r1 - r0, d);
            let mut part = BlockStates::new(r1 - r0, d);
            // Sixteen rows of scores whatever the block's rows (the sums read all of them).
            let mut tile = vec![0.0f32; QB * wc];
            let mut n = vec![0usize; r1 - r0];
            let last_ctx = pos0 + r1;
            let mut j0 = 0;
            while j0 < last_ctx {
                let j1 = (j0 + chunk).min(last_ctx);
                for (r, n) in (r0..r1).zip(n.iter_mut()) {
                    *n = j1.min(pos0 + r + 1).saturating_sub(j0);
                }
                // The rows with keys in this chunk (a suffix of the block), three at a time.
                let first = n.iter().position(|&n| n > 0).unwrap_or(n.len());
                let mut i = first;
                while i < n.len() {
                    let take = (n.len() - i).min(3);
                    let query = |k: usize| &q[((r0 + i + k) * heads + h) * d..][..d];
                    // The widest row's groups (the others' extra scores are never read).
                    let groups = n[i..i + take].iter().max().map_or(0, |n| n.div_ceil(16));
                    let out = &mut tile[i * wc..];
                    // SAFETY: the CPU has AVX-512 (checked by the caller); from column j0, the
                    // rows of `kt` hold j0 + 16 · groups <= keys + 16 <= w values, and the tile
                    // rows from `i` hold wc >= 16 · groups each.
                    unsafe {
                        match take {
                            3 => avx512::dots_lanes8_t(
                                [query(0), query(1), query(2)],
                                &kt[j0..],
                                w,
                                groups,
                                scale,
                                out,
                                wc,
                            ),
                            2 => avx512::dots_lanes8_t([query(0), query(1)], &kt[j0..], w, groups, scale, out, wc),
                            _ => avx512::dots_lanes8_t([query(0)], &kt[j0..], w, groups, scale, out, wc),
                        }
                    }
                    i += take;
                }
                // SAFETY (both calls): the CPU has AVX-512 (checked by the caller).
                match plan {
                    KvPlan::Tiles(_) => unsafe { total.absorb(&mut tile, wc, &n, &kv, j0) },
                    KvPlan::Splits(_) => unsafe {
                        part.reset();
                        part.absorb(&mut tile, wc, &n, &kv, j0);
                        total.merge(&part);
                    },
                }
                j0 = j1;
            }
            let mut o = vec![0.0f32; (r1 - r0) * d];
            total.finish(&mut o);
            o
        })
        .collect();
    for (t, o) in results.iter().enumerate() {
        let (h, b) = (t / blocks, t % blocks);
        for (i, oc) in o.chunks(d).enumerate() {
            let r = b * QB + i;
            out[(r * heads + h) * d..(r * heads + h + 1) * d].copy_from_slice(oc);
        }
    }
}

/// The softmax states of a block of query rows of one head, folded a chunk of keys at a time
/// with the rows' work side by side: one call of the exponential for the whole block, the sums
/// of exponentials as independent chains, and the values read once for up to four rows. Every
/// row keeps exactly the operations of its own [`Softmax`] (see [`BlockStates::absorb`]).
#[cfg(target_arch = "x86_64")]
struct BlockStates {
    d: usize,
    m: Vec<f32>,
    l: Vec<f32>,
    /// `[rows, d]`.
    acc: Vec<f32>,
}

#[cfg(target_arch = "x86_64")]
impl BlockStates {
    /// The empty states of `rows` rows (at most [`BlockStates::ROWS`]) of `d` values.
    fn new(rows: usize, d: usize) -> BlockStates {
        assert!(rows <= Self::ROWS, "a block has at most sixteen rows");
        BlockStates { d, m: vec![f32::NEG_INFINITY; rows], l: vec![0.0; rows], acc: vec![0.0; rows * d] }
    }

    /// Rows of a block at most.
    const ROWS: usize = 16;

    /// Back to the empty state of [`BlockStates::new`].
    fn reset(&mut self) {
        self.m.fill(f32::NEG_INFINITY);
        self.l.fill(0.0);
        self.acc.fill(0.0);
    }

    /// [`Softmax::absorb_scores`] for every row at once: row `i`'s scaled scores of keys
    /// `j0..j0 + n[i]` are `tile[i · w..][..n[i]]` (overwritten; rows with `n[i] = 0` are left
    /// as they are). The tile has sixteen rows of `w`, those past the block's rows all zeros.
    /// Each row's operations are its `Softmax`'s: the new max (max is exact, so its grouping
    /// cannot matter but for the sign of a zero max, which no result depends on), the rescaling
    /// by `exp(m - m_new)` where the max grew, the exponentials of `s - m_new`, their sum in key
    /// order, then the values in key order. (AVX-512, so that the loops over rows and keys are
    /// compiled for its registers: the caller checks [`avx512::available`].)
    #[target_feature(enable = "avx512f")]
    unsafe fn absorb(&mut self, tile: &mut [f32], w: usize, n: &[usize], kv: &KvHead<'_>, j0: usize) {
        let (d, rows) = (self.d, self.m.len());
        assert!(tile.len() >= Self::ROWS * w, "a tile has sixteen rows of scores");
        let (mut m_new, mut live, mut c) = ([f32::NEG_INFINITY; Self::ROWS], [false; Self::ROWS], [0.0; Self::ROWS]);
        for i in 0..rows {
            // SAFETY: the CPU has AVX-512 (the caller's contract).
            m_new[i] = unsafe { avx512::max_fold(self.m[i], &tile[i * w..][..n[i]]) };
            live[i] = n[i] > 0 && m_new[i] != f32::NEG_INFINITY;
            // exp(0) = 1 where the max stays: that row is then not rescaled at all.
            c[i] = if live[i] && m_new[i] != self.m[i] { self.m[i] - m_new[i] } else { 0.0 };
        }
        exp_in_place(&mut c[..rows]);
        for i in (0..rows).filter(|&i| live[i] && m_new[i] != self.m[i]) {
            rescale(&mut self.l[i], &mut self.acc[i * d..(i + 1) * d], c[i]);
        }
        for i in 0..rows {
            let s = &mut tile[i * w..(i + 1) * w];
            let k = if live[i] { n[i] } else { 0 };
            for x in &mut s[..k] {
                *x -= m_new[i];
            }
        }
        exp_in_place(&mut tile[..rows * w]);
        // Past a row's keys the weights are zero, and adding +0 leaves a sum (never -0) as it is.
        for i in 0..rows {
            let k = if live[i] { n[i] } else { 0 };
            tile[i * w + k..(i + 1) * w].fill(0.0);
        }
        // The sums as sixteen independent chains (the tile's rows past `rows` are zeros).
        let mut l = [0.0f32; Self::ROWS];
        l[..rows].copy_from_slice(&self.l);
        for j in 0..w {
            for (i, l) in l.iter_mut().enumerate() {
                *l += tile[i * w + j];
            }
        }
        self.l.copy_from_slice(&l[..rows]);
        // The values: up to four rows share each value row over the keys they all have, then
        // each row's own last keys.
        let value = kv.values(j0, d);
        // (On the stack: this runs for every chunk of every block of rows.)
        let (mut live_rows, mut count) = ([0usize; Self::ROWS], 0);
        for i in (0..rows).filter(|&i| live[i]) {
            live_rows[count] = i;
            count += 1;
        }
        let mut accs: [Option<&mut [f32]>; Self::ROWS] = [const { None }; Self::ROWS];
        for (a, acc) in accs.iter_mut().zip(self.acc.chunks_exact_mut(d)) {
            *a = Some(acc);
        }
        for group in live_rows[..count].chunks(4) {
            let common = group.iter().map(|&i| n[i]).min().unwrap_or(0);
            let mut heads: [(&mut [f32], &[f32]); 4] = std::array::from_fn(|_| (&mut [][..], &[][..]));
            let mut k = 0;
            for &i in group {
                if let Some(acc) = accs[i].take() {
                    heads[k] = (acc, &tile[i * w..][..common]);
                    k += 1;
                }
            }
            let heads = &mut heads[..k];
            accumulate_values_group(heads, &value);
            for (&i, (acc, _)) in group.iter().zip(heads.iter_mut()) {
                if n[i] > common {
                    accumulate_values(acc, &tile[i * w + common..i * w + n[i]], kv.values(j0 + common, d));
                }
            }
        }
        for i in (0..rows).filter(|&i| live[i]) {
            self.m[i] = m_new[i];
        }
    }

    /// [`Softmax::merge`] of every row of `other` (states of keys after this one's). (AVX-512,
    /// as [`BlockStates::absorb`].)
    #[target_feature(enable = "avx512f")]
    unsafe fn merge(&mut self, other: &BlockStates) {
        let (d, rows) = (self.d, self.m.len());
        // Per row the factors [exp(m - m_max), exp(m_other - m_max)], exponentials in one call.
        let (mut c, mut m) = ([[0.0f32; 2]; Self::ROWS], [0.0f32; Self::ROWS]);
        let live = |i: usize| other.m[i] != f32::NEG_INFINITY;
        for i in (0..rows).filter(|&i| live(i)) {
            m[i] = self.m[i].max(other.m[i]);
            c[i] = [self.m[i] - m[i], other.m[i] - m[i]];
        }
        exp_in_place(c[..rows].as_flattened_mut());
        for i in (0..rows).filter(|&i| live(i)) {
            let (acc, other_acc) = (&mut self.acc[i * d..(i + 1) * d], &other.acc[i * d..(i + 1) * d]);
            combine(&mut self.l[i], acc, other.l[i], other_acc, c[i]);
            self.m[i] = m[i];
        }
    }

    /// Writes every row's `acc / l` into `out` (`[rows, d]`).
    fn finish(&self, out: &mut [f32]) {
        for ((o, a), &l) in out.chunks_exact_mut(self.d).zip(self.acc.chunks_exact(self.d)).zip(&self.l) {
            divide(o, a, l);
        }
    }
}

/// Runs `head(q_head, kv_offset, ctx_len, out_head)` for every (row, head) in parallel.
pub fn par_attention(
    q: &[f32],
    rows: usize,
    pos0: usize,
    shape: super::AttnShape,
    out: &mut [f32],
    head: impl Fn(&[f32], usize, usize, &mut [f32]) + Sync,
) {
    use rayon::prelude::*;
    let d = shape.head_dim;
    assert_eq!(q.len(), rows * shape.n_heads * d, "attention q is not [rows, n_heads * head_dim]");
    out.par_chunks_mut(d).enumerate().for_each(|(i, o)| {
        let (r, h) = (i / shape.n_heads, i % shape.n_heads);
        let qh = &q[(r * shape.n_heads + h) * d..(r * shape.n_heads + h + 1) * d];
        head(qh, shape.kv_offset(h), pos0 + r + 1, o);
    });
}
