"""Host tests: a real ComfyUI imported in-process (fixtures from scripts/harness/testing.py, and the tiny models the
node tests share)."""
from pathlib import Path

import pytest

from harness import host_helpers as hh
from harness.testing import comfy, mark_folder, pack, tiny_models  # noqa: F401


def pytest_collection_modifyitems(items):
    mark_folder(items, Path(__file__).parent, "host")


@pytest.fixture(scope="module")
def unet(comfy, pack, tiny_models):
    import comfy.sd

    return comfy.sd.load_diffusion_model(str(tiny_models.files["unet"]))


@pytest.fixture(scope="module")
def clip_vision(comfy, tmp_path_factory):
    return hh.tiny_clip_vision(tmp_path_factory.mktemp("clip_vision"))


@pytest.fixture(scope="module")
def adapters(pack):
    return {"base": hh.adapter("base"), "plus": hh.adapter("plus", seed=2)}
