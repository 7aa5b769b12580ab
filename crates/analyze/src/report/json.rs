//! The JSON verdict: a stable, machine-readable form of the analysis.
//!
//! Top-level names are an interface (`verdict`, `root_cause`, `total_pairs`, `passed`, `failed`,
//! `missing_pairs`, `breakdown`, `first_failure`, `origin`, `pairs`); new fields may be added.
//! Hashes are JSON integers, exact. Non-finite statistics are the strings "NaN", "Infinity",
//! "-Infinity", as in the trace format.

use serde_json::{json, Map, Value};

use crate::advice::recommendations;
use crate::analysis::{Analysis, Group, Origin, PairResult};
use crate::collect::Side;
use crate::dataflow::Node;

/// Version of the verdict layout.
pub const VERDICT_VERSION: u32 = 1;

fn num(x: f64) -> Value {
    if x.is_nan() {
        json!("NaN")
    } else if x.is_infinite() {
        json!(if x > 0.0 { "Infinity" } else { "-Infinity" })
    } else {
        json!(x)
    }
}

fn side(s: Option<Side>) -> Value {
    match s {
        None => Value::Null,
        Some(s) => json!({
            "line": s.loc.line,
            "step": s.step,
            "pos_id": s.pos_id,
            "seq_len": s.seq_len,
            "hash": s.hash,
            "min": num(s.min),
            "max": num(s.max),
            "mean": num(s.mean),
            "l2": s.l2.map(num),
            "nan_count": s.nan_count,
            "inf_count": s.inf_count,
            "token_id": s.token_id,
        }),
    }
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

fn group_name(a: &Analysis, g: &Group) -> String {
    match g.rank {
        Some(r) => format!("{}#rank{r}", a.prompt_id(g)),
        None => a.prompt_id(g).to_string(),
    }
}

fn pair(a: &Analysis, p: &PairResult) -> Value {
    let drift_class =
        p.status.is_failure().then(|| crate::analysis::drift_class(a.collected.point_name(p.key.point), p.status));
    json!({
        "key": {
            "prompt_id": a.collected.prompts[p.key.prompt as usize],
            "layer": p.key.layer,
            "point": a.collected.point_name(p.key.point),
            "rank": p.key.rank,
        },
        "status": p.status,
        "classification": p.classification,
        "tolerance_class": p.tol_class,
        "drift_class": drift_class,
        "inherited_from": nodes(p.inherited_from()),
        "untraced_between": nodes(p.untraced_between()),
        "baseline": side(a.base(p)),
        "candidate": side(a.cand(p)),
        "stat_delta": a.delta(p),
        "max_abs": p.magnitude.as_ref().map(|m| m.max_abs),
        "max_rel": p.magnitude.as_ref().map(|m| m.max_rel),
        "max_ulp": p.magnitude.as_ref().map(|m| m.max_ulp),
        "cosine": p.magnitude.as_ref().map(|m| num(m.cosine)),
        "magnitude": p.magnitude,
    })
}

fn run_meta(a: &Analysis, candidate: bool) -> Value {
    if a.collected.source_of(candidate).metas.is_empty() {
        return Value::Null;
    }
    serde_json::to_value(a.meta_of(candidate)).unwrap_or(Value::Null)
}

/// Builds the verdict document.
pub fn verdict_json(a: &Analysis) -> Value {
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
            "pos_id": b.map(|s| s.pos_id),
            "candidate_pos_id": c.map(|s| s.pos_id),
            "baseline_hash": b.map(|s| s.hash),
            "candidate_hash": c.map(|s| s.hash),
            "baseline_line": b.map(|s| s.loc.line),
            "candidate_line": c.map(|s| s.loc.line),
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
            "root_cause": g.cause,
            "origins": g.origins.iter().map(|o| origin(a, o)).collect::<Vec<_>>(),
        }));
    }
    json!({
        "format": "driftscope-verdict",
        "version": VERDICT_VERSION,
        "verdict": a.verdict,
        "root_cause": a.root_cause,
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
        "pairs": a.pairs.iter().map(|p| pair(a, p)).collect::<Vec<_>>(),
    })
}
