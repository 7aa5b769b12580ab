//! The JSON verdict: a stable, machine-readable form of the analysis.
//!
//! Top-level names are an interface (`verdict`, `root_cause`, `total_pairs`, `passed`, `failed`,
//! `missing_pairs`, `breakdown`, `first_failure`, `origin`, `pairs`; the bug tier's
//! `gross_origin`, `rounding_root_cause` and `precisions`, and per prompt `gross_origin` and
//! `largest_excess`); new fields may be added.
//! Hashes are JSON integers, exact. Non-finite statistics are the strings "NaN", "Infinity",
//! "-Infinity", as in the trace format.
//!
//! The verdict of a large trace holds millions of pairs: [`write_verdict`] streams them, one
//! compact object per line, after the pretty-printed summary, without building a document. In a
//! pair, fields that do not apply (a missing side, magnitudes without a dump, the stat deltas of
//! a bitwise-identical pair) are left out.

use std::io::{self, Write};

use rayon::prelude::*;
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::advice::recommendations;
use crate::analysis::{Analysis, Group, Origin, PairResult};
use crate::collect::Side;
use crate::dataflow::Node;

/// Version of the verdict layout.
pub const VERDICT_VERSION: u32 = 1;

/// A statistic: a number, or "NaN" / "Infinity" / "-Infinity".
struct Num(f64);

impl Serialize for Num {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let x = self.0;
        if x.is_nan() {
            s.serialize_str("NaN")
        } else if x.is_infinite() {
            s.serialize_str(if x > 0.0 { "Infinity" } else { "-Infinity" })
        } else {
            s.serialize_f64(x)
        }
    }
}

#[derive(Serialize)]
struct SideJson {
    line: u64,
    step: u64,
    pos_id: u64,
    seq_len: u64,
    hash: u64,
    min: Num,
    max: Num,
    mean: Num,
    #[serde(skip_serializing_if = "Option::is_none")]
    l2: Option<Num>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nan_count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    inf_count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token_id: Option<u64>,
}

fn side(s: Option<&Side>) -> Option<SideJson> {
    s.map(|s| SideJson {
        line: s.line(),
        step: s.step(),
        pos_id: s.pos_id(),
        seq_len: s.seq_len(),
        hash: s.hash,
        min: Num(s.min),
        max: Num(s.max),
        mean: Num(s.mean),
        l2: s.l2().map(Num),
        nan_count: s.nan_count(),
        inf_count: s.inf_count(),
        token_id: s.token_id(),
    })
}

fn nodes(v: &[Node]) -> Value {
    Value::Array(v.iter().map(|n| json!(n.to_string())).collect())
}

fn origin(a: &Analysis, o: &Origin) -> Value {
    let p = &a.pairs[o.pair];
    json!({
        "point": a.collected.point_name(p.key.point),
        "layer": p.key.layer,
        "cause": o.cause,
        "layers": o.layers.map(|(x, y)| json!([x, y])),
        "region": nodes(&o.region),
        "upstream_matching": nodes(&o.upstream),
    })
}

/// A relative difference: a number, or "Infinity" for a numeric fault.
fn rel(x: f64) -> Value {
    serde_json::to_value(Num(x)).unwrap_or(Value::Null)
}

/// A prompt's gross origin: `{point, layer, rel_delta, inputs_rel_delta, source, ...}`.
fn gross_origin(a: &Analysis, g: &Group) -> Value {
    let Some(o) = &g.gross else { return Value::Null };
    let j = &o.judged;
    let p = &a.pairs[j.pair];
    json!({
        "point": a.collected.point_name(p.key.point),
        "layer": p.key.layer,
        "rel_delta": rel(j.rel_delta),
        "inputs_rel_delta": rel(j.inputs_rel_delta),
        "source": j.basis,
        "max_ulp": p.magnitude.as_deref().map(|m| m.max_ulp),
        "class": o.class,
        "bound": rel(j.bound),
        "precision": j.precision.name(),
        "region": nodes(&o.region),
        "upstream_matching": nodes(&o.matched),
        "upstream_drifting": o.drifting.iter().map(|(n, r)| json!({"node": n.to_string(), "rel_delta": rel(*r)})).collect::<Vec<_>>(),
    })
}

/// The pair of a prompt that came nearest its rounding bound.
fn largest_excess(a: &Analysis, g: &Group) -> Value {
    let Some(j) = &g.largest else { return Value::Null };
    let p = &a.pairs[j.pair];
    json!({
        "point": a.collected.point_name(p.key.point),
        "layer": p.key.layer,
        "ratio": rel(j.ratio()),
        "rel_delta": rel(j.rel_delta),
        "inputs_rel_delta": rel(j.inputs_rel_delta),
        "bound": rel(j.bound),
        "precision": j.precision.name(),
        "source": j.basis,
    })
}

