//! Pairing, classification, origin analysis and the verdict.

use std::collections::BTreeSet;

use rayon::prelude::*;
use rustc_hash::FxHashMap;
use std::fmt::Write as _;

use driftscope_trace::{DType, Point, RunMeta};

use crate::collect::{Collected, Key, PointId, Side, Slot};
use crate::dataflow::{cause_of_region, op_of, Graph, Node};
use crate::dump::{dump_path, DumpFile};
use crate::file_error::FileError;
use crate::gross::{self, GrossOrigin, Judged, Precisions};
use crate::magnitude::{compare_rows, token_impact, Magnitude, TokenImpact};
use crate::precision::{Known, Precision};
use crate::tolerance::{Policy, TolClass, Tolerances};

/// What the analysis compares and how strict it is.
#[derive(Debug, Clone)]
pub struct Options {
    /// The reference phase (`prefill_last`).
    pub baseline: String,
    /// The phase checked against it (`decode0`).
    pub candidate: String,
    /// Report pairs present in one phase only instead of failing with an error.
    pub allow_missing: bool,
    /// Keep the first of two events for the same key and phase instead of failing.
    pub lenient: bool,
    /// What FAIL means: any bitwise difference, or only differences beyond tolerance.
    pub policy: Policy,
    /// The tolerances pairs are classed with.
    pub tolerances: Tolerances,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            baseline: "prefill_last".into(),
            candidate: "decode0".into(),
            allow_missing: false,
            lenient: false,
            policy: Policy::Bitwise,
            tolerances: Tolerances::default(),
        }
    }
}

/// Why a trace cannot be analyzed (its lines parsed, but the events do not fit together).
#[derive(Debug, thiserror::Error)]
pub enum AnalyzeError {
    /// One of the two phases has no event at all.
    #[error("{file}: no `{phase}` events (phases present: {present}); choose phases with --baseline/--candidate")]
    PhaseAbsent {
        /// The trace file.
        file: String,
        /// The absent phase.
        phase: String,
        /// The phases that are there, with their event counts.
        present: String,
    },
    /// A dump file next to a trace is unreadable.
    #[error(transparent)]
    Dump(#[from] FileError),
    /// The two dumped rows of a pair differ in length.
    #[error(
        "{file}: the dumped rows of one pair differ in length: `{baseline}` has {baseline_len} values, \
         `{candidate}` has {candidate_len}; both sides of a pair must dump the whole row"
    )]
    DumpLengths {
        /// The (baseline's) dump file.
        file: String,
        /// The baseline's tensor.
        baseline: String,
        /// Its length.
        baseline_len: usize,
        /// The candidate's tensor.
        candidate: String,
        /// Its length.
        candidate_len: usize,
    },
    /// Two events for the same key and phase.
    #[error("{}\n(use --lenient to keep the first event of each key and go on)", .list.join("\n"))]
    Duplicates {
        /// One line per duplicate, naming both lines.
        list: Vec<String>,
    },
    /// Pairs with an event in one phase only.
    #[error("{}\n(use --allow-missing to report missing pairs instead of failing)", .list.join("\n"))]
    MissingPairs {
        /// One line per missing pair (at most 20, then a count).
        list: Vec<String>,
    },
}

const _: () = {
    let mut i = 0;
    while i < PairStatus::ALL.len() {
        assert!(PairStatus::ALL[i].index() == i, "PairStatus::ALL lists each status at its index");
        i += 1;
    }
};

/// How one pair compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PairStatus {
    /// Hashes equal: bitwise identical rows.
    Pass,
    /// Hashes differ.
    Drift,
    /// Hashes differ and NaN/Inf appear on one side only.
    NumericFault,
    /// The two events are not about the same token (pos_id or token_id differ).
    Misaligned,
    /// Only the candidate phase has the event.
    MissingBaseline,
    /// Only the baseline phase has the event.
    MissingCandidate,
}

impl PairStatus {
    /// Every status, each at its [`PairStatus::index`].
    pub const ALL: [PairStatus; 6] = [
        PairStatus::Pass,
        PairStatus::Drift,
        PairStatus::NumericFault,
        PairStatus::Misaligned,
        PairStatus::MissingBaseline,
        PairStatus::MissingCandidate,
    ];

    /// Position in [`PairStatus::ALL`] (a new status fails to compile here until it is listed).
    pub const fn index(self) -> usize {
        match self {
            PairStatus::Pass => 0,
            PairStatus::Drift => 1,
            PairStatus::NumericFault => 2,
            PairStatus::Misaligned => 3,
            PairStatus::MissingBaseline => 4,
            PairStatus::MissingCandidate => 5,
        }
    }

    /// Whether the pair counts as a failure (complete pairs that are not bitwise equal).
    pub fn is_failure(self) -> bool {
        matches!(self, PairStatus::Drift | PairStatus::NumericFault | PairStatus::Misaligned)
    }
    /// Whether one side is absent.
    pub fn is_missing(self) -> bool {
        matches!(self, PairStatus::MissingBaseline | PairStatus::MissingCandidate)
    }
}

/// Where a drifting pair's drift comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Classification {
    /// Its nearest traced upstream points all match: the drift starts in the ops in between.
    Originated,
    /// A nearest traced upstream point drifts too.
    Inherited,
    /// A nearest traced upstream point is missing or misaligned: origin cannot be decided.
    Undetermined,
    /// The point is outside the vocabulary, so it has no place in the dataflow graph.
    Unplaced,
}

/// Stat deltas between the two sides: the evidence of magnitude when no dump exists.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct StatDelta {
    /// |Δmin|.
    pub d_min: f64,
    /// |Δmax|.
    pub d_max: f64,
    /// |Δmean|.
    pub d_mean: f64,
    /// |Δl2|, when both sides carry l2.
    pub d_l2: Option<f64>,
    /// max(|Δmin|, |Δmax|, |Δmean|): a lower bound on the largest element-wise |Δ|.
    pub max_abs_lower_bound: f64,
    /// That bound relative to the row's largest magnitude (max(|min|, |max|) of the baseline).
    pub rel: f64,
}

