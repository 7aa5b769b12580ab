//! Model weights, laid out as the forward pass reads them.
//!
//! Matrices keep the 16-bit type of their file (F16, BF16): the kernels widen each row to f32
//! exactly as they read it, so a model computes the same bits as with f32 weights while holding
//! half the memory and streaming half the bytes per decode step. The ggml blocks Q4_1 and Q8_0
//! are kept packed too (32 values per block, 5 and 8.5 bits a value): the kernels dequantize a
//! row to the f32 values ggml's formula gives (`q · d + m`, `q · d`, multiplied then added) as
//! they read it, so the bits are those of the same matrix dequantized at load. Other quantized
//! types are dequantized to f32 at load.

use std::borrow::Cow;

use half::{bf16, f16};

/// The values of a matrix, in their storage type.
#[derive(Debug, Clone, PartialEq)]
pub enum Storage {
    /// 32-bit floats.
    F32(Vec<f32>),
    /// IEEE half precision.
    F16(Vec<f16>),
    /// bfloat16.
    BF16(Vec<bf16>),
    /// ggml's Q4_1 blocks (rows are whole blocks).
    Q4_1(Vec<BlockQ4_1>),
    /// ggml's Q8_0 blocks (rows are whole blocks).
    Q8_0(Vec<BlockQ8_0>),
}

/// Values per quantized block.
pub const BLOCK: usize = 32;

/// 32 values of ggml's Q4_1: value `j` is `q_j · d + m` (in f32: `d` and `m` widened, multiplied
/// then added), `q_j` the low nibble of `qs[j]` for `j < 16`, the high nibble of `qs[j - 16]`
/// after.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockQ4_1 {
    /// Scale.
    pub d: f16,
    /// Minimum.
    pub m: f16,
    /// Nibbles.
    pub qs: [u8; 16],
}

/// 32 values of ggml's Q8_0: value `j` is `qs[j] · d` in f32.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockQ8_0 {
    /// Scale.
    pub d: f16,
    /// Signed quants.
    pub qs: [i8; 32],
}

impl BlockQ4_1 {
    /// Bytes of a block in a GGUF file.
    pub const BYTES: usize = 20;

    /// The block stored at the start of `b` (at least [`BlockQ4_1::BYTES`] bytes).
    pub fn from_bytes(b: &[u8]) -> BlockQ4_1 {
        let mut qs = [0u8; 16];
        qs.copy_from_slice(&b[4..20]);
        BlockQ4_1 { d: f16::from_le_bytes([b[0], b[1]]), m: f16::from_le_bytes([b[2], b[3]]), qs }
    }
}

impl BlockQ8_0 {
    /// Bytes of a block in a GGUF file.
    pub const BYTES: usize = 34;

    /// The block stored at the start of `b` (at least [`BlockQ8_0::BYTES`] bytes).
    pub fn from_bytes(b: &[u8]) -> BlockQ8_0 {
        let mut qs = [0i8; 32];
        for (q, &x) in qs.iter_mut().zip(&b[2..34]) {
            *q = x as i8;
        }
        BlockQ8_0 { d: f16::from_le_bytes([b[0], b[1]]), qs }
    }
}

/// Writes values `a..b` of a sequence of blocks into `dst` (of length `b - a`): whole blocks
/// with AVX-512 where the CPU has it (the same operations, sixteen values per register).
fn dequantize<B: QuantBlock>(blocks: &[B], a: usize, b: usize, dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if a.is_multiple_of(BLOCK) && b.is_multiple_of(BLOCK) && crate::kernels::has_avx512() {
        // SAFETY: the CPU has AVX-512 and F16C (checked above).
        unsafe { dequantize_avx512(&blocks[a / BLOCK..b / BLOCK], dst) };
        return;
    }
    dequantize_plain(blocks, a, b, dst)
}

