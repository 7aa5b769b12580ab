//! `driftscope run` and `driftscope check`: glue between the flags, the engine, the trace file and
//! the analyzer.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use anyhow::{bail, Context, Result};
use driftscope_analyze::{collect_file, Options, Verdict};
use driftscope_engine::load::{cache_dir, find_smollm2, load};
use driftscope_engine::prompts::{default_prompts, read_prompts};
use driftscope_engine::runner::{run_phase, write_meta, Dump, Phase, Prompt, RunSpec};
use driftscope_engine::synthetic::default_model;
use driftscope_engine::{Fault, Loaded, Profile, Tokenizer};
use driftscope_trace::{DType, Point, ReadOptions, RunMeta, FORMAT_VERSION};
use indicatif::{ProgressBar, ProgressStyle};

use crate::analyze_cmd::{analyze_to, verdict_line, Timings};
use crate::args::{CheckArgs, EngineArgs, ModelArgs, RunArgs};
use crate::output::{check_outputs, write_atomic};

/// `driftscope run`.
pub fn run(args: &RunArgs) -> Result<()> {
    check_outputs(&args.engine.prompts.iter().map(PathBuf::as_path).collect::<Vec<_>>(), &[&args.out])?;
    trace_to(&args.engine, &args.out)?;
    Ok(())
}

/// `driftscope check`: run, then analyze each scenario against `prefill_last`; returns FAIL if
/// any scenario fails.
pub fn check(args: &CheckArgs) -> Result<Verdict> {
    let scenarios = parse_scenarios(&args.engine.scenario)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let trace = args.out.join("trace.jsonl");
    let comparisons: Vec<(String, String)> = scenarios.iter().flat_map(|p| p.comparisons()).collect();
    let outputs: Vec<(String, String, PathBuf, PathBuf)> = comparisons
        .iter()
        .map(|(b, c)| match comparisons.len() {
            1 => (b.clone(), c.clone(), args.out.join("report.md"), args.out.join("verdict.json")),
            _ => (
                b.clone(),
                c.clone(),
                args.out.join(format!("report-{c}.md")),
                args.out.join(format!("verdict-{c}.json")),
            ),
        })
        .collect();
    let mut inputs: Vec<&Path> = args.engine.prompts.iter().map(PathBuf::as_path).collect();
    inputs.extend(args.policy.tolerances.as_deref());
    let mut files: Vec<&Path> = vec![&trace];
    files.extend(outputs.iter().flat_map(|(_, _, r, v)| [r.as_path(), v.as_path()]));
    check_outputs(&inputs, &files)?;
    trace_to(&args.engine, &trace)?;
    let (policy, tolerances) = crate::analyze_cmd::policy(&args.policy)?;
    let mut overall = Verdict::Pass;
    let mut out = std::io::stdout().lock();
    let mut greedy_flips: Vec<String> = Vec::new();
    for (baseline, candidate, report, verdict_path) in &outputs {
        let options = Options {
            baseline: baseline.clone(),
            candidate: candidate.clone(),
            policy,
            tolerances: tolerances.clone(),
            ..Options::default()
        };
        let collected = collect_file(&trace, &options.baseline, &options.candidate, ReadOptions::default())?;
        let (analysis, _) = analyze_to(collected, options, Some(report), Some(verdict_path), &mut Timings::new(false))?;
        if analysis.verdict == Verdict::Fail {
            overall = Verdict::Fail;
        }
        for g in &analysis.groups {
            if g.token_impact.is_some_and(|t| !t.argmax_agree) {
                greedy_flips.push(format!("`{}` at {candidate}", analysis.prompt_id(g)));
            }
        }
        let label = if outputs.len() > 1 { format!("{candidate}: ") } else { String::new() };
        writeln!(out, "{label}{}", verdict_line(&analysis))?;
        let impacts: Vec<_> = analysis.groups.iter().filter_map(|g| g.token_impact).collect();
        if !impacts.is_empty() {
            let kl = impacts.iter().map(|t| t.kl).fold(0.0, f64::max);
            let agree = impacts.iter().filter(|t| t.argmax_agree).count();
            writeln!(
                out,
                "  token impact: greedy token agrees for {agree} of {} prompts, max KL {kl:.2e}",
                impacts.len()
            )?;
        }
        writeln!(out, "  report: {}  verdict: {}", report.display(), verdict_path.display())?;
    }
    if args.engine.dump {
        match greedy_flips.first() {
            Some(_) => writeln!(out, "greedy token differs: {}", greedy_flips.join(", "))?,
            None => writeln!(out, "greedy token: the same in every comparison")?,
        }
    }
    writeln!(out, "trace: {}", trace.display())?;
    Ok(overall)
}

