//! GGUF v2/v3 (`general.architecture = llama`) through candle's reader, which handles the
//! container and dequantizes every ggml type (F32, Q4_0, Q4_1, Q5_x, Q8_0, K-quants) to f32;
//! F16 and BF16 matrices are kept in 16 bits (the kernels widen them exactly), and Q4_1 and Q8_0
//! matrices as their blocks (the kernels dequantize them to the same f32 values as they read).
//!
//! llama.cpp's converter permutes the rows of each head of `attn_q` and `attn_k` so that RoPE
//! rotates adjacent pairs `(2i, 2i+1)`. The loader puts them back into Hugging Face's order
//! (pairs `(i, i + d/2)`): the model computes the same function, and its traced `q`, `k`,
//! `q_rope` and `k_rope` rows line up element by element with those of the same model run from
//! safetensors or through transformers, so cross-engine diffs compare like with like.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::Device;
use half::{bf16, f16};

use super::{expect_shape, matrix, validated, Loaded};
use crate::config::{Config, RopeLayout};
use crate::error::EngineError;
use crate::model::Model;
use crate::tokenizer::Tokenizer;
use crate::weights::{BlockQ4_1, BlockQ8_0, LayerWeights, Storage, Weights, BLOCK};

/// The storage types a matrix is kept in as the file has it.
#[derive(Debug, Clone, Copy)]
enum Kept {
    F16,
    BF16,
    Q4_1,
    Q8_0,
}

struct Gguf<'a> {
    path: &'a Path,
    file: BufReader<File>,
    content: Content,
}

