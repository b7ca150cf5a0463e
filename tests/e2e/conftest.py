"""E2E tests: a real ComfyUI server subprocess with this pack (fixtures from tests/support/fixtures.py)."""
import runpy
from pathlib import Path

runpy.run_path(str(Path(__file__).resolve().parents[1] / "support" / "register.py"))

from xipa_test_support.fixtures import comfy, comfy_server, mark_folder, tiny_models  # noqa: E402,F401


def pytest_collection_modifyitems(items):
    mark_folder(items, Path(__file__).parent, "server")
