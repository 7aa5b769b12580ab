//! The `driftscope` binary: flags and glue only.
//!
//! Exit codes: 0 no drift, 1 drift found, 2 error.

mod analyze_cmd;
mod args;
mod output;
mod run_cmd;
mod sweep_cmd;

use std::process::ExitCode;

use clap::Parser;
use driftscope_analyze::Verdict;

use args::{Cli, Command};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let result = match &cli.command {
        Command::Analyze(a) => {
            keep_freed_memory();
            analyze_cmd::run(a)
        }
        Command::Diff(d) => {
            keep_freed_memory();
            analyze_cmd::diff(d)
        }
        Command::Sweep(s) => sweep_cmd::sweep(s),
        Command::Check(c) => run_cmd::check(c),
        Command::Run(r) => run_cmd::run(r).map(|()| Verdict::Pass),
    };
    match result {
        Ok(Verdict::Pass) => ExitCode::SUCCESS,
        Ok(Verdict::Fail) => ExitCode::from(1),
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("driftscope: error: {}", message(&e));
            ExitCode::from(2)
        }
    }
}

/// An error and its causes, joined by `: `, leaving out a cause whose text the message already
/// holds (typed errors that name their file often print their I/O source too).
fn message(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// glibc hands memory freed at the top of a thread's heap back to the system once more than
/// 128 KiB are free, so the trace reader's per-block buffers are faulted in afresh for every
/// block (a tenth of `analyze`'s time on a 1 GB trace): `analyze` and `diff` keep it instead.
/// Not for the engine's commands: setting this also fixes glibc's mmap threshold at 128 KiB, and
/// the engine's per-call buffers would then be mapped and faulted in at every call (`check` on
/// SmolLM2 took 3.6 s instead of 3.3 s).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt only changes a tuning parameter of the allocator; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}

#[cfg(test)]
mod tests {
    use super::message;
    use anyhow::Context;

    #[test]
    fn causes_are_printed_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory (os error 2)");
        let typed = anyhow::anyhow!("t.jsonl: No such file or directory (os error 2)").context("cannot read");
        assert_eq!(message(&typed), "cannot read: t.jsonl: No such file or directory (os error 2)");
        let chained = Err::<(), _>(io).context("t.jsonl").unwrap_err();
        assert_eq!(message(&chained), "t.jsonl: No such file or directory (os error 2)");
    }
}
