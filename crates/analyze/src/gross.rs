//! The bug tier: where a drift is far above what rounding explains.
//!
//! A rounding drift starts at a few units in the last place of the precision an op computes in
//! and grows by a bounded factor through each op. A decode-path bug (a dropped KV cache, a wrong
//! RoPE position, a missing cached token, a wrong mask) changes a row by 1e-2 to 1 of its size
//! while that row's inputs still agree at rounding level. So besides the first divergence, each
//! prompt gets a *gross origin*: the first pair in dataflow order whose relative difference `r`
//! exceeds
//!
//! ```text
//! bound = amplification · r_in + floor(precision)
//! ```
//!
//! - `r`: the relative L2 difference `|a - b| / |a|` from dumped rows, or without them the
//!   larger of the statistics' relative deltas (`max(|Δmin|, |Δmax|, |Δmean|)` over the row's
//!   largest magnitude) and `|Δl2| / l2` (both lower bounds).
//! - `r_in`: what the traced inputs' differences explain. From dumps: the largest `r` of the
//!   nearest traced inputs, or for a residual add whose two inputs are traced, the sum of their
//!   absolute differences over the output's norm (a sum can cancel, so relative differences do not
//!   bound it). From statistics, which are lower bounds and can miss an input's drift, the
//!   largest `r` of any traced ancestor. Inputs that match count 0.
//! - `floor`: the rounding floor ([`Precision::floor`]) of the lowest precision among the ops
//!   between the inputs and the pair: the storage dtype, the KV cache's for attention, the
//!   matmuls' input precision for projections.
//!
//! The constants are chosen from measurements (docs/tolerances.md): rounding and kernel drift
//! through every layer of SmolLM2, in every dtype and scenario, stays below the bound; every bug
//! the engine can inject (`--inject`) exceeds it at the op it breaks.

use driftscope_trace::Point;
use rayon::prelude::*;

use crate::analysis::{Analysis, Classification, Group, NodeTable, PairResult, PairStatus, StatDelta, Walk};
use crate::dataflow::Node;
use crate::precision::{infer_storage, Known, Precision};

/// How much one op may amplify its inputs' relative difference by rounding alone, with dumps and
/// with statistics. From dumps the largest factor measured was 3 (a GEMV of SmolLM2's V
/// projection whose input differed in a few elements); from statistics 6 (the extremes of
/// `act = silu(gate) · up`, a product, move by more than those of either factor). Both leave a
/// margin.
pub const AMPLIFICATION: (f64, f64) = (4.0, 8.0);

/// The amplification allowed on a basis.
pub fn amplification(basis: Basis) -> f64 {
    match basis {
        Basis::Dump => AMPLIFICATION.0,
        Basis::Stats => AMPLIFICATION.1,
    }
}

/// Where a pair's magnitudes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Basis {
    /// Dumped rows: exact relative L2.
    Dump,
    /// Event statistics: lower bounds.
    Stats,
}

/// What an op is, for the precision it computes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// Attention over the KV cache (`attn_ctx`).
    Attention,
    /// A matmul (`q`, `k`, `v`, `attn_out`, `gate`, `up`, `mlp_out`, `logits`).
    Matmul,
    /// Norms, RoPE, the activation, residual adds, the embedding.
    Other,
}

impl OpKind {
    /// The kind of a point's own op.
    pub fn of(point: Point) -> OpKind {
        use Point::*;
        match point {
            AttnCtx => OpKind::Attention,
            Q | K | V | AttnOut | Gate | Up | MlpOut | Logits => OpKind::Matmul,
            EmbedOut | XIn | AttnNorm | QRope | KRope | XMid | MlpNorm | Act | FinalNorm => OpKind::Other,
        }
    }
}

/// The precisions the ops of a trace compute in.
#[derive(Debug, Clone, PartialEq)]
pub struct Precisions {
    /// Storage of rows whose events name no dtype.
    pub storage: (Precision, Known),
    /// What attention reads its keys and values in (`None`: the storage dtype).
    pub kv: Option<(Precision, Known)>,
    /// What matmuls convert their inputs to (`None`: the storage dtype).
    pub matmul: Option<(Precision, Known)>,
}

impl Precisions {
    /// The precision of one op whose row is stored in `storage`.
    pub fn of(&self, kind: OpKind, storage: Precision) -> Precision {
        let extra = match kind {
            OpKind::Attention => self.kv.as_ref(),
            OpKind::Matmul => self.matmul.as_ref(),
            OpKind::Other => None,
        };
        extra.map_or(storage, |(p, _)| storage.max(*p))
    }