impl StatDelta {
    pub(crate) fn of(b: &Side, c: &Side) -> StatDelta {
        let d = |x: f64, y: f64| if x == y { 0.0 } else { (x - y).abs() };
        let (d_min, d_max, d_mean) = (d(b.min, c.min), d(b.max, c.max), d(b.mean, c.mean));
        let bound = d_min.max(d_max).max(d_mean);
        let scale = b.min.abs().max(b.max.abs());
        StatDelta {
            d_min,
            d_max,
            d_mean,
            d_l2: b.l2().zip(c.l2()).map(|(x, y)| d(x, y)),
            max_abs_lower_bound: bound,
            rel: if scale > 0.0 { bound / scale } else { bound },
        }
    }
}

/// One compared key.
#[derive(Debug, Clone)]
pub struct PairResult {
    /// The key.
    pub key: Key,
    /// Its node in the dataflow graph (`None` for points outside the vocabulary).
    pub node: Option<Node>,
    /// How it compares.
    pub status: PairStatus,
    /// For failures: where the drift comes from.
    pub classification: Option<Classification>,
    /// How a drifting pair relates to its upstream: its lists in [`Analysis::relation_nodes`]
    /// (read them with [`Analysis::inherited_from`] and its siblings).
    pub relations: Option<Relations>,
    /// The baseline event (index into [`Collected::sides`]).
    pub baseline: Option<u32>,
    /// The candidate event (index into [`Collected::sides`]).
    pub candidate: Option<u32>,
    /// Exact magnitudes, when both rows were dumped (boxed: most traces have no dump).
    pub magnitude: Option<Box<Magnitude>>,
    /// Class under the tolerances (complete, aligned pairs only).
    pub tol_class: Option<TolClass>,
}

/// The upstream points a drifting pair was judged by: three lists, one after the other in
/// [`Analysis::relation_nodes`] from `start` (one shared array instead of small allocations for
/// millions of pairs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Relations {
    start: u32,
    /// For inherited drift: the drifting upstream points it comes from.
    inherited: u32,
    /// For originated or undetermined drift: the untraced ops between it and the traced upstream.
    untraced: u32,
    /// For undetermined drift: the upstream points that are missing or misaligned.
    unknown: u32,
}

impl Relations {
    /// Appends the three lists to `nodes` and returns where they are.
    fn push(nodes: &mut Vec<Node>, inherited: &[Node], untraced: &[Node], unknown: &[Node]) -> Relations {
        let start = nodes.len() as u32;
        for list in [inherited, untraced, unknown] {
            nodes.extend_from_slice(list);
        }
        let len = |l: &[Node]| l.len() as u32; // a list is at most the graph's nodes
        Relations { start, inherited: len(inherited), untraced: len(untraced), unknown: len(unknown) }
    }

    /// The three lists' ranges in the shared array.
    fn ranges(self) -> [std::ops::Range<usize>; 3] {
        let s = self.start as usize;
        let (a, b, c) = (self.inherited as usize, self.untraced as usize, self.unknown as usize);
        [s..s + a, s + a..s + a + b, s + a + b..s + a + b + c]
    }
}

/// A place where drift starts.
#[derive(Debug, Clone)]
pub struct Origin {
    /// The drifting pair where it is first seen (index into [`Analysis::pairs`]).
    pub pair: usize,
    /// Its node.
    pub node: Node,
    /// The ops that may have caused it: the untraced nodes in between and the node itself,
    /// in dataflow order.
    pub region: Vec<Node>,
    /// The nearest traced upstream points, all matching.
    pub upstream: Vec<Node>,
    /// Root cause named by the region.
    pub cause: &'static str,
    /// Producing layers spanned by the region.
    pub layers: Option<(u32, u32)>,
}

/// One prompt (and rank) of the trace.
#[derive(Debug, Clone)]
pub struct Group {
    /// Prompt index (file order).
    pub prompt: u32,
    /// Tensor-parallel rank.
    pub rank: Option<u32>,
    /// Its pairs in dataflow order (a contiguous run of [`Analysis::pairs`]).
    pub pairs: std::ops::Range<usize>,
    /// Passing pairs.
    pub passed: u64,
    /// Failing pairs.
    pub failed: u64,
    /// Missing pairs.
    pub missing: u64,
    /// Failing pairs that inherit their drift from a drifting upstream point.
    pub inherited: u64,
    /// Where drift starts, in dataflow order.
    pub origins: Vec<Origin>,
    /// The group's first failing pair.
    pub first_failure: Option<usize>,
    /// The group's root cause (`None` when it passes).
    pub cause: Option<&'static str>,
    /// What drifting logits do to the next token (from the dump).
    pub token_impact: Option<TokenImpact>,
    /// The first pair far above what rounding explains (see [`crate::gross`]).
    pub gross: Option<GrossOrigin>,
    /// The pair that came nearest its rounding bound (or went furthest past it).
    pub largest: Option<Judged>,
    /// The first failing pair judged against its rounding bound.
    pub first_judged: Option<Judged>,
}

impl Group {
    /// The group's root cause: its gross origin's bug class when it has one, else the rounding
    /// cause of its first divergence.
    pub fn root_cause(&self) -> Option<&'static str> {
        self.gross.as_ref().map(|g| g.class).or(self.cause)
    }
}

