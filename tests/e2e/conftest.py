"""E2E tests: a real ComfyUI server subprocess with this pack (fixtures from scripts/harness/testing.py)."""
from pathlib import Path

from harness.testing import comfy, comfy_server, mark_folder, tiny_models  # noqa: F401


def pytest_collection_modifyitems(items):
    mark_folder(items, Path(__file__).parent, "server")