fn group_name(a: &Analysis, g: &Group) -> String {
    match g.rank {
        Some(r) => format!("{}#rank{r}", a.prompt_id(g)),
        None => a.prompt_id(g).to_string(),
    }
}

#[derive(Serialize)]
struct KeyJson<'a> {
    prompt_id: &'a str,
    layer: u32,
    point: &'a str,
    rank: Option<u32>,
}

#[derive(Serialize)]
struct PairJson<'a> {
    key: KeyJson<'a>,
    status: crate::analysis::PairStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    classification: Option<crate::analysis::Classification>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tolerance_class: Option<crate::tolerance::TolClass>,
    #[serde(skip_serializing_if = "Option::is_none")]
    drift_class: Option<String>,
    inherited_from: Vec<String>,
    untraced_between: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline: Option<SideJson>,
    #[serde(skip_serializing_if = "Option::is_none")]
    candidate: Option<SideJson>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stat_delta: Option<crate::analysis::StatDelta>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_abs: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_rel: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_ulp: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cosine: Option<Num>,
    #[serde(skip_serializing_if = "Option::is_none")]
    magnitude: Option<&'a crate::magnitude::Magnitude>,
}

fn names(v: &[Node]) -> Vec<String> {
    v.iter().map(|n| n.to_string()).collect()
}

fn pair<'a>(a: &'a Analysis, p: &'a PairResult) -> PairJson<'a> {
    let point = a.collected.point_name(p.key.point);
    let m = p.magnitude.as_deref();
    PairJson {
        key: KeyJson {
            prompt_id: &a.collected.prompts[p.key.prompt as usize],
            layer: p.key.layer,
            point,
            rank: p.key.rank,
        },
        status: p.status,
        classification: p.classification,
        tolerance_class: p.tol_class,
        drift_class: p.status.is_failure().then(|| crate::analysis::drift_class(point, p.status)),
        inherited_from: names(a.inherited_from(p)),
        untraced_between: names(a.untraced_between(p)),
        baseline: side(a.base(p)),
        candidate: side(a.cand(p)),
        stat_delta: a.delta(p).filter(|_| p.status != crate::analysis::PairStatus::Pass),
        max_abs: m.map(|m| m.max_abs),
        max_rel: m.map(|m| m.max_rel),
        max_ulp: m.map(|m| m.max_ulp),
        cosine: m.map(|m| Num(m.cosine)),
        magnitude: m,
    }
}

fn run_meta(a: &Analysis, candidate: bool) -> Value {
    if a.collected.source_of(candidate).metas.is_empty() {
        return Value::Null;
    }
    serde_json::to_value(a.meta_of(candidate)).unwrap_or(Value::Null)
}

/// Writes the verdict: the summary pretty-printed, then `"pairs"` with one compact object per
/// line, streamed.
pub fn write_verdict(a: &Analysis, w: &mut impl Write) -> io::Result<()> {
    let head = serde_json::to_string_pretty(&summary_json(a))?;
    // The summary is an object: reopen it to append the pairs.
    let head = head.trim_end().strip_suffix('}').unwrap_or(&head).trim_end();
    w.write_all(head.as_bytes())?;
    w.write_all(if head.ends_with('{') { b"\n  \"pairs\": [" } else { b",\n  \"pairs\": [" })?;
    // Pairs are serialized on all cores, a block at a time, and written in order.
    const BLOCK: usize = 1 << 16;
    for (b, block) in a.pairs.chunks(BLOCK * rayon::current_num_threads()).enumerate() {
        let parts: Vec<io::Result<Vec<u8>>> = block
            .par_chunks(BLOCK)
            .enumerate()
            .map(|(c, pairs)| {
                let mut buf = Vec::with_capacity(pairs.len() * 512);
                for (i, p) in pairs.iter().enumerate() {
                    buf.extend_from_slice(if b == 0 && c == 0 && i == 0 { b"\n    " } else { b",\n    " });
                    serde_json::to_writer(&mut buf, &pair(a, p))?;
                }
                Ok(buf)
            })
            .collect();
        for part in parts {
            w.write_all(&part?)?;
        }
    }
    w.write_all(if a.pairs.is_empty() { b"]\n}\n" } else { b"\n  ]\n}\n" })
}

