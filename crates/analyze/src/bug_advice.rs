//! What to do about a gross origin: for each bug class the questions a bug raises (KV cache
//! contents and length, RoPE positions, causal mask, softmax normalization), each with what the
//! trace shows for or against it and by how much.

use driftscope_trace::Point;

use crate::analysis::{Analysis, Group, PairResult};
use crate::dataflow::{op_of, Node};
use crate::dump::{dump_path, DumpFile};
use crate::gross::{rel_delta, Basis, GrossOrigin};

/// A magnitude in words: `1.05e0`, `0` when equal (`inf` for a numeric fault, as `{:e}` writes it).
pub fn rel(x: f64) -> String {
    if x == 0.0 {
        "0".into()
    } else {
        format!("{x:.2e}")
    }
}

/// `relative L2` or `statistics`, for a sentence.
pub fn basis_words(b: Basis) -> &'static str {
    match b {
        Basis::Dump => "relative L2 difference, from the dumped rows",
        Basis::Stats => "relative move of the statistics, a lower bound (no dump)",
    }
}

/// The position of the gross origin's row (the baseline's `pos_id`).
fn pos_of(a: &Analysis, o: &GrossOrigin) -> Option<u64> {
    a.base(&a.pairs[o.judged.pair]).map(|s| s.pos_id())
}

/// The pair of a node in a group, if traced.
fn pair_of<'a>(a: &'a Analysis, g: &Group, n: Node) -> Option<&'a PairResult> {
    a.pairs[g.pairs.clone()].iter().find(|p| p.node == Some(n))
}

/// `` `q_rope[0]` (match), `v[0]` (1.2e-7) `` for the nodes upstream of a gross origin.
pub fn inputs_words(o: &GrossOrigin) -> String {
    let mut parts: Vec<(Node, String)> = o.matched.iter().map(|&n| (n, format!("`{n}` (bitwise equal)"))).collect();
    parts.extend(o.drifting.iter().map(|&(n, r)| (n, format!("`{n}` ({})", rel(r)))));
    parts.sort_by_key(|(n, _)| n.order());
    if parts.is_empty() {
        return "the input tokens".into();
    }
    parts.into_iter().map(|(_, s)| s).collect::<Vec<_>>().join(", ")
}

/// The gross origin in one sentence: where, how much, against what.
pub fn headline(a: &Analysis, g: &Group, o: &GrossOrigin) -> String {
    let j = &o.judged;
    format!(
        "{} differs by {} ({}) while its nearest traced inputs differ by at most {}: {}, far above the {} that \
         {} rounding and their differences explain.",
        a.pair_name(j.pair),
        rel(j.rel_delta),
        basis_words(j.basis),
        rel(j.inputs_rel_delta),
        inputs_words(o),
        rel(j.bound),
        j.precision.name(),
    ) + &match g.first_failure {
        Some(ff) if ff == j.pair => " It is also the first divergence: nothing drifts before it.".to_string(),
        _ => String::new(),
    }
}

/// Whether the decode step's attention output is its own value vector spread over the query
/// heads (it attended to its own key only: no KV cache was read). Reads the two dumped rows of
/// the candidate; returns the best head width and the relative L2 difference for it.
pub fn own_value_fingerprint(a: &Analysis, g: &Group, o: &GrossOrigin) -> Option<(usize, f64)> {
    let Node::Layer(l, Point::AttnCtx) = o.node else { return None };
    let ctx = a.cand(&a.pairs[o.judged.pair])?;
    let v = a.cand(pair_of(a, g, Node::Layer(l, Point::V))?)?;
    let dump = DumpFile::open(&dump_path(&a.collected.source_of(true).path)).ok()??;
    let (ctx, _) = dump.row(&a.collected.tensors[ctx.tensor()? as usize]).ok()??;
    let (v, _) = dump.row(&a.collected.tensors[v.tensor()? as usize]).ok()??;
    if v.is_empty() || ctx.len() % v.len() != 0 {
        return None;
    }
    let group = ctx.len() / v.len(); // query heads per KV head
    let norm: f64 = ctx.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
    (1..=v.len())
        .filter(|d| v.len() % d == 0 && *d >= 16)
        .map(|d| {
            let diff: f64 = ctx
                .chunks(d)
                .enumerate()
                .flat_map(|(h, head)| head.iter().zip(&v[h / group * d..(h / group + 1) * d]))
                .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
                .sum();
            (d, if norm > 0.0 { diff.sqrt() / norm } else { diff.sqrt() })
        })
        .min_by(|x, y| x.1.total_cmp(&y.1))
}

