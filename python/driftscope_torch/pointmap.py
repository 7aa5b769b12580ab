"""Which module hook gives which trace point.

A point map says where the decoder layers are (``layers``, the path of their ModuleList) and, for
each point, which module's input or output holds it. Per-layer points name a module relative to
a decoder layer (``""`` is the layer itself); the model-global points ``embed_out``,
``final_norm`` and ``logits`` name a module relative to the model. As a string a hook is
``"<module path>:<input|output>"``, e.g. ``"self_attn.o_proj:input"`` or ``":input"``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from torch import nn

from .errors import InputError
from .points import check_point, is_per_layer

INPUT = "input"
OUTPUT = "output"


@dataclass(frozen=True)
class Hook:
    """A module (path relative to the layer, or to the model for global points) and which side."""

    module: str
    io: str

    def __post_init__(self) -> None:
        if self.io not in (INPUT, OUTPUT):
            raise InputError(f"hook `{self.module}:{self.io}`: the side must be `input` or `output`")

    @classmethod
    def parse(cls, text: str, where: str = "point map") -> "Hook":
        """``"mlp.down_proj:input"`` -> Hook("mlp.down_proj", "input")."""
        module, sep, io = text.rpartition(":")
        if not sep or io not in (INPUT, OUTPUT):
            raise InputError(f"{where}: `{text}` is not `<module path>:input` or `<module path>:output`")
        return cls(module, io)

    def __str__(self) -> str:
        return f"{self.module}:{self.io}"


HookLike = Union[Hook, str]


@dataclass(frozen=True)
class PointMap:
    """``layers``: the path of the decoder layers' ModuleList; ``points``: point -> hook."""

    layers: str
    points: Mapping[str, Hook]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "point map") -> "PointMap":
        """From ``{"layers": "model.layers", "points": {"x_in": ":input", ...}}``."""
        if not isinstance(data, Mapping):
            raise InputError(f"{where}: expected an object with `layers` and `points`")
        unknown = sorted(set(data) - {"layers", "points", "comment"})
        if unknown:
            raise InputError(f"{where}: unknown key(s) {', '.join(unknown)} (expected `layers` and `points`)")
        layers = data.get("layers", "")
        points = data.get("points")
        if not isinstance(layers, str):
            raise InputError(f"{where}: `layers` must be a module path string")
        if not isinstance(points, Mapping) or not points:
            raise InputError(f"{where}: `points` must be a non-empty object mapping point names to hooks")
        hooks: Dict[str, Hook] = {}
        for point, hook in points.items():
            check_point(point, where)
            if isinstance(hook, Hook):
                hooks[point] = hook
            elif isinstance(hook, str):
                hooks[point] = Hook.parse(hook, f"{where}: point `{point}`")
            else:
                raise InputError(f"{where}: point `{point}`: the hook must be a string like `mlp.down_proj:input`")
        if not layers and any(is_per_layer(p) for p in hooks):
            raise InputError(f"{where}: per-layer points need `layers`, the path of the decoder layers")
        return cls(layers, hooks)

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "PointMap":
        """Reads a JSON point map file."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise InputError(f"{path}: cannot read the point map ({e.strerror or e})") from None
        except UnicodeDecodeError:
            raise InputError(f"{path}: the point map is not UTF-8 text") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
        return cls.from_dict(data, str(path))

    def to_dict(self) -> Dict[str, Any]:
        """The JSON form (inverse of from_dict)."""
        return {"layers": self.layers, "points": {p: str(h) for p, h in self.points.items()}}


#: Llama-family decoder layers (Llama, Mistral, Qwen2; SmolLM is Llama) in Hugging Face transformers.
LLAMA_FAMILY = PointMap(
    layers="model.layers",
    points={
        "embed_out": Hook("model.embed_tokens", OUTPUT),
        "x_in": Hook("", INPUT),
        "attn_norm": Hook("input_layernorm", OUTPUT),
        "q": Hook("self_attn.q_proj", OUTPUT),
        "k": Hook("self_attn.k_proj", OUTPUT),
        "v": Hook("self_attn.v_proj", OUTPUT),
        "attn_ctx": Hook("self_attn.o_proj", INPUT),
        "attn_out": Hook("self_attn.o_proj", OUTPUT),
        "x_mid": Hook("post_attention_layernorm", INPUT),
        "mlp_norm": Hook("post_attention_layernorm", OUTPUT),
        "gate": Hook("mlp.gate_proj", OUTPUT),
        "up": Hook("mlp.up_proj", OUTPUT),
        "act": Hook("mlp.down_proj", INPUT),
        "mlp_out": Hook("mlp.down_proj", OUTPUT),
        "final_norm": Hook("model.norm", OUTPUT),
        "logits": Hook("lm_head", OUTPUT),
    },
)

#: Model types (``config.model_type``) whose layers LLAMA_FAMILY describes.
DEFAULT_MODEL_TYPES: Tuple[str, ...] = ("llama", "mistral", "qwen2")


def model_type(model: nn.Module) -> str:
    """``config.model_type`` of a transformers model, or the class name."""
    config = getattr(model, "config", None)
    return str(getattr(config, "model_type", None) or type(model).__name__)


def point_map_for(model: nn.Module, custom: Optional[PointMap] = None) -> PointMap:
    """The custom map if given, else the default map of the model's type (InputError if none)."""
    if custom is not None:
        return custom
    kind = model_type(model)
    if kind not in DEFAULT_MODEL_TYPES:
        raise InputError(
            f"model type `{kind}` has no default point map (known: {', '.join(DEFAULT_MODEL_TYPES)}); "
            "give one that names its modules (--point-map FILE.json, or point_map= in the library)"
        )
    return LLAMA_FAMILY


