"""Host tests: a real ComfyUI imported in-process (fixtures from harness/testing.py)."""
from pathlib import Path

from harness.testing import comfy, mark_folder, pack, tiny_models  # noqa: F401


def pytest_collection_modifyitems(items):
    mark_folder(items, Path(__file__).parent, "host")