impl Gguf<'_> {
    fn key(&self, key: &str) -> Result<&Value, EngineError> {
        self.content.metadata.get(key).ok_or_else(|| EngineError::Config {
            path: self.path.to_path_buf(),
            key: key.into(),
            message: "missing from the GGUF metadata".into(),
        })
    }

    fn bad(&self, key: &str, e: impl std::fmt::Display) -> EngineError {
        EngineError::Config { path: self.path.to_path_buf(), key: key.into(), message: e.to_string() }
    }

    fn usize(&self, key: &str) -> Result<usize, EngineError> {
        let v = self.key(key)?;
        v.to_u64().or_else(|_| v.to_u32().map(u64::from)).map(|x| x as usize).map_err(|e| self.bad(key, e))
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64, EngineError> {
        match self.content.metadata.get(key) {
            None => Ok(default),
            Some(v) => v.to_f32().map(f64::from).or_else(|_| v.to_f64()).map_err(|e| self.bad(key, e)),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<String>, EngineError> {
        let arr = self.key(key)?.to_vec().map_err(|e| self.bad(key, e))?;
        arr.iter().map(|v| v.to_string().cloned().map_err(|e| self.bad(key, e))).collect()
    }

    /// Reads a matrix: F16 and BF16 data stay in 16 bits, Q4_1 and Q8_0 blocks stay packed
    /// (when the rows are whole blocks), other types are dequantized to f32.
    fn matrix_data(&mut self, name: &str) -> Result<(Vec<usize>, Storage), EngineError> {
        let info = self.content.tensor_infos.get(name);
        let dtype = info.map(|t| t.ggml_dtype);
        // candle gives shapes row-major (it reverses ggml's order): the row length comes last.
        let whole_blocks = info.and_then(|t| t.shape.dims().last().copied()).is_some_and(|c| c % BLOCK == 0);
        let keep = match dtype {
            Some(GgmlDType::F16) => Some(Kept::F16),
            Some(GgmlDType::BF16) => Some(Kept::BF16),
            Some(GgmlDType::Q4_1) if whole_blocks => Some(Kept::Q4_1),
            Some(GgmlDType::Q8_0) if whole_blocks => Some(Kept::Q8_0),
            _ => None,
        };
        let Some(kept) = keep else {
            let (shape, values) = self.tensor(name)?;
            return Ok((shape, Storage::F32(values)));
        };
        let err = |message: String| EngineError::Tensor { path: self.path.to_path_buf(), tensor: name.into(), message };
        let type_name = format!("{kept:?}");
        let q = self
            .content
            .tensor(&mut self.file, name, &Device::Cpu)
            .map_err(|e| err(format!("cannot read {type_name} data: {e}")))?;
        let shape = q.shape().dims().to_vec();
        let bytes = q.data().map_err(|e| err(format!("cannot read {type_name} data: {e}")))?;
        let pairs = bytes.chunks_exact(2).map(|b| [b[0], b[1]]);
        let data = match kept {
            Kept::BF16 => Storage::BF16(pairs.map(bf16::from_le_bytes).collect()),
            Kept::F16 => Storage::F16(pairs.map(f16::from_le_bytes).collect()),
            Kept::Q4_1 => Storage::Q4_1(bytes.chunks_exact(BlockQ4_1::BYTES).map(BlockQ4_1::from_bytes).collect()),
            Kept::Q8_0 => Storage::Q8_0(bytes.chunks_exact(BlockQ8_0::BYTES).map(BlockQ8_0::from_bytes).collect()),
        };
        if data.len() != shape.iter().product::<usize>() {
            return Err(err(format!("{} values for shape {shape:?}", data.len())));
        }
        Ok((shape, data))
    }

    /// Reads and dequantizes a tensor; returns its shape (`[rows, cols]` row-major) and values.
    fn tensor(&mut self, name: &str) -> Result<(Vec<usize>, Vec<f32>), EngineError> {
        let err = |message: String| EngineError::Tensor { path: self.path.to_path_buf(), tensor: name.into(), message };
        let info = self.content.tensor_infos.get(name).ok_or_else(|| err("missing from the file".into()))?;
        let at = self.content.tensor_data_offset + info.offset;
        let dtype = info.ggml_dtype;
        let q = self
            .content
            .tensor(&mut self.file, name, &Device::Cpu)
            .map_err(|e| err(format!("cannot read {dtype:?} data at offset {at}: {e}")))?;
        let shape = q.shape().dims().to_vec();
        let values = q
            .dequantize(&Device::Cpu)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| err(format!("cannot dequantize {dtype:?} data at offset {at}: {e}")))?;
        Ok((shape, values))
    }
}

/// The header's `general.alignment`, read by walking the metadata without keeping it: candle's
/// reader divides by it. `Ok(None)` when absent, or when the header is not one this walk reads
/// (candle's reader then reports what is wrong).
fn header_alignment(file: &mut BufReader<File>, size: u64) -> std::io::Result<Option<u64>> {
    use std::io::{Read, Seek};
    fn u32_of(r: &mut impl Read) -> std::io::Result<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn u64_of(r: &mut impl Read) -> std::io::Result<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    /// Skips `n` bytes, refusing to go past the end of the file.
    fn skip(r: &mut BufReader<File>, n: u64, size: u64) -> std::io::Result<bool> {
        let at = r.stream_position()?;
        if at.checked_add(n).is_none_or(|end| end > size) {
            return Ok(false);
        }
        r.seek_relative(n as i64)?;
        Ok(true)
    }
    /// Skips a value of `kind`; `false` when it does not fit the file (or nests too deep).
    fn skip_value(r: &mut BufReader<File>, kind: u32, size: u64, wide: bool, depth: u32) -> std::io::Result<bool> {
        let len = |r: &mut BufReader<File>| if wide { u64_of(r) } else { u32_of(r).map(u64::from) };
        Ok(match kind {
            0 | 1 | 7 => skip(r, 1, size)?,
            2 | 3 => skip(r, 2, size)?,
            4..=6 => skip(r, 4, size)?,
            10..=12 => skip(r, 8, size)?,
            8 => {
                let n = len(r)?;
                skip(r, n, size)?
            }
            9 if depth < 4 => {
                let (inner, n) = (u32_of(r)?, len(r)?);
                let fixed = match inner {
                    0 | 1 | 7 => Some(1),
                    2 | 3 => Some(2),
                    4..=6 => Some(4),
                    10..=12 => Some(8),
                    _ => None,
                };
                match fixed {
                    Some(w) => n.checked_mul(w).is_some_and(|b| skip(r, b, size).unwrap_or(false)),
                    None => {
                        // Each element takes at least a byte: a count beyond the file is bad.
                        if n > size {
                            return Ok(false);
                        }
                        for _ in 0..n {
                            if !skip_value(r, inner, size, wide, depth + 1)? {
                                return Ok(false);
                            }
                        }
                        true
                    }
                }
            }
            _ => false,
        })
    }
    let mut magic = [0u8; 4];
    file.read_exact(&mut magic)?;
    let version = u32_of(file)?;
    if &magic != b"GGUF" || !(1..=3).contains(&version) {
        return Ok(None);
    }
    let wide = version > 1;
    let len = |r: &mut BufReader<File>| if wide { u64_of(r) } else { u32_of(r).map(u64::from) };
    let (_tensors, kvs) = (len(file)?, len(file)?);
    let mut alignment = None;
    for _ in 0..kvs.min(size) {
        let n = len(file)?;
        if n > 1 << 16 || file.stream_position()? + n > size {
            return Ok(None);
        }
        let mut key = vec![0u8; n as usize];
        file.read_exact(&mut key)?;
        let kind = u32_of(file)?;
        if key == b"general.alignment" && matches!(kind, 0..=5) {
            let mut b = [0u8; 4];
            let w = match kind {
                0 | 1 => 1,
                2 | 3 => 2,
                _ => 4,
            };
            file.read_exact(&mut b[..w])?;
            alignment = Some(u64::from(u32::from_le_bytes(b)));
        } else if !skip_value(file, kind, size, wide, 0)? {
            return Ok(None);
        }
    }
    Ok(alignment)
}

/// Checks every tensor of the header against the file before any is read: a size that
/// overflows, a type whose blocks do not divide the count, data past the end of the file, or two
/// tensors whose bytes overlap (a tensor retyped to a larger type reads its neighbours).
fn check_tensors(path: &Path, content: &Content, size: u64) -> Result<(), EngineError> {
    let mut ranges: Vec<(u64, u64, &str)> = Vec::with_capacity(content.tensor_infos.len());
    for (name, t) in &content.tensor_infos {
        let err = |message: String| EngineError::Tensor { path: path.to_path_buf(), tensor: name.clone(), message };
        let dims = t.shape.dims();
        let elems = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let Some(elems) = elems.filter(|&n| (n as u64) <= size.saturating_mul(8)) else {
            return Err(err(format!("dimensions {dims:?} hold more values than a file of {size} bytes can")));
        };
        let (block, bytes) = (t.ggml_dtype.block_size(), t.ggml_dtype.type_size());
        if !elems.is_multiple_of(block) {
            return Err(err(format!("{elems} values are not whole {:?} blocks of {block}", t.ggml_dtype)));
        }
        let len = (elems / block) as u64 * bytes as u64;
        let start = content.tensor_data_offset.checked_add(t.offset);
        let Some((start, end)) = start.and_then(|s| s.checked_add(len).map(|e| (s, e))).filter(|&(_, e)| e <= size)
        else {
            return Err(err(format!(
                "{len} bytes of {:?} data at offset {} (data section at {}) run past the end of the file ({size} bytes)",
                t.ggml_dtype, t.offset, content.tensor_data_offset
            )));
        };
        ranges.push((start, end, name));
    }
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(EngineError::Tensor {
                path: path.to_path_buf(),
                tensor: w[0].2.to_string(),
                message: format!(
                    "its bytes {}..{} overlap those of `{}` ({}..{}): a size or type in the header is wrong",
                    w[0].0, w[0].1, w[1].2, w[1].0, w[1].1
                ),
            });
        }
    }
    Ok(())
}

