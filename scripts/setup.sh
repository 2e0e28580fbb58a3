#!/usr/bin/env bash
# Create / refresh the project's virtualenv in <repo>/.venv.
#
# Idempotent: when .venv exists and its stamp file holds the hash of pyproject.toml + this
# script, nothing is installed and the script returns in well under a second.
# The exact torch/torchvision pair is pinned here (pyproject.toml only holds ranges).
set -euo pipefail

TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.hf_prune_setup_stamp"
PYTHON="${PYTHON:-python3}"

hash_inputs() {
    cat pyproject.toml scripts/setup.sh | "$PYTHON" -c \
        'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'
}

if [[ ! -x "$PY" ]]; then
    echo "[setup] creating virtualenv in .venv"
    "$PYTHON" -m venv "$VENV"
else
    echo "[setup] virtualenv .venv exists"
fi

WANT="$(hash_inputs)"
if [[ -f "$STAMP" ]] && [[ "$(cat "$STAMP")" == "$WANT" ]] \
        && "$PY" -c 'import importlib.metadata as m; m.version("hf_prune")' >/dev/null 2>&1; then
    echo "[setup] dependencies up to date (stamp matches), nothing to install"
    exit 0
fi
rm -f "$STAMP"

# -qq: errors only (this machine's pip config adds noisy "location is ignored" warnings).
PIP=("$PY" -m pip --disable-pip-version-check -qq)

echo "[setup] upgrading pip"
"${PIP[@]}" install --upgrade pip

echo "[setup] installing ${TORCH_PINS[*]}"
"${PIP[@]}" install "${TORCH_PINS[@]}"

echo "[setup] installing hf_prune in editable mode with extras [dev,peers]"
# Keep the pinned torch pair: pass the pins again so the resolver cannot move them.
"${PIP[@]}" install -e ".[dev,peers]" "${TORCH_PINS[@]}"

echo "$WANT" > "$STAMP"
echo "[setup] done"
