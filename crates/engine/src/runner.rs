//! Runs prompts through the two phases that driftscope compares, and writes the trace.
//!
//! - `prefill_last`: prefill the N tokens, trace position N-1 (step 0, seq_len N).
//! - `decode0`: prefill the first N-1 tokens, then decode token N-1 over that cache and trace
//!   it (step 1, seq_len 1).
//! - `chunkC`: prefill in chunks of C tokens; the last chunk holds position N-1 (step 0,
//!   seq_len = that chunk's length).
//! - `prefix_cache`: prefill another prompt that shares the first N/2 tokens, keep its KV cache
//!   for those positions, prefill the rest of this prompt over it (seq_len N - N/2).
//! - `batchB`: prefill the prompt inside a batch of B prompts of other lengths, in one forward
//!   call over all their rows (seq_len = the rows of the whole batch).
//!
//! Prompts are paired by token ids: both phases see exactly the same ids.

use std::io::Write;

use driftscope_trace::{hash_bf16, hash_f16, hash_f32, DType, Point, RowStats, RunMeta, StageTrace};
use half::{bf16, f16};

use crate::kernels::Profile;
use crate::model::{KvCache, Model, Run, Seq, Tracer};

/// One prompt, as token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    /// Its id in the trace.
    pub id: String,
    /// Its token ids.
    pub tokens: Vec<u32>,
}

/// What to trace and how to compute.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// Kernel profile.
    pub profile: Profile,
    /// Storage dtype.
    pub dtype: DType,
    /// Layers to trace (`None`: all).
    pub layers: Option<Vec<u32>>,
    /// Points to trace (`None`: all).
    pub points: Option<Vec<Point>>,
}

/// A phase of a prompt: how it is computed and which position it traces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Prefill all N tokens, trace the last.
    PrefillLast,
    /// Prefill N-1 tokens, decode the last one.
    Decode0,
    /// Prefill in chunks of this many tokens, trace the last position (in the last chunk).
    Chunked(usize),
    /// Reuse the KV cache of the first half of the prompt, computed while prefilling another
    /// prompt that shares that prefix, then prefill the rest and trace the last position.
    PrefixCache,
    /// Prefill the prompt inside a batch of this many prompts of other lengths (one forward call
    /// over all their rows), trace its last position.
    Batch(usize),
}

impl Phase {
    /// Name in traces: `prefill_last`, `decode0`, `chunk64`, `prefix_cache`.
    pub fn name(self) -> String {
        match self {
            Phase::PrefillLast => "prefill_last".into(),
            Phase::Decode0 => "decode0".into(),
            Phase::Chunked(c) => format!("chunk{c}"),
            Phase::PrefixCache => "prefix_cache".into(),
            Phase::Batch(b) => format!("batch{b}"),
        }
    }

    /// Parses a phase name (`chunkC` with C ≥ 1).
    pub fn parse(name: &str) -> Option<Phase> {
        match name {
            "prefill_last" => Some(Phase::PrefillLast),
            "decode0" => Some(Phase::Decode0),
            "prefix_cache" => Some(Phase::PrefixCache),
            _ => {
                let number = |prefix: &str| name.strip_prefix(prefix)?.parse::<usize>().ok();
                number("chunk")
                    .filter(|&c| c > 0)
                    .map(Phase::Chunked)
                    .or_else(|| number("batch").filter(|&b| b > 1).map(Phase::Batch))
            }
        }
    }

    /// The other prompts of a batch of `b`: the prompt's tokens reversed and cycled, each of
    /// another length (about j/(b+1) of the prompt's, plus j), so the batch is ragged.
    pub fn batch_companions(tokens: &[u32], b: usize) -> Vec<Vec<u32>> {
        let n = tokens.len();
        (1..b)
            .map(|j| {
                let len = (n * j / (b + 1)).max(1) + j;
                tokens.iter().rev().cycle().take(len).copied().collect()
            })
            .collect()
    }

    /// The prompt sharing this prompt's prefix whose cache [`Phase::PrefixCache`] reuses: the
    /// first half of the tokens, then the rest reversed (a different continuation).
    pub fn prefix_donor(tokens: &[u32]) -> (usize, Vec<u32>) {
        let shared = tokens.len() / 2;
        let mut donor = tokens[..shared].to_vec();
        donor.extend(tokens[shared..].iter().rev());
        (shared, donor)
    }
}

