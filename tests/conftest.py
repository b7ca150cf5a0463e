"""Shared pytest setup: the repo root and scripts/ are importable, so tests `import processors` standalone and
import the development harness (`scripts/harness/`: ComfyUI host, server, tiny models, oracle, pytest helpers)
as `harness`."""
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT / "scripts", REPO_ROOT):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
