"""--inject: the decode-path bugs, committed in decode steps only, named by driftscope's bug tier on traces
the adapter wrote (not driftscope's engine)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from conftest import PROMPTS, read_trace, run_driftscope, tiny_model, tiny_tokenizer
from torch import nn

from driftscope_torch import InputError, Phase, Prompt, trace_prompts
from driftscope_torch.cli import main
from driftscope_torch.phases import INJECTIONS, run_phase

BUGS = sorted(INJECTIONS)


def _ctx_rows(model: nn.Module, tokens: List[int], phase: str, inject: Any) -> Dict[str, Any]:
    """The layer-0 attn_ctx and v rows of one phase of one prompt, traced in memory."""
    from driftscope_torch import Tracer

    rows: Dict[str, Any] = {}

    class Sink:
        def record(self, row: Any, point: str, layer: int, values: torch.Tensor) -> None:
            rows[point] = values.float().clone()

    tracer = Tracer(model, Sink(), layers=[0], points=["attn_ctx", "v", "q"])
    with tracer:
        run_phase(model, tracer, Prompt("p", tuple(tokens)), Phase.parse(phase), inject)  # type: ignore[arg-type]
    return rows


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return tiny_model("llama")


def test_kv_drop_attends_to_its_own_key_only(model: nn.Module) -> None:
    toks = PROMPTS[2]["token_ids"]
    rows = _ctx_rows(model, toks, "decode0", "kv_drop")
    ctx, v = rows["attn_ctx"].reshape(-1), rows["v"].reshape(-1)
    heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    d = ctx.numel() // heads
    want = torch.cat([v[(h // (heads // kv_heads)) * d : (h // (heads // kv_heads) + 1) * d] for h in range(heads)])
    assert torch.allclose(ctx, want, rtol=1e-5, atol=1e-6)
    right = _ctx_rows(model, toks, "decode0", None)
    assert torch.equal(rows["q"], right["q"]), "the step's own projections are untouched"
    assert not torch.allclose(rows["attn_ctx"], right["attn_ctx"])


def test_bugs_touch_decode_steps_and_never_a_prefill(model: nn.Module) -> None:
    toks = PROMPTS[2]["token_ids"]
    for bug in BUGS:
        for phase in ["prefill_last", "chunk8", "prefix_cache", "batch3"]:
            a, b = _ctx_rows(model, toks, phase, bug), _ctx_rows(model, toks, phase, None)
            assert torch.equal(a["attn_ctx"], b["attn_ctx"]), f"{bug} must not touch {phase}"
        a, b = _ctx_rows(model, toks, "decode0", bug), _ctx_rows(model, toks, "decode0", None)
        assert not torch.allclose(a["attn_ctx"], b["attn_ctx"]), bug


def test_an_unknown_bug_is_an_input_error(model: nn.Module, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown bug `kv-drop`"):
        trace_prompts(model, None, PROMPTS, tmp_path / "t.jsonl", inject="kv-drop")
    with pytest.raises(SystemExit) as e:
        main(["trace", "--model", "x", "--prompts", "p", "--out", "o", "--inject", "nope"])
    assert e.value.code == 2


def test_driftscope_names_each_bug_on_adapter_traces(
    model: nn.Module, tmp_path: Path, driftscope_bin: Path
) -> None:
    """Every bug, with dumps: the gross origin is layer 0's attention (q_rope and k_rope are not hooked, so
    a wrong RoPE position shows there too), class ATTENTION_STATE_MISMATCH; without a bug there is none."""
    tok = tiny_tokenizer()
    for bug in [None] + BUGS:
        out = tmp_path / f"{bug}.jsonl"
        trace_prompts(model, tok, PROMPTS, out, dump=True, inject=bug)
        meta = read_trace(out)[0]
        assert meta.get("inject") == bug and meta["kv_cache_dtype"] == "f32" and meta["matmul_input_dtype"] == "f32"
        verdict = tmp_path / f"{bug}.json"
        p = run_driftscope(driftscope_bin, "analyze", str(out), "--json", str(verdict))
        assert p.returncode == 1, p.stderr
        v = json.loads(verdict.read_text())
        prompts = {q["prompt_id"]: q for q in v["prompts"]}
        if bug is None:
            assert v["gross_origin"] is None and all(q["gross_origin"] is None for q in v["prompts"]), v["root_cause"]
            continue
        assert v["root_cause"] == "ATTENTION_STATE_MISMATCH", (bug, v["root_cause"])
        for pid in ["p_seven", "p_long"]:
            g = prompts[pid]["gross_origin"]
            assert (g["point"], g["layer"], g["class"], g["source"]) == ("attn_ctx", 0, "ATTENTION_STATE_MISMATCH", "dump"), (bug, g)
            assert g["rel_delta"] > g["bound"], (bug, g)
        # A one-token prompt has no cache to drop or miss.
        if bug in ("kv_drop", "cache_off_by_one"):
            assert prompts["p_one"]["gross_origin"] is None, bug