/// Whole blocks into `dst`, with the blocks' AVX-512 `values` inlined in one loop.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,f16c")]
unsafe fn dequantize_avx512<B: QuantBlock>(blocks: &[B], dst: &mut [f32]) {
    for (blk, out) in blocks.iter().zip(dst.chunks_exact_mut(BLOCK)) {
        // SAFETY: the CPU has AVX-512 (the caller's contract); `out` holds a block's values.
        unsafe { blk.values_avx512(out) };
    }
}

/// A ggml block of [`BLOCK`] quantized values.
pub trait QuantBlock {
    /// The block's values, by ggml's formula.
    fn values(&self, out: &mut [f32; BLOCK]);

    /// `values` of the block into `out` (at least 32 values), sixteen at a time.
    ///
    /// # Safety
    /// The CPU has AVX-512 F and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn values_avx512(&self, out: &mut [f32]);

    /// The values of two blocks eight at a time, side by side, as the GEMV order reads them:
    /// register `c` holds values `8c..8c + 8` of `a` in its low half and of `b` in its high half.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn pairs8_avx512(a: &Self, b: &Self) -> [std::arch::x86_64::__m512; 4];

    /// The values of four blocks four at a time, as the GEMM order reads them: register `c`
    /// holds values `4c..4c + 4` of block `r` in its quarter `r`.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn quads4_avx512(blocks: [&Self; 4]) -> [std::arch::x86_64::__m512; 8];
}

/// `[x_0, x_1, x_2, x_3]` as four 32-bit rows side by side: lane group `c` of the result holds
/// lane `c` of each `x_r`, in order (a 4 × 4 transpose of 32-bit lanes: bytes `4c..4c + 4` of
/// each of four 16-byte rows).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn transpose_4x4(x: [std::arch::x86_64::__m128i; 4]) -> [std::arch::x86_64::__m128i; 4] {
    use std::arch::x86_64::*;
    let (t0, t1) = (_mm_unpacklo_epi32(x[0], x[1]), _mm_unpacklo_epi32(x[2], x[3]));
    let (t2, t3) = (_mm_unpackhi_epi32(x[0], x[1]), _mm_unpackhi_epi32(x[2], x[3]));
    [_mm_unpacklo_epi64(t0, t1), _mm_unpackhi_epi64(t0, t1), _mm_unpacklo_epi64(t2, t3), _mm_unpackhi_epi64(t2, t3)]
}

/// Scales (and minima) widened to f32 and spread over a register: lane `l` of the result is
/// `half[index[l]]` of the up to eight f16 values packed in `bits` (F16C, exact).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,f16c")]
#[inline]
fn spread_halves(bits: std::arch::x86_64::__m128i, index: [i32; 16]) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let wide = _mm512_castps256_ps512(_mm256_cvtph_ps(bits));
    // SAFETY: `index` holds sixteen i32.
    let idx = unsafe { _mm512_loadu_si512(index.as_ptr().cast()) };
    _mm512_permutexvar_ps(idx, wide)
}

/// Lane `l` takes value `l / 8` (two blocks' scales over halves) or `l / 4` (four over quarters),
/// `STRIDE` apart, from `FIRST` on.
#[cfg(target_arch = "x86_64")]
const fn spread<const PER: usize, const STRIDE: i32, const FIRST: i32>() -> [i32; 16] {
    let mut idx = [0; 16];
    let mut l = 0;
    while l < 16 {
        idx[l] = FIRST + STRIDE * (l / PER) as i32;
        l += 1;
    }
    idx
}

