//! Hugging Face checkpoints: `config.json`, `*.safetensors` (f32, f16 or bf16) and
//! `tokenizer.json`. Their q/k weights pair RoPE dimensions as halves `(i, i + d/2)`.

use std::collections::HashMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use super::{expect_shape, matrix, validated, Loaded};
use crate::config::{Config, RopeLayout};
use crate::error::EngineError;
use crate::model::Model;
use crate::tokenizer::Tokenizer;
use crate::weights::{LayerWeights, Storage, Weights};

#[derive(Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    #[serde(default = "default_theta")]
    rope_theta: f64,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_ctx")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    _name_or_path: Option<String>,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
}

fn default_theta() -> f64 {
    10_000.0
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ctx() -> usize {
    4096
}

/// The safetensors files of a checkpoint, memory-mapped, and where each tensor is: every header
/// parsed once, when the file is opened.
struct Tensors {
    files: Vec<(std::path::PathBuf, memmap2::Mmap)>,
    /// Tensor name -> (file, dtype, shape, byte range in the file).
    index: HashMap<String, (usize, Dtype, Vec<usize>, std::ops::Range<usize>)>,
}

impl Tensors {
    /// Maps `paths` and reads their headers; `expected` (from `model.safetensors.index.json`)
    /// names the file each tensor must be in.
    fn open(paths: &[std::path::PathBuf], expected: Option<&HashMap<String, String>>) -> Result<Tensors, EngineError> {
        let mut t = Tensors { files: Vec::with_capacity(paths.len()), index: HashMap::new() };
        for p in paths {
            let io = |source| EngineError::Io { path: p.clone(), source };
            let file = std::fs::File::open(p).map_err(io)?;
            // SAFETY: the map is only read; a checkpoint truncated while it is being loaded
            // raises SIGBUS, as for any reader of memory-mapped weights.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
            let header = |message: String| EngineError::Tensor { path: p.clone(), tensor: "(header)".into(), message };
            let (n, meta) = SafeTensors::read_metadata(&map).map_err(|e| header(e.to_string()))?;
            let data = 8 + n;
            for (name, info) in meta.tensors() {
                let (a, b) = info.data_offsets;
                t.index.insert(name, (t.files.len(), info.dtype, info.shape.clone(), data + a..data + b));
            }
            t.files.push((p.clone(), map));
        }
        if let Some(map) = expected {
            let mut names: Vec<&String> = map.keys().collect();
            names.sort();
            for name in names {
                let want = &map[name];
                let found = t.index.get(name).map(|e| &t.files[e.0].0);
                if found.and_then(|p| p.file_name()).is_none_or(|f| f.to_string_lossy() != want.as_str()) {
                    return Err(EngineError::Tensor {
                        path: found.cloned().unwrap_or_else(|| std::path::PathBuf::from(want)),
                        tensor: name.clone(),
                        message: format!("model.safetensors.index.json places it in `{want}`, which does not hold it"),
                    });
                }
            }
        }
        Ok(t)
    }

    /// A vector, in f32.
    fn get(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), EngineError> {
        let (shape, data) = self.get_storage(name)?;
        Ok((shape, data.range_f32(0, data.len()).into_owned()))
    }

    /// A tensor in its own type (f32, f16 or bf16).
    fn get_storage(&self, name: &str) -> Result<(Vec<usize>, Storage), EngineError> {
        let (i, dtype, shape, range) = self.index.get(name).ok_or_else(|| EngineError::Tensor {
            path: self.files.first().map(|f| f.0.clone()).unwrap_or_default(),
            tensor: name.into(),
            message: "missing from the checkpoint".into(),
        })?;
        let (path, map) = &self.files[*i];
        let err = |message: String| EngineError::Tensor { path: path.clone(), tensor: name.into(), message };
        let data = &map[range.clone()];
        let values = match dtype {
            Dtype::F32 => {
                Storage::F32(data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
            }
            Dtype::F16 => Storage::F16(data.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]])).collect()),
            Dtype::BF16 => {
                Storage::BF16(data.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]])).collect())
            }
            other => return Err(err(format!("dtype {other:?} is not supported (f32, f16, bf16)"))),
        };
        Ok((shape.clone(), values))
    }
}

