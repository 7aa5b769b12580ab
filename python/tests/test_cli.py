"""The command line: trace files that driftscope reads, dumps, run_meta, filters, and exit code 2 on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, List

import pytest
import torch
from conftest import (
    N_LAYERS,
    POINTS_PER_PROMPT,
    PROMPTS,
    REPO,
    read_trace,
    run_driftscope,
    stage_events,
    write_prompts,
)

from driftscope_torch import row_hash, row_stats
from driftscope_torch.cli import main

SCHEMA = json.loads((REPO / "docs" / "trace-format.schema.json").read_text(encoding="utf-8"))


def trace(*args: Any) -> int:
    return main(["trace", *[str(a) for a in args]])


@pytest.fixture(scope="module")
def default_run(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All points, all layers, prefill_last + decode0 + batch4, with a dump."""
    d = tmp_path_factory.mktemp("cli")
    prompts = write_prompts(d / "prompts.jsonl", PROMPTS)
    out = d / "trace.jsonl"
    assert (
        trace("--model", llama_dir, "--prompts", prompts, "--out", out, "--batch", 4, "--dump", "--attn", "eager") == 0
    )
    return out


def test_every_event_matches_the_json_schema(default_run: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(SCHEMA)
    events = read_trace(default_run)
    assert events[0]["event"] == "run_meta"
    for e in events:
        errors = [err.message for err in validator.iter_errors(e)]
        assert not errors, (e, errors)
    # What the schema cannot say: integers are plain, the hash has all its digits.
    for line in default_run.read_text(encoding="utf-8").splitlines()[1:]:
        assert '"hash":' in line and "e+" not in line.split('"hash":')[1].split(",")[0]
    assert len(events) == 1 + 3 * 3 * POINTS_PER_PROMPT


@pytest.mark.parametrize("candidate", ["decode0", "batch4"])
def test_driftscope_analyze_pairs_every_point(
    default_run: Path, driftscope_bin: Path, tmp_path: Path, candidate: str
) -> None:
    verdict_path = tmp_path / "verdict.json"
    r = run_driftscope(
        driftscope_bin, "analyze", str(default_run), "--candidate", candidate, "--json", str(verdict_path)
    )
    assert r.returncode in (0, 1), r.stderr
    verdict = json.loads(verdict_path.read_text(encoding="utf-8"))
    assert verdict["total_pairs"] == 3 * POINTS_PER_PROMPT
    assert verdict["missing_pairs"] == 0
    assert verdict["passed"] + verdict["failed"] == verdict["total_pairs"]
    assert (r.returncode == 1) == (verdict["verdict"] == "FAIL")
    keys = {(p["key"]["prompt_id"], p["key"]["point"], p["key"]["layer"]) for p in verdict["pairs"]}
    assert len(keys) == 3 * POINTS_PER_PROMPT
    assert {k[2] for k in keys} == set(range(N_LAYERS))
    statuses = {(p["key"]["prompt_id"], p["key"]["point"], p["key"]["layer"]): p["status"] for p in verdict["pairs"]}
    for prompt in ("p_one", "p_seven", "p_long"):
        assert statuses[prompt, "embed_out", 0] == "PASS"  # a lookup: bitwise equal in any phase
        assert statuses[prompt, "x_in", 0] == "PASS"
    if candidate == "decode0":  # a one-token prompt is the same computation in both phases
        assert {s for (pid, _, _), s in statuses.items() if pid == "p_one"} == {"PASS"}
    assert verdict["magnitude_source"] != "statistics"


def test_the_dump_holds_every_row(default_run: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(default_run.with_suffix(".safetensors")))
    events = stage_events(default_run)
    assert sorted(tensors) == sorted(e["tensor"] for e in events)
    for e in events:
        row = tensors[e["tensor"]]
        assert e["tensor"] == f"{e['prompt_id']}/{e['phase']}/{e['point']}/{e['layer']}"
        assert row.dim() == 1 and row.numel() == e["numel"] == e["shape"][0]
        assert e["dtype"] == "f32" and row.dtype == torch.float32
        assert row_hash(row) == e["hash"]
        s = row_stats(row)
        assert (s.min, s.max, s.mean, s.l2) == (e["min"], e["max"], e["mean"], e["l2"])


def test_run_meta(default_run: Path, llama_dir: Path) -> None:
    import transformers

    meta = read_trace(default_run)[0]
    assert meta["format_version"] == 1
    assert meta["n_layers"] == N_LAYERS
    assert meta["torch_version"] == torch.__version__
    assert meta["transformers_version"] == transformers.__version__
    assert (
        f"torch {torch.__version__}" in meta["engine"] and f"transformers {transformers.__version__}" in meta["engine"]
    )
    assert meta["engine"].startswith("driftscope-torch ")
    assert meta["dtype"] == "f32"
    assert meta["device"].startswith("cpu (")
    assert meta["attn_implementation"] == "eager"
    assert meta["model_type"] == "llama"
    assert meta["model"] == llama_dir.name
    assert meta["phases"] == ["prefill_last", "decode0", "batch4"]
    assert meta["deterministic"]["use_deterministic_algorithms"] is False
    assert meta["profile"] == "default"
    assert meta["command"].startswith("driftscope-torch trace --model ")


@pytest.fixture()
def restore_determinism() -> Any:
    env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    yield
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = False
    if env is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = env


def test_deterministic_flags_bf16_and_sdpa(
    llama_dir: Path, prompts_file: Path, tmp_path: Path, restore_determinism: Any
) -> None:
    out = tmp_path / "t.jsonl"
    args = ["--model", llama_dir, "--prompts", prompts_file, "--out", out, "--dtype", "bf16", "--deterministic"]
    assert trace(*args, "--points", "x_in,attn_out,logits", "--dump") == 0
    meta = read_trace(out)[0]
    assert meta["dtype"] == "bf16" and meta["attn_implementation"] == "sdpa" and meta["profile"] == "deterministic"
    assert meta["deterministic"]["use_deterministic_algorithms"] is True
    assert meta["deterministic"]["cudnn_deterministic"] is True
    assert meta["deterministic"]["cudnn_benchmark"] is False
    assert meta["deterministic"]["cublas_workspace_config"] == ":4096:8"
    from safetensors.torch import load_file

    tensors = load_file(str(out.with_suffix(".safetensors")))
    events = stage_events(out)
    assert {e["dtype"] for e in events} == {"bf16"}
    for e in events:
        row = tensors[e["tensor"]]
        assert row.dtype == torch.bfloat16 and row_hash(row) == e["hash"]
        assert e["hash"] != row_hash(row.float())


def test_f16_rows(llama_dir: Path, prompts_file: Path, tmp_path: Path, driftscope_bin: Path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "t.jsonl"
    assert (
        trace(
            "--model", llama_dir, "--prompts", prompts_file, "--out", out, "--dtype", "fp16", "--dump", "--layers", "0"
        )
        == 0
    )
    assert read_trace(out)[0]["dtype"] == "f16"
    tensors = load_file(str(out.with_suffix(".safetensors")))
    events = stage_events(out)
    assert {e["dtype"] for e in events} == {"f16"} and len(events) == 3 * 2 * (13 + 3)
    for e in events:
        assert tensors[e["tensor"]].dtype == torch.float16 and row_hash(tensors[e["tensor"]]) == e["hash"]
    r = run_driftscope(driftscope_bin, "analyze", str(out), "--json", str(tmp_path / "v.json"))
    assert r.returncode in (0, 1), r.stderr
    assert json.loads((tmp_path / "v.json").read_text())["total_pairs"] == 3 * (13 + 3)


def test_layers_and_points_filters(llama_dir: Path, prompts_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.jsonl"
    assert (
        trace(
            "--model", llama_dir, "--prompts", prompts_file, "--out", out, "--layers", "1", "--points", "q,x_in,logits"
        )
        == 0
    )
    got = {(e["point"], e["layer"], e["phase"], e["prompt_id"]) for e in stage_events(out)}
    want = {
        (point, layer, phase, p["id"])
        for point, layer in (("q", 1), ("x_in", 1), ("logits", 0))
        for phase in ("prefill_last", "decode0")
        for p in PROMPTS
    }
    assert got == want and len(stage_events(out)) == len(want)
    assert not out.with_suffix(".safetensors").exists()  # no --dump, no dump
    assert "tensor" not in stage_events(out)[0]


def test_text_prompts_use_the_tokenizer_without_special_tokens(llama_dir: Path, tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", [{"id": "t", "text": "the capital of france is paris"}])
    out = tmp_path / "t.jsonl"
    assert (
        trace("--model", llama_dir, "--prompts", prompts, "--out", out, "--points", "embed_out", "--scenario", "chunk2")
        == 0
    )
    events = {e["phase"]: e for e in stage_events(out)}
    # WORDS: the=2 capital=3 of=4 france=5 is=6 paris=7; 6 tokens, traced at position 5
    assert (events["prefill_last"]["pos_id"], events["prefill_last"]["token_id"]) == (5, 7)
    assert (events["chunk2"]["seq_len"], events["chunk2"]["step"]) == (2, 0)


def test_an_existing_output_is_replaced_whole(llama_dir: Path, prompts_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.jsonl"
    out.write_text("old\n")
    assert trace("--model", llama_dir, "--prompts", prompts_file, "--out", out, "--points", "logits") == 0
    assert len(stage_events(out)) == 6
    assert sorted(os.listdir(tmp_path)) == ["prompts.jsonl", "t.jsonl"]  # no temporary file left


def test_two_runs_give_the_same_trace_and_driftscope_diff_passes(
    llama_dir: Path, prompts_file: Path, tmp_path: Path, driftscope_bin: Path
) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for out in (a, b):
        assert trace("--model", llama_dir, "--prompts", prompts_file, "--out", out, "--dump", "--layers", "0") == 0
    r = run_driftscope(driftscope_bin, "diff", str(a), str(b), "--phase", "decode0")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout


# ---------------------------------------------------------------------------------------------
# Bad input: exit code 2, one message naming the file/line or flag, outputs untouched.


BAD_LINES = [
    ('{"id": "a", "token_ids": [1, 2]}\n{"id": "b", "token_ids": [1,}\n', "prompts.jsonl:2: not valid JSON"),
    ('{"id": "a", "text": "x", "token_ids": [1]}\n', "prompts.jsonl:1: give exactly one of `text` and `token_ids`"),
    ('{"id": "a", "tokens": [1]}\n', "prompts.jsonl:1: unknown field `tokens`"),
    ('\n\n{"id": 3, "token_ids": [1]}\n', "prompts.jsonl:3: `id` must be a string"),
    ('{"id": "a", "token_ids": [1, -2]}\n', "prompts.jsonl:1: `token_ids` must be a list of unsigned integers"),
    ('{"id": "a", "token_ids": [1]}\n{"id": "a", "token_ids": [2]}\n', "prompts.jsonl:2: prompt id `a` appears twice"),
    ("[1, 2]\n", "prompts.jsonl:1: expected a JSON object"),
    ("\n  \n", "prompts.jsonl: no prompts in the file"),
    ('{"id": "a", "token_ids": []}\n', "prompts.jsonl:1: prompt `a` has no tokens"),
    (
        '{"id": "a", "token_ids": [1, 300]}\n',
        "prompts.jsonl:1: prompt `a`: token id 300 is outside the vocabulary (size 300)",
    ),
]


@pytest.mark.parametrize(("content", "message"), BAD_LINES, ids=[m.split(": ", 1)[1] for _, m in BAD_LINES])
def test_bad_prompt_files(
    llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, content: str, message: str
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(content, encoding="utf-8")
    out = tmp_path / "t.jsonl"
    assert trace("--model", llama_dir, "--prompts", prompts, "--out", out) == 2
    err = capsys.readouterr().err
    assert f"{prompts.parent}/{message}" in err, err
    last = err.strip().splitlines()[-1]  # after transformers' progress bars, if the model was loaded
    assert last.startswith("driftscope-torch: error: ") and message in last
    assert "Traceback" not in err
    assert not out.exists()


def bad_args(llama_dir: Path, prompts: Path, out: Path) -> List[tuple]:
    base = ["--model", llama_dir, "--prompts", prompts]
    return [
        ([*base, "--out", out, "--points", "x_in,attn"], "--points: unknown trace point `attn`"),
        ([*base, "--out", out, "--points", "q_rope"], "--points: point `q_rope` is not reachable by module hooks"),
        ([*base, "--out", out, "--layers", "2"], "--layers: `2` is outside the model's layers 0-1"),
        ([*base, "--out", out, "--layers", "x"], "--layers: `x` is not a layer or range"),
        ([*base, "--out", out, "--scenario", "chunk0"], "--scenario: unknown phase `chunk0`"),
        ([*base, "--out", out, "--scenario", "prefill_last"], "--scenario: `prefill_last` is the baseline"),
        ([*base, "--out", out, "--batch", "1"], "--batch: a batch needs at least 2 prompts"),
        ([*base, "--out", out, "--dtype", "int8"], "--dtype: unknown dtype `int8`"),
        ([*base, "--out", prompts], f"refusing to write {prompts} over the input {prompts}"),
        ([*base, "--out", out.with_suffix(".safetensors"), "--dump"], "two outputs name the same file"),
        ([*base, "--out", out.parent], "is a directory, not a file"),
        ([*base, "--out", out.parent / "missing" / "t.jsonl"], "does not exist"),
        (
            ["--model", llama_dir, "--prompts", out.parent / "nope.jsonl", "--out", out],
            "nope.jsonl: no such prompts file",
        ),
        (
            ["--model", out.parent / "no-model", "--prompts", prompts, "--out", out],
            "no-model: no such model file or directory",
        ),
        (["--model", prompts, "--prompts", prompts, "--out", out], "a model file must be .gguf"),
        ([*base, "--out", out, "--point-map", out.parent / "nomap.json"], "nomap.json: cannot read the point map"),
    ]


def test_bad_flags_and_paths(
    llama_dir: Path, prompts_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "t.jsonl"
    out.write_text("old\n")
    for args, message in bad_args(llama_dir, prompts_file, out):
        assert trace(*args) == 2, args
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert message in last and last.startswith("driftscope-torch: error: "), (args, err)
        assert "Traceback" not in err
        assert out.read_text() == "old\n"  # untouched
    assert sorted(os.listdir(tmp_path)) == ["prompts.jsonl", "t.jsonl"]
    assert prompts_file.read_text().count("\n") == 3


def test_text_without_a_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from conftest import tiny_model

    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)  # no tokenizer files
    prompts = write_prompts(tmp_path / "p.jsonl", [{"id": "a", "token_ids": [1, 2]}, {"id": "b", "text": "hi"}])
    assert trace("--model", model_dir, "--prompts", prompts, "--out", tmp_path / "t.jsonl") == 2
    assert "p.jsonl:2: prompt `b` is text, but the model has no tokenizer; give `token_ids`" in capsys.readouterr().err


def test_the_process_exits_2_without_a_traceback(llama_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "token_ids": [1]}\n{"id": "b"\n', encoding="utf-8")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "driftscope_torch",
            "trace",
            "--model",
            str(llama_dir),
            "--prompts",
            str(prompts),
            "--out",
            str(tmp_path / "t.jsonl"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert f"{prompts}:2: not valid JSON" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "driftscope_torch", "trace", "--model"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2 and "expected one argument" in r.stderr
