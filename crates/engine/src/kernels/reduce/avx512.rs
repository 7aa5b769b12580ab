//! The kernels that use AVX-512, each computing exactly one of the plain orders of `reduce.rs`:
//!
//! - The GEMM order ([`super::dot_blocked`]): a block of [`ROWS`] input rows × [`PANEL`] outputs
//!   per call, the weights packed per panel (on every call, tile by tile) so that every load is
//!   one register of sixteen. The order keeps four lanes per output (inputs `i ≡ l mod 4` of each
//!   64-block), so a register holds four outputs' four lanes: quarter `q` of register `g` is
//!   output `4q + g`. One fused multiply-add then advances four dot products by four inputs,
//!   exactly as the scalar code does, and at the end of a block two levels of shuffles and
//!   additions give every output its `(l0 + l1) + (l2 + l3)` with the sixteen block sums in
//!   output order.
//! - Attention scores in the GEMV order ([`super::dot_lanes8`]) over transposed keys, sixteen
//!   keys per register, up to three query rows per pass ([`dots_lanes8_t`]); a decode step's
//!   scores for the query heads of one KV head ([`dots_lanes8_q`]); the value sums
//!   ([`accumulate_values`], and [`accumulate_values_q`] for several heads over the same
//!   values); the maximum of a row of scores ([`max_fold`]).
//! - The GEMV order of four f16 rows, two per register ([`dot_lanes8_x4_f16`]); the GEMM order of
//!   four f16 rows whose length is a multiple of 64, the four rows' lanes in one register
//!   ([`dot_blocked_x4_f16`]).
//! - Both orders' GEMV of four rows of ggml blocks (Q4_1, Q8_0), dequantized in registers in the
//!   layout each order reads ([`dot_lanes8_x4_blocks`], [`dot_blocked_x4_blocks`]): the values
//!   are those of the blocks' formula, so the bits are those of the dequantized matrix.

use std::arch::x86_64::*;

use crate::weights::{QuantBlock, Storage, BLOCK};

/// Outputs per packed panel.
pub(super) const PANEL: usize = 16;
/// Input rows per kernel call: 6 × 4 accumulator registers, 4 of weights, 1 of inputs (of 32).
pub(super) const ROWS: usize = 6;
/// Outputs per parallel task (two panels).
const TILE: usize = 32;

/// Whether the CPU has AVX-512 F (and F16C and AVX2, which the f16 and block kernels use; every
/// AVX-512 CPU has them). Detected once, then cached.
pub(super) fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("f16c")
        && std::arch::is_x86_feature_detected!("avx2")
}

/// `par_matmul_blocked` with the AVX-512 kernel: the same bits. The caller checks
/// [`available`].
pub(super) fn par_matmul(x: &[f32], rows: usize, w: &crate::weights::Matrix, out: &mut [f32]) {
    use rayon::prelude::*;
    thread_local! {
        static PACKED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let (k, n) = (w.cols, w.rows);
    assert_eq!(x.len(), rows * k, "matmul input is not [rows, in]");
    assert_eq!(out.len(), rows * n, "matmul output is not [rows, out]");
    let xrow = |r: usize| x[r * k..(r + 1) * k].as_ptr();
    // The cache lines of the weight rows: `per_row` each, line `line` of row `o` at `line_at`.
    let (base, row_bytes) = (w.data.as_ptr() as usize, w.data.row_bytes(k));
    let per_row = row_bytes.div_ceil(64);
    let line_at = |o: usize, line: usize| base + o * row_bytes + line * 64;
    // Each task writes its own columns of `out` (tiles are disjoint), through this address.
    let out_at = out.as_mut_ptr() as usize;
    (0..n.div_ceil(TILE)).into_par_iter().for_each(|t| {
        let (o0, o1) = (t * TILE, ((t + 1) * TILE).min(n));
        let width = o1 - o0;
        let tile = |wt: Rows<'_>| {
            let run = |packed: &mut Vec<f32>| {
                // Panel after panel: the panel's weights stay in cache while the rows pass.
                for p0 in (0..width).step_by(PANEL) {
                    let nr = (width - p0).min(PANEL);
                    pack_panel(wt, k, width, p0, packed);
                    let tail = |j: usize, u: usize| wt.value((p0 + j.min(nr - 1)) * k + u);
                    // The next panel's weights (this tile's, else the next tile's first)
                    // come from memory while this one computes: a share of their cache
                    // lines is prefetched before each block of rows.
                    let next = o0 + p0 + PANEL;
                    let count = (next + PANEL).min(n).saturating_sub(next) * per_row;
                    let blocks = rows.div_ceil(ROWS);
                    for (b, r) in (0..rows).step_by(ROWS).enumerate() {
                        for line in b * count / blocks..(b + 1) * count / blocks {
                            super::prefetch_line(line_at(next + line / per_row, line % per_row) as *const u8);
                        }
                        let mr = (rows - r).min(ROWS);
                        // Missing rows repeat the last one (every element is its own dot
                        // product); missing outputs are zero weights, dropped below.
                        let xs = std::array::from_fn(|i| xrow(r + i.min(mr - 1)));
                        let at = (out_at as *mut f32).wrapping_add(r * n + o0 + p0);
                        // SAFETY: the CPU has AVX-512 (the caller checked); every row of `x`
                        // holds `k` values, and `packed` is the panel of `k` inputs. Rows
                        // r..r + mr <= rows and columns o0 + p0..o0 + p0 + nr <= o1 <= n lie
                        // within `out` (rows · n values, asserted); no other task writes
                        // columns o0..o1, and `out` is borrowed until every task is done.
                        unsafe { panel_dot(xs, packed, k, tail, Block { at, stride: n, rows: mr, cols: nr }) };
                    }
                }
            };
            PACKED.with(|cell| match cell.try_borrow_mut() {
                Ok(mut buf) => run(&mut buf),
                Err(_) => run(&mut Vec::new()),
            });
        };
        // f32 and f16 rows are packed straight from the weights (f16 widened on the way);
        // bf16 and block rows through the widened (dequantized) copy of the tile.
        match &w.data {
            Storage::F32(v) => tile(Rows::F32(&v[o0 * k..o1 * k])),
            Storage::F16(v) => tile(Rows::F16(&v[o0 * k..o1 * k])),
            Storage::BF16(_) | Storage::Q4_1(_) | Storage::Q8_0(_) => w.with_rows_f32(o0, o1, |wt| tile(Rows::F32(wt))),
        }
    });
}

