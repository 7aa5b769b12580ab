#!/usr/bin/env bash
# Create or update the Python environment of the PyTorch adapter (python/, driftscope-torch).
#
# The venv lives outside the repository, next to the model cache:
#     ${DRIFTSCOPE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/driftscope}/torch-venv
# and gets `pip install ./python[test]` (torch, transformers, numpy, xxhash, safetensors, gguf,
# accelerate, pytest, jsonschema) from PyPI.
#
# Idempotent and quick when nothing changed: a stamp file in the venv holds a hash of
# python/pyproject.toml and the package's sources; pip runs only when it differs.
# On success the last line of stdout is the venv's python. Progress and errors go to stderr.
#
# Environment: PYTHON (the interpreter that creates the venv; default python3).
set -euo pipefail

cd "$(dirname "$0")/.."

NAME=setup-python
source scripts/common.sh
VENV="${CACHE_ROOT}/torch-venv"
STAMP="${VENV}/.driftscope-torch-stamp"
PY="${VENV}/bin/python"

# What the install depends on: the project file and the package's sources, in a fixed order.
want="$(cat python/pyproject.toml python/README.md python/driftscope_torch/*.py | sha256sum | cut -d' ' -f1)"

if [[ -x "$PY" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    log "up to date (${VENV})"
    printf '%s\n' "$PY"
    exit 0
fi

if [[ ! -x "$PY" ]]; then
    base="${PYTHON:-python3}"
    command -v "$base" >/dev/null 2>&1 || die "$base not found on PATH (set PYTHON to a Python 3.9+ interpreter)"
    mkdir -p "$CACHE_ROOT" || die "cannot create $CACHE_ROOT"
    log "creating ${VENV}"
    "$base" -m venv "$VENV" || die "cannot create the venv (on Debian/Ubuntu: apt-get install python3-venv)"
fi

log "installing ./python[test] into ${VENV}"
# Built from a copy, so that setuptools leaves no build/ or *.egg-info in the working tree.
SRC="$(mktemp -d "${TMPDIR:-/tmp}/driftscope-torch-src.XXXXXX")"
trap 'rm -rf "$SRC"' EXIT
cp -R python/pyproject.toml python/README.md python/driftscope_torch "$SRC/"
# No pip cache: torch and its CUDA wheels are ~5 GB installed and would be kept twice.
"$PY" -m pip install --disable-pip-version-check --no-cache-dir --quiet "${SRC}[test]" >&2 \
    || die "pip install ./python[test] failed (see pip's output above)"
printf '%s\n' "$want" >"${STAMP}.tmp" && mv "${STAMP}.tmp" "$STAMP"
log "ready"
printf '%s\n' "$PY"
