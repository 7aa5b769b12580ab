"""Writing the trace (JSON Lines) and the dump (safetensors) atomically.

Events go to a temporary file next to the trace; ``commit()`` writes the dump, then renames the
trace into place, so a reader never sees a half-written file and an existing trace is replaced
only by a complete one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Dict, Mapping, Optional, Sequence, Set, Tuple, Union

import torch

from .errors import InputError
from .hashing import dtype_name, json_stat, row_hash, row_stats
from .hooks import TracedRow

PathLike = Union[str, "os.PathLike[str]"]


def dump_path(trace: PathLike) -> Path:
    """The dump next to a trace: same name, extension ``.safetensors`` (``t.jsonl`` -> ``t.safetensors``)."""
    return Path(trace).with_suffix(".safetensors")


def _absolute(path: PathLike) -> Path:
    """The absolute, symlink-resolved form of a path whose file may not exist yet."""
    return Path(os.path.realpath(os.path.abspath(path)))


def check_outputs(inputs: Sequence[PathLike], outputs: Sequence[PathLike]) -> None:
    """Refuses an output that would overwrite an input or another output, or that is a directory."""
    seen: Dict[Path, PathLike] = {}
    ins = {_absolute(i): i for i in inputs}
    for out in outputs:
        abs_out = _absolute(out)
        if abs_out in ins:
            raise InputError(f"refusing to write {out} over the input {ins[abs_out]}")
        if abs_out in seen:
            raise InputError(f"two outputs name the same file {out} (the trace and its dump)")
        if abs_out.is_dir():
            raise InputError(f"{out} is a directory, not a file")
        if not abs_out.parent.is_dir():
            raise InputError(f"{out}: the directory {Path(out).parent} does not exist")
        seen[abs_out] = out


def tensor_name(row: TracedRow, point: str, layer: int) -> str:
    """The name of a row in the dump, as driftscope run writes it: ``prompt/phase/point/layer``."""
    return f"{row.prompt_id}/{row.phase}/{point}/{layer}"


def json_line(event: Mapping[str, Any]) -> str:
    """One event as a JSON line (no NaN/Infinity literals: they are not JSON)."""
    return json.dumps(event, separators=(",", ":"), allow_nan=False, ensure_ascii=False) + "\n"


def stage_trace_event(
    row: TracedRow, point: str, layer: int, values: torch.Tensor, tensor: Optional[str] = None
) -> Dict[str, Any]:
    """The stage_trace event of one row (values in their storage dtype)."""
    s = row_stats(values)
    event: Dict[str, Any] = {
        "event": "stage_trace",
        "prompt_id": row.prompt_id,
        "phase": row.phase,
        "point": point,
        "layer": int(layer),
        "step": int(row.step),
        "pos_id": int(row.pos_id),
        "seq_len": int(row.seq_len),
        "hash": row_hash(values),
        "min": json_stat(s.min),
        "max": json_stat(s.max),
        "mean": json_stat(s.mean),
        "dtype": dtype_name(values.dtype),
        "shape": [int(d) for d in values.shape],
        "numel": s.numel,
        "l2": json_stat(s.l2),
        "nan_count": s.nan_count,
        "inf_count": s.inf_count,
        "token_id": int(row.token_id),
    }
    if tensor is not None:
        event["tensor"] = tensor
    return event


def _temp_in(directory: Path, name: str) -> Tuple[int, str]:
    return tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=str(directory))


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Writes ``data`` to a temporary file in the same directory, then renames it to ``path``."""
    target = Path(path)
    fd, tmp = _temp_in(target.parent, target.name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        _make_ordinary(tmp)
        os.replace(tmp, target)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _make_ordinary(path: str) -> None:
    """mkstemp creates files readable by the owner only; results are ordinary files (umask applies)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class TraceWriter:
    """Writes a trace, and with ``dump=True`` the dump next to it; a RowSink for the Tracer.

    Use as a context manager: the files are put in place when the block ends normally, and
    nothing is left behind (the old files stay as they were) when it raises.
    """

    def __init__(self, path: PathLike, *, dump: bool = False) -> None:
        self.path = Path(path)
        self.dump_path: Optional[Path] = dump_path(self.path) if dump else None
        self.events = 0
        self._tensors: Dict[str, torch.Tensor] = {}
        self._keys: Set[Tuple[str, str, str, int]] = set()
        try:
            fd, self._tmp = _temp_in(self.path.parent, self.path.name)
        except OSError as e:
            raise InputError(f"{self.path}: cannot create a file next to it ({e.strerror or e})") from None
        self._file: Optional[IO[str]] = os.fdopen(fd, "w", encoding="utf-8", newline="\n")

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, exc_type: Optional[type], *exc: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def _write(self, event: Mapping[str, Any]) -> None:
        if self._file is None:
            raise ValueError(f"{self.path}: the trace is already committed or aborted")
        self._file.write(json_line(event))

    def write_meta(self, meta: Mapping[str, Any]) -> None:
        """Writes a run_meta event (``event`` is set here)."""
        self._write({"event": "run_meta", **{k: v for k, v in meta.items() if k != "event"}})

    def record(self, row: TracedRow, point: str, layer: int, values: torch.Tensor) -> None:
        """Writes the stage_trace event of one row (and keeps a copy of it for the dump)."""
        key = (row.prompt_id, row.phase, point, int(layer))
        if key in self._keys:
            raise ValueError(
                f"row traced twice: prompt `{row.prompt_id}`, phase `{row.phase}`, point `{point}`, layer {layer}"
            )
        self._keys.add(key)
        cpu = values.detach().to("cpu", copy=True).reshape(-1)
        name = None
        if self.dump_path is not None:
            name = tensor_name(row, point, layer)
            self._tensors[name] = cpu
        self._write(stage_trace_event(row, point, layer, cpu, name))
        self.events += 1

    @property
    def dumped_rows(self) -> int:
        """Rows held for the dump."""
        return len(self._tensors)

    def commit(self) -> None:
        """Writes the dump (if asked) and renames the trace into place."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        try:
            if self.dump_path is not None:
                from safetensors.torch import save

                atomic_write_bytes(self.dump_path, save(self._tensors))
            _make_ordinary(self._tmp)
            os.replace(self._tmp, self.path)
        except BaseException:
            _unlink_quietly(self._tmp)
            raise
        finally:
            self._tensors.clear()

    def abort(self) -> None:
        """Discards what was written; existing files are left as they were."""
        if self._file is not None:
            self._file.close()
            self._file = None
        _unlink_quietly(self._tmp)
        self._tensors.clear()
