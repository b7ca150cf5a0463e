"""Shared pytest setup: the repo root is importable, so tests `import processors` standalone and import the
development harness (`harness/`: ComfyUI host, server, tiny models, oracle, pytest helpers) by its name."""
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
