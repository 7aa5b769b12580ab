"""Forward hooks that hand the traced rows of a forward call to a sink.

The tracer registers one hook per (point, layer) of the point map. Between forward calls it is
idle; inside ``with tracer.tracing(rows):`` every hook picks the rows named there out of its
``[batch, seq, features]`` tensor and passes them to the sink. Hooks only read: they never
return a value, so the model's outputs are bit for bit those of the model without hooks.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple

import torch
from torch import nn

from .pointmap import INPUT, PointMap, ResolvedHook, decoder_layers, point_map_for, resolve
from .points import check_layers, check_point


@dataclass(frozen=True)
class TracedRow:
    """One row to trace in the next forward call, and what it is.

    ``batch_index``/``seq_index`` locate the row in the call's ``[batch, seq, ...]`` tensors; the
    other fields are written into its events (trace format section 2).
    """

    prompt_id: str
    phase: str
    step: int
    pos_id: int
    seq_len: int
    token_id: int
    seq_index: int
    batch_index: int = 0


class RowSink(Protocol):
    """Receives each traced row (e.g. driftscope_torch.writer.TraceWriter)."""

    def record(self, row: TracedRow, point: str, layer: int, values: torch.Tensor) -> None:
        """``values``: the row, detached, in the model's storage dtype, possibly on the GPU."""


def _first_tensor(value: Any) -> Optional[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


class Tracer:
    """Registers trace hooks on ``model``; use as a context manager (hooks are removed on exit).

    ``point_map``: None for the default map of Llama-family models; ``layers``/``points``: None
    for all. Example::

        with TraceWriter("trace.jsonl") as w, Tracer(model, w) as tracer:
            with tracer.tracing([TracedRow("p0", "prefill_last", 0, n - 1, n, ids[-1], n - 1)]):
                model(torch.tensor([ids]))
    """

    def __init__(
        self,
        model: nn.Module,
        sink: RowSink,
        *,
        point_map: Optional[PointMap] = None,
        layers: Optional[Sequence[int]] = None,
        points: Optional[Sequence[str]] = None,
    ) -> None:
        self.model = model
        self.sink = sink
        self.point_map = point_map_for(model, point_map)
        self.n_layers = len(decoder_layers(model, self.point_map)) if self.point_map.layers else _config_layers(model)
        self.layers = check_layers(layers, self.n_layers) if layers is not None else None
        self.points = tuple(dict.fromkeys(check_point(p, "points") for p in points)) if points is not None else None
        self.hooks: List[ResolvedHook] = resolve(model, self.point_map, self.points, self.layers)
        self._rows: Tuple[TracedRow, ...] = ()
        self._handles: List[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "Tracer":
        self.register()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def register(self) -> None:
        """Registers the hooks (done by ``with``)."""
        if self._handles:
            return
        for h in self.hooks:
            if h.io == INPUT:
                handle = h.module.register_forward_pre_hook(self._input_hook(h.point, h.layer), with_kwargs=True)
            else:
                handle = h.module.register_forward_hook(self._output_hook(h.point, h.layer))
            self._handles.append(handle)

    def remove(self) -> None:
        """Removes the hooks (done at the end of ``with``)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextmanager
    def tracing(self, rows: Sequence[TracedRow]) -> Iterator[None]:
        """Traces ``rows`` in the forward calls made inside the block."""
        previous = self._rows
        self._rows = tuple(rows)
        try:
            yield
        finally:
            self._rows = previous

    def _emit(self, point: str, layer: int, tensor: Optional[torch.Tensor]) -> None:
        if not self._rows:
            return
        if tensor is None or tensor.dim() != 3:
            got = "no tensor" if tensor is None else f"a tensor of shape {list(tensor.shape)}"
            raise RuntimeError(
                f"trace point `{point}` (layer {layer}): expected a [batch, seq, features] tensor, got {got}; "
                "check the point map"
            )
        for row in self._rows:
            self.sink.record(row, point, layer, tensor[row.batch_index, row.seq_index].detach())

    def _input_hook(self, point: str, layer: int) -> Callable[[nn.Module, Tuple[Any, ...], Dict[str, Any]], None]:
        def hook(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
            if not self._rows:
                return None
            value = args[0] if args else kwargs.get("hidden_states", kwargs.get("input"))
            self._emit(point, layer, _first_tensor(value))
            return None

        return hook

    def _output_hook(self, point: str, layer: int) -> Callable[[nn.Module, Tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, args: Tuple[Any, ...], output: Any) -> None:
            if self._rows:
                self._emit(point, layer, _first_tensor(output))
            return None

        return hook


def _config_layers(model: nn.Module) -> int:
    return int(getattr(getattr(model, "config", None), "num_hidden_layers", 0) or 0)
