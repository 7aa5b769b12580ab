#!/usr/bin/env python3
"""Independent numpy reference forward pass of a GGUF Llama model (the oracle
for driftscope's Rust engine).

Usage:
    python3 -m pip install -r scripts/requirements-reference.txt
    scripts/fetch-smollm2.sh          # puts the model in the cache
    python3 scripts/reference_logits.py [path/to/model.gguf] [--out FILE]

Default model: the path scripts/fetch-smollm2.sh uses,
    ${DRIFTSCOPE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/driftscope}/smollm2/
        SmolLM2-135M-Instruct.Q4_1.gguf
Default output (relative to the repository root):
    crates/engine/tests/golden/smollm2_reference.json

Dependencies (pinned in scripts/requirements-reference.txt):
    gguf==0.19.0   (GGUFReader for metadata/tensors, gguf.quants.dequantize)
    numpy          (tested with 2.4.6)

What it computes, following llama.cpp's graph for GGUF `llama` models:
  x = token_embd[ids]
  per layer: h = x + Wo . attn(rope(Wq rms(x)), rope(Wk rms(x)), Wv rms(x))
             x = h + Wdown (silu(Wgate rms(h)) * Wup rms(h))
  logits = Wout rms(x)   (Wout = output.weight, or token_embd.weight if tied)
  rms(v) = v / sqrt(mean(v^2) + eps) * weight
  RoPE: llama.cpp NORMAL mode, rotating adjacent pairs (2i, 2i+1) with
        theta_i = pos * freq_base^(-2i/head_dim) (the GGUF converter permutes
        HF's q/k rows so that this form is right).
  Attention: causal, grouped-query (head h uses kv head h // (n_head/n_head_kv)),
        scale 1/sqrt(head_dim), softmax in float64.
Weights are dequantized with gguf-py to float32 (cross-checked against an
independent numpy dequantizer for Q4_0/Q4_1/Q8_0 in this file) and all
arithmetic is done in float64. llama.cpp itself quantizes activations to
Q8 for quantized matmuls on CPU, so its logits differ slightly from these;
this script is the high-precision ideal for the same dequantized weights.

Check on SmolLM2-135M-Instruct Q4_1, prompt ids [504, 3575, 282, 4649, 314]:
top token 7042 (" Paris") with logit 17.3713, greedy " Paris.\n\nThe answer".
(NEOX-style RoPE, rotating halves, also ranks " Paris" first but at ~18.28,
so the logit value, not only the argmax, confirms the NORMAL pairing.)

Weight layout: GGUF lists a 2-D tensor's dims as [in, out] (ne0 = row length);
gguf-py returns numpy arrays with the reversed shape [out, in], row-major, so
y = W @ x. This is asserted on the shapes below.

Tokenization is not needed (inputs are token ids), but a small GPT-2 byte-level
BPE for ASCII text using the GGUF vocab/merges is included to confirm the
prompt ids (smollm pre-tokenizer: every digit split, then the GPT-2 regex).
"""

import argparse
import hashlib
import importlib.metadata
import json
import math
import os
import re
import sys
import time

import numpy as np

try:
    import gguf
    from gguf import GGUFReader
    from gguf.quants import dequantize as gguf_dequantize
except ImportError:  # pragma: no cover
    sys.exit("reference_logits: the `gguf` package is missing; run:\n"
             "  python3 -m pip install -r scripts/requirements-reference.txt")

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT_TEXT = "The capital of France is"
PROMPT_IDS = [504, 3575, 282, 4649, 314]
EXPECTED_TOP = 7042          # " Paris"
N_GREEDY = 6
TOKENIZER_CHECKS = {"The capital of France is": PROMPT_IDS, "Hello world": [19556, 905]}
N_VALUES = 40                 # dequantized values per row in the JSON
N_RESID = 8                   # residual-stream values per check point


def repo_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_model_path():
    cache = os.environ.get("DRIFTSCOPE_CACHE")
    if not cache:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        cache = os.path.join(xdg, "driftscope")
    return os.path.join(cache, "smollm2", MODEL_FILE)


# ---------------------------------------------------------------- metadata

