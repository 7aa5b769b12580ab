//! The engine's central properties, on the built-in model: tracing never changes a bit; with
//! `invariant` kernels prefill_last and decode0 are bitwise equal at every prompt length; with
//! `fast` kernels they drift.

mod common;

use common::*;
use driftscope_engine::synthetic::default_model;
use driftscope_engine::{KvCache, Profile, Run};
use driftscope_trace::DType;

/// Lengths around the thresholds of the kernels: the fast RMSNorm switches at 32 rows, the
/// prefill KV tile is 32, the invariant KV split and the decode split unit are 64, plus the
/// lengths real engines switch at (96/97, 255/256/257, 511/512/513) and the longest default.
const LENGTHS: [usize; 24] =
    [1, 2, 3, 5, 31, 32, 33, 63, 64, 65, 96, 97, 127, 128, 129, 255, 256, 257, 300, 511, 512, 513, 599, 600];

#[test]
fn tracing_never_changes_a_bit() {
    let model = default_model();
    let toks = tokens(70, model.config.vocab);
    for profile in [Profile::Fast, Profile::Invariant] {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let (_, traced) = prefill_last(&model, &toks, profile, dtype);
            let mut cache = KvCache::new(&model.config);
            let mut run = Run { kernels: profile.kernels(), dtype, trace_rows: vec![], tracer: None, fault: None };
            let plain = bits(&model.forward(&toks, &mut cache, &mut run));
            assert_eq!(traced, plain, "{profile:?} {dtype:?}");
            let (cap, _) = decode0(&model, &toks, profile, dtype);
            assert_eq!(cap.rows.len(), 3 + 15 * model.config.n_layers, "every point traced once");
        }
    }
}

#[test]
fn invariant_prefill_and_decode_are_bitwise_equal_at_every_threshold_length() {
    let model = default_model();
    for &n in &LENGTHS {
        let toks = tokens(n, model.config.vocab);
        for dtype in [DType::F32, DType::BF16] {
            let (p, pl) = prefill_last(&model, &toks, Profile::Invariant, dtype);
            let (d, dl) = decode0(&model, &toks, Profile::Invariant, dtype);
            assert_eq!(p.rows.len(), d.rows.len());
            for (key, row) in &p.rows {
                assert_eq!(Some(row), d.rows.get(key), "length {n} {dtype:?}: point {key:?} differs");
            }
            assert_eq!(pl, dl, "length {n} {dtype:?}: logits differ");
        }
    }
}

/// Every length 1..=600 at once: one prefill of 600 tokens and 600 decode steps leave bitwise
/// identical KV caches (every layer, every position) and the same logits at the end. A cache row
/// at position p of layer l depends on everything computed for positions ≤ p below layer l, so
/// this checks the decode path against prefill at each length.
#[test]
fn invariant_kv_cache_is_bitwise_equal_for_all_lengths_up_to_600() {
    let model = default_model();
    let toks = tokens(600, model.config.vocab);
    let k = Profile::Invariant.kernels();
    let mut prefill = KvCache::new(&model.config);
    let mut run = Run { kernels: k, dtype: DType::F32, trace_rows: vec![], tracer: None, fault: None };
    let pl = bits(&model.forward(&toks, &mut prefill, &mut run));
    let mut decode = KvCache::new(&model.config);
    let mut last = Vec::new();
    for t in &toks {
        let mut run = Run { kernels: k, dtype: DType::F32, trace_rows: vec![], tracer: None, fault: None };
        last = bits(&model.forward(std::slice::from_ref(t), &mut decode, &mut run));
    }
    assert!(prefill == decode, "KV caches differ between one prefill and token-by-token decode");
    assert_eq!(pl, last);
}

#[test]
fn fast_prefill_and_decode_drift() {
    let model = default_model();
    let mut drifting = 0;
    for &n in &[5usize, 97, 300] {
        let toks = tokens(n, model.config.vocab);
        let (p, _) = prefill_last(&model, &toks, Profile::Fast, DType::F32);
        let (d, _) = decode0(&model, &toks, Profile::Fast, DType::F32);
        drifting += usize::from(p.rows != d.rows);
        // The embedding is a copy: it never drifts.
        assert_eq!(p.rows[&(0, 0)], d.rows[&(0, 0)]);
    }
    assert_eq!(drifting, 3, "fast kernels should drift at every length tried");
}

