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
            eprintln!("driftscope: error: {e:#}");
            ExitCode::from(2)
        }
    }
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
