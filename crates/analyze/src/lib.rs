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

use driftscope_trace::Loc;

/// Reads the raw text of one line back from the trace (for the report's evidence section).
pub fn read_line_at(path: &Path, loc: Loc) -> std::io::Result<String> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(loc.offset))?;
    let mut buf = vec![0u8; loc.len as usize];
    f.read_exact(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    Ok(text.trim_end_matches('\r').to_string())
}

/// The first failure's two events, pretty-printed from their files.
pub fn evidence(a: &Analysis) -> std::io::Result<Option<report::Evidence>> {
    let Some(ff) = a.first_failure else { return Ok(None) };
    let p = &a.pairs[ff];
    let (Some(b), Some(c)) = (a.base(p), a.cand(p)) else { return Ok(None) };
    let path = |cand: bool| &a.collected.source_of(cand).path;
    Ok(Some(report::Evidence {
        baseline: report::pretty::pretty_json(&read_line_at(path(false), b.loc())?),
        candidate: report::pretty::pretty_json(&read_line_at(path(true), c.loc())?),
    }))
}
