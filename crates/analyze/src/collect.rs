//! Collecting the events of two phases into pairs, streaming.
//!
//! Memory grows with the number of pairs, not with the file: events of other phases are only
//! counted, strings are interned, and each side of a pair keeps a fixed-size record. Events are
//! turned into records on all cores while the file is read; pairs are found with a hash map
//! and put in dataflow order by one parallel sort of small keys.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use driftscope_trace::{
    eq_short, read_file_visit, Loc, Point, ReadOptions, ReadStats, Record, RunMeta, StageTrace, TraceError, Visit,
};
use rayon::prelude::*;
use rustc_hash::FxHashMap;

use crate::dataflow::Node;

/// Which point a pair is about: one of the vocabulary, or another engine's own name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PointId {
    /// A point of the closed vocabulary.
    Known(Point),
    /// Index into [`Collected::other_points`].
    Other(u32),
}

/// The pairing key: (prompt, layer, point) and the tensor-parallel rank when given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    /// Index into [`Collected::prompts`] (file order).
    pub prompt: u32,
    /// Layer as written in the trace.
    pub layer: u32,
    /// The point.
    pub point: PointId,
    /// Tensor-parallel rank.
    pub rank: Option<u32>,
}

/// What the analyzer keeps of one event (120 bytes: the optional fields are stored with a
/// presence bit each, not as `Option`s, since millions of these are kept).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Side {
    /// Where the event is in the file.
    pub loc: Loc,
    /// Decode step.
    pub step: u64,
    /// Token position.
    pub pos_id: u64,
    /// Query rows of the forward call.
    pub seq_len: u64,
    /// Row hash.
    pub hash: u64,
    /// Minimum.
    pub min: f64,
    /// Maximum.
    pub max: f64,
    /// Mean.
    pub mean: f64,
    l2: f64,
    nan_count: u64,
    inf_count: u64,
    token_id: u64,
    tensor: u32,
    dtype: u16,
    present: u8,
    /// Whether the event reports non-finite values.
    pub non_finite: bool,
}

const L2: u8 = 1;
const NAN_COUNT: u8 = 2;
const INF_COUNT: u8 = 4;
const TOKEN_ID: u8 = 8;
const TENSOR: u8 = 16;
const DTYPE: u8 = 32;

impl Side {
    /// A side of the event `ev` at `loc` (without dtype and tensor, which the collector interns).
    pub fn of(ev: &StageTrace<'_>, loc: Loc) -> Side {
        let mut side = Side {
            loc,
            step: ev.step,
            pos_id: ev.pos_id,
            seq_len: ev.seq_len,
            hash: ev.hash,
            min: ev.min,
            max: ev.max,
            mean: ev.mean,
            l2: 0.0,
            nan_count: 0,
            inf_count: 0,
            token_id: 0,
            tensor: 0,
            dtype: 0,
            present: 0,
            non_finite: ev.has_non_finite(),
        };
        if let Some(x) = ev.l2 {
            (side.l2, side.present) = (x, side.present | L2);
        }
        if let Some(n) = ev.nan_count {
            (side.nan_count, side.present) = (n, side.present | NAN_COUNT);
        }
        if let Some(n) = ev.inf_count {
            (side.inf_count, side.present) = (n, side.present | INF_COUNT);
        }
        if let Some(t) = ev.token_id {
            (side.token_id, side.present) = (t, side.present | TOKEN_ID);
        }
        side
    }

    fn get<T>(&self, bit: u8, value: T) -> Option<T> {
        (self.present & bit != 0).then_some(value)
    }

    /// L2 norm, when given.
    pub fn l2(&self) -> Option<f64> {
        self.get(L2, self.l2)
    }
    /// NaN count, when given.
    pub fn nan_count(&self) -> Option<u64> {
        self.get(NAN_COUNT, self.nan_count)
    }
    /// Inf count, when given.
    pub fn inf_count(&self) -> Option<u64> {
        self.get(INF_COUNT, self.inf_count)
    }
    /// Token id, when given.
    pub fn token_id(&self) -> Option<u64> {
        self.get(TOKEN_ID, self.token_id)
    }
    /// Index into [`Collected::dtypes`], when given.
    pub fn dtype(&self) -> Option<u16> {
        self.get(DTYPE, self.dtype)
    }
    /// Index into [`Collected::tensors`]: the dumped row, when the event names one.
    pub fn tensor(&self) -> Option<u32> {
        self.get(TENSOR, self.tensor)
    }
    fn set_dtype(&mut self, i: u16) {
        (self.dtype, self.present) = (i, self.present | DTYPE);
    }
    fn set_tensor(&mut self, i: u32) {
        (self.tensor, self.present) = (i, self.present | TENSOR);
    }
}

