//! Model weights, laid out as the forward pass reads them.
//!
//! Matrices keep the 16-bit type of their file (F16, BF16): the kernels widen each row to f32
//! exactly as they read it, so a model computes the same bits as with f32 weights while holding
//! half the memory and streaming half the bytes per decode step. Quantized types are dequantized
//! to f32 at load.

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
}

impl Storage {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            Storage::F32(v) => v.len(),
            Storage::F16(v) => v.len(),
            Storage::BF16(v) => v.len(),
        }
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes per value.
    pub fn value_bytes(&self) -> usize {
        match self {
            Storage::F32(_) => 4,
            Storage::F16(_) | Storage::BF16(_) => 2,
        }
    }

    /// The name of the storage type (`f32`, `f16`, `bf16`).
    pub fn type_name(&self) -> &'static str {
        match self {
            Storage::F32(_) => "f32",
            Storage::F16(_) => "f16",
            Storage::BF16(_) => "bf16",
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

    /// Wraps data of shape `[rows, cols]` in any storage type.
    pub fn from_storage(rows: usize, cols: usize, data: Storage) -> Matrix {
        assert_eq!(data.len(), rows * cols, "matrix data does not match its shape");
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
        self.data.len() * self.data.value_bytes()
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
