//! Reading the rows an engine dumped next to its trace (`trace.safetensors` beside
//! `trace.jsonl`), so that pairs can be compared element by element.

use std::fs::File;
use std::path::{Path, PathBuf};

use driftscope_trace::DType;
use safetensors::tensor::Metadata;
use safetensors::{Dtype, SafeTensors};

use crate::file_error::FileError;

/// A dump file, memory-mapped, with its header parsed once.
pub struct DumpFile {
    path: PathBuf,
    map: memmap2::Mmap,
    header: usize,
    meta: Metadata,
}

impl std::fmt::Debug for DumpFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DumpFile").field("path", &self.path).finish()
    }
}

/// The dump that belongs to a trace: same name, `.safetensors`.
pub fn dump_path(trace: &Path) -> PathBuf {
    trace.with_extension("safetensors")
}

impl DumpFile {
    /// Opens a dump; `Ok(None)` when the file does not exist.
    pub fn open(path: &Path) -> Result<Option<DumpFile>, FileError> {
        let io = |source| FileError::Io { path: path.to_path_buf(), source };
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        // SAFETY: read-only map of a file written before the analysis; a concurrent truncation
        // would raise SIGBUS, as for the trace itself.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let (header, meta) = SafeTensors::read_metadata(&map).map_err(|e| FileError::Bad {
            path: path.to_path_buf(),
            message: format!("not a safetensors file: {e}"),
        })?;
        Ok(Some(DumpFile { path: path.to_path_buf(), map, header, meta }))
    }

    /// The row stored under `name`, as f32 values and its dtype; `Ok(None)` when absent.
    pub fn row(&self, name: &str) -> Result<Option<(Vec<f32>, DType)>, FileError> {
        let Some(info) = self.meta.info(name) else { return Ok(None) };
        let bad = |message: String| FileError::Bad {
            path: self.path.clone(),
            message: format!("tensor `{name}`: {message}"),
        };
        let (start, end) = info.data_offsets;
        let base = 8 + self.header;
        let bytes = self
            .map
            .get(base + start..base + end)
            .ok_or_else(|| bad(format!("data {start}..{end} is past the end of the file")))?;
        let (values, dtype) = match info.dtype {
            Dtype::F32 => {
                (bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(), DType::F32)
            }
            Dtype::BF16 => {
                (bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(), DType::BF16)
            }
            Dtype::F16 => {
                (bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(), DType::F16)
            }
            other => return Err(bad(format!("dtype {other:?} is not a row dtype (f32, bf16, f16)"))),
        };
        Ok(Some((values, dtype)))
    }
}
