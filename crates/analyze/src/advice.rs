//! Recommendations derived from the evidence: which op originated the drift, at which layer,
//! under which shapes, and how large the stat deltas are.

use driftscope_trace::{DType, Point};

use crate::analysis::{describe_region, Analysis, Classification, Group, Origin, PairStatus, StatDelta};
use crate::bug_advice::rel;
use crate::dataflow::Node;

/// How large a difference is, judged against the rounding step of the dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    /// The stats agree exactly: a few low-order bits of some elements differ.
    StatsIdentical,
    /// Within a few rounding steps: the signature of a different reduction order.
    Rounding,
    /// Far above rounding: a logic difference (mask, position, cache contents, weights).
    Large,
}

/// The rounding step (machine epsilon) of a dtype; an unknown one is judged as bf16, the
/// coarsest 16-bit step.
pub fn epsilon(dtype: Option<DType>) -> f64 {
    match dtype {
        Some(DType::F32) => f64::from(f32::EPSILON),
        Some(DType::F16) => 2f64.powi(-10),
        Some(DType::BF16) | None => 2f64.powi(-7),
    }
}

/// Judges a stat delta.
pub fn stat_size(delta: &StatDelta, dtype: Option<DType>) -> Size {
    if delta.max_abs_lower_bound == 0.0 {
        Size::StatsIdentical
    } else if delta.rel <= 8.0 * epsilon(dtype) {
        Size::Rounding
    } else {
        Size::Large
    }
}

/// The size of pair `i`'s drift, judged from its dumped rows when there are some (exact), else
/// from its statistics (a lower bound), with a sentence saying which.
///
/// Where the bug tier judged the pair (see [`crate::gross`]), its bound decides between rounding
/// and far above it; elsewhere the dtype's rounding step does.
pub fn size_of(a: &Analysis, i: usize) -> Option<(Size, String)> {
    let p = &a.pairs[i];
    let (dtype, traced) = a.storage_dtype(i);
    let judged = a.judged(i);
    let beyond = |rounding: bool| match judged {
        Some(j) => j.ratio() > 1.0,
        None => !rounding,
    };
    if let Some(m) = p.magnitude.as_deref() {
        let eps = epsilon(dtype);
        let size = if m.n_diff == 0 {
            Size::StatsIdentical
        } else if !beyond(m.max_ulp <= 64 || m.rel_l2 <= 8.0 * eps) {
            Size::Rounding
        } else {
            Size::Large
        };
        let dt = match (dtype, traced) {
            (Some(d), true) => d.as_str().to_string(),
            (Some(d), false) => format!("{} (inferred)", d.as_str()),
            (None, _) => "its dtype".to_string(),
        };
        let sentence = format!(
            "from the dumped rows: max |Δ| = {} at element {} ({} of {} elements differ, by at most {} ULP of {dt}; \
             cosine similarity {:.9}; relative L2 {}), {} rounding",
            rel(m.max_abs),
            m.argmax,
            m.n_diff,
            m.numel,
            m.max_ulp,
            m.cosine,
            rel(m.rel_l2),
            if size == Size::Large { "far above" } else { "of the size of" }
        );
        return Some((size, sentence));
    }
    let d = a.delta(p)?;
    let size = match stat_size(&d, dtype) {
        Size::StatsIdentical => Size::StatsIdentical,
        s => {
            if beyond(s == Size::Rounding) {
                Size::Large
            } else {
                Size::Rounding
            }
        }
    };
    let sentence = magnitude_sentence(&d, dtype, traced, size);
    Some((size, format!("from statistics (no dump): {sentence}")))
}

/// A relative size: `0.725%`, or `5.80e-8` when a percentage would round to zero.
fn relative(rel: f64) -> String {
    if rel >= 1e-5 {
        format!("{:.3}%", rel * 100.0)
    } else {
        format!("{rel:.2e}")
    }
}

