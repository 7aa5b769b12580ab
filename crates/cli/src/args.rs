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
    /// Analyze a trace: pair two phases, find where drift originates, write the report.
    ///
    /// Without --report or --json the Markdown report goes to stdout.
    Analyze(AnalyzeArgs),
}

/// Flags of `driftscope analyze`.
#[derive(Debug, Args)]
pub struct AnalyzeArgs {
    /// The trace (JSON Lines of stage_trace and run_meta events; see docs/trace-format.md).
    #[arg(value_name = "TRACE.jsonl")]
    pub trace: PathBuf,

    /// The reference phase.
    #[arg(long, value_name = "PHASE", default_value = "prefill_last")]
    pub baseline: String,

    /// The phase compared against the reference.
    #[arg(long, value_name = "PHASE", default_value = "decode0")]
    pub candidate: String,

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

    /// Report pairs that have an event in one phase only (the verdict is then FAIL) instead of
    /// failing with exit code 2.
    #[arg(long)]
    pub allow_missing: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flags_parse_with_defaults() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["driftscope", "analyze", "t.jsonl"]).unwrap();
        let Command::Analyze(a) = cli.command;
        assert_eq!((a.baseline.as_str(), a.candidate.as_str()), ("prefill_last", "decode0"));
        assert!(a.report.is_none() && a.json.is_none() && !a.lenient && !a.allow_missing);
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
        let Command::Analyze(a) = cli.command;
        assert_eq!((a.baseline.as_str(), a.candidate.as_str()), ("a", "b"));
        assert_eq!(a.report.unwrap(), PathBuf::from("r.md"));
        assert!(a.lenient && a.allow_missing);
        assert!(Cli::try_parse_from(["driftscope", "analyze"]).is_err());
    }
}
