"""The phases driftscope compares, computed with a transformers model (mirrors crates/engine/src/runner.rs).

Each phase computes the last token of a prompt of N tokens (position N-1) in its own way and
traces that row:

- ``prefill_last``: one forward call over the N tokens (step 0, seq_len N).
- ``decode0``: prefill the first N-1 tokens, then one decode step over that KV cache feeding token
  N-1 (step 1, seq_len 1).
- ``chunkC``: prefill in chunks of C tokens; the last chunk holds position N-1 (step 0, seq_len =
  that chunk's length).
- ``prefix_cache``: prefill a donor prompt sharing the first N/2 tokens, keep its KV cache for
  those positions, prefill the rest over it (step 0, seq_len N - N/2).
- ``batchB``: prefill the prompt inside a batch of B prompts of other lengths in one forward call,
  right-padded with an attention mask (step 0, seq_len = the real tokens of the whole batch).
- ``decodeK``: K greedy decode steps after a prefill of N-K tokens (``decode1`` .. ``decodeK``, step
  k, seq_len 1) and one prefill of the prompt with the sampled tokens traced at the same positions
  (``prefill_decode1`` .., step 0).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .errors import InputError
from .hooks import TracedRow, Tracer
from .meta import model_device, run_meta
from .pointmap import PointMap
from .prompts import Prompt, as_prompts, read_prompts
from .writer import TraceWriter, check_outputs, dump_path


@dataclass(frozen=True)
class Phase:
    """A way to compute the last token of a prompt. ``size``: C of chunkC, B of batchB, K of decodeK."""

    kind: str
    size: int = 0

    @property
    def name(self) -> str:
        """The phase name in traces: ``prefill_last``, ``decode0``, ``chunk64``, ``batch4``, ``decode8``, ..."""
        if self.kind in ("chunk", "batch", "decode"):
            return f"{self.kind}{self.size}"
        return self.kind

    @classmethod
    def parse(cls, name: str) -> Optional["Phase"]:
        """The phase of a name, as driftscope run parses ``--scenario`` (None if unknown)."""
        name = name.strip()
        if name in ("prefill_last", "decode0", "prefix_cache"):
            return cls(name)
        for kind, least in (("chunk", 1), ("batch", 2), ("decode", 1)):
            rest = name[len(kind) :]
            if name.startswith(kind) and rest.isdigit() and rest.isascii() and int(rest) >= least:
                return cls(kind, int(rest))
        return None

    def comparisons(self) -> List[Tuple[str, str]]:
        """The (baseline, candidate) phase pairs to analyze for this scenario."""
        if self.kind == "prefill_last":
            return []
        if self.kind == "decode":
            return [(f"prefill_decode{s}", f"decode{s}") for s in range(1, self.size + 1)]
        return [("prefill_last", self.name)]


KNOWN = "prefill_last, decode0, decodeK such as decode8, chunkC such as chunk64, prefix_cache, batchB such as batch4"

#: Decode-path bugs that ``--inject`` commits on purpose in every decode step (never in a prefill),
#: as ``driftscope run --inject`` does in driftscope's engine (crates/engine/src/fault.rs).
INJECTIONS = {
    "kv_drop": "the decode step runs without its KV cache (attends to its own key only)",
    "rope_pos": "the decode step rotates q and k at position pos_id + 1",
    "cache_off_by_one": "the decode step's attention misses the last cached token (position pos_id - 1)",
    "mask_off_by_one": "the decode step's causal mask hides its own key",
}


def check_inject(inject: Optional[str]) -> None:
    """Raises InputError for a bug name that is not one of INJECTIONS."""
    if inject is not None and inject not in INJECTIONS:
        raise InputError(f"--inject: unknown bug `{inject}` (known: {', '.join(INJECTIONS)})")


def parse_phases(names: Iterable[str], where: str = "phases") -> List[Phase]:
    """Phases from names, without repeats, in the order given."""
    out: List[Phase] = []
    for name in names:
        if not name.strip():
            continue
        phase = Phase.parse(name)
        if phase is None:
            raise InputError(f"{where}: unknown phase `{name.strip()}` (known: {KNOWN})")
        if phase not in out:
            out.append(phase)
    if not out:
        raise InputError(f"{where}: no phase given")
    return out


def batch_companions(tokens: Sequence[int], b: int) -> List[List[int]]:
    """The other prompts of a batch of ``b``: the prompt's tokens reversed and cycled, each of another
    length (about j/(b+1) of the prompt's, plus j), so the batch is ragged (as runner.rs)."""
    n = len(tokens)
    rev = list(reversed(tokens))
    out = []
    for j in range(1, b):
        length = max(n * j // (b + 1), 1) + j
        out.append([rev[i % n] for i in range(length)])
    return out


def prefix_donor(tokens: Sequence[int]) -> Tuple[int, List[int]]:
    """The prompt whose KV cache prefix_cache reuses: the first half, then the rest reversed."""
    shared = len(tokens) // 2
    return shared, list(tokens[:shared]) + list(reversed(tokens[shared:]))


class ModelCall:
    """Calls a transformers causal LM with explicit positions and a KV cache, across versions."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.device = model_device(model)
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"

    def __call__(
        self, ids: Sequence[Sequence[int]], start: int = 0, cache: Any = None, mask: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, Any]:
        """Forward over ``ids`` (a batch of equal-length rows) at positions ``start``..; returns (logits, cache)."""
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        seq = input_ids.shape[1]
        positions = torch.arange(start, start + seq, device=self.device).unsqueeze(0).expand(input_ids.shape[0], -1)
        kwargs: Dict[str, Any] = {"input_ids": input_ids, "position_ids": positions, "use_cache": True}
        if cache is not None:
            kwargs[self.cache_kw] = cache
        if mask is not None:
            kwargs["attention_mask"] = mask
        out = self.model(**kwargs)
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = getattr(out, "past_key_values", None)
        return out.logits, new_cache


def _decode_step(fwd: "ModelCall", token: int, pos: int, cache: Any, inject: Optional[str]) -> Tuple[torch.Tensor, Any]:
    """One decode step of ``token`` at position ``pos`` over ``cache`` (which holds positions 0..pos-1),
    committing the injected bug, if any."""
    if inject == "kv_drop":
        return fwd([[token]], pos, None)  # a fresh cache: the step sees its own key only
    if inject == "rope_pos":
        return fwd([[token]], pos + 1, cache)  # rotated one position late; the cache still grows by one
    if inject == "cache_off_by_one" and cache is not None and pos > 0:
        cache.crop(-1)  # the last cached position is lost before the step reads the cache
        return fwd([[token]], pos, cache)
    if inject == "mask_off_by_one" and cache is not None and pos > 0:
        mask = torch.ones((1, pos + 1), dtype=torch.long, device=fwd.device)
        mask[0, pos] = 0  # the step's own key is hidden
        return fwd([[token]], pos, cache, mask)
    return fwd([[token]], pos, cache)


def _row(
    prompt: Prompt, phase: str, step: int, pos: int, seq_len: int, token: int, index: int, batch: int = 0
) -> TracedRow:
    return TracedRow(prompt.id, phase, step, pos, seq_len, int(token), index, batch)


def run_phase(
    model: nn.Module, tracer: Tracer, prompt: Prompt, phase: Phase, inject: Optional[str] = None
) -> torch.Tensor:
    """Computes one phase of one prompt, tracing its row(s); returns the logits of the last traced row
    (empty for decodeK on a one-token prompt, which has nothing to prefill before its first step).
    ``inject``: a bug of INJECTIONS, committed in decode steps only."""
    check_inject(inject)
    toks = list(prompt.token_ids)
    n = len(toks)
    if n == 0:
        raise InputError(f"prompt `{prompt.id}` has no tokens")
    fwd = ModelCall(model)
    kind = phase.kind
    with torch.no_grad():
        if kind == "prefill_last":
            with tracer.tracing([_row(prompt, phase.name, 0, n - 1, n, toks[-1], n - 1)]):
                logits, _ = fwd([toks])
            return logits[0, -1]
        if kind == "decode0":
            cache = fwd([toks[:-1]])[1] if n > 1 else None
            with tracer.tracing([_row(prompt, phase.name, 1, n - 1, 1, toks[-1], 0)]):
                logits, _ = _decode_step(fwd, toks[-1], n - 1, cache, inject)
            return logits[0, -1]
        if kind == "chunk":
            c = phase.size
            last_start = (n - 1) // c * c
            cache = None
            for s in range(0, last_start, c):
                cache = fwd([toks[s : s + c]], s, cache)[1]
            with tracer.tracing([_row(prompt, phase.name, 0, n - 1, n - last_start, toks[-1], n - 1 - last_start)]):
                logits, _ = fwd([toks[last_start:]], last_start, cache)
            return logits[0, -1]
        if kind == "prefix_cache":
            shared, donor = prefix_donor(toks)
            cache = None
            if shared > 0:
                cache = fwd([donor])[1]
                cache.crop(-(len(donor) - shared))  # negative: remove that many tokens (every version)
                if cache.get_seq_length() != shared:
                    raise RuntimeError(f"KV cache crop kept {cache.get_seq_length()} positions, not {shared}")
            with tracer.tracing([_row(prompt, phase.name, 0, n - 1, n - shared, toks[-1], n - 1 - shared)]):
                logits, _ = fwd([toks[shared:]], shared, cache)
            return logits[0, -1]
        if kind == "batch":
            return _run_batch(model, fwd, tracer, prompt, phase)
        if kind == "decode":
            return _run_decode_k(fwd, tracer, prompt, phase, inject)
    raise InputError(f"unknown phase `{phase.name}` (known: {KNOWN})")


def _run_batch(model: nn.Module, fwd: ModelCall, tracer: Tracer, prompt: Prompt, phase: Phase) -> torch.Tensor:
    toks = list(prompt.token_ids)
    n, b = len(toks), phase.size
    inputs = batch_companions(toks, b)
    me = b // 2  # the prompt sits in the middle of the batch, after b/2 companions (as runner.rs)
    inputs.insert(me, toks)
    width = max(len(t) for t in inputs)
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    pad = int(pad) if isinstance(pad, int) and pad >= 0 else 0
    padded = [t + [pad] * (width - len(t)) for t in inputs]
    mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in inputs], dtype=torch.long, device=fwd.device)
    total = sum(len(t) for t in inputs)  # seq_len: the real rows of the batch (padding not counted)
    with torch.no_grad(), tracer.tracing([_row(prompt, phase.name, 0, n - 1, total, toks[-1], n - 1, me)]):
        logits, _ = fwd(padded, 0, None, mask)
    return logits[me, n - 1]


def _run_decode_k(
    fwd: ModelCall, tracer: Tracer, prompt: Prompt, phase: Phase, inject: Optional[str] = None
) -> torch.Tensor:
    toks = list(prompt.token_ids)
    n = len(toks)
    if n < 2:
        return torch.empty(0)
    k = min(phase.size, n - 1)
    start = n - k
    with torch.no_grad():
        logits, cache = fwd([toks[:start]])
        last = logits[0, -1]
        seq = toks[:start]
        for step in range(1, k + 1):
            nxt = int(torch.argmax(last).item())  # the first index of the largest logit
            pos = len(seq)
            seq.append(nxt)
            with tracer.tracing([_row(prompt, f"decode{step}", step, pos, 1, nxt, 0)]):
                logits, cache = _decode_step(fwd, nxt, pos, cache, inject)
            last = logits[0, -1]
        rows = [
            _row(prompt, f"prefill_decode{s}", 0, start + s - 1, len(seq), seq[start + s - 1], start + s - 1)
            for s in range(1, k + 1)
        ]
        with tracer.tracing(rows):
            fwd([seq])
    return last


@dataclass(frozen=True)
class TraceSummary:
    """What trace_prompts wrote."""

    trace: Path
    dump: Optional[Path]
    events: int
    dumped_rows: int
    prompts: int
    phases: Tuple[str, ...]
    seconds: float


def trace_prompts(
    model: nn.Module,
    tokenizer: Any,
    prompts: Union[Iterable[Union[Prompt, Mapping[str, Any]]], str, Path],
    out: Union[str, Path],
    *,
    phases: Sequence[Union[str, Phase]] = ("prefill_last", "decode0"),
    layers: Optional[Sequence[int]] = None,
    points: Optional[Sequence[str]] = None,
    point_map: Optional[PointMap] = None,
    dump: bool = False,
    model_desc: Optional[str] = None,
    command: Optional[str] = None,
    meta_extra: Optional[Dict[str, Any]] = None,
    inject: Optional[str] = None,
) -> TraceSummary:
    """Runs every phase of every prompt through ``model`` and writes the trace ``out`` atomically
    (and with ``dump=True`` the rows to ``out`` with extension ``.safetensors``).

    ``prompts``: Prompt objects, mappings like prompt-file lines (``{"id", "text"}`` or
    ``{"id", "token_ids"}``), or the path of a prompt file. ``tokenizer`` is needed for text only.
    The model is put in eval mode for the run and restored afterwards. ``inject``: a decode-path bug
    of INJECTIONS to commit in every decode step (recorded in run_meta as ``inject``).
    """
    started = time.perf_counter()
    check_inject(inject)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(prompts, (str, Path)):
        check_outputs([prompts], [out, dump_path(out)] if dump else [out])
        plist = read_prompts(prompts, tokenizer, vocab)
    else:
        check_outputs([], [out, dump_path(out)] if dump else [out])
        plist = as_prompts(prompts, tokenizer, vocab)
    parsed = parse_phases([p.name if isinstance(p, Phase) else p for p in phases])
    was_training = model.training
    model.eval()
    try:
        with TraceWriter(out, dump=dump) as writer:
            tracer = Tracer(model, writer, point_map=point_map, layers=layers, points=points)
            extra = {"phases": [p.name for p in parsed], **(meta_extra or {})}
            if inject is not None:
                extra["inject"] = inject
            writer.write_meta(
                run_meta(model, model_desc=model_desc, command=command, n_layers=tracer.n_layers, extra=extra)
            )
            with tracer:
                for prompt in plist:
                    for phase in parsed:
                        run_phase(model, tracer, prompt, phase, inject)
            events, rows = writer.events, writer.dumped_rows
    finally:
        model.train(was_training)
    names = tuple(p.name for p in parsed)
    return TraceSummary(Path(out), writer.dump_path, events, rows, len(plist), names, time.perf_counter() - started)