/// One sentence on the size of a pair's drift, judged as `size` (`traced`: whether the events
/// name the dtype, else it was inferred or assumed).
pub fn magnitude_sentence(delta: &StatDelta, dtype: Option<DType>, traced: bool, size: Size) -> String {
    let dt = match (dtype, traced) {
        (Some(d), true) => d.as_str().to_string(),
        (Some(d), false) => format!("{} (not traced: inferred)", d.as_str()),
        (None, _) => "16-bit (dtype not traced)".to_string(),
    };
    match size {
        Size::StatsIdentical => "min, max and mean agree exactly although the hashes differ: only a few \
             low-order bits of some elements differ"
            .to_string(),
        m => format!(
            "the stats differ by up to {} ({} of the row's largest magnitude; the largest element-wise \
             difference is at least this large), {} the rounding step of {dt} ({})",
            rel(delta.max_abs_lower_bound),
            relative(delta.rel),
            if m == Size::Rounding { "within a few times" } else { "far above" },
            rel(epsilon(dtype)),
        ),
    }
}

/// Recommendations for the analysis, most important first.
pub fn recommendations(a: &Analysis) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(g) = a.first_gross.map(|i| &a.groups[i]) {
        if let Some(o) = &g.gross {
            out.push(format!("**Fix the bug first.** {}", crate::bug_advice::headline(a, g, o)));
            out.extend(crate::bug_advice::bug_recommendations(a, g));
        }
        if g.gross.as_ref().is_some_and(|o| g.first_failure != Some(o.judged.pair)) {
            out.push(
                "Then the rounding drift, which the bug hides: once the bug is fixed, rerun; what still differs \
                 is of rounding size, and the advice below is about it."
                    .to_string(),
            );
        }
    }
    let Some(first) = a.groups.iter().find(|g| g.cause.is_some()) else {
        if a.summary.skipped_lines > 0 {
            out.push(format!(
                "{} unreadable line(s) were skipped (--lenient); the verdict covers only the lines that were read.",
                a.summary.skipped_lines
            ));
        }
        return out;
    };
    advise_group(a, first, &mut out);
    let others: Vec<&Group> = a.groups.iter().filter(|g| g.cause.is_some() && g.cause != first.cause).collect();
    for g in others {
        out.push(format!(
            "Prompt `{}` fails differently ({}): it needs its own look; the advice above is for `{}`.",
            a.prompt_id(g),
            g.cause.unwrap_or("?"),
            a.prompt_id(first)
        ));
    }
    let passing: Vec<&str> = a.groups.iter().filter(|g| g.cause.is_none()).map(|g| a.prompt_id(g)).collect();
    if !passing.is_empty() {
        out.push(format!(
            "Prompt(s) {} pass bitwise: compare their lengths with the failing ones; kernels that switch by \
             sequence length (tile sizes, split counts) often drift only past a threshold.",
            passing.iter().map(|p| format!("`{p}`")).collect::<Vec<_>>().join(", ")
        ));
    }
    if a.summary.skipped_lines > 0 {
        out.push(format!(
            "{} unreadable line(s) were skipped (--lenient): fix the writer so no evidence is lost.",
            a.summary.skipped_lines
        ));
    }
    out
}

