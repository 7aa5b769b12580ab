# Sourced by the repository's shell scripts; set NAME (and EXIT_CODE, default 1) first.
#
# CACHE_ROOT: where downloads and builds live, outside the repository. The same rule as the
# engine's `load::cache_dir`: $DRIFTSCOPE_CACHE, else $XDG_CACHE_HOME/driftscope, else
# ~/.cache/driftscope (an empty variable counts as unset).
CACHE_ROOT="${DRIFTSCOPE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/driftscope}"

log() { printf '%s: %s\n' "$NAME" "$*" >&2; }
die() { printf '%s: error: %s\n' "$NAME" "$*" >&2; exit "${EXIT_CODE:-1}"; }
