//! End-to-end tests of the `driftscope` binary.

mod support;

use serde_json::{json, Value};
use support::*;

fn pair<'a>(v: &'a Value, prompt: &str, point: &str, layer: u64) -> &'a Value {
    v["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["key"]["prompt_id"] == prompt && p["key"]["point"] == point && p["key"]["layer"] == layer)
        .unwrap_or_else(|| panic!("no pair {prompt}/{point}/{layer}"))
}

#[test]
fn example_seed_trace_is_up_to_date() {
    let path = repo_root().join("examples/seed-trace.jsonl");
    let want = seed_trace();
    if std::env::var_os("DRIFTSCOPE_BLESS").is_some() {
        std::fs::write(&path, &want).unwrap();
    }
    let got = std::fs::read_to_string(&path).unwrap();
    assert!(got == want, "examples/seed-trace.jsonl is stale: rerun with DRIFTSCOPE_BLESS=1");
}

/// The seed report's numbers, rebuilt from a trace.
#[test]
fn golden_seed_report() {
    let (code, v, md, err) = analyze_text(seed_trace().as_bytes(), &[]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(v["verdict"], "FAIL");
    assert_eq!(v["root_cause"], "ATTENTION_COMPUTATION_MISMATCH");
    assert_eq!((v["total_pairs"].as_u64(), v["passed"].as_u64(), v["failed"].as_u64()), (Some(48), Some(6), Some(42)));
    assert_eq!(v["missing_pairs"], 0);
    assert_eq!(v["breakdown"], json!({"ATTN_OUT_DRIFT": 15, "MLP_OUT_DRIFT": 15, "X_IN_DRIFT": 12}));
    let ff = &v["first_failure"];
    assert_eq!(
        (ff["prompt_id"].as_str(), ff["point"].as_str(), ff["layer"].as_u64()),
        (Some("p0_short"), Some("attn_out"), Some(0))
    );
    assert_eq!(ff["pos_id"], 37);
    // Exact u64s, both above 2^53.
    assert_eq!(ff["baseline_hash"].as_u64(), Some(4144761570523161186));
    assert_eq!(ff["candidate_hash"].as_u64(), Some(10153995460507501903));

    for line in [
        "## Verdict: **FAIL** + ROOT_CAUSE: **ATTENTION_COMPUTATION_MISMATCH**",
        "| **Total Pairs** | 48 |",
        "| **Pass** | 6 (12.5%) |",
        "| **Fail** | 42 (87.5%) |",
        "| **Missing Pairs** | 0 |",
        "| ATTN_OUT_DRIFT | 15 | 31.25% |",
        "| MLP_OUT_DRIFT | 15 | 31.25% |",
        "| X_IN_DRIFT | 12 | 25% |",
        "**Location**: `attn_out` tensor, Layer 0, Prompt `p0_short`, pos_id 37",
        "| **Hash** | 4144761570523161186 | 10153995460507501903 | |",
        "**Host**: MI300X",
        "**Run Mode**: Single SSH Connection",
        "**Date**: 2026-02-07",
        "\"hash\": 10153995460507501903,",
        "\"mean\": -0.0000474128",
        "Prompts `p0_short`, `p1_medium`, `p2_long`:",
        "  ├── x_in: ✓ MATCH (hash identical)",
        "  ├── attn_out: ✗ DRIFT (originated in the untraced ops before it; inputs x_in match)",
        "  └── mlp_out: ✗ DRIFT (propagated from attn_out)",
        "Layers 1, 2, 4, 8:",
        "  ├── x_in: ✗ DRIFT (propagated from the previous traced layer)",
        // Better than the seed: attn_out in layers 1+ inherits drift through x_in.
        "  ├── attn_out: ✗ DRIFT (propagated from x_in)",
        "  └── mlp_out: ✗ DRIFT (propagated from x_in, attn_out)",
        "## Root Cause Analysis",
        "## Recommendations",
    ] {
        assert!(md.contains(line), "report lacks {line:?}\n{md}");
    }
    // The origin is the whole untraced attention block of layer 0, seen from x_in[0].
    let o = &v["origin"]["p0_short"];
    assert_eq!(o["point"], "attn_out");
    assert_eq!(o["layers"], json!([0, 0]));
    assert_eq!(o["upstream_matching"], json!(["x_in[0]"]));
    assert_eq!(o["region"].as_array().unwrap().len(), 8);
    assert_eq!(pair(&v, "p1_medium", "attn_out", 4)["classification"], "INHERITED");
    assert_eq!(pair(&v, "p1_medium", "attn_out", 0)["classification"], "ORIGINATED");
    assert_eq!(pair(&v, "p1_medium", "x_in", 0)["status"], "PASS");
    // Recommendations quote the evidence: the layer, the shapes and the magnitude.
    let recs = v["recommendations"].as_array().unwrap();
    let all: String = recs.iter().map(|r| r.as_str().unwrap()).collect::<Vec<_>>().join("\n");
    assert!(all.contains("seq_len 38") && all.contains("seq_len 1"), "{all}");
    assert!(all.contains("5.22e-5"), "{all}");
    assert!(all.contains("`attn_norm`, `q`, `k`, `v`, `q_rope`, `k_rope`, `attn_ctx`"), "{all}");
}

#[test]
fn event_order_does_not_matter() {
    let text = seed_trace();
    let (_, v1, _, _) = analyze_text(text.as_bytes(), &[]);
    // A fixed pseudo-random permutation, except that the prompts keep their order of first
    // appearance (that order is part of the result: the first failing prompt leads).
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort_by_key(|l| h(l));
    let mut mixed: Vec<&str> = Vec::new();
    for (prompt, _) in SEED_PROMPTS {
        let i = lines.iter().position(|l| l.contains(&format!("\"{prompt}\""))).unwrap();
        mixed.push(lines.remove(i));
    }
    mixed.extend(lines);
    assert_ne!(mixed.join("\n"), text.trim_end());
    let shuffled = mixed.join("\n") + "\n";
    let (code, mut v2, _, err) = analyze_text(shuffled.as_bytes(), &[]);
    assert_eq!(code, 1, "{err}");
    let mut v1 = v1;
    // Line numbers differ; everything else must not.
    for v in [&mut v1, &mut v2] {
        strip_lines(v);
    }
    assert_eq!(v1, v2);
}

fn strip_lines(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|k, _| !k.ends_with("line"));
            m.values_mut().for_each(strip_lines);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_lines),
        _ => {}
    }
}

