"""Row hash and statistics, defined as in docs/trace-format.md sections 8 and 9.

- hash: xxh64, seed 0, of the row's bytes in its storage dtype (f32, bf16 or f16), little-endian,
  elements contiguous in row-major order.
- statistics: over the finite elements widened to float64 (exact), summed in element order as
  driftscope's reference implementation does, so that mean and l2 agree with it bit for bit.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Dict, Union

import numpy as np
import torch
import xxhash

if sys.byteorder != "little":  # numpy's tobytes() writes the host's byte order
    raise ImportError("driftscope_torch hashes rows through the host's byte order and needs a little-endian host")

#: Storage dtypes a row may have, and their names in traces.
DTYPE_NAMES: Dict[torch.dtype, str] = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}

#: A statistic as written in JSON: a finite number, or "NaN" / "Infinity" / "-Infinity".
JsonStat = Union[float, str]


def dtype_name(dtype: torch.dtype) -> str:
    """``f32``, ``bf16`` or ``f16``; TypeError for any other dtype."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise TypeError(f"unsupported storage dtype {dtype} (trace rows are f32, bf16 or f16)") from None


def row_bytes(row: torch.Tensor) -> bytes:
    """The row's bytes in its storage dtype, little-endian, contiguous, flattened row-major."""
    dtype_name(row.dtype)
    flat = row.detach().reshape(-1).contiguous()
    if flat.dtype in (torch.bfloat16, torch.float16):
        flat = flat.view(torch.int16)  # the raw 16-bit patterns: numpy has no bfloat16
    return flat.cpu().numpy().tobytes()


def row_hash(row: torch.Tensor) -> int:
    """xxh64 (seed 0) of the row in its storage dtype: the ``hash`` field of a stage_trace event."""
    return xxhash.xxh64_intdigest(row_bytes(row), seed=0)


@dataclass(frozen=True)
class RowStats:
    """Statistics of one row (trace format section 9); NaN when the row has no finite element."""

    min: float
    max: float
    mean: float
    l2: float
    numel: int
    nan_count: int
    inf_count: int


def row_stats(row: torch.Tensor) -> RowStats:
    """Statistics over the finite elements, widened exactly to float64, summed in element order."""
    dtype_name(row.dtype)
    v = row.detach().reshape(-1).cpu().to(torch.float64).numpy()
    finite_mask = np.isfinite(v)
    finite = v[finite_mask]
    nan_count = int(np.isnan(v).sum())
    inf_count = int(v.size - finite.size - nan_count)
    if finite.size == 0:
        lo = hi = mean = l2 = math.nan
    else:
        lo, hi = float(finite.min()), float(finite.max())
        # np.cumsum accumulates strictly left to right (np.sum would sum pairwise).
        # 0.0 + ...: the reference sum starts from +0.0, so a row of -0.0 has mean +0.0 as there.
        mean = (0.0 + float(np.cumsum(finite)[-1])) / finite.size
        l2 = math.sqrt(float(np.cumsum(finite * finite)[-1]))
    return RowStats(lo, hi, mean, l2, int(v.size), nan_count, inf_count)


def json_stat(x: float) -> JsonStat:
    """A statistic as JSON: the number, or "NaN" / "Infinity" / "-Infinity" (JSON has no literals)."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return float(x)