def field_value(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------- independent dequantizer
# Straight from ggml's block layouts (QK = 32 elements per block):
#   Q4_0: f16 d, 16 bytes qs          -> x = (q - 8) * d
#   Q4_1: f16 d, f16 m, 16 bytes qs   -> x = q * d + m
#   Q8_0: f16 d, 32 x int8 qs         -> x = q * d
# For Q4_x, element j < 16 is the low nibble of qs[j], element j + 16 the high
# nibble. Computed in float32. The product q * d is exact in float32 (an f16
# with 11 significant bits times an integer of at most 8 bits), so the result
# is bit-identical whether or not an implementation fuses q * d + m into an FMA.

def own_dequantize(raw, ttype, n_per_row):
    raw = np.ascontiguousarray(raw)
    rows = raw.shape[0]
    raw = raw.view(np.uint8).reshape(rows, -1)
    nb = n_per_row // 32
    if ttype == gguf.GGMLQuantizationType.F32:
        return raw.view(np.float32).reshape(rows, n_per_row)
    if ttype == gguf.GGMLQuantizationType.F16:
        return raw.view(np.float16).astype(np.float32).reshape(rows, n_per_row)
    if ttype == gguf.GGMLQuantizationType.Q8_0:
        b = raw.reshape(rows, nb, 34)
        d = b[:, :, 0:2].copy().view(np.float16).astype(np.float32)
        q = b[:, :, 2:34].copy().view(np.int8).astype(np.float32)
        return (q * d).reshape(rows, n_per_row)
    if ttype in (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1):
        bs = 18 if ttype == gguf.GGMLQuantizationType.Q4_0 else 20
        b = raw.reshape(rows, nb, bs)
        d = b[:, :, 0:2].copy().view(np.float16).astype(np.float32)
        qs = b[:, :, bs - 16:bs]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).astype(np.float32)
        if ttype == gguf.GGMLQuantizationType.Q4_0:
            out = (q - np.float32(8)) * d
        else:
            m = b[:, :, 2:4].copy().view(np.float16).astype(np.float32)
            out = q * d + m
        return out.reshape(rows, n_per_row)
    raise NotImplementedError(f"own dequantizer: {ttype.name}")


# ------------------------------------------------------------------ model