/// A tile's weight rows as stored: `k` values each, row-major.
#[derive(Clone, Copy)]
enum Rows<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
}

impl Rows<'_> {
    /// Value `i` (row `i / k`, input `i % k`), in f32.
    fn value(&self, i: usize) -> f32 {
        match self {
            Rows::F32(v) => v[i],
            Rows::F16(v) => v[i].to_f32(),
        }
    }
}

/// Packs outputs `p0..p0 + 16` of `wt` (`width` rows of `k` values) for [`panel_dot`]: per step
/// of four inputs, four registers of sixteen, quarter `q` of register `g` holding the step's four
/// inputs of output `p0 + 4q + g`. Outputs past `width` are zeros; inputs past the last whole
/// step are not packed (the kernel reads them from `wt`).
fn pack_panel(wt: Rows<'_>, k: usize, width: usize, p0: usize, dst: &mut Vec<f32>) {
    // Every value is written below; no need to clear what a previous panel left.
    dst.resize(k / 4 * 64, 0.0);
    match wt {
        Rows::F32(v) => pack_with(v, k, width, p0, dst, |src, four| four.copy_from_slice(src)),
        // SAFETY: the GEMM's caller checked AVX-512 and F16C (`available`).
        Rows::F16(v) => unsafe { pack_f16(v, k, width, p0, dst) },
    }
}

/// [`pack_panel`] of f16 rows, widened four values at a time with F16C.
#[target_feature(enable = "avx512f,f16c")]
unsafe fn pack_f16(v: &[half::f16], k: usize, width: usize, p0: usize, dst: &mut [f32]) {
    pack_with(v, k, width, p0, dst, |src, four| {
        // SAFETY: `src` holds four f16 (8 bytes) and `four` four f32; unaligned accesses.
        unsafe { _mm_storeu_ps(four.as_mut_ptr(), _mm_cvtph_ps(_mm_loadl_epi64(src.as_ptr().cast()))) }
    })
}

/// The packing loop: `copy(src, four)` puts four stored values into four f32.
#[inline(always)]
fn pack_with<T>(wt: &[T], k: usize, width: usize, p0: usize, dst: &mut [f32], copy: impl Fn(&[T], &mut [f32])) {
    let steps = k / 4;
    // Step after step, so the writes are sequential and the sixteen rows are read as streams
    // (row after row scattered 16-byte writes 256 bytes apart: a quarter of the GEMM's time).
    let row = |g: usize, q: usize| {
        let o = p0 + 4 * q + g;
        (o < width).then(|| &wt[o * k..o * k + steps * 4])
    };
    let rows: [[Option<&[T]>; 4]; 4] = std::array::from_fn(|g| std::array::from_fn(|q| row(g, q)));
    for (s, regs) in dst[..steps * 64].chunks_exact_mut(64).enumerate() {
        for (reg, rows_g) in regs.chunks_exact_mut(16).zip(&rows) {
            for (four, r) in reg.chunks_exact_mut(4).zip(rows_g) {
                match r {
                    Some(r) => copy(&r[4 * s..4 * s + 4], four),
                    None => four.fill(0.0),
                }
            }
        }
    }
}