impl QuantBlock for BlockQ4_1 {
    fn values(&self, out: &mut [f32; BLOCK]) {
        let (d, m) = (self.d.to_f32(), self.m.to_f32());
        for (j, &q) in self.qs.iter().enumerate() {
            out[j] = f32::from(q & 0x0f) * d + m;
            out[j + 16] = f32::from(q >> 4) * d + m;
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,f16c")]
    #[inline]
    unsafe fn values_avx512(&self, out: &mut [f32]) {
        use std::arch::x86_64::*;
        assert!(out.len() >= BLOCK, "a block has 32 values");
        // d and m widened together (F16C, exact), then each broadcast.
        let bits = u32::from(self.d.to_bits()) | u32::from(self.m.to_bits()) << 16;
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32));
        let (d, m) = (_mm512_broadcastss_ps(dm), _mm512_broadcastss_ps(_mm_movehdup_ps(dm)));
        // SAFETY: `qs` holds sixteen bytes; `out` at least 32 f32 (asserted).
        unsafe {
            let q = _mm_loadu_si128(self.qs.as_ptr().cast());
            let mask = _mm_set1_epi8(0x0f);
            let (lo, hi) = (_mm_and_si128(q, mask), _mm_and_si128(_mm_srli_epi16::<4>(q), mask));
            _mm512_storeu_ps(out.as_mut_ptr(), nibble_values(lo, d, m));
            _mm512_storeu_ps(out.as_mut_ptr().add(16), nibble_values(hi, d, m));
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,f16c")]
    #[inline]
    unsafe fn pairs8_avx512(a: &Self, b: &Self) -> [std::arch::x86_64::__m512; 4] {
        use std::arch::x86_64::*;
        // [d_a, m_a, d_b, m_b] spread: d_a and m_a over the low half, d_b and m_b over the high.
        let bits = _mm_set_epi32(0, 0, scale_min_bits(b), scale_min_bits(a));
        let d = spread_halves(bits, const { spread::<8, 2, 0>() });
        let m = spread_halves(bits, const { spread::<8, 2, 1>() });
        // SAFETY: `qs` holds sixteen bytes.
        let (qa, qb) = unsafe { (_mm_loadu_si128(a.qs.as_ptr().cast()), _mm_loadu_si128(b.qs.as_ptr().cast())) };
        // Bytes 0..8 of both blocks, then bytes 8..16: their low nibbles are values 0..16, their
        // high nibbles values 16..32.
        let (first, second) = (_mm_unpacklo_epi64(qa, qb), _mm_unpackhi_epi64(qa, qb));
        let mask = _mm_set1_epi8(0x0f);
        let nibbles = [
            _mm_and_si128(first, mask),
            _mm_and_si128(second, mask),
            _mm_and_si128(_mm_srli_epi16::<4>(first), mask),
            _mm_and_si128(_mm_srli_epi16::<4>(second), mask),
        ];
        nibbles.map(|n| nibble_values(n, d, m))
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,f16c")]
    #[inline]
    unsafe fn quads4_avx512(blocks: [&Self; 4]) -> [std::arch::x86_64::__m512; 8] {
        use std::arch::x86_64::*;
        let bits = _mm_set_epi32(
            scale_min_bits(blocks[3]),
            scale_min_bits(blocks[2]),
            scale_min_bits(blocks[1]),
            scale_min_bits(blocks[0]),
        );
        let d = spread_halves(bits, const { spread::<4, 2, 0>() });
        let m = spread_halves(bits, const { spread::<4, 2, 1>() });
        // SAFETY: `qs` holds sixteen bytes.
        let q = blocks.map(|b| unsafe { _mm_loadu_si128(b.qs.as_ptr().cast()) });
        // Bytes 4c..4c + 4 of every block: low nibbles values 4c.., high nibbles 16 + 4c...
        let t = transpose_4x4(q);
        let mask = _mm_set1_epi8(0x0f);
        std::array::from_fn(|c| {
            let raw = t[c % 4];
            let n = if c < 4 { _mm_and_si128(raw, mask) } else { _mm_and_si128(_mm_srli_epi16::<4>(raw), mask) };
            nibble_values(n, d, m)
        })
    }
}

/// Q4_1's `q · d + m` of sixteen nibbles (one per byte of `n`, each below 16), multiplied then
/// added.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn nibble_values(
    n: std::arch::x86_64::__m128i,
    d: std::arch::x86_64::__m512,
    m: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(n)), d), m)
}

/// Q8_0's `q · d` of sixteen signed bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn byte_values(q: std::arch::x86_64::__m128i, d: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), d)
}

