//! Streaming, parallel reading of JSONL traces.
//!
//! The input is read in chunks of whole lines; each chunk is split at line boundaries and parsed
//! on all cores, then handed to the caller's sink in file order. Memory stays at a few chunks
//! whatever the file size: nothing builds a document of the whole file.

use std::borrow::Cow;
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use rayon::prelude::*;
use serde::Deserialize;

use crate::event::{RunMeta, StageTrace};

/// Where an event sits in its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Loc {
    /// 1-based line number.
    pub line: u64,
    /// Byte offset of the line's first byte.
    pub offset: u64,
    /// Length of the line in bytes, without its newline.
    pub len: u32,
}

/// One parsed line.
// Nearly every line is a `stage_trace`: boxing it would cost an allocation per event.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Record<'a> {
    /// A `stage_trace` event.
    Stage(StageTrace<'a>),
    /// A `run_meta` event.
    Meta(Box<RunMeta>),
    /// An event this format version does not define (skipped by analysis).
    Other(Cow<'a, str>),
}

/// A line that could not be read as an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadLine {
    /// 1-based line number.
    pub line: u64,
    /// What is wrong with it.
    pub message: String,
}

/// How to treat bad lines.
#[derive(Debug, Clone, Copy)]
pub struct ReadOptions {
    /// Skip bad lines (counted and listed in [`ReadStats`]) instead of failing.
    pub lenient: bool,
    /// How many bad lines to keep for messages; reading stops at this many in strict mode.
    pub max_listed: usize,
    /// Bytes read per chunk.
    pub chunk_size: usize,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions { lenient: false, max_listed: 20, chunk_size: 2 << 20 }
    }
}

/// What a read saw.
#[derive(Debug, Clone, Default)]
pub struct ReadStats {
    /// Bytes read.
    pub bytes: u64,
    /// Lines read (blank ones included).
    pub lines: u64,
    /// `stage_trace` events delivered.
    pub stage_events: u64,
    /// `run_meta` events delivered.
    pub meta_events: u64,
    /// Events of unknown kinds, skipped.
    pub other_events: u64,
    /// Bad lines seen (lenient mode skips them).
    pub bad_line_count: u64,
    /// The first `max_listed` bad lines.
    pub bad_lines: Vec<BadLine>,
}

/// Why a trace could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The file could not be opened or read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The trace file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The file holds no event at all.
    #[error("{}: the trace is empty (no events)", path.display())]
    Empty {
        /// The trace file.
        path: PathBuf,
    },
    /// Some lines are not valid events (strict mode).
    #[error("{}", BadLinesDisplay { path, lines, total: *total })]
    BadLines {
        /// The trace file.
        path: PathBuf,
        /// The first bad lines.
        lines: Vec<BadLine>,
        /// How many bad lines were seen before reading stopped.
        total: u64,
    },
}

struct BadLinesDisplay<'a> {
    path: &'a Path,
    lines: &'a [BadLine],
    total: u64,
}

impl fmt::Display for BadLinesDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, bad) in self.lines.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}:{}: {}", self.path.display(), bad.line, bad.message)?;
        }
        let more = self.total.saturating_sub(self.lines.len() as u64);
        if more > 0 {
            write!(f, "\n... and {more} more bad line(s)")?;
        }
        Ok(())
    }
}

/// Work done on each event on the reader's worker threads, before events reach the sink in file
/// order. Lets a consumer turn borrowed events into its own records in parallel.
pub trait Visit: Sync {
    /// What the visitor makes of one event; may borrow from the line.
    type Item<'a>: Send;
    /// What a worker remembers from one event to the next. Each worker parses runs of
    /// consecutive lines; a fresh `Run` starts every run, and the sink receives the runs' items
    /// in file order. So an item may say "like the event before me" (for example: the same
    /// prompt) when the run's state says so, and the sink can rely on it without looking at the
    /// line again.
    type Run: Default;
    /// Called on a worker thread for every event.
    fn visit<'a>(&self, record: Record<'a>, loc: Loc, run: &mut Self::Run) -> Self::Item<'a>;
    /// Called instead of [`Visit::visit`] for `stage_trace` events: the event by reference,
    /// since moving it costs more than most visitors do with it. By default it is cloned and
    /// visited.
    fn visit_stage<'a>(&self, ev: &StageTrace<'a>, loc: Loc, run: &mut Self::Run) -> Self::Item<'a> {
        self.visit(Record::Stage(ev.clone()), loc, run)
    }
}

