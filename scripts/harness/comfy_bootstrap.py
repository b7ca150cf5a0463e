"""Make ComfyUI importable in this process and load the pack the way ComfyUI loads custom nodes.

CPU flags: ``--cpu`` only. Without it ``comfy.model_management`` keeps ``cpu_state=GPU`` and calls CUDA.
``--fp32-text-enc`` is deliberately *not* set: a CPU user of ComfyUI gets fp16 CLIP text and CLIP vision
encoders (``text_encoder_dtype`` returns fp16 on CPU), so host tests see the dtypes the nodes see in
production and must cope with fp16 CLIP vision outputs. Tests that need fp32 encoders can cast, or
call ``bootstrap(extra_args=["--fp32-text-enc"])`` before anything else bootstraps (arguments are parsed
once per process; a later call with different arguments raises).
"""
from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from types import ModuleType

from . import REPO_ROOT, comfy_host

log = logging.getLogger(__name__)

PACK_NAME = "xformers_ipadapter"
DEFAULT_ARGS = ("--cpu",)

_state: dict = {}


def resolve_comfyui() -> Path:
    """The ComfyUI directory (order in scripts/harness/comfy_host.py). Raises with a clear message; never skips."""
    try:
        return comfy_host.resolve_comfyui()
    except comfy_host.ComfyUINotFound as exc:
        raise RuntimeError(
            f"ComfyUI host tests need a ComfyUI: {exc}\n"
            "Run scripts/setup_env.sh, or set COMFYUI_PATH to a ComfyUI checkout.") from exc


def bootstrap(extra_args: tuple[str, ...] | list[str] = ()) -> Path:
    """Put ComfyUI first on sys.path and parse its CLI arguments as ``--cpu`` (plus `extra_args`).

    Idempotent; returns the ComfyUI directory.
    """
    args = tuple(DEFAULT_ARGS) + tuple(extra_args)
    if "path" in _state:
        if args != _state["args"]:
            raise RuntimeError(f"ComfyUI already bootstrapped with {_state['args']}, not {args}")
        return _state["path"]
    if "comfy.cli_args" in sys.modules:
        raise RuntimeError("comfy.cli_args was imported before bootstrap(); its arguments are already parsed")
    path = resolve_comfyui()
    if str(path) in sys.path:
        sys.path.remove(str(path))
    sys.path.insert(0, str(path))
    saved = sys.argv
    sys.argv = [saved[0] if saved else "pytest", *args]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  (parses sys.argv once, here)
        # As main.py does before anything imports ComfyUI's `nodes` (which puts comfy/ first on sys.path, where
        # comfy/utils.py would then shadow ComfyUI's top-level `utils` package for later imports).
        import utils.extra_config  # noqa: F401
    finally:
        sys.argv = saved
    _state.update(path=path, args=args)
    log.info("ComfyUI bootstrapped from %s with %s", path, " ".join(args))
    return path


def load_pack(name: str = PACK_NAME) -> ModuleType:
    """Import the pack (repo root ``__init__.py``) as package `name`, like ComfyUI's load_custom_node.

    ``submodule_search_locations`` makes the repo root the package directory, so ``from .nodes import x``
    inside the pack resolves to ``<name>.nodes``. Call ``bootstrap()`` first when the import needs comfy.
    """
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