/// A Q4_1 block's scale and minimum bits, the scale in the low 16 bits.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn scale_min_bits(b: &BlockQ4_1) -> i32 {
    (u32::from(b.d.to_bits()) | u32::from(b.m.to_bits()) << 16) as i32
}

impl QuantBlock for BlockQ8_0 {
    fn values(&self, out: &mut [f32; BLOCK]) {
        let d = self.d.to_f32();
        for (o, &q) in out.iter_mut().zip(&self.qs) {
            *o = f32::from(q) * d;
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,f16c")]
    #[inline]
    unsafe fn values_avx512(&self, out: &mut [f32]) {
        use std::arch::x86_64::*;
        assert!(out.len() >= BLOCK, "a block has 32 values");
        let d = _mm512_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(self.d.to_bits()))));
        // SAFETY: `qs` holds 32 bytes; `out` at least 32 f32 (asserted).
        unsafe {
            for h in 0..2 {
                let q = _mm_loadu_si128(self.qs.as_ptr().add(16 * h).cast());
                _mm512_storeu_ps(out.as_mut_ptr().add(16 * h), byte_values(q, d));
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,f16c")]
    #[inline]
    unsafe fn pairs8_avx512(a: &Self, b: &Self) -> [std::arch::x86_64::__m512; 4] {
        use std::arch::x86_64::*;
        let bits = _mm_set_epi32(0, 0, 0, i32::from(a.d.to_bits()) | i32::from(b.d.to_bits()) << 16);
        let d = spread_halves(bits, const { spread::<8, 1, 0>() });
        // SAFETY: `qs` holds 32 bytes.
        let [a0, a1, b0, b1] = unsafe {
            [a.qs.as_ptr(), a.qs.as_ptr().add(16), b.qs.as_ptr(), b.qs.as_ptr().add(16)]
                .map(|p| _mm_loadu_si128(p.cast()))
        };
        let eights = [
            _mm_unpacklo_epi64(a0, b0),
            _mm_unpackhi_epi64(a0, b0),
            _mm_unpacklo_epi64(a1, b1),
            _mm_unpackhi_epi64(a1, b1),
        ];
        eights.map(|q| byte_values(q, d))
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,f16c")]
    #[inline]
    unsafe fn quads4_avx512(blocks: [&Self; 4]) -> [std::arch::x86_64::__m512; 8] {
        use std::arch::x86_64::*;
        let [d0, d1, d2, d3] = blocks.map(|b| i32::from(b.d.to_bits()));
        let d = spread_halves(_mm_set_epi32(0, 0, d2 | d3 << 16, d0 | d1 << 16), const { spread::<4, 1, 0>() });
        // SAFETY: `qs` holds 32 bytes.
        let half =
            |h: usize| transpose_4x4(blocks.map(|b| unsafe { _mm_loadu_si128(b.qs.as_ptr().add(16 * h).cast()) }));
        let (first, second) = (half(0), half(1));
        std::array::from_fn(|c| byte_values(if c < 4 { first[c] } else { second[c - 4] }, d))
    }
}

/// [`dequantize`] one value at a time, as the blocks' `values` define them.
fn dequantize_plain<B: QuantBlock>(blocks: &[B], a: usize, b: usize, dst: &mut [f32]) {
    let mut buf = [0.0f32; BLOCK];
    let mut at = a;
    while at < b {
        let (k, off) = (at / BLOCK, at % BLOCK);
        let take = (BLOCK - off).min(b - at);
        let out = &mut dst[at - a..at - a + take];
        if off == 0 && take == BLOCK {
            let out: &mut [f32; BLOCK] = out.try_into().expect("a whole block");
            blocks[k].values(out);
        } else {
            blocks[k].values(&mut buf);
            out.copy_from_slice(&buf[off..off + take]);
        }
        at += take;
    }
}

impl Storage {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            Storage::F32(v) => v.len(),
            Storage::F16(v) => v.len(),
            Storage::BF16(v) => v.len(),
            Storage::Q4_1(v) => v.len() * BLOCK,
            Storage::Q8_0(v) => v.len() * BLOCK,
        }
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the values of `cols` take (`cols` a whole number of blocks for block types): the
    /// length of a matrix row in memory.
    pub fn row_bytes(&self, cols: usize) -> usize {
        match self {
            Storage::F32(_) => cols * 4,
            Storage::F16(_) | Storage::BF16(_) => cols * 2,
            Storage::Q4_1(_) => cols / BLOCK * BlockQ4_1::BYTES,
            Storage::Q8_0(_) => cols / BLOCK * BlockQ8_0::BYTES,
        }
    }

    /// Where the values start in memory.
    pub fn as_ptr(&self) -> *const u8 {
        match self {
            Storage::F32(v) => v.as_ptr().cast(),
            Storage::F16(v) => v.as_ptr().cast(),
            Storage::BF16(v) => v.as_ptr().cast(),
            Storage::Q4_1(v) => v.as_ptr().cast(),
            Storage::Q8_0(v) => v.as_ptr().cast(),
        }
    }

    /// The name of the storage type (`f32`, `f16`, `bf16`, `q4_1`, `q8_0`), as traces state it.
    pub fn type_name(&self) -> &'static str {
        match self {
            Storage::F32(_) => "f32",
            Storage::F16(_) => "f16",
            Storage::BF16(_) => "bf16",
            Storage::Q4_1(_) => "q4_1",
            Storage::Q8_0(_) => "q8_0",
        }
    }

    /// Values `a..b` widened to f32 (exact), borrowed when already f32.
    pub fn range_f32(&self, a: usize, b: usize) -> Cow<'_, [f32]> {
        match self {
            Storage::F32(v) => Cow::Borrowed(&v[a..b]),
            _ => {
                let mut out = vec![0.0; b - a];
                self.widen_into(a, b, &mut out);
                Cow::Owned(out)
            }
        }
    }

