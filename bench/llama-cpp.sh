#!/usr/bin/env bash
# The peer for the engine benchmark: llama.cpp's `llama-bench` on the same GGUF and thread count.
#
#   bash bench/llama-cpp.sh build              # fetch + build llama.cpp (once; ~5 min on 2 cores)
#   bash bench/llama-cpp.sh f16 [IN.gguf]      # SmolLM2 Q4_1 -> F16 GGUF (llama-quantize), prints its path
#   bash bench/llama-cpp.sh run MODEL.gguf [THREADS] [REPS]
#                                              # llama-bench: pp128, pp512, tg16 at depth 128 and 512
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

case "${1:-}" in
    build) build ;;
    f16) shift; f16 "$@" ;;
    run) shift; run "$@" ;;
    *) die "usage: llama-cpp.sh build | f16 [IN.gguf] | run MODEL.gguf [THREADS] [REPS]" ;;
esac