    /// The lowest precision of the ops in a region.
    pub fn of_region(&self, region: &[Node], storage: Precision) -> Precision {
        let of_node = |n: &Node| match *n {
            Node::Global(p) | Node::Layer(_, p) => self.of(OpKind::of(p), storage),
            // Whole untraced layers hold every kind of op.
            Node::LayersAfter(_) => self.of(OpKind::Attention, storage).max(self.of(OpKind::Matmul, storage)),
        };
        region.iter().map(of_node).max().unwrap_or(storage)
    }

    /// One line per precision, for reports.
    pub fn describe(&self) -> Vec<String> {
        let (p, known) = &self.storage;
        let mut out =
            vec![format!("rows' storage: {} ({}; an event's own dtype comes first)", p.name(), known.describe())];
        for (what, p) in [("attention (KV cache)", &self.kv), ("matmul inputs", &self.matmul)] {
            out.push(match p {
                Some((p, known)) => format!("{what}: {} ({})", p.name(), known.describe()),
                None => format!("{what}: as the rows (the trace states nothing coarser, nor does its drift show it)"),
            });
        }
        out
    }
}

/// One pair judged against its bound.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Judged {
    /// The pair (index into [`Analysis::pairs`]).
    pub pair: usize,
    /// Its relative difference.
    pub rel_delta: f64,
    /// What its traced inputs' differences explain.
    pub inputs_rel_delta: f64,
    /// `amplification · inputs_rel_delta + floor`.
    pub bound: f64,
    /// The precision whose floor was used.
    pub precision: Precision,
    /// Dump or statistics.
    pub basis: Basis,
}

impl Judged {
    /// `rel_delta / bound`: above 1 is gross.
    pub fn ratio(&self) -> f64 {
        self.rel_delta / self.bound
    }
}

/// A prompt's gross origin: the first pair far above what rounding explains.
#[derive(Debug, Clone)]
pub struct GrossOrigin {
    /// The measurement.
    pub judged: Judged,
    /// Its node.
    pub node: Node,
    /// The ops between its traced inputs and it (the node last), in dataflow order.
    pub region: Vec<Node>,
    /// Its nearest traced upstream points that match.
    pub matched: Vec<Node>,
    /// Its nearest traced upstream points that drift (at rounding level), with their `r`.
    pub drifting: Vec<(Node, f64)>,
    /// The bug class: `ATTENTION_STATE_MISMATCH`, `POSITION_MISMATCH`, `NUMERIC_FAULT` or
    /// `GROSS_DIVERGENCE`.
    pub class: &'static str,
}

/// The bug tier's result for one group.
#[derive(Debug, Clone, Default)]
pub struct GroupGross {
    /// The first gross pair in dataflow order.
    pub origin: Option<GrossOrigin>,
    /// The pair that came nearest its bound (or went furthest past it).
    pub largest: Option<Judged>,
    /// The group's first failing pair, judged (when it drifts and its inputs are known).
    pub first: Option<Judged>,
}

/// The precisions of the analysis' traces: what their `run_meta` states, what the weights
/// imply, and for the storage of rows without a dtype what the magnitudes suggest. Attention's
/// and the matmuls' precisions the trace leaves unsaid are inferred later, from the drift itself
/// ([`infer_ops`]).
pub fn stated_precisions(a: &Analysis) -> Precisions {
    let metas = if a.collected.is_diff() { vec![a.meta_of(false), a.meta_of(true)] } else { vec![a.meta_of(false)] };
    let coarsest = |field: &'static str, get: &dyn Fn(&driftscope_trace::RunMeta) -> Option<String>| {
        metas.iter().filter_map(|m| get(m).and_then(|s| Precision::parse(&s))).max().map(|p| (p, Known::Stated(field)))
    };
    let storage = coarsest("run_meta.dtype", &|m| m.dtype.clone())
        .or_else(|| {
            let pairs = a.pairs.iter().filter_map(|p| p.baseline.zip(p.candidate));
            infer_storage(&a.collected.sides, pairs).map(|(d, why)| (Precision::of(d), Known::Inferred(why)))
        })
        .unwrap_or_else(|| {
            let why = "assumed: the trace names no dtype and its magnitudes give no evidence".to_string();
            (Precision::BF16, Known::Assumed(why))
        });
    let kv = coarsest("run_meta.kv_cache_dtype", &|m| m.kv_cache_dtype.clone());
    let matmul = coarsest("run_meta.matmul_input_dtype", &|m| m.matmul_input_dtype.clone()).or_else(|| {
        let w = metas.iter().filter_map(|m| m.weight_dtype.clone()).find(|w| Precision::parse(w).is_some())?;
        let p = Precision::parse(&w)?;
        Some(if p.is_quantized() {
            let why = format!(
                "derived: 8-bit activations assumed for quantized weights (`weight_dtype` {w}), as llama.cpp \
                 quantizes them"
            );
            (Precision::Int8, Known::Derived(why))
        } else {
            (p, Known::Derived(format!("derived: activations assumed at the weights' precision (`weight_dtype` {w})")))
        })
    });
    Precisions { storage, kv, matmul }
}