/// Where [`panel_dot`] writes: the first `rows` of its rows and `cols` of its outputs, row `r`'s
/// at `at + r · stride`.
struct Block {
    at: *mut f32,
    stride: usize,
    rows: usize,
    cols: usize,
}

/// [`super::dot_blocked`] of [`ROWS`] input rows with the [`PANEL`] outputs of a packed panel,
/// into `out` (the caller guarantees that its rows and columns are writable). `xs` point at
/// rows of `k` values; `panel` is [`pack_panel`]'s for `k` inputs; `tail(j, u)` gives input `u`
/// of output `j` for the inputs past the last whole step of four (the last block's tail,
/// finished in scalar code as the order says).
#[target_feature(enable = "avx512f")]
unsafe fn panel_dot(xs: [*const f32; ROWS], panel: &[f32], k: usize, tail: impl Fn(usize, usize) -> f32, out: Block) {
    assert!(panel.len() >= k / 4 * 64, "panel too short for k = {k}");
    let mut total = [_mm512_setzero_ps(); ROWS];
    let mut b = 0;
    while b < k {
        let end = (b + 64).min(k);
        let full = b + (end - b) / 4 * 4;
        let mut acc = [[_mm512_setzero_ps(); 4]; ROWS];
        let mut i = b;
        while i < full {
            // SAFETY: step i / 4 < k / 4, within the panel (asserted); i + 4 <= k, within every
            // row of `x` (the caller's promise). Unaligned loads.
            unsafe {
                let p = panel.as_ptr().add(i * 16);
                let w = [
                    _mm512_loadu_ps(p),
                    _mm512_loadu_ps(p.add(16)),
                    _mm512_loadu_ps(p.add(32)),
                    _mm512_loadu_ps(p.add(48)),
                ];
                for (a, x) in acc.iter_mut().zip(xs) {
                    let xv = _mm512_broadcast_f32x4(_mm_loadu_ps(x.add(i)));
                    for (ag, wg) in a.iter_mut().zip(w) {
                        *ag = _mm512_fmadd_ps(xv, wg, *ag);
                    }
                }
            }
            i += 4;
        }
        let sums = acc.map(|a| block_sums(a));
        if full == end {
            for (t, s) in total.iter_mut().zip(sums) {
                *t = _mm512_add_ps(*t, s);
            }
        } else {
            // The last block has a tail: `block += x · w` per input, then into the total.
            for (r, (t, s)) in total.iter_mut().zip(sums).enumerate() {
                let (mut tl, mut sl) = ([0.0f32; PANEL], [0.0f32; PANEL]);
                // SAFETY: both arrays hold sixteen f32.
                unsafe {
                    _mm512_storeu_ps(tl.as_mut_ptr(), *t);
                    _mm512_storeu_ps(sl.as_mut_ptr(), s);
                }
                for (j, (tj, block)) in tl.iter_mut().zip(sl).enumerate() {
                    let mut block = block;
                    for u in full..end {
                        // SAFETY: u < k, within the row.
                        block += unsafe { *xs[r].add(u) } * tail(j, u);
                    }
                    *tj += block;
                }
                // SAFETY: `tl` holds sixteen f32.
                *t = unsafe { _mm512_loadu_ps(tl.as_ptr()) };
            }
        }
        b = end;
    }
    let cols: __mmask16 = if out.cols >= PANEL { u16::MAX } else { (1u16 << out.cols) - 1 };
    for (r, t) in total.iter().enumerate().take(out.rows) {
        // SAFETY: the caller's contract: `cols` values of row r < out.rows are writable there.
        unsafe { _mm512_mask_storeu_ps(out.at.wrapping_add(r * out.stride), cols, *t) };
    }
}

/// The sixteen block sums `(l0 + l1) + (l2 + l3)` of four accumulator registers, in output
/// order (quarter `q` of register `g` is output `4q + g`).
#[target_feature(enable = "avx512f")]
fn block_sums(a: [__m512; 4]) -> __m512 {
    // Per quarter: [x0 + x1, x2 + x3, y0 + y1, y2 + y3].
    let pair = |x: __m512, y: __m512| {
        _mm512_add_ps(_mm512_shuffle_ps::<0b10_00_10_00>(x, y), _mm512_shuffle_ps::<0b11_01_11_01>(x, y))
    };
    // Quarter q: [o(0), o(1), o(2), o(3)] of the quarter's outputs, each (l0 + l1) + (l2 + l3).
    pair(pair(a[0], a[1]), pair(a[2], a[3]))
}

