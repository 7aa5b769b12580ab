#!/usr/bin/env bash
# Cross-engine check: SmolLM2-135M-Instruct through Hugging Face transformers (driftscope-torch)
# and through driftscope's Rust reference engine, on the same prompts, then `driftscope diff` of
# the two traces phase by phase, with exact magnitudes from both dumps.
#
#     bash python/scripts/cross_engine.sh [OUT_DIR]        # default: driftscope-out/cross-engine
#
# transformers side: the Q4_1 GGUF dequantized by transformers, f32, CPU, eager attention.
# Rust side: `driftscope run` on the same GGUF (dequantized to f32), profile $PROFILE (default fast).
# Prints each diff's verdict line and, per point, the largest relative L2 and max |Δ| over the
# layers and prompts; the reports and verdicts stay in OUT_DIR.
#
# Environment: DRIFTSCOPE_BIN (default target/debug/driftscope), DRIFTSCOPE_CACHE (the model cache,
# as scripts/fetch-smollm2.sh), PYTHON (default: the venv of scripts/setup-python.sh), PROFILE.
#
# GGUF stores W_q and W_k with the rows of each head permuted for llama.cpp's interleaved RoPE;
# transformers and the Rust engine both put them back into Hugging Face's order when they load a
# GGUF, so q and k line up element for element and every point can be compared.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/../.." && pwd)"
OUT="${1:-$REPO/driftscope-out/cross-engine}"
BIN="${DRIFTSCOPE_BIN:-$REPO/target/debug/driftscope}"
NAME=cross-engine EXIT_CODE=2
source "$REPO/scripts/common.sh"
GGUF="${CACHE_ROOT}/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROFILE="${PROFILE:-fast}"

[[ -x "$BIN" ]] || die "no driftscope binary at $BIN (run \`cargo build\`, or set DRIFTSCOPE_BIN)"
[[ -f "$GGUF" ]] || die "SmolLM2 is not in the cache ($GGUF): run \`bash scripts/fetch-smollm2.sh\`"
PY="${PYTHON:-$(bash "$REPO/scripts/setup-python.sh" | tail -n 1)}"
export PYTHONPATH="$REPO/python${PYTHONPATH:+:$PYTHONPATH}"

mkdir -p "$OUT"
PROMPTS="$OUT/prompts.jsonl"
cat >"$PROMPTS" <<'JSONL'
{"id": "p0_short", "text": "The capital of France is"}
{"id": "p1_medium", "text": "When a language model answers a question, the same computation can reach the same token in two ways. During prefill the engine reads the whole prompt at once."}
JSONL

log "transformers: tracing (f32, cpu, eager) -> $OUT/torch.jsonl"
"$PY" -m driftscope_torch trace --model "$GGUF" --prompts "$PROMPTS" --out "$OUT/torch.jsonl" \
    --dtype fp32 --attn eager --device cpu --dump

# The points module hooks reach (not q_rope and k_rope), so that every pair has both sides.
POINTS="embed_out,x_in,attn_norm,q,k,v,attn_ctx,attn_out,x_mid,mlp_norm,gate,up,act,mlp_out,final_norm,logits"
log "driftscope run ($PROFILE) -> $OUT/rust.jsonl"
"$BIN" run --model "$GGUF" --prompts "$PROMPTS" --profile "$PROFILE" --dtype f32 --points "$POINTS" --dump \
    --out "$OUT/rust.jsonl"

status=0
for phase in prefill_last decode0; do
    set +e
    "$BIN" diff "$OUT/rust.jsonl" "$OUT/torch.jsonl" --phase "$phase" \
        --report "$OUT/diff-$phase.md" --json "$OUT/diff-$phase.json"
    rc=$?
    set -e
    (( rc <= 1 )) || { log "driftscope diff --phase $phase failed (exit code $rc)"; status=$rc; continue; }
    "$PY" - "$OUT/diff-$phase.json" "$phase" <<'PY'
import json
import sys

verdict = json.load(open(sys.argv[1], encoding="utf-8"))
order = ["embed_out", "x_in", "attn_norm", "q", "k", "v", "q_rope", "k_rope", "attn_ctx", "attn_out",
         "x_mid", "mlp_norm", "gate", "up", "act", "mlp_out", "final_norm", "logits"]
worst = {}
for pair in verdict["pairs"]:
    point, mag = pair["key"]["point"], pair.get("magnitude")
    if mag is None:
        continue
    w = worst.setdefault(point, {"rel_l2": 0.0, "max_abs": 0.0, "pairs": 0, "bitwise": 0})
    w["rel_l2"] = max(w["rel_l2"], mag["rel_l2"])
    w["max_abs"] = max(w["max_abs"], mag["max_abs"])
    w["pairs"] += 1
    w["bitwise"] += pair["status"] == "PASS"
print(f"\n{sys.argv[2]}: largest relative L2 and max |delta| per point over layers and prompts (rust vs transformers)")
print(f"{'point':<11} {'pairs':>5} {'bitwise':>7} {'rel L2':>10} {'max |d|':>10}")
for point in sorted(worst, key=order.index):
    w = worst[point]
    print(f"{point:<11} {w['pairs']:>5} {w['bitwise']:>7} {w['rel_l2']:>10.3e} {w['max_abs']:>10.3e}")
for prompt, t in sorted((verdict.get("token_impact") or {}).items()):
    print(f"{prompt}: greedy token {t['baseline_argmax']} / {t['candidate_argmax']}, KL {t['kl']:.3e}, "
          f"max |delta log-prob| (top 10) {t['max_dlogprob']:.3e}")
PY
done
log "reports: $OUT/diff-prefill_last.md, $OUT/diff-decode0.md"
exit "$status"
