#!/usr/bin/env bash
# Idempotent bootstrap for development and CI: .venv with the pinned torch stack, xformers, the test
# dependencies, and the ComfyUI host (resolved as in docs design section 4) with its requirements.
#   scripts/setup_env.sh            # then: .venv/bin/python -m pytest
# PYTHON selects the interpreter used to create the venv (default python3).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup_env: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -qq --disable-pip-version-check)

echo "setup_env: torch stack (requirements-torch.txt)"
"${PIP[@]}" -r requirements-torch.txt
echo "setup_env: xformers (requirements-xformers.txt; no deps, so torch is never replaced)"
"${PIP[@]}" --no-deps -r requirements-xformers.txt
echo "setup_env: test dependencies (requirements-dev.txt)"
"${PIP[@]}" -r requirements-dev.txt -c requirements-torch.txt
echo "setup_env: ComfyUI host and its requirements"
"$PY" scripts/comfy_host.py --install
