//! The closed vocabulary of trace points, in dataflow order.
//!
//! A trace point names one intermediate tensor of a Llama-family forward pass at one token
//! position. The names follow the seed report (`embed_out`, `x_in`, `attn_out`, `mlp_out`) and
//! llama.cpp's `cb(cur, "attn_norm", il)` style. `docs/trace-format.md` maps each one to its
//! llama.cpp, Hugging Face and TransformerLens equivalent.

use std::fmt;
use std::str::FromStr;

/// One named intermediate of the forward pass.
///
/// The declaration order is the dataflow order inside a layer; [`Point::ALL`] lists them so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Point {
    /// Token embedding row, `[hidden]`. Model-global (not per layer).
    EmbedOut,
    /// Residual stream entering the layer, `[hidden]` (TransformerLens `hook_resid_pre`).
    XIn,
    /// RMSNorm before attention, `[hidden]`.
    AttnNorm,
    /// Query projection before RoPE, `[n_heads * head_dim]`.
    Q,
    /// Key projection before RoPE, `[n_kv_heads * head_dim]`.
    K,
    /// Value projection, `[n_kv_heads * head_dim]`.
    V,
    /// Query after RoPE, `[n_heads * head_dim]`.
    QRope,
    /// Key after RoPE (what enters the KV cache), `[n_kv_heads * head_dim]`.
    KRope,
    /// Attention context: softmax(QKᵀ)V before the output projection, `[n_heads * head_dim]`.
    AttnCtx,
    /// Attention output projection result, before the residual add, `[hidden]`.
    AttnOut,
    /// Residual stream after attention: `x_in + attn_out`, `[hidden]`.
    XMid,
    /// RMSNorm before the MLP, `[hidden]`.
    MlpNorm,
    /// Gate projection, `[ffn]`.
    Gate,
    /// Up projection, `[ffn]`.
    Up,
    /// `silu(gate) * up`: the input of the down projection, `[ffn]`.
    Act,
    /// Down projection result, before the residual add, `[hidden]`.
    MlpOut,
    /// Final RMSNorm after the last layer, `[hidden]`. Model-global.
    FinalNorm,
    /// LM head output, `[vocab]`. Model-global.
    Logits,
}

impl Point {
    /// Every point, in dataflow order.
    pub const ALL: [Point; 18] = [
        Point::EmbedOut,
        Point::XIn,
        Point::AttnNorm,
        Point::Q,
        Point::K,
        Point::V,
        Point::QRope,
        Point::KRope,
        Point::AttnCtx,
        Point::AttnOut,
        Point::XMid,
        Point::MlpNorm,
        Point::Gate,
        Point::Up,
        Point::Act,
        Point::MlpOut,
        Point::FinalNorm,
        Point::Logits,
    ];

    /// The per-layer points, in dataflow order.
    pub const PER_LAYER: [Point; 15] = [
        Point::XIn,
        Point::AttnNorm,
        Point::Q,
        Point::K,
        Point::V,
        Point::QRope,
        Point::KRope,
        Point::AttnCtx,
        Point::AttnOut,
        Point::XMid,
        Point::MlpNorm,
        Point::Gate,
        Point::Up,
        Point::Act,
        Point::MlpOut,
    ];

    /// The stable name written in traces.
    pub const fn as_str(self) -> &'static str {
        match self {
            Point::EmbedOut => "embed_out",
            Point::XIn => "x_in",
            Point::AttnNorm => "attn_norm",
            Point::Q => "q",
            Point::K => "k",
            Point::V => "v",
            Point::QRope => "q_rope",
            Point::KRope => "k_rope",
            Point::AttnCtx => "attn_ctx",
            Point::AttnOut => "attn_out",
            Point::XMid => "x_mid",
            Point::MlpNorm => "mlp_norm",
            Point::Gate => "gate",
            Point::Up => "up",
            Point::Act => "act",
            Point::MlpOut => "mlp_out",
            Point::FinalNorm => "final_norm",
            Point::Logits => "logits",
        }
    }

    /// Position in [`Point::ALL`]: the dataflow rank used for ordering.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Whether the point exists once per layer (`false` for `embed_out`, `final_norm`, `logits`).
    pub const fn is_per_layer(self) -> bool {
        !matches!(self, Point::EmbedOut | Point::FinalNorm | Point::Logits)
    }

    /// Parses a trace name; `None` for names outside the vocabulary.
    pub fn parse(name: &str) -> Option<Point> {
        // A match compiles to a switch on length and bytes: this runs once per event.
        Some(match name {
            "embed_out" => Point::EmbedOut,
            "x_in" => Point::XIn,
            "attn_norm" => Point::AttnNorm,
            "q" => Point::Q,
            "k" => Point::K,
            "v" => Point::V,
            "q_rope" => Point::QRope,
            "k_rope" => Point::KRope,
            "attn_ctx" => Point::AttnCtx,
            "attn_out" => Point::AttnOut,
            "x_mid" => Point::XMid,
            "mlp_norm" => Point::MlpNorm,
            "gate" => Point::Gate,
            "up" => Point::Up,
            "act" => Point::Act,
            "mlp_out" => Point::MlpOut,
            "final_norm" => Point::FinalNorm,
            "logits" => Point::Logits,
            _ => return None,
        })
    }
}

impl fmt::Display for Point {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error for a point name outside the vocabulary.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown trace point `{name}` (known: {known})")]
pub struct UnknownPoint {
    /// The name that was given.
    pub name: String,
    /// The vocabulary, comma-separated.
    pub known: String,
}

impl FromStr for Point {
    type Err = UnknownPoint;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Point::parse(s)
            .ok_or_else(|| UnknownPoint { name: s.to_string(), known: Point::ALL.map(Point::as_str).join(", ") })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_order_is_dataflow() {
        for (i, p) in Point::ALL.iter().enumerate() {
            assert_eq!(p.index(), i);
            assert_eq!(Point::parse(p.as_str()), Some(*p));
            assert_eq!(p.as_str().parse::<Point>().unwrap(), *p);
        }
        assert!(Point::EmbedOut < Point::XIn && Point::MlpOut < Point::FinalNorm);
        assert_eq!(Point::PER_LAYER.len(), Point::ALL.iter().filter(|p| p.is_per_layer()).count());
    }

    #[test]
    fn unknown_name_lists_vocabulary() {
        let err = "attn_scores".parse::<Point>().unwrap_err();
        assert!(err.to_string().contains("`attn_scores`"));
        assert!(err.to_string().contains("embed_out, x_in, attn_norm"));
    }
}
