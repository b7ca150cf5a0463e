"""Measured numerical parity of the engine (the figures quoted in the docs and issue notes).

    python benchmarks/parity_report.py                                        # print the tables
    python benchmarks/parity_report.py --out benchmarks/results/parity_cpu.md   # and write them

Rows: every processor path against float64 reference maths written from the formula (scripts/harness/oracle.py;
fp32 max abs error, bf16 max relative error), with what the planner ran for each dtype; and our diffusers
processor against diffusers' IPAdapterAttnProcessor2_0 (fp32 max abs error). Errors are deterministic (fixed
seeds, one thread): no timing, so no noise to state.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "scripts")]

from processors import planner  # noqa: E402
from processors.backends import AttentionOpConfig  # noqa: E402
from processors.fused import materialized_runner  # noqa: E402
from processors.ip_attention import IPBranch, XFormersIPAdapterAttnProcessor  # noqa: E402
from harness.oracle import reference_attention  # noqa: E402

HEADS, DIM = 8, 40
PATHS = {
    "auto": dict(attention_op=AttentionOpConfig()),
    "sdpa:math": dict(attention_op=AttentionOpConfig(op="sdpa:math")),
    "attention-bias masks": dict(attention_op=AttentionOpConfig(mask_mode="attention bias")),
    # an explicit op: under auto on CPU fp32 the planner prefers the single pass to both of these paths
    "fused, op xformers (packing + materialized bias)": dict(attention_op=AttentionOpConfig(op="xformers", fused=True),
                                                             fused_runner=materialized_runner),
    "chunked batch (limit 1), op sdpa": dict(attention_op=AttentionOpConfig(op="sdpa"), batch_limit=1),
}


def case(q_len: int = 1024):
    gen = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    inner = HEADS * DIM
    mask = (torch.rand(1, q_len, generator=gen, dtype=torch.float64) > 0.5).double()
    branches = [IPBranch(rand(1, 4, inner), rand(1, 4, inner), 0.7, mask),
                IPBranch(rand(2, 16, inner), rand(2, 16, inner), torch.tensor([1.0, 0.5], dtype=torch.float64))]
    return rand(2, q_len, inner), rand(2, 77, inner), rand(2, 77, inner), branches


def engine_rows() -> list[str]:
    q, k, v, branches = case()
    ref = reference_attention(q, k, v, HEADS, branches)
    rows = []
    for name, params in PATHS.items():
        errors, ran = [], []
        for dtype in (torch.float32, torch.bfloat16):
            cast = [IPBranch(b.k.to(dtype), b.v.to(dtype), b.scale, b.mask) for b in branches]
            planner.begin_run()
            out = XFormersIPAdapterAttnProcessor(**params)(q.to(dtype), k.to(dtype), v.to(dtype), HEADS, cast)
            ran.append(" + ".join(dict.fromkeys(_what_ran(line) for line in planner.run_reports())))
            diff = (out.double() - ref).abs().max()
            errors.append(diff.item() if dtype == torch.float32 else (diff / ref.abs().max()).item())
        rows.append(f"| {name} | {errors[0]:.1e} | {errors[1]:.1e} | {ran[0]} / {ran[1]} |")
    return rows


def _what_ran(report_line: str) -> str:
    """The operator or formulation a planner report line names, without the reasons that follow it."""
    ran = report_line.split(": ran ", 1)[-1].split(" because")[0]
    return ran.split(" (PyTorch matmuls)")[0]


def diffusers_rows() -> list[str]:
    from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0

    from processors.diffusers_processor import DiffusersXFormersIPAdapterAttnProcessor

    rows = []
    for label, scales, masked in [("1 adapter", [0.8], False), ("2 adapters, scales [1.0, 0.4]", [1.0, 0.4], False),
                                  ("2 adapters, 2 masked images each", [0.9, 0.5], True)]:
        torch.manual_seed(0)
        attn = Attention(query_dim=320, cross_attention_dim=768, heads=HEADS, dim_head=DIM).eval()
        theirs = IPAdapterAttnProcessor2_0(320, 768, num_tokens=[4] * len(scales), scale=scales)
        ours = DiffusersXFormersIPAdapterAttnProcessor(320, 768, num_tokens=[4] * len(scales), scale=scales)
        ours.load_state_dict(theirs.state_dict())
        gen = torch.Generator().manual_seed(1)
        images = 2 if masked else 1
        hidden = torch.randn(2, 256, 320, generator=gen)
        states = (torch.randn(2, 77, 768, generator=gen),
                  [torch.randn(2, images, 4, 768, generator=gen) for _ in scales])
        masks = [(torch.rand(1, images, 32, 32, generator=gen) > 0.5).float() for _ in scales] if masked else None
        with torch.no_grad():
            error = (ours(attn, hidden, states, ip_adapter_masks=masks)
                     - theirs(attn, hidden, states, ip_adapter_masks=masks)).abs().max().item()
        rows.append(f"| {label} | {error:.1e} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    text = "\n".join([
        f"# Numerical parity (CPU)\n\ntorch {torch.__version__}; one case: 2 x {case.__defaults__[0]} queries, "
        f"{HEADS} heads x {DIM}, 77 text tokens, a masked 4-token adapter (scale 0.7) and a 16-token adapter "
        "with per-row scales [1.0, 0.5]; float64 reference from scripts/harness/oracle.py.\n",
        "| path | fp32 max abs error vs float64 | bf16 max relative error | ran (fp32 / bf16) |",
        "|---|---|---|---|", *engine_rows(), "",
        "| diffusers IPAdapterAttnProcessor2_0 parity | fp32 max abs error |", "|---|---|", *diffusers_rows()])
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
