"""Prompt files, as ``driftscope run --prompts`` reads them (crates/engine/src/prompts.rs).

JSON Lines of ``{"id": "...", "text": "..."}`` or ``{"id": "...", "token_ids": [...]}``; blank
lines are skipped. Text is encoded without special tokens (no BOS), as the Rust engine does; give
``token_ids`` to control the exact ids. Every problem names ``FILE:LINE``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

from .errors import InputError


@dataclass(frozen=True)
class Prompt:
    """A prompt as token ids (both phases see exactly these ids)."""

    id: str
    token_ids: Tuple[int, ...]


@dataclass(frozen=True)
class PromptLine:
    """One line of a prompt file, before tokenization."""

    id: str
    text: Optional[str]
    token_ids: Optional[Tuple[int, ...]]
    where: str


def _parse_line(raw: str, where: str) -> PromptLine:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a JSON object with `id` and `text` or `token_ids`")
    unknown = sorted(set(data) - {"id", "text", "token_ids"})
    if unknown:
        raise InputError(f"{where}: unknown field `{unknown[0]}` (expected `id` and `text` or `token_ids`)")
    pid = data.get("id")
    if not isinstance(pid, str):
        raise InputError(f"{where}: `id` must be a string" if "id" in data else f"{where}: missing field `id`")
    text = data.get("text")
    ids = data.get("token_ids")
    if (text is None) == (ids is None):
        raise InputError(f"{where}: give exactly one of `text` and `token_ids`")
    if text is not None and not isinstance(text, str):
        raise InputError(f"{where}: `text` must be a string")
    token_ids = None
    if ids is not None:
        if not isinstance(ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= 0xFFFFFFFF for t in ids
        ):
            raise InputError(f"{where}: `token_ids` must be a list of unsigned integers")
        token_ids = tuple(ids)
    if text == "" or token_ids == ():
        raise InputError(f"{where}: prompt `{pid}` has no tokens")
    return PromptLine(pid, text, token_ids, where)


def read_prompt_lines(path: Union[str, Path]) -> List[PromptLine]:
    """Parses a prompt file (no tokenization yet); InputError naming FILE:LINE on any problem."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such prompts file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not a prompts file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read the prompts file ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        line = text_line_of_byte(Path(path), e.start)
        raise InputError(f"{path}:{line}: not valid UTF-8") from None
    lines: List[PromptLine] = []
    seen: Dict[str, int] = {}
    for i, raw in enumerate(text.split("\n"), start=1):
        raw = raw[:-1] if raw.endswith("\r") else raw
        if not raw.strip():
            continue
        p = _parse_line(raw, f"{path}:{i}")
        if p.id in seen:
            raise InputError(f"{path}:{i}: prompt id `{p.id}` appears twice (first on line {seen[p.id]})")
        seen[p.id] = i
        lines.append(p)
    if not lines:
        raise InputError(f"{path}: no prompts in the file")
    return lines


def text_line_of_byte(path: Path, offset: int) -> int:
    """1-based line number of a byte offset in a file."""
    return path.read_bytes()[:offset].count(b"\n") + 1


def tokenize(lines: Sequence[PromptLine], tokenizer: Any, vocab_size: Optional[int]) -> List[Prompt]:
    """Token ids for each line; text needs a tokenizer. Ids must lie inside the vocabulary."""
    out: List[Prompt] = []
    for p in lines:
        if p.token_ids is not None:
            ids: Tuple[int, ...] = p.token_ids
        elif tokenizer is None:
            raise InputError(f"{p.where}: prompt `{p.id}` is text, but the model has no tokenizer; give `token_ids`")
        else:
            ids = tuple(int(t) for t in tokenizer(p.text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise InputError(f"{p.where}: prompt `{p.id}` has no tokens")
        if vocab_size is not None:
            bad = next((t for t in ids if t >= vocab_size), None)
            if bad is not None:
                raise InputError(
                    f"{p.where}: prompt `{p.id}`: token id {bad} is outside the vocabulary (size {vocab_size})"
                )
        out.append(Prompt(p.id, ids))
    return out


def read_prompts(path: Union[str, Path], tokenizer: Any = None, vocab_size: Optional[int] = None) -> List[Prompt]:
    """Reads and tokenizes a prompt file."""
    return tokenize(read_prompt_lines(path), tokenizer, vocab_size)


def as_prompts(
    items: Iterable[Union[Prompt, Mapping[str, Any]]], tokenizer: Any = None, vocab_size: Optional[int] = None
) -> List[Prompt]:
    """Prompts given in code: Prompt objects, or mappings like the lines of a prompt file."""
    lines: List[PromptLine] = []
    seen: Set[str] = set()
    for i, item in enumerate(items):
        where = f"prompts[{i}]"
        if isinstance(item, Prompt):
            p = PromptLine(item.id, None, tuple(item.token_ids), where)
        elif isinstance(item, Mapping):
            p = _parse_line(json.dumps(dict(item)), where)
        else:
            raise InputError(f"{where}: expected a Prompt or a mapping with `id` and `text` or `token_ids`")
        if p.id in seen:
            raise InputError(f"{where}: prompt id `{p.id}` appears twice")
        seen.add(p.id)
        lines.append(p)
    if not lines:
        raise InputError("no prompts given")
    return tokenize(lines, tokenizer, vocab_size)