fn advise_group(a: &Analysis, g: &Group, out: &mut Vec<String>) {
    let Some(ff) = g.first_failure else {
        out.push(format!(
            "Prompt `{}` has {} pair(s) traced in one phase only: trace the same points in both phases so \
             every pair can be compared.",
            a.prompt_id(g),
            g.missing
        ));
        return;
    };
    if g.gross.as_ref().is_some_and(|o| o.judged.pair == ff) {
        // The first divergence is the bug itself: the bug tier's advice above covers it.
        propagation_advice(a, g, ff, out);
        return;
    }
    let p = &a.pairs[ff];
    let (Some(b), Some(c)) = (a.base(p), a.cand(p)) else { return };
    if p.status == PairStatus::Misaligned {
        out.push(format!(
            "{} compares different tokens (pos_id {} vs {}, token_id {:?} vs {:?}): fix the position/token \
             bookkeeping of the harness or engine before reading any drift.",
            a.pair_name(ff),
            b.pos_id(),
            c.pos_id(),
            b.token_id(),
            c.token_id()
        ));
        return;
    }
    let origin = g.origins.iter().find(|o| o.pair == ff);
    let shapes = format!(
        "`{}` computed this row in a forward call of seq_len {} (step {}), `{}` in one of seq_len {} (step {})",
        a.baseline_label,
        b.seq_len(),
        b.step(),
        a.candidate_label,
        c.seq_len(),
        c.step()
    );
    let (mag, size) = match size_of(a, ff) {
        Some((m, s)) => (Some(m), s),
        None => (None, String::new()),
    };
    match (p.classification, origin) {
        (Some(Classification::Originated), Some(o)) => {
            let which = if o.region.len() == 1 {
                "the op itself computes differently"
            } else {
                "one of these ops computes differently"
            };
            out.push(format!(
                "Drift starts at {}: its traced inputs ({}) match, so {which}: {}. Magnitude: {size}.",
                a.pair_name(ff),
                list_nodes(&o.upstream),
                describe_region(&o.region)
            ));
            if b.seq_len() == c.seq_len() && a.collected.is_diff() {
                out.push(diff_advice(a, o, mag));
            } else {
                out.push(cause_advice(o, mag, &shapes));
            }
            if o.region.len() > 1 {
                out.push(split_advice(o));
            }
            if o.region.iter().any(|n| matches!(n, Node::Layer(_, Point::AttnCtx))) {
                out.push(
                    "The attention step also reads the K/V rows of earlier positions from the cache; this trace \
                     pairs only the last position, and in decode those rows were written by a prefill one token \
                     shorter. If the per-op points all match up to attn_ctx, trace k_rope and v of the earlier \
                     positions too before blaming the attention kernel."
                        .to_string(),
                );
            }
        }
        (Some(Classification::Undetermined), _) => out.push(format!(
            "The first drift, at {}, cannot be placed: its nearest traced upstream point(s) {} are missing or \
             misaligned. Trace them in both phases.",
            a.pair_name(ff),
            list_nodes(a.unknown_upstream(p))
        )),
        _ => out.push(format!(
            "The first drift is at {}, a point outside driftscope's vocabulary, so the dataflow analysis cannot \
             place it; name points as in docs/trace-format.md to get an origin.",
            a.pair_name(ff)
        )),
    }
    propagation_advice(a, g, ff, out);
}

/// For two traces of the same phase: the shapes are equal, so the two runs themselves differ.
fn diff_advice(a: &Analysis, o: &Origin, mag: Option<Size>) -> String {
    let (x, y) = (a.meta_of(false), a.meta_of(true));
    let pairs = [
        ("engine", &x.engine, &y.engine),
        ("device", &x.device, &y.device),
        ("dtype", &x.dtype, &y.dtype),
        ("kernel profile", &x.profile, &y.profile),
        ("model", &x.model, &y.model),
    ];
    let differ: Vec<String> = pairs
        .iter()
        .filter(|(_, p, q)| p != q)
        .map(|(name, p, q)| format!("{name} {} vs {}", p.as_deref().unwrap_or("?"), q.as_deref().unwrap_or("?")))
        .collect();
    let runs = if differ.is_empty() {
        "their run_meta events name no difference (same engine, device, dtype, profile)".to_string()
    } else {
        format!("the runs differ in {}", differ.join("; "))
    };
    let size = if mag == Some(Size::Large) {
        "far above rounding: look for different weights, dtypes or a logic difference"
    } else {
        "of rounding size: the two runs reduce in different orders or round at different points"
    };
    format!(
        "Both traces computed {} with the same shapes, so the difference comes from the runs, not from \
         a shape-dependent kernel choice: {runs}. The difference is {size}.",
        describe_region(&o.region)
    )
}

