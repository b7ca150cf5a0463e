"""The project's own environment can run xformers: the pinned torch/xformers pair agrees in its two files and is
what is installed, with xformers' compiled library loaded. These tests fail, never skip: an environment where
xformers cannot run would silently turn every xformers test and benchmark into an SDPA one.

Also: `harness.testing.require`, the helper that fails a test under CI when a dependency is missing.
"""
import importlib.metadata
import re
from pathlib import Path

import pytest
import torch

from harness import testing

REPO = Path(__file__).resolve().parents[2]
TORCH_FILE = REPO / "requirements-torch.txt"
XFORMERS_FILE = REPO / "requirements-xformers.txt"
PAIR = re.compile(r"xformers (?P<xformers>\S+) is built for torch (?P<torch>[0-9][0-9.]*)")


def pins(path: Path) -> dict[str, str]:
    """`name==version` lines of a requirements file (comments dropped)."""
    found = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if "==" in line:
            name, version = (part.strip() for part in line.split("==", 1))
            found[name.lower()] = version
    return found


def public(version: str) -> str:
    """'2.10.0+cu128' -> '2.10.0'."""
    return version.split("+", 1)[0]


def xformers_build_torch() -> str:
    """The torch version the installed xformers was compiled for, from its build metadata (whether or not the
    library loaded), or '' when xformers does not say."""
    from xformers import _cpp_lib

    info = getattr(_cpp_lib, "_build_metadata", None)
    if info is None:
        info = getattr(getattr(_cpp_lib, "_cpp_library_load_exception", None), "build_info", None)
    return getattr(info, "torch_version", "") if info is not None else ""


def test_pins_name_one_pair_in_one_place():
    torch_pin, xformers_pin = pins(TORCH_FILE).get("torch"), pins(XFORMERS_FILE).get("xformers")
    assert torch_pin and xformers_pin, "requirements-torch.txt pins torch, requirements-xformers.txt xformers"
    declared = PAIR.findall(XFORMERS_FILE.read_text())
    assert declared == [(xformers_pin, torch_pin)], (
        f"requirements-xformers.txt must state 'xformers {xformers_pin} is built for torch {torch_pin}' once; "
        f"it states {declared}")
    mentioned = set(re.findall(r"xformers (\d+\.\d+\.\d+)", TORCH_FILE.read_text()))
    assert mentioned <= {xformers_pin}, f"requirements-torch.txt names another xformers: {mentioned}"


def test_setup_installs_xformers_from_the_pin_file_without_dependencies():
    setup = (REPO / "scripts" / "setup_env.sh").read_text()
    assert re.search(r"--no-deps -r requirements-xformers\.txt", setup), "setup_env.sh must install the pin file"
    assert "xformers==" not in setup, "the xformers version lives in requirements-xformers.txt only"


def test_installed_torch_and_xformers_are_the_pinned_pair():
    torch_pin, xformers_pin = pins(TORCH_FILE)["torch"], pins(XFORMERS_FILE)["xformers"]
    assert public(torch.__version__) == torch_pin, (
        f"torch {torch.__version__} is installed, requirements-torch.txt pins {torch_pin}: run scripts/setup_env.sh")
    try:
        installed = importlib.metadata.version("xformers")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"xformers is not installed (requirements-xformers.txt pins {xformers_pin}); "
                    f"torch {torch.__version__} is: run scripts/setup_env.sh", pytrace=False)
    assert installed == xformers_pin, f"xformers {installed} is installed, the pin is {xformers_pin}"


def test_xformers_loads_its_compiled_library():
    try:
        import xformers
        import xformers.ops  # noqa: F401
    except Exception as error:  # any import failure is the finding, with the torch that was found
        pytest.fail(f"xformers cannot be imported next to torch {torch.__version__}: {error!r}", pytrace=False)
    built_for = xformers_build_torch() or "an unknown torch"
    assert xformers._has_cpp_library, (
        f"xformers {xformers.__version__} could not load its compiled library: it was built for torch "
        f"{built_for}, this is torch {torch.__version__}")
    assert public(built_for) == public(torch.__version__), (built_for, torch.__version__)


# --- require ---------------------------------------------------------------------------------------------------

MISSING = "xipa_no_such_module_for_require_test"


def test_require_returns_the_module():
    assert testing.require("json") is __import__("json")


@pytest.mark.parametrize("value", ["true", "1", "yes"])
def test_require_fails_under_ci(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match=MISSING):
        testing.require(MISSING)


@pytest.mark.parametrize("value", [None, "", "false", "0"])
def test_require_skips_without_ci(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.skip.Exception, match=MISSING):
        testing.require(MISSING)