/// Both sides of one key, as indices into [`Collected::sides`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Slot {
    /// The baseline phase's event.
    pub baseline: Option<u32>,
    /// The candidate phase's event.
    pub candidate: Option<u32>,
}

/// A second event for a key and phase that already had one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Duplicate {
    /// The key.
    pub key: Key,
    /// The phase.
    pub phase: String,
    /// Index into [`Collected::sources`] of the file holding both events.
    pub source: usize,
    /// Line of the first event.
    pub first_line: u64,
    /// Line of the second event.
    pub second_line: u64,
}

/// Everything read from a trace that the analysis needs.
#[derive(Debug, Default)]
pub struct Collected {
    /// Prompt ids in order of first appearance.
    pub prompts: Vec<String>,
    /// Point names outside the vocabulary, in order of first appearance.
    pub other_points: Vec<String>,
    /// Dtype names, in order of first appearance.
    pub dtypes: Vec<String>,
    /// The events of the two phases, in file order (duplicates left out).
    pub sides: Vec<Side>,
    /// Names of dumped rows, as the events give them.
    pub tensors: Vec<String>,
    /// Every key with its two sides, in order of first appearance.
    pub pairs: Vec<(Key, Slot)>,
    /// Indices into `pairs` in dataflow order: by prompt (file order), rank, then the position
    /// of the point in the forward pass.
    pub order: Vec<u32>,
    /// Duplicate events (the later one is dropped).
    pub duplicates: Vec<Duplicate>,
    /// The files read: one trace, or two for a diff.
    pub sources: Vec<Source>,
    /// Index into `sources` of the file giving the baseline side.
    pub baseline_source: usize,
    /// Index into `sources` of the file giving the candidate side.
    pub candidate_source: usize,
}

/// One trace file and what was read from it.
#[derive(Debug, Default)]
pub struct Source {
    /// The file, as given.
    pub path: std::path::PathBuf,
    /// What the reader saw.
    pub read: ReadStats,
    /// Number of `stage_trace` events per phase, all phases.
    pub phase_counts: BTreeMap<String, u64>,
    /// The `run_meta` events, in order.
    pub metas: Vec<(RunMeta, Loc)>,
}

impl Collected {
    /// Whether baseline and candidate come from two different files.
    pub fn is_diff(&self) -> bool {
        self.baseline_source != self.candidate_source
    }

    /// The file of a side.
    pub fn source_of(&self, candidate: bool) -> &Source {
        &self.sources[if candidate { self.candidate_source } else { self.baseline_source }]
    }

    /// Unreadable lines skipped in all files.
    pub fn skipped_lines(&self) -> u64 {
        self.sources.iter().map(|s| s.read.bad_line_count).sum()
    }

    /// The name of a point id.
    pub fn point_name(&self, id: PointId) -> &str {
        match id {
            PointId::Known(p) => p.as_str(),
            PointId::Other(i) => &self.other_points[i as usize],
        }
    }
}

/// Sort key of a pairing key.
pub type DataflowKey = (u32, Option<u32>, (u8, u32, usize), u32, PointId);

/// Sort key of a key: dataflow order, then the fields that tell keys apart.
pub fn dataflow_key(k: &Key) -> DataflowKey {
    let order = match k.point {
        PointId::Known(p) => Node::of(p, k.layer).order(),
        PointId::Other(i) => (1, k.layer, 1000 + i as usize),
    };
    (k.prompt, k.rank, order, k.layer, k.point)
}