/// The traced rows themselves, for exact magnitudes: written next to the trace as a safetensors
/// file, one tensor per event, named by the event's `tensor` field.
#[derive(Debug, Default)]
pub struct Dump {
    tensors: Vec<(String, DType, Vec<u8>)>,
}

impl Dump {
    /// Adds a row (values exact in `dtype`) under `name`.
    pub fn push(&mut self, name: String, row: &[f32], dtype: DType) {
        let bytes: Vec<u8> = match dtype {
            DType::F32 => row.iter().flat_map(|x| x.to_le_bytes()).collect(),
            DType::BF16 => row.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect(),
            DType::F16 => row.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect(),
        };
        self.tensors.push((name, dtype, bytes));
    }

    /// Number of rows held.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether no row is held.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The safetensors file's bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, safetensors::SafeTensorError> {
        use safetensors::tensor::TensorView;
        let views = self
            .tensors
            .iter()
            .map(|(name, dtype, bytes)| {
                let (dt, size) = match dtype {
                    DType::F32 => (safetensors::Dtype::F32, 4),
                    DType::BF16 => (safetensors::Dtype::BF16, 2),
                    DType::F16 => (safetensors::Dtype::F16, 2),
                };
                TensorView::new(dt, vec![bytes.len() / size], bytes).map(|v| (name.clone(), v))
            })
            .collect::<Result<Vec<_>, _>>()?;
        safetensors::serialize(views, None)
    }
}

/// Writes `stage_trace` events for the rows the engine hands over.
pub struct JsonlTracer<'w> {
    out: &'w mut dyn Write,
    dump: Option<&'w mut Dump>,
    spec: &'w RunSpec,
    prompt_id: &'w str,
    phase: String,
    step: u64,
    pos_id: u64,
    seq_len: u64,
    token_id: u64,
    /// Events written.
    pub events: u64,
    /// The first write error, if any (the engine cannot take errors from a tracer).
    pub error: Option<std::io::Error>,
    line: Vec<u8>,
}

impl Tracer for JsonlTracer<'_> {
    fn wants(&self, point: Point, layer: u32) -> bool {
        let layer_ok = !point.is_per_layer() || self.spec.layers.as_ref().is_none_or(|ls| ls.contains(&layer));
        layer_ok && self.spec.points.as_ref().is_none_or(|ps| ps.contains(&point)) && self.error.is_none()
    }

    fn record(&mut self, point: Point, layer: u32, row: &[f32], dtype: DType) {
        let (hash, stats) = match dtype {
            DType::F32 => (hash_f32(row), RowStats::of_f32(row)),
            DType::BF16 => {
                let v: Vec<bf16> = row.iter().map(|&x| bf16::from_f32(x)).collect();
                (hash_bf16(&v), RowStats::of_bf16(&v))
            }
            DType::F16 => {
                let v: Vec<f16> = row.iter().map(|&x| f16::from_f32(x)).collect();
                (hash_f16(&v), RowStats::of_f16(&v))
            }
        };
        let tensor = self.dump.as_deref_mut().map(|dump| {
            let name = format!("{}/{}/{}/{}", self.prompt_id, self.phase, point.as_str(), layer);
            dump.push(name.clone(), row, dtype);
            name
        });
        let ev = StageTrace {
            event: "stage_trace",
            prompt_id: self.prompt_id.into(),
            phase: self.phase.as_str().into(),
            point: point.as_str().into(),
            layer,
            step: self.step,
            pos_id: self.pos_id,
            seq_len: self.seq_len,
            hash,
            min: stats.min,
            max: stats.max,
            mean: stats.mean,
            dtype: Some(dtype.as_str().into()),
            shape: Some(vec![row.len() as u64]),
            numel: Some(stats.numel),
            l2: Some(stats.l2),
            nan_count: Some(stats.nan_count),
            inf_count: Some(stats.inf_count),
            token_id: Some(self.token_id),
            rank: None,
            tensor: tensor.map(Into::into),
        };
        self.line.clear();
        let res = serde_json::to_writer(&mut self.line, &ev).map_err(std::io::Error::other).and_then(|()| {
            self.line.push(b'\n');
            self.out.write_all(&self.line)
        });
        match res {
            Ok(()) => self.events += 1,
            Err(e) => self.error = Some(e),
        }
    }
}

