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

/// What the analyzer keeps of one event: 80 bytes, since millions of these are kept. Counts,
/// positions and line numbers are stored in 32 bits (16 for the line's length) and optional
/// fields with a presence bit each; an event whose values do not fit, or which names a dumped
/// tensor or counts NaN/Inf elements (rare: faults and dumps), keeps all of them in a boxed
/// [`Wide`] record instead.
#[derive(Debug, Clone, PartialEq)]
pub struct Side {
    /// Row hash.
    pub hash: u64,
    /// Minimum.
    pub min: f64,
    /// Maximum.
    pub max: f64,
    /// Mean.
    pub mean: f64,
    l2: f64,
    offset: u64,
    wide: Option<Box<Wide>>,
    line: u32,
    step: u32,
    pos_id: u32,
    seq_len: u32,
    token_id: u32,
    len: u16,
    dtype: u8,
    present: u8,
}

/// The values of an event that do not fit [`Side`]'s narrow fields.
#[derive(Debug, Clone, PartialEq)]
struct Wide {
    line: u64,
    len: u32,
    step: u64,
    pos_id: u64,
    seq_len: u64,
    token_id: u64,
    nan_count: u64,
    inf_count: u64,
    tensor: u32,
    dtype: u16,
}

const L2: u8 = 1;
const NAN_COUNT: u8 = 2;
const INF_COUNT: u8 = 4;
const TOKEN_ID: u8 = 8;
const TENSOR: u8 = 16;
const DTYPE: u8 = 32;
const NON_FINITE: u8 = 64;

const _: () = assert!(std::mem::size_of::<Side>() == 80);

impl Side {
    /// A side of the event `ev` at `loc` (without dtype and tensor, which the collector interns).
    pub fn of(ev: &StageTrace<'_>, loc: Loc) -> Side {
        let mut present = 0;
        let mut flag = |v: Option<u64>, bit: u8| {
            present |= if v.is_some() { bit } else { 0 };
            v.unwrap_or(0)
        };
        let (nan_count, inf_count) = (flag(ev.nan_count, NAN_COUNT), flag(ev.inf_count, INF_COUNT));
        let token_id = flag(ev.token_id, TOKEN_ID);
        let l2 = ev.l2.unwrap_or(0.0);
        present |= if ev.l2.is_some() { L2 } else { 0 };
        present |= if ev.has_non_finite() { NON_FINITE } else { 0 };
        let narrow = |v: u64| u32::try_from(v).ok();
        let mut side = Side {
            hash: ev.hash,
            min: ev.min,
            max: ev.max,
            mean: ev.mean,
            l2,
            offset: loc.offset,
            wide: None,
            line: 0,
            step: 0,
            pos_id: 0,
            seq_len: 0,
            token_id: 0,
            len: 0,
            dtype: 0,
            present,
        };
        let fits = (|| {
            side.line = narrow(loc.line)?;
            side.step = narrow(ev.step)?;
            side.pos_id = narrow(ev.pos_id)?;
            side.seq_len = narrow(ev.seq_len)?;
            side.token_id = narrow(token_id)?;
            side.len = u16::try_from(loc.len).ok()?;
            (nan_count == 0 && inf_count == 0).then_some(())
        })();
        if fits.is_none() {
            side.wide = Some(Box::new(Wide {
                line: loc.line,
                len: loc.len,
                step: ev.step,
                pos_id: ev.pos_id,
                seq_len: ev.seq_len,
                token_id,
                nan_count,
                inf_count,
                tensor: 0,
                dtype: 0,
            }));
        }
        side
    }

    fn get<T>(&self, bit: u8, value: T) -> Option<T> {
        (self.present & bit != 0).then_some(value)
    }

