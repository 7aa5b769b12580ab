//! The dataflow graph of the trace points of a Llama-family forward pass.
//!
//! Each node is one trace point (at one layer); its inputs are the points it is computed from.
//! The analyzer walks this graph upstream from a drifting point to the nearest *traced* points:
//! if they all match, the drift originated in the ops in between; if one drifts, it was inherited.
//!
//! ```text
//! embed_out ─► x_in[0] ─► attn_norm ─► q ─► q_rope ─┐
//!                 │            ├──────► k ─► k_rope ─┼─► attn_ctx ─► attn_out ─┐
//!                 │            └──────► v ──────────┘     (+ KV cache of      │
//!                 │                                        earlier positions) │
//!                 └───────────────────────────────────────────────────► x_mid ◄┘
//! x_mid ─► mlp_norm ─► gate ─┬─► act ─► mlp_out ─┐
//!   │            └───► up ───┘                   ▼
//!   └──────────────────────────────────────► x_in[l+1]  …  final_norm ─► logits
//! ```

use std::fmt;

use driftscope_trace::Point;

/// One node of the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Node {
    /// A point that exists once per model: `embed_out`, `final_norm`, `logits`.
    Global(Point),
    /// A per-layer point at a layer.
    Layer(u32, Point),
    /// The layers after this one, when the trace does not say how many layers the model has.
    LayersAfter(u32),
}

impl Node {
    /// The node of a traced point (the layer of model-global points is ignored).
    pub fn of(point: Point, layer: u32) -> Node {
        if point.is_per_layer() {
            Node::Layer(layer, point)
        } else {
            Node::Global(point)
        }
    }

    /// Sort key in dataflow order: every input sorts before the nodes computed from it.
    pub fn order(self) -> (u8, u32, usize) {
        match self {
            Node::Global(Point::EmbedOut) => (0, 0, 0),
            Node::Global(p) => (2, 0, p.index()),
            Node::Layer(l, p) => (1, l, p.index()),
            Node::LayersAfter(l) => (1, l, usize::MAX),
        }
    }

    /// The layer whose computation produced the node (`x_in[l]` closes layer `l-1`).
    pub fn producing_layer(self) -> Option<u32> {
        match self {
            Node::Layer(l, Point::XIn) => l.checked_sub(1),
            Node::Layer(l, _) => Some(l),
            Node::LayersAfter(l) => Some(l + 1),
            Node::Global(_) => None,
        }
    }
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Node::Global(p) => write!(f, "{p}"),
            Node::Layer(l, p) => write!(f, "{p}[{l}]"),
            Node::LayersAfter(l) => write!(f, "layers after {l}"),
        }
    }
}

/// The model shape the graph needs: how many layers, and whether that number is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Graph {
    /// Number of layers (known, or inferred from the highest traced layer).
    pub n_layers: u32,
    /// Whether `n_layers` came from the trace's `run_meta` (otherwise more layers may follow).
    pub exact: bool,
}

/// The part of the model a node belongs to, for naming an origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Block {
    /// Token embedding.
    Embedding,
    /// Attention sub-block of a layer (`attn_norm` .. `attn_out`).
    Attention(u32),
    /// MLP sub-block of a layer (`mlp_norm` .. `mlp_out`).
    Mlp(u32),
    /// A residual add (elementwise).
    Residual,
    /// Final norm and LM head.
    Head,
    /// Whole untraced layers.
    Layers,
}

