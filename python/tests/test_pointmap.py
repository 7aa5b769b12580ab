"""Point maps: the default Llama-family map on Qwen2 and Mistral, a custom map on Phi-3, map errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import pytest
import torch
from conftest import N_LAYERS, POINTS_PER_PROMPT, PROMPTS, run_driftscope, stage_events, tiny_model, write_prompts

from driftscope_torch import LLAMA_FAMILY, InputError, PointMap, TracedRow, Tracer, trace_prompts
from driftscope_torch.cli import main


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_default_map_on_other_llama_family_models(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    model = tiny_model(kind)
    out = tmp_path / "t.jsonl"
    summary = trace_prompts(model, None, PROMPTS, out, phases=["prefill_last", "decode0"])
    assert summary.events == 3 * 2 * POINTS_PER_PROMPT
    assert {e["numel"] for e in stage_events(out) if e["point"] == "q"} == {64}
    keep = Keep()
    with torch.no_grad(), Tracer(model, keep, layers=[0], points=["attn_norm", "q"]) as tracer:
        with tracer.tracing([TracedRow("p", "prefill_last", 0, 2, 3, 7, 2)]):
            model(torch.tensor([[5, 6, 7]]))
        proj = model.model.layers[0].self_attn.q_proj
        assert torch.allclose(keep.rows["q", 0], proj(keep.rows["attn_norm", 0]), rtol=1e-5, atol=1e-5)
        if kind == "qwen2":  # Qwen2 projects q, k, v with a bias: the hook sees the biased output
            assert proj.bias is not None
            unbiased = keep.rows["attn_norm", 0] @ proj.weight.T
            assert (keep.rows["q", 0] - unbiased).abs().max() > 0.1
    driftscope_bin = request.getfixturevalue("driftscope_bin")  # skips here (not in CI) without it
    verdict = tmp_path / "v.json"
    r = run_driftscope(driftscope_bin, "analyze", str(out), "--json", str(verdict))
    assert r.returncode in (0, 1), r.stderr
    v = json.loads(verdict.read_text())
    assert (v["total_pairs"], v["missing_pairs"]) == (3 * POINTS_PER_PROMPT, 0)


PHI3_MAP = {
    "layers": "model.layers",
    "points": {
        "embed_out": "model.embed_tokens:output",
        "x_in": ":input",
        "attn_norm": "input_layernorm:output",
        "attn_ctx": "self_attn.o_proj:input",
        "attn_out": "self_attn.o_proj:output",
        "x_mid": "post_attention_layernorm:input",
        "mlp_norm": "post_attention_layernorm:output",
        "act": "mlp.down_proj:input",
        "mlp_out": "mlp.down_proj:output",
        "final_norm": "model.norm:output",
        "logits": "lm_head:output",
    },
}


class Keep:
    def __init__(self) -> None:
        self.rows: Dict[tuple, torch.Tensor] = {}

    def record(self, row: TracedRow, point: str, layer: int, values: torch.Tensor) -> None:
        self.rows[point, layer] = values.clone()


def test_custom_map_on_phi3(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Phi-3 fuses q/k/v and gate/up into one projection each: a custom map traces the rest."""
    model = tiny_model("phi3")
    with pytest.raises(InputError, match="model type `phi3` has no default point map"):
        Tracer(model, Keep())
    pmap = PointMap.from_dict(PHI3_MAP)
    keep = Keep()
    ids = [3, 1, 4, 1, 5, 9]
    with torch.no_grad(), Tracer(model, keep, point_map=pmap) as tracer:
        with tracer.tracing([TracedRow("p", "prefill_last", 0, 5, 6, 9, 5)]):
            logits = model(torch.tensor([ids])).logits[0, -1]
    assert len(keep.rows) == 3 + 8 * N_LAYERS
    for layer in range(N_LAYERS):
        assert torch.equal(keep.rows["x_mid", layer], keep.rows["x_in", layer] + keep.rows["attn_out", layer])
    assert torch.equal(keep.rows["logits", 0], logits)

    out = tmp_path / "t.jsonl"
    summary = trace_prompts(model, None, PROMPTS, out, phases=["prefill_last", "decode0"], point_map=pmap)
    per_prompt = 3 + 8 * N_LAYERS
    assert summary.events == 3 * 2 * per_prompt
    driftscope_bin = request.getfixturevalue("driftscope_bin")
    verdict = tmp_path / "v.json"
    r = run_driftscope(driftscope_bin, "analyze", str(out), "--json", str(verdict))
    assert r.returncode in (0, 1), r.stderr
    v = json.loads(verdict.read_text())
    assert (v["total_pairs"], v["missing_pairs"]) == (3 * per_prompt, 0)