/// The files of a checkpoint: those `model.safetensors.index.json` names (a sharded checkpoint),
/// else every `*.safetensors` of the directory; with the tensor-to-file map when there is one.
#[allow(clippy::type_complexity)]
fn checkpoint_files(dir: &Path) -> Result<(Vec<std::path::PathBuf>, Option<HashMap<String, String>>), EngineError> {
    let index_path = dir.join("model.safetensors.index.json");
    if index_path.exists() {
        #[derive(Deserialize)]
        struct Index {
            weight_map: HashMap<String, String>,
        }
        let bad = |message: String| EngineError::Config { path: index_path.clone(), key: "weight_map".into(), message };
        let text = std::fs::read_to_string(&index_path)
            .map_err(|source| EngineError::Io { path: index_path.clone(), source })?;
        let index: Index = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let mut files: Vec<&String> = index.weight_map.values().collect();
        files.sort();
        files.dedup();
        let mut paths = Vec::with_capacity(files.len());
        for f in files {
            let plain = Path::new(f).file_name().is_some_and(|n| n == f.as_str());
            if !plain {
                return Err(bad(format!("`{f}` is not a file name in the checkpoint's directory")));
            }
            let p = dir.join(f);
            if !p.is_file() {
                return Err(bad(format!("shard `{f}` is missing from the directory")));
            }
            paths.push(p);
        }
        if paths.is_empty() {
            return Err(bad("names no file".into()));
        }
        return Ok((paths, Some(index.weight_map)));
    }
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map_err(|source| EngineError::Io { path: dir.to_path_buf(), source })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(EngineError::Config {
            path: dir.to_path_buf(),
            key: "*.safetensors".into(),
            message: "no safetensors file in the directory".into(),
        });
    }
    Ok((names, None))
}

/// Loads a Hugging Face Llama-family checkpoint directory.
pub fn load_hf(dir: &Path) -> Result<Loaded, EngineError> {
    let cfg_path = dir.join("config.json");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| EngineError::Io { path, source }
    };
    let text = std::fs::read_to_string(&cfg_path).map_err(io(&cfg_path))?;
    let hf: HfConfig = serde_json::from_str(&text).map_err(|e| EngineError::Config {
        path: cfg_path.clone(),
        key: "config.json".into(),
        message: e.to_string(),
    })?;
    if let Some(arch) = hf.architectures.first() {
        let ok = ["LlamaForCausalLM", "MistralForCausalLM"].contains(&arch.as_str());
        if !ok {
            return Err(EngineError::UnsupportedArch { path: cfg_path, arch: arch.clone() });
        }
    }
    if let Some(scaling) = hf.rope_scaling.as_ref().filter(|v| !v.is_null()) {
        return Err(EngineError::Config {
            path: cfg_path,
            key: "rope_scaling".into(),
            message: format!(
                "RoPE scaling {scaling} is not supported yet (Llama 3.1/3.2's `llama3` scaling changes every angle)"
            ),
        });
    }
    let n_kv = hf.num_key_value_heads.unwrap_or(hf.num_attention_heads);
    let config = validated(
        &cfg_path,
        Config {
            name: dir.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
            n_layers: hf.num_hidden_layers,
            hidden: hf.hidden_size,
            ffn: hf.intermediate_size,
            n_heads: hf.num_attention_heads,
            n_kv_heads: n_kv,
            head_dim: hf.head_dim.unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1)),
            vocab: hf.vocab_size,
            rope_theta: hf.rope_theta,
            rms_eps: hf.rms_norm_eps as f32,
            max_context: hf.max_position_embeddings,
            rope_layout: RopeLayout::Halves,
        },
    )?;

    let (paths, expected) = checkpoint_files(dir)?;
    let t = Tensors::open(&paths, expected.as_ref())?;
    let c = &config;
    let mat = |name: &str, rows: usize, cols: usize| {
        let (shape, data) = t.get_storage(name)?;
        matrix(dir, name, &shape, data, rows, cols)
    };
    let vecn = |name: &str| -> Result<Vec<f32>, EngineError> {
        let (shape, data) = t.get(name)?;
        expect_shape(dir, name, &shape, c.hidden, 0)?;
        Ok(data)
    };
    let embed = mat("model.embed_tokens.weight", c.vocab, c.hidden)?;
    let mut layers = Vec::with_capacity(c.n_layers);
    for i in 0..c.n_layers {
        let n = |s: &str| format!("model.layers.{i}.{s}.weight");
        layers.push(LayerWeights {
            attn_norm: vecn(&n("input_layernorm"))?,
            wq: mat(&n("self_attn.q_proj"), c.q_dim(), c.hidden)?,
            wk: mat(&n("self_attn.k_proj"), c.kv_dim(), c.hidden)?,
            wv: mat(&n("self_attn.v_proj"), c.kv_dim(), c.hidden)?,
            wo: mat(&n("self_attn.o_proj"), c.hidden, c.q_dim())?,
            mlp_norm: vecn(&n("post_attention_layernorm"))?,
            w_gate: mat(&n("mlp.gate_proj"), c.ffn, c.hidden)?,
            w_up: mat(&n("mlp.up_proj"), c.ffn, c.hidden)?,
            w_down: mat(&n("mlp.down_proj"), c.hidden, c.ffn)?,
        });
    }
    let final_norm = vecn("model.norm.weight")?;
    let lm_head = if !hf.tie_word_embeddings && t.index.contains_key("lm_head.weight") {
        Some(mat("lm_head.weight", c.vocab, c.hidden)?)
    } else {
        None
    };
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = if tok_path.exists() { Tokenizer::from_file(&tok_path)? } else { Tokenizer::Bytes };
    Ok(Loaded { model: Model { weights: Weights { embed, layers, final_norm, lm_head }, config }, tokenizer })
}
