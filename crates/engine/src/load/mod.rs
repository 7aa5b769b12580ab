//! Loading models from files: GGUF (llama.cpp's format) and Hugging Face checkpoints
//! (`config.json` + `*.safetensors`). Both end in the same [`Model`] with f32 weights.

mod gguf;
mod hf;

use std::path::Path;

pub use gguf::load_gguf;
pub use hf::load_hf;

use crate::config::Config;
use crate::error::EngineError;
use crate::model::Model;
use crate::tokenizer::Tokenizer;
use crate::weights::{Matrix, Storage};

/// A model with its tokenizer.
#[derive(Debug)]
pub struct Loaded {
    /// The model.
    pub model: Model,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
}

/// Where downloaded models are cached: `$DRIFTSCOPE_CACHE`, else `$XDG_CACHE_HOME/driftscope`,
/// else `$HOME/.cache/driftscope` (the folder `scripts/fetch-smollm2.sh` fills).
pub fn cache_dir() -> Option<std::path::PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(std::path::PathBuf::from);
    var("DRIFTSCOPE_CACHE")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("driftscope")))
        .or_else(|| var("HOME").map(|d| d.join(".cache").join("driftscope")))
}

/// The SmolLM2-135M-Instruct GGUF in the cache, if it was fetched.
pub fn find_smollm2() -> Option<std::path::PathBuf> {
    let dir = cache_dir()?.join("smollm2");
    let mut found: Vec<_> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    found.sort();
    found.into_iter().next()
}

/// Loads a `.gguf` file or a directory holding `config.json` and safetensors files.
pub fn load(path: &Path) -> Result<Loaded, EngineError> {
    if path.is_dir() {
        load_hf(path)
    } else {
        load_gguf(path)
    }
}

/// Checks a tensor's shape (`[rows, cols]`, or `[n]` with `cols == 0`) against the config.
pub(crate) fn expect_shape(
    path: &Path,
    name: &str,
    got: &[usize],
    rows: usize,
    cols: usize,
) -> Result<(), EngineError> {
    let want: Vec<usize> = if cols == 0 { vec![rows] } else { vec![rows, cols] };
    if got != want.as_slice() {
        return Err(EngineError::Tensor {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            message: format!("shape {got:?}, expected {want:?} from the model config"),
        });
    }
    Ok(())
}

/// Builds a matrix after checking its shape.
pub(crate) fn matrix(
    path: &Path,
    name: &str,
    shape: &[usize],
    data: Storage,
    rows: usize,
    cols: usize,
) -> Result<Matrix, EngineError> {
    expect_shape(path, name, shape, rows, cols)?;
    Ok(Matrix::from_storage(rows, cols, data))
}

/// The config's consistency, as an error naming the file.
pub(crate) fn validated(path: &Path, config: Config) -> Result<Config, EngineError> {
    config.validate().map_err(|message| EngineError::Config {
        path: path.to_path_buf(),
        key: "config".into(),
        message,
    })?;
    Ok(config)
}