    /// Where the event is in the file.
    pub fn loc(&self) -> Loc {
        match &self.wide {
            Some(w) => Loc { line: w.line, offset: self.offset, len: w.len },
            None => Loc { line: u64::from(self.line), offset: self.offset, len: u32::from(self.len) },
        }
    }
    /// Line number (from 1).
    pub fn line(&self) -> u64 {
        self.loc().line
    }
    /// Decode step.
    pub fn step(&self) -> u64 {
        self.wide.as_ref().map_or(u64::from(self.step), |w| w.step)
    }
    /// Token position.
    pub fn pos_id(&self) -> u64 {
        self.wide.as_ref().map_or(u64::from(self.pos_id), |w| w.pos_id)
    }
    /// Query rows of the forward call.
    pub fn seq_len(&self) -> u64 {
        self.wide.as_ref().map_or(u64::from(self.seq_len), |w| w.seq_len)
    }
    /// Whether the event reports non-finite values.
    pub fn non_finite(&self) -> bool {
        self.present & NON_FINITE != 0
    }
    /// L2 norm, when given.
    pub fn l2(&self) -> Option<f64> {
        self.get(L2, self.l2)
    }
    /// NaN count, when given.
    pub fn nan_count(&self) -> Option<u64> {
        self.get(NAN_COUNT, self.wide.as_ref().map_or(0, |w| w.nan_count))
    }
    /// Inf count, when given.
    pub fn inf_count(&self) -> Option<u64> {
        self.get(INF_COUNT, self.wide.as_ref().map_or(0, |w| w.inf_count))
    }
    /// Token id, when given.
    pub fn token_id(&self) -> Option<u64> {
        self.get(TOKEN_ID, self.wide.as_ref().map_or(u64::from(self.token_id), |w| w.token_id))
    }
    /// Index into [`Collected::dtypes`], when given.
    pub fn dtype(&self) -> Option<u16> {
        self.get(DTYPE, self.wide.as_ref().map_or(u16::from(self.dtype), |w| w.dtype))
    }
    /// Index into [`Collected::tensors`]: the dumped row, when the event names one.
    pub fn tensor(&self) -> Option<u32> {
        self.get(TENSOR, self.wide.as_ref().map_or(0, |w| w.tensor))
    }
    /// The boxed record, made from the narrow fields when there is none yet.
    fn widen(&mut self) -> &mut Wide {
        let (line, len, step, pos_id, seq_len, token_id, dtype) =
            (self.line, self.len, self.step, self.pos_id, self.seq_len, self.token_id, self.dtype);
        self.wide.get_or_insert_with(|| {
            Box::new(Wide {
                line: line.into(),
                len: len.into(),
                step: step.into(),
                pos_id: pos_id.into(),
                seq_len: seq_len.into(),
                token_id: token_id.into(),
                nan_count: 0,
                inf_count: 0,
                tensor: 0,
                dtype: dtype.into(),
            })
        })
    }
    fn set_dtype(&mut self, i: u16) {
        self.present |= DTYPE;
        match (u8::try_from(i), &mut self.wide) {
            (Ok(narrow), None) => self.dtype = narrow,
            _ => self.widen().dtype = i,
        }
    }
    fn set_tensor(&mut self, i: u32) {
        self.present |= TENSOR;
        self.widen().tensor = i;
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
        match record {
            Record::Stage(ev) => self.visit_stage(&ev, loc, recent),
            Record::Meta(meta) => Item::Meta(meta, loc),
            Record::Other(_) => Item::Skip,
        }
    }

