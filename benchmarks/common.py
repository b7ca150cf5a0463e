"""Shared benchmark helpers: timing (interleaved, median), devices, peak memory, tables and plots."""

from __future__ import annotations

import json
import math
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
for _path in (REPO_ROOT / "scripts", REPO_ROOT):  # the pack's processors/, and the harness (scripts/harness)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

NA = "n/a"


def setup_threads(device: str, threads: Optional[int]) -> int:
    """CPU default: 1 thread, so figures are stable on a shared machine (ratios are what we compare)."""
    if device == "cpu":
        torch.set_num_threads(threads or 1)
    return torch.get_num_threads()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def clock(device: str) -> Callable[[], float]:
    """The timer of a sample. GPU: wall time between synchronizations. CPU: the process's CPU time
    (`time.process_time`): on a machine shared with other jobs, wall time also counts the slices the
    scheduler gives to them, which varies from one sample to the next; with one thread (`setup_threads`) the
    CPU time is the work the call itself did (memory and cache contention from other jobs still count)."""
    return time.perf_counter if device.startswith("cuda") else time.process_time


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


@dataclass(frozen=True)
class Estimate:
    """A median with a distribution-free 95 % confidence interval (order statistics of the samples)."""

    value: float
    low: float
    high: float
    samples: int

    @property
    def noise(self) -> float:
        """Half-width of the interval, on the side where it is wider (the figure printed after '±')."""
        return max(self.value - self.low, self.high - self.value)

    def excludes(self, reference: float) -> bool:
        """Whether the interval lies wholly on one side of `reference` (e.g. 1.0 for a ratio)."""
        return reference < self.low or reference > self.high

    def text(self, spec: str = ".2f") -> str:
        return f"{self.value:{spec}} ±{self.noise:{spec}}"

    def as_dict(self) -> dict:
        return {"median": self.value, "ci95": [self.low, self.high], "samples": self.samples}


def _median_rank_margin(n: int, level: float) -> int:
    """Largest l >= 1 with P(Binomial(n, 1/2) <= l - 1) <= (1 - level) / 2, or 0 when n is too small.

    The interval [x_(l), x_(n-l+1)] of the sorted samples then covers the true median with probability
    >= level, whatever the distribution (the usual sign-test interval)."""
    alpha = (1.0 - level) / 2
    cumulative, margin = 0.0, 0
    for l in range(1, n // 2 + 1):
        cumulative += math.comb(n, l - 1) / 2 ** n
        if cumulative > alpha:
            break
        margin = l
    return margin


def estimate(values: Sequence[float], level: float = 0.95) -> Estimate:
    ordered = sorted(values)
    margin = _median_rank_margin(len(ordered), level)
    if margin == 0:  # too few samples for the level: the full range, reported as such
        return Estimate(statistics.median(ordered), ordered[0], ordered[-1], len(ordered))
    return Estimate(statistics.median(ordered), ordered[margin - 1], ordered[-margin], len(ordered))


@dataclass
class Timings:
    """Seconds per call of each variant, one sample per interleaved round (sample i of every variant comes
    from the same round, so a ratio is taken per round: a load change on the shared machine hits both)."""

    samples: dict[str, list[float]]

    def __contains__(self, name: str) -> bool:
        return name in self.samples

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def ratio(self, numerator: str, denominator: str) -> Estimate:
        pairs = zip(self.samples[numerator], self.samples[denominator])
        return estimate([a / b for a, b in pairs])

    def medians(self) -> dict[str, float]:
        return {name: self.median(name) for name in self.samples}


def time_interleaved(fns: dict[str, Callable[[], object]], device: str, budget_s: float,
                     min_repeats: int = 9, max_repeats: int = 100) -> Timings:
    """Every fn sampled round-robin (so load changes hit every variant alike), enough rounds to fill
    `budget_s` and at least `min_repeats` (9 rounds give a 95 % interval of the median: ranks 2 and 8)."""
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
    return time_rounds(fns, device, repeats, inner)


def time_rounds(fns: dict[str, Callable[[], object]], device: str, repeats: int,
                inner: Optional[dict[str, int]] = None) -> Timings:
    """`repeats` interleaved rounds of already warm fns; `inner` calls per sample (default 1)."""
    now = clock(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            calls = (inner or {}).get(name, 1)
            sync(device)
            t0 = now()
            for _ in range(calls):
                fn()
            sync(device)
            samples[name].append((now() - t0) / calls)
    return Timings(samples)


def bootstrap_comfy(device: str, extra_args: Sequence[str] = ()) -> None:
    """ComfyUI importable in this process: `--cpu` (plus `extra_args`) on CPU, its default device otherwise."""
    from harness import comfy_bootstrap

    if device == "cpu":
        comfy_bootstrap.bootstrap(extra_args=tuple(extra_args))
        return
    path = str(comfy_bootstrap.resolve_comfyui())  # the harness bootstrap always passes --cpu
    if "comfy.cli_args" in sys.modules:
        return
    sys.path.insert(0, path)
    saved, sys.argv = sys.argv, [sys.argv[0], *extra_args]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  (parses sys.argv once, here)
    finally:
        sys.argv = saved


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
