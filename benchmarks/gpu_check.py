"""GPU check of the attention engine: every operator that can run, on SD1.5 and SDXL attention shapes.

For each shape, dtype (fp16, bf16), bias (none / aligned tensor bias) and every `op` choice that can run
here, it prints the max error against an fp32 reference and the median time per call; then the IP-Adapter
processor in separate and fused mode against float32 reference maths; then one batch beyond the CUDA grid
limit. It exits non-zero on any mismatch. Sized to finish in a couple of minutes on one H100/H200.

    python benchmarks/gpu_check.py                   # on a CUDA machine
    python benchmarks/gpu_check.py --device cpu --quick   # dry run of the same code on CPU
    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "scripts")]

from processors import backends, planner  # noqa: E402
from processors.backends import OP_CHOICES, AttentionOpConfig  # noqa: E402
from processors.bias import aligned_bias  # noqa: E402
from processors.ip_attention import IPBranch, XFormersIPAdapterAttnProcessor  # noqa: E402
from harness.oracle import reference_attention  # noqa: E402

# (name, batch, queries, heads, head dim): SD1.5 levels 1-4, SDXL levels 2-3 (B = 2: cond + uncond)
SHAPES = [
    ("SD1.5 L1", 2, 4096, 8, 40), ("SD1.5 L2", 2, 1024, 8, 80), ("SD1.5 L3", 2, 256, 8, 160),
    ("SD1.5 L4", 2, 64, 8, 160), ("SDXL L2", 2, 4096, 10, 64), ("SDXL L3", 2, 1024, 20, 64),
]
TEXT_TOKENS, IMAGE_TOKENS = 77, 16
TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 4e-2, torch.float32: 2e-4}  # relative to max |reference|


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median wall time per call in microseconds (synchronised on CUDA)."""
    fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12)).item()


def operator_rows(device, dtypes, shapes, repeats):
    rows, failures = [], []
    for name, batch, q_len, heads, dim in shapes:
        gen = torch.Generator(device="cpu").manual_seed(0)
        q32 = torch.randn(batch, q_len, heads, dim, generator=gen).to(device)
        k32 = torch.randn(batch, TEXT_TOKENS, heads, dim, generator=gen).to(device)
        v32 = torch.randn(batch, TEXT_TOKENS, heads, dim, generator=gen).to(device)
        raw_bias = -torch.rand(batch, 1, q_len, TEXT_TOKENS, generator=gen).to(device) * 4
        for dtype in dtypes:
            q, k, v = q32.to(dtype), k32.to(dtype), v32.to(dtype)
            for with_bias in (False, True):
                bias = aligned_bias(raw_bias, (batch, heads, q_len, TEXT_TOKENS), dtype, device) if with_bias else None
                ref = backends.prepare("sdpa:math", q32, k32, v32,
                                       bias.float() if with_bias else None).runner(q32, k32, v32,
                                                                                   bias.float() if with_bias else None)
                for op in OP_CHOICES[1:]:
                    prepared = backends.prepare(op, q, k, v, bias)
                    if prepared.runner is None:
                        rows.append((name, dtype, with_bias, op, "n/a", "n/a", "; ".join(prepared.reasons)[:80]))
                        continue
                    out = prepared.runner(q, k, v, bias)
                    error = relative_error(out, ref)
                    micros = timed(lambda: prepared.runner(q, k, v, bias), device, repeats)
                    ok = error <= TOLERANCE[dtype]
                    rows.append((name, dtype, with_bias, op, f"{error:.2e}", f"{micros:.1f}",
                                 prepared.detail + ("" if ok else "  MISMATCH")))
                    if not ok:
                        failures.append(f"{name} {dtype} bias={with_bias} {op}: relative error {error:.2e}")
    return rows, failures