/// A pair's measurements before any precision is applied.
#[derive(Debug, Clone, Copy)]
struct Measure {
    rel: f64,
    inputs: f64,
    basis: Basis,
    storage: Precision,
    /// Whether all of the node's direct inputs are traced (its region is the node alone).
    direct: bool,
}

/// Measures the drifting pairs of one group, in dataflow order, and hands each to `f` with its
/// local index.
fn measure_group(
    a: &Analysis,
    g: &Group,
    storage: &(dyn Fn(usize) -> Precision + Sync),
    mut f: impl FnMut(usize, &Measure, &NodeTable, &mut Walk),
) {
    let pairs = &a.pairs[g.pairs.clone()];
    let table = NodeTable::new(pairs, &a.graph);
    let mut walk = Walk::default();
    // Each drifting pair's statistics-based difference, and the largest seen upstream of it (its
    // ancestors'): statistics are lower bounds, and an input whose min, max and mean happen not
    // to move can hide the drift it carries.
    let (mut stat, mut envelope) = (vec![0.0f64; pairs.len()], vec![0.0f64; pairs.len()]);
    let mut upstream: Vec<usize> = Vec::new();
    for (j, p) in pairs.iter().enumerate() {
        if !matches!(p.status, PairStatus::Drift | PairStatus::NumericFault) {
            continue;
        }
        let (Some(node), Some(class)) = (p.node, p.classification) else { continue };
        upstream.clear();
        match class {
            Classification::Originated => {}
            Classification::Inherited => upstream.extend(a.inherited_from(p).iter().filter_map(|&n| table.get(n))),
            Classification::Undetermined | Classification::Unplaced => continue,
        }
        stat[j] = rel_delta(a, p, Basis::Stats).unwrap_or(0.0);
        envelope[j] = upstream.iter().map(|&k| stat[k].max(envelope[k])).fold(0.0, f64::max);
        let direct = a.graph.inputs(node).iter().all(|&n| table.get(n).is_some());
        let dump = p.magnitude.is_some() && upstream.iter().all(|&k| pairs[k].magnitude.is_some());
        let basis = if dump { Basis::Dump } else { Basis::Stats };
        let rel = if dump { rel_delta(a, p, basis).unwrap_or(0.0) } else { stat[j] };
        let residual = matches!(node, Node::Layer(_, Point::XMid) | Node::Layer(1.., Point::XIn));
        let inputs = if upstream.iter().any(|&k| pairs[k].status == PairStatus::NumericFault) {
            f64::INFINITY // a numeric fault upstream: inherited, never gross
        } else if residual && direct && dump {
            let norm = p.magnitude.as_deref().map_or(0.0, |m| m.norm);
            let sum: f64 = upstream.iter().filter_map(|&k| pairs[k].magnitude.as_deref()).map(|m| m.diff_l2).sum();
            if norm > 0.0 {
                sum / norm
            } else {
                f64::INFINITY
            }
        } else if dump {
            upstream.iter().filter_map(|&k| rel_delta(a, &pairs[k], Basis::Dump)).fold(0.0, f64::max)
        } else {
            envelope[j]
        };
        let m = Measure { rel, inputs, basis, storage: storage(g.pairs.start + j), direct };
        f(j, &m, &table, &mut walk);
    }
}