/// The serving scenarios, through the runner: with `invariant` kernels, chunked prefill (any
/// chunk size) and a reused prefix cache give the bits of one full prefill.
#[test]
fn invariant_scenarios_match_prefill_bitwise() {
    use driftscope_engine::runner::{run_phase, Phase, Prompt, RunSpec};
    let model = default_model();
    let spec = RunSpec { profile: Profile::Invariant, dtype: DType::BF16, layers: None, points: None, fault: None };
    let hashes = |prompt: &Prompt, phase: Phase| {
        let mut out = Vec::new();
        let (logits, events) = run_phase(&model, prompt, phase, &spec, &mut out, None).unwrap();
        assert_eq!(events, 3 + 15 * model.config.n_layers as u64);
        let text = String::from_utf8(out).unwrap();
        let rows: Vec<(String, u64, u64, u64)> = text
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                let key = format!("{}/{}", v["point"], v["layer"]);
                (key, v["hash"].as_u64().unwrap(), v["pos_id"].as_u64().unwrap(), v["seq_len"].as_u64().unwrap())
            })
            .collect();
        (rows, bits(&logits))
    };
    for n in [1, 2, 33, 97, 257] {
        let prompt = Prompt { id: format!("n{n}"), tokens: tokens(n, model.config.vocab) };
        let (base, base_logits) = hashes(&prompt, Phase::PrefillLast);
        for phase in [
            Phase::Decode0,
            Phase::Chunked(1),
            Phase::Chunked(7),
            Phase::Chunked(64),
            Phase::PrefixCache,
            Phase::Batch(2),
            Phase::Batch(5),
        ] {
            let (rows, logits) = hashes(&prompt, phase);
            for ((k1, h1, p1, _), (k2, h2, p2, s2)) in base.iter().zip(&rows) {
                assert_eq!((k1, p1), (k2, p2), "n={n} {phase:?}: same rows in the same order");
                assert_eq!(h1, h2, "n={n} {phase:?}: {k1} differs (seq_len {s2})");
            }
            assert_eq!(base_logits, logits, "n={n} {phase:?}");
        }
        // The phases really ran the shapes they claim.
        let (chunked, _) = hashes(&prompt, Phase::Chunked(64));
        assert_eq!(chunked[0].3, ((n - 1) % 64 + 1) as u64, "seq_len of the last chunk");
        let (prefix, _) = hashes(&prompt, Phase::PrefixCache);
        assert_eq!(prefix[0].3, (n - n / 2) as u64);
        let (batch, _) = hashes(&prompt, Phase::Batch(5));
        let companions: usize = Phase::batch_companions(&prompt.tokens, 5).iter().map(Vec::len).sum();
        assert_eq!(batch[0].3, (n + companions) as u64, "seq_len counts the whole batch");
    }
}

/// The prefix donor shares the first half and continues differently.
#[test]
fn prefix_donor_shares_only_the_prefix() {
    use driftscope_engine::runner::Phase;
    let t: Vec<u32> = (10..20).collect();
    let (shared, donor) = Phase::prefix_donor(&t);
    assert_eq!(shared, 5);
    assert_eq!(&donor[..5], &t[..5]);
    assert_eq!(&donor[5..], &[19, 18, 17, 16, 15]);
    assert_eq!(Phase::parse("chunk64"), Some(Phase::Chunked(64)));
    assert_eq!(Phase::parse("chunk"), None);
    assert_eq!(Phase::Chunked(64).name(), "chunk64");
}

/// decodeK: the sampler's K greedy decode steps and the trainer's prefill of the sampled tokens
/// see the same tokens at the same positions; with `invariant` kernels they agree bitwise.
#[test]
fn decode_k_pairs_each_step_with_the_prefill_of_the_sampled_tokens() {
    use driftscope_engine::runner::{run_phase, Phase, Prompt, RunSpec};
    let model = default_model();
    for profile in [Profile::Invariant, Profile::Fast] {
        let spec = RunSpec { profile, dtype: DType::F32, layers: None, points: None, fault: None };
        let prompt = Prompt { id: "p".into(), tokens: tokens(40, model.config.vocab) };
        let mut out = Vec::new();
        run_phase(&model, &prompt, Phase::DecodeK(5), &spec, &mut out, None).unwrap();
        let events: Vec<serde_json::Value> =
            String::from_utf8(out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let per_phase = 3 + 15 * model.config.n_layers;
        assert_eq!(events.len(), 10 * per_phase, "5 decode steps and 5 prefill positions");
        for step in 1..=5u64 {
            let of =
                |phase: String| -> Vec<&serde_json::Value> { events.iter().filter(|e| e["phase"] == phase).collect() };
            let (dec, pre) = (of(format!("decode{step}")), of(format!("prefill_decode{step}")));
            assert_eq!((dec.len(), pre.len()), (per_phase, per_phase));
            assert!(dec.iter().all(|e| e["step"] == step && e["seq_len"] == 1 && e["pos_id"] == 34 + step));
            assert!(pre.iter().all(|e| e["step"] == 0 && e["seq_len"] == 40 && e["pos_id"] == 34 + step));
            assert_eq!(dec[0]["token_id"], pre[0]["token_id"], "the same sampled token");
            let same = dec.iter().zip(&pre).all(|(d, p)| d["hash"] == p["hash"]);
            assert_eq!(same, profile == Profile::Invariant, "{profile:?} step {step}");
        }
        // The first step feeds the greedy choice after the prompt's first 35 tokens, not token 35.
        let first = events.iter().find(|e| e["phase"] == "decode1").unwrap();
        assert!(first["token_id"].as_u64().unwrap() < model.config.vocab as u64);
    }
}