/// What the reader's worker threads make of one event.
#[allow(clippy::large_enum_variant)] // `Side` is the common case; boxing it costs an allocation
enum Item<'a> {
    /// An event of the baseline or the candidate phase.
    Side {
        /// The prompt id, unless `same_prompt`.
        prompt: Cow<'a, str>,
        point: Result<Point, Cow<'a, str>>,
        /// The dtype, unless `same_dtype`.
        dtype: Option<Cow<'a, str>>,
        /// The prompt id is the one of the item before (same run of lines): the sink reuses its
        /// index without reading the name, whose line has left the cache by then.
        same_prompt: bool,
        /// Likewise for the dtype (absent or present).
        same_dtype: bool,
        tensor: Option<Cow<'a, str>>,
        layer: u32,
        rank: Option<u32>,
        side: Side,
        candidate: bool,
    },
    /// An event of another phase: only counted.
    OtherPhase(Cow<'a, str>),
    Meta(Box<RunMeta>, Loc),
    Skip,
}

struct Visitor<'p> {
    baseline: Option<&'p str>,
    candidate: Option<&'p str>,
}

/// The names of a worker's previous baseline or candidate event.
#[derive(Default)]
struct Recent {
    seen: bool,
    prompt: String,
    dtype: Option<String>,
}

impl Visit for Visitor<'_> {
    type Item<'a> = Item<'a>;
    type Run = Recent;

    fn visit<'a>(&self, record: Record<'a>, loc: Loc, recent: &mut Recent) -> Item<'a> {
        let ev = match record {
            Record::Stage(ev) => ev,
            Record::Meta(meta) => return Item::Meta(meta, loc),
            Record::Other(_) => return Item::Skip,
        };
        let is = |p: Option<&str>| p.is_some_and(|p| eq_short(ev.phase.as_bytes(), p.as_bytes()));
        let candidate = if is(self.baseline) {
            false
        } else if is(self.candidate) {
            true
        } else {
            return Item::OtherPhase(ev.phase);
        };
        let side = Side::of(&ev, loc);
        let same_prompt = recent.seen && eq_short(recent.prompt.as_bytes(), ev.prompt_id.as_bytes());
        if !same_prompt {
            recent.prompt.clear();
            recent.prompt.push_str(&ev.prompt_id);
        }
        let same_dtype = recent.seen
            && match (&recent.dtype, &ev.dtype) {
                (Some(a), Some(b)) => eq_short(a.as_bytes(), b.as_bytes()),
                (a, b) => a.is_none() && b.is_none(),
            };
        if !same_dtype {
            recent.dtype = ev.dtype.as_deref().map(str::to_string);
        }
        recent.seen = true;
        Item::Side {
            tensor: ev.tensor,
            point: Point::parse(&ev.point).ok_or(ev.point),
            prompt: if same_prompt { Cow::Borrowed("") } else { ev.prompt_id },
            dtype: if same_dtype { None } else { ev.dtype },
            same_prompt,
            same_dtype,
            layer: ev.layer,
            rank: ev.rank,
            side,
            candidate,
        }
    }
}

/// Interns names in order of first appearance; repeated names (the common case: events of one
/// prompt come in runs) are recognised without hashing.
#[derive(Default)]
struct Interner {
    index: HashMap<String, u32>,
    last: Option<(String, u32)>,
}

impl Interner {
    fn get(&mut self, names: &mut Vec<String>, name: &str) -> u32 {
        if let Some((last, i)) = &self.last {
            if eq_short(last.as_bytes(), name.as_bytes()) {
                return *i;
            }
        }
        let i = match self.index.get(name) {
            Some(&i) => i,
            None => {
                let i = names.len() as u32;
                names.push(name.to_string());
                self.index.insert(name.to_string(), i);
                i
            }
        };
        self.last = Some((name.to_string(), i));
        i
    }
}

/// Finds the slot of a key. Per prompt, the points of the vocabulary without a rank sit in a
/// dense table indexed by (layer, point), so the common lookup touches a few cache lines;
/// everything else goes through a hash map.
#[derive(Default)]
struct KeyIndex {
    dense: Vec<Vec<u32>>,
    other: FxHashMap<Key, u32>,
}

impl KeyIndex {
    const NONE: u32 = u32::MAX;

