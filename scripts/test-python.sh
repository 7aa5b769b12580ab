#!/usr/bin/env bash
# Run the PyTorch adapter's tests (python/tests) on the CPU with the venv of setup-python.sh.
#
# Uses the driftscope binary at $DRIFTSCOPE_BIN, else target/debug/driftscope (build it first with
# `cargo build`); tests that need it are skipped when it is missing, except in CI (env CI set),
# where they fail. Extra arguments go to pytest, e.g. `bash scripts/test-python.sh -k hashing`.
# Exits non-zero when a test fails.
set -euo pipefail

cd "$(dirname "$0")/.."
PY="$(bash scripts/setup-python.sh | tail -n 1)"
# The tests import the working tree's package, whatever copy the venv holds.
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
cd python
exec "$PY" -m pytest -q tests "$@"
