//! driftscope's trace format, version 1: the events an engine writes, the closed vocabulary of
//! trace points, the row hash and statistics, and a streaming reader.
//!
//! This crate owns the on-disk format and nothing else: it never pairs, compares or judges
//! events (that is `driftscope-analyze`), and never computes a model (that is the engine).
//! The format is specified in `docs/trace-format.md`.

mod event;
mod fast;
mod point;
mod reader;
mod row;

pub use event::{RunMeta, StageTrace, FORMAT_VERSION};
pub use fast::eq_short;
pub use point::{Point, UnknownPoint};
pub use reader::{
    is_rereadable, is_stdin, read_file, read_file_visit, read_jsonl, read_visit, BadLine, Loc, ReadOptions, ReadStats,
    Record, TraceError, Visit,
};
pub use row::{hash_bf16, hash_bytes, hash_f16, hash_f32, DType, RowStats};
