#!/usr/bin/env python3
"""Writes tests/fixtures/row-hashes.json: rows of known bits with their hash and statistics.

The fixture is shared by the Rust and Python test suites: both hash each row with their own
implementation and compare with the values here. This generator does not use torch or the
driftscope_torch package: it builds each row's little-endian bytes from the bit patterns with
`struct`, hashes them with the `xxhash` package (the reference xxHash C library), and computes the
statistics of docs/trace-format.md section 9 in plain float64 arithmetic, summing in element order
from 0.0 as driftscope's reference implementation does.

    python python/scripts/make_row_hash_fixture.py [OUT.json]   # default: tests/fixtures/row-hashes.json
"""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path
from typing import Any, Dict, List, Union

import xxhash

LAYOUT = (
    "Shared row-hash fixture (docs/trace-format.md sections 8 and 9). `rows` is a list; each row has: "
    "`name` (what it tests); `dtype` (`f32`, `bf16` or `f16`); `bits` (the raw bit pattern of each element "
    "as an unsigned integer: u32 for f32, u16 for bf16/f16; the row's bytes are these patterns written "
    "little-endian, in order); `values` (each element widened exactly to float64, as a JSON number, or the "
    'string "NaN", "Infinity" or "-Infinity"; -0.0 is written -0.0); `hash` (xxh64 with seed 0 of the '
    "row's bytes, an unsigned 64-bit integer); `stats` (`numel`, `nan_count`, `inf_count`, and over the "
    'finite elements `min`, `max`, `mean`, `l2`, each a number or "NaN" when the row has no finite '
    "element). mean and l2 are summed in float64 in element order starting from 0.0 (mean = sum / count, "
    "l2 = sqrt(sum of squares)); an implementation that sums in that order reproduces them bit for bit. "
    "-0.0 and 0.0 compare equal: compare min and max numerically. Regenerate with "
    "python/scripts/make_row_hash_fixture.py."
)

Json = Union[float, str]


def _json_float(x: float) -> Json:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return x


def value_of(bits: int, dtype: str) -> float:
    """The element's value, widened exactly to float64."""
    if dtype == "f32":
        return struct.unpack("<f", struct.pack("<I", bits))[0]
    if dtype == "bf16":
        return struct.unpack("<f", struct.pack("<I", bits << 16))[0]
    if dtype == "f16":
        return struct.unpack("<e", struct.pack("<H", bits))[0]
    raise ValueError(dtype)


def row_bytes(bits: List[int], dtype: str) -> bytes:
    fmt = "<I" if dtype == "f32" else "<H"
    return b"".join(struct.pack(fmt, b) for b in bits)


def stats(values: List[float]) -> Dict[str, Any]:
    lo, hi, total, squares, finite, nans, infs = math.inf, -math.inf, 0.0, 0.0, 0, 0, 0
    for x in values:
        if math.isnan(x):
            nans += 1
        elif math.isinf(x):
            infs += 1
        else:
            finite += 1
            lo, hi = min(lo, x), max(hi, x)
            total += x
            squares += x * x
    if finite == 0:
        lo = hi = mean = l2 = math.nan
    else:
        mean, l2 = total / finite, math.sqrt(squares)
    return {
        "numel": len(values),
        "nan_count": nans,
        "inf_count": infs,
        "min": _json_float(lo),
        "max": _json_float(hi),
        "mean": _json_float(mean),
        "l2": _json_float(l2),
    }


