"""The trace point vocabulary (docs/trace-format.md section 6) and the `--points`/`--layers` lists."""

from __future__ import annotations

from typing import List, Optional, Sequence, Set, Tuple

from .errors import InputError

#: Every point of trace format v1, in dataflow order (crates/trace/src/point.rs).
VOCABULARY: Tuple[str, ...] = (
    "embed_out",
    "x_in",
    "attn_norm",
    "q",
    "k",
    "v",
    "q_rope",
    "k_rope",
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
)

#: The points that exist once per model, not once per layer (written with ``"layer": 0``).
GLOBAL_POINTS = frozenset({"embed_out", "final_norm", "logits"})

#: Points no module hook reaches, and why.
UNREACHABLE = {
    "q_rope": "q after RoPE is computed inside the attention forward (apply_rotary_pos_emb), not by a module",
    "k_rope": "k after RoPE is computed inside the attention forward (apply_rotary_pos_emb), not by a module",
}

#: The points module hooks can trace, in dataflow order.
HOOKABLE: Tuple[str, ...] = tuple(p for p in VOCABULARY if p not in UNREACHABLE)


def is_per_layer(point: str) -> bool:
    """Whether ``point`` is traced once per layer."""
    return point not in GLOBAL_POINTS


def check_point(point: str, where: str) -> str:
    """Returns ``point`` if module hooks can trace it; otherwise raises InputError naming ``where``."""
    if point in UNREACHABLE:
        raise InputError(f"{where}: point `{point}` is not reachable by module hooks ({UNREACHABLE[point]})")
    if point not in VOCABULARY:
        raise InputError(f"{where}: unknown trace point `{point}` (known: {', '.join(HOOKABLE)})")
    return point


def parse_points(text: str) -> Optional[Tuple[str, ...]]:
    """``all`` (None), or a comma-separated list of points, in the order given, without repeats."""
    if text.strip() == "all":
        return None
    out: List[str] = []
    for name in (p.strip() for p in text.split(",")):
        if name and check_point(name, "--points") not in out:
            out.append(name)
    if not out:
        raise InputError("--points: no point given")
    return tuple(out)


def parse_layers(text: str, n_layers: int) -> Optional[Tuple[int, ...]]:
    """``all`` (None), or ``0,1,2,4,8`` / ``0-3,8``; every layer must exist. Sorted, without repeats."""
    if text.strip() == "all":
        return None
    out: Set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi if hi else lo)
        except ValueError:
            raise InputError(f"--layers: `{part}` is not a layer or range") from None
        if a < 0 or a > b or b >= n_layers:
            raise InputError(f"--layers: `{part}` is outside the model's layers 0-{n_layers - 1}")
        out.update(range(a, b + 1))
    if not out:
        raise InputError("--layers: no layer given")
    return tuple(sorted(out))


def check_layers(layers: Optional[Sequence[int]], n_layers: int) -> Optional[Tuple[int, ...]]:
    """Validates a layer list given through the library (None: all layers)."""
    if layers is None:
        return None
    out = tuple(sorted(set(int(layer) for layer in layers)))
    bad = [layer for layer in out if not 0 <= layer < n_layers]
    if bad or not out:
        raise InputError(f"layers {list(layers)}: the model has layers 0-{n_layers - 1}")
    return out