    /// Writes values `a..b`, widened to f32 (exact), into `dst` (of length `b - a`).
    pub fn widen_into(&self, a: usize, b: usize, dst: &mut [f32]) {
        match self {
            Storage::F32(v) => dst.copy_from_slice(&v[a..b]),
            Storage::F16(v) => widen_f16(&v[a..b], dst),
            Storage::BF16(v) => widen_bf16(&v[a..b], dst),
            Storage::Q4_1(v) => dequantize(v, a, b, dst),
            Storage::Q8_0(v) => dequantize(v, a, b, dst),
        }
    }

    /// The same values in the same type, with rows of `cols` values taken in the order `rows`.
    pub fn gather_rows(&self, rows: &[usize], cols: usize) -> Storage {
        fn g<T: Copy>(v: &[T], rows: &[usize], cols: usize) -> Vec<T> {
            rows.iter().flat_map(|&r| v[r * cols..(r + 1) * cols].iter().copied()).collect()
        }
        match self {
            Storage::F32(v) => Storage::F32(g(v, rows, cols)),
            Storage::F16(v) => Storage::F16(g(v, rows, cols)),
            Storage::BF16(v) => Storage::BF16(g(v, rows, cols)),
            Storage::Q4_1(v) => Storage::Q4_1(g(v, rows, cols / BLOCK)),
            Storage::Q8_0(v) => Storage::Q8_0(g(v, rows, cols / BLOCK)),
        }
    }
}

