//! Command-line flags: each defined once here; `--help` is generated from these definitions.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Find where an LLM engine's prefill and decode paths stop agreeing, and say why.
///
/// Exit codes: 0 no drift, 1 drift found, 2 error.
#[derive(Debug, Parser)]
#[command(name = "driftscope", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the reference engine and analyze its trace: writes trace, report and verdict.
    ///
    /// The main job: `driftscope check` runs the built-in model with the `fast` profile.
    Check(CheckArgs),
    /// Run prompts through the reference engine's prefill and decode paths and write a trace.
    Run(RunArgs),
    /// Analyze a trace: pair two phases, find where drift originates, write the report.
    ///
    /// Without --report or --json the Markdown report goes to stdout.
    Analyze(AnalyzeArgs),
    /// Run one scenario over many prompt lengths and report where the verdict flips.
    Sweep(SweepArgs),
    /// Compare the same phase of two traces (two engines, devices, dtypes or commits).
    ///
    /// Pairs trace A's events with trace B's by (prompt, layer, point) and reports like analyze.
    Diff(DiffArgs),
}

/// What FAIL means: flags shared by `analyze`, `diff` and `check`.
#[derive(Debug, Args, Clone, Default)]
pub struct PolicyArgs {
    /// `bitwise`: any pair that is not bitwise equal fails. `tolerance`: pairs that differ within
    /// tolerance pass; only pairs beyond it (and numeric faults, misaligned or missing pairs) fail.
    #[arg(long, value_name = "POLICY", default_value = "bitwise", value_parser = ["bitwise", "tolerance"])]
    pub policy: String,

    /// Tolerances per dtype and per point (TOML; see docs/tolerances.md). Default: built-in
    /// tolerances of a few rounding steps per dtype.
    #[arg(long, value_name = "FILE.toml")]
    pub tolerances: Option<PathBuf>,
}

/// Flags of `driftscope sweep`.
#[derive(Debug, Args)]
pub struct SweepArgs {
    /// Prompt lengths: `1..1024` (inclusive), `1..1024:8` (with a step), `96,97,255..257`.
    #[arg(long, value_name = "LIST", default_value = "1..256")]
    pub lengths: String,

    /// The scenario compared with `prefill_last` at each length.
    #[arg(long, value_name = "SCENARIO", default_value = "decode0")]
    pub scenario: String,

    #[command(flatten)]
    pub model: ModelArgs,

    /// Dump the traced rows of each length (in a scratch folder) so that each analysis has exact
    /// magnitudes: bugs and rounding are then told apart down to 1e-2 in every dtype.
    #[arg(long)]
    pub dump: bool,

    /// Folder for sweep.csv and sweep.md.
    #[arg(long, value_name = "DIR", default_value = "driftscope-sweep")]
    pub out: PathBuf,
}

/// Flags of `driftscope diff`.
#[derive(Debug, Args)]
pub struct DiffArgs {
    /// The baseline trace (`-`: standard input).
    #[arg(value_name = "A.jsonl")]
    pub a: PathBuf,

    /// The candidate trace (`-`: standard input).
    #[arg(value_name = "B.jsonl")]
    pub b: PathBuf,

    /// The phase to compare in both traces.
    #[arg(long, value_name = "PHASE", default_value = "prefill_last")]
    pub phase: String,

    #[command(flatten)]
    pub output: ReportArgs,
}

/// The model and how to run and trace it: flags shared by `run`, `check` and `sweep`.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// The model: `builtin` (a small model generated from a fixed seed, no download), `smollm2`
    /// (SmolLM2-135M-Instruct fetched by scripts/fetch-smollm2.sh), a .gguf file, or a directory
    /// with config.json and *.safetensors.
    #[arg(long, value_name = "MODEL", default_value = "builtin")]
    pub model: String,

    /// Layers to trace: `all`, or a list such as `0,1,2,4,8` or `0-3,8`.
    #[arg(long, value_name = "LIST", default_value = "all")]
    pub layers: String,

    /// Points to trace: `all`, or a list such as `x_in,attn_out,mlp_out`.
    #[arg(long, value_name = "LIST", default_value = "all")]
    pub points: String,

    /// Kernel profile: `fast` (shape-dependent kernels, as production engines) or `invariant`
    /// (batch-invariant kernels: prefill and decode bitwise equal).
    #[arg(long, value_name = "PROFILE", default_value = "fast", value_parser = ["fast", "invariant", "reference"])]
    pub profile: String,

    /// Storage dtype of activations and the KV cache (compute is f32).
    #[arg(long, value_name = "DTYPE", default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    pub dtype: String,

    /// Commit a decode-path bug on purpose (decode steps only; prefills stay right; recorded in
    /// run_meta): `kv_drop` (the step runs without its KV cache), `rope_pos` (q and k rotated at
    /// pos_id + 1), `cache_off_by_one` (the step misses the last cached token),
    /// `mask_off_by_one` (the step's mask hides its own key).
    #[arg(long, value_name = "BUG", value_parser = ["kv_drop", "rope_pos", "cache_off_by_one", "mask_off_by_one"])]
    pub inject: Option<String>,
}