impl Graph {
    /// The nodes a node is computed from.
    pub fn inputs(&self, node: Node) -> Inputs {
        use Point::*;
        let last = self.n_layers.saturating_sub(1);
        match node {
            Node::Global(EmbedOut) => Inputs::of(&[]),
            Node::Global(FinalNorm) if self.exact || self.n_layers == 0 => {
                Inputs::of(&[Node::Layer(last, XMid), Node::Layer(last, MlpOut)])
            }
            Node::Global(FinalNorm) => Inputs::of(&[Node::LayersAfter(last)]),
            Node::LayersAfter(l) => Inputs::of(&[Node::Layer(l, XMid), Node::Layer(l, MlpOut)]),
            Node::Global(_) => Inputs::of(&[Node::Global(FinalNorm)]),
            Node::Layer(0, XIn) => Inputs::of(&[Node::Global(EmbedOut)]),
            Node::Layer(l, XIn) => Inputs::of(&[Node::Layer(l - 1, XMid), Node::Layer(l - 1, MlpOut)]),
            Node::Layer(l, p) => {
                let at = |p| Node::Layer(l, p);
                match p {
                    AttnNorm => Inputs::of(&[at(XIn)]),
                    Q | K | V => Inputs::of(&[at(AttnNorm)]),
                    QRope => Inputs::of(&[at(Q)]),
                    KRope => Inputs::of(&[at(K)]),
                    AttnCtx => Inputs::of(&[at(QRope), at(KRope), at(V)]),
                    AttnOut => Inputs::of(&[at(AttnCtx)]),
                    XMid => Inputs::of(&[at(XIn), at(AttnOut)]),
                    MlpNorm => Inputs::of(&[at(XMid)]),
                    Gate | Up => Inputs::of(&[at(MlpNorm)]),
                    Act => Inputs::of(&[at(Gate), at(Up)]),
                    MlpOut => Inputs::of(&[at(Act)]),
                    EmbedOut | XIn | FinalNorm | Logits => Inputs::of(&[]),
                }
            }
        }
    }
}

/// The inputs of a node: at most three, held inline (the origin walk asks for them for every
/// drifting pair).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inputs {
    nodes: [Node; 3],
    len: usize,
}

impl Inputs {
    fn of(list: &[Node]) -> Inputs {
        let mut nodes = [Node::Global(Point::EmbedOut); 3];
        nodes[..list.len()].copy_from_slice(list);
        Inputs { nodes, len: list.len() }
    }
}

impl std::ops::Deref for Inputs {
    type Target = [Node];
    fn deref(&self) -> &[Node] {
        &self.nodes[..self.len]
    }
}

/// What a node's own op is, the block it belongs to and the root cause it names when it alone
/// originates a drift.
pub fn op_of(node: Node) -> (&'static str, Block, &'static str) {
    use Point::*;
    match node {
        Node::Global(EmbedOut) => ("token embedding lookup", Block::Embedding, "EMBEDDING_MISMATCH"),
        Node::Global(FinalNorm) => ("final RMSNorm", Block::Head, "FINAL_NORM_MISMATCH"),
        Node::Global(_) => ("LM head projection", Block::Head, "LM_HEAD_MISMATCH"),
        Node::LayersAfter(_) => ("untraced layers", Block::Layers, "UNLOCALIZED"),
        Node::Layer(0, XIn) => ("embedding handed to layer 0", Block::Embedding, "EMBEDDING_MISMATCH"),
        Node::Layer(_, XIn) => ("residual add x_mid + mlp_out", Block::Residual, "RESIDUAL_ADD_MISMATCH"),
        Node::Layer(l, p) => match p {
            AttnNorm => ("attention RMSNorm", Block::Attention(l), "RMSNORM_MISMATCH"),
            Q => ("Q projection", Block::Attention(l), "QKV_PROJECTION_MISMATCH"),
            K => ("K projection", Block::Attention(l), "QKV_PROJECTION_MISMATCH"),
            V => ("V projection", Block::Attention(l), "QKV_PROJECTION_MISMATCH"),
            QRope => ("RoPE on Q", Block::Attention(l), "ROPE_MISMATCH"),
            KRope => ("RoPE on K", Block::Attention(l), "ROPE_MISMATCH"),
            AttnCtx => (
                "attention kernel (QKᵀ, softmax, ·V over the KV cache)",
                Block::Attention(l),
                "ATTENTION_KERNEL_MISMATCH",
            ),
            AttnOut => ("attention output projection", Block::Attention(l), "OUTPUT_PROJECTION_MISMATCH"),
            XMid => ("residual add x_in + attn_out", Block::Residual, "RESIDUAL_ADD_MISMATCH"),
            MlpNorm => ("MLP RMSNorm", Block::Mlp(l), "RMSNORM_MISMATCH"),
            Gate => ("gate projection", Block::Mlp(l), "GATE_UP_PROJECTION_MISMATCH"),
            Up => ("up projection", Block::Mlp(l), "GATE_UP_PROJECTION_MISMATCH"),
            Act => ("SwiGLU activation silu(gate)·up", Block::Mlp(l), "ACTIVATION_MISMATCH"),
            MlpOut => ("down projection", Block::Mlp(l), "DOWN_PROJECTION_MISMATCH"),
            XIn | EmbedOut | FinalNorm | Logits => ("(global point)", Block::Head, "UNLOCALIZED"),
        },
    }
}