/// Counts of the summary table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    /// Keys seen in either phase.
    pub total_pairs: u64,
    /// Bitwise-equal pairs.
    pub passed: u64,
    /// Failing pairs (drift, numeric fault, misaligned).
    pub failed: u64,
    /// Keys seen in one phase only.
    pub missing_pairs: u64,
    /// Of the failures: pairs about different tokens.
    pub misaligned: u64,
    /// Of the failures: pairs where NaN/Inf appear on one side only.
    pub numeric_faults: u64,
    /// Second events for a key and phase, dropped (lenient mode).
    pub duplicates: u64,
    /// Lines skipped as unreadable (lenient mode).
    pub skipped_lines: u64,
    /// Of the complete pairs: hashes differ, within tolerance.
    pub within_tol: u64,
    /// Of the complete pairs: beyond tolerance (drift or numeric fault).
    pub beyond_tol: u64,
}

/// PASS or FAIL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verdict {
    /// Every pair bitwise equal and complete.
    Pass,
    /// Some pair differs, or is missing.
    Fail,
}

/// The complete result of analyzing one trace.
#[derive(Debug)]
pub struct Analysis {
    /// What was compared.
    pub options: Options,
    /// How the report names the baseline: its phase, or for a diff its file and phase.
    pub baseline_label: String,
    /// How the report names the candidate.
    pub candidate_label: String,
    /// What was read.
    pub collected: Collected,
    /// The graph used for origin analysis.
    pub graph: Graph,
    /// Every key, grouped by prompt, in dataflow order.
    pub pairs: Vec<PairResult>,
    /// The lists of every pair's [`Relations`].
    pub relation_nodes: Vec<Node>,
    /// Per prompt (and rank), in file order.
    pub groups: Vec<Group>,
    /// Counts.
    pub summary: Summary,
    /// Failure classes and counts, largest first.
    pub breakdown: Vec<(String, u64)>,
    /// PASS or FAIL.
    pub verdict: Verdict,
    /// The root cause: the bug class of the first gross origin when a prompt has one, else the
    /// rounding cause of the first failing prompt.
    pub root_cause: Option<&'static str>,
    /// The root cause of the first failing prompt's first divergence (the rounding tier).
    pub rounding_root_cause: Option<&'static str>,
    /// The first group (prompt order) with a gross origin.
    pub first_gross: Option<usize>,
    /// The precisions drifts were judged against.
    pub precisions: Precisions,
    /// The first failing pair in dataflow order (prompts in file order).
    pub first_failure: Option<usize>,
    /// Whether magnitudes come from dumped rows (exact) or from statistics (bounds).
    pub magnitudes_from_dump: bool,
    /// What the report should say about dumps (missing files, missing tensors).
    pub dump_notes: Vec<String>,
}

impl Analysis {
    /// The drifting upstream points of a pair (inherited drift).
    pub fn inherited_from(&self, p: &PairResult) -> &[Node] {
        self.relation_list(p, 0)
    }
    /// The untraced ops between a pair and its traced upstream.
    pub fn untraced_between(&self, p: &PairResult) -> &[Node] {
        self.relation_list(p, 1)
    }
    /// The missing or misaligned upstream points of a pair (undetermined drift).
    pub fn unknown_upstream(&self, p: &PairResult) -> &[Node] {
        self.relation_list(p, 2)
    }
    fn relation_list(&self, p: &PairResult, which: usize) -> &[Node] {
        p.relations.map_or(&[], |r| &self.relation_nodes[r.ranges()[which].clone()])
    }

    /// The merged run metadata of the baseline's file (later `run_meta` events fill fields earlier
    /// ones left empty).
    pub fn meta(&self) -> RunMeta {
        self.meta_of(false)
    }

