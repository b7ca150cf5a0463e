"""Development harness: a ComfyUI host for tests, scripts and benchmarks (never shipped: it lives in scripts/,
which .comfyignore leaves out of the registry archive).

Importable as ``harness`` once scripts/ is on ``sys.path`` (a script run from scripts/ has it; the tests' root
conftest and the benchmarks put it there). Nothing here imports ComfyUI at import time.

- ``comfy_host``: resolve (or fetch into .cache/) the ComfyUI host and install its requirements.
- ``comfy_bootstrap``: make ComfyUI importable in this process; load this pack the way ComfyUI does.
- ``server``: a real ComfyUI server subprocess with this pack, plus a small HTTP/websocket client.
- ``tiny_models``: tiny synthetic random-weight model files and the extra_model_paths YAML.
- ``meta_unets``: full SD1.5 / SDXL UNet layouts on the meta device (site enumeration).
- ``host_helpers``: a tiny CLIP vision model, adapters for the tiny UNet, a real KSampler run.
- ``workflows``: the example workflows (UI and API formats), and their tiny-model twins.
- ``oracle``: float64 reference maths of the IP-Adapter attention, written from the formula alone.
"""
from pathlib import Path

# absolute(), not resolve(): the pack may be a symlink inside <ComfyUI>/custom_nodes (see comfy_host).
REPO_ROOT = Path(__file__).absolute().parents[2]
