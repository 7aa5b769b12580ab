"""Loading a model and its tokenizer: a Hugging Face checkpoint directory, a .gguf file, or ``smollm2``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from .errors import InputError

#: ``--dtype`` names and their torch dtypes.
DTYPES: Dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "f32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "f16": torch.float16,
    "float16": torch.float16,
}

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """``$DRIFTSCOPE_CACHE``, else ``$XDG_CACHE_HOME/driftscope``, else ``~/.cache/driftscope``
    (the folder scripts/fetch-smollm2.sh fills)."""
    explicit = os.environ.get("DRIFTSCOPE_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "driftscope" if xdg else Path.home() / ".cache" / "driftscope"


def smollm2_path() -> Path:
    """Where scripts/fetch-smollm2.sh puts SmolLM2-135M-Instruct (Q4_1 GGUF)."""
    return cache_root() / "smollm2" / SMOLLM2_FILE


@dataclass(frozen=True)
class ModelSource:
    """A model on disk: the directory for from_pretrained and, for GGUF, the file inside it."""

    directory: Path
    gguf_file: Optional[str]
    desc: str

    @property
    def input_path(self) -> Path:
        """The file or directory read (outputs must not overwrite it)."""
        return self.directory / self.gguf_file if self.gguf_file else self.directory


def resolve_model(spec: str) -> ModelSource:
    """``smollm2``, a .gguf file or a checkpoint directory; InputError when it does not exist."""
    if spec == "smollm2":
        path = smollm2_path()
        if not path.is_file():
            raise InputError(
                f"SmolLM2 is not in the cache ({path.parent}); fetch it with `bash scripts/fetch-smollm2.sh`"
            )
        return ModelSource(path.parent, path.name, "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)")
    path = Path(spec)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise InputError(f"{spec}: a model file must be .gguf (or give a checkpoint directory with config.json)")
        return ModelSource(path.parent, path.name, path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"{spec}: no config.json in this directory (not a transformers checkpoint)")
        return ModelSource(path, None, path.name or spec)
    raise InputError(f"{spec}: no such model file or directory (or use `smollm2`)")


def load_model(source: ModelSource, dtype: torch.dtype, attn: str, device: str) -> Tuple[nn.Module, Any]:
    """The model (eval mode, on ``device``, weights in ``dtype``) and its tokenizer (None if it has none)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: Dict[str, Any] = {"dtype": dtype, "attn_implementation": attn}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    try:
        model: nn.Module = AutoModelForCausalLM.from_pretrained(str(source.directory), **kwargs)
    except Exception as e:  # noqa: BLE001 - whatever a broken checkpoint raises (safetensors, gguf, config errors)
        raise InputError(f"{source.input_path}: cannot load the model: {_first_line(e)}") from None
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError) as e:
        raise InputError(f"--device {device}: {_first_line(e)}") from None
    model.eval()
    tok_kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.directory), **tok_kwargs)
    except (OSError, ValueError, KeyError, TypeError):
        tokenizer = None  # prompts must then give token_ids
    return model, tokenizer


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