/// The most prompts a `batchB` scenario batches: a serving engine's batch, and at most 256 times
/// a prompt's rows in memory.
pub const MAX_BATCH: usize = 256;

/// `decode0,chunk64,prefix_cache`: the scenarios to compare with `prefill_last`.
pub fn parse_scenarios(text: &str) -> Result<Vec<Phase>> {
    let mut out = Vec::new();
    for name in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match Phase::parse(name) {
            Some(Phase::PrefillLast) => {
                bail!("--scenario: `prefill_last` is the baseline every scenario is compared with")
            }
            Some(Phase::Batch(b)) if b > MAX_BATCH => {
                bail!("--scenario: `{name}` batches {b} prompts, more than the limit of {MAX_BATCH}")
            }
            Some(p) if !out.contains(&p) => out.push(p),
            Some(_) => {}
            None => {
                bail!(
                    "--scenario: unknown scenario `{name}` (known: decode0, decodeK such as decode8, chunkC such as \
                     chunk64, prefix_cache, batchB such as batch4)"
                )
            }
        }
    }
    if out.is_empty() {
        bail!("--scenario: no scenario given");
    }
    Ok(out)
}

/// Runs the engine over the prompts and writes the trace atomically to `path`.
fn trace_to(args: &EngineArgs, path: &Path) -> Result<()> {
    let started = Instant::now();
    let (loaded, model_desc) = resolve_model(&args.model.model)?;
    let model = &loaded.model;
    let c = &model.config;
    let prompts = match &args.prompts {
        Some(p) => read_prompts(p, &loaded.tokenizer, c.vocab)?,
        None => default_prompts(&loaded.tokenizer)?,
    };
    if let Some(p) = prompts.iter().find(|p| p.tokens.len() > c.max_context) {
        bail!("prompt `{}` has {} tokens, more than the model's context of {}", p.id, p.tokens.len(), c.max_context);
    }
    let scenarios = parse_scenarios(&args.scenario)?;
    for s in &scenarios {
        if let Phase::DecodeK(k) = *s {
            if k >= c.max_context {
                bail!(
                    "--scenario: `decode{k}` takes {k} decode steps, more than the model's context of {}",
                    c.max_context
                );
            }
            if let Some(p) = prompts.iter().find(|p| p.tokens.len() <= k) {
                bail!(
                    "--scenario: `decode{k}` needs prompts of at least {} tokens ({k} decode steps after a prefill of \
                     one); prompt `{}` has {}",
                    k + 1,
                    p.id,
                    p.tokens.len()
                );
            }
        }
    }
    let spec = run_spec(&args.model, c.n_layers)?;
    let meta = RunMeta {
        format_version: Some(FORMAT_VERSION),
        engine: Some(format!("driftscope-engine {}", env!("CARGO_PKG_VERSION"))),
        model: Some(model_desc),
        n_layers: Some(c.n_layers as u32),
        dtype: Some(spec.dtype.as_str().into()),
        device: Some(device()),
        host: host(),
        profile: Some(spec.profile.as_str().into()),
        date: Some(humantime::format_rfc3339_seconds(SystemTime::now()).to_string()),
        command: Some(std::env::args().collect::<Vec<_>>().join(" ")),
        run_mode: Some("single process, CPU".into()),
        kv_cache_dtype: Some(spec.dtype.as_str().into()),
        weight_dtype: Some(model.weights.weight_dtype()),
        // The activations are rounded to the storage dtype before every matmul, which computes
        // in f32 on weights widened exactly.
        matmul_input_dtype: Some(spec.dtype.as_str().into()),
        inject: spec.fault.map(|f| f.as_str().into()),
        ..RunMeta::default()
    };

    let mut dump = args.dump.then(Dump::default);
    let mut buf = BufWriter::new(Vec::new());
    write_meta(&mut buf, &meta)?;
    let phases: Vec<Phase> = std::iter::once(Phase::PrefillLast).chain(scenarios).collect();
    let bar = progress((prompts.len() * phases.len()) as u64);
    let mut events = 0;
    for prompt in &prompts {
        for &phase in &phases {
            bar.set_message(format!("{} {} ({} tokens)", prompt.id, phase.name(), prompt.tokens.len()));
            let (_, n) = run_phase(model, prompt, phase, &spec, &mut buf, dump.as_mut())?;
            events += n;
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let bytes = buf.into_inner().context("cannot buffer the trace")?;
    if let Some(dump) = &dump {
        let dump_path = path.with_extension("safetensors");
        let data = dump.to_bytes().context("cannot serialize the dump")?;
        write_atomic(&dump_path, &data)?;
        eprintln!("dumped {} rows -> {}", dump.len(), dump_path.display());
    }
    write_atomic(path, &bytes)?;
    eprintln!(
        "traced {} prompt(s) ({} tokens) x {} phases on {} ({} profile, {}{}): {events} events in {:.1} s -> {}",
        prompts.len(),
        describe_lengths(&prompts),
        phases.len(),
        c.name,
        spec.profile.as_str(),
        spec.dtype.as_str(),
        spec.fault.map(|f| format!(", injected bug {f}: {}", f.describe())).unwrap_or_default(),
        started.elapsed().as_secs_f64(),
        path.display()
    );
    Ok(())
}

fn describe_lengths(prompts: &[Prompt]) -> String {
    prompts.iter().map(|p| p.tokens.len().to_string()).collect::<Vec<_>>().join(", ")
}

fn progress(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} {msg} ({elapsed})") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// The model named on the command line, and how to describe it in the trace.
pub fn resolve_model(spec: &str) -> Result<(Loaded, String)> {
    match spec {
        "builtin" => {
            let model = default_model();
            let desc = model.config.name.clone();
            Ok((Loaded { model, tokenizer: Tokenizer::Bytes }, desc))
        }
        "smollm2" => {
            let Some(path) = find_smollm2() else {
                let dir = cache_dir().map(|d| d.join("smollm2").display().to_string()).unwrap_or_default();
                bail!("SmolLM2 is not in the cache ({dir}); fetch it with `bash scripts/fetch-smollm2.sh`");
            };
            let loaded = load(&path)?;
            Ok((loaded, "SmolLM2-135M-Instruct (Q4_1 GGUF)".into()))
        }
        path => {
            let p = Path::new(path);
            if !p.exists() {
                bail!("{path}: no such model file or directory (or use `builtin` or `smollm2`)");
            }
            let loaded = load(p)?;
            let name = p.file_name().map_or_else(|| path.to_string(), |f| f.to_string_lossy().into_owned());
            Ok((loaded, name))
        }
    }
}

/// What the model flags ask for.
pub fn run_spec(args: &ModelArgs, n_layers: usize) -> Result<RunSpec> {
    Ok(RunSpec {
        profile: Profile::parse(&args.profile).with_context(|| format!("unknown profile `{}`", args.profile))?,
        dtype: DType::parse(&args.dtype).with_context(|| format!("unknown dtype `{}`", args.dtype))?,
        layers: parse_layers(&args.layers, n_layers)?,
        points: parse_points(&args.points)?,
        fault: match &args.inject {
            Some(name) => Some(Fault::parse(name).with_context(|| format!("unknown bug `{name}` for --inject"))?),
            None => None,
        },
    })
}

/// `all`, or `0,1,2,4,8`, or `0-3,8`; every layer must exist.
pub fn parse_layers(text: &str, n_layers: usize) -> Result<Option<Vec<u32>>> {
    if text == "all" {
        return Ok(None);
    }
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let parse =
            |s: &str| s.trim().parse::<u32>().with_context(|| format!("--layers: `{part}` is not a layer or range"));
        let (a, b) = (parse(a)?, parse(b)?);
        if a > b {
            bail!("--layers: `{part}` runs backwards (write `{b}-{a}`)");
        }
        if b as usize >= n_layers {
            bail!("--layers: `{part}` is outside the model's layers 0-{}", n_layers - 1);
        }
        out.extend(a..=b);
    }
    if out.is_empty() {
        bail!("--layers: no layer given");
    }
    out.sort_unstable();
    out.dedup();
    Ok(Some(out))
}

/// `all`, or a comma-separated list of trace points.
pub fn parse_points(text: &str) -> Result<Option<Vec<Point>>> {
    if text == "all" {
        return Ok(None);
    }
    let points: Vec<Point> = text
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<Point>().map_err(|e| anyhow::anyhow!("--points: {e}")))
        .collect::<Result<_>>()?;
    if points.is_empty() {
        bail!("--points: no point given");
    }
    Ok(Some(points))
}

