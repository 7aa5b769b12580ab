//! `driftscope analyze`: glue between the flags, the analyzer and the output files.

use std::io::Write;
use std::path::Path;
use std::time::SystemTime;

use anyhow::{Context, Result};
use driftscope_analyze::report::{json::verdict_json, markdown, ReportContext};
use driftscope_analyze::tolerance::{Policy, Tolerances};
use driftscope_analyze::{analyze, collect_file, collect_two, evidence, Analysis, Collected, Options, Verdict};
use driftscope_trace::ReadOptions;

use crate::args::{AnalyzeArgs, DiffArgs, PolicyArgs, ReportArgs};
use crate::output::{check_outputs, write_atomic};

/// Runs the analysis; returns the verdict.
pub fn run(args: &AnalyzeArgs) -> Result<Verdict> {
    let out = &args.output;
    check_paths(&[&args.trace], out)?;
    let options = options(&args.baseline, &args.candidate, out)?;
    let collected = collect_file(&args.trace, &options.baseline, &options.candidate, read_options(out))?;
    report(collected, options, out)
}

/// `driftscope diff`: the same phase of two traces; returns the verdict.
pub fn diff(args: &DiffArgs) -> Result<Verdict> {
    let out = &args.output;
    check_paths(&[&args.a, &args.b], out)?;
    let options = options(&args.phase, &args.phase, out)?;
    let collected = collect_two(&args.a, &args.b, &args.phase, read_options(out))?;
    report(collected, options, out)
}

/// Refuses output files that would overwrite the traces, the tolerance file or each other.
fn check_paths(traces: &[&Path], out: &ReportArgs) -> Result<()> {
    let inputs: Vec<&Path> = traces.iter().copied().chain(out.policy.tolerances.as_deref()).collect();
    check_outputs(&inputs, &outputs(out))
}

fn outputs(out: &ReportArgs) -> Vec<&Path> {
    out.report.iter().chain(out.json.iter()).map(|p| p.as_path()).collect()
}

fn read_options(out: &ReportArgs) -> ReadOptions {
    ReadOptions { lenient: out.lenient, ..ReadOptions::default() }
}

/// The analysis options the flags ask for.
fn options(baseline: &str, candidate: &str, out: &ReportArgs) -> Result<Options> {
    let (policy, tolerances) = policy(&out.policy)?;
    Ok(Options {
        baseline: baseline.to_string(),
        candidate: candidate.to_string(),
        allow_missing: out.allow_missing,
        lenient: out.lenient,
        policy,
        tolerances,
    })
}

/// Analyzes, writes the files asked for, and prints the report or the verdict line.
fn report(collected: Collected, options: Options, out: &ReportArgs) -> Result<Verdict> {
    let (analysis, md) = analyze_to(collected, options, out.report.as_deref(), out.json.as_deref())?;
    print_result(&analysis, &md, outputs(out).is_empty())
}

/// Prints the Markdown report when no output file was asked for, else the one-line verdict.
fn print_result(analysis: &Analysis, md: &str, to_stdout: bool) -> Result<Verdict> {
    let mut stdout = std::io::stdout().lock();
    if to_stdout {
        stdout.write_all(md.as_bytes())?;
    } else {
        writeln!(stdout, "{}", verdict_line(analysis))?;
    }
    stdout.flush()?;
    Ok(analysis.verdict)
}

/// Analyzes what was collected and writes the Markdown report and the JSON verdict where asked
/// (atomically); returns the analysis and the Markdown.
pub fn analyze_to(
    collected: Collected,
    options: Options,
    report: Option<&Path>,
    json: Option<&Path>,
) -> Result<(Analysis, String)> {
    let analysis = analyze(collected, options)?;
    let ctx = ReportContext {
        date: today(),
        evidence: evidence(&analysis).context("cannot read the evidence lines back from the trace")?,
    };
    let md = markdown::render(&analysis, &ctx);
    if let Some(path) = json {
        let mut text = serde_json::to_string_pretty(&verdict_json(&analysis))?;
        text.push('\n');
        write_atomic(path, text.as_bytes())?;
    }
    if let Some(path) = report {
        write_atomic(path, md.as_bytes())?;
    }
    Ok((analysis, md))
}

/// The policy and tolerances the flags ask for.
pub fn policy(args: &PolicyArgs) -> Result<(Policy, Tolerances)> {
    let policy = match args.policy.as_str() {
        "tolerance" => Policy::Tolerance,
        _ => Policy::Bitwise,
    };
    let tolerances = match &args.tolerances {
        Some(path) => Tolerances::from_file(path)?,
        None => Tolerances::default(),
    };
    Ok((policy, tolerances))
}

/// `FAIL + ROOT_CAUSE: X (first divergence: ...)` or `PASS (...)`.
pub fn verdict_line(a: &Analysis) -> String {
    match a.verdict {
        Verdict::Pass if a.summary.within_tol > 0 => format!(
            "PASS (policy: tolerance): {} of {} pairs differ within tolerance, the rest bitwise identical",
            a.summary.within_tol, a.summary.total_pairs
        ),
        Verdict::Pass => format!("PASS: all {} pairs bitwise identical", a.summary.total_pairs),
        Verdict::Fail => {
            let mut s = format!(
                "FAIL + ROOT_CAUSE: {} ({} of {} pairs fail, {} missing",
                a.root_cause.unwrap_or("UNLOCALIZED"),
                a.summary.failed,
                a.summary.total_pairs,
                a.summary.missing_pairs
            );
            if let Some(ff) = a.first_failure {
                s.push_str(&format!("; first divergence: {}", a.pair_name(ff).replace('`', "")));
            }
            s.push(')');
            s
        }
    }
}

fn today() -> String {
    let now = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    now.get(..10).unwrap_or(&now).to_string()
}