/// The visitor that hands events on unchanged.
struct Identity;

impl Visit for Identity {
    type Item<'a> = (Record<'a>, Loc);
    type Run = ();
    fn visit<'a>(&self, record: Record<'a>, loc: Loc, _: &mut ()) -> Self::Item<'a> {
        (record, loc)
    }
}

/// Reads a trace file, calling `sink` for every event in file order.
pub fn read_file(
    path: &Path,
    opts: ReadOptions,
    mut sink: impl FnMut(Record<'_>, Loc) + Send,
) -> Result<ReadStats, TraceError> {
    read_file_visit(path, opts, &Identity, |(rec, loc)| sink(rec, loc))
}

/// Reads a trace file: `visitor` runs on every event on all cores, then `sink` receives the
/// visitor's items in file order.
pub fn read_file_visit<V: Visit>(
    path: &Path,
    opts: ReadOptions,
    visitor: &V,
    sink: impl FnMut(V::Item<'_>) + Send,
) -> Result<ReadStats, TraceError> {
    let io_err = |source| TraceError::Io { path: path.to_path_buf(), source };
    let stats = if is_stdin(path) {
        read_visit(io::stdin(), opts, visitor, sink).map_err(io_err)?
    } else {
        let file = File::open(path).map_err(io_err)?;
        read_open_file(file, opts, visitor, sink).map_err(io_err)?
    };
    if stats.bad_line_count > 0 && !opts.lenient {
        return Err(TraceError::BadLines {
            path: path.to_path_buf(),
            lines: stats.bad_lines,
            total: stats.bad_line_count,
        });
    }
    if stats.stage_events + stats.meta_events + stats.other_events == 0 && stats.bad_line_count == 0 {
        return Err(TraceError::Empty { path: path.to_path_buf() });
    }
    Ok(stats)
}

/// Whether a trace argument means standard input (`-`).
pub fn is_stdin(path: &Path) -> bool {
    path.as_os_str() == "-"
}

/// Whether a trace can be read a second time at the offsets of its lines: a regular file (not
/// standard input, a pipe or a FIFO, which are read once, as they stream).
pub fn is_rereadable(path: &Path) -> bool {
    !is_stdin(path) && std::fs::metadata(path).is_ok_and(|m| m.is_file())
}

/// Reads an open file: mapped when it is a regular file, streamed otherwise (a pipe or a FIFO).
fn read_open_file<V: Visit>(
    file: File,
    opts: ReadOptions,
    visitor: &V,
    sink: impl FnMut(V::Item<'_>) + Send,
) -> io::Result<ReadStats> {
    let regular = file.metadata()?.is_file();
    Ok(if regular {
        // SAFETY: the map is only read. If another process truncates the trace while it is being
        // analyzed, reading the lost pages raises SIGBUS; traces are written before analysis.
        let map = unsafe { memmap2::Mmap::map(&file) }?;
        let stats = read_mapped(&map, opts, visitor, sink);
        // Unmapping a large file takes a while (every page's entry is cleared): let a worker
        // do it when one is idle, while the caller goes on.
        rayon::spawn(move || drop(map));
        stats
    } else {
        read_visit(file, opts, visitor, sink)?
    })
}

/// Reads JSONL from any reader, calling `sink` for every event in order. Bad lines are recorded
/// in the returned stats; in strict mode reading stops once `max_listed` of them were seen.
pub fn read_jsonl<R: Read + Send>(
    input: R,
    opts: ReadOptions,
    mut sink: impl FnMut(Record<'_>, Loc),
) -> io::Result<ReadStats> {
    read_visit(input, opts, &Identity, |(rec, loc)| sink(rec, loc))
}

/// [`read_jsonl`] with a parallel visitor (see [`read_file_visit`]).
///
/// A reader thread fills blocks of whole lines while the worker threads parse the previous
/// block; blocks are recycled, so memory stays at a few blocks whatever the input size.
pub fn read_visit<R: Read + Send, V: Visit>(
    input: R,
    opts: ReadOptions,
    visitor: &V,
    mut sink: impl FnMut(V::Item<'_>),
) -> io::Result<ReadStats> {
    let chunk = opts.chunk_size.max(1 << 10);
    let mut stats = ReadStats::default();
    let (full_tx, full_rx) = mpsc::sync_channel::<io::Result<Block>>(1);
    let (free_tx, free_rx) = mpsc::channel::<Block>();
    std::thread::scope(|scope| {
        scope.spawn(move || fill_blocks(input, chunk, full_tx, free_rx));
        let mut base_offset = 0u64;
        for block in full_rx {
            let block = block?;
            let lines_before = stats.lines;
            let data = &block.data[..block.end];
            parse_block(data, base_offset, lines_before, block.eof, opts, &mut stats, visitor, &mut sink);
            base_offset += block.end as u64;
            if !opts.lenient && stats.bad_line_count as usize >= opts.max_listed {
                break; // dropping the receiver stops the reader thread
            }
            let _ = free_tx.send(block);
        }
        Ok(stats)
    })
}

/// A buffer of whole lines: `data[..end]`.
struct Block {
    data: Vec<u8>,
    end: usize,
    eof: bool,
}

/// The reader thread: fills blocks that end at a newline (or at the end of the input) and sends
/// them on; the bytes after the last newline start the next block.
fn fill_blocks<R: Read>(
    mut input: R,
    chunk: usize,
    full: mpsc::SyncSender<io::Result<Block>>,
    free: mpsc::Receiver<Block>,
) {
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let mut data = free.try_recv().map(|b| b.data).unwrap_or_default();
        if data.len() < (chunk + carry.len()).max(chunk * 2) {
            data.resize((chunk + carry.len()).max(chunk * 2), 0);
        }
        data[..carry.len()].copy_from_slice(&carry);
        let mut filled = carry.len();
        let mut eof = false;
        // Read at least a chunk, and on until the block holds a newline or the input ends
        // (a line longer than a chunk makes the block grow).
        let mut target = chunk;
        loop {
            while filled < target && !eof {
                if filled == data.len() {
                    data.resize(data.len() * 2, 0);
                }
                match input.read(&mut data[filled..]) {
                    Ok(0) => eof = true,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let _ = full.send(Err(e));
                        return;
                    }
                }
            }
            if eof || memchr::memchr(b'\n', &data[carry.len()..filled]).is_some() {
                break;
            }
            target = filled + chunk;
        }
        let end = if eof { filled } else { memchr::memrchr(b'\n', &data[..filled]).map_or(filled, |i| i + 1) };
        carry.clear();
        carry.extend_from_slice(&data[end..filled]);
        if full.send(Ok(Block { data, end, eof })).is_err() || eof {
            return;
        }
    }
}

/// One line's parse result.
enum Parsed<T> {
    Blank,
    Event(T, EventKind),
    Bad(u64, String),
}

#[derive(Clone, Copy)]
enum EventKind {
    Stage,
    Meta,
    Other,
}

/// Parses a block of whole lines on all cores and delivers the results in order.
#[allow(clippy::too_many_arguments)]
fn parse_block<'a, V: Visit>(
    block: &'a [u8],
    base_offset: u64,
    base_line: u64,
    ends_file: bool,
    opts: ReadOptions,
    stats: &mut ReadStats,
    visitor: &V,
    sink: &mut impl FnMut(V::Item<'a>),
) {
    let parsed = parse_lines(block, base_offset, base_line, ends_file, visitor);
    deliver(parsed, opts, stats, sink);
}

/// A block's parse results, in order, and the number of the block's last line.
struct ParsedBlock<T> {
    parts: Vec<Vec<Parsed<T>>>,
    last_line: u64,
    bytes: u64,
}

/// Parses a block of whole lines on all cores (`base_line` lines come before it).
fn parse_lines<'a, V: Visit>(
    block: &'a [u8],
    base_offset: u64,
    base_line: u64,
    ends_file: bool,
    visitor: &V,
) -> ParsedBlock<V::Item<'a>> {
    let parts = split_at_lines(block, 16 << 10);
    // Line numbers of each part's first line: count newlines first (cheap), then parse.
    let counts: Vec<u64> = parts.par_iter().map(|&(s, e)| count_newlines(&block[s..e])).collect();
    let mut first_lines = Vec::with_capacity(parts.len());
    let mut line = base_line;
    for (i, &(s, e)) in parts.iter().enumerate() {
        first_lines.push(line + 1);
        // A part without a final newline (the end of the file) still holds one more line.
        line += counts[i] + u64::from(e > s && block[e - 1] != b'\n');
    }
    let parsed = parts
        .par_iter()
        .zip(first_lines.par_iter())
        .map(|(&(start, end), &first_line)| {
            let mut out = Vec::with_capacity((end - start) / 96 + 8);
            let mut pos = start;
            let mut line_no = first_line;
            let mut run = V::Run::default();
            while pos < end {
                let (nl, ascii) = line_end(&block[pos..end]);
                let nl = nl.map(|i| pos + i);
                let line_end = nl.unwrap_or(end);
                let last_of_file = ends_file && nl.is_none();
                let raw = &block[pos..line_end];
                let loc = Loc { line: line_no, offset: base_offset + pos as u64, len: raw.len() as u32 };
                out.push(parse_line(raw, ascii, last_of_file, visitor, loc, &mut run));
                pos = line_end + 1;
                line_no += 1;
            }
            out
        })
        .collect();
    ParsedBlock { parts: parsed, last_line: line, bytes: block.len() as u64 }
}

/// Hands a parsed block to the sink in order and counts what it held.
fn deliver<T>(block: ParsedBlock<T>, opts: ReadOptions, stats: &mut ReadStats, sink: &mut impl FnMut(T)) {
    for item in block.parts.into_iter().flatten() {
        match item {
            Parsed::Blank => {}
            Parsed::Event(item, kind) => {
                match kind {
                    EventKind::Stage => stats.stage_events += 1,
                    EventKind::Meta => stats.meta_events += 1,
                    EventKind::Other => stats.other_events += 1,
                }
                sink(item);
            }
            Parsed::Bad(line, message) => {
                stats.bad_line_count += 1;
                if stats.bad_lines.len() < opts.max_listed {
                    stats.bad_lines.push(BadLine { line, message });
                }
            }
        }
    }
    stats.lines = block.last_line;
    stats.bytes += block.bytes;
}

/// Reads a memory-mapped file: while the sink takes block k, the workers parse block k+1.
fn read_mapped<V: Visit>(
    data: &[u8],
    opts: ReadOptions,
    visitor: &V,
    mut sink: impl FnMut(V::Item<'_>) + Send,
) -> ReadStats {
    let chunk = opts.chunk_size.max(1 << 10);
    let mut stats = ReadStats::default();
    let mut pending: Option<ParsedBlock<V::Item<'_>>> = None;
    let (mut start, mut lines) = (0usize, 0u64);
    loop {
        let too_many = |s: &ReadStats| !opts.lenient && s.bad_line_count as usize >= opts.max_listed;
        let end = if data.len() - start <= chunk {
            data.len()
        } else {
            memchr(b'\n', &data[start + chunk..]).map_or(data.len(), |i| start + chunk + i + 1)
        };
        let block = &data[start..end];
        let (_, parsed) = rayon::join(
            || {
                if let Some(p) = pending.take() {
                    deliver(p, opts, &mut stats, &mut sink);
                }
            },
            || (!block.is_empty()).then(|| parse_lines(block, start as u64, lines, end == data.len(), visitor)),
        );
        let Some(parsed) = parsed else { break };
        if too_many(&stats) {
            break;
        }
        lines = parsed.last_line;
        pending = Some(parsed);
        start = end;
    }
    stats
}

fn count_newlines(bytes: &[u8]) -> u64 {
    memchr::memchr_iter(b'\n', bytes).count() as u64
}

/// Splits `block` into ranges of about `target` bytes that end at newlines (small enough that
/// each range's parse results fit in memory the allocator reuses).
fn split_at_lines(block: &[u8], target: usize) -> Vec<(usize, usize)> {
    let mut parts = Vec::new();
    let mut start = 0;
    while start < block.len() {
        let mut end = (start + target).min(block.len());
        if end < block.len() {
            end = match memchr(b'\n', &block[end..]) {
                Some(i) => end + i + 1,
                None => block.len(),
            };
        }
        parts.push((start, end));
        start = end;
    }
    parts
}

use memchr::memchr;

#[derive(Deserialize)]
struct Tag<'a> {
    #[serde(borrow)]
    event: Option<Cow<'a, str>>,
}

/// The index of the first newline of `b` (`None` if it has none) and whether the bytes before it
/// are all ASCII: one pass for both, 32 bytes at a time with AVX2 where the CPU has it.
fn line_end(b: &[u8]) -> (Option<usize>, bool) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked above).
        return unsafe { line_end_avx2(b) };
    }
    let nl = memchr(b'\n', b);
    (nl, b[..nl.unwrap_or(b.len())].is_ascii())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn line_end_avx2(b: &[u8]) -> (Option<usize>, bool) {
    use std::arch::x86_64::*;
    let newline = _mm256_set1_epi8(b'\n' as i8);
    let mut high = _mm256_setzero_si256();
    let mut i = 0;
    while i + 32 <= b.len() {
        // SAFETY: i + 32 <= b.len(); unaligned load.
        let v = unsafe { _mm256_loadu_si256(b.as_ptr().add(i).cast()) };
        let nl = _mm256_movemask_epi8(_mm256_cmpeq_epi8(v, newline)) as u32;
        if nl != 0 {
            let k = nl.trailing_zeros();
            let before = (_mm256_movemask_epi8(v) as u32) & ((1u32 << k) - 1);
            return (Some(i + k as usize), _mm256_movemask_epi8(high) == 0 && before == 0);
        }
        high = _mm256_or_si256(high, v);
        i += 32;
    }
    let ascii = _mm256_movemask_epi8(high) == 0;
    let nl = memchr(b'\n', &b[i..]).map(|k| i + k);
    (nl, ascii && b[i..nl.unwrap_or(b.len())].is_ascii())
}

