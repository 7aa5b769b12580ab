"""The run_meta event: versions, device, dtype, attention implementation, determinism flags."""

from __future__ import annotations

import datetime
import os
import platform
import socket
import sys
from typing import Any, Dict, Optional

import torch
from torch import nn

from . import __version__

#: The cuBLAS workspace setting that deterministic cuBLAS needs (set before CUDA starts).
CUBLAS_WORKSPACE = ":4096:8"


def enable_deterministic() -> None:
    """torch.use_deterministic_algorithms(True), deterministic cuDNN, and the cuBLAS workspace env.

    Call before the first CUDA operation: cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it starts.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def deterministic_flags() -> Dict[str, Any]:
    """The current settings that decide whether PyTorch picks deterministic kernels."""
    return {
        "use_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG", ""),
        "cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
    }


def device_name(device: torch.device) -> str:
    """``cpu (<processor>, N threads)`` or the GPU's name, e.g. ``NVIDIA H100 80GB HBM3``."""
    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    if device.type == "cpu":
        return f"cpu ({_cpu_model()}, {torch.get_num_threads()} threads)"
    return str(device)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name") and ":" in line:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (cpu for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The dtype of the model's first floating-point parameter."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def run_meta(
    model: nn.Module,
    *,
    model_desc: Optional[str] = None,
    command: Optional[str] = None,
    n_layers: Optional[int] = None,
    extra: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """The run_meta event of a trace of ``model`` (trace format section 5) plus the adapter's fields."""
    import transformers

    from .hashing import DTYPE_NAMES

    config = getattr(model, "config", None)
    device = model_device(model)
    dtype = model_dtype(model)
    flags = deterministic_flags()
    layers = n_layers if n_layers is not None else getattr(config, "num_hidden_layers", None)
    dtype_name = DTYPE_NAMES.get(dtype, str(dtype)) if dtype is not None else "unknown"
    meta: Dict[str, Any] = {
        "event": "run_meta",
        "format_version": 1,
        "engine": f"driftscope-torch {__version__} "
        f"(transformers {transformers.__version__}, torch {torch.__version__})",
        "model": model_desc or str(getattr(config, "_name_or_path", "") or type(model).__name__),
        "dtype": dtype_name,
        # transformers keeps the KV cache, the weights and the matmuls' inputs in the model's dtype.
        "kv_cache_dtype": dtype_name,
        "weight_dtype": dtype_name,
        "matmul_input_dtype": dtype_name,
        "device": device_name(device),
        "host": socket.gethostname(),
        "profile": "deterministic" if flags["use_deterministic_algorithms"] else "default",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command if command is not None else " ".join(sys.argv),
        "run_mode": f"single process, {device.type}",
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "model_type": str(getattr(config, "model_type", "") or type(model).__name__),
        "attn_implementation": str(getattr(config, "_attn_implementation", None) or "unknown"),
        "torch_num_threads": torch.get_num_threads(),
        "deterministic": flags,
    }
    if layers is not None:
        meta["n_layers"] = int(layers)
    if extra:
        meta.update(extra)
    return meta