/// Loads a GGUF llama-family model and its tokenizer.
pub fn load_gguf(path: &Path) -> Result<Loaded, EngineError> {
    let io = |source| EngineError::Io { path: path.to_path_buf(), source };
    let gguf = |message: String| EngineError::Gguf { path: path.to_path_buf(), message };
    let mut file = BufReader::new(File::open(path).map_err(io)?);
    let size = file.get_ref().metadata().map_err(io)?.len();
    match header_alignment(&mut file, size) {
        Ok(Some(a)) if a == 0 || !a.is_power_of_two() || a > 1 << 20 => {
            return Err(gguf(format!("general.alignment is {a}: it must be a power of two from 1 to 2^20")));
        }
        _ => {}
    }
    std::io::Seek::rewind(&mut file).map_err(io)?;
    let content = Content::read(&mut file).map_err(|e| gguf(e.to_string()))?;
    check_tensors(path, &content, size)?;
    let mut g = Gguf { path, file, content };

    let arch = g.key("general.architecture")?.to_string().map_err(|e| g.bad("general.architecture", e))?.clone();
    if arch != "llama" {
        return Err(EngineError::UnsupportedArch { path: path.to_path_buf(), arch });
    }
    let a = |k: &str| format!("{arch}.{k}");
    // RoPE scaling (Llama 3.1's per-frequency factors, linear or YaRN scaling) changes every
    // angle: refused rather than computed wrong.
    if g.content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(EngineError::Tensor {
            path: path.to_path_buf(),
            tensor: "rope_freqs.weight".into(),
            message: "RoPE frequency factors (Llama 3.1-style rope scaling) are not supported yet".into(),
        });
    }
    let scaling = g.content.metadata.get(&a("rope.scaling.type")).and_then(|v| v.to_string().ok()).cloned();
    if let Some(kind) = scaling.filter(|k| k != "none") {
        return Err(g.bad(&a("rope.scaling.type"), format!("RoPE scaling `{kind}` is not supported yet")));
    }
    let hidden = g.usize(&a("embedding_length"))?;
    let n_heads = g.usize(&a("attention.head_count"))?;
    let n_kv_heads = if g.content.metadata.contains_key(&a("attention.head_count_kv")) {
        g.usize(&a("attention.head_count_kv"))?
    } else {
        n_heads
    };
    let head_dim = if g.content.metadata.contains_key(&a("rope.dimension_count")) {
        g.usize(&a("rope.dimension_count"))?
    } else {
        hidden / n_heads.max(1)
    };
    let embed_rows = g.content.tensor_infos.get("token_embd.weight").map(|t| t.shape.dims().to_vec());
    let vocab = match embed_rows.as_deref() {
        Some([rows, _]) => *rows,
        _ => g.usize(&a("vocab_size"))?,
    };
    let name = match g.content.metadata.get("general.name").and_then(|v| v.to_string().ok()) {
        Some(n) => n.clone(),
        None => path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
    };
    let config = validated(
        path,
        Config {
            name,
            n_layers: g.usize(&a("block_count"))?,
            hidden,
            ffn: g.usize(&a("feed_forward_length"))?,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab,
            rope_theta: g.f64_or(&a("rope.freq_base"), 10_000.0)?,
            rms_eps: g.f64_or(&a("attention.layer_norm_rms_epsilon"), 1e-5)? as f32,
            max_context: g.usize(&a("context_length")).unwrap_or(4096),
            rope_layout: RopeLayout::Halves,
        },
    )?;

    let c = &config;
    let mat = |g: &mut Gguf<'_>, name: &str, rows: usize, cols: usize| {
        let (shape, data) = g.matrix_data(name)?;
        matrix(path, name, &shape, data, rows, cols)
    };
    // q/k: back from the converter's per-head permutation to Hugging Face's row order.
    // The shape is checked first (`matrix`), so only a matrix of the expected shape is un-permuted.
    let mat_hf = |g: &mut Gguf<'_>, name: &str, rows: usize| {
        let mut m = mat(g, name, rows, c.hidden)?;
        if rows.is_multiple_of(c.head_dim) && c.head_dim.is_multiple_of(2) {
            m.data = m.data.gather_rows(&unpermuted_order(rows, c.head_dim), c.hidden);
        }
        Ok::<_, EngineError>(m)
    };
    let embed = mat(&mut g, "token_embd.weight", c.vocab, c.hidden)?;
    let mut layers = Vec::with_capacity(c.n_layers);
    for i in 0..c.n_layers {
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        let vecn = |g: &mut Gguf<'_>, name: String| -> Result<Vec<f32>, EngineError> {
            let (shape, data) = g.tensor(&name)?;
            expect_shape(path, &name, &shape, c.hidden, 0)?;
            Ok(data)
        };
        layers.push(LayerWeights {
            attn_norm: vecn(&mut g, n("attn_norm"))?,
            wq: mat_hf(&mut g, &n("attn_q"), c.q_dim())?,
            wk: mat_hf(&mut g, &n("attn_k"), c.kv_dim())?,
            wv: mat(&mut g, &n("attn_v"), c.kv_dim(), c.hidden)?,
            wo: mat(&mut g, &n("attn_output"), c.hidden, c.q_dim())?,
            mlp_norm: vecn(&mut g, n("ffn_norm"))?,
            w_gate: mat(&mut g, &n("ffn_gate"), c.ffn, c.hidden)?,
            w_up: mat(&mut g, &n("ffn_up"), c.ffn, c.hidden)?,
            w_down: mat(&mut g, &n("ffn_down"), c.hidden, c.ffn)?,
        });
    }
    let (shape, final_norm) = g.tensor("output_norm.weight")?;
    expect_shape(path, "output_norm.weight", &shape, c.hidden, 0)?;
    let lm_head = if g.content.tensor_infos.contains_key("output.weight") {
        Some(mat(&mut g, "output.weight", c.vocab, c.hidden)?)
    } else {
        None // tied to token_embd
    };
    let tokenizer = gguf_tokenizer(&g)?;
    Ok(Loaded { model: Model { weights: Weights { embed, layers, final_norm, lm_head }, config }, tokenizer })
}

