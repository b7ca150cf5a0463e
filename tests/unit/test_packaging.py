"""Registry packaging: pyproject.toml metadata, requirements.txt parity, and the shipped file set.

The shipped set is what ``comfy node publish`` zips: the git-tracked files minus ``.comfyignore`` (gitignore
syntax). Here it also includes untracked files git does not ignore, so a problem is caught before it is
committed. The registry's scanner matches plain text (comments, docs and JSON count), and any match, even
at severity "info", holds a version back from users (the Comfy Registry's publishing rules), so
shipped files must contain none of the patterns below.
"""
import fnmatch
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Patterns the registry scanner has flagged (python_command_injection_risk, python_environment_manipulation,
# python_network_operations, ExecCall, unsafe loading). Checked in every shipped text file.
TEXT_PATTERNS = {
    "subprocess": r"subprocess",
    "os.system": r"os\.system",
    "os.environ": r"os\.environ",
    "environ[": r"environ\[",
    "getenv(": r"getenv\(",
    # plain-text matchers flag method calls too (`module.eval()`), so any `eval(` / `exec(` counts
    "eval(": r"(?<![\w])eval\(",
    "exec(": r"(?<![\w])exec\(",
    "pickle.load": r"pickle\.load",
    "urllib.request": r"urllib\.request",
    "requests.": r"\brequests\.",
    "socket": r"(?i:socket)",
    "urlopen": r"urlopen",
    "aiohttp.ClientSession(": r"ClientSession\(",
    "weights_only=False": r"weights_only\s*=\s*False",
}
# The network rule also fired on litegraph calls in web/*.js.
JS_PATTERNS = {".connect(": r"\.connect\(", ".send(": r"\.send\(", ".bind(": r"\.bind\("}
NEVER_REQUIRED = {"torch", "torchvision", "torchaudio", "xformers"}
ACCELERATORS = ("Environment :: GPU :: NVIDIA CUDA", "Environment :: GPU :: AMD ROCm",
                "Environment :: GPU :: Intel Arc",
                "Environment :: NPU :: Huawei Ascend", "Environment :: GPU :: Apple Metal")


# --- the shipped file set -----------------------------------------------------------------------------------

def comfyignore_patterns(root: Path) -> list[str]:
    path = root / ".comfyignore"
    if not path.is_file():
        return []
    lines = [line.strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def is_comfyignored(path: str, patterns: list[str]) -> bool:
    """gitignore matching for the syntax .comfyignore uses: globs, a trailing / for folders, a leading or
    inner / to anchor at the root (negation is rejected by test_comfyignore_uses_supported_syntax)."""
    parts = path.split("/")
    for raw in patterns:
        dir_only = raw.endswith("/")
        pattern = raw.strip("/")
        anchored = "/" in raw.rstrip("/")
        # a folder pattern matches a leading folder of the path, never the file itself
        last = len(parts) - 1 if dir_only else len(parts)
        for i in range(last):
            candidate = "/".join(parts[: i + 1]) if anchored else parts[i]
            if fnmatch.fnmatchcase(candidate, pattern):
                return True
    return False


def git_files(root: Path, *args: str) -> list[str]:
    out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", *args], check=True, capture_output=True).stdout
    return [p for p in out.decode().split("\0") if p]


def shipped_files(root: Path) -> list[str]:
    candidates = git_files(root, "--cached", "--others", "--exclude-standard")
    patterns = comfyignore_patterns(root)
    return sorted(p for p in set(candidates) if (root / p).is_file() and not is_comfyignored(p, patterns))


def scan(root: Path, files: list[str]) -> list[str]:
    """'path:line: pattern' for every flagged pattern in the given files (binary files are skipped)."""
    findings = []
    for rel in files:
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        patterns = dict(TEXT_PATTERNS)
        if rel.endswith((".js", ".mjs")):
            patterns.update(JS_PATTERNS)
        for number, line in enumerate(text.splitlines(), 1):
            findings.extend(f"{rel}:{number}: {name}" for name, rx in patterns.items() if re.search(rx, line))
    return findings


# --- metadata -------------------------------------------------------------------------------------------------

def requirement_lines() -> list[str]:
    lines = [line.split("#", 1)[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    return [line for line in lines if line]


def requirement_name(spec: str) -> str:
    return re.split(r"[\s\[<>=!~;@]", spec, maxsplit=1)[0].lower().replace("_", "-").replace(".", "-")


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_dependencies_are_identical_to_requirements_txt(pyproject):
    """ComfyUI-Manager installs requirements.txt (one `pip install <line>` per line); the registry shows
    [project].dependencies. They must say the same thing."""
    deps = [" ".join(d.split()) for d in pyproject["project"]["dependencies"]]
    assert deps == [" ".join(line.split()) for line in requirement_lines()]
    assert "dependencies" not in pyproject["project"].get("dynamic", [])


def test_requirements_never_name_torch_or_xformers():
    for line in requirement_lines():
        assert not line.startswith("-"), f"{line!r}: the Manager runs pip once per line; no options or includes"
        assert requirement_name(line) not in NEVER_REQUIRED, f"{line!r}: ComfyUI owns torch; xformers is optional"


def test_registry_metadata(pyproject):
    project, comfy = pyproject["project"], pyproject["tool"]["comfy"]
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]{0,99}", project["name"])
    assert "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["description"] and project["requires-python"] == ">=3.10"
    assert project["license"] == {"file": "LICENSE"} and (REPO / "LICENSE").is_file()
    assert "GNU GENERAL PUBLIC LICENSE" not in (REPO / "LICENSE").read_text()
    assert "Operating System :: OS Independent" in project["classifiers"]
    assert [c for c in project["classifiers"] if c in ACCELERATORS] == ["Environment :: GPU :: NVIDIA CUDA"]
    assert all(c.startswith(("Operating System ::", "Environment ::")) for c in project["classifiers"])
    assert project["urls"]["Repository"].startswith("https://github.com/")
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["Icon"].startswith("https://")
    assert re.fullmatch(r"(>=|<=|==|>|<|!=|~=)?\d+\.\d+\.\d+", comfy["requires-comfyui"])
    raw = r"https://raw\.githubusercontent\.com/([^/]+/[^/]+)/[^/]+/(.+\.(?:png|svg|jpg|gif))"
    icon = re.fullmatch(raw, comfy["Icon"])
    assert icon, comfy["Icon"]  # served from this repository, so it exists once the repo is published
    assert project["urls"]["Repository"].endswith("/" + icon.group(1)) and (REPO / icon.group(2)).is_file()


# --- shipped files ------------------------------------------------------------------------------------------

def test_comfyignore_uses_supported_syntax():
    patterns = comfyignore_patterns(REPO)
    assert patterns and not [p for p in patterns if p.startswith("!") or "**" in p]


def test_comfyignore_matcher_agrees_with_git():
    """The matcher above against git's own for every tracked file."""
    ignored_by_git = set(git_files(REPO, "--cached", "--ignored", "--exclude-from=.comfyignore"))
    patterns = comfyignore_patterns(REPO)
    for path in git_files(REPO, "--cached"):
        assert is_comfyignored(path, patterns) == (path in ignored_by_git), path


def test_shipped_set_is_the_pack_without_development_files():
    files = shipped_files(REPO)
    for folder in ("tests/", "benchmarks/", "scripts/", "docs/", ".ci/", "node_modules/"):
        assert not [f for f in files if f.startswith(folder)], folder
    assert not [f for f in files if f.startswith("package") and f.endswith(".json")]
    for needed in ("__init__.py", "pyproject.toml", "requirements.txt", "LICENSE", "README.md",
                   "nodes/extension.py", "processors/backends.py", "example_workflows/sd15_image_prompt.json"):
        assert needed in files, needed
    assert any(f.startswith("web/") and f.endswith(".js") for f in files)
    assert not [f for f in files if f.startswith("web/") and re.search(r"(\.min\.js|/dist/)", f)], "bundled JS"


def test_shipped_files_contain_no_flagged_pattern():
    assert scan(REPO, shipped_files(REPO)) == []


def test_scan_flags_planted_patterns_in_a_copy(tmp_path):
    """The check can fail: plant flagged text in a copy of the shipped files (plus an ignored test file)."""
    copy = tmp_path / "pack"
    for rel in shipped_files(REPO) + [".comfyignore"]:
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, copy / rel)
    (copy / "nodes" / "planted.py").write_text("import os\nTOKEN = os.environ.get('X')\n")
    (copy / "web" / "planted.js").write_text("export function link(a, b) { a.connect(0, b, 0); }\n")
    (copy / "README.md").write_text((copy / "README.md").read_text() + "\nrun it with subprocess.run\n")
    (copy / "tests").mkdir(exist_ok=True)
    (copy / "tests" / "helper.py").write_text("import subprocess\n")  # left out by .comfyignore
    subprocess.run(["git", "init", "-q", str(copy)], check=True)
    subprocess.run(["git", "-C", str(copy), "add", "-A"], check=True)

    files = shipped_files(copy)
    assert "tests/helper.py" not in files and "nodes/planted.py" in files
    findings = scan(copy, files)
    assert findings == ["README.md:{}: subprocess".format(len((copy / "README.md").read_text().splitlines())),
                        "nodes/planted.py:2: os.environ", "web/planted.js:1: .connect("], findings
