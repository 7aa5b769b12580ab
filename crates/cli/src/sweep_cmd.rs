//! `driftscope sweep`: one scenario across many prompt lengths, to find where the verdict flips
//! (real engines switch kernels at lengths such as 96/97, 256 or a split size).

use std::fmt::Write as _;
use std::io::Write as _;

use anyhow::{bail, Context, Result};
use driftscope_analyze::{analyze, collect_file, Analysis, Options, Verdict};
use driftscope_engine::prompts::LONG;
use driftscope_engine::runner::{run_phase, Dump, Phase, Prompt, RunSpec};
use driftscope_trace::ReadOptions;
use indicatif::ProgressBar;

use crate::args::SweepArgs;
use crate::output::{check_outputs, write_atomic};
use crate::run_cmd::{resolve_model, run_spec};

/// One length's outcome.
struct Row {
    length: usize,
    verdict: Verdict,
    root_cause: String,
    first: String,
    failed: u64,
    total: u64,
    /// The gross origin (`attn_ctx[0]`) or `-`.
    gross: String,
    /// The largest difference ÷ rounding bound of any pair (`-` without drift).
    ratio: String,
}

/// `1..1024`, `1..1024:8` (inclusive, with a step) or `96,97,255,256,257`, or a mix; every
/// length at most `max` (the model's context), checked before any list is built.
pub fn parse_lengths(text: &str, max: usize) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("--lengths: `{part}` is not a length, A..B or A..B:STEP");
        let number = |s: &str| -> Result<usize> {
            let n: u128 = s.trim().parse().ok().with_context(bad)?;
            if n > max as u128 {
                bail!("--lengths: `{part}`: {n} is more than the model's context of {max}");
            }
            Ok(n as usize)
        };
        let (range, step) = match part.split_once(':') {
            Some((r, s)) => (r, s.trim().parse::<u128>().ok().filter(|&s| s > 0).with_context(bad)?),
            None => (part, 1),
        };
        match range.split_once("..") {
            Some((a, b)) => {
                let (a, b) = (number(a)?, number(b)?);
                if a == 0 || a > b {
                    bail!("--lengths: `{part}` must go from 1 or more up to at least its start");
                }
                out.extend((a..=b).step_by(step.min(max as u128) as usize));
            }
            None => out.push(Some(number(range)?).filter(|&n| n > 0).with_context(bad)?),
        }
    }
    out.sort_unstable();
    out.dedup();
    if out.is_empty() {
        bail!("--lengths: no length given");
    }
    Ok(out)
}

/// Runs the sweep; returns FAIL if any length fails.
pub fn sweep(args: &SweepArgs) -> Result<Verdict> {
    let phase = Phase::parse(&args.scenario)
        .filter(|p| *p != Phase::PrefillLast && !matches!(p, Phase::DecodeK(_)))
        .with_context(|| {
            format!("--scenario: `{}` cannot be swept (use decode0, chunkC, prefix_cache or batchB)", args.scenario)
        })?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let (csv_path, md_path) = (args.out.join("sweep.csv"), args.out.join("sweep.md"));
    check_outputs(&[], &[&csv_path, &md_path])?;

    let (loaded, model_desc) = resolve_model(&args.model.model)?;
    let model = &loaded.model;
    let lengths = parse_lengths(&args.lengths, model.config.max_context)?;
    let max = *lengths.last().unwrap_or(&1);
    // Prompts of every length are prefixes of one long token sequence (the default text, repeated).
    let text_tokens = loaded.tokenizer.encode(LONG)?;
    let tokens: Vec<u32> = text_tokens.iter().copied().cycle().take(max).collect();
    let spec = run_spec(&args.model, model.config.n_layers)?;
    let scratch = tempfile::tempdir().context("cannot create a scratch folder")?;
    let trace = scratch.path().join("trace.jsonl");
    let bar = ProgressBar::new(lengths.len() as u64);
    let mut rows = Vec::with_capacity(lengths.len());
    for &n in &lengths {
        bar.set_message(format!("length {n}"));
        let prompt = Prompt { id: format!("len{n}"), tokens: tokens[..n].to_vec() };
        let mut buf = Vec::new();
        let mut dump = args.dump.then(Dump::default);
        for p in [Phase::PrefillLast, phase] {
            run_phase(model, &prompt, p, &spec, &mut buf, dump.as_mut())?;
        }
        if let Some(dump) = &dump {
            write_atomic(&trace.with_extension("safetensors"), &dump.to_bytes().context("cannot serialize the dump")?)?;
        }
        write_atomic(&trace, &buf)?;
        let options = Options { candidate: phase.name(), ..Options::default() };
        let c = collect_file(&trace, &options.baseline, &options.candidate, ReadOptions::default())?;
        rows.push(summarize(n, &analyze(c, options)?));
        bar.inc(1);
    }
    bar.finish_and_clear();

    let mut csv =
        String::from("length,verdict,root_cause,first_failure,failed_pairs,total_pairs,gross_origin,max_bound_ratio\n");
    for r in &rows {
        let verdict = if r.verdict == Verdict::Pass { "PASS" } else { "FAIL" };
        let _ = writeln!(
            csv,
            "{},{verdict},{},{},{},{},{},{}",
            r.length, r.root_cause, r.first, r.failed, r.total, r.gross, r.ratio
        );
    }
    write_atomic(&csv_path, csv.as_bytes())?;
    let md = render(&rows, &model_desc, &spec, phase);
    write_atomic(&md_path, md.as_bytes())?;
    let mut out = std::io::stdout().lock();
    out.write_all(md.as_bytes())?;
    writeln!(out, "\ncsv: {}\nreport: {}", csv_path.display(), md_path.display())?;
    Ok(if rows.iter().any(|r| r.verdict == Verdict::Fail) { Verdict::Fail } else { Verdict::Pass })
}