class Lcg:
    """A 64-bit linear congruential generator: the same rows on every machine."""

    def __init__(self, seed: int) -> None:
        self.state = seed

    def next(self, bits: int) -> int:
        self.state = (self.state * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        return self.state >> (64 - bits)


def random_bits(n: int, dtype: str, seed: int) -> List[int]:
    """Finite elements of both signs over a range of magnitudes (about 2^-20 .. 2^6)."""
    rng = Lcg(seed)
    out = []
    for _ in range(n):
        sign = rng.next(1)
        if dtype == "f16":
            exponent = 5 + rng.next(8) % 16  # biased exponents 5..20: 2^-10 .. 2^5
            out.append(sign << 15 | exponent << 10 | rng.next(10))
        else:
            exponent = 107 + rng.next(8) % 27  # biased exponents 107..133: 2^-20 .. 2^6
            f32 = sign << 31 | exponent << 23 | rng.next(23)
            out.append(f32 >> 16 if dtype == "bf16" else f32)
    return out


def f32_bits(values: List[float]) -> List[int]:
    return [struct.unpack("<I", struct.pack("<f", v))[0] for v in values]


ROWS: List[Dict[str, Any]] = [
    # f32
    {
        "name": "f32 worked example of docs/trace-format.md 8.2",
        "dtype": "f32",
        "bits": f32_bits([1.0, -2.5, 0.0, 0.125]),
    },
    {"name": "f32 empty row (length 0)", "dtype": "f32", "bits": []},
    {"name": "f32 length 1: -0.0", "dtype": "f32", "bits": [0x80000000]},
    {
        "name": "f32 length 7: +0, -0, smallest and largest subnormal, +inf, -inf, quiet NaN",
        "dtype": "f32",
        "bits": [0x00000000, 0x80000000, 0x00000001, 0x007FFFFF, 0x7F800000, 0xFF800000, 0x7FC00000],
    },
    {
        "name": "f32 length 7: NaN payloads and signs, smallest normal, largest finite of both signs",
        "dtype": "f32",
        "bits": [0x7FC00001, 0xFFC00000, 0x3F800000, 0x00800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x40400000],
    },
    {"name": "f32 no finite element: NaN, -inf", "dtype": "f32", "bits": [0x7FC00000, 0xFF800000]},
    {"name": "f32 length 64, pseudo-random", "dtype": "f32", "bits": random_bits(64, "f32", 1)},
    {
        "name": "f32 length 576 (SmolLM2's hidden size), pseudo-random",
        "dtype": "f32",
        "bits": random_bits(576, "f32", 2),
    },
    # bf16
    {
        "name": "bf16 worked example of docs/trace-format.md 8.2",
        "dtype": "bf16",
        "bits": [0x3F80, 0xC020, 0x0000, 0x3E00],
    },
    {"name": "bf16 empty row (length 0)", "dtype": "bf16", "bits": []},
    {"name": "bf16 length 1: 1.0", "dtype": "bf16", "bits": [0x3F80]},
    {
        "name": "bf16 length 7: +0, -0, smallest and largest subnormal, +inf, -inf, quiet NaN",
        "dtype": "bf16",
        "bits": [0x0000, 0x8000, 0x0001, 0x007F, 0x7F80, 0xFF80, 0x7FC0],
    },
    {"name": "bf16 length 64, pseudo-random", "dtype": "bf16", "bits": random_bits(64, "bf16", 3)},
    {"name": "bf16 length 576, pseudo-random", "dtype": "bf16", "bits": random_bits(576, "bf16", 4)},
    # f16
    {
        "name": "f16 worked example values of docs/trace-format.md 8.2",
        "dtype": "f16",
        "bits": [0x3C00, 0xC100, 0x0000, 0x3000],
    },
    {"name": "f16 empty row (length 0)", "dtype": "f16", "bits": []},
    {"name": "f16 length 1: 65504, the largest finite f16", "dtype": "f16", "bits": [0x7BFF]},
    {
        "name": "f16 length 7: +0, -0, smallest and largest subnormal, +inf, -inf, quiet NaN",
        "dtype": "f16",
        "bits": [0x0000, 0x8000, 0x0001, 0x03FF, 0x7C00, 0xFC00, 0x7E00],
    },
    {"name": "f16 length 64, pseudo-random", "dtype": "f16", "bits": random_bits(64, "f16", 5)},
    {"name": "f16 length 576, pseudo-random", "dtype": "f16", "bits": random_bits(576, "f16", 6)},
]

#: Hashes published in docs/trace-format.md (section 8): the generator checks itself against them.
PUBLISHED = {
    "f32 worked example of docs/trace-format.md 8.2": 7090992677395812351,
    "bf16 worked example of docs/trace-format.md 8.2": 3795356799443189753,
    "f32 empty row (length 0)": 17241709254077376921,
}


def build() -> Dict[str, Any]:
    rows = []
    for row in ROWS:
        values = [value_of(b, row["dtype"]) for b in row["bits"]]
        h = xxhash.xxh64_intdigest(row_bytes(row["bits"], row["dtype"]), seed=0)
        if row["name"] in PUBLISHED and PUBLISHED[row["name"]] != h:
            raise SystemExit(f"{row['name']}: hash {h} is not the published {PUBLISHED[row['name']]}")
        rows.append({**row, "values": [_json_float(v) for v in values], "hash": h, "stats": stats(values)})
    return {"comment": LAYOUT, "format_version": 1, "rows": rows}


def main() -> int:
    out = (
        Path(sys.argv[1])
        if len(sys.argv) > 1
        else Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "row-hashes.json"
    )
    data = build()
    rows = ",\n".join("  " + json.dumps(r, allow_nan=False) for r in data["rows"])
    text = (
        "{\n"
        f' "comment": {json.dumps(data["comment"])},\n'
        f' "format_version": {data["format_version"]},\n'
        f' "rows": [\n{rows}\n ]\n'
        "}\n"
    )
    json.loads(text)  # well-formed
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
