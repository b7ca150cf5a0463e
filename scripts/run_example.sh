#!/usr/bin/env bash
# The main job (README): on a fresh machine, set up .venv and a ComfyUI host, then run the basic example
# workflow headless on 127.0.0.1 and print the output image, the attention operator that ran (and why any
# fallback) and the time per sampling step.
#   bash scripts/run_example.sh [--models-dir DIR] [--image PNG] [--steps N] [--size PX] [--device cpu|gpu]
# COMFYUI_PATH selects your own ComfyUI; XIPA_EXAMPLE_MODELS (or --models-dir) a models tree with real files.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup_env.sh
exec "${VENV:-.venv}/bin/python" scripts/run_example.py "$@"