fn summarize(length: usize, a: &Analysis) -> Row {
    let first = a.first_failure.and_then(|i| a.pairs[i].node).map_or_else(|| "-".to_string(), |n| n.to_string());
    let gross = a.groups.iter().find_map(|g| g.gross.as_ref()).map_or_else(|| "-".to_string(), |o| o.node.to_string());
    let largest = a
        .groups
        .iter()
        .filter_map(|g| g.largest)
        .map(|j| j.ratio())
        .fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.max(r))));
    Row {
        length,
        verdict: a.verdict,
        root_cause: a.root_cause.unwrap_or("-").to_string(),
        first,
        failed: a.summary.failed,
        total: a.summary.total_pairs,
        gross,
        ratio: largest.map_or_else(|| "-".to_string(), |r| format!("{r:.3e}")),
    }
}

/// The lengths where the outcome changes, as a table.
fn render(rows: &[Row], model: &str, spec: &RunSpec, phase: Phase) -> String {
    let mut md = format!(
        "# driftscope sweep: `prefill_last` vs `{}` over {} prompt lengths\n\n**Model**: {model}  \n**Kernel Profile**: {}  \n**Dtype**: {}\n\n",
        phase.name(),
        rows.len(),
        spec.profile.as_str(),
        spec.dtype.as_str()
    );
    let fails = rows.iter().filter(|r| r.verdict == Verdict::Fail).count();
    let _ = writeln!(md, "{fails} of {} lengths fail.\n", rows.len());
    let gross = rows.iter().filter(|r| r.gross != "-").count();
    if gross > 0 {
        let _ = writeln!(md, "{gross} of {} lengths have a gross origin: a bug, not rounding.\n", rows.len());
    }
    let largest = rows.iter().filter_map(|r| r.ratio.parse::<f64>().ok()).fold(f64::NAN, f64::max);
    if largest.is_finite() && gross == 0 {
        let _ =
            writeln!(md, "No gross origin: the largest drift is {:.0}% of what rounding explains.\n", largest * 100.0);
    }
    md.push_str(
        "| From length | To length | Verdict | Root cause | First failure | Gross origin |\n|---|---|---|---|---|---|\n",
    );
    let mut i = 0;
    while i < rows.len() {
        let mut j = i;
        let same = |x: &Row, y: &Row| {
            x.verdict == y.verdict && x.root_cause == y.root_cause && x.first == y.first && x.gross == y.gross
        };
        while j + 1 < rows.len() && same(&rows[j + 1], &rows[i]) {
            j += 1;
        }
        let r = &rows[i];
        let verdict = if r.verdict == Verdict::Pass { "PASS" } else { "FAIL" };
        let _ = writeln!(
            md,
            "| {} | {} | {verdict} | {} | {} | {} |",
            r.length, rows[j].length, r.root_cause, r.first, r.gross
        );
        i = j + 1;
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use driftscope_engine::Profile;
    use driftscope_trace::DType;

    #[test]
    fn length_lists() {
        assert_eq!(parse_lengths("1..5", 100).unwrap(), [1, 2, 3, 4, 5]);
        assert_eq!(parse_lengths("1..10:4", 100).unwrap(), [1, 5, 9]);
        assert_eq!(parse_lengths("97,96,255..257", 300).unwrap(), [96, 97, 255, 256, 257]);
        assert_eq!(parse_lengths("1..9:18446744073709551616", 100).unwrap(), [1]);
        assert!(parse_lengths("0..4", 100).is_err());
        assert!(parse_lengths("5..4", 100).is_err());
        assert!(parse_lengths("1..4:0", 100).is_err());
        assert!(parse_lengths("0", 100).is_err());
        assert!(parse_lengths("x", 100).unwrap_err().to_string().contains("`x` is not a length"));
        // Bounded before anything is built: two billion lengths, or a number past u64.
        for text in ["1..2000000000", "1..18446744073709551615", "5..99999999999999999999999", "8193"] {
            let e = parse_lengths(text, 8192).unwrap_err().to_string();
            assert!(e.contains("is more than the model's context of 8192"), "{text}: {e}");
        }
    }

    #[test]
    fn flips_are_grouped() {
        let row = |length, fail: bool, cause: &str| Row {
            length,
            verdict: if fail { Verdict::Fail } else { Verdict::Pass },
            root_cause: cause.into(),
            first: "-".into(),
            failed: 0,
            total: 1,
            gross: "-".into(),
            ratio: "-".into(),
        };
        let rows = [row(1, false, "-"), row(2, false, "-"), row(3, true, "X"), row(4, true, "X"), row(5, false, "-")];
        let spec = RunSpec { profile: Profile::Fast, dtype: DType::F32, layers: None, points: None, fault: None };
        let md = render(&rows, "m", &spec, Phase::Decode0);
        assert!(
            md.contains("| 1 | 2 | PASS | - | - | - |\n| 3 | 4 | FAIL | X | - | - |\n| 5 | 5 | PASS | - | - | - |"),
            "{md}"
        );
        assert!(md.contains("2 of 5 lengths fail."));
    }
}