/// The whole verdict as a JSON value (for small analyses and tests; [`write_verdict`] streams).
pub fn verdict_json(a: &Analysis) -> Value {
    let mut v = summary_json(a);
    if let Value::Object(m) = &mut v {
        let pairs = a.pairs.iter().map(|p| serde_json::to_value(pair(a, p)).unwrap_or(Value::Null)).collect();
        m.insert("pairs".into(), Value::Array(pairs));
    }
    v
}

/// Everything of the verdict but the pairs.
fn summary_json(a: &Analysis) -> Value {
    let s = &a.summary;
    let breakdown: Map<String, Value> = a.breakdown.iter().map(|(k, n)| (k.clone(), json!(n))).collect();
    let first_failure = a.first_failure.map(|i| {
        let p = &a.pairs[i];
        let (b, c) = (a.base(p), a.cand(p));
        json!({
            "prompt_id": a.collected.prompts[p.key.prompt as usize],
            "point": a.collected.point_name(p.key.point),
            "layer": p.key.layer,
            "rank": p.key.rank,
            "pos_id": b.map(|s| s.pos_id()),
            "candidate_pos_id": c.map(|s| s.pos_id()),
            "baseline_hash": b.map(|s| s.hash),
            "candidate_hash": c.map(|s| s.hash),
            "baseline_line": b.map(|s| s.line()),
            "candidate_line": c.map(|s| s.line()),
            "status": p.status,
            "classification": p.classification,
            "stat_delta": a.delta(p),
        })
    });
    let mut origins = Map::new();
    let mut impacts = Map::new();
    let mut prompts = Vec::new();
    for g in &a.groups {
        let first = g.first_failure.and_then(|ff| g.origins.iter().find(|o| o.pair == ff));
        if g.cause.is_some() {
            let mut o = first.map_or_else(|| json!({}), |o| origin(a, o));
            if let Value::Object(m) = &mut o {
                m.insert("cause".into(), json!(g.cause));
                m.insert(
                    "first_failure".into(),
                    json!(g.first_failure.map(|i| a.pairs[i].node.map(|n| n.to_string()))),
                );
            }
            origins.insert(group_name(a, g), o);
        }
        if let Some(t) = g.token_impact {
            impacts.insert(group_name(a, g), json!(t));
        }
        prompts.push(json!({
            "prompt_id": a.prompt_id(g),
            "rank": g.rank,
            "pairs": g.pairs.len(),
            "passed": g.passed,
            "failed": g.failed,
            "missing": g.missing,
            "root_cause": g.root_cause(),
            "rounding_root_cause": g.cause,
            "origins": g.origins.iter().map(|o| origin(a, o)).collect::<Vec<_>>(),
            "gross_origin": gross_origin(a, g),
            "largest_excess": largest_excess(a, g),
        }));
    }
    json!({
        "format": "driftscope-verdict",
        "version": VERDICT_VERSION,
        "verdict": a.verdict,
        "root_cause": a.root_cause,
        "rounding_root_cause": a.rounding_root_cause,
        "gross_origin": a.first_gross.map_or(Value::Null, |i| {
            let g = &a.groups[i];
            let mut v = gross_origin(a, g);
            if let Value::Object(m) = &mut v {
                m.insert("prompt_id".into(), json!(a.prompt_id(g)));
                m.insert("rank".into(), json!(g.rank));
            }
            v
        }),
        "precisions": a.precisions.describe(),
        "baseline_phase": a.options.baseline,
        "candidate_phase": a.options.candidate,
        "trace": a.collected.source_of(false).path.display().to_string(),
        "candidate_trace": a.collected.is_diff().then(|| a.collected.source_of(true).path.display().to_string()),
        "total_pairs": s.total_pairs,
        "passed": s.passed,
        "failed": s.failed,
        "missing_pairs": s.missing_pairs,
        "misaligned": s.misaligned,
        "numeric_faults": s.numeric_faults,
        "duplicates": s.duplicates,
        "skipped_lines": s.skipped_lines,
        "within_tol": s.within_tol,
        "beyond_tol": s.beyond_tol,
        "policy": a.options.policy,
        "tolerances": a.options.tolerances.source.as_ref().map_or_else(|| "built-in".to_string(), |p| p.display().to_string()),
        "breakdown": breakdown,
        "first_failure": first_failure,
        "origin": origins,
        "token_impact": impacts,
        "magnitude_source": if a.magnitudes_from_dump { "dump" } else { "stats" },
        "dump_notes": a.dump_notes,
        "prompts": prompts,
        "n_layers": { "value": a.graph.n_layers, "exact": a.graph.exact },
        "recommendations": recommendations(a),
        "run_meta": run_meta(a, false),
        "candidate_run_meta": if a.collected.is_diff() { run_meta(a, true) } else { Value::Null },
    })
}
