"""pytest helpers: the fixtures tests/host and tests/e2e import by name, and `require` for test dependencies.

Only tests import this module (it imports pytest). Environment knobs (tests only): ``COMFYUI_PATH`` (the host,
see scripts/harness/comfy_host.py), ``XIPA_MODELS_DIR`` (where tiny models are generated, default .cache/models),
``XIPA_CLIP_VISION`` ("vit-l" default, or "vit-h"), ``CI`` (a missing test dependency fails instead of skipping).
"""
from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from types import ModuleType

import pytest

from . import comfy_bootstrap, tiny_models as _tiny
from .server import ComfyServer

log = logging.getLogger(__name__)

FALSE_WORDS = ("", "0", "false", "no", "off")


def under_ci() -> bool:
    """True when the ``CI`` environment variable is set to anything but an empty/false word."""
    return os.environ.get("CI", "").strip().lower() not in FALSE_WORDS


def require(module: str) -> ModuleType:
    """Import `module` for a test that needs it. When it cannot be imported the test fails under CI (a check
    that silently did not run is not a pass) and is skipped only on a developer machine without ``CI``.

    Usable at module level (the whole file then fails or skips) and inside a test.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        message = f"{module} cannot be imported ({error}); scripts/setup_env.sh installs it"
        if under_ci():
            pytest.fail(f"{message} [CI is set: a missing test dependency fails]", pytrace=False)
        pytest.skip(f"{message} [skipped: CI is not set]", allow_module_level=True)


def mark_folder(items, folder: Path, marker: str) -> None:
    """Add `marker` to every collected test below `folder` (used by the conftests' collection hooks)."""
    folder = folder.resolve()
    for item in items:
        if folder in Path(str(item.path)).resolve().parents:
            item.add_marker(marker)


@pytest.fixture(scope="session")
def comfy() -> Path:
    """ComfyUI importable in this process (``--cpu``); returns its directory. Never skips: a missing
    ComfyUI is an error with instructions."""
    path = comfy_bootstrap.bootstrap()
    yield path
    # Release ComfyUI's loaded models while its modules still exist (otherwise ModelPatcher.__del__ prints
    # AttributeError noise at interpreter exit).
    import gc

    import comfy.model_management

    comfy.model_management.unload_all_models()
    gc.collect()


@pytest.fixture(scope="session")
def pack(comfy):
    """This pack imported as package ``xformers_ipadapter`` (as ComfyUI's load_custom_node does)."""
    return comfy_bootstrap.load_pack()


@pytest.fixture(scope="session")
def tiny_models(comfy) -> _tiny.TinyModels:
    """Tiny random-weight models in ComfyUI's folder layout (generated once, cached in .cache/models)."""
    root = os.environ.get("XIPA_MODELS_DIR") or None
    models = _tiny.generate(root, clip_vision=os.environ.get("XIPA_CLIP_VISION", "vit-l"))
    if models.timings:
        log.info("tiny models generated: %s", models.timings)
    return models


@pytest.fixture(scope="session")
def comfy_server(tiny_models, tmp_path_factory):
    """A running ComfyUI server (loopback, --cpu) with this pack as custom_nodes/xformers_ipadapter and the
    tiny models in its model folders. Shared by the whole session; its log is ``comfy_server.log_path``."""
    with ComfyServer(tmp_path_factory.mktemp("comfy_server"), tiny_models.root) as server:
        yield server
    log.info("ComfyUI server log: %s", server.log_path)
