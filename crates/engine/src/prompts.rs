//! Prompts: the three defaults, and prompt files (JSON Lines of `{"id", "text"}` or
//! `{"id", "token_ids"}`). Prompts are token ids from here on; both phases see the same ids.

use std::path::Path;

use serde::Deserialize;

use crate::error::EngineError;
use crate::runner::Prompt;
use crate::tokenizer::Tokenizer;

/// The short default prompt.
pub const SHORT: &str = "The capital of France is";

/// The text the medium and long default prompts are cut from.
pub const LONG: &str = "When a language model answers a question, the same computation can reach the same token \
in two ways. During prefill the engine reads the whole prompt at once: every matrix multiplication sees many \
rows, the attention kernel walks the keys in tiles, and the normalization layers reduce long blocks of numbers. \
During decode the engine adds one token at a time: the matrix multiplications become matrix-vector products, the \
attention kernel splits the cached keys into a handful of ranges that it reduces separately and merges at the \
end, and the same sums are added up in a different order. Floating-point addition is not associative, so a \
different order gives a slightly different number, and a slightly different number in the first layer becomes \
a different number in every layer after it. Most of the time the difference is too small to change the next \
word. Sometimes it is not. A reinforcement learning trainer that recomputes the probability of a sampled token \
with a prefill pass sees a value that the sampler never produced. A cache that reuses the prefix of one request \
for another request returns states that a fresh computation would not have produced. A speculative decoder \
that verifies a draft with a batched pass rejects tokens that a sequential pass would have accepted. Engineers \
who want to find out where the two paths part ways usually print tensors from both runs, line them up by hand, \
and compare them one layer at a time. That works for one prompt and one layer; it does not work for thirty \
layers, three prompts and a dozen named intermediate values per layer. It also leaves the hardest question \
open: did this layer start the difference, or did it only carry forward a difference that an earlier layer \
introduced? The answer depends on the graph of the computation. The output of the attention block depends on \
the normalized input, the query, key and value projections, the rotary position embedding, the attention \
kernel itself and the output projection; the input of the next layer depends on both residual branches. If \
every traced input of an operation agrees and its output does not, the operation itself computes differently \
in the two paths. If an input already differs, the output inherits the difference, and nothing can be said \
about the operation from these two numbers alone. If some values between the last agreement and the first \
difference were never recorded, the honest answer is a range, not a name. Kernels can be written so that none \
of this happens: if every output element is reduced in the same order whatever the number of rows, whatever \
the length of the query and whatever the size of the batch, then prefill and decode give the same bits. Such \
batch-invariant kernels fix their tile sizes, split the keys into ranges of a fixed size instead of a fixed \
number of ranges, and never let the shape of the input choose the order of a reduction. They cost a little \
speed. They buy reproducible outputs, honest log-probabilities for training, safe prefix caching and exact \
speculative decoding. The tool that checks all of this has to run on a laptop, read traces from any engine, \
and say in plain words where the first difference is, how large it is, and what to look at next. It should \
never claim more than the evidence shows, and it should make the cure as easy to verify as the disease. A \
report that says the attention block of layer zero drifts by a few rounding steps while its input matches is a \
report an engineer can act on the same afternoon.";

/// Token counts of the medium and long default prompts (cut from [`LONG`]).
pub const MEDIUM_TOKENS: usize = 150;
/// See [`MEDIUM_TOKENS`].
pub const LONG_TOKENS: usize = 600;

/// The default prompts: `p0_short`, `p1_medium` (~150 tokens), `p2_long` (~600 tokens).
pub fn default_prompts(tokenizer: &Tokenizer) -> Result<Vec<Prompt>, EngineError> {
    let long = tokenizer.encode(LONG)?;
    let cut = |n: usize| long[..n.min(long.len())].to_vec();
    Ok(vec![
        Prompt { id: "p0_short".into(), tokens: tokenizer.encode(SHORT)? },
        Prompt { id: "p1_medium".into(), tokens: cut(MEDIUM_TOKENS) },
        Prompt { id: "p2_long".into(), tokens: cut(LONG_TOKENS) },
    ])
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PromptLine {
    id: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    token_ids: Option<Vec<u32>>,
}

/// Reads a prompt file; every problem names `file:line`.
pub fn read_prompts(path: &Path, tokenizer: &Tokenizer, vocab: usize) -> Result<Vec<Prompt>, EngineError> {
    let bytes = std::fs::read(path).map_err(|source| EngineError::Io { path: path.to_path_buf(), source })?;
    let bad = |line: usize, message: String| EngineError::Config {
        path: path.to_path_buf(),
        key: format!("line {line}"),
        message,
    };
    let mut prompts: Vec<Prompt> = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let raw = std::str::from_utf8(raw).map_err(|e| {
            bad(line, format!("not UTF-8: the byte at column {} starts no UTF-8 character", e.valid_up_to() + 1))
        })?;
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        if raw.trim().is_empty() {
            continue;
        }
        let p: PromptLine = serde_json::from_str(raw).map_err(|e| bad(line, e.to_string()))?;
        if p.id.trim().is_empty() {
            return Err(bad(line, "the prompt `id` is empty: every prompt needs a name for the report".into()));
        }
        let tokens = match (p.text, p.token_ids) {
            (Some(t), None) if t.trim().is_empty() => {
                return Err(bad(line, format!("prompt `{}`: `text` is empty or only whitespace", p.id)))
            }
            (Some(t), None) => tokenizer.encode(&t)?,
            (None, Some(ids)) => ids,
            _ => return Err(bad(line, "give exactly one of `text` and `token_ids`".into())),
        };
        if tokens.is_empty() {
            return Err(bad(line, format!("prompt `{}` has no tokens", p.id)));
        }
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(bad(line, format!("prompt `{}`: token id {t} is outside the vocabulary (size {vocab})", p.id)));
        }
        if prompts.iter().any(|q| q.id == p.id) {
            return Err(bad(line, format!("prompt id `{}` appears twice", p.id)));
        }
        prompts.push(Prompt { id: p.id, tokens });
    }
    if prompts.is_empty() {
        return Err(bad(0, "no prompts in the file".into()));
    }
    Ok(prompts)
}