    /// The merged run metadata of the file of one side.
    pub fn meta_of(&self, candidate: bool) -> RunMeta {
        let mut merged = RunMeta::default();
        for (m, _) in &self.collected.source_of(candidate).metas {
            macro_rules! fill {
                ($($f:ident),*) => {$( if merged.$f.is_none() { merged.$f = m.$f.clone(); } )*};
            }
            fill!(
                format_version,
                engine,
                model,
                n_layers,
                dtype,
                device,
                host,
                profile,
                date,
                command,
                run_mode,
                kv_cache_dtype,
                weight_dtype,
                matmul_input_dtype,
                inject
            );
            for (k, v) in &m.extra {
                merged.extra.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        merged
    }

    /// A pair's key in words: `attn_out` layer 0 of `p0_short`.
    pub fn pair_name(&self, i: usize) -> String {
        let k = &self.pairs[i].key;
        let mut s = format!(
            "`{}` layer {} of `{}`",
            self.collected.point_name(k.point),
            k.layer,
            self.collected.prompts[k.prompt as usize]
        );
        if let Some(r) = k.rank {
            let _ = write!(s, " (rank {r})");
        }
        s
    }

    /// The prompt id of a group.
    pub fn prompt_id(&self, g: &Group) -> &str {
        &self.collected.prompts[g.prompt as usize]
    }

    /// The baseline event of a pair.
    pub fn base(&self, p: &PairResult) -> Option<&Side> {
        p.baseline.map(|i| &self.collected.sides[i as usize])
    }

    /// The candidate event of a pair.
    pub fn cand(&self, p: &PairResult) -> Option<&Side> {
        p.candidate.map(|i| &self.collected.sides[i as usize])
    }

    /// Stat deltas of a complete pair.
    pub fn delta(&self, p: &PairResult) -> Option<StatDelta> {
        self.base(p).zip(self.cand(p)).map(|(b, c)| StatDelta::of(b, c))
    }

    /// The dtype of a pair, when its events name one.
    pub fn dtype_of(&self, i: usize) -> Option<DType> {
        let p = &self.pairs[i];
        let idx = self.base(p).and_then(|s| s.dtype()).or(self.cand(p).and_then(|s| s.dtype()))?;
        DType::parse(&self.collected.dtypes[idx as usize])
    }

    /// The storage dtype of pair `i`: its events', else the trace's (stated by run_meta or
    /// inferred from the magnitudes), with whether the events name it.
    pub fn storage_dtype(&self, i: usize) -> (Option<DType>, bool) {
        if let Some(d) = self.dtype_of(i) {
            return (Some(d), true);
        }
        let d = match self.precisions.storage.0 {
            Precision::F32 => Some(DType::F32),
            Precision::F16 => Some(DType::F16),
            Precision::BF16 => Some(DType::BF16),
            _ => None,
        };
        (d, false)
    }

    /// Pair `i` judged against its rounding bound, when the bug tier measured it (a group's first
    /// failure, gross origin or largest excess).
    pub fn judged(&self, i: usize) -> Option<Judged> {
        let g = self.groups.iter().find(|g| g.pairs.contains(&i))?;
        [g.first_judged, g.gross.as_ref().map(|o| o.judged), g.largest].into_iter().flatten().find(|j| j.pair == i)
    }

    /// The failing groups' distinct root causes.
    pub fn distinct_causes(&self) -> BTreeSet<&'static str> {
        self.groups.iter().filter_map(|g| g.cause).collect()
    }
}

/// Compares the baseline and candidate events of a collected trace (or pair of traces).
pub fn analyze(mut collected: Collected, options: Options) -> Result<Analysis, AnalyzeError> {
    check_phases(&collected, &options)?;
    let file_of = |c: &Collected, candidate: bool| c.source_of(candidate).path.display().to_string();
    if !collected.duplicates.is_empty() && !options.lenient {
        let list = collected
            .duplicates
            .iter()
            .map(|d| {
                let file = collected.sources[d.source].path.display();
                format!(
                    "{file}:{} and {file}:{}: two `{}` events for prompt `{}`, layer {}, point `{}`{}",
                    d.first_line,
                    d.second_line,
                    d.phase,
                    collected.prompts[d.key.prompt as usize],
                    d.key.layer,
                    collected.point_name(d.key.point),
                    d.key.rank.map(|r| format!(", rank {r}")).unwrap_or_default()
                )
            })
            .collect();
        return Err(AnalyzeError::Duplicates { list });
    }

    let max_layer = collected
        .pairs
        .par_iter()
        .filter(|(k, _)| matches!(k.point, PointId::Known(p) if p.is_per_layer()))
        .map(|(k, _)| k.layer)
        .max();
    let traced_layers = max_layer.map_or(0, |l| l + 1);
    let meta_layers = collected.sources.iter().flat_map(|s| &s.metas).find_map(|(m, _)| m.n_layers);
    let graph = match meta_layers {
        Some(n) if n >= traced_layers => Graph { n_layers: n, exact: true },
        _ => Graph { n_layers: traced_layers, exact: false },
    };

    let mut pairs: Vec<PairResult> = {
        let (slots, sides) = (&collected.pairs, &collected.sides);
        collected.order.par_iter().map(|&i| compare(&slots[i as usize].0, &slots[i as usize].1, sides)).collect()
    };
    // Freed by a worker when one is idle (returning large blocks to the system takes a while).
    let (order, slots) = (std::mem::take(&mut collected.order), std::mem::take(&mut collected.pairs));
    rayon::spawn(move || drop((order, slots)));

    let missing: Vec<usize> = (0..pairs.len()).into_par_iter().filter(|&i| pairs[i].status.is_missing()).collect();
    if !missing.is_empty() && !options.allow_missing {
        let mut list: Vec<String> = missing
            .iter()
            .take(20)
            .map(|&i| {
                let p = &pairs[i];
                let (present, absent, side, cand) = match p.status {
                    PairStatus::MissingCandidate => (&options.baseline, &options.candidate, p.baseline, false),
                    _ => (&options.candidate, &options.baseline, p.candidate, true),
                };
                let line = side.map_or(0, |s| collected.sides[s as usize].line());
                let file = file_of(&collected, cand);
                format!(
                    "{file}:{line}: `{present}` event for prompt `{}`, layer {}, point `{}` has no `{absent}` event to pair with",
                    collected.prompts[p.key.prompt as usize],
                    p.key.layer,
                    collected.point_name(p.key.point)
                )
            })
            .collect();
        if missing.len() > 20 {
            list.push(format!("... and {} more missing pair(s)", missing.len() - 20));
        }
        return Err(AnalyzeError::MissingPairs { list });
    }

    // Groups: runs of the same (prompt, rank); pairs are sorted so each group is contiguous.
    let starts: Vec<usize> = (0..pairs.len())
        .into_par_iter()
        .filter(|&i| {
            i == 0 || (pairs[i].key.prompt, pairs[i].key.rank) != (pairs[i - 1].key.prompt, pairs[i - 1].key.rank)
        })
        .collect();
    let mut groups: Vec<Group> = starts
        .iter()
        .zip(starts.iter().skip(1).copied().chain([pairs.len()]))
        .map(|(&start, end)| Group {
            prompt: pairs[start].key.prompt,
            rank: pairs[start].key.rank,
            pairs: start..end,
            passed: 0,
            failed: 0,
            missing: 0,
            inherited: 0,
            origins: vec![],
            first_failure: None,
            cause: None,
            token_impact: None,
            gross: None,
            largest: None,
            first_judged: None,
        })
        .collect();
    // Classify the groups in parallel, each on its own slice of the pairs.
    let slices = group_slices(&groups, &mut pairs);
    let lists: Vec<Vec<Node>> =
        groups.par_iter_mut().zip(slices).map(|(g, slice)| classify_group(g, slice, &graph)).collect();
    // One array of relation lists: each group's own, moved by the lengths of those before it.
    let mut relation_nodes = Vec::with_capacity(lists.iter().map(Vec::len).sum());
    let mut offsets = Vec::with_capacity(groups.len());
    for list in lists {
        offsets.push(relation_nodes.len() as u32);
        relation_nodes.extend(list);
    }
    group_slices(&groups, &mut pairs).into_par_iter().zip(offsets).filter(|(_, offset)| *offset > 0).for_each(
        |(slice, offset)| {
            for r in slice.iter_mut().filter_map(|p| p.relations.as_mut()) {
                r.start += offset;
            }
        },
    );

    let mut summary = Summary {
        total_pairs: pairs.len() as u64,
        duplicates: collected.duplicates.len() as u64,
        skipped_lines: collected.skipped_lines(),
        ..Summary::default()
    };
    // Counts and failure classes, counted on all cores and added up.
    let (counts, classes) = pairs
        .par_iter()
        .fold(
            || (Summary::default(), Classes::default()),
            |(mut s, mut classes), p| {
                match p.status {
                    PairStatus::Pass => s.passed += 1,
                    st if st.is_missing() => s.missing_pairs += 1,
                    st => {
                        s.failed += 1;
                        s.numeric_faults += u64::from(st == PairStatus::NumericFault);
                        s.misaligned += u64::from(st == PairStatus::Misaligned);
                        classes.add(p.key.point, st, 1);
                    }
                }
                (s, classes)
            },
        )
        .reduce(
            || (Summary::default(), Classes::default()),
            |(mut a, mut ca), (b, cb)| {
                (a.passed, a.missing_pairs, a.failed) =
                    (a.passed + b.passed, a.missing_pairs + b.missing_pairs, a.failed + b.failed);
                (a.numeric_faults, a.misaligned) = (a.numeric_faults + b.numeric_faults, a.misaligned + b.misaligned);
                ca.merge(cb);
                (a, ca)
            },
        );
    (summary.passed, summary.missing_pairs, summary.failed) = (counts.passed, counts.missing_pairs, counts.failed);
    (summary.numeric_faults, summary.misaligned) = (counts.numeric_faults, counts.misaligned);
    let mut breakdown: Vec<((PointId, PairStatus), u64)> = classes.into_vec();
    breakdown.sort_by(|a, b| b.1.cmp(&a.1).then(a.0 .0.cmp(&b.0 .0)).then((a.0 .1 as u8).cmp(&(b.0 .1 as u8))));
    let breakdown = breakdown
        .into_iter()
        .map(|((point, status), n)| (drift_class(collected.point_name(point), status), n))
        .collect();

    let (baseline_label, candidate_label) = if collected.is_diff() {
        let name = |cand: bool| {
            let p = &collected.source_of(cand).path;
            p.file_name().map_or_else(|| p.display().to_string(), |f| f.to_string_lossy().into_owned())
        };
        (format!("{} ({})", name(false), options.baseline), format!("{} ({})", name(true), options.candidate))
    } else {
        (options.baseline.clone(), options.candidate.clone())
    };
    let (magnitudes_from_dump, dump_notes) = attach_dumps(&collected, &mut pairs, &mut groups)?;
    let dtypes: Vec<Option<DType>> = collected.dtypes.iter().map(|d| DType::parse(d)).collect();
    (summary.within_tol, summary.beyond_tol) = pairs
        .par_iter_mut()
        .map(|p| {
            p.tol_class = tolerance_class(&collected, &dtypes, p, &options.tolerances);
            match p.tol_class {
                Some(TolClass::WithinTol) => (1, 0),
                Some(TolClass::Drift | TolClass::NumericFault) => (0, 1),
                _ => (0, 0),
            }
        })
        .reduce(|| (0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    // Under the tolerance policy only what is beyond tolerance fails; the root cause is still the
    // origin of the drift, which may itself be within tolerance.
    let fails = |p: &PairResult| match options.policy {
        Policy::Bitwise => p.status.is_failure(),
        Policy::Tolerance => {
            p.status == PairStatus::Misaligned || matches!(p.tol_class, Some(TolClass::Drift | TolClass::NumericFault))
        }
    };
    let first_failure = (0..pairs.len()).find(|&i| fails(&pairs[i]));
    let failing_group = first_failure.map(|i| (pairs[i].key.prompt, pairs[i].key.rank));
    let missing_fails = summary.missing_pairs > 0;
    let verdict = if first_failure.is_some() || missing_fails { Verdict::Fail } else { Verdict::Pass };
    let root_cause = match failing_group {
        Some((prompt, rank)) => groups.iter().find(|g| g.prompt == prompt && g.rank == rank).and_then(|g| g.cause),
        None if missing_fails => groups.iter().find_map(|g| g.cause),
        None => None,
    };
    let mut a = Analysis {
        precisions: Precisions { storage: (Precision::BF16, Known::Assumed(String::new())), kv: None, matmul: None },
        rounding_root_cause: root_cause,
        first_gross: None,
        magnitudes_from_dump,
        dump_notes,
        root_cause,
        first_failure,
        options,
        baseline_label,
        candidate_label,
        collected,
        graph,
        pairs,
        relation_nodes,
        groups,
        summary,
        breakdown,
        verdict,
    };
    judge_gross(&mut a);
    Ok(a)
}

/// The bug tier: each group's gross origin, and the root cause it names (see [`crate::gross`]).
fn judge_gross(a: &mut Analysis) {
    let mut precisions = gross::stated_precisions(a);
    let judged = {
        let storage = gross::storage_of(a, precisions.storage.0);
        gross::infer_ops(a, &mut precisions, &storage);
        gross::judge(a, &precisions, &storage)
    };
    for (g, j) in a.groups.iter_mut().zip(judged) {
        (g.gross, g.largest, g.first_judged) = (j.origin, j.largest, j.first);
    }
    a.precisions = precisions;
    a.first_gross = a.groups.iter().position(|g| g.gross.is_some());
    if let Some(g) = a.first_gross.and_then(|i| a.groups[i].gross.as_ref()) {
        if a.verdict == Verdict::Fail {
            a.root_cause = Some(g.class);
        }
    }
}

/// Failure classes and their counts: points of the vocabulary in a table, others in a map.
struct Classes {
    known: Vec<u64>,
    other: FxHashMap<(PointId, PairStatus), u64>,
}

impl Default for Classes {
    fn default() -> Self {
        Classes { known: vec![0; Point::ALL.len() * PairStatus::ALL.len()], other: FxHashMap::default() }
    }
}

impl Classes {
    /// Where a point of the vocabulary and a status count in `known`.
    fn slot(p: Point, status: PairStatus) -> usize {
        p.index() * PairStatus::ALL.len() + status.index()
    }

    fn add(&mut self, point: PointId, status: PairStatus, n: u64) {
        match point {
            PointId::Known(p) => self.known[Self::slot(p, status)] += n,
            PointId::Other(_) => *self.other.entry((point, status)).or_insert(0) += n,
        }
    }

    fn merge(&mut self, b: Classes) {
        for (x, y) in self.known.iter_mut().zip(b.known) {
            *x += y;
        }
        for ((point, status), n) in b.other {
            self.add(point, status, n);
        }
    }

    /// The classes with a non-zero count.
    fn into_vec(self) -> Vec<((PointId, PairStatus), u64)> {
        let Classes { known, other } = self;
        let classes = Point::ALL.iter().flat_map(|&p| PairStatus::ALL.iter().map(move |&st| (p, st)));
        classes
            .filter_map(|(p, st)| {
                let n = known[Self::slot(p, st)];
                (n > 0).then_some(((PointId::Known(p), st), n))
            })
            .chain(other)
            .collect()
    }
}

/// Each group's own slice of `pairs` (groups are contiguous runs of it, in order).
fn group_slices<'p>(groups: &[Group], mut pairs: &'p mut [PairResult]) -> Vec<&'p mut [PairResult]> {
    groups
        .iter()
        .map(|g| {
            let (head, tail) = std::mem::take(&mut pairs).split_at_mut(g.pairs.len());
            pairs = tail;
            head
        })
        .collect()
}

/// Reads the dumped rows of both sides (when the events name tensors and the dump files exist)
/// and computes exact magnitudes and the token impact of the logits.
fn attach_dumps(
    c: &Collected,
    pairs: &mut [PairResult],
    groups: &mut [Group],
) -> Result<(bool, Vec<String>), AnalyzeError> {
    let named = |cand: bool| {
        pairs.iter().any(|p| {
            let s = if cand { p.candidate } else { p.baseline };
            s.is_some_and(|i| c.sides[i as usize].tensor().is_some())
        })
    };
    if c.tensors.is_empty() || (!named(false) && !named(true)) {
        return Ok((false, vec![]));
    }
    let mut notes = Vec::new();
    let mut open = |cand: bool| -> Result<Option<DumpFile>, AnalyzeError> {
        if driftscope_trace::is_stdin(&c.source_of(cand).path) {
            notes.push(
                "the events name dumped rows, but a trace read from standard input has no dump beside it: \
                 magnitudes come from statistics"
                    .to_string(),
            );
            return Ok(None);
        }
        let path = dump_path(&c.source_of(cand).path);
        let f = DumpFile::open(&path)?;
        if f.is_none() {
            notes.push(format!(
                "the events name dumped rows, but `{}` does not exist: magnitudes come from statistics",
                path.display()
            ));
        }
        Ok(f)
    };
    let base = open(false)?;
    let cand = if c.is_diff() { open(true)? } else { None };
    let Some(base) = base.as_ref() else { return Ok((false, notes)) };
    let cand = if c.is_diff() {
        match cand.as_ref() {
            Some(f) => f,
            None => return Ok((false, notes)),
        }
    } else {
        base
    };
    let row = |f: &DumpFile, side: Option<u32>| -> Result<Option<(Vec<f32>, DType)>, AnalyzeError> {
        let Some(t) = side.and_then(|i| c.sides[i as usize].tensor()) else { return Ok(None) };
        Ok(f.row(&c.tensors[t as usize])?)
    };
    type Measured = Option<(Magnitude, Option<TokenImpact>)>;
    let results: Vec<Result<Measured, AnalyzeError>> = pairs
        .par_iter()
        .map(|p| {
            if !matches!(p.status, PairStatus::Pass | PairStatus::Drift | PairStatus::NumericFault) {
                return Ok(None);
            }
            let (Some((a, dt)), Some((b, _))) = (row(base, p.baseline)?, row(cand, p.candidate)?) else {
                return Ok(None);
            };
            if a.len() != b.len() {
                let name = |side: Option<u32>| {
                    side.and_then(|i| c.sides[i as usize].tensor())
                        .map_or(String::new(), |t| c.tensors[t as usize].clone())
                };
                return Err(AnalyzeError::DumpLengths {
                    file: dump_path(&c.source_of(false).path).display().to_string(),
                    baseline: name(p.baseline),
                    baseline_len: a.len(),
                    candidate: name(p.candidate),
                    candidate_len: b.len(),
                });
            }
            let impact = (p.node == Some(Node::Global(Point::Logits))).then(|| token_impact(&a, &b));
            Ok(Some((compare_rows(&a, &b, dt), impact)))
        })
        .collect();
    let mut missing = 0;
    for (p, r) in pairs.iter_mut().zip(results) {
        match r? {
            Some((m, impact)) => {
                p.magnitude = Some(Box::new(m));
                if let (Some(t), Some(g)) =
                    (impact, groups.iter_mut().find(|g| g.prompt == p.key.prompt && g.rank == p.key.rank))
                {
                    g.token_impact = Some(t);
                }
            }
            None if p.status.is_failure() && p.status != PairStatus::Misaligned => missing += 1,
            None => {}
        }
    }
    if missing > 0 {
        notes.push(format!(
            "{missing} failing pair(s) have no dumped row on one side: their magnitudes come from statistics"
        ));
    }
    Ok((true, notes))
}

/// A complete pair's class under the tolerances: exact with a dump, from the statistics' lower
/// bound without one.
fn tolerance_class(
    c: &Collected,
    dtypes: &[Option<DType>],
    p: &PairResult,
    tolerances: &Tolerances,
) -> Option<TolClass> {
    let b = &c.sides[p.baseline? as usize];
    match p.status {
        PairStatus::Pass => return Some(TolClass::Bitwise),
        PairStatus::NumericFault => return Some(TolClass::NumericFault),
        PairStatus::Drift => {}
        _ => return None,
    }
    let point = match p.key.point {
        PointId::Known(pt) => Some(pt),
        PointId::Other(_) => None,
    };
    let dtype = b.dtype().and_then(|i| dtypes[i as usize]);
    let tol = tolerances.for_pair(point, dtype);
    let scale = b.min.abs().max(b.max.abs());
    let max_abs = match p.magnitude.as_deref() {
        Some(m) => m.max_abs,
        None => {
            let cand = &c.sides[p.candidate? as usize];
            StatDelta::of(b, cand).max_abs_lower_bound
        }
    };
    Some(if tol.admits(max_abs, scale) { TolClass::WithinTol } else { TolClass::Drift })
}

/// The failure class of a pair: `ATTN_OUT_DRIFT`, `X_IN_MISALIGNED`, `MLP_OUT_NUMERIC_FAULT`.
pub fn drift_class(point: &str, status: PairStatus) -> String {
    let suffix = match status {
        PairStatus::NumericFault => "NUMERIC_FAULT",
        PairStatus::Misaligned => "MISALIGNED",
        _ => "DRIFT",
    };
    format!("{}_{suffix}", point.to_uppercase())
}

/// Compares the two sides of a key.
fn compare(key: &Key, slot: &Slot, sides: &[Side]) -> PairResult {
    let side = |i: Option<u32>| i.map(|i| &sides[i as usize]);
    let status = match (side(slot.baseline), side(slot.candidate)) {
        (Some(b), Some(c)) => {
            let token_differs = matches!((b.token_id(), c.token_id()), (Some(x), Some(y)) if x != y);
            if b.pos_id() != c.pos_id() || token_differs {
                PairStatus::Misaligned
            } else if b.hash == c.hash {
                PairStatus::Pass
            } else if b.non_finite() != c.non_finite() {
                PairStatus::NumericFault
            } else {
                PairStatus::Drift
            }
        }
        (None, Some(_)) => PairStatus::MissingBaseline,
        _ => PairStatus::MissingCandidate,
    };
    PairResult {
        key: *key,
        node: match key.point {
            PointId::Known(p) => Some(Node::of(p, key.layer)),
            PointId::Other(_) => None,
        },
        status,
        classification: None,
        relations: None,
        baseline: slot.baseline,
        candidate: slot.candidate,
        magnitude: None,
        tol_class: None,
    }
}

fn check_phases(c: &Collected, options: &Options) -> Result<(), AnalyzeError> {
    for (phase, cand) in [(&options.baseline, false), (&options.candidate, true)] {
        let source = c.source_of(cand);
        let counts = &source.phase_counts;
        if !counts.contains_key(phase.as_str()) {
            let present = if counts.is_empty() {
                "none: the trace has no stage_trace events".to_string()
            } else {
                counts.iter().map(|(p, n)| format!("{p} ({n})")).collect::<Vec<_>>().join(", ")
            };
            let file = source.path.display().to_string();
            return Err(AnalyzeError::PhaseAbsent { file, phase: phase.clone(), present });
        }
    }
    Ok(())
}

/// Node state as seen from downstream.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    Untraced,
    Match,
    Drift,
    Unknown,
}

