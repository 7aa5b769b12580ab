//! Analyzer throughput on a large generated trace (issue: the analyzer must stream at ≥ 1 GB/s).
//!
//! Generates a trace of `DRIFTSCOPE_BENCH_MB` MiB (default 1024) shaped like a real full trace:
//! every point of 30 layers for thousands of prompts, both phases, drift from layer 3 on. Then it
//! times, over `DRIFTSCOPE_BENCH_REPS` repetitions (default 5):
//! - `read floor`: reading the file into memory and counting newlines (what no parser can beat);
//! - `analyze`: collect (parse + pair) and analyze, as `driftscope analyze` does before rendering.
//!
//! Prints medians, MB/s, events/s and the peak resident memory. `DRIFTSCOPE_BENCH_DIR` keeps the
//! trace in that folder. Run with
//! `cargo bench -p driftscope-analyze --bench analyze_throughput`.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::Path;
use std::time::Instant;

use driftscope_analyze::{analyze, collect_file, Options};
use driftscope_trace::{Point, ReadOptions};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn generate(path: &Path, target_bytes: u64) -> std::io::Result<(u64, u64)> {
    let mut w = BufWriter::with_capacity(1 << 20, File::create(path)?);
    let (mut bytes, mut events, mut prompt) = (0u64, 0u64, 0u64);
    let mut line = String::new();
    w.write_all(b"{\"event\":\"run_meta\",\"engine\":\"bench\",\"n_layers\":30}\n")?;
    while bytes < target_bytes {
        let pos = 17 + prompt % 600;
        for (phase, step, seq) in [("prefill_last", 0, pos + 1), ("decode0", 1, 1)] {
            let mut rows: Vec<(Point, u32)> = vec![(Point::EmbedOut, 0)];
            for l in 0..30 {
                rows.extend(Point::PER_LAYER.iter().map(|&p| (p, l)));
            }
            rows.extend([(Point::FinalNorm, 0), (Point::Logits, 0)]);
            for (point, layer) in rows {
                let drift = phase == "decode0" && layer >= 3 && point != Point::EmbedOut;
                let hash = (prompt * 1_000_003 + layer as u64 * 131 + point.index() as u64)
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    ^ u64::from(drift);
                let x = 0.01 + (hash % 997) as f64 * 1e-5;
                line.clear();
                use std::fmt::Write as _;
                let _ = writeln!(
                    line,
                    "{{\"event\":\"stage_trace\",\"prompt_id\":\"prompt_{prompt:06}\",\"phase\":\"{phase}\",\"point\":\"{}\",\"layer\":{layer},\"step\":{step},\"pos_id\":{pos},\"seq_len\":{seq},\"hash\":{hash},\"min\":{},\"max\":{},\"mean\":{},\"dtype\":\"bf16\",\"l2\":{}}}",
                    point.as_str(),
                    -x * 0.9,
                    x,
                    x * 1e-3,
                    x * 12.5
                );
                w.write_all(line.as_bytes())?;
                bytes += line.len() as u64;
                events += 1;
            }
        }
        prompt += 1;
    }
    w.flush()?;
    Ok((bytes, events))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A field of /proc/self/status in MiB (Linux only).
fn status_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn main() -> std::io::Result<()> {
    let mib = env_or("DRIFTSCOPE_BENCH_MB", 1024);
    let reps = env_or("DRIFTSCOPE_BENCH_REPS", 5).max(1);
    // DRIFTSCOPE_BENCH_DIR keeps the generated trace there (for profiling); default: a temp dir.
    let dir = tempfile::tempdir()?;
    let path = match std::env::var_os("DRIFTSCOPE_BENCH_DIR") {
        Some(d) => Path::new(&d).join("bench-trace.jsonl"),
        None => dir.path().join("bench-trace.jsonl"),
    };
    let t = Instant::now();
    let (bytes, events) = generate(&path, mib << 20)?;
    let mb = bytes as f64 / 1e6;
    println!(
        "trace: {:.0} MB, {events} events ({:.0} bytes/event), generated in {:.1} s; threads: {}",
        mb,
        bytes as f64 / events as f64,
        t.elapsed().as_secs_f64(),
        rayon::current_num_threads()
    );

    let mut floor = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        let mut f = File::open(&path)?;
        let mut buf = vec![0u8; 8 << 20];
        let mut lines = 0usize;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            lines += buf[..n].iter().filter(|&&b| b == b'\n').count();
        }
        assert!(lines as u64 > events);
        floor.push(t.elapsed().as_secs_f64());
    }
    let floor = median(floor);
    println!("read floor (read + count newlines): median {floor:.3} s = {:.0} MB/s", mb / floor);

    // Peer: the straightforward reader, serde_json into the same event struct, line by line on
    // one thread, with no pairing at all.
    let text = std::fs::read_to_string(&path)?;
    let t = Instant::now();
    let mut parsed = 0u64;
    for line in text.lines() {
        if serde_json::from_str::<driftscope_trace::StageTrace<'_>>(line).is_ok() {
            parsed += 1;
        }
    }
    let peer = t.elapsed().as_secs_f64();
    drop(text);
    assert_eq!(parsed, events);
    println!("peer: serde_json::from_str per line, 1 thread, parse only: {peer:.3} s = {:.0} MB/s", mb / peer);

    let mut times = Vec::new();
    let mut pairs = 0;
    let mut anon = 0.0f64;
    for _ in 0..reps {
        let t = Instant::now();
        let mut n = 0u64;
        driftscope_trace::read_file(&path, ReadOptions::default(), |_, _| n += 1).expect("trace reads");
        let t_parse = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let c = collect_file(&path, "prefill_last", "decode0", ReadOptions::default()).expect("trace reads");
        let t_collect = t.elapsed().as_secs_f64();
        let a = analyze(c, Options::default()).expect("trace analyzes");
        let total = t.elapsed().as_secs_f64();
        println!("  parse only {t_parse:.3} s, collect {t_collect:.3} s, analyze {:.3} s", total - t_collect);
        times.push(total);
        // Anonymous memory while the analysis is alive: what the pairs cost (the trace itself is
        // memory-mapped, so its pages count in the resident set but not here).
        anon = anon.max(status_mib("RssAnon:").unwrap_or(0.0));
        pairs = a.summary.total_pairs;
        assert_eq!(a.root_cause, Some("RESIDUAL_ADD_MISMATCH"));
    }
    let s = median(times);
    println!(
        "analyze (parse + pair + classify): median {s:.3} s over {reps} runs = {:.0} MB/s, {:.2} M events/s, {pairs} pairs",
        mb / s,
        events as f64 / s / 1e6
    );
    if let Some(peak) = status_mib("VmHWM:") {
        println!(
            "memory: analysis alive {anon:.0} MiB anonymous ({:.0} bytes/pair); peak resident {peak:.0} MiB \
             (includes the memory-mapped trace pages)",
            anon * 1048576.0 / pairs as f64
        );
    }
    Ok(())
}
