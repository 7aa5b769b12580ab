"""Phases: the rows they trace (step, seq_len, pos_id, token_id as runner.rs) and the token they compute."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
from conftest import POINTS_PER_PROMPT, stage_events
from torch import nn

from driftscope_torch import InputError, Phase, Prompt, TracedRow, Tracer, run_phase, trace_prompts
from driftscope_torch.phases import batch_companions, parse_phases, prefix_donor

TOKENS = [5, 9, 33, 7, 120, 64, 2, 250, 11, 42]  # N = 10


def test_batch_companions_follow_runner_rs() -> None:
    t = list(range(100, 110))  # reversed: 109, 108, ...
    # length of companion j = max(n*j/(b+1), 1) + j: 3, 6, 9 for n = 10, b = 4
    assert batch_companions(t, 4) == [[109, 108, 107], [109, 108, 107, 106, 105, 104], list(range(109, 100, -1))]
    # a short prompt is cycled: n = 2 gives lengths 2, 3, 4
    assert batch_companions([1, 2], 4) == [[2, 1], [2, 1, 2], [2, 1, 2, 1]]
    assert batch_companions([7], 2) == [[7, 7]]


def test_prefix_donor_follows_runner_rs() -> None:
    assert prefix_donor([1, 2, 3, 4, 5]) == (2, [1, 2, 5, 4, 3])
    assert prefix_donor([9]) == (0, [9])


def test_phase_names() -> None:
    names = ["prefill_last", "decode0", "chunk64", "prefix_cache", "batch4", "decode8"]
    assert [Phase.parse(n).name for n in names] == names  # type: ignore[union-attr]
    for bad in ["chunk0", "batch1", "decode", "decodex", "batch-2", "prefill", "chunk٣"]:
        assert Phase.parse(bad) is None, bad
    assert Phase.parse("decode2").comparisons() == [("prefill_decode1", "decode1"), ("prefill_decode2", "decode2")]  # type: ignore[union-attr]
    assert Phase.parse("batch4").comparisons() == [("prefill_last", "batch4")]  # type: ignore[union-attr]
    assert parse_phases(["decode0", " batch4", "decode0"]) == [Phase("decode0"), Phase("batch", 4)]
    with pytest.raises(InputError, match="unknown phase `chunk0`"):
        parse_phases(["chunk0"])


ALL_PHASES = ["prefill_last", "decode0", "chunk4", "prefix_cache", "batch4", "decode2"]


@pytest.fixture(scope="module")
def all_phase_events(llama: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> List[dict]:
    out = tmp_path_factory.mktemp("phases") / "trace.jsonl"
    trace_prompts(llama, None, [{"id": "p", "token_ids": TOKENS}], out, phases=ALL_PHASES)
    return stage_events(out)


def test_each_phase_records_what_runner_rs_records(all_phase_events: List[dict], llama: nn.Module) -> None:
    seen: Dict[str, set] = {}
    for e in all_phase_events:
        seen.setdefault(e["phase"], set()).add((e["step"], e["seq_len"], e["pos_id"], e["token_id"]))
    greedy = seen["decode1"].copy().pop()[3]
    with torch.no_grad():
        expected_first = int(torch.argmax(llama(torch.tensor([TOKENS[:8]])).logits[0, -1]))
    assert greedy == expected_first
    second = seen["decode2"].copy().pop()[3]
    assert seen == {
        "prefill_last": {(0, 10, 9, 42)},
        "decode0": {(1, 1, 9, 42)},
        "chunk4": {(0, 2, 9, 42)},  # chunks 0-3, 4-7, then 8-9
        "prefix_cache": {(0, 5, 9, 42)},  # positions 0-4 from the donor's cache
        "batch4": {(0, 28, 9, 42)},  # 10 + companions of 3, 6 and 9 tokens
        "decode1": {(1, 1, 8, greedy)},
        "decode2": {(2, 1, 9, second)},
        "prefill_decode1": {(0, 10, 8, greedy)},
        "prefill_decode2": {(0, 10, 9, second)},
    }
    per_phase = {phase: sum(1 for e in all_phase_events if e["phase"] == phase) for phase in seen}
    assert set(per_phase.values()) == {POINTS_PER_PROMPT}


def test_embedding_rows_are_equal_in_every_phase(all_phase_events: List[dict]) -> None:
    """The embedding lookup has no reduction: its row is bitwise equal in every phase of a token."""
    by_token: Dict[int, Dict[str, int]] = {}
    for e in all_phase_events:
        if e["point"] == "embed_out":
            by_token.setdefault(e["token_id"], {})[e["phase"]] = e["hash"]
    assert set(by_token[42]) == {"prefill_last", "decode0", "chunk4", "prefix_cache", "batch4"}
    assert len(set(by_token[42].values())) == 1
    for step in (1, 2):  # the sampled tokens: decode step k and the trainer's prefill agree
        phases = {f"decode{step}", f"prefill_decode{step}"}
        group = next(g for g in by_token.values() if phases <= set(g))
        assert len({group[p] for p in phases}) == 1


class Keep:
    def __init__(self) -> None:
        self.rows: Dict[Tuple[str, str], torch.Tensor] = {}

    def record(self, row: TracedRow, point: str, layer: int, values: torch.Tensor) -> None:
        self.rows[row.phase, point] = values.clone()


@pytest.mark.parametrize("tokens", [TOKENS, TOKENS[:3], TOKENS[:1]], ids=["n10", "n3", "n1"])
def test_every_phase_computes_the_same_token(llama: nn.Module, tokens: List[int]) -> None:
    """Positions, KV cache, chunking and the batch's padding are right: every phase's logits of the
    last token agree with prefill_last's up to rounding."""
    prompt = Prompt("p", tuple(tokens))
    keep = Keep()
    with Tracer(llama, keep, points=["x_in", "logits"], layers=[1]) as tracer:
        logits = {name: run_phase(llama, tracer, prompt, Phase.parse(name)) for name in ALL_PHASES[:-1]}  # type: ignore[arg-type]
    base = logits["prefill_last"]
    assert base.shape == (300,) and base.abs().max() > 0.1
    for name, got in logits.items():
        assert torch.allclose(got, base, rtol=0, atol=1e-4), name
        assert torch.equal(keep.rows[name, "logits"], got), name
    if len(tokens) == 1:  # one token: decode0 is the very same computation as prefill_last
        assert torch.equal(logits["decode0"], base)