/// Widens f16 values to f32 (exact): eight at a time with the F16C instruction where the CPU
/// has it (detected at run time), else one at a time.
pub fn widen_f16(src: &[f16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has the features the function is compiled for (checked just above).
        unsafe { widen_f16_f16c(src, dst) };
        return;
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

/// [`widen_f16`] with F16C: one `vcvtph2ps` per eight values, the tail one at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn widen_f16_f16c(src: &[f16], dst: &mut [f32]) {
    use std::arch::x86_64::{__m128i, _mm256_cvtph_ps, _mm256_storeu_ps, _mm_loadu_si128};
    let n = src.len().min(dst.len());
    let full = n / 8 * 8;
    for i in (0..full).step_by(8) {
        // SAFETY: i + 8 <= n, within both slices; unaligned loads and stores.
        unsafe {
            let h = _mm_loadu_si128(src.as_ptr().add(i).cast::<__m128i>());
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        }
    }
    for i in full..n {
        dst[i] = src[i].to_f32();
    }
}

/// Widens bf16 values to f32 (exact: the bf16 bits are the high half of the f32).
pub fn widen_bf16(src: &[bf16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits(u32::from(s.to_bits()) << 16);
    }
}

/// A linear layer's weight: `[out, in]` row-major, so each output is one contiguous dot product.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    /// Output features (rows).
    pub rows: usize,
    /// Input features (columns).
    pub cols: usize,
    /// `rows * cols` values.
    pub data: Storage,
}

impl Matrix {
    /// Wraps f32 data of shape `[rows, cols]`.
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Matrix {
        Matrix::from_storage(rows, cols, Storage::F32(data))
    }

    /// Wraps data of shape `[rows, cols]` in any storage type (for block types, `cols` a
    /// multiple of the block).
    pub fn from_storage(rows: usize, cols: usize, data: Storage) -> Matrix {
        assert_eq!(data.len(), rows * cols, "matrix data does not match its shape");
        let blocks = matches!(data, Storage::Q4_1(_) | Storage::Q8_0(_));
        assert!(!blocks || cols.is_multiple_of(BLOCK), "rows of blocks must be whole blocks");
        Matrix { rows, cols, data }
    }

    /// Row `r`, widened to f32.
    pub fn row(&self, r: usize) -> Cow<'_, [f32]> {
        self.rows_f32(r, r + 1)
    }

    /// Rows `r0..r1`, widened to f32, row-major.
    pub fn rows_f32(&self, r0: usize, r1: usize) -> Cow<'_, [f32]> {
        self.data.range_f32(r0 * self.cols, r1 * self.cols)
    }

    /// Calls `f` with rows `r0..r1` in f32, row-major: the storage itself when it is f32, else
    /// the rows widened into a scratch buffer of the calling thread (reused, so the kernels'
    /// inner loops allocate nothing).
    pub fn with_rows_f32<R>(&self, r0: usize, r1: usize, f: impl FnOnce(&[f32]) -> R) -> R {
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let (a, b) = (r0 * self.cols, r1 * self.cols);
        let widen = |buf: &mut Vec<f32>| {
            if buf.len() < b - a {
                buf.resize(b - a, 0.0);
            }
            self.data.widen_into(a, b, &mut buf[..b - a]);
        };
        match &self.data {
            Storage::F32(v) => f(&v[a..b]),
            _ => SCRATCH.with(|cell| match cell.try_borrow_mut() {
                Ok(mut buf) => {
                    widen(&mut buf);
                    f(&buf[..b - a])
                }
                // Re-entered on this thread (a kernel inside `f`): use a buffer of its own.
                Err(_) => {
                    let mut own = Vec::new();
                    widen(&mut own);
                    f(&own[..b - a])
                }
            }),
        }
    }

    /// All values, widened to f32.
    pub fn values(&self) -> Cow<'_, [f32]> {
        self.data.range_f32(0, self.data.len())
    }

    /// The same matrix with f32 storage (the values are unchanged).
    pub fn to_f32(&self) -> Matrix {
        Matrix::new(self.rows, self.cols, self.values().into_owned())
    }

    /// Bytes the values take in memory.
    pub fn bytes(&self) -> usize {
        self.rows * self.data.row_bytes(self.cols)
    }
}

/// The weights of one decoder layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerWeights {
    /// RMSNorm before attention, `[hidden]`.
    pub attn_norm: Vec<f32>,
    /// `[q_dim, hidden]`.
    pub wq: Matrix,
    /// `[kv_dim, hidden]`.
    pub wk: Matrix,
    /// `[kv_dim, hidden]`.
    pub wv: Matrix,
    /// `[hidden, q_dim]`.
    pub wo: Matrix,
    /// RMSNorm before the MLP, `[hidden]`.
    pub mlp_norm: Vec<f32>,
    /// `[ffn, hidden]`.
    pub w_gate: Matrix,
    /// `[ffn, hidden]`.
    pub w_up: Matrix,
    /// `[hidden, ffn]`.
    pub w_down: Matrix,
}

