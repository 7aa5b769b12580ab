#!/usr/bin/env bash
# GPU case studies: SmolLM2-135M-Instruct through transformers on a CUDA device, for every
# attention implementation (sdpa, eager) x dtype (bf16, fp16, fp32), plus bf16/sdpa with
# torch's deterministic algorithms. Each configuration writes one trace with the phases
# prefill_last, decode0 and batch4, and driftscope analyzes it twice: prefill_last vs decode0
# and prefill_last vs batch4.
#
#   bash python/scripts/gpu_case_studies.sh MODEL.gguf OUT_DIR [DRIFTSCOPE_BIN] [PROMPTS.jsonl]
#
# Needs: python3 with torch (CUDA), transformers, gguf, xxhash, safetensors, and the
# driftscope_torch package importable (pip install ./python, or PYTHONPATH=python).
# Environment: DEVICE (default cuda), PYTHON (default python3), CONFIGS (e.g. "sdpa fp32;eager bf16"),
# NO_DUMP=1 (no value dumps: smaller outputs, magnitudes only bounded from the statistics).
# Writes OUT_DIR/<config>/{trace.jsonl,decode0.md,decode0.json,batch4.md,batch4.json} and
# OUT_DIR/summary.md (per configuration, comparison and prompt: failing pairs, origin, root cause,
# magnitude, next-token impact; a configuration whose trace failed shows as ERROR).
set -uo pipefail

model="${1:?usage: gpu_case_studies.sh MODEL.gguf OUT_DIR [DRIFTSCOPE_BIN] [PROMPTS.jsonl]}"
out="${2:?usage: gpu_case_studies.sh MODEL.gguf OUT_DIR [DRIFTSCOPE_BIN] [PROMPTS.jsonl]}"
here="$(cd "$(dirname "$0")" && pwd)"
bin="${3:-driftscope}"
prompts="${4:-$here/case-study-prompts.jsonl}"
python="${PYTHON:-python3}"
device="${DEVICE:-cuda}"
# Dumps (the traced rows, next to each trace) give exact magnitudes and the next-token impact.
dump=1
[[ "${NO_DUMP:-}" == 1 ]] && dump=
mkdir -p "$out"

configs=(
    "sdpa bf16" "sdpa fp16" "sdpa fp32"
    "eager bf16" "eager fp16" "eager fp32"
    "sdpa bf16 deterministic" "sdpa fp32 deterministic"
)
# CONFIGS="sdpa fp32;eager bf16" runs only those.
if [[ -n "${CONFIGS:-}" ]]; then
    IFS=';' read -r -a configs <<< "$CONFIGS"
fi

for c in "${configs[@]}"; do
    set -- $c
    attn=$1 dtype=$2 det=${3:-}
    name="${attn}-${dtype}${det:+-det}"
    dir="$out/$name"
    mkdir -p "$dir"
    echo "== $name" >&2
    "$python" -m driftscope_torch trace --model "$model" --prompts "$prompts" --out "$dir/trace.jsonl" \
        --device "$device" --dtype "$dtype" --attn "$attn" --scenario decode0 --batch 4 \
        ${det:+--deterministic} ${dump:+--dump} 2> "$dir/trace.log"
    rc=$?
    if [[ $rc -ne 0 ]]; then
        echo "trace failed ($rc): $(tail -n 3 "$dir/trace.log")" >&2
        continue
    fi
    for cand in decode0 batch4; do
        "$bin" analyze "$dir/trace.jsonl" --candidate "$cand" --report "$dir/$cand.md" --json "$dir/$cand.json" \
            > "$dir/$cand.line" 2>&1
    done
done
"$python" "$here/summarize_case_studies.py" "$out" > "$out/summary.md"
cat "$out/summary.md" >&2