fn cause_advice(o: &Origin, mag: Option<Size>, shapes: &str) -> String {
    if mag == Some(Size::Large) {
        return format!(
            "The difference is far above rounding, so a reduction order alone is unlikely: look for a logic \
             difference between the two paths in {}: the causal mask, the position used for RoPE, the \
             contents of the KV cache, or different weights/dtypes. ({shapes}.)",
            describe_region(&o.region)
        );
    }
    let why = match o.cause {
        "ATTENTION_COMPUTATION_MISMATCH" | "ATTENTION_KERNEL_MISMATCH" => {
            "attention kernels choose their strategy by shape: tiled flash attention with online softmax for \
             prefill, split-KV flash-decoding (split count chosen from the context length) for decode, and \
             GEMM vs GEMV for the projections. Each reduces in its own order. Make the reduction order \
             independent of the query length: a fixed KV split size (not a fixed number of splits) and \
             batch-invariant matmuls"
        }
        "RMSNORM_MISMATCH" | "FINAL_NORM_MISMATCH" => {
            "the RMSNorm reduction is blocked differently for one row than for many. Use one fixed-order \
             per-row reduction whatever the number of rows"
        }
        "QKV_PROJECTION_MISMATCH"
        | "OUTPUT_PROJECTION_MISMATCH"
        | "GATE_UP_PROJECTION_MISMATCH"
        | "DOWN_PROJECTION_MISMATCH"
        | "LM_HEAD_MISMATCH"
        | "MLP_COMPUTATION_MISMATCH"
        | "OUTPUT_HEAD_MISMATCH" => {
            "matmuls pick GEMV for one row and tiled GEMM (possibly split-K) for many, and accumulate along K in \
             a different order. Use batch-invariant matmul kernels: fixed K tiling and no split-K chosen from \
             the number of rows"
        }
        "ROPE_MISMATCH" => {
            "RoPE is elementwise: with equal inputs a difference means different angles. Compare how each path \
             gets cos/sin (cached table vs on the fly, f32 vs 16-bit) and the position it uses"
        }
        "ACTIVATION_MISMATCH" => {
            "SiLU is elementwise: with equal inputs a difference means a different exp/sigmoid implementation \
             or rounding point in the two paths (fused vs unfused kernels)"
        }
        "RESIDUAL_ADD_MISMATCH" => {
            "an elementwise add of two matching tensors is exact in any order: look for a fused add+norm kernel \
             used by one path only, or a 16-bit rounding applied before the add in one path"
        }
        "EMBEDDING_MISMATCH" => {
            "an embedding lookup is a copy: a difference means different token ids, a different dequantization \
             or dtype conversion in the two paths"
        }
        "NUMERIC_FAULT" => {
            "NaN/Inf appear on one side only: look for overflow (f16 saturates at 65504), a division by a zero \
             norm, or uninitialised cache rows read by one path"
        }
        _ => {
            "the origin spans more than one block: narrow it down by tracing the points between the last \
             match and the first drift"
        }
    };
    format!("Likely cause ({}): {why}. ({shapes}.)", o.cause)
}

fn split_advice(o: &Origin) -> String {
    let untraced: Vec<&Node> = o.region.iter().filter(|n| **n != o.node).collect();
    let layers = match o.layers {
        Some((x, y)) if x == y => format!("layer {x}"),
        Some((x, y)) => format!("layers {x}–{y}"),
        None => "the model-global points".into(),
    };
    let names: Vec<String> = {
        let mut v: Vec<String> = untraced
            .iter()
            .filter_map(|n| match n {
                Node::Layer(_, p) | Node::Global(p) => Some(p.as_str().to_string()),
                Node::LayersAfter(_) => None,
            })
            .collect();
        v.sort_by_key(|s| Point::parse(s).map_or(usize::MAX, Point::index));
        v.dedup();
        v
    };
    if names.is_empty() {
        format!("Trace every layer of {layers} to place the origin.")
    } else {
        format!(
            "To split the {} untraced op(s) in {layers}, trace the points {} there as well: the first of them \
             that drifts with matching inputs is the op to fix.",
            untraced.len(),
            names.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", ")
        )
    }
}

fn propagation_advice(a: &Analysis, g: &Group, ff: usize, out: &mut Vec<String>) {
    let inherited = g.inherited;
    if inherited == 0 {
        return;
    }
    let last =
        g.pairs.clone().rev().find(|&i| matches!(a.pairs[i].status, PairStatus::Drift | PairStatus::NumericFault));
    let (Some(d0), Some(last)) = (a.delta(&a.pairs[ff]), last) else { return };
    let Some(d1) = a.delta(&a.pairs[last]) else { return };
    let trend = if d1.rel > 2.0 * d0.rel {
        "grows"
    } else if d1.rel < 0.5 * d0.rel {
        "shrinks"
    } else {
        "stays about the same"
    };
    out.push(format!(
        "{inherited} downstream pair(s) inherit the drift; the relative stat delta {trend} from {:.2e} at {} \
         to {:.2e} at {}. Fix the origin first: inherited drift disappears with it.",
        d0.rel,
        a.pair_name(ff),
        d1.rel,
        a.pair_name(last)
    ));
}

/// Lists nodes as `x_in[0], attn_out[0]`.
pub fn list_nodes(nodes: &[Node]) -> String {
    if nodes.is_empty() {
        return "the input token ids".to_string();
    }
    nodes.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
}
