//! driftscope's analyzer: pairs the events of a baseline and a candidate phase, classifies each
//! pair, finds where drift originates using the dataflow graph of the trace points, names a root
//! cause and renders the report.
//!
//! It reads traces through `driftscope-trace` and never runs a model.

pub mod advice;
pub mod analysis;
pub mod bug_advice;
pub mod collect;
pub mod dataflow;
pub mod dump;
pub mod file_error;
pub mod gross;
pub mod magnitude;
pub mod precision;
pub mod report;
pub mod tolerance;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

pub use analysis::{analyze, Analysis, AnalyzeError, Classification, Options, PairStatus, Verdict};
pub use collect::{collect_file, collect_two, Collected, Collector};

use driftscope_trace::{is_rereadable, Loc};

/// Reads the raw text of one line back from the trace (for the report's evidence section).
pub fn read_line_at(path: &Path, loc: Loc) -> std::io::Result<String> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(loc.offset))?;
    let mut buf = vec![0u8; loc.len as usize];
    f.read_exact(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    Ok(text.trim_end_matches('\r').to_string())
}

/// The first failure's two events, pretty-printed from their files; from what was parsed when
/// a trace cannot be read again (standard input, a pipe, a FIFO: read once, as they stream).
pub fn evidence(a: &Analysis) -> std::io::Result<Option<report::Evidence>> {
    let Some(ff) = a.first_failure else { return Ok(None) };
    let p = &a.pairs[ff];
    let (Some(b), Some(c)) = (a.base(p), a.cand(p)) else { return Ok(None) };
    let rereadable = |cand: bool| is_rereadable(&a.collected.source_of(cand).path);
    let line = |cand: bool, side: &collect::Side| -> std::io::Result<String> {
        let path = &a.collected.source_of(cand).path;
        Ok(if rereadable(cand) { read_line_at(path, side.loc())? } else { rebuilt_event(a, p, side, cand) })
    };
    Ok(Some(report::Evidence {
        baseline: report::pretty::pretty_json(&line(false, b)?),
        candidate: report::pretty::pretty_json(&line(true, c)?),
        rebuilt: !rereadable(false) || !rereadable(true),
    }))
}

/// A `stage_trace` event rebuilt from what the analysis kept of it (every field it read), in the
/// format's field order.
fn rebuilt_event(a: &Analysis, p: &analysis::PairResult, s: &collect::Side, cand: bool) -> String {
    let c = &a.collected;
    let phase = if cand { &a.options.candidate } else { &a.options.baseline };
    let ev = driftscope_trace::StageTrace {
        prompt_id: c.prompts[p.key.prompt as usize].as_str().into(),
        phase: phase.as_str().into(),
        point: c.point_name(p.key.point).into(),
        layer: p.key.layer,
        step: s.step(),
        pos_id: s.pos_id(),
        seq_len: s.seq_len(),
        hash: s.hash,
        min: s.min,
        max: s.max,
        mean: s.mean,
        dtype: s.dtype().map(|d| c.dtypes[d as usize].as_str().into()),
        l2: s.l2(),
        nan_count: s.nan_count(),
        inf_count: s.inf_count(),
        token_id: s.token_id(),
        rank: p.key.rank,
        tensor: s.tensor().map(|t| c.tensors[t as usize].as_str().into()),
        ..driftscope_trace::StageTrace::empty()
    };
    serde_json::to_string(&ev).unwrap_or_default()
}