fn device() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    format!("cpu ({cpu}, {} threads)", std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn host() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string()).filter(|h| !h.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_lists() {
        assert_eq!(parse_layers("all", 30).unwrap(), None);
        assert_eq!(parse_layers("0,1,2,4,8", 30).unwrap(), Some(vec![0, 1, 2, 4, 8]));
        assert_eq!(parse_layers("8,0-2,2", 30).unwrap(), Some(vec![0, 1, 2, 8]));
        assert!(parse_layers("30", 30).unwrap_err().to_string().contains("outside the model's layers 0-29"));
        assert!(parse_layers("x", 30).is_err());
        assert!(parse_layers("3-1", 30).is_err());
    }

    #[test]
    fn scenario_lists() {
        assert_eq!(parse_scenarios("decode0").unwrap(), [Phase::Decode0]);
        assert_eq!(
            parse_scenarios("decode0, chunk64,prefix_cache,decode0").unwrap(),
            [Phase::Decode0, Phase::Chunked(64), Phase::PrefixCache]
        );
        assert!(parse_scenarios("chunk0").unwrap_err().to_string().contains("unknown scenario `chunk0`"));
        assert!(parse_scenarios("prefill_last").is_err());
        assert_eq!(parse_scenarios("batch4,decode8").unwrap(), [Phase::Batch(4), Phase::DecodeK(8)]);
        assert!(parse_scenarios("batch1").unwrap_err().to_string().contains("known: decode0"));
        let e = parse_scenarios("batch100000").unwrap_err().to_string();
        assert!(e.contains("batches 100000 prompts, more than the limit of 256"), "{e}");
        let e = parse_scenarios("batch18446744073709551615").unwrap_err().to_string();
        assert!(e.contains("more than the limit of 256"), "{e}");
        assert!(parse_scenarios("batch99999999999999999999").unwrap_err().to_string().contains("unknown scenario"));
    }

    #[test]
    fn point_lists() {
        assert_eq!(parse_points("all").unwrap(), None);
        assert_eq!(parse_points("x_in, attn_out").unwrap(), Some(vec![Point::XIn, Point::AttnOut]));
        assert!(parse_points("x_in,attn").unwrap_err().to_string().contains("unknown trace point `attn`"));
    }
}