/// Where each node of the graph sits among one group's pairs: a dense table, for the upstream
/// walks of every drifting pair.
pub(crate) struct NodeTable {
    at: Vec<u32>,
    n_layers: u32,
}

impl NodeTable {
    /// The table of a group's pairs (`pairs` is the group's own slice, in dataflow order).
    pub(crate) fn new(pairs: &[PairResult], graph: &Graph) -> NodeTable {
        let table_len = 3 + graph.n_layers as usize * Point::PER_LAYER.len();
        let mut t = NodeTable { at: vec![u32::MAX; table_len], n_layers: graph.n_layers };
        for (j, p) in pairs.iter().enumerate() {
            if let Some(slot) = p.node.and_then(|n| t.slot(n)) {
                if t.at[slot] == u32::MAX {
                    t.at[slot] = j as u32;
                }
            }
        }
        t
    }

    /// Dense index of a node in a graph of `n_layers` layers.
    fn slot(&self, n: Node) -> Option<usize> {
        let per = Point::PER_LAYER.len();
        match n {
            Node::Global(Point::EmbedOut) => Some(0),
            Node::Global(Point::FinalNorm) => Some(1),
            Node::Global(_) => Some(2),
            Node::Layer(l, p) if l < self.n_layers => Some(3 + l as usize * per + (p.index() - Point::XIn.index())),
            _ => None,
        }
    }