/// All weights of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct Weights {
    /// Token embeddings, `[vocab, hidden]`.
    pub embed: Matrix,
    /// Decoder layers.
    pub layers: Vec<LayerWeights>,
    /// Final RMSNorm, `[hidden]`.
    pub final_norm: Vec<f32>,
    /// LM head, `[vocab, hidden]`; `None` when tied to `embed`.
    pub lm_head: Option<Matrix>,
}

impl Weights {
    /// The storage types of the matmul weights as the kernels read them, most used first and
    /// joined by `+` (`q4_1+q8_0`); other quantized types are widened to f32 at load.
    pub fn weight_dtype(&self) -> String {
        let mut counts: Vec<(&'static str, usize)> = Vec::new();
        for m in self.matmul_weights() {
            let name = m.data.type_name();
            match counts.iter_mut().find(|(n, _)| *n == name) {
                Some((_, c)) => *c += 1,
                None => counts.push((name, 1)),
            }
        }
        counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        counts.iter().map(|(n, _)| *n).collect::<Vec<_>>().join("+")
    }

    /// The matrices of the forward pass (every layer's, then the LM head; not the embedding,
    /// which is read one row per token).
    pub fn matmul_weights(&self) -> impl Iterator<Item = &Matrix> {
        self.layers
            .iter()
            .flat_map(|l| [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down])
            .chain(std::iter::once(self.lm_head()))
    }

    /// The same weights with every matrix in f32 storage.
    pub fn to_f32(&self) -> Weights {
        let layers = self
            .layers
            .iter()
            .map(|l| LayerWeights {
                wq: l.wq.to_f32(),
                wk: l.wk.to_f32(),
                wv: l.wv.to_f32(),
                wo: l.wo.to_f32(),
                w_gate: l.w_gate.to_f32(),
                w_up: l.w_up.to_f32(),
                w_down: l.w_down.to_f32(),
                ..l.clone()
            })
            .collect();
        Weights {
            embed: self.embed.to_f32(),
            layers,
            final_norm: self.final_norm.clone(),
            lm_head: self.lm_head.as_ref().map(Matrix::to_f32),
        }
    }

    /// The LM head (the embedding when tied).
    pub fn lm_head(&self) -> &Matrix {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same bits, or both NaN.
    fn same(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    /// Q4_1 and Q8_0 blocks with every nibble and byte value, and scales and minima that are
    /// zero, subnormal, large, infinite or NaN (every pair of them for Q4_1).
    fn special_blocks() -> (Vec<BlockQ4_1>, Vec<BlockQ8_0>) {
        let specials = [0.0, -0.0, 1.0, -0.5, 6.1e-5, 3.0e-8, 65504.0, f32::INFINITY, f32::NAN, 0.0123];
        let mut q4 = Vec::new();
        let mut q8 = Vec::new();
        for (i, &d) in specials.iter().enumerate() {
            for (j, &m) in specials.iter().enumerate() {
                let qs: [u8; 16] = std::array::from_fn(|t| (t * 17 + i * 3 + j) as u8);
                q4.push(BlockQ4_1 { d: f16::from_f32(d), m: f16::from_f32(m), qs });
            }
            q8.push(BlockQ8_0 {
                d: f16::from_f32(d),
                qs: std::array::from_fn(|t| (t as i32 * 8 - 128 + i as i32) as i8),
            });
        }
        (q4, q8)
    }

    /// Q4_1 and Q8_0 blocks dequantize to ggml's formula, value by value, on the vector path
    /// (whole blocks) and the plain one (ranges that cut blocks), for [`special_blocks`].
    #[test]
    fn blocks_dequantize_to_the_formula() {
        let (q4, q8) = special_blocks();
        let want4: Vec<f32> = q4
            .iter()
            .flat_map(|b| {
                let (d, m) = (b.d.to_f32(), b.m.to_f32());
                let lo = b.qs.map(|q| f32::from(q & 15) * d + m);
                let hi = b.qs.map(|q| f32::from(q >> 4) * d + m);
                lo.into_iter().chain(hi)
            })
            .collect();
        let want8: Vec<f32> = q8.iter().flat_map(|b| b.qs.map(|q| f32::from(q) * b.d.to_f32())).collect();
        for (storage, want) in [(Storage::Q4_1(q4), want4), (Storage::Q8_0(q8), want8)] {
            let n = storage.len();
            assert_eq!(n, want.len());
            for (a, b) in [(0, n), (32, 96), (5, 70), (31, 33), (64, 64)] {
                let mut got = vec![0.0f32; b - a];
                storage.widen_into(a, b, &mut got);
                for (i, (g, w)) in got.iter().zip(&want[a..b]).enumerate() {
                    assert!(same(*g, *w), "{} value {}: {g} vs {w}", storage.type_name(), a + i);
                }
            }
        }
    }

    /// The register layouts of the in-register GEMV kernels hold the blocks' `values` where each
    /// order reads them, for every four consecutive [`special_blocks`].
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn register_layouts_hold_the_blocks_values() {
        use std::arch::x86_64::{__m512, _mm512_storeu_ps};
        fn check<B: QuantBlock>(blocks: &[B], name: &str) {
            let values = |b: &B| {
                let mut v = [0.0f32; BLOCK];
                b.values(&mut v);
                v
            };
            for (i, w) in blocks.windows(4).enumerate() {
                let v: Vec<[f32; BLOCK]> = w.iter().map(values).collect();
                // Lane `l` of register `c` holds value `per · c + l % per` of block `l / per`.
                let check_regs = |regs: &[__m512], per: usize, what: &str| {
                    for (c, &reg) in regs.iter().enumerate() {
                        let mut lanes = [0.0f32; 16];
                        // SAFETY: `lanes` holds sixteen f32.
                        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), reg) };
                        for (l, &got) in lanes.iter().enumerate() {
                            let want = v[l / per][per * c + l % per];
                            assert!(
                                same(got, want),
                                "{name} blocks {i}.. {what} register {c} lane {l}: {got} vs {want}"
                            );
                        }
                    }
                };
                // SAFETY: the CPU has AVX-512 F, AVX2 and F16C (checked by the caller).
                let (pairs, quads) =
                    unsafe { (B::pairs8_avx512(&w[0], &w[1]), B::quads4_avx512([&w[0], &w[1], &w[2], &w[3]])) };
                check_regs(&pairs, 8, "pairs");
                check_regs(&quads, 4, "quads");
            }
        }
        if !crate::kernels::has_avx512() {
            return;
        }
        let (q4, q8) = special_blocks();
        check(&q4, "q4_1");
        check(&q8, "q8_0");
    }

    /// Every f16 and bf16 bit pattern widens to the value `half` gives (NaNs stay NaN).
    #[test]
    fn widening_is_exact_for_every_bit_pattern() {
        let halves: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        let mut wide = vec![0.0f32; halves.len()];
        // Odd offsets and lengths exercise the eight-wide body and the tail.
        for start in [0usize, 3] {
            widen_f16(&halves[start..], &mut wide[start..]);
            for (h, w) in halves[start..].iter().zip(&wide[start..]) {
                let want = h.to_f32();
                assert!(want.to_bits() == w.to_bits() || (want.is_nan() && w.is_nan()), "{h:?}: {w} vs {want}");
            }
        }
        let brains: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).collect();
        widen_bf16(&brains, &mut wide);
        for (b, w) in brains.iter().zip(&wide) {
            let want = b.to_f32();
            assert!(want.to_bits() == w.to_bits() || (want.is_nan() && w.is_nan()), "{b:?}");
        }
    }
}