    fn visit_stage<'a>(&self, ev: &StageTrace<'a>, loc: Loc, recent: &mut Recent) -> Item<'a> {
        let is = |p: Option<&str>| p.is_some_and(|p| eq_short(ev.phase.as_bytes(), p.as_bytes()));
        let candidate = if is(self.baseline) {
            false
        } else if is(self.candidate) {
            true
        } else {
            return Item::OtherPhase(ev.phase.clone());
        };
        let side = Side::of(ev, loc);
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
        // Names are borrowed from the line (cloning a borrowed name copies a pointer); only a
        // name serde had to unescape is owned.
        Item::Side {
            tensor: ev.tensor.clone(),
            point: Point::parse(&ev.point).ok_or_else(|| ev.point.clone()),
            prompt: if same_prompt { Cow::Borrowed("") } else { ev.prompt_id.clone() },
            dtype: if same_dtype { None } else { ev.dtype.clone() },
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
                        first_line: c.sides[*first as usize].line(),
                        second_line: side.line(),
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

    fn event(step: u64, pos_id: u64, seq_len: u64, token_id: Option<u64>, nan: Option<u64>) -> StageTrace<'static> {
        let line = r#"{"event":"stage_trace","prompt_id":"p","phase":"decode0","point":"q","layer":1,"step":0,"pos_id":0,"seq_len":1,"hash":7,"min":-1.5,"max":2.5,"mean":0.25,"l2":3.0}"#;
        let mut ev: StageTrace<'static> = serde_json::from_str(line).unwrap();
        (ev.step, ev.pos_id, ev.seq_len, ev.token_id, ev.nan_count) = (step, pos_id, seq_len, token_id, nan);
        ev.inf_count = nan.map(|_| 0);
        ev
    }

    /// Every value comes back as the event gave it, whether it fits the narrow fields or not.
    #[test]
    fn sides_keep_every_value() {
        let big = u64::from(u32::MAX) + 1;
        let cases = [
            (event(3, 40, 41, Some(9), Some(0)), Loc { line: 12, offset: 1 << 40, len: 300 }, false),
            (
                event(3, 40, 41, None, None),
                Loc { line: u64::from(u32::MAX), offset: 5, len: u32::from(u16::MAX) },
                false,
            ),
            (event(big, 40, 41, Some(9), Some(0)), Loc { line: 12, offset: 0, len: 300 }, true),
            (event(3, big, 41, Some(9), Some(0)), Loc { line: 12, offset: 0, len: 300 }, true),
            (event(3, 40, u64::MAX, Some(9), Some(0)), Loc { line: 12, offset: 0, len: 300 }, true),
            (event(3, 40, 41, Some(big), Some(0)), Loc { line: 12, offset: 0, len: 300 }, true),
            (event(3, 40, 41, Some(9), Some(17)), Loc { line: 12, offset: 0, len: 300 }, true),
            (event(3, 40, 41, Some(9), Some(0)), Loc { line: big, offset: 0, len: 300 }, true),
            (event(3, 40, 41, Some(9), Some(0)), Loc { line: 12, offset: 0, len: 1 << 16 }, true),
        ];
        for (ev, loc, wide) in cases {
            let mut s = Side::of(&ev, loc);
            assert_eq!(s.wide.is_some(), wide, "{loc:?} {ev:?}");
            let check = |s: &Side| {
                assert_eq!(s.loc(), loc);
                assert_eq!(s.line(), loc.line);
                assert_eq!((s.step(), s.pos_id(), s.seq_len()), (ev.step, ev.pos_id, ev.seq_len));
                assert_eq!((s.token_id(), s.nan_count(), s.inf_count()), (ev.token_id, ev.nan_count, ev.inf_count));
                assert_eq!((s.hash, s.min, s.max, s.mean, s.l2()), (7, -1.5, 2.5, 0.25, Some(3.0)));
                assert_eq!(s.non_finite(), ev.has_non_finite());
            };
            check(&s);
            assert_eq!((s.dtype(), s.tensor()), (None, None));
            // Interned names set later: small dtype indices stay narrow, tensors and large
            // indices widen, and nothing else changes.
            s.set_dtype(3);
            assert_eq!((s.dtype(), s.wide.is_some()), (Some(3), wide));
            s.set_dtype(300);
            assert_eq!((s.dtype(), s.wide.is_some()), (Some(300), true));
            check(&s);
            let mut t = Side::of(&ev, loc);
            t.set_tensor(5);
            t.set_dtype(2);
            assert_eq!((t.tensor(), t.dtype()), (Some(5), Some(2)));
            check(&t);
        }
        let mut nan = event(0, 1, 2, None, Some(3));
        nan.max = f64::NAN;
        let s = Side::of(&nan, Loc { line: 1, offset: 0, len: 10 });
        assert!(s.non_finite() && s.nan_count() == Some(3) && s.token_id().is_none());
    }

    /// Pairing reuses the previous event's prompt and dtype indices when the worker saw the same
    /// names just before: with prompts and dtypes changing at irregular places, some names
    /// escaped (`p\u0031` is `p1`), small blocks (so runs of lines start and end everywhere) and
    /// other phases in between, every side must still carry the names of its own line.
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
                // Some names escaped: serde reads those lines, and their names are owned.
                let name = if next() % 5 == 0 { format!("p\\u003{prompt}") } else { format!("p{prompt}") };
                writeln!(
                    f,
                    r#"{{"event":"stage_trace","prompt_id":"{name}","phase":"{phase}","point":"x_in","layer":{layer},"step":0,"pos_id":1,"seq_len":2,"hash":{layer},"min":0,"max":1,"mean":0.5{dt}}}"#
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
                let (prompt, layer, cand, dtype) = &want[(s.line() - 1) as usize / 3 * 2 + usize::from(candidate)];
                assert_eq!((&c.prompts[key.prompt as usize], key.layer, candidate), (prompt, *layer, *cand));
                assert_eq!(s.dtype().map(|d| c.dtypes[d as usize].as_str()), *dtype, "line {}", s.line());
                checked += 1;
            }
        }
        assert_eq!(checked, want.len());
    }
}
