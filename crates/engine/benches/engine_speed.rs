//! Engine speed: prefill and decode tokens/s per kernel profile, the cost of `invariant` over
//! `fast`, and the cost of tracing every point (with a check that tracing changes no output bit).
//!
//! Run with `cargo bench -p driftscope-engine --bench engine_speed`. Environment:
//! - `DRIFTSCOPE_BENCH_MODEL`: `smollm2` (the default when `scripts/fetch-smollm2.sh` has cached
//!   it, else `builtin`), `builtin`, `llama-1b` (random weights in the shape of Llama-3.2-1B: 16
//!   layers, hidden 2048, FFN 8192, 32 query / 8 KV heads, vocabulary 128256), or a GGUF path;
//! - `DRIFTSCOPE_BENCH_DTYPE`: storage dtype of activations and KV cache, `f32` (default), `bf16`
//!   or `f16` (weights keep their file's storage: F16 and BF16 16-bit, Q4_1 and Q8_0 in their
//!   blocks, other types and the random models f32);
//! - `DRIFTSCOPE_BENCH_LENGTHS`: prompt lengths and decode contexts (default `128,512`);
//! - `DRIFTSCOPE_BENCH_REPS` (default 5): repetitions; medians are printed.

use std::time::Instant;

use driftscope_engine::config::{Config, RopeLayout};
use driftscope_engine::load::{find_smollm2, load_gguf};
use driftscope_engine::model::Tracer;
use driftscope_engine::synthetic::{default_model, generate};
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
fn prefill(model: &Model, n: usize, profile: Profile, trace: bool, dtype: DType) -> (f64, Vec<u32>) {
    let toks = tokens(n, model.config.vocab);
    let mut cache = KvCache::new(&model.config);
    let mut tracer = HashAll(0);
    let mut run = Run {
        kernels: profile.kernels(),
        dtype,
        trace_rows: if trace { vec![n - 1] } else { vec![] },
        tracer: if trace { Some(&mut tracer) } else { None },
        fault: None,
    };
    let t = Instant::now();
    let logits = model.forward(&toks, &mut cache, &mut run);
    (t.elapsed().as_secs_f64(), logits.iter().map(|x| x.to_bits()).collect())
}

/// Seconds per decode step over a context of `ctx` tokens (median of 16 steps).
fn decode(model: &Model, ctx: usize, profile: Profile, dtype: DType) -> f64 {
    let toks = tokens(ctx + 16, model.config.vocab);
    let mut cache = KvCache::new(&model.config);
    let mut run = Run { kernels: profile.kernels(), dtype, trace_rows: vec![], tracer: None, fault: None };
    model.forward(&toks[..ctx], &mut cache, &mut run);
    let mut steps = Vec::new();
    for t in &toks[ctx..] {
        let start = Instant::now();
        model.forward(std::slice::from_ref(t), &mut cache, &mut run);
        steps.push(start.elapsed().as_secs_f64());
    }
    median(steps)
}

/// Memory bandwidth: bytes/s summing a 1 GiB f32 array on all threads, each reading its part as
/// four streams side by side, with 16 independent accumulators (so the loads, not the additions,
/// are the bound), best of 3. The array is allocated once and measured after every repetition,
/// so that each decode sample has a bandwidth of the same minutes (the machine's moves by 2x).
struct Bandwidth(Vec<f32>);

impl Bandwidth {
    fn new() -> Bandwidth {
        Bandwidth(vec![1.0f32; 256 << 20])
    }

    fn measure(&self) -> f64 {
        use rayon::prelude::*;
        /// Streams each thread reads side by side: one stream per thread reads 10–20% slower
        /// than two to four here (the GEMV reads four), which would understate the floor.
        const STREAMS: usize = 4;
        let data = &self.0;
        let threads = rayon::current_num_threads().max(1);
        let part = data.len() / threads;
        let mut best = 0.0f64;
        for _ in 0..3 {
            let t = Instant::now();
            let s: f32 = data
                .par_chunks(part)
                .map(|c| {
                    let q = c.len() / STREAMS / 16 * 16;
                    let mut acc = [0.0f32; 16];
                    for i in (0..q).step_by(16) {
                        for s in 0..STREAMS {
                            for (a, v) in acc.iter_mut().zip(&c[s * q + i..s * q + i + 16]) {
                                *a += v;
                            }
                        }
                    }
                    acc.iter().sum::<f32>()
                })
                .sum();
            let dt = t.elapsed().as_secs_f64();
            assert!(s > 0.0);
            best = best.max((data.len() * 4) as f64 / dt);
        }
        best
    }
}