class Model:
    def __init__(self, path):
        self.reader = r = GGUFReader(path)
        arch = field_value(r, "general.architecture")
        if arch != "llama":
            sys.exit(f"reference_logits: expected a llama model, got {arch!r}")
        g = lambda k, d=None: field_value(r, "llama." + k, d)
        self.n_layer = int(g("block_count"))
        self.n_embd = int(g("embedding_length"))
        self.n_ff = int(g("feed_forward_length"))
        self.n_head = int(g("attention.head_count"))
        self.n_head_kv = int(g("attention.head_count_kv", self.n_head))
        self.rope_base = float(g("rope.freq_base", 10000.0))
        self.rms_eps = float(g("attention.layer_norm_rms_epsilon"))
        self.n_ctx_train = int(g("context_length"))
        self.head_dim = self.n_embd // self.n_head
        self.rope_dims = int(g("rope.dimension_count", self.head_dim))
        if self.rope_dims != self.head_dim:
            sys.exit("reference_logits: partial RoPE (rope.dimension_count != head_dim) is not implemented")
        if g("rope.scaling.type") not in (None, "none"):
            sys.exit("reference_logits: RoPE scaling is not implemented")
        self.tensors = {t.name: t for t in r.tensors}
        if "rope_freqs.weight" in self.tensors:
            sys.exit("reference_logits: rope_freqs.weight (llama3 rope) is not implemented")
        self.tokens = field_value(r, "tokenizer.ggml.tokens")
        self.n_vocab = int(g("vocab_size", len(self.tokens)))
        self.tied = "output.weight" not in self.tensors
        self._w = {}

    def raw(self, name):
        return self.tensors[name]

    def deq32(self, name):
        """float32 dequantized tensor, numpy shape [out, in] (or [n] for 1-D)."""
        t = self.tensors[name]
        a = gguf_dequantize(t.data, t.tensor_type)
        ne = [int(x) for x in t.shape]            # GGUF order: ne0 = row length
        expect = tuple(reversed(ne))
        a = np.asarray(a, dtype=np.float32).reshape(expect)
        return a

    def w(self, name):
        """float64 weight, cached."""
        if name not in self._w:
            self._w[name] = self.deq32(name).astype(np.float64)
        return self._w[name]

    def lm_head_name(self):
        return "token_embd.weight" if self.tied else "output.weight"

    def check_shapes(self):
        E, F, D = self.n_embd, self.n_ff, self.head_dim
        kv = self.n_head_kv * D
        exp = {"attn_q.weight": (E, E), "attn_k.weight": (kv, E), "attn_v.weight": (kv, E),
               "attn_output.weight": (E, E), "ffn_gate.weight": (F, E), "ffn_up.weight": (F, E),
               "ffn_down.weight": (E, F), "attn_norm.weight": (E,), "ffn_norm.weight": (E,)}
        for l in range(self.n_layer):
            for suffix, shape in exp.items():
                t = self.tensors[f"blk.{l}.{suffix}"]
                got = tuple(reversed([int(x) for x in t.shape]))
                assert got == shape, (t.name, got, shape)
        emb = tuple(reversed([int(x) for x in self.tensors["token_embd.weight"].shape]))
        assert emb == (self.n_vocab, E), emb
        head = tuple(reversed([int(x) for x in self.tensors[self.lm_head_name()].shape]))
        assert head == (self.n_vocab, E), head

    # -- forward

    def rms(self, x, weight_name):
        w = self.w(weight_name)
        ms = np.mean(x * x, axis=-1, keepdims=True)
        return x / np.sqrt(ms + self.rms_eps) * w

    def rope(self, x, positions):
        # x: [T, n_heads, head_dim]; NORMAL mode: adjacent pairs (2i, 2i+1).
        D = self.head_dim
        inv = self.rope_base ** (-np.arange(0, D, 2, dtype=np.float64) / D)   # [D/2]
        ang = np.asarray(positions, dtype=np.float64)[:, None] * inv[None, :]  # [T, D/2]
        c = np.cos(ang)[:, None, :]
        s = np.sin(ang)[:, None, :]
        x0 = x[..., 0::2]
        x1 = x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * c - x1 * s
        out[..., 1::2] = x0 * s + x1 * c
        return out

    def forward(self, ids, capture=None):
        """Full causal forward over `ids`; returns logits [T, vocab] (float64).
        If `capture` is a dict, the residual stream at the last position entering
        each layer (key layer index) and the final-norm output (key 'final_norm')
        are stored in it."""
        T = len(ids)
        H, Hk, D = self.n_head, self.n_head_kv, self.head_dim
        group = H // Hk
        emb = self.tensors["token_embd.weight"]
        rows = np.stack([own_dequantize(emb.data[i:i + 1], emb.tensor_type, self.n_embd)[0]
                         for i in ids])
        x = rows.astype(np.float64)                                   # [T, E]
        pos = np.arange(T)
        mask = np.triu(np.full((T, T), -np.inf), k=1)
        scale = 1.0 / math.sqrt(D)
        for l in range(self.n_layer):
            if capture is not None:
                capture[l] = x[-1].copy()
            p = f"blk.{l}."
            h = self.rms(x, p + "attn_norm.weight")
            q = (h @ self.w(p + "attn_q.weight").T).reshape(T, H, D)
            k = (h @ self.w(p + "attn_k.weight").T).reshape(T, Hk, D)
            v = (h @ self.w(p + "attn_v.weight").T).reshape(T, Hk, D)
            q = self.rope(q, pos)
            k = self.rope(k, pos)
            att = np.empty((T, H, D))
            for hh in range(H):
                kh = hh // group
                sc = (q[:, hh, :] @ k[:, kh, :].T) * scale + mask        # [T, T]
                sc = sc - sc.max(axis=1, keepdims=True)
                pr = np.exp(sc)
                pr /= pr.sum(axis=1, keepdims=True)
                att[:, hh, :] = pr @ v[:, kh, :]
            x = x + att.reshape(T, H * D) @ self.w(p + "attn_output.weight").T
            h = self.rms(x, p + "ffn_norm.weight")
            gate = h @ self.w(p + "ffn_gate.weight").T
            up = h @ self.w(p + "ffn_up.weight").T
            act = gate / (1.0 + np.exp(-gate)) * up
            x = x + act @ self.w(p + "ffn_down.weight").T
        xn = self.rms(x, "output_norm.weight")
        if capture is not None:
            capture["final_norm"] = xn[-1].copy()
        return xn @ self.w(self.lm_head_name()).T


# --------------------------------------------------------------- tokenizer

def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


# GPT-2 pre-tokenizer regex, with \p{L} and \p{N} narrowed to ASCII (only ASCII
# text is tokenized here).
_GPT2_RE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")


