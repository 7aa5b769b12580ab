//! `driftscope run` and `driftscope check` end to end, on the built-in model.

mod support;

use serde_json::Value;
use support::*;

fn read_json(path: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn check_fast_finds_drift_and_names_the_originating_point() {
    let dir = tempfile::tempdir().unwrap();
    let out = driftscope(&["check"], dir.path());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("FAIL + ROOT_CAUSE: "), "{}", stdout(&out));
    let v = read_json(&dir.path().join("driftscope-out/verdict.json"));
    assert_eq!(v["verdict"], "FAIL");
    assert_eq!(v["total_pairs"], 3 * (3 + 15 * 4));
    assert_eq!(v["missing_pairs"], 0);
    // The embedding is a copy and never drifts; the first drift has an origin in layer 0.
    assert_eq!(v["pairs"][0]["key"]["point"], "embed_out");
    assert_eq!(v["pairs"][0]["status"], "PASS");
    let origin = &v["origin"]["p0_short"];
    assert_eq!(origin["layer"], 0, "{origin}");
    assert_eq!(origin["region"].as_array().unwrap().len(), 1, "all points traced: the origin is one op");
    let md = std::fs::read_to_string(dir.path().join("driftscope-out/report.md")).unwrap();
    assert!(md.contains("**Kernel Profile**: fast") && md.contains("**Engine**: driftscope-engine"), "{md}");
    let trace = std::fs::read_to_string(dir.path().join("driftscope-out/trace.jsonl")).unwrap();
    assert!(trace.starts_with(r#"{"event":"run_meta","format_version":1"#), "{trace:.200}");
    assert!(trace.contains(r#""n_layers":4"#));
}

#[test]
fn check_invariant_passes_bitwise_in_every_dtype() {
    for dtype in ["f32", "bf16", "f16"] {
        let dir = tempfile::tempdir().unwrap();
        let out = driftscope(&["check", "--profile", "invariant", "--dtype", dtype, "--out", "o"], dir.path());
        assert_eq!(out.status.code(), Some(0), "{dtype}: {}{}", stdout(&out), stderr(&out));
        assert!(stdout(&out).starts_with("PASS: all 189 pairs bitwise identical"), "{}", stdout(&out));
        let v = read_json(&dir.path().join("o/verdict.json"));
        assert_eq!((v["passed"].as_u64(), v["failed"].as_u64()), (Some(189), Some(0)));
        let first = &v["pairs"][1]["baseline"];
        assert_eq!(first["seq_len"], 24, "p0_short prefills its 24 byte tokens");
    }
}

#[test]
fn run_traces_the_chosen_prompts_layers_and_points() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("p.jsonl"),
        "{\"id\":\"a\",\"text\":\"hello\"}\n\n{\"id\":\"b\",\"token_ids\":[1,2,3,250]}\n",
    )
    .unwrap();
    let out = driftscope(
        &["run", "--prompts", "p.jsonl", "--layers", "0,2-3", "--points", "x_in,attn_out,logits", "--out", "t.jsonl"],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = std::fs::read_to_string(dir.path().join("t.jsonl")).unwrap();
    let events: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(events[0]["event"], "run_meta");
    let stage: Vec<&Value> = events.iter().filter(|e| e["event"] == "stage_trace").collect();
    // 2 prompts x 2 phases x (3 layers x 2 points + logits)
    assert_eq!(stage.len(), 2 * 2 * 7);
    let b_decode: Vec<&&Value> = stage.iter().filter(|e| e["prompt_id"] == "b" && e["phase"] == "decode0").collect();
    assert!(b_decode.iter().all(|e| e["pos_id"] == 3 && e["seq_len"] == 1 && e["step"] == 1 && e["token_id"] == 250));
    let a_prefill = stage.iter().find(|e| e["prompt_id"] == "a" && e["phase"] == "prefill_last").unwrap();
    assert_eq!((a_prefill["pos_id"].as_u64(), a_prefill["seq_len"].as_u64()), (Some(4), Some(5)));
    let layers: std::collections::BTreeSet<u64> = stage.iter().map(|e| e["layer"].as_u64().unwrap()).collect();
    assert_eq!(layers.into_iter().collect::<Vec<_>>(), [0, 2, 3]);
    // And the trace analyzes: the gaps between traced points are reported, not guessed.
    let out = driftscope(&["analyze", "t.jsonl", "--json", "v.json"], dir.path());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
}

#[test]
fn bad_prompts_and_models_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&[u8], &str); 9] = [
        (b"{\"id\":\"a\"}\n", "p.jsonl: `line 1`: give exactly one of `text` and `token_ids`"),
        (b"{\"id\":\"a\",\"token_ids\":[1,256]}\n", "token id 256 is outside the vocabulary (size 256)"),
        (b"{\"id\":\"a\",\"text\":\"x\"}\n{\"id\":\"a\",\"text\":\"y\"}\n", "`line 2`: prompt id `a` appears twice"),
        (b"{\"id\":\"a\",\"text\":\"\"}\n", "prompt `a`: `text` is empty or only whitespace"),
        (b"{\"id\":\"a\",\"text\":\" \\n\\t \"}\n", "prompt `a`: `text` is empty or only whitespace"),
        (b"{\"id\":\"a\",\"token_ids\":[]}\n", "prompt `a` has no tokens"),
        (b"{\"id\":\" \",\"text\":\"x\"}\n", "`line 1`: the prompt `id` is empty"),
        (
            b"{\"id\":\"a\",\"text\":\"x\"}\n{\"id\":\"b\",\"text\":\"\xff\"}\n",
            "`line 2`: not UTF-8: the byte at column 19",
        ),
        (b"not json\n", "`line 1`: expected ident"),
    ];
    for (text, want) in cases {
        let shown = String::from_utf8_lossy(text);
        std::fs::write(dir.path().join("p.jsonl"), text).unwrap();
        let out = driftscope(&["run", "--prompts", "p.jsonl", "--out", "t.jsonl"], dir.path());
        assert_eq!(out.status.code(), Some(2), "{shown}");
        assert!(stderr(&out).contains(want), "{shown}: {}", stderr(&out));
        assert!(!dir.path().join("t.jsonl").exists(), "no trace written on error");
    }
    let out = driftscope(&["run", "--model", "nope.gguf", "--out", "t.jsonl"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("nope.gguf: no such model file"), "{}", stderr(&out));
    let out = driftscope(&["run", "--layers", "4", "--out", "t.jsonl"], dir.path());
    assert!(stderr(&out).contains("outside the model's layers 0-3"), "{}", stderr(&out));
    // A scenario the prompts cannot run is refused before anything is traced or written.
    std::fs::write(dir.path().join("short.jsonl"), "{\"id\":\"s\",\"text\":\"eight by\"}\n").unwrap();
    let out =
        driftscope(&["check", "--prompts", "short.jsonl", "--scenario", "decode0,decode8", "--out", "d8"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    let want = "`decode8` needs prompts of at least 9 tokens (8 decode steps after a prefill of one); prompt `s` has 8";
    assert!(stderr(&out).contains(want), "{}", stderr(&out));
    assert!(!dir.path().join("d8/report-decode0.md").exists(), "no report written before the error");
    let out = driftscope(&["check", "--scenario", "batch100000", "--out", "b"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("more than the limit of 256"), "{}", stderr(&out));
    let out = driftscope(&["run", "--layers", "3-1", "--out", "t.jsonl"], dir.path());
    assert!(stderr(&out).contains("--layers: `3-1` runs backwards (write `1-3`)"), "{}", stderr(&out));
    std::fs::write(dir.path().join("bad.gguf"), b"GGUF\x03\x00\x00\x00\xff\xff").unwrap();
    let out = driftscope(&["run", "--model", "bad.gguf", "--out", "t.jsonl"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("bad.gguf: not a readable GGUF file"), "{}", stderr(&out));
}

#[test]
fn a_failed_check_leaves_earlier_results_alone() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("o")).unwrap();
    std::fs::write(dir.path().join("o/report.md"), "earlier report").unwrap();
    std::fs::write(dir.path().join("p.jsonl"), "oops\n").unwrap();
    let out = driftscope(&["check", "--prompts", "p.jsonl", "--out", "o"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(std::fs::read_to_string(dir.path().join("o/report.md")).unwrap(), "earlier report");
}

/// `driftscope diff`: the same phase of two runs that differ only in their kernel profile.
#[test]
fn diff_compares_one_phase_across_two_traces() {
    let dir = tempfile::tempdir().unwrap();
    for profile in ["fast", "invariant"] {
        let out = driftscope(&["run", "--profile", profile, "--out", &format!("{profile}.jsonl")], dir.path());
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }
    let out = driftscope(&["diff", "fast.jsonl", "fast.jsonl", "--json", "same.json"], dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("PASS: all 189 pairs bitwise identical"));

    let out = driftscope(
        &["diff", "fast.jsonl", "invariant.jsonl", "--phase", "decode0", "--json", "v.json", "--report", "r.md"],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let v = read_json(&dir.path().join("v.json"));
    assert_eq!((v["trace"].as_str(), v["candidate_trace"].as_str()), (Some("fast.jsonl"), Some("invariant.jsonl")));
    assert_eq!((v["baseline_phase"].as_str(), v["candidate_phase"].as_str()), (Some("decode0"), Some("decode0")));
    // Decode under `fast` is a GEMV, under `invariant` the GEMM order: q, k, v of layer 0 differ.
    assert_eq!(v["root_cause"], "QKV_PROJECTION_MISMATCH");
    let md = std::fs::read_to_string(dir.path().join("r.md")).unwrap();
    assert!(md.starts_with("# driftscope diff: `fast.jsonl` vs `invariant.jsonl`, phase `decode0`"), "{md}");
    assert!(
        md.contains("**Baseline Kernel Profile**: fast") && md.contains("**Candidate Kernel Profile**: invariant"),
        "{md}"
    );
    assert!(md.contains("the runs differ in kernel profile fast vs invariant"), "{md}");
    assert!(
        md.contains("| fast.jsonl (decode0) (step=1, seq_len=1) | invariant.jsonl (decode0) (step=1, seq_len=1) |"),
        "{md}"
    );

    std::fs::write(
        dir.path().join("other.jsonl"),
        std::fs::read_to_string(dir.path().join("fast.jsonl")).unwrap().replace("\"decode0\"", "\"decode1\""),
    )
    .unwrap();
    let out = driftscope(&["diff", "fast.jsonl", "other.jsonl", "--phase", "decode0"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("other.jsonl: no `decode0` events (phases present: decode1 (189), prefill_last (189))"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn check_runs_every_scenario_against_prefill() {
    let dir = tempfile::tempdir().unwrap();
    let out = driftscope(&["check", "--scenario", "decode0,chunk64,prefix_cache", "--out", "f"], dir.path());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("decode0: FAIL") && text.contains("chunk64: FAIL"), "{text}");
    for s in ["decode0", "chunk64", "prefix_cache"] {
        let v = read_json(&dir.path().join(format!("f/verdict-{s}.json")));
        assert_eq!((v["baseline_phase"].as_str(), v["candidate_phase"].as_str()), (Some("prefill_last"), Some(s)));
        assert!(dir.path().join(format!("f/report-{s}.md")).exists());
    }
    // p2_long has 600 tokens: its last chunk of 64 holds 600 - 576 = 24 rows.
    let v = read_json(&dir.path().join("f/verdict-chunk64.json"));
    let last = v["pairs"].as_array().unwrap().iter().find(|p| p["key"]["prompt_id"] == "p2_long").unwrap();
    assert_eq!(last["candidate"]["seq_len"], 24);

    let out = driftscope(
        &["check", "--profile", "invariant", "--scenario", "decode0,chunk64,chunk5,prefix_cache", "--out", "i"],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    assert_eq!(stdout(&out).matches("PASS: all 189 pairs bitwise identical").count(), 4, "{}", stdout(&out));
    let out = driftscope(&["check", "--scenario", "batch1"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("unknown scenario `batch1`"), "{}", stderr(&out));
}

/// With `--dump` the traced rows are written next to the trace, and the analysis reports exact
/// magnitudes and the token impact; without the dump it says it fell back to statistics.
#[test]
fn dumps_give_exact_magnitudes_and_token_impact() {
    let dir = tempfile::tempdir().unwrap();
    let out = driftscope(&["check", "--dump", "--out", "f"], dir.path());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let meta = std::fs::metadata(dir.path().join("f/trace.safetensors")).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o444, 0o444, "results are readable files");
    }
    let v = read_json(&dir.path().join("f/verdict.json"));
    assert_eq!(v["magnitude_source"], "dump");
    let ti = &v["token_impact"]["p2_long"];
    assert!(ti["kl"].as_f64().unwrap() >= 0.0 && ti["max_dlogprob"].as_f64().unwrap() > 0.0, "{ti}");
    let first = v["pairs"].as_array().unwrap().iter().find(|p| p["status"] == "DRIFT").unwrap();
    assert!(first["max_ulp"].as_u64().unwrap() >= 1 && first["max_abs"].as_f64().unwrap() > 0.0, "{first}");
    assert!(first["magnitude"]["n_diff"].as_u64().unwrap() >= 1);
    let passing = v["pairs"].as_array().unwrap().iter().find(|p| p["status"] == "PASS").unwrap();
    assert_eq!((passing["max_abs"].as_f64(), passing["max_ulp"].as_u64()), (Some(0.0), Some(0)));
    let md = std::fs::read_to_string(dir.path().join("f/report.md")).unwrap();
    assert!(
        md.contains("## Token Impact")
            && md.contains("## Drift Growth")
            && md.contains("from the dumped rows: max |Δ|"),
        "{md}"
    );

    let out = driftscope(&["check", "--dump", "--profile", "invariant", "--out", "i"], dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v = read_json(&dir.path().join("i/verdict.json"));
    assert_eq!(v["token_impact"]["p0_short"]["kl"], 0.0);
    assert!(v["token_impact"]["p0_short"]["argmax_agree"].as_bool().unwrap());

    // The dump gone: statistics stand in, and the report says so.
    std::fs::remove_file(dir.path().join("f/trace.safetensors")).unwrap();
    let out = driftscope(&["analyze", "f/trace.jsonl", "--json", "v.json"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    let v = read_json(&dir.path().join("v.json"));
    assert_eq!(v["magnitude_source"], "stats");
    assert!(
        v["dump_notes"][0].as_str().unwrap().contains("f/trace.safetensors` does not exist"),
        "{}",
        v["dump_notes"]
    );
    assert_eq!(v["pairs"][3]["max_abs"], Value::Null);
    // A corrupt dump is an error naming it.
    std::fs::write(dir.path().join("f/trace.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{broken").unwrap();
    let out = driftscope(&["analyze", "f/trace.jsonl"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("f/trace.safetensors: not a safetensors file"), "{}", stderr(&out));
}

#[test]
fn diff_uses_both_dumps() {
    let dir = tempfile::tempdir().unwrap();
    for profile in ["fast", "invariant"] {
        let out =
            driftscope(&["run", "--dump", "--profile", profile, "--out", &format!("{profile}.jsonl")], dir.path());
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }
    let out =
        driftscope(&["diff", "fast.jsonl", "invariant.jsonl", "--phase", "decode0", "--json", "v.json"], dir.path());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let v = read_json(&dir.path().join("v.json"));
    assert_eq!(v["magnitude_source"], "dump");
    assert!(v["token_impact"]["p1_medium"]["kl"].as_f64().unwrap() >= 0.0);
}

/// `--policy tolerance`: rounding-sized drift passes, drift beyond the tolerances fails, and
/// tolerance files with bad values are errors naming the file and key.
#[test]
fn tolerance_policy_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = driftscope(&["check", "--dump", "--policy", "tolerance", "--out", "t"], dir.path());
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).starts_with("PASS (policy: tolerance): 180 of 189 pairs differ within tolerance"),
        "{}",
        stdout(&out)
    );
    let v = read_json(&dir.path().join("t/verdict.json"));
    assert_eq!(
        (v["within_tol"].as_u64(), v["beyond_tol"].as_u64(), v["policy"].as_str()),
        (Some(180), Some(0), Some("tolerance"))
    );
    assert_eq!(v["pairs"][3]["tolerance_class"], "WITHIN_TOL");
    let md = std::fs::read_to_string(dir.path().join("t/report.md")).unwrap();
    assert!(
        md.contains("## Verdict: **PASS** (policy: tolerance)")
            && md.contains("exact differences from the dumped rows"),
        "{md}"
    );

    // Zero tolerance for f32: every difference is beyond it.
    std::fs::write(dir.path().join("zero.toml"), "[default]\nf32 = { rel = 0.0 }\n").unwrap();
    let out = driftscope(
        &["analyze", "t/trace.jsonl", "--policy", "tolerance", "--tolerances", "zero.toml", "--json", "z.json"],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let v = read_json(&dir.path().join("z.json"));
    assert_eq!((v["within_tol"].as_u64(), v["beyond_tol"].as_u64()), (Some(0), Some(180)));
    assert_eq!(v["tolerances"], "zero.toml");
    // A per-point override: only the logits may differ a little more.
    std::fs::write(dir.path().join("pt.toml"), "[default]\nf32 = { rel = 0.0 }\n[point.logits]\nany = { rel = 1.0 }\n")
        .unwrap();
    let out = driftscope(&["analyze", "t/trace.jsonl", "--tolerances", "pt.toml", "--json", "p.json"], dir.path());
    assert_eq!(out.status.code(), Some(1), "the bitwise policy ignores tolerances for the verdict");
    let v = read_json(&dir.path().join("p.json"));
    assert_eq!(v["within_tol"], 3, "the three logits pairs");

    std::fs::write(dir.path().join("bad.toml"), "[default]\nbf16 = { rel = -0.5 }\n").unwrap();
    let out = driftscope(&["analyze", "t/trace.jsonl", "--tolerances", "bad.toml"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("bad.toml: `default.bf16.rel` = -0.5: must be a finite number >= 0"),
        "{}",
        stderr(&out)
    );
    let out = driftscope(&["analyze", "t/trace.jsonl", "--policy", "loose"], dir.path());
    assert_eq!(out.status.code(), Some(2));
}

/// `driftscope sweep`: length 1 is the same computation in both phases; from 2 rows on the
/// `fast` GEMM order differs from the GEMV's; from 32 rows the RMSNorm blocking changes too.
#[test]
fn sweep_finds_where_the_verdict_flips() {
    let dir = tempfile::tempdir().unwrap();
    let out = driftscope(&["sweep", "--lengths", "1..3,30..40", "--out", "s"], dir.path());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let csv = std::fs::read_to_string(dir.path().join("s/sweep.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "length,verdict,root_cause,first_failure,failed_pairs,total_pairs,gross_origin,max_bound_ratio"
    );
    assert_eq!(lines.len(), 1 + 3 + 11);
    assert_eq!(lines[1], "1,PASS,-,-,0,63,-,-", "{csv}");
    // Rounding only: no length has a gross origin, and every drift stays below its bound.
    for l in &lines[2..] {
        let f: Vec<&str> = l.split(',').collect();
        assert_eq!(f[6], "-", "{l}");
        assert!(f[7].parse::<f64>().unwrap() < 1.0, "{l}");
    }
    assert!(lines[2].starts_with("2,FAIL,QKV_PROJECTION_MISMATCH,q[0],"), "{csv}");
    // Below 32 rows the prefill RMSNorm reduces like the decode one; from 32 on it may not.
    assert!(
        lines[1..].iter().filter(|l| l.contains("RMSNORM_MISMATCH")).all(|l| l
            .split(',')
            .next()
            .unwrap()
            .parse::<u32>()
            .unwrap()
            >= 32),
        "{csv}"
    );
    let md = std::fs::read_to_string(dir.path().join("s/sweep.md")).unwrap();
    assert!(md.contains("| 1 | 1 | PASS | - | - | - |"), "{md}");
    // A decode step without its KV cache: from 2 tokens on every length has its gross origin
    // at layer 0's attention, with or without dumps.
    for dump in [false, true] {
        let mut args = vec!["sweep", "--lengths", "1..3,64", "--inject", "kv_drop", "--out", "k"];
        args.extend(dump.then_some("--dump"));
        let out = driftscope(&args, dir.path());
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        let csv = std::fs::read_to_string(dir.path().join("k/sweep.csv")).unwrap();
        let rows: Vec<Vec<&str>> = csv.lines().skip(1).map(|l| l.split(',').collect()).collect();
        assert_eq!(rows[0][..3], ["1", "PASS", "-"], "one token has no cache to drop: {csv}");
        for r in &rows[1..] {
            assert_eq!((r[2], r[6]), ("ATTENTION_STATE_MISMATCH", "attn_ctx[0]"), "{csv}");
            assert!(r[7].parse::<f64>().unwrap() > 10.0, "{csv}");
        }
        assert!(stdout(&out).contains("3 of 4 lengths have a gross origin"), "{}", stdout(&out));
        std::fs::remove_dir_all(dir.path().join("k")).unwrap();
    }
    let out = driftscope(
        &["sweep", "--lengths", "1..40:13", "--profile", "invariant", "--scenario", "chunk8", "--out", "i"],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("0 of 4 lengths fail."), "{}", stdout(&out));
    let out = driftscope(&["sweep", "--lengths", "5000", "--out", "x"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("more than the model's context of 4096"), "{}", stderr(&out));
}

#[test]
fn check_decode_k_compares_every_step() {
    let dir = tempfile::tempdir().unwrap();
    let out = driftscope(&["check", "--scenario", "decode3", "--dump", "--out", "f"], dir.path());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stdout(&out);
    for step in 1..=3 {
        assert!(text.contains(&format!("decode{step}: FAIL")), "{text}");
        let v = read_json(&dir.path().join(format!("f/verdict-decode{step}.json")));
        assert_eq!(
            (v["baseline_phase"].as_str(), v["candidate_phase"].as_str()),
            (Some(format!("prefill_decode{step}").as_str()), Some(format!("decode{step}").as_str()))
        );
    }
    assert!(text.contains("token impact: greedy token agrees for"), "{text}");
    let out = driftscope(&["check", "--profile", "invariant", "--scenario", "decode3", "--out", "i"], dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert_eq!(stdout(&out).matches("PASS: all 189 pairs bitwise identical").count(), 3);
}

/// Whether SmolLM2 is in the cache; without it the tests that need it say so and pass, unless
/// `CI` or `DRIFTSCOPE_REQUIRE_SMOLLM2` is set.
fn smollm2() -> bool {
    if driftscope_engine::load::find_smollm2().is_some() {
        return true;
    }
    let required = ["CI", "DRIFTSCOPE_REQUIRE_SMOLLM2"].iter().any(|k| std::env::var_os(k).is_some());
    assert!(!required, "SmolLM2 is required but not in the cache: run scripts/fetch-smollm2.sh");
    eprintln!("SmolLM2 not in the cache (scripts/fetch-smollm2.sh): skipping");
    false
}

/// The verdicts a check wrote (`verdict.json`, or one per comparison).
fn verdicts(dir: &std::path::Path) -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("verdict")))
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), read_json(&p)))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Every bug `--inject` commits, under both profiles, in f32 and bf16, on SmolLM2 with dumps: the
/// gross origin is the op the bug breaks, at layer 0 of every prompt, named by its bug class; the
/// rounding drift before it (fast) stays in the verdict as the first divergence.
#[test]
fn smollm2_injected_bugs_are_named_at_the_op_they_break() {
    if !smollm2() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (bug, point, class) in [
        ("kv_drop", "attn_ctx", "ATTENTION_STATE_MISMATCH"),
        ("rope_pos", "q_rope", "POSITION_MISMATCH"),
        ("cache_off_by_one", "attn_ctx", "ATTENTION_STATE_MISMATCH"),
        ("mask_off_by_one", "attn_ctx", "ATTENTION_STATE_MISMATCH"),
    ] {
        for profile in ["fast", "invariant"] {
            for dtype in ["f32", "bf16"] {
                let what = format!("{bug} {profile} {dtype}");
                let out = driftscope(
                    &["check", "--model", "smollm2", "--inject", bug, "--profile", profile, "--dtype", dtype, "--dump"],
                    dir.path(),
                );
                assert_eq!(out.status.code(), Some(1), "{what}: {}", stderr(&out));
                assert!(stdout(&out).starts_with(&format!("FAIL + ROOT_CAUSE: {class} (")), "{what}: {}", stdout(&out));
                let v = read_json(&dir.path().join("driftscope-out/verdict.json"));
                assert_eq!(v["root_cause"], class, "{what}");
                assert_eq!(v["run_meta"]["inject"], bug, "{what}");
                for p in v["prompts"].as_array().unwrap() {
                    let g = &p["gross_origin"];
                    assert_eq!(
                        (g["point"].as_str(), g["layer"].as_u64(), g["class"].as_str()),
                        (Some(point), Some(0), Some(class)),
                        "{what} {p}"
                    );
                    assert_eq!(g["source"], "dump", "{what}");
                    assert!(g["rel_delta"].as_f64().unwrap() > g["bound"].as_f64().unwrap(), "{what} {g}");
                    if profile == "invariant" {
                        // Nothing else drifts: the bug is the first divergence too.
                        assert_eq!(p["origins"][0]["point"], point, "{what}");
                        assert_eq!(
                            p["rounding_root_cause"],
                            if point == "q_rope" { "ROPE_MISMATCH" } else { "ATTENTION_KERNEL_MISMATCH" },
                            "{what}"
                        );
                    }
                }
                if (profile, dtype) == ("fast", "f32") {
                    assert_eq!(
                        v["rounding_root_cause"], "QKV_PROJECTION_MISMATCH",
                        "{what}: rounding drift comes first"
                    );
                    assert_eq!(v["first_failure"]["point"], "q", "{what}");
                }
                let md = std::fs::read_to_string(dir.path().join("driftscope-out/report.md")).unwrap();
                assert!(md.contains("## Bug or Rounding") && md.contains("**Fix the gross origin first.**"), "{what}");
                if bug == "kv_drop" {
                    // The fingerprint: the step's attention output is its own value vector.
                    assert!(md.contains("equals its own `v` spread over the query heads"), "{what}: {md}");
                }
            }
        }
    }
    // Without dumps the statistics show the dropped cache just as well, under both profiles.
    for profile in ["fast", "invariant"] {
        let out = driftscope(&["check", "--model", "smollm2", "--inject", "kv_drop", "--profile", profile], dir.path());
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        let v = read_json(&dir.path().join("driftscope-out/verdict.json"));
        assert_eq!(v["root_cause"], "ATTENTION_STATE_MISMATCH", "{profile}");
        assert_eq!(
            (v["gross_origin"]["point"].as_str(), v["gross_origin"]["layer"].as_u64()),
            (Some("attn_ctx"), Some(0))
        );
        assert_eq!(v["gross_origin"]["source"], "stats");
        let first = if profile == "invariant" { "attn_ctx" } else { "q" };
        assert_eq!(v["first_failure"]["point"], first, "{profile}");
    }
}

/// Rounding and kernel drift alone is never called a bug: every scenario, both profiles, three
/// dtypes, on SmolLM2 with dumps; and sweeps up to 2048 tokens (decode0 in every dtype, chunk64 in
/// bf16, where rounding comes nearest its bound). scripts/calibrate_gross.py runs the whole
/// matrix, every scenario at 26 lengths (docs/tolerances.md).
#[test]
fn smollm2_rounding_never_has_a_gross_origin() {
    if !smollm2() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for profile in ["fast", "invariant"] {
        for dtype in ["f32", "bf16", "f16"] {
            let out = driftscope(
                &["check", "--model", "smollm2", "--profile", profile, "--dtype", dtype, "--dump", "--out", "c"]
                    .into_iter()
                    .chain(["--scenario", "decode0,chunk64,prefix_cache,batch4,decode4"])
                    .collect::<Vec<_>>(),
                dir.path(),
            );
            assert!(matches!(out.status.code(), Some(0 | 1)), "{}", stderr(&out));
            let all = verdicts(&dir.path().join("c"));
            assert_eq!(all.len(), 8, "decode0, chunk64, prefix_cache, batch4, decode1..4");
            for (name, v) in &all {
                assert_eq!(v["gross_origin"], Value::Null, "{profile} {dtype} {name}");
                for p in v["prompts"].as_array().unwrap() {
                    assert_eq!(p["gross_origin"], Value::Null);
                    if let Some(r) = p["largest_excess"]["ratio"].as_f64() {
                        assert!(r < 1.0, "{profile} {dtype} {name}: {}", p["largest_excess"]);
                    }
                }
                if profile == "invariant" {
                    assert_eq!(v["verdict"], "PASS", "{dtype} {name}");
                }
            }
            std::fs::remove_dir_all(dir.path().join("c")).unwrap();
        }
    }
    for (dtype, scenario) in [("f32", "decode0"), ("bf16", "decode0"), ("f16", "decode0"), ("bf16", "chunk64")] {
        let out = driftscope(
            &["sweep", "--model", "smollm2", "--dtype", dtype, "--scenario", scenario, "--dump", "--out", "s"]
                .into_iter()
                .chain(["--lengths", "2,65,257,1025,2048"])
                .collect::<Vec<_>>(),
            dir.path(),
        );
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        let csv = std::fs::read_to_string(dir.path().join("s/sweep.csv")).unwrap();
        for row in csv.lines().skip(1) {
            let f: Vec<&str> = row.split(',').collect();
            assert_eq!(f[6], "-", "{dtype} {scenario}: {row}");
            assert!(f[7] == "-" || f[7].parse::<f64>().unwrap() < 1.0, "{dtype} {scenario}: {row}");
        }
        std::fs::remove_dir_all(dir.path().join("s")).unwrap();
    }
}