/// The root cause named by a region of ops that, together, originated a drift.
///
/// One op names its own fine cause. Several ops inside one block name the block's cause
/// (residual adds ride along: they only add two tensors that were seen to match). Ops spread
/// over more than one block, or whole untraced layers, are `UNLOCALIZED`.
pub fn cause_of_region(region: &[Node]) -> &'static str {
    if let [only] = region {
        return op_of(*only).2;
    }
    let mut blocks: Vec<Block> = region.iter().map(|&n| op_of(n).1).filter(|b| *b != Block::Residual).collect();
    blocks.sort();
    blocks.dedup();
    match blocks.as_slice() {
        [] => "RESIDUAL_ADD_MISMATCH",
        [Block::Embedding] => "EMBEDDING_MISMATCH",
        [Block::Attention(_)] => "ATTENTION_COMPUTATION_MISMATCH",
        [Block::Mlp(_)] => "MLP_COMPUTATION_MISMATCH",
        [Block::Head] => "OUTPUT_HEAD_MISMATCH",
        _ => "UNLOCALIZED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Point::*;

    #[test]
    fn every_input_sorts_before_its_node() {
        for exact in [true, false] {
            let g = Graph { n_layers: 3, exact };
            let mut nodes: Vec<Node> = vec![Node::Global(EmbedOut), Node::Global(FinalNorm), Node::Global(Logits)];
            for l in 0..3 {
                nodes.extend(Point::PER_LAYER.iter().map(|&p| Node::Layer(l, p)));
            }
            for n in nodes {
                for &i in g.inputs(n).iter() {
                    assert!(i.order() < n.order(), "{i} should precede {n}");
                }
            }
        }
    }

    #[test]
    fn final_norm_sees_unknown_layers_unless_count_is_exact() {
        assert_eq!(Graph { n_layers: 9, exact: false }.inputs(Node::Global(FinalNorm))[..], [Node::LayersAfter(8)]);
        assert_eq!(
            Graph { n_layers: 9, exact: true }.inputs(Node::Global(FinalNorm))[..],
            [Node::Layer(8, XMid), Node::Layer(8, MlpOut)]
        );
    }

    #[test]
    fn region_causes() {
        let l = |p| Node::Layer(2, p);
        assert_eq!(cause_of_region(&[l(AttnNorm)]), "RMSNORM_MISMATCH");
        assert_eq!(cause_of_region(&[l(AttnCtx)]), "ATTENTION_KERNEL_MISMATCH");
        assert_eq!(cause_of_region(&[l(AttnNorm), l(Q), l(AttnOut)]), "ATTENTION_COMPUTATION_MISMATCH");
        assert_eq!(cause_of_region(&[l(XMid), l(MlpNorm), l(MlpOut)]), "MLP_COMPUTATION_MISMATCH");
        assert_eq!(cause_of_region(&[l(XMid)]), "RESIDUAL_ADD_MISMATCH");
        assert_eq!(cause_of_region(&[l(AttnOut), l(MlpOut)]), "UNLOCALIZED");
        assert_eq!(cause_of_region(&[Node::Global(FinalNorm), Node::Global(Logits)]), "OUTPUT_HEAD_MISMATCH");
        assert_eq!(cause_of_region(&[Node::Global(FinalNorm), Node::LayersAfter(3)]), "UNLOCALIZED");
        assert_eq!(Node::Layer(4, XIn).producing_layer(), Some(3));
    }
}