def tokenize_ascii(text, tokens, merges):
    """GPT-2 byte-level BPE (smollm pre-tokenizer) for ASCII text; None otherwise."""
    if not text.isascii():
        return None
    b2u = _bytes_to_unicode()
    vocab = {t: i for i, t in enumerate(tokens)}
    ranks = {tuple(m.split(" ", 1)): i for i, m in enumerate(merges)}
    out = []
    for piece in re.findall(r"[0-9]|[^0-9]+", text):          # smollm: split every digit first
        words = [piece] if piece.isdigit() else _GPT2_RE.findall(piece)
        for word in words:
            sym = [b2u[b] for b in word.encode("utf-8")]
            while len(sym) > 1:
                best = min(((ranks.get((sym[i], sym[i + 1]), 1 << 30), i)
                            for i in range(len(sym) - 1)))
                if best[0] == 1 << 30:
                    break
                i = best[1]
                sym = sym[:i] + [sym[i] + sym[i + 1]] + sym[i + 2:]
            for s in sym:
                if s not in vocab:
                    return None
                out.append(vocab[s])
    return out


def detok(tokens, ids):
    u2b = {u: b for b, u in _bytes_to_unicode().items()}
    data = bytearray()
    for i in ids:
        t = tokens[i]
        if all(ch in u2b for ch in t):
            data.extend(u2b[ch] for ch in t)
        else:
            data.extend(t.encode("utf-8"))
    return data.decode("utf-8", errors="replace")


# -------------------------------------------------------------------- main