/// A pair's relative difference on a basis (infinite for a numeric fault).
pub(crate) fn rel_delta(a: &Analysis, p: &PairResult, basis: Basis) -> Option<f64> {
    if p.status == PairStatus::NumericFault {
        return Some(f64::INFINITY);
    }
    let finite = |x: f64| if x.is_nan() { f64::INFINITY } else { x };
    match basis {
        Basis::Dump => p.magnitude.as_deref().map(|m| finite(m.rel_l2)),
        Basis::Stats => {
            let (b, c) = (a.base(p)?, a.cand(p)?);
            let d = StatDelta::of(b, c);
            let l2 = match (b.l2(), d.d_l2) {
                (Some(n), Some(dl)) if n > 0.0 => dl / n,
                _ => 0.0,
            };
            Some(finite(d.rel.max(l2)))
        }
    }
}

/// The coarsest precision inferred for an op from the magnitudes: a 16-bit KV cache or 16-bit
/// matmul inputs under f32 rows are common (llama.cpp keeps an f16 KV cache by default); anything
/// coarser must be stated, or a bug of a few percent would pass for rounding.
pub const INFER_CAP: Precision = Precision::F16;

/// Infers the precision of attention and of the matmuls where the trace states none. When
/// pairs of that op kind (with all inputs traced) drift more than the rows' dtype explains, and
/// most of them by no more than a coarser precision up to [`INFER_CAP`] explains, the op computes
/// in that precision (an f16 KV cache under f32 rows adds 2.5e-3 at attention); a bug, which
/// changes a row by 1e-2 to 1, exceeds that too and is left to be judged. The precision taken is
/// the finest under which more than half of the exceeding pairs fit.
pub fn infer_ops(a: &Analysis, p: &mut Precisions, storage: &(dyn Fn(usize) -> Precision + Sync)) {
    for kind in [OpKind::Attention, OpKind::Matmul] {
        let slot = match kind {
            OpKind::Attention => &p.kv,
            _ => &p.matmul,
        };
        if slot.is_some() {
            continue;
        }
        let bound = |m: &Measure, q: Precision| {
            amplification(m.basis) * m.inputs + m.storage.max(q).floor(m.basis == Basis::Dump)
        };
        let exceeding: Vec<Measure> = a
            .groups
            .par_iter()
            .flat_map_iter(|g| {
                let mut v = Vec::new();
                measure_group(a, g, storage, |j, m, _, _| {
                    let point = a.pairs[g.pairs.start + j].node.and_then(|n| match n {
                        Node::Global(p) | Node::Layer(_, p) => Some(p),
                        Node::LayersAfter(_) => None,
                    });
                    let of_kind = point.is_some_and(|p| OpKind::of(p) == kind);
                    if of_kind && m.direct && m.inputs.is_finite() && m.rel > bound(m, m.storage) {
                        v.push(*m);
                    }
                });
                v
            })
            .collect();
        let n = exceeding.len();
        let fits = |q: Precision| exceeding.iter().filter(|m| m.rel <= bound(m, q)).count();
        let Some(fit) = Precision::ALL.into_iter().filter(|&q| q <= INFER_CAP).find(|&q| 2 * fits(q) > n) else {
            continue;
        };
        let mut rels: Vec<f64> = exceeding.iter().map(|m| m.rel).collect();
        rels.sort_by(f64::total_cmp);
        let what = if kind == OpKind::Attention { "attention output(s)" } else { "matmul output(s)" };
        let why = format!(
            "inferred: {n} {what} drift more than their rows' dtype and inputs explain (median relative difference \
             {}), {} of them within what {} explains",
            crate::bug_advice::rel(rels[n / 2]),
            fits(fit),
            fit.name()
        );
        let value = Some((fit, Known::Inferred(why)));
        match kind {
            OpKind::Attention => p.kv = value,
            _ => p.matmul = value,
        }
    }
}