    /// The index of a node's pair within the group's slice, when the node is traced.
    pub(crate) fn get(&self, n: Node) -> Option<usize> {
        self.slot(n).map(|s| self.at[s]).filter(|&j| j != u32::MAX).map(|j| j as usize)
    }

    /// How a node looks from downstream.
    pub(crate) fn state(&self, n: Node, pairs: &[PairResult]) -> State {
        match self.get(n) {
            None => State::Untraced,
            Some(j) => match pairs[j].status {
                PairStatus::Pass => State::Match,
                PairStatus::Drift | PairStatus::NumericFault => State::Drift,
                _ => State::Unknown,
            },
        }
    }
}

/// The walk upstream from a node through untraced nodes to the nearest traced ones. Its lists
/// are reused from walk to walk.
#[derive(Default)]
pub(crate) struct Walk {
    /// The node and the untraced nodes walked through (unsorted).
    pub(crate) region: Vec<Node>,
    /// Nearest traced upstream nodes that match.
    pub(crate) matched: Vec<Node>,
    /// Nearest traced upstream nodes that drift.
    pub(crate) drifting: Vec<Node>,
    /// Nearest traced upstream nodes that are missing or misaligned.
    pub(crate) unknown: Vec<Node>,
    seen: Vec<Node>,
    stack: Vec<Node>,
}