/// Attention scores of `R` queries with sixteen keys at a time, each exactly
/// [`super::dot_lanes8`] times `scale` (rounded once more): the eight lanes become eight
/// registers of sixteen keys (multiplied, then added), summed in `lanes8_sum`'s tree, then the
/// tail inputs in order; each key register is loaded once for the `R` queries. `kt` holds
/// transposed keys: row `i` (starting every `w` values) holds input `i` of each key. Query `r`'s
/// first `16 · groups` scaled dots go to `out[r · stride..]`.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn dots_lanes8_t<const R: usize>(
    qs: [&[f32]; R],
    kt: &[f32],
    w: usize,
    groups: usize,
    scale: f32,
    out: &mut [f32],
    stride: usize,
) {
    let d = qs.first().map_or(0, |q| q.len());
    let fits = d == 0 || (d - 1) * w + 16 * groups <= kt.len();
    let room = R == 0 || (R - 1) * stride + 16 * groups <= out.len();
    assert!(fits && room && qs.iter().all(|q| q.len() == d), "key tile too small");
    let full = d / 8 * 8;
    for g in 0..groups {
        let col = 16 * g;
        // SAFETY (loads): i < d, so i · w + col + 16 <= (d - 1) · w + 16 · groups (asserted).
        let key = |i: usize| unsafe { _mm512_loadu_ps(kt.as_ptr().add(i * w + col)) };
        let mut acc = [[_mm512_setzero_ps(); 8]; R];
        for i in (0..full).step_by(8) {
            for l in 0..8 {
                let k = key(i + l);
                for (a, q) in acc.iter_mut().zip(qs) {
                    // SAFETY: i + l < full <= d = q.len().
                    let x = _mm512_set1_ps(unsafe { *q.get_unchecked(i + l) });
                    a[l] = _mm512_add_ps(a[l], _mm512_mul_ps(x, k));
                }
            }
        }
        let sum = |x: __m512, y: __m512| _mm512_add_ps(x, y);
        for (r, (a, q)) in acc.iter().zip(qs).enumerate() {
            let mut s = sum(sum(sum(a[0], a[4]), sum(a[2], a[6])), sum(sum(a[1], a[5]), sum(a[3], a[7])));
            for (i, &x) in q.iter().enumerate().skip(full) {
                s = _mm512_add_ps(s, _mm512_mul_ps(_mm512_set1_ps(x), key(i)));
            }
            // SAFETY: r · stride + col + 16 <= out.len() (asserted).
            unsafe {
                _mm512_storeu_ps(out.as_mut_ptr().add(r * stride + col), _mm512_mul_ps(s, _mm512_set1_ps(scale)))
            };
        }
    }
}

/// `s.iter().fold(m, f32::max)` for a non-NaN `m`: sixteen running maxima, then their maximum.
/// The same value: a NaN score is skipped either way (the register's running maximum is kept),
/// and the maximum of non-NaN values does not depend on their grouping (but for the sign of a
/// zero, which no caller's result depends on).
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn max_fold(m: f32, s: &[f32]) -> f32 {
    let mut acc = _mm512_set1_ps(m);
    let whole = s.len() / 16 * 16;
    for c in (0..whole).step_by(16) {
        // SAFETY: c + 16 <= s.len(). `max_ps(x, acc)` gives acc where x is NaN.
        acc = _mm512_max_ps(unsafe { _mm512_loadu_ps(s.as_ptr().add(c)) }, acc);
    }
    let rest = (s.len() - whole) as u32;
    if rest > 0 {
        let k: __mmask16 = ((1u32 << rest) - 1) as u16;
        // SAFETY: the masked load reads only the `rest` values left.
        let x = unsafe { _mm512_maskz_loadu_ps(k, s.as_ptr().add(whole)) };
        acc = _mm512_mask_max_ps(acc, k, x, acc);
    }
    _mm512_reduce_max_ps(acc)
}

/// [`super::accumulate_values`] with AVX-512: [`accumulate_values_q`] for one head.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn accumulate_values<'v>(acc: &mut [f32], ps: &[f32], value: &impl Fn(usize) -> &'v [f32]) {
    // SAFETY: the CPU has AVX-512 (the caller's contract).
    unsafe { accumulate_values_q([acc], [ps], value) }
}