def f32list(a):
    """float32 values as JSON numbers that parse back to the same float32."""
    return [float(np.float32(v)) for v in np.asarray(a, dtype=np.float32).ravel()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default=default_model_path(), help="path to the .gguf")
    ap.add_argument("--out", default=os.path.join(repo_root(), "crates", "engine", "tests",
                                                   "golden", "smollm2_reference.json"))
    args = ap.parse_args()
    if not os.path.isfile(args.model):
        sys.exit(f"reference_logits: model not found: {args.model}\n"
                 "  run scripts/fetch-smollm2.sh first, or pass the path")

    t0 = time.time()
    m = Model(args.model)
    m.check_shapes()
    r = m.reader
    gguf_version = importlib.metadata.version("gguf")

    # ---- dequantization samples, cross-checked against the own dequantizer
    last = m.n_layer - 1
    deq_names = ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.ffn_down.weight",
                 f"blk.{last}.attn_v.weight", "output_norm.weight"]
    deq = {}
    for name in deq_names:
        t = m.raw(name)
        full = m.deq32(name)
        ne = [int(x) for x in t.shape]
        if full.ndim == 1:
            rows2d = full.reshape(1, -1)
            raw2d = t.data.reshape(1, -1)
        else:
            rows2d = full
            raw2d = t.data
        mine = own_dequantize(raw2d, t.tensor_type, ne[0])
        if not np.array_equal(mine.view(np.uint32), rows2d.view(np.uint32)):
            nbad = int(np.sum(mine.view(np.uint32) != rows2d.view(np.uint32)))
            sys.exit(f"reference_logits: dequantizers disagree on {name} ({nbad} values)")
        deq[name] = {
            "type": t.tensor_type.name,
            "shape_gguf": ne,
            "shape_rows_cols": list(rows2d.shape),
            "first_row_first_40": f32list(rows2d[0, :N_VALUES]),
            "last_row_first_40": f32list(rows2d[-1, :N_VALUES]),
        }

    # ---- tokenizer sanity (ids are the inputs; this only confirms them)
    merges = field_value(r, "tokenizer.ggml.merges") or []
    tok_checks = {}
    for text, want in TOKENIZER_CHECKS.items():
        got = tokenize_ascii(text, m.tokens, merges)
        tok_checks[text] = {"expected": want, "bpe_from_gguf_vocab": got, "match": got == want}

    # ---- prompt forward
    cap = {}
    logits = m.forward(PROMPT_IDS, capture=cap)
    lastlog = logits[-1]
    order = np.argsort(-lastlog, kind="stable")
    top10 = [{"id": int(i), "logit": float(lastlog[i]), "piece": m.tokens[int(i)]} for i in order[:10]]

    def resid(v):
        return {"first_8": [float(x) for x in v[:N_RESID]], "l2": float(np.linalg.norm(v))}

    checks = {"resid_in_layer_0": resid(cap[0]), "resid_in_layer_1": resid(cap[1]),
              f"resid_in_layer_{last}": resid(cap[last]), "final_norm_out": resid(cap["final_norm"])}

    # ---- greedy continuation (full recompute each step; the prompt is short)
    seq = list(PROMPT_IDS)
    greedy = []
    greedy_logits = []
    for _ in range(N_GREEDY):
        lg = m.forward(seq)[-1] if greedy else lastlog
        nxt = int(np.argmax(lg))
        greedy.append(nxt)
        greedy_logits.append(float(lg[nxt]))
        seq.append(nxt)

    token_type = field_value(r, "tokenizer.ggml.token_type")
    specials = {}
    if token_type is not None:
        for i, tt in enumerate(token_type):
            if int(tt) not in (1,):  # 1 = NORMAL
                specials[str(i)] = {"piece": m.tokens[i], "type": int(tt)}
        if len(specials) > 64:
            specials = {"count": len(specials)}

    out = {
        "generator": "scripts/reference_logits.py",
        "gguf_package_version": gguf_version,
        "numpy_version": np.__version__,
        "model_file": os.path.basename(args.model),
        "model_sha256": sha256_file(args.model),
        "model_size_bytes": os.path.getsize(args.model),
        "notes": ("float64 reference forward pass on gguf-py-dequantized weights; "
                  "RoPE NORMAL (adjacent pairs); tied LM head = token_embd.weight when "
                  "output.weight is absent. Dequantized values are float32-exact; "
                  "residual/logit values are float64."),
        "metadata": {
            "general.architecture": field_value(r, "general.architecture"),
            "general.name": field_value(r, "general.name"),
            "general.file_type": field_value(r, "general.file_type"),
            "llama.block_count": m.n_layer,
            "llama.context_length": m.n_ctx_train,
            "llama.embedding_length": m.n_embd,
            "llama.feed_forward_length": m.n_ff,
            "llama.attention.head_count": m.n_head,
            "llama.attention.head_count_kv": m.n_head_kv,
            "llama.rope.freq_base": m.rope_base,
            "llama.rope.dimension_count": m.rope_dims,
            "llama.attention.layer_norm_rms_epsilon": m.rms_eps,
            "llama.vocab_size": m.n_vocab,
            "head_dim": m.head_dim,
            "tokenizer.ggml.model": field_value(r, "tokenizer.ggml.model"),
            "tokenizer.ggml.pre": field_value(r, "tokenizer.ggml.pre"),
            "tokenizer.ggml.tokens_count": len(m.tokens),
            "tokenizer.ggml.merges_count": len(merges),
            "tokenizer.ggml.bos_token_id": field_value(r, "tokenizer.ggml.bos_token_id"),
            "tokenizer.ggml.eos_token_id": field_value(r, "tokenizer.ggml.eos_token_id"),
            "tokenizer.ggml.unknown_token_id": field_value(r, "tokenizer.ggml.unknown_token_id"),
            "tokenizer.ggml.padding_token_id": field_value(r, "tokenizer.ggml.padding_token_id"),
            "tokenizer.ggml.add_bos_token": field_value(r, "tokenizer.ggml.add_bos_token"),
            "tokenizer.ggml.add_space_prefix": field_value(r, "tokenizer.ggml.add_space_prefix"),
        },
        "lm_head": m.lm_head_name(),
        "tied_embeddings": m.tied,
        "non_normal_tokens": specials,
        "tensor_types": {t.name: t.tensor_type.name for t in r.tensors},
        "dequant_samples": deq,
        "tokenizer_check": tok_checks,
        "prompt": {"text": PROMPT_TEXT, "ids": PROMPT_IDS},
        "last_position": {
            "top10": top10,
            "logit_7042": float(lastlog[EXPECTED_TOP]),
            "argmax": int(order[0]),
            "max_logit": float(lastlog.max()),
            "min_logit": float(lastlog.min()),
        },
        "layer_checks_last_position": checks,
        "greedy": {"n": N_GREEDY, "ids": greedy, "argmax_logits": greedy_logits,
                   "pieces": [m.tokens[i] for i in greedy], "text": detok(m.tokens, greedy)},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(out, fh, indent=1, ensure_ascii=False)
        fh.write("\n")

    print(f"model {out['model_file']} ({out['model_size_bytes']} bytes) sha256 {out['model_sha256']}")
    for t in top10[:5]:
        print(f"  {t['id']:6d} {t['logit']:10.5f} {t['piece']!r}")
    print(f"logit[7042] = {lastlog[EXPECTED_TOP]:.6f}; argmax = {int(order[0])}")
    print(f"greedy: {greedy} {detok(m.tokens, greedy)!r}")
    print(f"tokenizer check: " + ", ".join(f"{k!r}: {v['match']}" for k, v in tok_checks.items()))
    print(f"wrote {os.path.relpath(args.out)} ({os.path.getsize(args.out)} bytes) in {time.time() - t0:.1f}s")
    if int(order[0]) != EXPECTED_TOP:
        print("WARNING: ' Paris' (7042) is not the top token", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
