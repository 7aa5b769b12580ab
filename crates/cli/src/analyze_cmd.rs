//! `driftscope analyze`: glue between the flags, the analyzer and the output files.

use std::io::Write;
use std::path::Path;
use std::time::{Instant, SystemTime};

use anyhow::{bail, Context, Result};
use driftscope_analyze::report::{json::write_verdict, markdown, ReportContext};
use driftscope_analyze::tolerance::{Policy, Tolerances};
use driftscope_analyze::{analyze, collect_file, collect_two, evidence, Analysis, Collected, Options, Verdict};
use driftscope_trace::{is_stdin, ReadOptions};

use crate::args::{AnalyzeArgs, DiffArgs, PolicyArgs, ReportArgs};
use crate::output::{check_outputs, write_atomic, write_atomic_with};

/// Runs the analysis; returns the verdict.
pub fn run(args: &AnalyzeArgs) -> Result<Verdict> {
    let out = &args.output;
    if args.baseline == args.candidate {
        bail!(
            "--baseline and --candidate both name phase `{}`: a phase compared with itself always passes; name \
             two phases (default: prefill_last and decode0)",
            args.baseline
        );
    }
    check_paths(&[&args.trace], out)?;
    let options = options(&args.baseline, &args.candidate, out)?;
    let mut clock = Timings::new(out.timings);
    let collected = collect_file(&args.trace, &options.baseline, &options.candidate, read_options(out))?;
    clock.read(&collected);
    report(collected, options, out, clock)
}

/// `driftscope diff`: the same phase of two traces; returns the verdict.
pub fn diff(args: &DiffArgs) -> Result<Verdict> {
    let out = &args.output;
    if is_stdin(&args.a) && is_stdin(&args.b) {
        bail!("A.jsonl and B.jsonl are both `-`: only one trace can come from standard input");
    }
    check_paths(&[&args.a, &args.b], out)?;
    let options = options(&args.phase, &args.phase, out)?;
    let mut clock = Timings::new(out.timings);
    let collected = collect_two(&args.a, &args.b, &args.phase, read_options(out))?;
    clock.read(&collected);
    report(collected, options, out, clock)
}

/// `--timings`: wall time of each stage, printed to stderr as it ends.
pub struct Timings {
    on: bool,
    start: Instant,
    last: Instant,
    bytes: u64,
}

impl Timings {
    /// A clock that prints only when `on`.
    pub fn new(on: bool) -> Timings {
        let now = Instant::now();
        Timings { on, start: now, last: now, bytes: 0 }
    }

    /// Ends the read stage: also prints the throughput.
    fn read(&mut self, c: &Collected) {
        self.bytes = c.sources.iter().map(|s| s.read.bytes).sum();
        let events: u64 = c.sources.iter().map(|s| s.read.stage_events).sum();
        let secs = self.last.elapsed().as_secs_f64();
        self.lap(&format!(
            "read and pair: {} events, {:.0} MB ({:.0} MB/s)",
            events,
            self.bytes as f64 / 1e6,
            self.bytes as f64 / 1e6 / secs.max(1e-9)
        ));
    }

    /// Ends a stage named `what`.
    fn lap(&mut self, what: &str) {
        if self.on {
            eprintln!("timings: {what}: {:.3} s", self.last.elapsed().as_secs_f64());
        }
        self.last = Instant::now();
    }

    /// Prints the total and the end-to-end throughput.
    fn total(&self) {
        if self.on {
            let secs = self.start.elapsed().as_secs_f64();
            eprintln!("timings: total: {secs:.3} s ({:.0} MB/s of trace)", self.bytes as f64 / 1e6 / secs.max(1e-9));
        }
    }
}

/// Refuses output files that would overwrite the traces, the tolerance file or each other.
fn check_paths(traces: &[&Path], out: &ReportArgs) -> Result<()> {
    let files = traces.iter().copied().filter(|t| !is_stdin(t));
    let inputs: Vec<&Path> = files.chain(out.policy.tolerances.as_deref()).collect();
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
fn report(collected: Collected, options: Options, out: &ReportArgs, mut clock: Timings) -> Result<Verdict> {
    let (analysis, md) = analyze_to(collected, options, out.report.as_deref(), out.json.as_deref(), &mut clock)?;
    let verdict = print_result(&analysis, &md, outputs(out).is_empty())?;
    clock.lap("print");
    // The analysis of a large trace holds millions of small allocations: the process is about to
    // exit, so leave them to the operating system instead of freeing them one by one.
    std::mem::forget(analysis);
    clock.total();
    Ok(verdict)
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
    clock: &mut Timings,
) -> Result<(Analysis, String)> {
    let analysis = analyze(collected, options)?;
    clock.lap("analyze");
    let ctx = ReportContext {
        date: today(),
        evidence: evidence(&analysis).context("cannot read the evidence lines back from the trace")?,
    };
    let md = markdown::render(&analysis, &ctx);
    clock.lap("render the report");
    if let Some(path) = json {
        write_atomic_with(path, |w| write_verdict(&analysis, &mut { w }))?;
        clock.lap("write the JSON verdict");
    }
    if let Some(path) = report {
        write_atomic(path, md.as_bytes())?;
        clock.lap("write the report");
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
            let gross = a.first_gross.and_then(|i| a.groups[i].gross.as_ref());
            if let Some(o) = gross {
                let j = &o.judged;
                s.push_str(&format!(
                    "; gross origin: {}, {} vs rounding bound {}",
                    a.pair_name(j.pair).replace('`', ""),
                    driftscope_analyze::bug_advice::rel(j.rel_delta),
                    driftscope_analyze::bug_advice::rel(j.bound)
                ));
            }
            if let Some(ff) = a.first_failure {
                s.push_str(&format!("; first divergence: {}", a.pair_name(ff).replace('`', "")));
                if let (Some(o), Some(c)) = (gross, a.rounding_root_cause) {
                    if o.judged.pair != ff {
                        s.push_str(&format!(" ({c}, rounding)"));
                    }
                }
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
