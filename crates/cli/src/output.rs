//! Writing result files safely: never over the input, never half-written.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The absolute form of a path whose file may not exist yet.
fn absolute(path: &Path) -> PathBuf {
    if let Ok(p) = path.canonicalize() {
        return p;
    }
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    match (parent.canonicalize(), path.file_name()) {
        (Ok(dir), Some(name)) => dir.join(name),
        _ => path.to_path_buf(),
    }
}

/// Refuses outputs that would overwrite an input or each other.
pub fn check_outputs(inputs: &[&Path], outputs: &[&Path]) -> Result<()> {
    for (i, out) in outputs.iter().enumerate() {
        let abs = absolute(out);
        for input in inputs {
            if absolute(input) == abs {
                bail!("refusing to write {} over the input {}", out.display(), input.display());
            }
        }
        // Two outputs may share a device (`/dev/null`), never a file.
        let device = std::fs::metadata(out).is_ok_and(|m| !m.is_file() && !m.is_dir());
        for other in &outputs[..i] {
            if absolute(other) == abs && !device {
                bail!("two outputs name the same file {}", out.display());
            }
        }
        if abs.is_dir() {
            bail!("{} is a directory, not a file", out.display());
        }
    }
    Ok(())
}

/// Writes `contents` to `path` atomically: a temporary file in the same directory, then rename.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(contents))
}

/// Writes `path` through `write` (buffered) into a temporary file of the same folder, then renames
/// it over `path`: a failed write leaves what was there before. A path that names something other
/// than a regular file (`/dev/null`, `/dev/stdout`, a FIFO) is written into as it is, never
/// replaced.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<()> {
    if std::fs::metadata(path).is_ok_and(|m| !m.is_file() && !m.is_dir()) {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
        write(&mut w).and_then(|()| w.flush()).with_context(|| format!("cannot write {}", path.display()))?;
        return Ok(());
    }
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut builder = tempfile::Builder::new();
    builder.prefix(".driftscope-");
    // Results are ordinary files: readable as the umask allows, not private like a temp file.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    let mut tmp = builder.tempfile_in(dir).with_context(|| format!("cannot create a file in {}", dir.display()))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, tmp.as_file_mut());
    write(&mut w).and_then(|()| w.flush()).with_context(|| format!("cannot write {}", path.display()))?;
    drop(w);
    tmp.persist(path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
