"""The tracer: hooks leave outputs bit for bit unchanged and hand over the right rows."""

from __future__ import annotations

from typing import Dict, List, Tuple

import pytest
import torch
from conftest import N_LAYERS, PER_LAYER_POINTS, tiny_model
from torch import nn

from driftscope_torch import InputError, TracedRow, Tracer
from driftscope_torch.phases import ModelCall


class Recorder:
    """A sink keeping each row's values by (point, layer, phase)."""

    def __init__(self) -> None:
        self.rows: Dict[Tuple[str, int, str], torch.Tensor] = {}
        self.order: List[Tuple[str, int]] = []

    def record(self, row: TracedRow, point: str, layer: int, values: torch.Tensor) -> None:
        self.rows[(point, layer, row.phase)] = values.clone()
        self.order.append((point, layer))


IDS = [5, 9, 33, 7, 120, 64, 2, 250, 11]


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_hooks_do_not_change_the_outputs(dtype: torch.dtype) -> None:
    llama = tiny_model("llama").to(dtype)
    call = ModelCall(llama)
    n = len(IDS)
    with torch.no_grad():
        plain = call([IDS])[0]
        plain_step = call([IDS[-1:]], n - 1, call([IDS[:-1]])[1])[0]
        before = all_hooks(llama)
        with Tracer(llama, Recorder()) as tracer:
            assert all_hooks(llama) == before + len(tracer.hooks) > before
            with tracer.tracing([TracedRow("p", "prefill_last", 0, n - 1, n, IDS[-1], n - 1)]):
                traced = call([IDS])[0]
            cache = call([IDS[:-1]])[1]
            with tracer.tracing([TracedRow("p", "decode0", 1, n - 1, 1, IDS[-1], 0)]):
                step = call([IDS[-1:]], n - 1, cache)[0]
        assert all_hooks(llama) == before
    assert plain.dtype == dtype
    assert torch.equal(plain, traced)
    assert torch.equal(plain_step, step)


def test_rows_are_the_values_of_the_forward_pass(llama: nn.Module) -> None:
    rec = Recorder()
    ids = torch.tensor([IDS])
    n = len(IDS)
    with torch.no_grad(), Tracer(llama, rec) as tracer:
        with tracer.tracing([TracedRow("p", "prefill_last", 0, n - 1, n, IDS[-1], n - 1)]):
            logits = llama(ids).logits[0, -1]
    r = {(p, layer): v for (p, layer, _), v in rec.rows.items()}
    assert len(r) == N_LAYERS * PER_LAYER_POINTS + 3
    inner = llama.model
    assert torch.equal(r["embed_out", 0], inner.embed_tokens.weight[IDS[-1]])
    assert torch.equal(r["x_in", 0], r["embed_out", 0])
    for layer in range(N_LAYERS):
        block = inner.layers[layer]
        # Residual adds are elementwise: the traced rows reproduce them bit for bit.
        assert torch.equal(r["x_mid", layer], r["x_in", layer] + r["attn_out", layer])
        if layer + 1 < N_LAYERS:
            assert torch.equal(r["x_in", layer + 1], r["x_mid", layer] + r["mlp_out", layer])
        close = dict(rtol=1e-5, atol=1e-6)
        assert torch.allclose(r["attn_norm", layer], block.input_layernorm(r["x_in", layer]), **close)
        assert torch.allclose(r["q", layer], block.self_attn.q_proj(r["attn_norm", layer]), **close)
        assert torch.allclose(r["k", layer], block.self_attn.k_proj(r["attn_norm", layer]), **close)
        assert torch.allclose(r["v", layer], block.self_attn.v_proj(r["attn_norm", layer]), **close)
        assert torch.allclose(r["attn_out", layer], block.self_attn.o_proj(r["attn_ctx", layer]), **close)
        assert torch.allclose(r["mlp_norm", layer], block.post_attention_layernorm(r["x_mid", layer]), **close)
        assert torch.allclose(r["act", layer], nn.functional.silu(r["gate", layer]) * r["up", layer], **close)
        assert torch.allclose(r["mlp_out", layer], block.mlp.down_proj(r["act", layer]), **close)
        assert [r[p, layer].numel() for p in ("q", "k", "v", "attn_ctx", "gate", "act")] == [64, 32, 32, 64, 128, 128]
    last = N_LAYERS - 1
    residual = r["x_mid", last] + r["mlp_out", last]
    assert torch.allclose(r["final_norm", 0], inner.norm(residual), rtol=1e-5, atol=1e-6)
    assert torch.equal(r["logits", 0], logits)
    # Hooks fire in dataflow order within a layer.
    layer0 = [p for p, layer in rec.order if layer == 0 and p not in ("embed_out", "final_norm", "logits")]
    assert layer0 == [
        "x_in",
        "attn_norm",
        "q",
        "k",
        "v",
        "attn_ctx",
        "attn_out",
        "x_mid",
        "mlp_norm",
        "gate",
        "up",
        "act",
        "mlp_out",
    ]


def test_the_row_of_one_sequence_in_a_batch(llama: nn.Module) -> None:
    rec = Recorder()
    ids = torch.tensor([[1, 2, 3, 4], [40, 41, 42, 43]])
    with torch.no_grad(), Tracer(llama, rec, points=["embed_out", "logits"]) as tracer:
        with tracer.tracing([TracedRow("p", "batch2", 0, 2, 8, 42, seq_index=2, batch_index=1)]):
            logits = llama(ids).logits
    assert torch.equal(rec.rows["embed_out", 0, "batch2"], llama.model.embed_tokens.weight[42])
    assert torch.equal(rec.rows["logits", 0, "batch2"], logits[1, 2])


def test_nothing_is_recorded_outside_tracing(llama: nn.Module) -> None:
    rec = Recorder()
    with torch.no_grad(), Tracer(llama, rec):
        llama(torch.tensor([IDS]))
    assert rec.rows == {}


def test_layer_and_point_filters(llama: nn.Module) -> None:
    rec = Recorder()
    with torch.no_grad(), Tracer(llama, rec, layers=[1], points=["x_in", "act", "logits"]) as tracer:
        with tracer.tracing([TracedRow("p", "prefill_last", 0, 2, 3, 7, 2)]):
            llama(torch.tensor([[5, 6, 7]]))
    assert sorted(rec.rows) == [("act", 1, "prefill_last"), ("logits", 0, "prefill_last"), ("x_in", 1, "prefill_last")]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"points": ["q_rope"]}, "point `q_rope` is not reachable by module hooks"),
        ({"points": ["k_rope"]}, "point `k_rope` is not reachable by module hooks"),
        ({"points": ["attn"]}, "unknown trace point `attn`"),
        ({"layers": [2]}, r"the model has layers 0-1"),
    ],
)
def test_bad_points_and_layers(llama: nn.Module, kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        Tracer(llama, Recorder(), **kwargs)