/// Peak f32 rate of fused multiply-adds: 12 independent registers of FMAs per thread, of the
/// widest vectors the CPU has (AVX-512, else AVX; a plain multiply and add per lane without FMA),
/// best of 3, all threads; FLOPs count 2 per multiply-add.
fn peak_flops() -> f64 {
    use rayon::prelude::*;
    let threads = rayon::current_num_threads();
    let iters = 20_000_000u64;
    let mut best = 0.0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let (s, lanes): (f32, u64) = (0..threads)
            .into_par_iter()
            .map(|k| {
                let x = std::hint::black_box(1.0000001f32 + k as f32 * 1e-9);
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512 (checked above).
                    return (unsafe { fma_loop_512(iters, x) }, 12 * 16);
                }
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has AVX and FMA (checked above).
                    return (unsafe { fma_loop(iters, x) }, 12 * 8);
                }
                let mut acc = [0.0f32; 32];
                for _ in 0..iters {
                    for a in acc.iter_mut() {
                        *a = *a * x + 0.9999999;
                    }
                }
                (acc.iter().sum::<f32>(), 32)
            })
            .reduce(|| (0.0, 0), |a, b| (a.0 + b.0, b.1.max(a.1)));
        let dt = t.elapsed().as_secs_f64();
        assert!(s.is_finite());
        best = best.max((iters * lanes * threads as u64 * 2) as f64 / dt);
    }
    best
}

/// `iters` rounds of FMAs on 12 AVX registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,fma")]
unsafe fn fma_loop(iters: u64, x: f32) -> f32 {
    use std::arch::x86_64::*;
    let (xv, yv) = (_mm256_set1_ps(x), _mm256_set1_ps(0.9999999));
    let mut acc = [_mm256_setzero_ps(); 12];
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = _mm256_fmadd_ps(*a, xv, yv);
        }
    }
    let mut out = [0.0f32; 8];
    let sum = acc.iter().fold(_mm256_setzero_ps(), |s, &a| _mm256_add_ps(s, a));
    // SAFETY: `out` holds eight f32.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), sum) };
    out.iter().sum()
}

/// `iters` rounds of FMAs on 12 AVX-512 registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_loop_512(iters: u64, x: f32) -> f32 {
    use std::arch::x86_64::*;
    let (xv, yv) = (_mm512_set1_ps(x), _mm512_set1_ps(0.9999999));
    let mut acc = [_mm512_setzero_ps(); 12];
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = _mm512_fmadd_ps(*a, xv, yv);
        }
    }
    _mm512_reduce_add_ps(acc.iter().fold(_mm512_setzero_ps(), |s, &a| _mm512_add_ps(s, a)))
}

/// Llama-3.2-1B's shape (the weights are random: speed depends on shapes only).
fn llama_1b() -> Config {
    Config {
        name: "llama-1b-shaped (random weights)".into(),
        n_layers: 16,
        hidden: 2048,
        ffn: 8192,
        n_heads: 32,
        n_kv_heads: 8,
        head_dim: 64,
        vocab: 128_256,
        rope_theta: 500_000.0,
        rms_eps: 1e-5,
        max_context: 4096,
        rope_layout: RopeLayout::Halves,
    }
}

