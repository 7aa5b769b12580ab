//! The engine's errors: each names the file, and the tensor or key, and what is wrong.

use std::path::PathBuf;

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The GGUF container is malformed or truncated.
    #[error("{}: not a readable GGUF file: {message}", path.display())]
    Gguf {
        /// The file.
        path: PathBuf,
        /// What the reader said.
        message: String,
    },
    /// A tensor is missing, truncated, of an unsupported type, or of the wrong shape.
    #[error("{}: tensor `{tensor}`: {message}", path.display())]
    Tensor {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// What is wrong, with the offset where it applies.
        message: String,
    },
    /// A metadata key or config field is missing or invalid.
    #[error("{}: `{key}`: {message}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// The model is not of a supported architecture.
    #[error("{}: architecture `{arch}` is not supported (supported: llama and llama-family models such as SmolLM and Mistral)", path.display())]
    UnsupportedArch {
        /// The file.
        path: PathBuf,
        /// The architecture found.
        arch: String,
    },
    /// The tokenizer could not be built or used.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}
