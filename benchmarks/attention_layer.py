"""One attn2 call (77 text tokens + IP-Adapters) per formulation, operator and shape.

Rows (all in the same run, timed round-robin, medians):
  text        the text-only attention on the operator (the baseline of every ratio but diffusers')
  ours        XFormersIPAdapterAttnProcessor as shipped (its per-signature formulation rule)
  separate    ours forced to one kernel call per attention
  single      ours forced to the single pass (processors/single_pass.py)
  fused       ours in fused mode: one block-diagonal xformers call (n/a where no xformers op runs)
  two-call    what existing packs do: text attention, then per adapter to_k_ip/to_v_ip on the image tokens
              (every call) and an attention with the same kernel, added up
  diffusers   IPAdapterAttnProcessor2_0 on a diffusers Attention module: the WHOLE processor (to_q/k/v,
              to_k_ip/to_v_ip, to_out); its ratio is to AttnProcessor2_0 on the same module
  diffusers-xf  IPAdapterXFormersAttnProcessor (GPU with a working xformers only), ratio to XFormersAttnProcessor

CPU (default): fp32, 1 thread unless --threads. GPU: --device cuda, fp16 and bf16, every operator that runs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from common import (NA, RESULTS, Table, environment, fmt, peak_memory_mib, pyplot, setup_threads, time_interleaved,
                    write_results)
from processors import backends, single_pass
from processors.backends import OP_CHOICES, AttentionOpConfig
from processors.fused import fused_unavailable_reason
from processors.ip_attention import IPBranch, XFormersIPAdapterAttnProcessor
from processors.xformers_env import xformers_status

BATCH, TEXT_TOKENS, WEIGHT = 2, 77, 0.8


@dataclass(frozen=True)
class Shape:
    model: str
    queries: int
    heads: int
    dim: int
    cross: int

    @property
    def inner(self) -> int:
        return self.heads * self.dim

    @property
    def label(self) -> str:
        return f"{self.model} {self.queries}x{self.heads}x{self.dim}"


SHAPES = [Shape("SD1.5", 4096, 8, 40, 768), Shape("SD1.5", 1024, 8, 80, 768), Shape("SD1.5", 256, 8, 160, 768),
          Shape("SD1.5", 64, 8, 160, 768), Shape("SDXL", 4096, 10, 64, 2048), Shape("SDXL", 1024, 20, 64, 2048)]
IMAGE_TOKENS = (4, 16, 257)
ADAPTERS = (1, 3)
VARIANTS = ("ours", "separate", "single", "fused", "two-call", "diffusers", "diffusers-xf")


@contextlib.contextmanager
def formulation(name: Optional[str]):
    """Force the processor's formulation: "separate", "single", or None for its own rule."""
    original = single_pass.applies
    if name == "separate":
        single_pass.applies = lambda *a, **k: False
    elif name == "single":
        single_pass.applies = lambda op, q4, lengths, has_bias: bool(lengths) and not has_bias
    try:
        yield
    finally:
        single_pass.applies = original


@dataclass
class Case:
    shape: Shape
    tokens: int
    adapters: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    text_states: torch.Tensor
    image_states: list[torch.Tensor]  # [B, L, cross] image tokens per adapter
    w_k: list[torch.Tensor]
    w_v: list[torch.Tensor]
    branches: list[IPBranch]  # K/V projected once, as our per-run cache holds them


def make_case(shape: Shape, tokens: int, adapters: int, device: str, dtype: torch.dtype) -> Case:
    gen = torch.Generator().manual_seed(shape.queries + tokens + adapters)
    rand = lambda *s, std=1.0: (torch.randn(*s, generator=gen) * std).to(device, dtype)  # noqa: E731
    image_states = [rand(BATCH, tokens, shape.cross) for _ in range(adapters)]
    w_k = [rand(shape.inner, shape.cross, std=shape.cross ** -0.5) for _ in range(adapters)]
    w_v = [rand(shape.inner, shape.cross, std=shape.cross ** -0.5) for _ in range(adapters)]
    branches = [IPBranch(F.linear(x, wk), F.linear(x, wv), WEIGHT) for x, wk, wv in zip(image_states, w_k, w_v)]
    return Case(shape, tokens, adapters, rand(BATCH, shape.queries, shape.inner),
                rand(BATCH, TEXT_TOKENS, shape.inner), rand(BATCH, TEXT_TOKENS, shape.inner),
                rand(BATCH, TEXT_TOKENS, shape.cross), image_states, w_k, w_v, branches)