def processor_rows(device, dtypes, shapes, repeats):
    """The IP-Adapter processor (text + 2 adapters, one masked) in separate and fused mode."""
    rows, failures = [], []
    for name, batch, q_len, heads, dim in shapes:
        gen = torch.Generator(device="cpu").manual_seed(1)
        inner = heads * dim
        rand = lambda *s: torch.randn(*s, generator=gen).to(device)  # noqa: E731
        q, k, v = rand(batch, q_len, inner), rand(batch, TEXT_TOKENS, inner), rand(batch, TEXT_TOKENS, inner)
        mask = (torch.rand(1, q_len, generator=gen) > 0.5).float().to(device)
        branches = [IPBranch(rand(1, IMAGE_TOKENS, inner), rand(1, IMAGE_TOKENS, inner), 0.8, mask),
                    IPBranch(rand(batch, 4, inner), rand(batch, 4, inner), 0.5)]
        ref = reference_attention(q, k, v, heads, branches).float()
        for dtype in dtypes:
            cast = [IPBranch(b.k.to(dtype), b.v.to(dtype), b.scale, b.mask) for b in branches]
            args = (q.to(dtype), k.to(dtype), v.to(dtype), heads, cast)
            for op in ("auto", "xformers", "sdpa"):
                for fused in (False, True):
                    processor = XFormersIPAdapterAttnProcessor(AttentionOpConfig(op=op, fused=fused))
                    planner.begin_run()
                    out = processor(*args)
                    ran = " | ".join(_what_ran(line) for line in planner.run_reports())
                    error = relative_error(out, ref)
                    micros = timed(lambda: processor(*args), device, repeats)
                    ok = error <= TOLERANCE[dtype]
                    rows.append((name, dtype, op, "fused" if fused else "separate", f"{error:.2e}", f"{micros:.1f}",
                                 ran + ("" if ok else "  MISMATCH")))
                    if not ok:
                        failures.append(f"processor {name} {dtype} {op} fused={fused}: relative error {error:.2e}")
    return rows, failures


def _what_ran(report_line: str) -> str:
    """The operator or formulation a report line names, without its reasons (notes are kept whole)."""
    if ": ran " not in report_line:
        return report_line
    return report_line.split(": ran ", 1)[1].split(" because")[0]


def grid_limit_check(device, dtype) -> list[str]:
    """A batch beyond 65,535 (the CUDA grid's batch axis) must be chunked, not crash."""
    batch = 65_536 + 8
    gen = torch.Generator(device="cpu").manual_seed(2)
    q = torch.randn(batch, 16, 1, 64, generator=gen).to(device, dtype)
    k = torch.randn(batch, 8, 1, 64, generator=gen).to(device, dtype)
    planner.begin_run()
    out = planner.Planner(AttentionOpConfig(op="auto")).attention(q, k, k)
    report = planner.run_reports()[-1]
    ref = planner.Planner(AttentionOpConfig(op="sdpa:math")).attention(q.float(), k.float(), k.float())
    error = relative_error(out, ref)
    print(f"\nbatch {batch} (beyond the grid limit): {report}; relative error {error:.2e}")
    return [] if error <= TOLERANCE[dtype] else [f"grid-limit batch: relative error {error:.2e}"]


def table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(str(c).replace("torch.", "") for c in row) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="two shapes, fewer repeats")
    parser.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtypes = [torch.float16, torch.bfloat16] if device.type == "cuda" else [torch.float32, torch.bfloat16]
    shapes = SHAPES[2:4] if args.quick else SHAPES
    repeats = 5 if args.quick else 30
    report = backends.operator_report(device)
    header = (f"torch {report['versions']['torch']}, xformers {report['versions']['xformers']}, device "
              f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    print(header)
    if report["xformers_problem"]:
        print("xformers:", report["xformers_problem"])
    op_rows, failures = operator_rows(device, dtypes, shapes, repeats)
    proc_rows, proc_failures = processor_rows(device, dtypes, shapes, repeats)
    failures += proc_failures
    if device.type == "cuda" and not args.quick:
        failures += grid_limit_check(device, dtypes[0])
    text = "\n\n".join([
        header,
        table(["shape", "dtype", "bias", "op", "rel. error", "median us", "kernel / why not"], op_rows),
        table(["shape", "dtype", "op", "mode", "rel. error", "median us", "ran"], proc_rows),
    ])
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if failures:
        print("\nMISMATCHES:\n" + "\n".join(failures), file=sys.stderr)
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
