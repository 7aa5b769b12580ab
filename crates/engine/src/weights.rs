//! Model weights, dequantized to f32 and laid out as the forward pass reads them.

/// A linear layer's weight: `[out, in]` row-major, so each output is one contiguous dot product.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    /// Output features (rows).
    pub rows: usize,
    /// Input features (columns).
    pub cols: usize,
    /// `rows * cols` values.
    pub data: Vec<f32>,
}

impl Matrix {
    /// Wraps data of shape `[rows, cols]`.
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Matrix {
        assert_eq!(data.len(), rows * cols, "matrix data does not match its shape");
        Matrix { rows, cols, data }
    }

    /// Row `r`.
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
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
    /// The LM head (the embedding when tied).
    pub fn lm_head(&self) -> &Matrix {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}
