//! Why a file the analysis reads beside the trace (a dump, a tolerance file) cannot be used.

use std::path::PathBuf;

/// A side file that cannot be used; the message names the file.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file could not be opened, mapped or read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file's contents are unusable (not the expected format, a value out of range, ...).
    #[error("{}: {message}", path.display())]
    Bad {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the tensor or key.
        message: String,
    },
}
