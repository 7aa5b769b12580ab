//! Trace builders shared by the integration tests, and the generator of `examples/`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use driftscope_trace::hash_bytes;

/// One stage_trace event as a JSON line.
#[derive(Clone, Debug)]
pub struct Ev {
    pub prompt: String,
    pub phase: String,
    pub point: String,
    pub layer: u32,
    pub step: u64,
    pub pos: u64,
    pub seq_len: u64,
    pub hash: u64,
    pub stats: [f64; 3],
    pub extra: String,
}

impl Ev {
    pub fn line(&self) -> String {
        format!(
            r#"{{"event":"stage_trace","prompt_id":"{}","phase":"{}","point":"{}","layer":{},"step":{},"pos_id":{},"seq_len":{},"hash":{},"min":{},"max":{},"mean":{}{}}}"#,
            self.prompt,
            self.phase,
            self.point,
            self.layer,
            self.step,
            self.pos,
            self.seq_len,
            self.hash,
            self.stats[0],
            self.stats[1],
            self.stats[2],
            self.extra
        )
    }
}

/// A deterministic hash for a named row.
pub fn h(name: &str) -> u64 {
    hash_bytes(name.as_bytes())
}

/// Deterministic stats for a row: a range that depends on the name.
pub fn stats(name: &str) -> [f64; 3] {
    let x = (h(name) % 1000) as f64 / 1000.0;
    let scale = 0.01 + x * 0.05;
    [round6(-scale * 0.8), round6(scale), round6(scale * 0.003 - 0.0001)]
}

fn round6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

/// Builds a prefill_last/decode0 trace for `prompts` (id, pos_id) over `points` at `layers`.
/// `drifts(prompt, point, layer)` says which rows differ; a differing row gets another hash and
/// stats perturbed by `rel`.
pub fn trace(
    prompts: &[(&str, u64)],
    rows: &[(&str, u32)],
    drifts: impl Fn(&str, &str, u32) -> bool,
    rel: f64,
) -> Vec<Ev> {
    let mut out = Vec::new();
    for phase in ["prefill_last", "decode0"] {
        for &(prompt, pos) in prompts {
            for &(point, layer) in rows {
                let name = format!("{prompt}/{point}/{layer}");
                let mut ev = Ev {
                    prompt: prompt.into(),
                    phase: phase.into(),
                    point: point.into(),
                    layer,
                    step: if phase == "decode0" { 1 } else { 0 },
                    pos,
                    seq_len: if phase == "decode0" { 1 } else { pos + 1 },
                    hash: h(&name),
                    stats: stats(&name),
                    extra: String::new(),
                };
                if phase == "decode0" && drifts(prompt, point, layer) {
                    ev.hash = h(&format!("{name}/decode"));
                    let f = 1.0 + rel * (1.0 + layer as f64);
                    ev.stats = [round6(ev.stats[0] * f), round6(ev.stats[1] * f), ev.stats[2] * f];
                }
                out.push(ev);
            }
        }
    }
    out
}

/// The rows of the seed report: embed_out, then x_in, attn_out, mlp_out at layers 0, 1, 2, 4, 8.
pub fn seed_rows() -> Vec<(&'static str, u32)> {
    let mut rows = vec![("embed_out", 0)];
    for l in [0, 1, 2, 4, 8] {
        rows.extend([("x_in", l), ("attn_out", l), ("mlp_out", l)]);
    }
    rows
}

pub const SEED_PROMPTS: [(&str, u64); 3] = [("p0_short", 37), ("p1_medium", 151), ("p2_long", 603)];

/// The trace behind the seed report: embed_out and x_in[0] match, everything after differs; the
/// first failure carries the report's published hashes and stats.
pub fn seed_trace() -> String {
    let drifts = |_: &str, point: &str, layer: u32| !(point == "embed_out" || (point == "x_in" && layer == 0));
    let mut evs = trace(&SEED_PROMPTS, &seed_rows(), drifts, 0.004);
    for ev in &mut evs {
        if ev.prompt == "p0_short" && ev.point == "attn_out" && ev.layer == 0 {
            if ev.phase == "prefill_last" {
                ev.hash = 4144761570523161186;
                ev.stats = [-0.00517679, 0.00719859, -0.0000471849];
            } else {
                ev.hash = 10153995460507501903;
                ev.stats = [-0.00519423, 0.00725079, -0.0000474128];
            }
        }
    }
    let meta = r#"{"event":"run_meta","format_version":1,"engine":"reconstructed from the B3.66 seed report","host":"MI300X","run_mode":"Single SSH Connection","date":"2026-02-07"}"#;
    let mut text = String::from(meta);
    text.push('\n');
    for ev in evs {
        text.push_str(&ev.line());
        text.push('\n');
    }
    text
}

pub fn join(evs: &[Ev]) -> String {
    evs.iter().map(|e| e.line() + "\n").collect()
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs the binary.
pub fn driftscope(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_driftscope")).args(args).current_dir(cwd).output().expect("binary runs")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Writes a trace into a fresh directory and analyzes it with `--json`; returns (exit code,
/// verdict JSON or Null, stdout, stderr).
pub fn analyze_text(text: &[u8], extra: &[&str]) -> (i32, serde_json::Value, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let trace = dir.path().join("trace.jsonl");
    std::fs::write(&trace, text).expect("write");
    let mut args = vec!["analyze", "trace.jsonl", "--json", "v.json", "--report", "r.md"];
    args.extend_from_slice(extra);
    let out = driftscope(&args, dir.path());
    let json = std::fs::read_to_string(dir.path().join("v.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(serde_json::Value::Null);
    let md = std::fs::read_to_string(dir.path().join("r.md")).unwrap_or_default();
    (out.status.code().unwrap_or(-1), json, md, stderr(&out))
}