/// [`super::dot_lanes8`] of each of `Q` queries with four keys (`out[h][r]` for query `h`, key
/// `r`): two keys share a register, key `2p` in its low eight lanes and `2p + 1` in its high
/// eight, each lane multiplied then added as the scalar code does; the lanes summed in
/// `lanes8_sum`'s tree inside the registers ([`pair_sums`]), the tail inputs added in order.
/// Every key points at `n` values, every query holds at least `n`.
#[target_feature(enable = "avx512f,avx2")]
pub(super) unsafe fn dots_lanes8_q<const Q: usize>(qs: [&[f32]; Q], keys: [*const f32; 4], n: usize) -> [[f32; 4]; Q] {
    let full = n / 8 * 8;
    let mut acc = [[_mm512_setzero_ps(); 2]; Q];
    let mut i = 0;
    while i < full {
        // SAFETY: i + 8 <= n, within every key and every query; unaligned loads.
        unsafe {
            let kv =
                [0, 1].map(|p| halves(_mm256_loadu_ps(keys[2 * p].add(i)), _mm256_loadu_ps(keys[2 * p + 1].add(i))));
            for (a, q) in acc.iter_mut().zip(qs) {
                let q16 = both_halves(_mm256_loadu_ps(q.as_ptr().add(i)));
                for (c, k) in a.iter_mut().zip(kv) {
                    *c = _mm512_add_ps(*c, _mm512_mul_ps(q16, k));
                }
            }
        }
        i += 8;
    }
    let mut out = [[0.0f32; 4]; Q];
    for ((o, a), q) in out.iter_mut().zip(acc).zip(qs) {
        *o = pair_sums(a);
        for (r, s) in o.iter_mut().enumerate() {
            for (j, &x) in q[..n].iter().enumerate().skip(full) {
                // SAFETY: j < n, within key r.
                *s += x * unsafe { *keys[r].add(j) };
            }
        }
    }
    out
}

/// `accs[h] += ps[h][j] · value(j)` for every key `j` in order, for `Q` query heads over the
/// same values (the heads of one KV head), each value row read once for all of them: up to 16
/// registers of accumulators held while the keys pass (128 elements of one or two heads, else
/// 64 a head), every element its own chain (multiply, then add), the rest in order; the same
/// bits as [`super::accumulate_values`] head by head. Every `accs[h]` has the same length `d`,
/// every `ps[h]` the same length, and `value(j)` holds at least `d` values.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn accumulate_values_q<'v, const Q: usize>(
    mut accs: [&mut [f32]; Q],
    ps: [&[f32]; Q],
    value: &impl Fn(usize) -> &'v [f32],
) {
    let d = accs.first().map_or(0, |a| a.len());
    let n = ps.first().map_or(0, |p| p.len());
    assert!(accs.iter().all(|a| a.len() == d) && ps.iter().all(|p| p.len() == n), "heads of unequal sizes");
    let mut c = 0;
    // SAFETY (each call): c + 16 · W <= d; W · Q <= 16 registers of accumulators.
    while Q <= 2 && d - c >= 128 {
        unsafe { accumulate_chunk_q::<8, Q>(&mut accs, c, &ps, value) };
        c += 128;
    }
    while d - c >= 64 {
        unsafe { accumulate_chunk_q::<4, Q>(&mut accs, c, &ps, value) };
        c += 64;
    }
    if d - c >= 32 {
        unsafe { accumulate_chunk_q::<2, Q>(&mut accs, c, &ps, value) };
        c += 32;
    }
    if d - c >= 16 {
        unsafe { accumulate_chunk_q::<1, Q>(&mut accs, c, &ps, value) };
        c += 16;
    }
    if c < d {
        for (acc, ps) in accs.iter_mut().zip(ps) {
            for (j, &p) in ps.iter().enumerate() {
                for (a, &x) in acc[c..].iter_mut().zip(&value(j)[c..d]) {
                    *a += p * x;
                }
            }
        }
    }
}

/// `accs[h][c..c + 16W] += ps[h][j] · value(j)[c..c + 16W]` for every key in order: `W`
/// registers of every head's accumulator, each value register loaded once for every head. The caller guarantees `c + 16W <= d`, the
/// length of every accumulator, and that `value(j)` holds at least `d` values.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn accumulate_chunk_q<'v, const W: usize, const Q: usize>(
    accs: &mut [&mut [f32]; Q],
    c: usize,
    ps: &[&[f32]; Q],
    value: &impl Fn(usize) -> &'v [f32],
) {
    let d = accs.first().map_or(0, |a| a.len());
    assert!(c + 16 * W <= d, "chunk past the accumulator");
    // SAFETY: c + 16W <= d, every accumulator's length (asserted, and by the caller).
    let mut regs: [[__m512; W]; Q] =
        std::array::from_fn(|h| std::array::from_fn(|k| unsafe { _mm512_loadu_ps(accs[h].as_ptr().add(c + 16 * k)) }));
    let n = ps.first().map_or(0, |p| p.len());
    for j in 0..n {
        let row = &value(j)[..d];
        // SAFETY: c + 16k + 16 <= d = row.len().
        let vs: [__m512; W] = std::array::from_fn(|k| unsafe { _mm512_loadu_ps(row.as_ptr().add(c + 16 * k)) });
        for (r, p) in regs.iter_mut().zip(ps) {
            let pv = _mm512_set1_ps(p[j]);
            for (r, &v) in r.iter_mut().zip(&vs) {
                *r = _mm512_add_ps(*r, _mm512_mul_ps(pv, v));
            }
        }
    }
    for (acc, r) in accs.iter_mut().zip(&regs) {
        for (k, r) in r.iter().enumerate() {
            // SAFETY: as for the loads.
            unsafe { _mm512_storeu_ps(acc.as_mut_ptr().add(c + 16 * k), *r) };
        }
    }
}

