"""processors/ is the host-independent engine: it never imports ComfyUI, and runs alone."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "server", "nodes",
                 "execution", "node_helpers", "latent_preview"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_processors_never_import_comfyui():
    files = sorted((ROOT / "processors").rglob("*.py"))
    assert files
    offenders = {str(f.relative_to(ROOT)): imported_roots(f) & COMFY_MODULES for f in files}
    assert not {f: m for f, m in offenders.items() if m}


def test_processors_run_alone_in_a_fresh_interpreter():
    """Import every processors module and run one attention, with no ComfyUI anywhere on the path."""
    code = (
        "import sys, importlib, pkgutil, torch, processors\n"
        "for m in pkgutil.walk_packages(processors.__path__, 'processors.'): importlib.import_module(m.name)\n"
        "from processors.ip_attention import XFormersIPAdapterAttnProcessor, IPBranch\n"
        "q = torch.randn(1, 16, 64)\n"
        "out = XFormersIPAdapterAttnProcessor()(q, q, q, 2, [IPBranch(q[:, :4], q[:, :4], 0.5)])\n"
        "assert out.shape == q.shape\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in %r]\n"
        "assert not bad, bad\n" % (sorted(COMFY_MODULES),)
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