def _submodule(root: nn.Module, path: str, where: str) -> nn.Module:
    if not path:
        return root
    try:
        return root.get_submodule(path)
    except AttributeError:
        raise InputError(f"{where}: the model has no module `{path}`") from None


@dataclass(frozen=True)
class ResolvedHook:
    """One hook to register: the module, which side, the point and its layer (0 for global points)."""

    module: nn.Module
    io: str
    point: str
    layer: int


def decoder_layers(model: nn.Module, pmap: PointMap) -> List[nn.Module]:
    """The decoder layers named by ``pmap.layers`` (empty when the map has no per-layer point)."""
    if not pmap.layers:
        return []
    layers = _submodule(model, pmap.layers, "point map `layers`")
    if not isinstance(layers, (nn.ModuleList, nn.Sequential)):
        raise InputError(f"point map `layers`: `{pmap.layers}` is a {type(layers).__name__}, not a list of layers")
    return list(layers)


def resolve(
    model: nn.Module,
    pmap: PointMap,
    points: Optional[Tuple[str, ...]] = None,
    layers: Optional[Tuple[int, ...]] = None,
) -> List[ResolvedHook]:
    """The hooks for the chosen points (None: every mapped point) and layers (None: all)."""
    if points is None:
        chosen = [p for p in pmap.points]
    else:
        missing = [p for p in points if p not in pmap.points]
        if missing:
            raise InputError(f"points {', '.join(missing)} are not in the point map (mapped: {', '.join(pmap.points)})")
        chosen = list(points)
    blocks = decoder_layers(model, pmap)
    layer_ids = range(len(blocks)) if layers is None else layers
    out: List[ResolvedHook] = []
    for point in chosen:
        hook = pmap.points[point]
        where = f"point map: `{point}` -> `{hook}`"
        if is_per_layer(point):
            for i in layer_ids:
                if i >= len(blocks):
                    raise InputError(f"layer {i}: the model has {len(blocks)} layers")
                out.append(ResolvedHook(_submodule(blocks[i], hook.module, f"{where} (layer {i})"), hook.io, point, i))
        else:
            out.append(ResolvedHook(_submodule(model, hook.module, where), hook.io, point, 0))
    return out