/// [`super::dot_lanes8`] of `a` with four f16 rows at once (the GEMV order): two rows share a
/// register, row `2p` in its low eight lanes and row `2p + 1` in its high eight, so every row
/// keeps its own eight lanes, multiplied then added as the scalar code does, with half the
/// instructions of the 256-bit version. The lanes are then summed in `lanes8_sum`'s tree and the
/// tail inputs added in order. `w` points at four rows of at least `n` values, `a` holds at least
/// `n`.
#[target_feature(enable = "avx512f,avx2,f16c")]
pub(super) unsafe fn dot_lanes8_x4_f16(a: &[f32], w: [*const half::f16; 4], n: usize) -> [f32; 4] {
    let full = n / 8 * 8;
    let mut acc = [_mm512_setzero_ps(); 2];
    let mut i = 0;
    while i < full {
        // SAFETY: i + 8 <= n: within `a` and within every row (the caller's contract).
        unsafe {
            super::prefetch_rows(w, i);
            let a16 = both_halves(_mm256_loadu_ps(a.as_ptr().add(i)));
            for (p, c) in acc.iter_mut().enumerate() {
                let lo = _mm_loadu_si128(w[2 * p].add(i).cast());
                let hi = _mm_loadu_si128(w[2 * p + 1].add(i).cast());
                let w16 = _mm512_cvtph_ps(_mm256_inserti128_si256::<1>(_mm256_castsi128_si256(lo), hi));
                *c = _mm512_add_ps(*c, _mm512_mul_ps(a16, w16));
            }
        }
        i += 8;
    }
    let mut out = pair_sums(acc);
    for (r, s) in out.iter_mut().enumerate() {
        for (j, &x) in a[..n].iter().enumerate().skip(full) {
            // SAFETY: j < n, within row r.
            *s += x * unsafe { *w[r].add(j) }.to_f32();
        }
    }
    out
}

/// Eight values in both halves of a register.
#[target_feature(enable = "avx512f")]
#[inline]
fn both_halves(v: __m256) -> __m512 {
    halves(v, v)
}

/// `lo` in the low eight lanes of a register, `hi` in the high eight.
#[target_feature(enable = "avx512f")]
#[inline]
fn halves(lo: __m256, hi: __m256) -> __m512 {
    _mm512_castpd_ps(_mm512_insertf64x4::<1>(_mm512_castpd256_pd512(_mm256_castps_pd(lo)), _mm256_castps_pd(hi)))
}

/// The four row sums of two registers of row pairs (row `2p` in the low eight lanes of register
/// `p`, row `2p + 1` in the high eight): each row's eight lanes summed in `lanes8_sum`'s tree
/// inside the register (lane l + 4 onto lane l, then lane 2 onto 0 and 3 onto 1, then lane 1
/// onto 0), so that the row sums land in lanes 0 and 8.
#[target_feature(enable = "avx512f")]
fn pair_sums(acc: [__m512; 2]) -> [f32; 4] {
    let sums = acc.map(|c| {
        let c = _mm512_add_ps(c, _mm512_shuffle_f32x4::<0b10_11_00_01>(c, c));
        let c = _mm512_add_ps(c, _mm512_shuffle_ps::<0b01_00_11_10>(c, c));
        _mm512_add_ps(c, _mm512_shuffle_ps::<0b10_11_00_01>(c, c))
    });
    let mut lanes = [[0.0f32; 16]; 2];
    for (l, c) in lanes.iter_mut().zip(sums) {
        // SAFETY: `l` holds sixteen f32.
        unsafe { _mm512_storeu_ps(l.as_mut_ptr(), c) };
    }
    [lanes[0][0], lanes[0][8], lanes[1][0], lanes[1][8]]
}