/// Flags shared by `run` and `check`: the model, the prompts, the scenarios, the dump.
#[derive(Debug, Args)]
pub struct EngineArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Prompts: JSON Lines of {"id": ..., "text": ...} or {"id": ..., "token_ids": [...]}.
    /// Default: p0_short, p1_medium (~150 tokens) and p2_long (~600 tokens).
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<PathBuf>,

    /// Scenarios, each compared with `prefill_last`: `decode0` (prefill N-1, decode 1), `chunkC`
    /// (prefill in chunks of C tokens), `prefix_cache` (reuse the KV cache of a shared prefix
    /// computed for another prompt), `batchB` (prefill inside a batch of B prompts of other
    /// lengths), `decodeK` (K greedy decode steps against one prefill of the sampled tokens,
    /// compared step by step). A comma-separated list.
    #[arg(long, value_name = "LIST", default_value = "decode0")]
    pub scenario: String,

    /// Also write the traced rows to a safetensors file next to the trace (same name,
    /// `.safetensors`), each event naming its tensor: the analysis then reports exact magnitudes
    /// (max |Δ|, ULPs, cosine) and the token impact of drifting logits.
    #[arg(long)]
    pub dump: bool,
}

/// Flags of `driftscope run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub engine: EngineArgs,

    /// Where to write the trace (JSON Lines).
    #[arg(long, value_name = "FILE.jsonl")]
    pub out: PathBuf,
}

/// Flags of `driftscope check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub engine: EngineArgs,

    /// Folder for trace.jsonl, report.md and verdict.json (created if needed). With several
    /// scenarios: report-<scenario>.md and verdict-<scenario>.json for each.
    #[arg(long, value_name = "DIR", default_value = "driftscope-out")]
    pub out: PathBuf,

    #[command(flatten)]
    pub policy: PolicyArgs,
}

/// Flags of `driftscope analyze`.
#[derive(Debug, Args)]
pub struct AnalyzeArgs {
    /// The trace (JSON Lines of stage_trace and run_meta events; see docs/trace-format.md); `-`
    /// reads standard input (pipes and FIFOs are read once, as they stream).
    #[arg(value_name = "TRACE.jsonl")]
    pub trace: PathBuf,

    /// The reference phase.
    #[arg(long, value_name = "PHASE", default_value = "prefill_last")]
    pub baseline: String,

    /// The phase compared against the reference.
    #[arg(long, value_name = "PHASE", default_value = "decode0")]
    pub candidate: String,

    #[command(flatten)]
    pub output: ReportArgs,
}

/// Where the analysis goes and how strict it is: flags shared by `analyze` and `diff`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Write the Markdown report to this file.
    #[arg(long, value_name = "FILE.md")]
    pub report: Option<PathBuf>,

    /// Write the JSON verdict to this file.
    #[arg(long, value_name = "FILE.json")]
    pub json: Option<PathBuf>,

    /// Skip unreadable lines and duplicate events (counted and listed in the report) instead of
    /// failing with exit code 2.
    #[arg(long)]
    pub lenient: bool,

    /// Report pairs that have an event on one side only (the verdict is then FAIL) instead of
    /// failing with exit code 2.
    #[arg(long)]
    pub allow_missing: bool,

    /// Print how long each stage took (read and pair, analyze, render, write) and the read
    /// throughput to stderr.
    #[arg(long)]
    pub timings: bool,

    #[command(flatten)]
    pub policy: PolicyArgs,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flags_parse_with_defaults() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["driftscope", "analyze", "t.jsonl"]).unwrap();
        let Command::Analyze(a) = cli.command else { panic!("analyze") };
        assert_eq!((a.baseline.as_str(), a.candidate.as_str()), ("prefill_last", "decode0"));
        assert!(a.output.report.is_none() && a.output.json.is_none() && !a.output.lenient && !a.output.allow_missing);
        let cli = Cli::try_parse_from([
            "driftscope",
            "analyze",
            "t.jsonl",
            "--baseline",
            "a",
            "--candidate",
            "b",
            "--report",
            "r.md",
            "--json",
            "v.json",
            "--lenient",
            "--allow-missing",
        ])
        .unwrap();
        let Command::Analyze(a) = cli.command else { panic!("analyze") };
        assert_eq!((a.baseline.as_str(), a.candidate.as_str()), ("a", "b"));
        assert_eq!(a.output.report.unwrap(), PathBuf::from("r.md"));
        assert!(a.output.lenient && a.output.allow_missing);
        assert!(Cli::try_parse_from(["driftscope", "analyze"]).is_err());
    }

    #[test]
    fn run_and_check_flags() {
        let cli = Cli::try_parse_from(["driftscope", "check"]).unwrap();
        let Command::Check(c) = cli.command else { panic!("check") };
        let m = &c.engine.model;
        assert_eq!((m.model.as_str(), m.profile.as_str(), m.dtype.as_str()), ("builtin", "fast", "f32"));
        assert_eq!((m.layers.as_str(), m.points.as_str()), ("all", "all"));
        assert_eq!(c.out, PathBuf::from("driftscope-out"));
        let cli = Cli::try_parse_from([
            "driftscope",
            "run",
            "--model",
            "smollm2",
            "--prompts",
            "p.jsonl",
            "--layers",
            "0,1,2,4,8",
            "--points",
            "x_in,attn_out",
            "--profile",
            "invariant",
            "--dtype",
            "bf16",
            "--out",
            "t.jsonl",
        ])
        .unwrap();
        let Command::Run(r) = cli.command else { panic!("run") };
        let m = &r.engine.model;
        assert_eq!((m.model.as_str(), m.profile.as_str(), m.dtype.as_str()), ("smollm2", "invariant", "bf16"));
        assert_eq!(r.engine.prompts, Some(PathBuf::from("p.jsonl")));
        assert!(Cli::try_parse_from(["driftscope", "run"]).is_err(), "--out is required");
        assert!(Cli::try_parse_from(["driftscope", "check", "--profile", "slow"]).is_err());
        assert!(Cli::try_parse_from(["driftscope", "check", "--dtype", "f64"]).is_err());
    }
}