def _bmhk(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.view(x.shape[0], x.shape[1], heads, -1)


def text_call(case: Case, op: str) -> Callable[[], torch.Tensor]:
    h = case.shape.heads
    q4, k4, v4 = _bmhk(case.q, h), _bmhk(case.k, h), _bmhk(case.v, h)
    return lambda: backends.attention(q4, k4, v4, op=op)


def two_call(case: Case, op: str) -> Callable[[], torch.Tensor]:
    """Existing packs: text attention, then per adapter K/V projected from the image tokens and attended."""
    h = case.shape.heads
    q4, k4, v4 = _bmhk(case.q, h), _bmhk(case.k, h), _bmhk(case.v, h)

    def run() -> torch.Tensor:
        out = backends.attention(q4, k4, v4, op=op)
        for x, wk, wv in zip(case.image_states, case.w_k, case.w_v):
            ip = backends.attention(q4, _bmhk(F.linear(x, wk), h), _bmhk(F.linear(x, wv), h), op=op)
            out = out + WEIGHT * ip
        return out.reshape(case.q.shape)

    return run


def ours(case: Case, op: str, how: Optional[str], fused: bool = False) -> Callable[[], torch.Tensor]:
    processor = XFormersIPAdapterAttnProcessor(AttentionOpConfig(op=op, fused=fused))

    def run() -> torch.Tensor:
        with formulation(how):
            return processor(case.q, case.k, case.v, case.shape.heads, case.branches)

    return run


def diffusers_pair(case: Case, xformers: bool) -> Optional[tuple[Callable, Callable]]:
    """(text-only, IP) runs of diffusers' processors on one Attention module, or None where they cannot run."""
    from diffusers.models import attention_processor as ap

    s = case.shape
    device, dtype = case.q.device, case.q.dtype
    attn = ap.Attention(query_dim=s.inner, cross_attention_dim=s.cross, heads=s.heads, dim_head=s.dim,
                        out_bias=True).to(device, dtype).eval()
    ip_class, text_class = ((ap.IPAdapterXFormersAttnProcessor, ap.XFormersAttnProcessor) if xformers else
                            (ap.IPAdapterAttnProcessor2_0, ap.AttnProcessor2_0))
    ip = ip_class(hidden_size=s.inner, cross_attention_dim=s.cross, num_tokens=[case.tokens] * case.adapters,
                  scale=[WEIGHT] * case.adapters).to(device, dtype)
    text_attn = copy.deepcopy(attn)
    text_attn.set_processor(text_class())
    attn.set_processor(ip)
    hidden = case.q  # hidden states of the query width

    def run_text():
        return text_attn(hidden, encoder_hidden_states=case.text_states)

    def run_ip():
        return attn(hidden, encoder_hidden_states=(case.text_states, list(case.image_states)))

    return run_text, run_ip


def fused_reason(case: Case, op: str) -> str:
    """Empty when fused mode runs an xformers op for this case."""
    why = fused_unavailable_reason()
    if why:
        return why
    if op.startswith("sdpa"):
        return "fused needs an xformers op"
    h = case.shape.heads
    ran = backends.resolve(op, _bmhk(case.q, h), _bmhk(case.k, h), _bmhk(case.v, h)).ran
    return "" if ran.startswith("xformers") else f"{op} runs {ran}"


def runnable_ops(device: str, dtype: torch.dtype, requested: list[str]) -> tuple[list[str], dict[str, str]]:
    """Ops that run the typical text call here; the others with their reasons."""
    q = torch.zeros(BATCH, 64, 8, 64, device=device, dtype=dtype)
    k = torch.zeros(BATCH, TEXT_TOKENS, 8, 64, device=device, dtype=dtype)
    ok, skipped = [], {}
    for op in requested:
        concrete = "sdpa" if op == "auto" and xformers_status().problem else ("xformers" if op == "auto" else op)
        reasons = backends.prepare(concrete, q, k, k).reasons
        if reasons and op != "auto":
            skipped[op] = "; ".join(reasons)
        else:
            ok.append(op)
    return ok, skipped


def measure(case: Case, op: str, device: str, budget_s: float, with_diffusers: bool) -> dict:
    fns: dict[str, Callable] = {"text": text_call(case, op), "ours": ours(case, op, None),
                                "separate": ours(case, op, "separate"), "single": ours(case, op, "single"),
                                "two-call": two_call(case, op)}
    notes = {}
    why = fused_reason(case, op)
    if why:
        notes["fused"] = why
    else:
        fns["fused"] = ours(case, op, None, fused=True)
    if with_diffusers:
        fns["diffusers-text"], fns["diffusers"] = diffusers_pair(case, xformers=False)
        if device.startswith("cuda") and not xformers_status().problem:
            fns["diffusers-xf-text"], fns["diffusers-xf"] = diffusers_pair(case, xformers=True)
        else:
            notes["diffusers-xf"] = "needs a GPU and a working xformers"
    with torch.inference_mode():
        times = time_interleaved(fns, device, budget_s)
        memory = {name: peak_memory_mib(fns[name], device) for name in ("text", "ours", "two-call", "diffusers")
                  if name in fns}
    return {"times": times, "memory": memory, "notes": notes, "ran": ran_reports(case, op)}


def ran_reports(case: Case, op: str) -> list[str]:
    backends.begin_run()
    with torch.inference_mode():
        ours(case, op, None)()
    return backends.run_reports()


def ratio(result: dict, name: str) -> Optional[float]:
    times = result["times"]
    if name not in times:
        return None
    base = {"diffusers": "diffusers-text", "diffusers-xf": "diffusers-xf-text"}.get(name, "text")
    return times[name] / times[base]


def table(results: list[dict], dtype: str, op: str) -> str:
    rows = [r for r in results if r["dtype"] == dtype and r["op"] == op]
    columns = ["shape", "image tokens", "adapters", "text ms"] + [f"{v} x" for v in VARIANTS] + [
        "ours / two-call", "formulation", "peak MiB ours / two-call / diffusers"]
    t = Table(columns)
    for r in rows:
        mem = r["memory"]
        ran = "single pass" if any(single_pass.NAME in line for line in r["ran"]) else "separate"
        t.add(r["shape"], r["tokens"], r["adapters"], f"{r['times']['text'] * 1e3:.3f}",
              *[fmt(ratio(r, v)) for v in VARIANTS], fmt(r["times"]["ours"] / r["times"]["two-call"]), ran,
              " / ".join(fmt(mem.get(n), ".1f") for n in ("ours", "two-call", "diffusers")))
    return t.markdown()


def plot(results: list[dict], dtype: str, op: str, path) -> None:
    plt = pyplot()
    rows = [r for r in results if r["dtype"] == dtype and r["op"] == op]
    tokens = sorted({r["tokens"] for r in rows})
    adapters = sorted({r["adapters"] for r in rows})
    shown = ("ours", "separate", "single", "two-call", "diffusers")
    fig, axes = plt.subplots(len(tokens), len(adapters), figsize=(6.5 * len(adapters), 3.4 * len(tokens)),
                             squeeze=False)
    for i, n_tok in enumerate(tokens):
        for j, n_ad in enumerate(adapters):
            ax = axes[i][j]
            cell = [r for r in rows if r["tokens"] == n_tok and r["adapters"] == n_ad]
            width = 0.8 / len(shown)
            for s, name in enumerate(shown):
                values = [ratio(r, name) or 0.0 for r in cell]
                ax.bar([x + s * width for x in range(len(cell))], values, width, label=name)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cell))])
            ax.set_xticklabels([r["shape"].replace(" ", "\n") for r in cell], fontsize=7)
            ax.set_title(f"{n_tok} image tokens, {n_ad} adapter(s)", fontsize=9)
            ax.set_ylabel("time / text-only call", fontsize=8)
    axes[0][0].legend(fontsize=7, ncol=len(shown))
    fig.suptitle(f"attn2 call with IP-Adapters: {dtype}, op {op!r} (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtypes", nargs="*", help="default: float32 on CPU, float16 bfloat16 on GPU")
    parser.add_argument("--ops", nargs="*", help="default: auto sdpa:math on CPU, every op choice on GPU")
    parser.add_argument("--quick", action="store_true", help="4 image tokens only, short timing budget")
    parser.add_argument("--budget", type=float, help="seconds of timing per case (default 1.2 CPU, 0.1 GPU)")
    parser.add_argument("--threads", type=int, help="CPU threads (default 1: stable on a shared machine)")
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument("--stem", help="results file stem (default attention_layer_<device>[_quick])")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    gpu = args.device.startswith("cuda")
    setup_threads(args.device, args.threads)
    dtypes = args.dtypes or (["float16", "bfloat16"] if gpu else ["float32"])
    requested = args.ops or (list(OP_CHOICES) if gpu else ["auto", "sdpa:math"])
    budget = args.budget or (0.1 if gpu else (0.4 if args.quick else 1.2))
    tokens = (4,) if args.quick else IMAGE_TOKENS
    results, skipped_all = [], {}
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        ops, skipped = runnable_ops(args.device, dtype, requested)
        skipped_all[dtype_name] = skipped
        for op in ops:
            for n_tok in tokens:
                for n_ad in ADAPTERS:
                    for shape in SHAPES:
                        case = make_case(shape, n_tok, n_ad, args.device, dtype)
                        r = measure(case, op, args.device, budget, not args.no_diffusers)
                        r.update(shape=shape.label, tokens=n_tok, adapters=n_ad, dtype=dtype_name, op=op)
                        results.append(r)
                        print(f"{dtype_name} {op:16s} {shape.label:22s} L={n_tok:3d} n={n_ad} "
                              f"text {r['times']['text'] * 1e3:8.3f} ms  " +
                              "  ".join(f"{v} {fmt(ratio(r, v))}" for v in VARIANTS), flush=True)
    write_report(args, results, skipped_all)