#[test]
fn pass_trace_exits_zero() {
    let evs = trace(&SEED_PROMPTS, &seed_rows(), |_, _, _| false, 0.0);
    let (code, v, md, err) = analyze_text(join(&evs).as_bytes(), &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(v["verdict"], "PASS");
    assert_eq!(v["root_cause"], Value::Null);
    assert_eq!(v["first_failure"], Value::Null);
    assert_eq!((v["passed"].as_u64(), v["failed"].as_u64()), (Some(48), Some(0)));
    assert!(md.contains("## Verdict: **PASS**"), "{md}");
    assert!(!md.contains("## First Failure"));
}

#[test]
fn stdout_gets_the_report_without_output_flags() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("t.jsonl"), seed_trace()).unwrap();
    let out = driftscope(&["analyze", "t.jsonl"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).starts_with("# driftscope report: `prefill_last` vs `decode0` drift"));
    let out = driftscope(&["analyze", "t.jsonl", "--json", "v.json"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).starts_with("FAIL + ROOT_CAUSE: ATTENTION_COMPUTATION_MISMATCH (42 of 48 pairs fail"));
}

/// Layers 4 and 8 traced; layer 4 matches, x_in of layer 8 drifts: the origin is somewhere in
/// layers 4–7, and the tool must not name an op.
#[test]
fn gap_trace_is_unlocalized_with_the_layer_range() {
    let rows: Vec<(&str, u32)> = [4, 8].iter().flat_map(|&l| [("x_in", l), ("attn_out", l), ("mlp_out", l)]).collect();
    let evs = trace(&[("p", 40)], &rows, |_, _, l| l == 8, 0.002);
    let (code, v, md, err) = analyze_text(join(&evs).as_bytes(), &[]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(v["root_cause"], "UNLOCALIZED");
    assert_eq!(v["origin"]["p"]["point"], "x_in");
    assert_eq!(v["origin"]["p"]["layer"], 8);
    assert_eq!(v["origin"]["p"]["layers"], json!([4, 7]));
    assert_eq!(v["origin"]["p"]["upstream_matching"], json!(["x_in[4]", "attn_out[4]", "mlp_out[4]"]));
    assert!(md.contains("across layers 4–7"), "{md}");
    assert!(md.contains("originated somewhere in untraced layers 4–7; inputs the previous traced layer match"), "{md}");
    assert!(md.contains("Layers not traced: 0–3, 5–7 of 9 or more"), "{md}");
}

/// Every point of layer 0 traced; attn_norm is the first to drift.
#[test]
fn fine_points_name_the_op() {
    let mut rows = vec![("embed_out", 0)];
    rows.extend(driftscope_trace::Point::PER_LAYER.iter().map(|p| (p.as_str(), 0)));
    let evs = trace(&[("p", 12)], &rows, |_, pt, _| !matches!(pt, "embed_out" | "x_in"), 0.001);
    let (code, v, md, err) = analyze_text(join(&evs).as_bytes(), &[]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(v["root_cause"], "RMSNORM_MISMATCH");
    assert_eq!(v["origin"]["p"]["region"], json!(["attn_norm[0]"]));
    assert_eq!(pair(&v, "p", "q", 0)["classification"], "INHERITED");
    assert_eq!(pair(&v, "p", "x_mid", 0)["inherited_from"], json!(["attn_out[0]"]));
    assert!(md.contains("attn_norm: ✗ DRIFT (originated here: inputs match)"), "{md}");
    assert!(md.contains("the op `attention RMSNorm` itself computes differently"), "{md}");

    // Only the attention kernel drifts first: the report warns about the untraced KV cache rows.
    let evs = trace(
        &[("p", 12)],
        &rows,
        |_, pt, _| {
            let i = driftscope_trace::Point::parse(pt).unwrap().index();
            i >= driftscope_trace::Point::AttnCtx.index()
        },
        0.001,
    );
    let (_, v, md, _) = analyze_text(join(&evs).as_bytes(), &[]);
    assert_eq!(v["root_cause"], "ATTENTION_KERNEL_MISMATCH");
    assert!(md.contains("K/V rows of earlier positions"), "{md}");
}

#[test]
fn missing_pairs_error_unless_allowed() {
    let mut evs = trace(&[("p", 9)], &seed_rows(), |_, _, _| false, 0.0);
    let dropped = evs.iter().position(|e| e.phase == "decode0" && e.point == "mlp_out" && e.layer == 2).unwrap();
    evs.remove(dropped);
    let (code, v, _, err) = analyze_text(join(&evs).as_bytes(), &[]);
    assert_eq!(code, 2);
    assert_eq!(v, Value::Null, "no verdict file is written on error");
    let line = evs.iter().position(|e| e.point == "mlp_out" && e.layer == 2).unwrap() + 1;
    assert!(
        err.contains(&format!(
            "trace.jsonl:{line}: `prefill_last` event for prompt `p`, layer 2, point `mlp_out` has no `decode0` event"
        )),
        "{err}"
    );
    let (code, v, md, err) = analyze_text(join(&evs).as_bytes(), &["--allow-missing"]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(v["root_cause"], "MISSING_TRACE");
    assert_eq!(
        (v["missing_pairs"].as_u64(), v["total_pairs"].as_u64(), v["passed"].as_u64()),
        (Some(1), Some(16), Some(15))
    );
    assert!(md.contains("| **Missing Pairs** | 1 |") && md.contains("## Missing Pairs"), "{md}");
    // The streamed verdict lists every pair; fields that do not apply are left out.
    let pairs = v["pairs"].as_array().unwrap();
    assert_eq!(pairs.len(), 16);
    let missing = pair(&v, "p", "mlp_out", 2);
    assert_eq!(missing["status"], "MISSING_CANDIDATE");
    assert!(missing.get("candidate").is_none() && missing["baseline"]["hash"].is_u64(), "{missing}");
    let passing = pair(&v, "p", "x_in", 0);
    assert!(passing.get("stat_delta").is_none() && passing.get("max_abs").is_none(), "{passing}");
}

#[test]
fn timings_go_to_stderr() {
    let evs = trace(&[("p", 9)], &seed_rows(), |_, _, _| false, 0.0);
    let (code, v, _, err) = analyze_text(join(&evs).as_bytes(), &["--timings"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(v["verdict"], "PASS");
    for stage in
        ["timings: read and pair: 32 events", "timings: analyze:", "timings: render the report:", "timings: total:"]
    {
        assert!(err.contains(stage), "{stage} missing in {err}");
    }
}

#[test]
fn misaligned_positions_are_neither_pass_nor_drift() {
    let mut evs = trace(&[("p", 9)], &[("x_in", 0), ("attn_out", 0)], |_, _, _| false, 0.0);
    for e in evs.iter_mut().filter(|e| e.phase == "decode0") {
        e.pos = 10;
    }
    let (code, v, md, err) = analyze_text(join(&evs).as_bytes(), &[]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(v["root_cause"], "MISALIGNED_POSITIONS");
    assert_eq!(pair(&v, "p", "x_in", 0)["status"], "MISALIGNED");
    assert_eq!((v["passed"].as_u64(), v["misaligned"].as_u64()), (Some(0), Some(2)));
    assert_eq!(v["breakdown"]["X_IN_MISALIGNED"], 1);
    assert!(md.contains("✗ MISALIGNED"), "{md}");
}

#[test]
fn nan_on_one_side_is_a_numeric_fault() {
    let mut evs = trace(&[("p", 9)], &seed_rows(), |_, pt, l| !(pt == "embed_out" || (pt == "x_in" && l == 0)), 0.001);
    for e in evs.iter_mut().filter(|e| e.phase == "decode0" && e.point == "attn_out" && e.layer == 0) {
        e.extra = r#","nan_count":3"#.into();
        e.stats[1] = f64::NAN;
    }
    let text = join(&evs).replace("\"max\":NaN", "\"max\":\"NaN\"");
    let (code, v, md, err) = analyze_text(text.as_bytes(), &[]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(v["root_cause"], "NUMERIC_FAULT");
    assert_eq!(pair(&v, "p", "attn_out", 0)["status"], "NUMERIC_FAULT");
    assert_eq!(pair(&v, "p", "attn_out", 0)["candidate"]["max"], "NaN");
    assert_eq!(v["numeric_faults"], 1);
    assert!(md.contains("| nan_count | — | 3 | |"), "{md}");
}

/// Every kind of bad input: exit 2, the file and line named, never a panic.
#[test]
fn bad_input_is_named_with_file_and_line() {
    let good = join(&trace(&[("p", 3)], &[("x_in", 0)], |_, _, _| false, 0.0));
    let ev = good.lines().next().unwrap().to_string();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "malformed JSON",
            format!("{good}{{\"event\":\"stage_trace\",\n").into_bytes(),
            "trace.jsonl:3: stage_trace: EOF while parsing",
        ),
        (
            "missing field",
            format!("{good}{}\n", ev.replace(r#""seq_len":4,"#, "")).into_bytes(),
            "trace.jsonl:3: stage_trace: missing field `seq_len`",
        ),
        (
            "wrong type",
            format!("{good}{}\n", ev.replace(r#""layer":0"#, r#""layer":-1"#)).into_bytes(),
            "trace.jsonl:3: stage_trace: invalid value: integer `-1`, expected u32",
        ),
        (
            "negative hash",
            format!("{}\n", ev.replace(r#""hash":"#, r#""hash":-"#)).into_bytes(),
            "trace.jsonl:1: stage_trace: hash is negative",
        ),
        (
            "fractional hash",
            format!("{}\n", regex_hash(&ev, "12.5")).into_bytes(),
            "trace.jsonl:1: stage_trace: hash is fractional (12.5)",
        ),
        (
            "hash as float",
            format!("{}\n", regex_hash(&ev, "1e3")).into_bytes(),
            "trace.jsonl:1: stage_trace: hash is written with a fraction or exponent",
        ),
        (
            "hash above 2^64-1",
            format!("{}\n", regex_hash(&ev, "18446744073709551616")).into_bytes(),
            "trace.jsonl:1: stage_trace: hash is above 2^64-1",
        ),
        (
            "NaN literal",
            format!("{}\n", ev.replace(r#""mean":"#, r#""mean":NaN,"x":"#)).into_bytes(),
            "trace.jsonl:1: stage_trace: expected value",
        ),
        (
            "Infinity literal",
            format!("{}\n", ev.replace(r#""mean":"#, r#""mean":Infinity,"x":"#)).into_bytes(),
            "trace.jsonl:1: stage_trace: expected value",
        ),
        ("empty file", b"".to_vec(), "trace.jsonl: the trace is empty (no events)"),
        (
            "non-UTF-8",
            [good.as_bytes(), b"{\"event\":\"stage_trace\",\"prompt_id\":\"\xff\xfe\"}\n"].concat(),
            "trace.jsonl:3: not valid UTF-8",
        ),
        (
            "truncated last line",
            format!("{good}{}", &ev[..ev.len() - 20]).into_bytes(),
            "trace.jsonl:3: truncated last line",
        ),
        (
            "phase absent",
            good.lines().next().unwrap().as_bytes().to_vec(),
            "no `decode0` events (phases present: prefill_last (1))",
        ),
        (
            "duplicate",
            format!("{good}{ev}\n").into_bytes(),
            "trace.jsonl:1 and trace.jsonl:3: two `prefill_last` events for prompt `p`, layer 0, point `x_in`",
        ),
        ("not an object", b"[1,2]\n".to_vec(), "trace.jsonl:1: not a JSON object"),
    ];
    for (what, text, want) in cases {
        let (code, v, _, err) = analyze_text(&text, &[]);
        assert_eq!(code, 2, "{what}: {err}");
        assert!(err.contains(want), "{what}: stderr {err:?} lacks {want:?}");
        assert!(err.starts_with("driftscope: error: "), "{what}: {err}");
        assert!(!err.contains("panicked"), "{what}: {err}");
        assert_eq!(v, Value::Null, "{what}: no verdict written on error");
    }
}

fn regex_hash(ev: &str, new: &str) -> String {
    let start = ev.find(r#""hash":"#).unwrap() + 7;
    let end = start + ev[start..].find(',').unwrap();
    format!("{}{new}{}", &ev[..start], &ev[end..])
}

#[test]
fn lenient_skips_and_lists_bad_lines() {
    let good = join(&trace(&[("p", 3)], &[("x_in", 0), ("q", 0)], |_, pt, _| pt == "q", 0.001));
    let ev = good.lines().next().unwrap();
    let text = format!("{good}not json\n{ev}\n{}", &ev[..30]);
    let (code, v, md, err) = analyze_text(text.as_bytes(), &["--lenient"]);
    assert_eq!(code, 1, "{err}");
    assert_eq!((v["skipped_lines"].as_u64(), v["duplicates"].as_u64()), (Some(2), Some(1)));
    assert!(md.contains("## Skipped Lines (--lenient)"), "{md}");
    assert!(md.contains("`trace.jsonl:5`: expected ident"), "{md}");
    assert!(md.contains("`trace.jsonl:7`: truncated last line"), "{md}");
    assert!(md.contains("line 1 kept, line 6 dropped"), "{md}");
    // q[0] drifts while x_in[0] matches: attn_norm and q lie between, both in the attention block.
    assert_eq!(v["root_cause"], "ATTENTION_COMPUTATION_MISMATCH");
}

#[test]
fn unknown_events_fields_and_points_are_tolerated() {
    let mut evs = trace(&[("p", 3)], &[("x_in", 0), ("attn_scores", 0)], |_, pt, _| pt == "attn_scores", 0.01);
    for e in &mut evs {
        e.extra = r#","vendor":{"k":[1,2,3]},"dtype":"bf16","shape":[576],"l2":1.5"#.into();
    }
    let text = format!("{{\"event\":\"vendor_debug\",\"x\":1}}\n{}", join(&evs));
    let (code, v, _, err) = analyze_text(text.as_bytes(), &[]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(v["breakdown"], json!({"ATTN_SCORES_DRIFT": 1}));
    assert_eq!(pair(&v, "p", "attn_scores", 0)["classification"], "UNPLACED");
    assert_eq!(v["root_cause"], "UNLOCALIZED");
}

#[test]
fn outputs_never_clobber_the_input_or_existing_files_on_error() {
    let dir = tempfile::tempdir().unwrap();
    let trace_path = dir.path().join("t.jsonl");
    std::fs::write(&trace_path, seed_trace()).unwrap();
    let out = driftscope(&["analyze", "t.jsonl", "--report", "./t.jsonl"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("refusing to write ./t.jsonl over the input t.jsonl"), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&trace_path).unwrap(), seed_trace());

    std::fs::write(dir.path().join("bad.jsonl"), "{oops\n").unwrap();
    std::fs::write(dir.path().join("old.md"), "keep me").unwrap();
    let out = driftscope(&["analyze", "bad.jsonl", "--report", "old.md"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(std::fs::read_to_string(dir.path().join("old.md")).unwrap(), "keep me");

    let out = driftscope(&["analyze", "missing.jsonl"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("missing.jsonl: No such file"), "{}", stderr(&out));
}

#[test]
fn help_and_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = driftscope(&["analyze", "--help"], dir.path());
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("--allow-missing"));
    let out = driftscope(&["analyze", "x", "--bogus"], dir.path());
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn several_prompts_that_disagree_are_reported_per_prompt() {
    let rows = seed_rows();
    let evs = trace(
        &SEED_PROMPTS,
        &rows,
        |prompt, pt, l| match prompt {
            "p0_short" => false,
            "p1_medium" => !(pt == "embed_out" || (pt == "x_in" && l == 0)),
            _ => l >= 2 && !(pt == "x_in" && l == 2),
        },
        0.001,
    );
    let (code, v, md, err) = analyze_text(join(&evs).as_bytes(), &[]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(v["root_cause"], "ATTENTION_COMPUTATION_MISMATCH");
    assert_eq!(v["prompts"][0]["root_cause"], Value::Null);
    assert_eq!(v["origin"]["p2_long"]["layer"], 2);
    assert!(v["origin"].get("p0_short").is_none());
    assert!(md.contains("**Prompts disagree**: 2 of 3 prompts fail"), "{md}");
    assert!(md.contains("## Per-Prompt Results"), "{md}");
    assert!(md.contains("| `p0_short` | 37 | 38 / 1 | 16 | 16 | 0 | 0 | — | PASS |"), "{md}");
}

/// The complete example of docs/trace-format.md: the file and the doc agree, and the analysis
/// says what the doc says it does.
#[test]
fn documented_example_analyzes_as_documented() {
    let root = repo_root();
    let example = std::fs::read_to_string(root.join("docs/trace-example.jsonl")).unwrap();
    let doc = std::fs::read_to_string(root.join("docs/trace-format.md")).unwrap();
    assert!(doc.contains(example.trim_end()), "docs/trace-format.md must quote docs/trace-example.jsonl");
    let (code, v, _, err) = analyze_text(example.as_bytes(), &[]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(v["root_cause"], "ATTENTION_COMPUTATION_MISMATCH");
    assert_eq!((v["passed"].as_u64(), v["failed"].as_u64()), (Some(1), Some(1)));
    assert_eq!(v["n_layers"], json!({"value": 30, "exact": true}));
    let d = &v["first_failure"]["stat_delta"];
    assert!((d["max_abs_lower_bound"].as_f64().unwrap() - 3.0517578125e-5).abs() < 1e-12, "{d}");
}

/// Many failing prompts: identical propagation trees are shown once for all of them, and the
/// Drift Growth table keeps the first 20 prompts and says how many more fail.
#[test]
fn many_prompts_share_one_tree_and_a_capped_growth_table() {
    let names: Vec<String> = (0..25).map(|i| format!("q{i:02}")).collect();
    let prompts: Vec<(&str, u64)> = names.iter().map(|n| (n.as_str(), 9)).collect();
    let evs = trace(&prompts, &seed_rows(), |_, pt, l| !(pt == "embed_out" || (pt == "x_in" && l == 0)), 0.001);
    let (code, v, md, err) = analyze_text(join(&evs).as_bytes(), &[]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(v["prompts"].as_array().map(Vec::len), Some(25));
    assert_eq!(md.matches("embed_out: ✓ MATCH").count(), 1, "one tree for all: {md}");
    assert!(md.contains("`q23`, `q24`:\n```\nembed_out: ✓ MATCH"), "{md}");
    assert!(md.contains("| `q19` | 1 |") && !md.contains("| `q20` | 1 |"), "{md}");
    assert!(md.contains("The first 20 failing prompts are shown; 5 more fail"), "{md}");
}

/// Outputs that are not regular files are written into, never replaced: `/dev/null` stays a
/// device, and a FIFO gets the report (issue 16).
#[cfg(unix)]
#[test]
fn outputs_that_are_not_regular_files_are_written_into() {
    use std::os::unix::fs::FileTypeExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("t.jsonl"), seed_trace()).unwrap();
    let out = driftscope(&["analyze", "t.jsonl", "--json", "/dev/null", "--report", "/dev/null"], dir.path());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(std::fs::metadata("/dev/null").unwrap().file_type().is_char_device(), "/dev/null was replaced");
    let fifo = dir.path().join("report.fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read_to_string(fifo).unwrap())
    };
    let out = driftscope(&["analyze", "t.jsonl", "--report", "report.fifo"], dir.path());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(reader.join().unwrap().contains("ROOT_CAUSE: **ATTENTION_COMPUTATION_MISMATCH**"));
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo(), "the FIFO was replaced");
}

/// `-` reads the trace from standard input, and a FIFO is read once, as it streams: the verdict
/// is the file's, the evidence rebuilt from the parsed events (issue 16: "Illegal seek", a hang).
#[cfg(unix)]
#[test]
fn traces_from_stdin_and_fifos_are_read_once() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("t.jsonl"), seed_trace()).unwrap();
    let out = driftscope(&["analyze", "t.jsonl", "--json", "file.json"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    let mut child = Command::new(env!("CARGO_BIN_EXE_driftscope"))
        .args(["analyze", "-", "--json", "stdin.json", "--report", "stdin.md"])
        .current_dir(dir.path())
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(seed_trace().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let read = |name: &str| -> Value {
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join(name)).unwrap()).unwrap();
        v["trace"] = Value::Null;
        v
    };
    assert_eq!(read("stdin.json"), read("file.json"), "the same verdict from standard input");
    let md = std::fs::read_to_string(dir.path().join("stdin.md")).unwrap();
    assert!(md.contains("rebuilt from the fields the analysis parsed"), "{md}");
    assert!(md.contains("\"hash\": 10153995460507501903"), "the evidence keeps the events' values: {md}");

    let fifo = dir.path().join("t.fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let writer = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::write(fifo, seed_trace()).unwrap())
    };
    let out = driftscope(&["analyze", "t.fifo", "--json", "fifo.json", "--report", "fifo.md"], dir.path());
    writer.join().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(read("fifo.json"), read("file.json"));

    let out = driftscope(&["diff", "-", "-"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("only one trace can come from standard input"), "{}", stderr(&out));
    let out = driftscope(&["analyze", "t.jsonl", "--baseline", "decode0", "--candidate", "decode0"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("both name phase `decode0`"), "{}", stderr(&out));
}

/// Dumped rows of one pair that differ in length are an error naming both tensors, for logits
/// (which panicked) and any other point (which compared the shorter prefix) alike (issue 16).
#[test]
fn dumped_rows_of_different_lengths_are_an_error() {
    use driftscope_engine::runner::Dump;
    use driftscope_trace::DType;
    for point in ["logits", "x_in"] {
        let dir = tempfile::tempdir().unwrap();
        let mut dump = Dump::default();
        dump.push("base".into(), &[1.0, 2.0, 3.0, 4.0], DType::F32);
        dump.push("cand".into(), &[1.0, 2.0, 3.5], DType::F32);
        std::fs::write(dir.path().join("t.safetensors"), dump.to_bytes().unwrap()).unwrap();
        let ev = |phase: &str, hash: u64, tensor: &str| {
            format!(
                r#"{{"event":"stage_trace","prompt_id":"p","phase":"{phase}","point":"{point}","layer":0,"step":0,"pos_id":3,"seq_len":4,"hash":{hash},"min":1,"max":4,"mean":2.5,"dtype":"f32","tensor":"{tensor}"}}"#
            )
        };
        std::fs::write(
            dir.path().join("t.jsonl"),
            format!("{}\n{}\n", ev("prefill_last", 1, "base"), ev("decode0", 2, "cand")),
        )
        .unwrap();
        let out = driftscope(&["analyze", "t.jsonl"], dir.path());
        assert_eq!(out.status.code(), Some(2), "{point}: {}", stdout(&out));
        let err = stderr(&out);
        assert!(err.contains("`base` has 4 values, `cand` has 3"), "{point}: {err}");
        assert!(err.contains("t.safetensors"), "{err}");
    }
}