/// Judges every group: its gross origin and the pair nearest its bound.
pub fn judge(a: &Analysis, p: &Precisions, storage: &(dyn Fn(usize) -> Precision + Sync)) -> Vec<GroupGross> {
    a.groups
        .par_iter()
        .map(|g| {
            let mut out = GroupGross::default();
            let pairs = &a.pairs[g.pairs.clone()];
            measure_group(a, g, storage, |j, m, table, walk| {
                let i = g.pairs.start + j;
                let Some(node) = pairs[j].node else { return };
                let precision = if m.direct {
                    p.of_region(&[node], m.storage)
                } else {
                    walk.run(&a.graph, node, table, pairs);
                    p.of_region(&walk.region, m.storage)
                };
                let judged = Judged {
                    pair: i,
                    rel_delta: m.rel,
                    inputs_rel_delta: m.inputs,
                    bound: amplification(m.basis) * m.inputs + precision.floor(m.basis == Basis::Dump),
                    precision,
                    basis: m.basis,
                };
                if g.first_failure == Some(i) {
                    out.first = Some(judged);
                }
                if out.largest.is_none_or(|l| judged.ratio() > l.ratio()) && m.inputs.is_finite() {
                    out.largest = Some(judged);
                }
                if out.origin.is_none() && judged.ratio() > 1.0 {
                    walk.run(&a.graph, node, table, pairs);
                    let mut region = walk.region.clone();
                    region.sort_by_key(|n| n.order());
                    let mut matched = walk.matched.clone();
                    matched.sort_by_key(|n| n.order());
                    let mut drifting: Vec<(Node, f64)> = walk
                        .drifting
                        .iter()
                        .filter_map(|&n| table.get(n).map(|k| (n, rel_delta(a, &pairs[k], m.basis).unwrap_or(0.0))))
                        .collect();
                    drifting.sort_by_key(|(n, _)| n.order());
                    let class = bug_class(node, &region, pairs[j].status == PairStatus::NumericFault);
                    out.origin = Some(GrossOrigin { judged, node, region, matched, drifting, class });
                }
            });
            out
        })
        .collect()
}

/// The bug class of a gross origin.
pub fn bug_class(node: Node, region: &[Node], numeric_fault: bool) -> &'static str {
    use Point::*;
    let has = |pts: &[Point]| region.iter().any(|n| matches!(n, Node::Layer(_, p) if pts.contains(p)));
    if numeric_fault {
        "NUMERIC_FAULT"
    } else if matches!(node, Node::Layer(_, QRope | KRope)) {
        "POSITION_MISMATCH"
    } else if has(&[AttnCtx])
        && !has(&[XIn, AttnNorm, Q, K, V])
        && !region.iter().any(|n| matches!(n, Node::LayersAfter(_)))
    {
        "ATTENTION_STATE_MISMATCH"
    } else {
        "GROSS_DIVERGENCE"
    }
}

/// The storage precision of each pair: its events' dtype, else the trace's.
pub fn storage_of(a: &Analysis, fallback: Precision) -> impl Fn(usize) -> Precision + Sync + '_ {
    move |i| a.dtype_of(i).map_or(fallback, Precision::of)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Point::*;

    #[test]
    fn classes_of_gross_origins() {
        let l = |p| Node::Layer(0, p);
        assert_eq!(bug_class(l(AttnCtx), &[l(AttnCtx)], false), "ATTENTION_STATE_MISMATCH");
        assert_eq!(bug_class(l(AttnCtx), &[l(QRope), l(KRope), l(AttnCtx)], false), "ATTENTION_STATE_MISMATCH");
        assert_eq!(bug_class(l(AttnOut), &[l(AttnCtx), l(AttnOut)], false), "ATTENTION_STATE_MISMATCH");
        assert_eq!(bug_class(l(QRope), &[l(QRope)], false), "POSITION_MISMATCH");
        assert_eq!(bug_class(l(AttnOut), &[l(AttnNorm), l(Q), l(AttnCtx), l(AttnOut)], false), "GROSS_DIVERGENCE");
        assert_eq!(bug_class(l(Up), &[l(Up)], false), "GROSS_DIVERGENCE");
        assert_eq!(bug_class(l(AttnCtx), &[l(AttnCtx)], true), "NUMERIC_FAULT");
    }

    #[test]
    fn region_precision_is_the_lowest_of_its_ops() {
        let p = Precisions {
            storage: (Precision::F32, Known::Stated("run_meta.dtype")),
            kv: Some((Precision::F16, Known::Stated("run_meta.kv_cache_dtype"))),
            matmul: Some((Precision::Int8, Known::Stated("run_meta.matmul_input_dtype"))),
        };
        let l = |pt| Node::Layer(3, pt);
        assert_eq!(p.of_region(&[l(AttnCtx)], Precision::F32), Precision::F16);
        assert_eq!(p.of_region(&[l(AttnCtx)], Precision::BF16), Precision::BF16, "storage coarser than the cache");
        assert_eq!(p.of_region(&[l(QRope), l(AttnCtx), l(AttnOut)], Precision::F32), Precision::Int8);
        assert_eq!(p.of_region(&[l(XMid)], Precision::F32), Precision::F32);
        assert_eq!(p.of_region(&[Node::LayersAfter(3)], Precision::F32), Precision::Int8);
    }
}
