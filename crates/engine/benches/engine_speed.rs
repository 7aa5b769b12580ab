//! Engine speed: prefill and decode tokens/s per kernel profile, the cost of `invariant` over
//! `fast`, and the cost of tracing every point (with a check that tracing changes no output bit).
//!
//! Run with `cargo bench -p driftscope-engine --bench engine_speed`. Uses SmolLM2 when
//! `scripts/fetch-smollm2.sh` has cached it, else the built-in model.
//! `DRIFTSCOPE_BENCH_REPS` (default 5) sets the repetitions; medians are printed.

use std::time::Instant;

use driftscope_engine::load::{find_smollm2, load_gguf};
use driftscope_engine::model::Tracer;
use driftscope_engine::synthetic::default_model;
use driftscope_engine::{KvCache, Model, Profile, Run};
use driftscope_trace::{hash_f32, DType, Point, RowStats};

/// Traces every point the way `driftscope run` does (hash and statistics of each row).
struct HashAll(u64);

impl Tracer for HashAll {
    fn wants(&self, _: Point, _: u32) -> bool {
        true
    }
    fn record(&mut self, _: Point, _: u32, _: usize, row: &[f32], _: DType) {
        let s = RowStats::of_f32(row);
        self.0 ^= hash_f32(row) ^ s.l2.to_bits();
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn tokens(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % vocab) as u32).collect()
}

/// Seconds to prefill `n` tokens (last row traced when `trace`), and the logits' bits.
fn prefill(model: &Model, n: usize, profile: Profile, trace: bool) -> (f64, Vec<u32>) {
    let toks = tokens(n, model.config.vocab);
    let mut cache = KvCache::new(&model.config);
    let mut tracer = HashAll(0);
    let mut run = Run {
        kernels: profile.kernels(),
        dtype: DType::F32,
        trace_rows: if trace { vec![n - 1] } else { vec![] },
        tracer: if trace { Some(&mut tracer) } else { None },
    };
    let t = Instant::now();
    let logits = model.forward(&toks, &mut cache, &mut run);
    (t.elapsed().as_secs_f64(), logits.iter().map(|x| x.to_bits()).collect())
}

/// Seconds per decode step over a context of `ctx` tokens (median of 16 steps).
fn decode(model: &Model, ctx: usize, profile: Profile) -> f64 {
    let toks = tokens(ctx + 16, model.config.vocab);
    let mut cache = KvCache::new(&model.config);
    let mut run = Run { kernels: profile.kernels(), dtype: DType::F32, trace_rows: vec![], tracer: None };
    model.forward(&toks[..ctx], &mut cache, &mut run);
    let mut steps = Vec::new();
    for t in &toks[ctx..] {
        let start = Instant::now();
        model.forward(std::slice::from_ref(t), &mut cache, &mut run);
        steps.push(start.elapsed().as_secs_f64());
    }
    median(steps)
}

fn main() {
    let reps: usize = std::env::var("DRIFTSCOPE_BENCH_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(5).max(1);
    let model = match find_smollm2() {
        Some(path) => load_gguf(&path).expect("SmolLM2 loads").model,
        None => default_model(),
    };
    let params: usize = model
        .weights
        .layers
        .iter()
        .map(|l| {
            l.wq.data.len()
                + l.wk.data.len()
                + l.wv.data.len()
                + l.wo.data.len()
                + l.w_gate.data.len()
                + l.w_up.data.len()
                + l.w_down.data.len()
        })
        .sum::<usize>()
        + model.weights.lm_head().data.len();
    println!(
        "model: {} ({} layers, hidden {}, {:.1} M matmul weights, f32); threads: {}; {reps} repetitions, medians",
        model.config.name,
        model.config.n_layers,
        model.config.hidden,
        params as f64 / 1e6,
        rayon::current_num_threads()
    );
    println!("| profile | prefill 128 tok/s | prefill 512 tok/s | decode @128 tok/s | decode @512 tok/s |");
    println!("|---|---|---|---|---|");
    let mut medians = std::collections::BTreeMap::new();
    for profile in [Profile::Fast, Profile::Invariant] {
        let mut row = Vec::new();
        for n in [128, 512] {
            let s = median((0..reps).map(|_| prefill(&model, n, profile, false).0).collect());
            medians.insert((profile.as_str(), "prefill", n), s);
            row.push(format!("{:.1}", n as f64 / s));
        }
        for ctx in [128, 512] {
            let s = median((0..reps).map(|_| decode(&model, ctx, profile)).collect());
            medians.insert((profile.as_str(), "decode", ctx), s);
            row.push(format!("{:.1}", 1.0 / s));
        }
        println!("| {} | {} |", profile.as_str(), row.join(" | "));
    }
    for (what, n) in [("prefill", 128), ("prefill", 512), ("decode", 128), ("decode", 512)] {
        let (f, i) = (medians[&("fast", what, n)], medians[&("invariant", what, n)]);
        println!("invariant / fast, {what} {n}: {:.3}x", i / f);
    }
    // Tracing every point of every layer at the last row, vs no tracer.
    for profile in [Profile::Fast, Profile::Invariant] {
        let off: Vec<(f64, Vec<u32>)> = (0..reps).map(|_| prefill(&model, 128, profile, false)).collect();
        let on: Vec<(f64, Vec<u32>)> = (0..reps).map(|_| prefill(&model, 128, profile, true)).collect();
        assert!(off.iter().chain(&on).all(|(_, l)| *l == off[0].1), "tracing changed an output bit");
        let (a, b) = (median(off.iter().map(|x| x.0).collect()), median(on.iter().map(|x| x.0).collect()));
        println!(
            "tracing all points, prefill 128, {}: {:.3}x the untraced time (logits bit-identical)",
            profile.as_str(),
            b / a
        );
    }
}
