//! Model weights, laid out as the forward pass reads them.
//!
//! Matrices keep the 16-bit type of their file (F16, BF16): the kernels widen each row to f32
//! exactly as they read it, so a model computes the same bits as with f32 weights while holding
//! half the memory and streaming half the bytes per decode step. Quantized types are dequantized
//! to f32 at load.

use std::borrow::Cow;

use half::slice::HalfFloatSliceExt;
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
            Storage::F16(v) => Cow::Owned(v[a..b].to_f32_vec()),
            Storage::BF16(v) => Cow::Owned(v[a..b].to_f32_vec()),
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