/// Parses one line (without its newline) at `loc` and visits its event; `ascii`: whether all
/// its bytes are ASCII.
fn parse_line<'a, V: Visit>(
    raw: &'a [u8],
    ascii: bool,
    last_of_file: bool,
    visitor: &V,
    loc: Loc,
    run: &mut V::Run,
) -> Parsed<V::Item<'a>> {
    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Parsed::Blank;
    }
    let line = if ascii {
        debug_assert!(raw.is_ascii());
        // SAFETY: ASCII bytes are valid UTF-8.
        unsafe { std::str::from_utf8_unchecked(raw) }
    } else {
        match std::str::from_utf8(raw) {
            Ok(s) => s,
            Err(e) => {
                return Parsed::Bad(loc.line, format!("not valid UTF-8 (bad byte at column {})", e.valid_up_to() + 1))
            }
        }
    };
    let bad = |what: &str, e: serde_json::Error| {
        let truncated = last_of_file && e.classify() == serde_json::error::Category::Eof;
        let msg = json_message(&e);
        Parsed::Bad(
            loc.line,
            if truncated {
                format!("truncated last line (the file ends in the middle of an event): {msg}")
            } else {
                format!("{what}{msg}")
            },
        )
    };
    if !line.trim_start().starts_with('{') {
        return match serde_json::from_str::<serde::de::IgnoredAny>(line) {
            Err(e) => bad("", e),
            Ok(_) => Parsed::Bad(loc.line, "not a JSON object (each line must hold one event object)".to_string()),
        };
    }
    let event: Cow<'_, str> = if crate::fast::starts_as_stage(line.as_bytes()) {
        Cow::Borrowed("stage_trace")
    } else {
        match serde_json::from_str::<Tag<'_>>(line) {
            Ok(Tag { event: Some(event) }) => event,
            Ok(Tag { event: None }) => return Parsed::Bad(loc.line, "missing field `event`".to_string()),
            Err(e) => return bad("", e),
        }
    };
    match event.as_ref() {
        "stage_trace" => {
            let mut ev = StageTrace::empty();
            if crate::fast::parse_stage_into(line, &mut ev).is_none() {
                ev = match serde_json::from_str(line) {
                    Ok(ev) => ev,
                    Err(e) => return bad("stage_trace: ", e),
                };
            }
            Parsed::Event(visitor.visit_stage(&ev, loc, run), EventKind::Stage)
        }
        "run_meta" => match RunMeta::from_json(line) {
            Ok(meta) => Parsed::Event(visitor.visit(Record::Meta(Box::new(meta)), loc, run), EventKind::Meta),
            Err(e) => bad("run_meta: ", e),
        },
        _ => Parsed::Event(visitor.visit(Record::Other(event), loc, run), EventKind::Other),
    }
}

