//! The bug tier on traces written here, point by point: a row far off while its inputs agree at
//! rounding level is a gross origin named by its bug class; rounding-sized drift is not; the
//! precisions come from run_meta, or from the magnitudes where the trace is silent.

mod support;

use serde_json::Value;
use support::*;

/// The per-layer points in dataflow order, as the trace format names them.
fn per_layer() -> Vec<&'static str> {
    driftscope_trace::Point::PER_LAYER.iter().map(|p| p.as_str()).collect()
}

/// A prefill_last/decode0 trace of one prompt over every point of `layers` layers. `rel(point,
/// layer)` is how much the decode row's min, max, mean and l2 move (0: the same row); `dtype` is
/// written on every event when given; `decode_extra` adds fields to a decode event.
fn build(
    layers: u32,
    meta: &str,
    dtype: Option<&str>,
    rel: impl Fn(&str, u32) -> f64,
    decode_extra: impl Fn(&str, u32) -> String,
) -> String {
    let mut rows: Vec<(&str, u32)> = vec![("embed_out", 0)];
    for l in 0..layers {
        rows.extend(per_layer().into_iter().map(|p| (p, l)));
    }
    rows.extend([("final_norm", 0), ("logits", 0)]);
    let mut text = format!("{meta}\n");
    for phase in ["prefill_last", "decode0"] {
        for (i, &(point, layer)) in rows.iter().enumerate() {
            let r = if phase == "decode0" { rel(point, layer) } else { 0.0 };
            let x = i as f64;
            let f = 1.0 + r;
            let (min, max, mean, l2) =
                (-(0.5 + 0.01 * x) * f, (0.7 + 0.013 * x) * f, 0.001 * (x + 1.0) * f, (3.0 + 0.1 * x) * f);
            let name = format!("{point}/{layer}");
            let hash = if r == 0.0 { h(&name) } else { h(&format!("{name}/decode")) };
            let (step, seq_len) = if phase == "decode0" { (1, 1) } else { (0, 40) };
            let dt = dtype.map(|d| format!(r#","dtype":"{d}""#)).unwrap_or_default();
            let extra = if phase == "decode0" { decode_extra(point, layer) } else { String::new() };
            text.push_str(&format!(
                r#"{{"event":"stage_trace","prompt_id":"p","phase":"{phase}","point":"{point}","layer":{layer},"step":{step},"pos_id":39,"seq_len":{seq_len},"hash":{hash},"min":{min:e},"max":{max:e},"mean":{mean:e},"l2":{l2:e}{dt}{extra}}}"#
            ));
            text.push('\n');
        }
    }
    text
}

const META: &str = r#"{"event":"run_meta","engine":"test","n_layers":3,"dtype":"f32"}"#;

/// Rounding drift from q, k and v of layer 0 on (1e-7), and `bug` relative from `at` of layer 0 on.
fn drift(at: &'static str, bug: f64) -> impl Fn(&str, u32) -> f64 {
    // embed_out comes first of all, final_norm and logits after every layer.
    let order = |p: &str| match p {
        "embed_out" => Some(0),
        "final_norm" | "logits" => None,
        p => per_layer().iter().position(|x| *x == p).map(|i| i + 1),
    };
    move |p: &str, l: u32| {
        let after_bug = l > 0 || order(p).is_none_or(|i| i >= order(at).unwrap_or(0));
        let after_q = l > 0 || order(p).is_none_or(|i| i >= 3);
        if after_bug {
            bug
        } else if after_q {
            1e-7
        } else {
            0.0
        }
    }
}

fn none(_: &str, _: u32) -> String {
    String::new()
}

fn prompt(v: &Value) -> &Value {
    &v["prompts"][0]
}

#[test]
fn a_far_off_attention_output_is_the_gross_origin_and_rounding_stays_second() {
    let (code, v, md, err) = analyze_text(build(3, META, Some("f32"), drift("attn_ctx", 0.3), none).as_bytes(), &[]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(v["root_cause"], "ATTENTION_STATE_MISMATCH");
    assert_eq!(v["rounding_root_cause"], "QKV_PROJECTION_MISMATCH");
    let g = &v["gross_origin"];
    assert_eq!(
        (g["point"].as_str(), g["layer"].as_u64(), g["prompt_id"].as_str()),
        (Some("attn_ctx"), Some(0), Some("p"))
    );
    assert_eq!(g["source"], "stats");
    assert!((g["rel_delta"].as_f64().unwrap() - 0.3).abs() < 1e-9, "{g}");
    // Its inputs (v, q_rope, k_rope) moved by 1e-7: the bound is f32's floor and 8x that.
    assert!((g["inputs_rel_delta"].as_f64().unwrap() - 1e-7).abs() < 1e-12, "{g}");
    assert!((g["bound"].as_f64().unwrap() - (1e-4 + 8e-7)).abs() < 1e-12, "{g}");
    assert_eq!(prompt(&v)["gross_origin"]["class"], "ATTENTION_STATE_MISMATCH");
    assert_eq!(prompt(&v)["rounding_root_cause"], "QKV_PROJECTION_MISMATCH");
    assert_eq!(v["first_failure"]["point"], "q", "the first divergence stays in the verdict");
    for want in [
        "## Verdict: **FAIL** + ROOT_CAUSE: **ATTENTION_STATE_MISMATCH**",
        "Gross origin: `attn_ctx` layer 0 of `p` (ATTENTION_STATE_MISMATCH)",
        "the first divergence is rounding drift (QKV_PROJECTION_MISMATCH)",
        "| Where | `q` layer 0 | `attn_ctx[0]` |",
        "**Fix the bug first.**",
        "**KV cache contents and length.**",
        "**RoPE positions.** Ruled out for the new token",
        "**Causal mask.** The step at position 39 must see keys 0..39",
        "attn_ctx: ✗ DRIFT (propagated from v, q_rope, k_rope) ⚠ GROSS",
    ] {
        assert!(md.contains(want), "missing {want:?} in\n{md}");
    }
}

#[test]
fn rounding_sized_drift_has_no_gross_origin() {
    for (dtype, rel) in [("f32", 5e-5), ("bf16", 0.03), ("f16", 0.01)] {
        let meta = META.replace("f32", dtype);
        let (code, v, md, err) =
            analyze_text(build(3, &meta, Some(dtype), drift("attn_ctx", rel), none).as_bytes(), &[]);
        assert_eq!(code, 1, "{err}");
        assert_eq!(v["gross_origin"], Value::Null, "{dtype} {rel}");
        assert_eq!(v["root_cause"], "QKV_PROJECTION_MISMATCH", "{dtype}");
        assert!(md.contains("No gross origin: every drift is within what rounding explains"), "{md}");
        // The same move twice as far past the floor is a bug.
        let (_, v, _, _) = analyze_text(build(3, &meta, Some(dtype), drift("attn_ctx", 0.25), none).as_bytes(), &[]);
        assert_eq!(v["root_cause"], "ATTENTION_STATE_MISMATCH", "{dtype}");
    }
}

#[test]
fn bug_classes_follow_the_point() {
    let (_, v, md, _) = analyze_text(build(3, META, Some("f32"), drift("q_rope", 0.2), none).as_bytes(), &[]);
    assert_eq!(v["root_cause"], "POSITION_MISMATCH");
    assert_eq!(v["gross_origin"]["point"], "q_rope");
    assert!(md.contains("**RoPE position of the decode step.**"), "{md}");
    let (_, v, md, _) = analyze_text(build(3, META, Some("f32"), drift("up", 0.2), none).as_bytes(), &[]);
    assert_eq!((v["root_cause"].as_str(), v["gross_origin"]["point"].as_str()), (Some("GROSS_DIVERGENCE"), Some("up")));
    assert!(md.contains("computes something else in the two phases"), "{md}");
    // NaN on one side only, with finite inputs.
    let nan = |p: &str, l: u32| if (p, l) == ("attn_ctx", 0) { r#","nan_count":3"#.to_string() } else { String::new() };
    let (_, v, _, _) = analyze_text(build(3, META, Some("f32"), drift("attn_ctx", 0.3), nan).as_bytes(), &[]);
    assert_eq!(
        (v["root_cause"].as_str(), v["gross_origin"]["rel_delta"].as_str()),
        (Some("NUMERIC_FAULT"), Some("Infinity"))
    );
}

#[test]
fn an_untraced_dtype_is_inferred_from_the_magnitudes() {
    let meta = r#"{"event":"run_meta","engine":"test","n_layers":3}"#;
    // Extremes move by 1e-7 somewhere: only f32 does that; 0.3 is then far off.
    let (_, v, md, _) = analyze_text(build(3, meta, None, drift("attn_ctx", 0.3), none).as_bytes(), &[]);
    assert_eq!(v["root_cause"], "ATTENTION_STATE_MISMATCH");
    let p = v["precisions"][0].as_str().unwrap();
    assert!(p.starts_with("rows' storage: f32 (inferred: the smallest move"), "{p}");
    assert!(md.contains("f32 (inferred: the smallest move of a drifting row's min or max is 1.00e-7"), "{md}");
    // Nothing moves by less than 1e-2: the rows drift as bf16 does, and 3% is within it.
    let coarse = |p: &str, l: u32| if drift("attn_ctx", 0.03)(p, l) > 0.0 { 0.03 } else { 0.0 };
    let (_, v, _, _) = analyze_text(build(3, meta, None, coarse, none).as_bytes(), &[]);
    assert_eq!(v["gross_origin"], Value::Null);
    assert!(v["precisions"][0].as_str().unwrap().starts_with("rows' storage: bf16 (inferred"), "{v}");
}

#[test]
fn a_lower_attention_precision_is_inferred_where_the_trace_is_silent() {
    // Attention adds 3e-3 to inputs that differ by 1e-7: more than f32 explains, as a 16-bit KV
    // cache under f32 rows does, and far less than a bug (1e-2 to 1).
    let kv = |p: &str, l: u32| match (p, l) {
        ("embed_out" | "x_in" | "attn_norm", 0) => 0.0,
        ("q" | "k" | "v" | "q_rope" | "k_rope", _) => 1e-7,
        _ => 3e-3,
    };
    let meta = r#"{"event":"run_meta","engine":"test","n_layers":12,"dtype":"f32"}"#;
    let (_, v, md, err) = analyze_text(build(12, meta, Some("f32"), kv, none).as_bytes(), &[]);
    assert_eq!(v["gross_origin"], Value::Null, "{err}{md}");
    let p = v["precisions"][1].as_str().unwrap();
    assert!(p.starts_with("attention (KV cache): f16 (inferred: 1 attention output(s) drift more"), "{p}");
    // Stated, the precision is believed: f32 attention cannot drift by 3e-3.
    let meta = r#"{"event":"run_meta","engine":"test","n_layers":12,"dtype":"f32","kv_cache_dtype":"f32"}"#;
    let (_, v, _, _) = analyze_text(build(12, meta, Some("f32"), kv, none).as_bytes(), &[]);
    assert_eq!((v["gross_origin"]["point"].as_str(), v["gross_origin"]["layer"].as_u64()), (Some("attn_ctx"), Some(0)));
    // And a stated f16 cache explains it without any inference.
    let meta = meta.replace(r#""kv_cache_dtype":"f32""#, r#""kv_cache_dtype":"f16""#);
    let (_, v, _, _) = analyze_text(build(12, &meta, Some("f32"), kv, none).as_bytes(), &[]);
    assert_eq!(v["gross_origin"], Value::Null);
    assert_eq!(v["precisions"][1], "attention (KV cache): f16 (stated by `run_meta.kv_cache_dtype`)");
}