def write_report(args: argparse.Namespace, results: list[dict], skipped: dict) -> None:
    stem = args.stem or f"attention_layer_{'gpu' if args.device.startswith('cuda') else 'cpu'}" + (
        "_quick" if args.quick else "")
    env = environment(args.device)
    sections = [("How to read", READING)]
    for dtype_name in dict.fromkeys(r["dtype"] for r in results):
        for op in dict.fromkeys(r["op"] for r in results if r["dtype"] == dtype_name):
            png = f"{stem}_{dtype_name}_{op.replace(':', '-')}.png"
            plot(results, dtype_name, op, RESULTS / png)
            sections.append((f"{dtype_name}, op {op!r}", f"![plot]({png})\n\n" + table(results, dtype_name, op)))
        if skipped.get(dtype_name):
            sections.append((f"{dtype_name}: operators that cannot run here",
                             "\n".join(f"- `{op}`: {why}" for op, why in skipped[dtype_name].items())))
    notes = sorted({f"{k}: {v}" for r in results for k, v in r["notes"].items()})
    sections.append(("Notes", "\n".join(f"- {n}" for n in notes) or "none"))
    path = write_results(stem, "attn2 call with IP-Adapters", env, sections, results)
    print(f"wrote {path}")


READING = (
    "Median time per call over interleaved repeats. `text ms`: the text-only attention (77 tokens) on the "
    "operator. Every `x` column is a ratio to that text-only call on the same kernel (diffusers rows: to "
    "diffusers' text-only processor on the same module, since they include the projections). `ours`: the "
    "shipped processor (image K/V cached per run, formulation per signature); `separate` / `single`: ours "
    "forced to one formulation; `fused`: one block-diagonal xformers call (n/a without an xformers kernel); "
    f"`two-call`: text attention then per adapter to_k_ip/to_v_ip + attention (existing packs). {NA}: does not "
    "run here. Peak memory: extra bytes allocated at the peak of one call (torch.cuda; n/a on CPU).")


if __name__ == "__main__":
    main()
