"""The row hash and statistics against the shared fixture tests/fixtures/row-hashes.json."""

from __future__ import annotations

import importlib.util
import json
import math
import struct
from typing import Any, Dict, List

import numpy as np
import pytest
import torch
import xxhash
from conftest import REPO

from driftscope_torch.hashing import json_stat, row_bytes, row_hash, row_stats
from driftscope_torch.writer import json_line

FIXTURE = REPO / "tests" / "fixtures" / "row-hashes.json"
ROWS: List[Dict[str, Any]] = json.loads(FIXTURE.read_text(encoding="utf-8"))["rows"]


def tensor_of(bits: List[int], dtype: str) -> torch.Tensor:
    """A tensor holding exactly these bit patterns (no value conversion)."""
    if dtype == "f32":
        return torch.from_numpy(np.array(bits, dtype=np.uint32).view(np.float32).copy())
    raw = torch.from_numpy(np.array(bits, dtype=np.uint16).view(np.int16).copy())
    return raw.view(torch.bfloat16 if dtype == "bf16" else torch.float16)


def packed(bits: List[int], dtype: str) -> bytes:
    fmt = "<I" if dtype == "f32" else "<H"
    return b"".join(struct.pack(fmt, b) for b in bits)


def same_stat(got: float, want: Any) -> bool:
    if want == "NaN":
        return math.isnan(got)
    return got == float(want)  # -0.0 == 0.0, as the fixture says


@pytest.mark.parametrize("row", ROWS, ids=[r["name"] for r in ROWS])
def test_fixture_row(row: Dict[str, Any]) -> None:
    t = tensor_of(row["bits"], row["dtype"])
    assert row_bytes(t) == packed(row["bits"], row["dtype"])
    assert row_hash(t) == row["hash"]
    got = row_stats(t)
    want = row["stats"]
    assert (got.numel, got.nan_count, got.inf_count) == (want["numel"], want["nan_count"], want["inf_count"])
    for name in ("min", "max", "mean", "l2"):
        assert same_stat(getattr(got, name), want[name]), (name, getattr(got, name), want[name])
    # The fixture's values are the exact widening of its bits.
    for v, w in zip(t.double().tolist(), row["values"]):
        if isinstance(w, str):
            assert json_stat(v) == w
        else:
            assert struct.pack("<d", v) == struct.pack("<d", w)


def test_fixture_hashes_are_xxh64_of_the_packed_bits() -> None:
    """The fixture itself, independently of torch: xxh64 of the little-endian bit patterns."""
    for row in ROWS:
        assert xxhash.xxh64_intdigest(packed(row["bits"], row["dtype"]), seed=0) == row["hash"], row["name"]


def test_fixture_covers_the_required_cases() -> None:
    for dtype in ("f32", "bf16", "f16"):
        rows = [r for r in ROWS if r["dtype"] == dtype]
        assert {0, 1, 7, 64, 576} <= {len(r["bits"]) for r in rows}, dtype
        values = [v for r in rows for v in r["values"]]
        assert "NaN" in values and "Infinity" in values and "-Infinity" in values, dtype
        assert any(isinstance(v, float) and v == 0 and math.copysign(1, v) < 0 for v in values), f"{dtype}: -0.0"
        tiny = {"f32": 2.0**-126, "bf16": 2.0**-126, "f16": 2.0**-14}[dtype]
        assert any(isinstance(v, float) and 0 < abs(v) < tiny for v in values), f"{dtype}: subnormal"


def test_fixture_matches_its_generator() -> None:
    path = REPO / "python" / "scripts" / "make_row_hash_fixture.py"
    spec = importlib.util.spec_from_file_location("make_row_hash_fixture", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    regenerated = json.loads(json.dumps(module.build()))
    assert regenerated == json.loads(FIXTURE.read_text(encoding="utf-8"))


def test_documented_worked_example() -> None:
    """docs/trace-format.md 8.2: the same four values in f32 and bf16; xxh64 of nothing."""
    values = [1.0, -2.5, 0.0, 0.125]
    assert row_hash(torch.tensor(values, dtype=torch.float32)) == 7090992677395812351
    assert row_hash(torch.tensor(values, dtype=torch.bfloat16)) == 3795356799443189753
    assert row_hash(torch.tensor([], dtype=torch.float32)) == 17241709254077376921
    s = row_stats(torch.tensor(values))
    assert (s.min, s.max, s.mean, s.l2) == (-2.5, 1.0, -0.34375, 2.695482331605978)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_one_ulp_and_the_sign_of_zero_change_the_hash(dtype: torch.dtype) -> None:
    row = torch.tensor([0.1, 0.2, 0.3], dtype=dtype)
    bumped = row.clone()
    raw = bumped.view(torch.int32 if dtype == torch.float32 else torch.int16)
    raw[1] += 1
    assert row_hash(row) != row_hash(bumped)
    assert row_hash(torch.tensor([0.0], dtype=dtype)) != row_hash(torch.tensor([-0.0], dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_rows_hash_their_own_bytes_not_f32(dtype: torch.dtype) -> None:
    row = torch.linspace(-3, 3, 576).to(dtype)
    expected = xxhash.xxh64_intdigest(row.view(torch.int16).numpy().tobytes(), seed=0)
    assert row_hash(row) == expected
    assert len(row_bytes(row)) == 2 * 576
    assert row_hash(row) != row_hash(row.float())


def test_a_strided_row_hashes_like_its_contiguous_copy() -> None:
    m = torch.arange(64, dtype=torch.float32).reshape(8, 8) / 7
    column = m[:, 3]
    assert not column.is_contiguous()
    assert row_hash(column) == row_hash(column.contiguous())


def test_unsupported_dtype() -> None:
    with pytest.raises(TypeError, match="unsupported storage dtype torch.float64"):
        row_hash(torch.zeros(3, dtype=torch.float64))


def test_non_finite_statistics_are_written_as_strings() -> None:
    assert [json_stat(x) for x in (math.nan, math.inf, -math.inf, -0.5)] == ["NaN", "Infinity", "-Infinity", -0.5]
    line = json_line({"min": json_stat(math.nan), "hash": 18446744073709551615})
    assert line == '{"min":"NaN","hash":18446744073709551615}\n'
    with pytest.raises(ValueError):
        json_line({"min": math.nan})  # a bare NaN is not JSON