def test_batch_row_sits_in_the_middle_of_a_padded_batch(llama: nn.Module) -> None:
    """A short prompt in a batch of 4 (companions of 2, 3 and 4 tokens): it is row 2 of 4, padded
    on the right to 4 tokens."""
    prompt = Prompt("p", (5, 9))
    keep = Keep()
    with Tracer(llama, keep, points=["embed_out", "logits"]) as tracer:
        batch = run_phase(llama, tracer, prompt, Phase("batch", 4))
        single = run_phase(llama, tracer, prompt, Phase("prefill_last"))
    assert torch.equal(keep.rows["batch4", "embed_out"], llama.model.embed_tokens.weight[9])
    assert torch.allclose(batch, single, rtol=0, atol=1e-4)


def test_trace_prompts_takes_a_prompt_file_and_restores_training_mode(
    llama: nn.Module, tmp_path: Path, prompts_file: Path
) -> None:
    llama.train()
    try:
        summary = trace_prompts(llama, None, prompts_file, tmp_path / "t.jsonl", phases=["prefill_last", "decode0"])
        assert llama.training
    finally:
        llama.eval()
    assert summary.events == 3 * 2 * POINTS_PER_PROMPT
    assert summary.phases == ("prefill_last", "decode0") and summary.prompts == 3
