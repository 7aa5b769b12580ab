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
            let mut run = Run { kernels: profile.kernels(), dtype, trace_row: None, tracer: None };
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
    let mut run = Run { kernels: k, dtype: DType::F32, trace_row: None, tracer: None };
    let pl = bits(&model.forward(&toks, &mut prefill, &mut run));
    let mut decode = KvCache::new(&model.config);
    let mut last = Vec::new();
    for t in &toks {
        let mut run = Run { kernels: k, dtype: DType::F32, trace_row: None, tracer: None };
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