fn main() {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let reps: usize = env("DRIFTSCOPE_BENCH_REPS").and_then(|v| v.parse().ok()).unwrap_or(5).max(1);
    let dtype = match env("DRIFTSCOPE_BENCH_DTYPE").as_deref() {
        None | Some("f32") => DType::F32,
        Some("bf16") => DType::BF16,
        Some("f16") => DType::F16,
        Some(other) => panic!("DRIFTSCOPE_BENCH_DTYPE: f32, bf16 or f16, not {other}"),
    };
    let lengths: Vec<usize> = env("DRIFTSCOPE_BENCH_LENGTHS")
        .map(|v| v.split(',').map(|n| n.trim().parse().expect("DRIFTSCOPE_BENCH_LENGTHS: numbers")).collect())
        .unwrap_or(vec![128, 512]);
    let t = Instant::now();
    let model = match env("DRIFTSCOPE_BENCH_MODEL").as_deref() {
        None | Some("smollm2") => match find_smollm2() {
            Some(path) => load_gguf(&path).expect("SmolLM2 loads").model,
            None => default_model(),
        },
        Some("builtin") => default_model(),
        Some("llama-1b") => generate(llama_1b(), 1),
        Some(path) => load_gguf(std::path::Path::new(path)).expect("the GGUF loads").model,
    };
    println!("loaded in {:.1} s", t.elapsed().as_secs_f64());
    let params: usize = model.weights.matmul_weights().map(|m| m.data.len()).sum();
    let weight_bytes: usize = model.weights.matmul_weights().map(|m| m.bytes()).sum();
    let storage = model.weights.layers.first().map_or("f32", |l| l.wq.data.type_name());
    println!(
        "model: {} ({} layers, hidden {}, {:.1} M matmul weights held in {storage}, {:.0} MB; activations {}); threads: {}; {reps} repetitions, medians",
        model.config.name,
        model.config.n_layers,
        model.config.hidden,
        params as f64 / 1e6,
        weight_bytes as f64 / 1e6,
        dtype.as_str(),
        rayon::current_num_threads()
    );
    let head: Vec<String> = lengths
        .iter()
        .map(|n| format!("prefill {n} tok/s"))
        .chain(lengths.iter().map(|n| format!("decode @{n} tok/s")))
        .collect();
    println!("| profile | {} |", head.join(" | "));
    println!("|---|{}", "---|".repeat(head.len()));
    // The two profiles' runs alternate, repetition by repetition, so that a slow spell of a
    // shared machine falls on both rather than on whichever ran first; one untimed prefill and
    // decode each first (the first pass faults its buffers in).
    const PROFILES: [Profile; 2] = [Profile::Fast, Profile::Invariant];
    let mut samples: std::collections::BTreeMap<(&str, &str, usize), Vec<f64>> = Default::default();
    let stream = Bandwidth::new();
    let mut bws = Vec::new();
    for profile in PROFILES {
        prefill(&model, lengths[0], profile, false, dtype);
        decode(&model, lengths[0], profile, dtype);
    }
    for _ in 0..reps {
        for &n in &lengths {
            for profile in PROFILES {
                let s = prefill(&model, n, profile, false, dtype).0;
                samples.entry((profile.as_str(), "prefill", n)).or_default().push(s);
            }
        }
        for &ctx in &lengths {
            for profile in PROFILES {
                let s = decode(&model, ctx, profile, dtype);
                samples.entry((profile.as_str(), "decode", ctx)).or_default().push(s);
            }
        }
        bws.push(stream.measure());
    }
    let bytes = weight_bytes as f64;
    // Each repetition's `fast` decode against the floor of the bandwidth measured right after it.
    let floor_ratios: Vec<(usize, Vec<f64>)> = lengths
        .iter()
        .map(|&ctx| (ctx, samples[&("fast", "decode", ctx)].iter().zip(&bws).map(|(t, bw)| t / (bytes / bw)).collect()))
        .collect();
    let medians: std::collections::BTreeMap<_, f64> = samples.into_iter().map(|(k, v)| (k, median(v))).collect();
    for profile in PROFILES {
        let p = profile.as_str();
        let row: Vec<String> = (lengths.iter().map(|&n| format!("{:.1}", n as f64 / medians[&(p, "prefill", n)])))
            .chain(lengths.iter().map(|&ctx| format!("{:.1}", 1.0 / medians[&(p, "decode", ctx)])))
            .collect();
        println!("| {p} | {} |", row.join(" | "));
    }
    for (what, n) in ["prefill", "decode"].iter().flat_map(|w| lengths.iter().map(move |&n| (*w, n))) {
        let (f, i) = (medians[&("fast", what, n)], medians[&("invariant", what, n)]);
        println!("invariant / fast, {what} {n}: {:.3}x", i / f);
    }
    // The machine's limits and the floors they set for this model.
    let (lo, hi) = bws.iter().fold((f64::MAX, 0.0f64), |(lo, hi), &b| (lo.min(b), hi.max(b)));
    let (bw, peak) = (median(bws.clone()), peak_flops());
    println!(
        "limits: memory bandwidth {:.1} GB/s (median of {} measures, one after each repetition: {:.1}–{:.1}), \
         f32 FMA {:.1} GFLOP/s (all threads)",
        bw / 1e9,
        bws.len(),
        lo / 1e9,
        hi / 1e9,
        peak / 1e9
    );
    for (ctx, ratios) in floor_ratios {
        let (lo, hi) = ratios.iter().fold((f64::MAX, 0.0f64), |(lo, hi), &r| (lo.min(r), hi.max(r)));
        println!(
            "decode @{ctx}: floor {:.1} ms (weights / median bandwidth), fast {:.1} ms; each repetition against \
             its own bandwidth: median {:.2}x the floor ({lo:.2}–{hi:.2}x)",
            bytes / bw * 1e3,
            medians[&("fast", "decode", ctx)] * 1e3,
            median(ratios)
        );
    }
    for &n in &lengths {
        // Every layer's matrices for every token; the LM head for the last token only (the
        // engine, like llama.cpp, computes the logits of the rows it returns).
        let head = model.weights.lm_head().data.len() as f64;
        let floor = 2.0 * ((params as f64 - head) * n as f64 + head) / peak;
        let got = medians[&("fast", "prefill", n)];
        println!(
            "prefill {n}: floor {:.2} s (matmul FLOPs / peak), fast {:.2} s = {:.2}x the floor",
            floor,
            got,
            got / floor
        );
    }
    // Tracing every point of every layer at the last row, vs no tracer, the two alternating.
    for profile in PROFILES {
        let n = lengths[0];
        let (mut off, mut on) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            off.push(prefill(&model, n, profile, false, dtype));
            on.push(prefill(&model, n, profile, true, dtype));
        }
        assert!(off.iter().chain(&on).all(|(_, l)| *l == off[0].1), "tracing changed an output bit");
        let (a, b) = (median(off.iter().map(|x| x.0).collect()), median(on.iter().map(|x| x.0).collect()));
        println!(
            "tracing all points, prefill {n}, {}: {:.3}x the untraced time (logits bit-identical)",
            profile.as_str(),
            b / a
        );
    }
}