/// The GEMV of rows `o0..o1` of a matrix of ggml blocks (`blocks_per_row` to a row), in
/// `order`, four rows at a time dequantized in registers ([`dot_lanes8_x4_blocks`],
/// [`dot_blocked_x4_blocks`]); a row left over runs as four copies of itself.
///
/// # Safety
/// The CPU has what [`available`] checks.
pub(super) unsafe fn gemv_blocks<B: QuantBlock>(
    x: &[f32],
    blocks: &[B],
    blocks_per_row: usize,
    (o0, o1): (usize, usize),
    order: super::DotOrder,
) -> Vec<f32> {
    assert!(x.len() >= blocks_per_row * BLOCK, "GEMV input shorter than a row");
    let row = |o: usize| &blocks[o * blocks_per_row..(o + 1) * blocks_per_row];
    // SAFETY: the CPU has AVX-512 F, AVX2 and F16C (the caller's contract); the kernels check
    // the rows' and the input's lengths.
    let four = |rows: [&[B]; 4]| unsafe {
        match order {
            super::DotOrder::Lanes8 => dot_lanes8_x4_blocks(x, rows),
            super::DotOrder::Blocked => dot_blocked_x4_blocks(x, rows),
        }
    };
    super::gemv_x4(o0, o1, |os| four(os.map(row)), |o| four([row(o); 4])[0])
}

/// Asks for the cache lines [`super::PREFETCH_BYTES`] ahead of block `j` of four rows of blocks,
/// at the blocks that start a new 64 bytes of their row (a block is less than a cache line).
#[inline(always)]
fn prefetch_blocks<B>(w: &[&[B]; 4], j: usize) {
    let size = std::mem::size_of::<B>();
    if j > 0 && (j * size) / 64 == (j * size - size) / 64 {
        return;
    }
    for r in w {
        super::prefetch_line(r.as_ptr().wrapping_add(j).cast::<u8>().wrapping_add(super::PREFETCH_BYTES));
    }
}

/// [`super::dot_lanes8`] of `x` with four rows of ggml blocks, dequantized in registers: rows
/// `2p` and `2p + 1` share register `p` (eight lanes each, [`QuantBlock::pairs8_avx512`]), every
/// lane multiplied then added as the scalar code does over the dequantized values, then summed
/// in `lanes8_sum`'s tree. Rows are whole blocks, so there is no tail. Every row holds as many
/// blocks as the first, `x` at least as many values.
#[target_feature(enable = "avx512f,avx2,f16c")]
pub(super) unsafe fn dot_lanes8_x4_blocks<B: QuantBlock>(x: &[f32], w: [&[B]; 4]) -> [f32; 4] {
    assert!(w.iter().all(|r| r.len() == w[0].len()) && x.len() >= w[0].len() * BLOCK, "rows of unequal length");
    let mut acc = [_mm512_setzero_ps(); 2];
    for j in 0..w[0].len() {
        prefetch_blocks(&w, j);
        // SAFETY: value 32j + 32 <= x.len() and block j is in every row (the caller's contract).
        unsafe {
            let xs: [__m512; 4] =
                std::array::from_fn(|c| both_halves(_mm256_loadu_ps(x.as_ptr().add(BLOCK * j + 8 * c))));
            for (p, a) in acc.iter_mut().enumerate() {
                let v = B::pairs8_avx512(w[2 * p].get_unchecked(j), w[2 * p + 1].get_unchecked(j));
                for (xc, vc) in xs.iter().zip(v) {
                    *a = _mm512_add_ps(*a, _mm512_mul_ps(*xc, vc));
                }
            }
        }
    }
    pair_sums(acc)
}

/// [`super::dot_blocked`] of `x` with four rows of ggml blocks, dequantized in registers: a
/// register holds the four lanes of the four rows (quarter `r` row `r`,
/// [`QuantBlock::quads4_avx512`]), a 64-value block is two ggml blocks (the last perhaps one),
/// run by [`blocked_x4_by_64`]. Rows are whole blocks, so there is no tail. Every row holds as
/// many blocks as the first, `x` at least as many values.
#[target_feature(enable = "avx512f,avx2,f16c")]
pub(super) unsafe fn dot_blocked_x4_blocks<B: QuantBlock>(x: &[f32], w: [&[B]; 4]) -> [f32; 4] {
    const PER_64: usize = 64 / BLOCK;
    let nb = w[0].len();
    assert!(w.iter().all(|r| r.len() == nb) && x.len() >= nb * BLOCK, "rows of unequal length");
    blocked_x4_by_64::<PER_64>(nb.div_ceil(PER_64), |b, t, acc| {
        let j = PER_64 * b + t;
        if j < nb {
            prefetch_blocks(&w, j);
            // SAFETY: value 32j + 32 <= x.len() and block j is in every row (the caller's
            // contract).
            unsafe {
                let v = B::quads4_avx512(w.map(|r| r.get_unchecked(j)));
                for (c, vc) in v.into_iter().enumerate() {
                    let x4 = _mm512_broadcast_f32x4(_mm_loadu_ps(x.as_ptr().add(BLOCK * j + 4 * c)));
                    *acc = _mm512_fmadd_ps(x4, vc, *acc);
                }
            }
        }
    })
}