def test_custom_map_file_on_the_command_line(tmp_path: Path) -> None:
    model_dir = tmp_path / "phi3"
    tiny_model("phi3").save_pretrained(model_dir)
    map_file = tmp_path / "phi3-map.json"
    map_file.write_text(json.dumps(PHI3_MAP))
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS[:1])
    out = tmp_path / "t.jsonl"
    args = ["trace", "--model", str(model_dir), "--prompts", str(prompts), "--out", str(out)]
    assert main([*args, "--point-map", str(map_file), "--points", "x_mid,act"]) == 0
    assert {(e["point"], e["layer"]) for e in stage_events(out)} == {("x_mid", 0), ("x_mid", 1), ("act", 0), ("act", 1)}
    assert main(args) == 2  # no default map for phi3


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"layers": "model.layers", "points": {"q_rope": ":input"}}, "point `q_rope` is not reachable by module hooks"),
        ({"layers": "model.layers", "points": {"attn": ":input"}}, "unknown trace point `attn`"),
        ({"layers": "model.layers", "points": {"x_in": "input"}}, "is not `<module path>:input`"),
        ({"layers": "model.layers", "points": {"x_in": ":inside"}}, "is not `<module path>:input`"),
        ({"layers": "model.layers", "points": {}}, "`points` must be a non-empty object"),
        ({"points": {"x_in": ":input"}}, "per-layer points need `layers`"),
        ({"layers": "model.layers", "points": {"x_in": ":input"}, "extra": 1}, "unknown key"),
    ],
)
def test_bad_maps(data: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        PointMap.from_dict(data)


def test_maps_naming_missing_modules(llama: torch.nn.Module) -> None:
    bad = PointMap.from_dict({"layers": "model.layers", "points": {"q": "self_attn.qkv_proj:output"}})
    with pytest.raises(
        InputError, match=r"point map: `q` -> `self_attn.qkv_proj:output` \(layer 0\): the model has no module"
    ):
        Tracer(llama, Keep(), point_map=bad)
    bad = PointMap.from_dict({"layers": "model.blocks", "points": {"x_in": ":input"}})
    with pytest.raises(InputError, match="the model has no module `model.blocks`"):
        Tracer(llama, Keep(), point_map=bad)
    with pytest.raises(InputError, match="not in the point map"):
        Tracer(
            llama,
            Keep(),
            point_map=PointMap.from_dict({"layers": "model.layers", "points": {"x_in": ":input"}}),
            points=["q"],
        )


def test_map_file_errors_name_the_line(tmp_path: Path) -> None:
    f = tmp_path / "map.json"
    f.write_text('{\n "layers": "model.layers",\n "points": {"x_in": ":input",}\n}\n')
    with pytest.raises(InputError, match=f"{f}:3: not valid JSON"):
        PointMap.from_file(f)


def test_default_map_round_trips_through_json() -> None:
    assert PointMap.from_dict(json.loads(json.dumps(LLAMA_FAMILY.to_dict()))) == LLAMA_FAMILY
    assert set(LLAMA_FAMILY.points) == {
        "embed_out",
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
        "final_norm",
        "logits",
    }
