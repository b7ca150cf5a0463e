"""Shared benchmark helpers: timing (interleaved, median), devices, peak memory, tables and plots."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

NA = "n/a"


def setup_threads(device: str, threads: Optional[int]) -> int:
    """CPU default: 1 thread, so figures are stable on a shared machine (ratios are what we compare)."""
    if device == "cpu":
        torch.set_num_threads(threads or 1)
    return torch.get_num_threads()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _inner_iterations(fn: Callable[[], object], device: str, target_s: float = 2e-3) -> int:
    """Calls per timed sample: 1 on CPU; on a GPU enough to cover launch-latency noise."""
    if not device.startswith("cuda"):
        return 1
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    once = max(time.perf_counter() - start, 1e-6)
    return max(1, min(200, int(target_s / once)))


def time_interleaved(fns: dict[str, Callable[[], object]], device: str, budget_s: float,
                     min_repeats: int = 5, max_repeats: int = 100) -> dict[str, float]:
    """Median seconds per call of each fn, sampled round-robin so load changes hit every variant alike."""
    inner = {}
    for name, fn in fns.items():
        fn()  # warm-up (resolution caches, allocator)
        inner[name] = _inner_iterations(fn, device)
    sync(device)
    start = time.perf_counter()
    for name, fn in fns.items():
        for _ in range(inner[name]):
            fn()
    sync(device)
    one_round = max(time.perf_counter() - start, 1e-6)
    repeats = int(min(max_repeats, max(min_repeats, budget_s / one_round)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            sync(device)
            samples[name].append((time.perf_counter() - t0) / inner[name])
    return {name: statistics.median(values) for name, values in samples.items()}


def peak_memory_mib(fn: Callable[[], object], device: str) -> Optional[float]:
    """Extra GPU memory one call allocates at its peak (torch.cuda.max_memory_allocated); None on CPU."""
    if not device.startswith("cuda"):
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def environment(device: str) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": device,
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import xformers

        info["xformers"] = xformers.__version__
    except Exception:  # noqa: BLE001 - reported, not needed
        info["xformers"] = "not importable"
    return info


def fmt(value: Optional[float], spec: str = ".2f", suffix: str = "") -> str:
    return NA if value is None else f"{value:{spec}}{suffix}"


@dataclass
class Table:
    columns: Sequence[str]
    rows: list[list[str]] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        self.rows.append([str(c) for c in cells])

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "|".join("---" for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


def write_results(stem: str, title: str, env: dict, sections: list[tuple[str, str]], data: object) -> Path:
    """`benchmarks/results/<stem>.md` (tables) and `<stem>.json` (raw figures)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    for heading, body in sections:
        lines += [f"## {heading}", "", body, ""]
    path = RESULTS / f"{stem}.md"
    path.write_text("\n".join(lines))
    (RESULTS / f"{stem}.json").write_text(json.dumps({"environment": env, "results": data}, indent=1))
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