/// serde_json's message with its "at line 1 column N" turned into "(column N)".
fn json_message(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(i) => format!("{} (column {})", &text[..i], e.column()),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-pass line end agrees with `memchr` and `is_ascii` wherever the newline and a
    /// non-ASCII byte fall, around the 32-byte steps.
    #[test]
    fn line_end_finds_the_newline_and_non_ascii_bytes() {
        for len in [0, 1, 31, 32, 33, 63, 64, 65, 100] {
            for nl in (0..len).step_by(7).map(Some).chain([None]) {
                for high in (0..len).step_by(5).map(Some).chain([None]) {
                    let mut b = vec![b'a'; len];
                    if let Some(h) = high {
                        b[h] = 0xC3;
                    }
                    if let Some(n) = nl {
                        b[n] = b'\n';
                    }
                    let want_nl = memchr(b'\n', &b);
                    let want = (want_nl, b[..want_nl.unwrap_or(len)].is_ascii());
                    assert_eq!(line_end(&b), want, "len {len}, newline {nl:?}, high byte {high:?}");
                }
            }
        }
    }

    const EV: &str = r#"{"event":"stage_trace","prompt_id":"p","phase":"decode0","point":"x_in","layer":3,"step":1,"pos_id":5,"seq_len":1,"hash":7,"min":0,"max":1,"mean":0.5}"#;

    fn read(text: &str, opts: ReadOptions) -> (Vec<(String, Loc)>, ReadStats) {
        let mut got = Vec::new();
        let stats = read_jsonl(text.as_bytes(), opts, |rec, loc| {
            let name = match rec {
                Record::Stage(ev) => format!("{}@{}", ev.point, ev.layer),
                Record::Meta(m) => format!("meta:{}", m.engine.unwrap_or_default()),
                Record::Other(name) => format!("other:{name}"),
            };
            got.push((name, loc));
        })
        .unwrap();
        (got, stats)
    }

    #[test]
    fn lines_offsets_and_kinds_are_exact_across_tiny_chunks() {
        let text = format!(
            "{}\n\n{}\r\n{EV}\n{{\"event\":\"vendor_x\",\"a\":1}}\n{EV}",
            r#"{"engine":"e","event":"run_meta"}"#,
            EV.replace("x_in", "q")
        );
        for chunk_size in [1, 7, 64, 1 << 20] {
            let opts = ReadOptions { chunk_size, ..Default::default() };
            let (got, stats) = read(&text, opts);
            let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names, ["meta:e", "q@3", "x_in@3", "other:vendor_x", "x_in@3"]);
            let lines: Vec<u64> = got.iter().map(|(_, l)| l.line).collect();
            assert_eq!(lines, [1, 3, 4, 5, 6]);
            for (_, loc) in &got {
                let slice = &text[loc.offset as usize..][..loc.len as usize];
                assert!(slice.trim_end_matches('\r').ends_with('}'), "{slice:?}");
            }
            assert_eq!((stats.stage_events, stats.meta_events, stats.other_events), (3, 1, 1));
            assert_eq!((stats.lines, stats.bytes), (6, text.len() as u64));
        }
    }

    #[test]
    fn bad_lines_name_their_problem() {
        let text = [
            "{not json",
            &EV.replace(r#""hash":7"#, r#""hash":-7"#),
            &EV.replace(r#""layer":3,"#, ""),
            r#"{"prompt_id":"p"}"#,
            &EV.replace(r#""max":1"#, r#""max":NaN"#),
            EV,
            &EV[..40],
        ]
        .join("\n");
        let (got, stats) = read(&text, ReadOptions { lenient: true, ..Default::default() });
        assert_eq!(got.len(), 1);
        let msgs: Vec<(u64, &str)> = stats.bad_lines.iter().map(|b| (b.line, b.message.as_str())).collect();
        assert_eq!(msgs.len(), 6, "{msgs:?}");
        assert!(msgs[0].1.contains("key must be a string"), "{msgs:?}");
        assert!(msgs[1].1.starts_with("stage_trace: hash is negative (-7)"), "{msgs:?}");
        assert!(msgs[2].1.contains("missing field `layer`"), "{msgs:?}");
        assert_eq!(msgs[3].1, "missing field `event`");
        assert!(msgs[4].1.contains("expected value (column"), "{msgs:?}");
        assert_eq!(msgs[5].0, 7);
        assert!(msgs[5].1.starts_with("truncated last line"), "{msgs:?}");
    }

    /// The memory-mapped path (files) and the streaming path (any reader) see the same events,
    /// lines, offsets and bad lines, whatever the block size.
    #[test]
    fn mapped_and_streamed_reads_agree() {
        let mut text = String::new();
        for i in 0..500 {
            text.push_str(&EV.replace(r#""layer":3"#, &format!(r#""layer":{i}"#)));
            text.push('\n');
            if i % 97 == 0 {
                text.push_str("{broken\n\n");
            }
        }
        text.push_str(&EV[..50]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        std::fs::write(&path, &text).unwrap();
        for chunk_size in [1 << 10, 5000, 1 << 20] {
            let opts = ReadOptions { chunk_size, lenient: true, ..Default::default() };
            let collect = |locs: &mut Vec<(u32, Loc)>, rec: Record<'_>, loc: Loc| {
                if let Record::Stage(ev) = rec {
                    locs.push((ev.layer, loc));
                }
            };
            let (mut a, mut b) = (vec![], vec![]);
            let sa = read_file(&path, opts, |r, l| collect(&mut a, r, l)).unwrap();
            let sb = read_jsonl(text.as_bytes(), opts, |r, l| collect(&mut b, r, l)).unwrap();
            assert_eq!(a.len(), 500);
            assert_eq!(a, b, "chunk {chunk_size}");
            assert_eq!((sa.lines, sa.bytes, sa.bad_line_count), (sb.lines, sb.bytes, sb.bad_line_count));
            assert_eq!(sa.bad_lines, sb.bad_lines);
            assert_eq!(sa.bad_line_count, 7);
            assert!(sa.bad_lines.last().unwrap().message.starts_with("truncated last line"));
        }
    }

    #[test]
    fn non_utf8_is_reported_with_its_column() {
        let mut bytes = EV.as_bytes().to_vec();
        bytes[30] = 0xff;
        let stats = read_jsonl(&bytes[..], ReadOptions::default(), |_, _| {}).unwrap();
        assert_eq!(stats.bad_lines[0], BadLine { line: 1, message: "not valid UTF-8 (bad byte at column 31)".into() });
    }

    #[test]
    fn strict_read_file_fails_with_path_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        std::fs::write(&path, format!("{EV}\n{{\"event\":\"stage_trace\"}}\n")).unwrap();
        let err = read_file(&path, ReadOptions::default(), |_, _| {}).unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with(&format!("{}:2: stage_trace: missing field", path.display())), "{text}");
        std::fs::write(&path, "\n  \n").unwrap();
        let err = read_file(&path, ReadOptions::default(), |_, _| {}).unwrap_err();
        assert!(err.to_string().ends_with("the trace is empty (no events)"));
        let missing = dir.path().join("nope.jsonl");
        assert!(matches!(read_file(&missing, ReadOptions::default(), |_, _| {}), Err(TraceError::Io { .. })));
    }
}
