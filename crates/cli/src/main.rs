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
        Command::Analyze(a) => analyze_cmd::run(a),
        Command::Diff(d) => analyze_cmd::diff(d),
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

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}
