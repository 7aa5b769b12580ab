//! Report renderers: Markdown for people, JSON for machines.

pub mod bug_tier;
pub mod json;
pub mod markdown;
pub mod pretty;

/// What the renderers need beside the analysis.
#[derive(Debug, Clone, Default)]
pub struct ReportContext {
    /// The date to print when the trace's run_meta has none (YYYY-MM-DD).
    pub date: String,
    /// The raw events of the first failure, pretty-printed.
    pub evidence: Option<Evidence>,
}

/// The two raw events of the first failure, as written in the trace.
#[derive(Debug, Clone)]
pub struct Evidence {
    /// The baseline event.
    pub baseline: String,
    /// The candidate event.
    pub candidate: String,
    /// Whether they were rebuilt from the parsed events (the trace was read from a stream and
    /// cannot be read again) instead of quoted from the file.
    pub rebuilt: bool,
}