    fn get_or_insert(&mut self, key: Key, pairs: &mut Vec<(Key, Slot)>) -> u32 {
        let push = |pairs: &mut Vec<(Key, Slot)>| {
            pairs.push((key, Slot::default()));
            (pairs.len() - 1) as u32
        };
        match (key.point, key.rank) {
            (PointId::Known(p), None) if key.layer < 1 << 16 => {
                let per_prompt = Point::ALL.len();
                if self.dense.len() <= key.prompt as usize {
                    self.dense.resize_with(key.prompt as usize + 1, Vec::new);
                }
                let table = &mut self.dense[key.prompt as usize];
                let at = key.layer as usize * per_prompt + p.index();
                if table.len() <= at {
                    table.resize(at + per_prompt, Self::NONE);
                }
                if table[at] == Self::NONE {
                    table[at] = push(pairs);
                }
                table[at]
            }
            _ => *self.other.entry(key).or_insert_with(|| push(pairs)),
        }
    }
}

/// Gathers events from one trace (two phases) or from two traces (one phase each) into pairs.
#[derive(Default)]
pub struct Collector {
    c: Collected,
    prompts: Interner,
    others: Interner,
    dtypes: Interner,
    index: KeyIndex,
}

impl Collector {
    /// An empty collector.
    pub fn new() -> Collector {
        Collector::default()
    }

    /// Reads `path`; events of phase `baseline` fill the baseline side of their pairs, events of
    /// phase `candidate` the candidate side (either may be `None` when this file gives one side).
    pub fn read(
        &mut self,
        path: &Path,
        baseline: Option<&str>,
        candidate: Option<&str>,
        opts: ReadOptions,
    ) -> Result<(), TraceError> {
        let source = self.c.sources.len();
        let mut info = Source { path: path.to_path_buf(), ..Source::default() };
        let (mut n_base, mut n_cand) = (0u64, 0u64);
        let visitor = Visitor { baseline, candidate };
        let Collector { c, prompts, others, dtypes, index } = self;
        // The prompt and dtype of the previous baseline or candidate event.
        let (mut last_prompt, mut last_dtype) = (0u32, None);
        let stats = read_file_visit(path, opts, &visitor, |item| match item {
            Item::Side { prompt, point, dtype, same_prompt, same_dtype, tensor, layer, rank, mut side, candidate } => {
                if let Some(t) = tensor {
                    c.tensors.push(t.into_owned());
                    side.set_tensor((c.tensors.len() - 1) as u32);
                }
                if !same_prompt {
                    last_prompt = prompts.get(&mut c.prompts, &prompt);
                }
                let prompt = last_prompt;
                let point = match point {
                    Ok(p) => PointId::Known(p),
                    Err(name) => PointId::Other(others.get(&mut c.other_points, &name)),
                };
                if !same_dtype {
                    last_dtype = dtype.map(|d| dtypes.get(&mut c.dtypes, &d) as u16);
                }
                if let Some(d) = last_dtype {
                    side.set_dtype(d);
                }
                if candidate {
                    n_cand += 1;
                } else {
                    n_base += 1;
                }
                let key = Key { prompt, layer, point, rank };
                let i = index.get_or_insert(key, &mut c.pairs);
                let slot = &mut c.pairs[i as usize].1;
                let place = if candidate { &mut slot.candidate } else { &mut slot.baseline };
                match place {
                    Some(first) => c.duplicates.push(Duplicate {
                        key,
                        phase: if candidate { visitor.candidate } else { visitor.baseline }.unwrap_or("").to_string(),
                        source,
                        first_line: c.sides[*first as usize].loc.line,
                        second_line: side.loc.line,
                    }),
                    None => {
                        *place = Some(c.sides.len() as u32);
                        c.sides.push(side);
                    }
                }
            }
            Item::OtherPhase(phase) => match info.phase_counts.get_mut(phase.as_ref()) {
                Some(n) => *n += 1,
                None => {
                    info.phase_counts.insert(phase.into_owned(), 1);
                }
            },
            Item::Meta(meta, loc) => info.metas.push((*meta, loc)),
            Item::Skip => {}
        })?;
        for (phase, n) in [(baseline, n_base), (candidate, n_cand)] {
            if let (Some(phase), true) = (phase, n > 0) {
                *info.phase_counts.entry(phase.to_string()).or_insert(0) += n;
            }
        }
        info.read = stats;
        if baseline.is_some() {
            c.baseline_source = source;
        }
        if candidate.is_some() {
            c.candidate_source = source;
        }
        c.sources.push(info);
        Ok(())
    }

