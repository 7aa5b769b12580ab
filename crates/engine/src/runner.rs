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
//! - `decodeK` (K ≥ 1): prefill N-K tokens, then K greedy decode steps (`decode1`..`decodeK`,
//!   step k, seq_len 1); then one prefill of the prompt with the sampled tokens, traced at the same
//!   positions (`prefill_decode1`..`prefill_decodeK`): what an RL trainer recomputes for a
//!   sampler's tokens.
//!
//! Prompts are paired by token ids: both phases see exactly the same ids.

use std::io::Write;

use driftscope_trace::{hash_bf16, hash_f16, hash_f32, DType, Point, RowStats, RunMeta, StageTrace};
use half::{bf16, f16};

use crate::fault::Fault;
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
    /// A bug to commit in every decode step (`--inject`); prefills stay correct.
    pub fault: Option<Fault>,
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
    /// K greedy decode steps from a prefill of N-K tokens (phases `decode1`..`decodeK`), against
    /// one prefill of the prompt with the sampled tokens (phases `prefill_decode1`..).
    DecodeK(usize),
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
            Phase::DecodeK(k) => format!("decode{k}"),
        }
    }

    /// The (baseline, candidate) phase pairs the scenario is analyzed as.
    pub fn comparisons(self) -> Vec<(String, String)> {
        match self {
            Phase::PrefillLast => vec![],
            Phase::DecodeK(k) => (1..=k).map(|s| (format!("prefill_decode{s}"), format!("decode{s}"))).collect(),
            p => vec![("prefill_last".into(), p.name())],
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
                    .or_else(|| number("decode").filter(|&k| k > 0).map(Phase::DecodeK))
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

/// The phase, step and position a traced row belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RowMeta {
    phase: String,
    step: u64,
    pos_id: u64,
    seq_len: u64,
    token_id: u64,
}

/// Writes `stage_trace` events for the rows the engine hands over.
pub struct JsonlTracer<'w> {
    out: &'w mut (dyn Write + Send),
    dump: Option<&'w mut Dump>,
    spec: &'w RunSpec,
    prompt_id: &'w str,
    /// What each traced row of the current forward call is: `rows[which]`.
    rows: Vec<RowMeta>,
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

    fn record(&mut self, point: Point, layer: u32, which: usize, row: &[f32], dtype: DType) {
        let Some(meta) = self.rows.get(which).cloned() else { return };
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
            let name = format!("{}/{}/{}/{}", self.prompt_id, meta.phase, point.as_str(), layer);
            dump.push(name.clone(), row, dtype);
            name
        });
        let ev = StageTrace {
            event: "stage_trace",
            prompt_id: self.prompt_id.into(),
            phase: meta.phase.as_str().into(),
            point: point.as_str().into(),
            layer,
            step: meta.step,
            pos_id: meta.pos_id,
            seq_len: meta.seq_len,
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
            token_id: Some(meta.token_id),
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

/// Runs one phase (or, for `decodeK`, the phases of one scenario) of one prompt; returns the
/// logits of the last traced position and the number of events written.
pub fn run_phase(
    model: &Model,
    prompt: &Prompt,
    phase: Phase,
    spec: &RunSpec,
    out: &mut (dyn Write + Send),
    dump: Option<&mut Dump>,
) -> std::io::Result<(Vec<f32>, u64)> {
    let n = prompt.tokens.len();
    assert!(n > 0, "a prompt needs at least one token");
    if matches!(phase, Phase::DecodeK(_)) && n < 2 {
        return Ok((Vec::new(), 0)); // nothing to prefill before the first decode step
    }
    let toks = &prompt.tokens;
    // The row at position `pos` of a call of `seq_len` rows, in phase `name` at `step`.
    let meta = |name: String, step: u64, pos: usize, seq_len: usize, token: u32| RowMeta {
        phase: name,
        step,
        pos_id: pos as u64,
        seq_len: seq_len as u64,
        token_id: u64::from(token),
    };
    let mut tracer = JsonlTracer {
        out,
        dump,
        spec,
        prompt_id: &prompt.id,
        rows: vec![meta(phase.name(), 0, n - 1, n, toks[n - 1])],
        events: 0,
        error: None,
        line: Vec::with_capacity(512),
    };
    let quiet = || Run::quiet(spec.profile.kernels(), spec.dtype);
    let mut cache = KvCache::new(&model.config);
    let logits = match phase {
        Phase::PrefillLast => {
            let mut run = traced(spec, vec![n - 1], &mut tracer, false);
            model.forward(toks, &mut cache, &mut run)
        }
        Phase::Decode0 => {
            if n > 1 {
                model.forward(&toks[..n - 1], &mut cache, &mut quiet());
            }
            tracer.rows = vec![meta(phase.name(), 1, n - 1, 1, toks[n - 1])];
            let mut run = traced(spec, vec![0], &mut tracer, true);
            model.forward(&toks[n - 1..], &mut cache, &mut run)
        }
        Phase::DecodeK(k) => {
            // K greedy decode steps after a prefill of the first N-K tokens (the sampler), then
            // one prefill of the prompt with the sampled tokens (the trainer), traced at the same
            // positions: `prefill_decodek` against `decodek`.
            let k = k.min(n - 1);
            let start = n - k;
            let mut logits = model.forward(&toks[..start], &mut cache, &mut quiet());
            let mut seq = toks[..start].to_vec();
            for step in 1..=k {
                let next = argmax(&logits);
                let pos = seq.len();
                seq.push(next);
                tracer.rows = vec![meta(format!("decode{step}"), step as u64, pos, 1, next)];
                let mut run = traced(spec, vec![0], &mut tracer, true);
                logits = model.forward(&[next], &mut cache, &mut run);
            }
            tracer.rows = (1..=k)
                .map(|step| {
                    let pos = start + step - 1;
                    meta(format!("prefill_decode{step}"), 0, pos, seq.len(), seq[pos])
                })
                .collect();
            let mut fresh = KvCache::new(&model.config);
            let mut run = traced(spec, (start..seq.len()).collect(), &mut tracer, false);
            model.forward(&seq, &mut fresh, &mut run);
            logits
        }
        Phase::Chunked(c) => {
            let last_start = (n - 1) / c * c;
            for start in (0..last_start).step_by(c) {
                model.forward(&toks[start..start + c], &mut cache, &mut quiet());
            }
            tracer.rows = vec![meta(phase.name(), 0, n - 1, n - last_start, toks[n - 1])];
            let mut run = traced(spec, vec![n - 1 - last_start], &mut tracer, false);
            model.forward(&toks[last_start..], &mut cache, &mut run)
        }
        Phase::Batch(b) => {
            // The prompt sits in the middle of the batch, after b/2 companions.
            let companions = Phase::batch_companions(toks, b);
            let me = b / 2;
            let mut inputs: Vec<&[u32]> = companions.iter().map(Vec::as_slice).collect();
            inputs.insert(me, toks);
            let mut caches: Vec<KvCache> = inputs.iter().map(|_| KvCache::new(&model.config)).collect();
            let mut seqs: Vec<Seq<'_>> =
                inputs.iter().zip(caches.iter_mut()).map(|(tokens, cache)| Seq { tokens, cache }).collect();
            let before: usize = inputs[..me].iter().map(|t| t.len()).sum();
            let total: usize = inputs.iter().map(|t| t.len()).sum();
            tracer.rows = vec![meta(phase.name(), 0, n - 1, total, toks[n - 1])];
            let mut run = traced(spec, vec![before + n - 1], &mut tracer, false);
            model.forward_batch(&mut seqs, &mut run).swap_remove(me)
        }
        Phase::PrefixCache => {
            let (shared, donor) = Phase::prefix_donor(toks);
            if shared > 0 {
                model.forward(&donor, &mut cache, &mut quiet());
                cache.truncate(shared, model.config.kv_dim());
            }
            tracer.rows = vec![meta(phase.name(), 0, n - 1, n - shared, toks[n - 1])];
            let mut run = traced(spec, vec![n - 1 - shared], &mut tracer, false);
            model.forward(&toks[shared..], &mut cache, &mut run)
        }
    };
    match tracer.error {
        Some(e) => Err(e),
        None => Ok((logits, tracer.events)),
    }
}

/// A forward call of `spec` that traces `rows` into `tracer`; a decode step carries the injected
/// fault, a prefill never does.
fn traced<'a>(spec: &RunSpec, rows: Vec<usize>, tracer: &'a mut dyn Tracer, decode: bool) -> Run<'a> {
    let fault = if decode { spec.fault } else { None };
    Run { kernels: spec.profile.kernels(), dtype: spec.dtype, trace_rows: rows, tracer: Some(tracer), fault }
}

/// The greedy choice: the first index of the largest logit.
pub fn argmax(logits: &[f32]) -> u32 {
    (0..logits.len()).fold(0, |best, i| if logits[i] > logits[best] { i } else { best }) as u32
}

/// Writes the `run_meta` line.
pub fn write_meta(out: &mut dyn Write, meta: &RunMeta) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, meta).map_err(std::io::Error::other)?;
    out.write_all(b"\n")
}