impl Walk {
    /// Walks upstream from `node`.
    pub(crate) fn run(&mut self, graph: &Graph, node: Node, table: &NodeTable, pairs: &[PairResult]) {
        let lists = [&mut self.seen, &mut self.stack, &mut self.region, &mut self.matched, &mut self.drifting];
        for list in lists.into_iter().chain([&mut self.unknown]) {
            list.clear();
        }
        self.region.push(node);
        self.stack.extend_from_slice(&graph.inputs(node));
        while let Some(n) = self.stack.pop() {
            if self.seen.contains(&n) {
                continue;
            }
            self.seen.push(n);
            match table.state(n, pairs) {
                State::Untraced => {
                    self.region.push(n);
                    self.stack.extend_from_slice(&graph.inputs(n));
                }
                State::Match => self.matched.push(n),
                State::Drift => self.drifting.push(n),
                State::Unknown => self.unknown.push(n),
            }
        }
    }
}

/// Classifies the failing pairs of one group and finds its origins and root cause. `pairs` is
/// the group's own slice; `g.pairs` holds the global indices of the same pairs. Returns the
/// group's relation lists (the pairs' [`Relations`] start at 0 in it).
fn classify_group(g: &mut Group, pairs: &mut [PairResult], graph: &Graph) -> Vec<Node> {
    let mut nodes = Vec::new();
    let base = g.pairs.start;
    let table = NodeTable::new(pairs, graph);
    let mut walk = Walk::default();
    for j in 0..pairs.len() {
        let i = base + j;
        let status = pairs[j].status;
        match status {
            PairStatus::Pass => g.passed += 1,
            s if s.is_missing() => g.missing += 1,
            _ => {
                g.failed += 1;
                g.first_failure.get_or_insert(i);
            }
        }
        if !matches!(status, PairStatus::Drift | PairStatus::NumericFault) {
            continue;
        }
        let Some(node) = pairs[j].node else {
            pairs[j].classification = Some(Classification::Unplaced);
            continue;
        };
        // Walk upstream through untraced nodes to the nearest traced ones.
        walk.run(graph, node, &table, pairs);
        let Walk { region, matched, drifting, unknown, .. } = &mut walk;
        let p = &mut pairs[j];
        if !drifting.is_empty() {
            drifting.sort_by_key(|n| n.order());
            p.classification = Some(Classification::Inherited);
            g.inherited += 1;
            p.relations = Some(Relations::push(&mut nodes, drifting, &[], &[]));
            continue;
        }
        region.sort_by_key(|n| n.order());
        let untraced = &region[..region.len() - 1];
        if !unknown.is_empty() {
            unknown.sort_by_key(|n| n.order());
            p.classification = Some(Classification::Undetermined);
            p.relations = Some(Relations::push(&mut nodes, &[], untraced, unknown));
        } else {
            if !untraced.is_empty() {
                p.relations = Some(Relations::push(&mut nodes, &[], untraced, &[]));
            }
            matched.sort_by_key(|n| n.order());
            p.classification = Some(Classification::Originated);
            let layers = region
                .iter()
                .filter_map(|n| n.producing_layer())
                .fold(None, |acc: Option<(u32, u32)>, l| Some(acc.map_or((l, l), |(a, b)| (a.min(l), b.max(l)))));
            let cause = if status == PairStatus::NumericFault { "NUMERIC_FAULT" } else { cause_of_region(region) };
            g.origins.push(Origin { pair: i, node, region: region.clone(), upstream: matched.clone(), cause, layers });
        }
    }
    g.cause = match g.first_failure.map(|i| (&pairs[i - base], i)) {
        None if g.missing > 0 => Some("MISSING_TRACE"),
        None => None,
        Some((p, i)) => Some(match (p.status, p.classification) {
            (PairStatus::Misaligned, _) => "MISALIGNED_POSITIONS",
            (_, Some(Classification::Originated)) => {
                g.origins.iter().find(|o| o.pair == i).map_or("UNLOCALIZED", |o| o.cause)
            }
            (_, Some(Classification::Undetermined)) => "MISSING_TRACE",
            _ => "UNLOCALIZED",
        }),
    };
    nodes
}

/// Describes a region of ops in words: "attention RMSNorm → … → attention output projection".
pub fn describe_region(region: &[Node]) -> String {
    let ops: Vec<String> = region
        .iter()
        .map(|&n| match n {
            Node::LayersAfter(l) => format!("untraced layers after layer {l}"),
            Node::Layer(l, p) if p != Point::XIn || l > 0 => format!("{} ({})", op_of(n).0, n),
            _ => format!("{} ({n})", op_of(n).0),
        })
        .collect();
    if ops.len() > 6 {
        format!("{} … {} ({} ops)", ops[..2].join(" → "), ops[ops.len() - 2..].join(" → "), ops.len())
    } else {
        ops.join(" → ")
    }
}
