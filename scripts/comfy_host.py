#!/usr/bin/env python3
"""Resolve (or fetch) the ComfyUI host and install its requirements; the logic is scripts/harness/comfy_host.py.

    python scripts/comfy_host.py --path      # print the resolved ComfyUI directory
    python scripts/comfy_host.py --install   # resolve, then install ComfyUI's requirements
"""
import sys
from pathlib import Path

# absolute(), not resolve(): the pack may be a symlink inside <ComfyUI>/custom_nodes.
sys.path.insert(0, str(Path(__file__).absolute().parents[1]))

from harness.comfy_host import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
