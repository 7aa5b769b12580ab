"""driftscope_torch: trace Hugging Face transformers models in driftscope's trace format.

Forward hooks record, for each traced row, the xxh64 hash and statistics that driftscope pairs
between a prefill and a decode (or batched, chunked, ...) computation of the same token.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import InputError
from .hashing import RowStats, row_bytes, row_hash, row_stats
from .hooks import RowSink, TracedRow, Tracer
from .meta import enable_deterministic, run_meta
from .phases import Phase, run_phase, trace_prompts
from .pointmap import LLAMA_FAMILY, Hook, PointMap
from .points import HOOKABLE, VOCABULARY
from .prompts import Prompt, read_prompts
from .writer import TraceWriter, dump_path

__all__ = [
    "HOOKABLE",
    "LLAMA_FAMILY",
    "VOCABULARY",
    "Hook",
    "InputError",
    "Phase",
    "PointMap",
    "Prompt",
    "RowSink",
    "RowStats",
    "TraceWriter",
    "TracedRow",
    "Tracer",
    "__version__",
    "dump_path",
    "enable_deterministic",
    "read_prompts",
    "row_bytes",
    "row_hash",
    "row_stats",
    "run_meta",
    "run_phase",
    "trace_prompts",
]