/// Runs one phase of one prompt; returns the logits at the traced position.
pub fn run_phase(
    model: &Model,
    prompt: &Prompt,
    phase: Phase,
    spec: &RunSpec,
    out: &mut dyn Write,
    dump: Option<&mut Dump>,
) -> std::io::Result<(Vec<f32>, u64)> {
    let n = prompt.tokens.len();
    assert!(n > 0, "a prompt needs at least one token");
    let mut tracer = JsonlTracer {
        out,
        dump,
        spec,
        prompt_id: &prompt.id,
        phase: phase.name(),
        step: 0,
        pos_id: (n - 1) as u64,
        seq_len: n as u64,
        token_id: u64::from(prompt.tokens[n - 1]),
        events: 0,
        error: None,
        line: Vec::with_capacity(512),
    };
    let kernels = spec.profile.kernels();
    let mut cache = KvCache::new(&model.config);
    let logits = match phase {
        Phase::PrefillLast => {
            let mut run = Run { kernels, dtype: spec.dtype, trace_row: Some(n - 1), tracer: Some(&mut tracer) };
            model.forward(&prompt.tokens, &mut cache, &mut run)
        }
        Phase::Decode0 => {
            if n > 1 {
                let mut run = Run { kernels, dtype: spec.dtype, trace_row: None, tracer: None };
                model.forward(&prompt.tokens[..n - 1], &mut cache, &mut run);
            }
            tracer.step = 1;
            tracer.seq_len = 1;
            let mut run = Run { kernels, dtype: spec.dtype, trace_row: Some(0), tracer: Some(&mut tracer) };
            model.forward(&prompt.tokens[n - 1..], &mut cache, &mut run)
        }
        Phase::Chunked(c) => {
            let last_start = (n - 1) / c * c;
            for start in (0..last_start).step_by(c) {
                let mut run = Run { kernels, dtype: spec.dtype, trace_row: None, tracer: None };
                model.forward(&prompt.tokens[start..start + c], &mut cache, &mut run);
            }
            tracer.seq_len = (n - last_start) as u64;
            let mut run =
                Run { kernels, dtype: spec.dtype, trace_row: Some(n - 1 - last_start), tracer: Some(&mut tracer) };
            model.forward(&prompt.tokens[last_start..], &mut cache, &mut run)
        }
        Phase::Batch(b) => {
            // The prompt sits in the middle of the batch, after b/2 companions.
            let companions = Phase::batch_companions(&prompt.tokens, b);
            let me = b / 2;
            let mut inputs: Vec<&[u32]> = companions.iter().map(Vec::as_slice).collect();
            inputs.insert(me, &prompt.tokens);
            let mut caches: Vec<KvCache> = inputs.iter().map(|_| KvCache::new(&model.config)).collect();
            let mut seqs: Vec<Seq<'_>> =
                inputs.iter().zip(caches.iter_mut()).map(|(tokens, cache)| Seq { tokens, cache }).collect();
            let before: usize = inputs[..me].iter().map(|t| t.len()).sum();
            tracer.seq_len = inputs.iter().map(|t| t.len() as u64).sum();
            let mut run =
                Run { kernels, dtype: spec.dtype, trace_row: Some(before + n - 1), tracer: Some(&mut tracer) };
            model.forward_batch(&mut seqs, &mut run).swap_remove(me)
        }
        Phase::PrefixCache => {
            let (shared, donor) = Phase::prefix_donor(&prompt.tokens);
            if shared > 0 {
                let mut run = Run { kernels, dtype: spec.dtype, trace_row: None, tracer: None };
                model.forward(&donor, &mut cache, &mut run);
                cache.truncate(shared, model.config.kv_dim());
            }
            tracer.seq_len = (n - shared) as u64;
            let mut run =
                Run { kernels, dtype: spec.dtype, trace_row: Some(n - 1 - shared), tracer: Some(&mut tracer) };
            model.forward(&prompt.tokens[shared..], &mut cache, &mut run)
        }
    };
    match tracer.error {
        Some(e) => Err(e),
        None => Ok((logits, tracer.events)),
    }
}

/// Writes the `run_meta` line.
pub fn write_meta(out: &mut dyn Write, meta: &RunMeta) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, meta).map_err(std::io::Error::other)?;
    out.write_all(b"\n")
}