/// The relative difference of a node of the group, on the gross origin's basis.
fn rel_at(a: &Analysis, g: &Group, n: Node, basis: Basis) -> Option<(f64, bool)> {
    let p = pair_of(a, g, n)?;
    let r = rel_delta(a, p, if p.magnitude.is_some() { basis } else { Basis::Stats })?;
    Some((r, p.status.is_failure()))
}

/// The ratio of the candidate's l2 to the baseline's at the gross origin, when traced.
fn norm_ratio(a: &Analysis, o: &GrossOrigin) -> Option<(f64, f64, f64)> {
    let p = &a.pairs[o.judged.pair];
    let (b, c) = (a.base(p)?.l2()?, a.cand(p)?.l2()?);
    (b > 0.0).then(|| (b, c, c / b))
}

/// Recommendations for a group's gross origin, most likely first.
pub fn bug_recommendations(a: &Analysis, g: &Group) -> Vec<String> {
    let Some(o) = &g.gross else { return vec![] };
    let j = &o.judged;
    let layer = match o.node {
        Node::Layer(l, _) => l,
        _ => 0,
    };
    let at = |p: Point| Node::Layer(layer, p);
    let pos = pos_of(a, o).map_or("the traced position".to_string(), |p| p.to_string());
    let keys = pos_of(a, o).map_or("every cached key and its own".to_string(), |p| format!("{} keys", p + 1));
    let cached = match pos_of(a, o) {
        Some(0) => "no cached position (it is the first token)".to_string(),
        Some(1) => "the one cached position 0".to_string(),
        Some(p) => format!("the {p} cached positions 0..{}", p - 1),
        None => "every cached position".to_string(),
    };
    let mut out = vec![];
    match o.class {
        "ATTENTION_STATE_MISMATCH" => {
            let mut kv = format!(
                "**KV cache contents and length.** The step's own inputs to attention agree at rounding level ({}), \
                 yet `{}` differs by {}: it attended to other keys or values than prefill did at position {pos}. \
                 A decode step at position {pos} must read {cached} and its own key ({keys}): check the cache's length before the step, that the prefill filled every row, and that \
                 the step writes its key and value at slot {pos} (not over an earlier one).",
                inputs_words(o),
                o.node,
                rel(j.rel_delta)
            );
            match own_value_fingerprint(a, g, o) {
                Some((d, r)) if r < 1e-2 => kv.push_str(&format!(
                    " Evidence: the decode step's `{}` equals its own `v` spread over the query heads (relative \
                     difference {}, head width {d}): it attended to its own key only — the KV cache was not read at \
                     all (dropped, empty, or a new cache object).",
                    o.node,
                    rel(r)
                )),
                Some((_, r)) => kv.push_str(&format!(
                    " The decode step's `{}` is not its own `v` (relative difference {} at best): it did read cached \
                     keys, so look for a missing or extra row rather than a missing cache.",
                    o.node,
                    rel(r)
                )),
                None => {}
            }
            out.push(kv);
            let ropes = [at(Point::QRope), at(Point::KRope)];
            let traced: Vec<(Node, (f64, bool))> =
                ropes.iter().filter_map(|&n| rel_at(a, g, n, j.basis).map(|r| (n, r))).collect();
            out.push(if traced.len() == 2 {
                format!(
                    "**RoPE positions.** Ruled out for the new token: {} agree at rounding level, so it was rotated \
                     at the right position. A wrong position of the *cached* keys shows only in attention: check \
                     that each cached key was rotated at its own position, not at that of the chunk or step that \
                     wrote it.",
                    traced.iter().map(|(n, (r, _))| format!("`{n}` ({})", rel(*r))).collect::<Vec<_>>().join(" and ")
                )
            } else {
                "**RoPE positions.** Not ruled out: `q_rope` and `k_rope` are not traced, and a new token rotated at \
                 the wrong position changes attention just as much. Trace them (points `q_rope,k_rope`) to tell."
                    .to_string()
            });
            out.push(format!(
                "**Causal mask.** The step at position {pos} must see keys 0..{pos}, itself included; a mask off by \
                 one (`<` for `<=`) hides its own key or the newest cached one, and a mask built for another \
                 length shifts the visible range. The trace cannot show the mask: count the keys the step attends \
                 to ({keys} expected)."
            ));
            let softmax = match norm_ratio(a, o) {
                Some((b, c, ratio)) => format!(
                    " The output's norm is {} in `{}` and {} in `{}` ({ratio:.3}x){}.",
                    rel(b),
                    a.baseline_label,
                    rel(c),
                    a.candidate_label,
                    if (ratio - 1.0).abs() < 0.01 { ": no sign of a scaled output" } else { "" }
                ),
                None => String::new(),
            };
            out.push(format!(
                "**Softmax normalization.** A softmax normalized over another set of keys (a split-KV merge with a \
                 stale maximum or sum, padded or masked slots counted) rescales the output.{softmax}"
            ));
        }
        "POSITION_MISMATCH" => {
            let (name, input) = match o.node {
                Node::Layer(_, Point::KRope) => ("k", at(Point::K)),
                _ => ("q", at(Point::Q)),
            };
            let kept = match norm_ratio(a, o) {
                Some((_, _, ratio)) if (ratio - 1.0).abs() < 1e-3 => format!(
                    "; its norm is unchanged ({:.2e} relative), so the values were rotated, not rescaled: the \
                     signature of other angles",
                    (ratio - 1.0).abs()
                ),
                _ => String::new(),
            };
            out.push(format!(
                "**RoPE position of the decode step.** `{}` differs by {} while `{input}` agrees at rounding level \
                 ({}){kept}. Check the position passed to the step's rotary embedding: it must be {pos}, the token's \
                 index (not {pos}+1, the sequence's length, nor 0), and the cos/sin table it reads (base θ, \
                 scaling, the table's length).",
                o.node,
                rel(j.rel_delta),
                rel(j.inputs_rel_delta)
            ));
            if let Some((r, true)) = rel_at(a, g, at(Point::KRope), j.basis).filter(|_| name == "q") {
                out.push(format!(
                    "`k_rope[{layer}]` differs by {} too: the key the step writes to the cache is rotated wrongly as \
                     well, so every later step attends to it.",
                    rel(r)
                ));
            }
            out.push(
                "**KV cache, causal mask, softmax.** Downstream of the rotation: fix the position first, then \
                 rerun; attention will agree again if nothing else is wrong."
                    .to_string(),
            );
        }
        "NUMERIC_FAULT" => out.push(format!(
            "NaN or Inf appear at {} in one phase only while its inputs are finite ({}): look for overflow (f16 \
             saturates at 65504), a division by a zero norm, or cache rows read before they were written.",
            a.pair_name(j.pair),
            inputs_words(o)
        )),
        _ => {
            let ops: Vec<String> = o.region.iter().map(|&n| format!("{} (`{n}`)", op_of(n).0)).collect();
            out.push(format!(
                "`{}` differs by {} while its nearest traced inputs differ by at most {} ({}): {} computes \
                 something else in the two phases, not the same thing in another order — different weights or a \
                 missing bias, another activation or normalization, a wrong input row or position.",
                o.node,
                rel(j.rel_delta),
                rel(j.inputs_rel_delta),
                inputs_words(o),
                if ops.len() == 1 { ops[0].clone() } else { format!("one of {}", ops.join(" → ")) }
            ));
            if o.region.len() > 1 {
                let names: Vec<&str> = o
                    .region
                    .iter()
                    .filter(|&&n| n != o.node)
                    .filter_map(|n| match n {
                        Node::Layer(_, p) | Node::Global(p) => Some(p.as_str()),
                        Node::LayersAfter(_) => None,
                    })
                    .collect();
                if !names.is_empty() {
                    out.push(format!(
                        "Trace the points in between ({}) to find the op: the first of them far off with inputs that \
                         agree is the bug.",
                        names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
                    ));
                }
            }
        }
    }
    out
}

/// Whether a gross origin's whole neighbourhood was judged from statistics in a 16-bit or
/// coarser precision, where only large bugs stand out (for the report's advice to dump).
pub fn stats_only_coarse(a: &Analysis) -> bool {
    !a.magnitudes_from_dump && a.groups.iter().filter_map(|g| g.largest).any(|j| j.precision.floor(false) > 1e-3)
}
