"""Shared fixtures: tiny random-weight models built in the test (no download), the driftscope binary."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Sequence

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]

# The shapes of the tiny models: 2 layers, hidden 64, 4 heads of 16, 2 KV heads, ffn 128, vocab 300.
TINY = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
N_LAYERS = 2
PER_LAYER_POINTS = 13  # x_in attn_norm q k v attn_ctx attn_out x_mid mlp_norm gate up act mlp_out
GLOBAL_POINTS = 3  # embed_out final_norm logits
POINTS_PER_PROMPT = N_LAYERS * PER_LAYER_POINTS + GLOBAL_POINTS

WORDS = ["[UNK]", "[PAD]"] + "the capital of france is paris and a language model answers question".split()


def tiny_model(kind: str = "llama", seed: int = 0) -> nn.Module:
    """A tiny random-weight causal LM of the given transformers model type, eval mode, fixed seed."""
    import transformers

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
    }
    config_cls, model_cls = classes[kind]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**TINY))
    # Random init has std 0.02 and zero biases: scale the weights up so activations are not all
    # tiny, and give biases (Qwen2's q/k/v) values of their own.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
            elif "norm" not in name:
                p.mul_(5.0)
    return model.eval()


def tiny_tokenizer() -> Any:
    """A word-level tokenizer over WORDS (ids 0..len(WORDS)-1)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


@pytest.fixture(scope="session")
def llama() -> nn.Module:
    return tiny_model("llama")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama saved as a checkpoint directory (safetensors) with a word-level tokenizer."""
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def write_prompts(path: Path, prompts: Sequence[Dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts), encoding="utf-8")
    return path


# Three prompts of 1, 7 and 23 tokens (a one-token prompt is its own edge case: decode0 = prefill).
PROMPTS: List[Dict[str, Any]] = [
    {"id": "p_one", "token_ids": [17]},
    {"id": "p_seven", "token_ids": [5, 9, 33, 7, 120, 64, 2]},
    {"id": "p_long", "token_ids": [(i * 37 + 11) % 300 for i in range(23)]},
]


@pytest.fixture()
def prompts_file(tmp_path: Path) -> Path:
    return write_prompts(tmp_path / "prompts.jsonl", PROMPTS)


def read_trace(path: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def stage_events(path: Path) -> List[Dict[str, Any]]:
    return [e for e in read_trace(path) if e["event"] == "stage_trace"]


@pytest.fixture(scope="session")
def driftscope_bin() -> Path:
    """The driftscope binary ($DRIFTSCOPE_BIN, else target/debug/driftscope): skipped when absent,
    except in CI (env CI set), where its absence fails the test."""
    path = Path(os.environ.get("DRIFTSCOPE_BIN") or REPO / "target" / "debug" / "driftscope")
    if not (path.is_file() and os.access(path, os.X_OK)):
        message = f"driftscope binary not found at {path} (build it with `cargo build`, or set DRIFTSCOPE_BIN)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def run_driftscope(binary: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=120)
