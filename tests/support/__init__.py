"""Test harness shared by tests/host and tests/e2e (not shipped with the pack).

The conftests register this folder as the package ``xipa_test_support`` (a unique name, so nothing here
can shadow or be shadowed by ComfyUI's own top-level modules such as ``server`` or ``tests``):

- ``comfy_bootstrap``: make ComfyUI importable in-process; load this pack the way ComfyUI does.
- ``tiny_models``: tiny synthetic random-weight model files and the extra_model_paths YAML.
- ``meta_unets``: full SD1.5 / SDXL UNet layouts on the meta device (site enumeration).
- ``server``: a real ComfyUI server subprocess with this pack, plus a small HTTP/websocket client.
- ``fixtures``: the pytest fixtures the conftests re-export (``comfy``, ``tiny_models``, ``comfy_server``).
"""