/// Undoes llama.cpp's q/k permutation: the GGUF row to take for each Hugging Face row. Within
/// each head of `d` rows, GGUF row `2i` is Hugging Face row `i` and GGUF row `2i + 1` is row
/// `i + d/2`.
pub(crate) fn unpermuted_order(rows: usize, d: usize) -> Vec<usize> {
    (0..rows)
        .map(|r| {
            let (head, i) = (r / d, r % d);
            head * d + if i < d / 2 { 2 * i } else { 2 * (i - d / 2) + 1 }
        })
        .collect()
}

fn gguf_tokenizer(g: &Gguf<'_>) -> Result<Tokenizer, EngineError> {
    let model = g.key("tokenizer.ggml.model")?.to_string().map_err(|e| g.bad("tokenizer.ggml.model", e))?;
    if model != "gpt2" {
        return Err(g.bad(
            "tokenizer.ggml.model",
            format!("`{model}` tokenizers are not supported yet (supported: gpt2-style BPE)"),
        ));
    }
    let tokens = g.strings("tokenizer.ggml.tokens")?;
    let merges = g.strings("tokenizer.ggml.merges")?;
    let types: Vec<i32> = match g.content.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(|e| g.bad("tokenizer.ggml.token_type", e))?
            .iter()
            .map(|t| t.to_i32().map_err(|e| g.bad("tokenizer.ggml.token_type", e)))
            .collect::<Result<_, _>>()?,
        None => vec![1; tokens.len()],
    };
    let pre = g.content.metadata.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).map_or("default", |s| s);
    Tokenizer::from_gguf_bpe(tokens, merges, &types, pre)
}