    /// Puts the pairs in dataflow order and hands the result over.
    pub fn finish(self) -> Collected {
        let mut c = self.c;
        // Engines write a prompt's events in dataflow order, so first appearance usually is that
        // order already: check before sorting.
        let sorted = c.pairs.par_windows(2).all(|w| dataflow_key(&w[0].0) < dataflow_key(&w[1].0));
        if sorted {
            c.order = (0..c.pairs.len() as u32).collect();
        } else {
            let mut order: Vec<(DataflowKey, u32)> =
                c.pairs.par_iter().enumerate().map(|(i, (k, _))| (dataflow_key(k), i as u32)).collect();
            order.par_sort_unstable();
            c.order = order.into_iter().map(|(_, i)| i).collect();
        }
        c
    }
}

/// Reads `path` and collects the events of the `baseline` and `candidate` phases.
pub fn collect_file(path: &Path, baseline: &str, candidate: &str, opts: ReadOptions) -> Result<Collected, TraceError> {
    let mut collector = Collector::new();
    collector.read(path, Some(baseline), Some(candidate), opts)?;
    Ok(collector.finish())
}

/// Collects phase `phase` of trace `a` as the baseline and of trace `b` as the candidate (for
/// comparing two engines, devices, dtypes or commits).
pub fn collect_two(a: &Path, b: &Path, phase: &str, opts: ReadOptions) -> Result<Collected, TraceError> {
    let mut collector = Collector::new();
    collector.read(a, Some(phase), None, opts)?;
    collector.read(b, None, Some(phase), opts)?;
    Ok(collector.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Pairing reuses the previous event's prompt and dtype indices when the worker saw the same
    /// names just before: with prompts and dtypes changing at irregular places, small blocks (so
    /// runs of lines start and end everywhere) and other phases in between, every side must
    /// still carry the names of its own line.
    #[test]
    fn names_are_right_across_runs_and_blocks() {
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        let mut f = std::fs::File::create(&path).unwrap();
        let (mut prompt, mut dtype) = (0u64, Some("bf16"));
        let mut want = Vec::new(); // (prompt, layer, phase is candidate, dtype) per kept event
        for layer in 0..3000u32 {
            if next() % 7 == 0 {
                prompt = next() % 5;
            }
            if next() % 11 == 0 {
                dtype = [None, Some("bf16"), Some("f32")][(next() % 3) as usize];
            }
            for phase in ["prefill_last", "decode0", "decode1"] {
                let dt = dtype.map(|d| format!(",\"dtype\":\"{d}\"")).unwrap_or_default();
                writeln!(
                    f,
                    r#"{{"event":"stage_trace","prompt_id":"p{prompt}","phase":"{phase}","point":"x_in","layer":{layer},"step":0,"pos_id":1,"seq_len":2,"hash":{layer},"min":0,"max":1,"mean":0.5{dt}}}"#
                )
                .unwrap();
                if phase != "decode1" {
                    want.push((format!("p{prompt}"), layer, phase == "decode0", dtype));
                }
            }
        }
        drop(f);
        let opts = ReadOptions { chunk_size: 1 << 10, ..ReadOptions::default() };
        let c = collect_file(&path, "prefill_last", "decode0", opts).unwrap();
        assert_eq!(c.sides.len(), want.len());
        let mut checked = 0;
        for (key, slot) in &c.pairs {
            for (side, candidate) in [(slot.baseline, false), (slot.candidate, true)] {
                let Some(s) = side else { continue };
                let s = &c.sides[s as usize];
                let (prompt, layer, cand, dtype) = &want[(s.loc.line - 1) as usize / 3 * 2 + usize::from(candidate)];
                assert_eq!((&c.prompts[key.prompt as usize], key.layer, candidate), (prompt, *layer, *cand));
                assert_eq!(s.dtype().map(|d| c.dtypes[d as usize].as_str()), *dtype, "line {}", s.loc.line);
                checked += 1;
            }
        }
        assert_eq!(checked, want.len());
    }
}