/// [`super::dot_blocked`] of `a` with four f16 rows whose length `n` is a multiple of 64: a
/// register holds the four lanes of the four rows (quarter `r` row `r`: sixteen values of each
/// row loaded, their 4 × 4 groups of four transposed, then widened), run by
/// [`blocked_x4_by_64`]. `w` points at four rows of at least `n` values, `a` holds at least `n`.
#[target_feature(enable = "avx512f,avx2,f16c")]
pub(super) unsafe fn dot_blocked_x4_f16(a: &[f32], w: [*const half::f16; 4], n: usize) -> [f32; 4] {
    assert!(n.is_multiple_of(64), "rows of whole 64-value blocks");
    blocked_x4_by_64::<4>(n / 64, |b, t, acc| {
        let i = 64 * b + 16 * t;
        super::prefetch_rows(w, i);
        // SAFETY: i + 16 <= n: within `a` and every row (the caller's contract).
        unsafe {
            let [y0, y1, y2, y3] = w.map(|r| _mm256_loadu_si256(r.add(i).cast()));
            // Groups of four halves (64 bits): g0 g1 | g2 g3 in each row's register.
            let (t0, t1) = (_mm256_unpacklo_epi64(y0, y1), _mm256_unpacklo_epi64(y2, y3));
            let (t2, t3) = (_mm256_unpackhi_epi64(y0, y1), _mm256_unpackhi_epi64(y2, y3));
            let groups = [
                _mm256_permute2x128_si256::<0x20>(t0, t1),
                _mm256_permute2x128_si256::<0x20>(t2, t3),
                _mm256_permute2x128_si256::<0x31>(t0, t1),
                _mm256_permute2x128_si256::<0x31>(t2, t3),
            ];
            for (c, g) in groups.into_iter().enumerate() {
                let x4 = _mm512_broadcast_f32x4(_mm_loadu_ps(a.as_ptr().add(i + 4 * c)));
                *acc = _mm512_fmadd_ps(x4, _mm512_cvtph_ps(g), *acc);
            }
        }
    })
}

/// [`super::dot_blocked`]'s sequence for four rows over `blocks` 64-value blocks, whose four
/// lanes per row a register holds (quarter `r` row `r`): `part(b, t, acc)` adds part `t` (of
/// `PARTS`, in order) of block `b` into `acc` with fused multiply-adds. Each block's sums start
/// from zero, so two blocks run side by side as two independent chains; at the end of a block two
/// levels of shuffles and additions give every row its `(l0 + l1) + (l2 + l3)`, added to its
/// total in block order.
#[target_feature(enable = "avx512f")]
#[inline]
fn blocked_x4_by_64<const PARTS: usize>(blocks: usize, mut part: impl FnMut(usize, usize, &mut __m512)) -> [f32; 4] {
    let mut total = _mm512_setzero_ps();
    let mut b = 0;
    while b < blocks {
        let pair = [b, b + 1];
        let mut acc = [_mm512_setzero_ps(); 2];
        for t in 0..PARTS {
            for (s, a) in pair.into_iter().zip(acc.iter_mut()) {
                if s < blocks {
                    part(s, t, a);
                }
            }
        }
        for (s, a) in pair.into_iter().zip(acc) {
            if s < blocks {
                // Lane 4r: row r's (l0 + l1) + (l2 + l3).
                let a = _mm512_add_ps(a, _mm512_shuffle_ps::<0b10_11_00_01>(a, a));
                let a = _mm512_add_ps(a, _mm512_shuffle_ps::<0b01_00_11_10>(a, a));
                total = _mm512_add_ps(total, a);
            }
        }
        b += 2;
    }
    let mut lanes = [0.0f32; 16];
    // SAFETY: `lanes` holds sixteen f32.
    unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), total) };
    [lanes[0], lanes[4], lanes[8], lanes[12]]
}

#[cfg(test)]
mod tests {
    /// The vector maximum is the scalar fold's value: NaN scores skipped, -∞ kept as a start,
    /// every tail length of the masked last register.
    #[test]
    fn max_fold_is_the_scalar_fold() {
        if !super::available() {
            return;
        }
        let mut x = 0x9e37_79b9u32;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x as f32 / u32::MAX as f32) * 8.0 - 4.0
        };
        for n in 0..70 {
            let mut s: Vec<f32> = (0..n).map(|_| next()).collect();
            for (i, v) in s.iter_mut().enumerate() {
                if i % 5 == 3 {
                    *v = f32::NAN;
                }
            }
            for m in [f32::NEG_INFINITY, -1.0, 0.5, 10.0] {
                let want = s.iter().fold(m, |a, &b| a.max(b));
                // SAFETY: the CPU has AVX-512 (checked above).
                let got = unsafe { super::max_fold(m, &s) };
                assert_eq!(got, want, "n={n} m={m}");
            }
        }
    }
}
