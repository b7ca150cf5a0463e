"""One attn2 call (77 text tokens + IP-Adapters) per formulation, operator and shape.

Rows (all in the same run, timed round-robin):
  text        the text-only attention on the operator (the baseline of our ratios)
  ours        XFormersIPAdapterAttnProcessor as shipped (the planner's formulation for the signature)
  separate    ours forced to one kernel call per attention (op auto only: an explicit op always is)
  single      ours forced to the single pass (processors/single_pass.py; op auto on CPU only)
  fused       ours in fused mode: one block-diagonal xformers call (n/a where no xformers op runs)
  pack        what the standard pack (cubiq/ComfyUI_IPAdapter_plus) does at every attn2 call, step by step:
              sigma read to the host, cond and uncond image K/V projected per call, repeated and
              concatenated to the batch layout, text and image attention through ComfyUI's attention
              function on the same kernel, added (see `standard_pack`); its ratio is to `comfy-text`, the
              text-only call through that same ComfyUI function
  diffusers   IPAdapterAttnProcessor2_0 on a diffusers Attention module: the WHOLE processor (to_q/k/v,
              to_k_ip/to_v_ip, to_out); its ratio is to AttnProcessor2_0 on the same module
  diffusers-xf  IPAdapterXFormersAttnProcessor (GPU with a working xformers only), ratio to XFormersAttnProcessor

Every figure is a median over interleaved rounds with its 95 % confidence interval (`1.45 ±0.03`): ratios
are taken per round (both variants timed in the same round), see common.Timings.

CPU (default): fp32, 1 thread unless --threads; ComfyUI runs with --use-pytorch-cross-attention, so its
`optimized_attention` is PyTorch SDPA, the kernel our `auto` runs on CPU (its CPU default is sub-quadratic
attention, another kernel). GPU: --device cuda, fp16 and bf16, every operator that runs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import statistics
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from common import (NA, RESULTS, Estimate, Table, Timings, bootstrap_comfy, environment, estimate, fmt,
                    peak_memory_mib, pyplot, setup_threads, time_interleaved, write_results)
from processors import backends, planner, single_pass
from processors.backends import OP_CHOICES, AttentionOpConfig
from processors.fused import fused_unavailable_reason
from processors.ip_attention import IPBranch, XFormersIPAdapterAttnProcessor
from processors.xformers_env import xformers_status

BATCH, TEXT_TOKENS, WEIGHT = 2, 77, 0.8
COND_OR_UNCOND = (0, 1)  # ComfyUI's batch layout of a CFG call: row 0 cond, row 1 uncond
SIGMA_START, SIGMA_END = 14.6, 0.03  # an adapter window covering a whole schedule (start_at 0, end_at 1)


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
VARIANTS = ("ours", "separate", "single", "fused", "pack", "diffusers", "diffusers-xf")
BASELINE = {"pack": "comfy-text", "diffusers": "diffusers-text", "diffusers-xf": "diffusers-xf-text"}


@contextlib.contextmanager
def formulation(name: Optional[str]):
    """Force the planner's formulation: "separate", "single", or None for its own rule. Plans are cached per
    processor, so the forced choice sticks to the processor whose first call ran inside this block."""
    original = single_pass.fits
    if name == "separate":
        single_pass.fits = lambda *a, **k: False
    elif name == "single":
        single_pass.fits = lambda q4, lengths: bool(lengths)
    try:
        yield
    finally:
        single_pass.fits = original


@dataclass
class AdapterInputs:
    """One adapter at one site: its image tokens and its to_k_ip / to_v_ip weights."""

    cond: torch.Tensor  # [1, L, cross] image tokens of the reference image
    uncond: torch.Tensor  # [1, L, cross] image tokens of the negative (zero) image
    w_k: torch.Tensor  # [inner, cross]
    w_v: torch.Tensor

    def tokens_by_row(self) -> torch.Tensor:
        """[B, L, cross] in COND_OR_UNCOND order (the layout diffusers' processors take)."""
        return torch.cat([(self.cond, self.uncond)[i] for i in COND_OR_UNCOND])


@dataclass
class Case:
    shape: Shape
    tokens: int
    adapters: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    text_states: torch.Tensor
    sigmas: torch.Tensor  # [B] on the device, as ComfyUI passes them in transformer_options
    inputs: list[AdapterInputs]
    branches: list[IPBranch]  # K/V projected once, as our per-run cache holds them


def make_case(shape: Shape, tokens: int, adapters: int, device: str, dtype: torch.dtype) -> Case:
    gen = torch.Generator().manual_seed(shape.queries + tokens + adapters)
    rand = lambda *s, std=1.0: (torch.randn(*s, generator=gen) * std).to(device, dtype)  # noqa: E731
    inputs = [AdapterInputs(rand(1, tokens, shape.cross), rand(1, tokens, shape.cross),
                            rand(shape.inner, shape.cross, std=shape.cross ** -0.5),
                            rand(shape.inner, shape.cross, std=shape.cross ** -0.5)) for _ in range(adapters)]
    branches = [IPBranch(F.linear(a.tokens_by_row(), a.w_k), F.linear(a.tokens_by_row(), a.w_v), WEIGHT)
                for a in inputs]
    sigmas = torch.full((BATCH,), 7.0, device=device)
    return Case(shape, tokens, adapters, rand(BATCH, shape.queries, shape.inner),
                rand(BATCH, TEXT_TOKENS, shape.inner), rand(BATCH, TEXT_TOKENS, shape.inner),
                rand(BATCH, TEXT_TOKENS, shape.cross), sigmas, inputs, branches)


def _bmhk(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.view(x.shape[0], x.shape[1], heads, -1)


def text_call(case: Case, op: str) -> Callable[[], torch.Tensor]:
    h = case.shape.heads
    q4, k4, v4 = _bmhk(case.q, h), _bmhk(case.k, h), _bmhk(case.v, h)
    one = planner.Planner(AttentionOpConfig(op=op))  # the one-attention path (Patch Model Attention's)
    return lambda: one.attention(q4, k4, v4)


ComfyAttention = Callable[..., torch.Tensor]  # ComfyUI's attention(q, k, v, heads) on [B, N, H*D]


def standard_pack(case: Case, attention: ComfyAttention) -> Callable[[], torch.Tensor]:
    """What ComfyUI_IPAdapter_plus does at every attn2 call of a CFG step (weight_type linear, embeds_scaling
    'V only', no mask, whole-schedule window), step by step.

    Written from a reading of cubiq/ComfyUI_IPAdapter_plus, CrossAttentionPatch.py (`Attn2Replace.__call__`
    and the `ipadapter_attention` callback; `CrossAttentionPatch.__call__` in older releases). That file is
    GPL-3.0: nothing is copied, this is our own code doing the same work per call:
      1. the text attention through ComfyUI's attention function (`optimized_attention`, called with only
         q, k, v and the head count);
      2. the step's sigma read to the host (`.cpu()` then `.item()`: a device sync on a GPU), compared with
         the adapter's sigma window;
      3. per adapter: to_k_ip and to_v_ip applied to the cond and to the uncond image tokens (four linear
         projections, every call), each repeated to the batch per prompt, then concatenated in the
         `cond_or_uncond` order of the call;
      4. the image attention through the same ComfyUI function, times the weight, cast to q's dtype, added.
    """
    heads = case.shape.heads
    per_prompt = BATCH // len(COND_OR_UNCOND)

    def project(tokens: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(tokens, weight).repeat(per_prompt, 1, 1)

    def run() -> torch.Tensor:
        dtype = case.q.dtype
        out = attention(case.q, case.k, case.v, heads)
        sigma = case.sigmas.detach().cpu()[0].item()
        for adapter in case.inputs:
            if not SIGMA_END <= sigma <= SIGMA_START:
                continue
            keys = (project(adapter.cond, adapter.w_k), project(adapter.uncond, adapter.w_k))
            values = (project(adapter.cond, adapter.w_v), project(adapter.uncond, adapter.w_v))
            image_k = torch.cat([keys[row] for row in COND_OR_UNCOND])
            image_v = torch.cat([values[row] for row in COND_OR_UNCOND])
            image_out = attention(case.q, image_k, image_v, heads) * WEIGHT
            out = out + image_out.to(dtype)
        return out.to(dtype)

    return run


def comfy_attention(op: str) -> tuple[Optional[ComfyAttention], str]:
    """ComfyUI's attention function running the kernel `op` runs here, and how; (None, why) where none does.

    `auto` takes the function ComfyUI selected at start-up (`optimized_attention`), as the standard pack
    does; an explicit op takes ComfyUI's function for that library, pinned to the same SDPA backend."""
    from comfy import model_management
    from comfy.ldm.modules import attention as comfy_attn

    if op == "auto":
        fn = comfy_attn.optimized_attention
        return fn, f"ComfyUI optimized_attention = {getattr(fn, '__name__', fn)}"
    if op.startswith("sdpa"):
        backend = backends._SDPA_BACKENDS.get(op)
        if backend is None:
            return comfy_attn.attention_pytorch, "ComfyUI attention_pytorch"
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def pinned(*args, **kwargs):
            with sdpa_kernel(getattr(SDPBackend, backend)):
                return comfy_attn.attention_pytorch(*args, **kwargs)

        return pinned, f"ComfyUI attention_pytorch in sdpa_kernel({backend})"
    if not model_management.xformers_enabled():
        return None, "ComfyUI has xformers disabled here"
    how = "ComfyUI attention_xformers"
    if op != "xformers":
        how += " (xformers' own dispatch: ComfyUI cannot pin one kernel)"
    return comfy_attn.attention_xformers, how


def comfy_text_call(case: Case, attention: ComfyAttention) -> Callable[[], torch.Tensor]:
    return lambda: attention(case.q, case.k, case.v, case.shape.heads)


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
    image_states = [a.tokens_by_row() for a in case.inputs]

    def run_text():
        return text_attn(hidden, encoder_hidden_states=case.text_states)

    def run_ip():
        return attn(hidden, encoder_hidden_states=(case.text_states, image_states))

    return run_text, run_ip


def fused_reason(case: Case, op: str) -> str:
    """Empty when fused mode runs an xformers op for this case."""
    why = fused_unavailable_reason()
    if why:
        return why
    if op.startswith("sdpa"):
        return "fused needs an xformers op"
    h = case.shape.heads
    ran = planner.resolve(op, _bmhk(case.q, h), _bmhk(case.k, h), _bmhk(case.v, h)).ran
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


def measure(case: Case, op: str, device: str, budget_s: float, rounds: int, with_diffusers: bool) -> dict:
    fns: dict[str, Callable] = {"text": text_call(case, op), "ours": ours(case, op, None)}
    notes = {}
    if op == "auto":  # the only op whose formulation the planner chooses; an explicit op keeps separate calls
        fns["separate"] = ours(case, op, "separate")
        if device == "cpu":
            fns["single"] = ours(case, op, "single")
        else:
            notes["single"] = "CPU only (the planner never plans it where xformers runs)"
    else:
        notes["separate, single"] = "explicit ops: the planner keeps separate calls, so `ours` is `separate`"
    attention, how = comfy_attention(op)
    if attention is None:
        notes["pack"] = how
    else:
        fns["comfy-text"], fns["pack"] = comfy_text_call(case, attention), standard_pack(case, attention)
        notes["pack"] = f"op {op!r}: {how}"
    why = fused_reason(case, op)
    if why:
        notes["fused"] = why
    else:
        fns["fused"] = ours(case, op, None, fused=True)
    if with_diffusers and op == "auto":  # diffusers' processors take no operator: measured once per shape
        fns["diffusers-text"], fns["diffusers"] = diffusers_pair(case, xformers=False)
        if device.startswith("cuda") and not xformers_status().problem:
            fns["diffusers-xf-text"], fns["diffusers-xf"] = diffusers_pair(case, xformers=True)
        else:
            notes["diffusers-xf"] = "needs a GPU and a working xformers"
    with torch.inference_mode():
        timings = time_interleaved(fns, device, budget_s, min_repeats=rounds)
        memory = {name: peak_memory_mib(fns[name], device) for name in ("text", "ours", "pack", "diffusers")
                  if name in fns}
    return {"timings": timings, "memory": memory, "notes": notes, "ran": ran_reports(case, op)}


def ran_reports(case: Case, op: str) -> list[str]:
    planner.begin_run()
    with torch.inference_mode():
        ours(case, op, None)()
    return planner.run_reports()


def ratio(result: dict, name: str) -> Optional[Estimate]:
    """Time of `name` over its text-only baseline on the same kernel, per round."""
    timings: Timings = result["timings"]
    base = BASELINE.get(name, "text")
    if name not in timings or base not in timings:
        return None
    return timings.ratio(name, base)


def ours_over_pack(result: dict) -> Optional[Estimate]:
    timings: Timings = result["timings"]
    return timings.ratio("ours", "pack") if "pack" in timings else None


def _text(value: Optional[Estimate]) -> str:
    return NA if value is None else value.text()


def table(results: list[dict], dtype: str, op: str) -> str:
    rows = [r for r in results if r["dtype"] == dtype and r["op"] == op]
    columns = ["shape", "image tokens", "adapters", "text ms"] + [f"{v} x" for v in VARIANTS] + [
        "ours / pack", "formulation", "peak MiB ours / pack / diffusers"]
    t = Table(columns)
    for r in rows:
        mem = r["memory"]
        text_ms = estimate([seconds * 1e3 for seconds in r["timings"].samples["text"]])
        t.add(r["shape"], r["tokens"], r["adapters"], text_ms.text(".3f"),
              *[_text(ratio(r, v)) for v in VARIANTS], _text(ours_over_pack(r)), formulation_ran(r),
              " / ".join(fmt(mem.get(n), ".1f") for n in ("ours", "pack", "diffusers")))
    return t.markdown()


def formulation_ran(result: dict) -> str:
    return "single pass" if any(single_pass.NAME in line for line in result["ran"]) else "separate"


def _verdict(estimates: list[Estimate]) -> str:
    """How many intervals lie below 1, contain it, or lie above it."""
    below = sum(e.high < 1 for e in estimates)
    above = sum(e.low > 1 for e in estimates)
    return f"{below} below 1, {len(estimates) - below - above} containing 1, {above} above 1"


def _worst(rows: list[dict], estimates: list[Estimate]) -> str:
    worst = max(range(len(rows)), key=lambda i: estimates[i].value)
    r = rows[worst]
    return f"{estimates[worst].text()} ({r['shape']}, {r['tokens']} tokens x {r['adapters']})"


def in_single_pass_domain(result: dict) -> bool:
    """Rows where the planner's measured rule (single_pass.fits) picks the single pass on CPU fp32."""
    queries = torch.empty(1, result["queries"], 1, 1)  # what the rule reads of the queries: count, device, dtype
    return single_pass.fits(queries, [result["tokens"]] * result["adapters"])


def summary(results: list[dict], dtype: str, op: str) -> str:
    """The figures the README quotes, computed from the rows (per-row intervals, not pooled samples)."""
    rows = [r for r in results if r["dtype"] == dtype and r["op"] == op and "pack" in r["timings"]]
    lines = []
    if rows:
        ratios = [ours_over_pack(r) for r in rows]
        lines.append(f"- ours / pack over {len(rows)} rows: median of the row medians "
                     f"{statistics.median(e.value for e in ratios):.2f}; 95 % intervals: {_verdict(ratios)}; "
                     f"worst row {_worst(rows, ratios)}")
    paired = [r for r in results if r["dtype"] == dtype and r["op"] == op and "single" in r["timings"]]
    for inside in (True, False):
        part = [r for r in paired if in_single_pass_domain(r) == inside]
        if not part:
            continue
        ratios = [r["timings"].ratio("single", "separate") for r in part]
        where = "inside" if inside else "outside"
        lines.append(f"- single / separate {where} the single-pass rule ({len(part)} rows): median of the row "
                     f"medians {statistics.median(e.value for e in ratios):.2f}; 95 % intervals: "
                     f"{_verdict(ratios)}; worst row {_worst(part, ratios)}")
    return "\n".join(lines) or "no rows"


def plot(results: list[dict], dtype: str, op: str, path) -> None:
    plt = pyplot()
    rows = [r for r in results if r["dtype"] == dtype and r["op"] == op]
    tokens = sorted({r["tokens"] for r in rows})
    adapters = sorted({r["adapters"] for r in rows})
    shown = ("ours", "separate", "single", "pack", "diffusers")
    fig, axes = plt.subplots(len(tokens), len(adapters), figsize=(6.5 * len(adapters), 3.4 * len(tokens)),
                             squeeze=False)
    for i, n_tok in enumerate(tokens):
        for j, n_ad in enumerate(adapters):
            ax = axes[i][j]
            cell = [r for r in rows if r["tokens"] == n_tok and r["adapters"] == n_ad]
            width = 0.8 / len(shown)
            for s, name in enumerate(shown):
                values = [ratio(r, name) for r in cell]
                heights = [v.value if v else 0.0 for v in values]
                errors = [[v.value - v.low if v else 0.0 for v in values],
                          [v.high - v.value if v else 0.0 for v in values]]
                ax.bar([x + s * width for x in range(len(cell))], heights, width, yerr=errors, capsize=1.5,
                       error_kw={"elinewidth": 0.6}, label=name)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cell))])
            ax.set_xticklabels([r["shape"].replace(" ", "\n") for r in cell], fontsize=7)
            ax.set_title(f"{n_tok} image tokens, {n_ad} adapter(s)", fontsize=9)
            ax.set_ylabel("time / text-only call", fontsize=8)
    axes[0][0].legend(fontsize=7, ncol=len(shown))
    fig.suptitle(f"attn2 call with IP-Adapters: {dtype}, op {op!r} (lower is better; bars: 95 % CI of the median)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtypes", nargs="*", help="default: float32 on CPU, float16 bfloat16 on GPU")
    parser.add_argument("--ops", nargs="*", help="default: auto sdpa:math on CPU, every op choice on GPU")
    parser.add_argument("--quick", action="store_true", help="4 image tokens only, 5 rounds (no 95 %% interval)")
    parser.add_argument("--budget", type=float, help="seconds of timing per case, wall time (default 0.5 CPU, "
                                                                "0.2 GPU; --rounds is the floor)")
    parser.add_argument("--rounds", type=int, help="at least this many interleaved rounds per case (default 7: "
                                                  "the 95 %% interval of a median needs 6 or more)")
    parser.add_argument("--threads", type=int, help="CPU threads (default 1: stable on a shared machine)")
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument("--stem", help="results file stem (default attention_layer_<device>[_quick])")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    gpu = args.device.startswith("cuda")
    setup_threads(args.device, args.threads)
    # CPU: ComfyUI's optimized_attention on PyTorch SDPA, the kernel our `auto` runs there (see the docstring)
    bootstrap_comfy(args.device, () if gpu else ("--use-pytorch-cross-attention",))
    dtypes = args.dtypes or (["float16", "bfloat16"] if gpu else ["float32"])
    requested = args.ops or (list(OP_CHOICES) if gpu else ["auto", "sdpa:math"])
    budget = args.budget or (0.2 if gpu else 0.5)
    rounds = args.rounds or (5 if args.quick else 7)
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
                        r = measure(case, op, args.device, budget, rounds, not args.no_diffusers)
                        r.update(shape=shape.label, queries=shape.queries, tokens=n_tok, adapters=n_ad,
                                 dtype=dtype_name, op=op)
                        results.append(r)
                        print(f"{dtype_name} {op:16s} {shape.label:22s} L={n_tok:3d} n={n_ad} "
                              f"text {r['timings'].median('text') * 1e3:8.3f} ms  " +
                              "  ".join(f"{v} {_text(ratio(r, v))}" for v in VARIANTS) +
                              f"  ours/pack {_text(ours_over_pack(r))}", flush=True)
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
            sections.append((f"{dtype_name}, op {op!r}", f"![plot]({png})\n\n" + summary(results, dtype_name, op)
                             + "\n\n" + table(results, dtype_name, op)))
        if skipped.get(dtype_name):
            sections.append((f"{dtype_name}: operators that cannot run here",
                             "\n".join(f"- `{op}`: {why}" for op, why in skipped[dtype_name].items())))
    notes = sorted({f"{k}: {v}" for r in results for k, v in r["notes"].items()})
    sections.append(("Notes", "\n".join(f"- {n}" for n in notes) or "none"))
    path = write_results(stem, "attn2 call with IP-Adapters", env, sections, [serializable(r) for r in results])
    print(f"wrote {path}")


def serializable(result: dict) -> dict:
    """The JSON record of one case: medians, ratios with their 95 % intervals, and the raw samples."""
    timings: Timings = result["timings"]
    out = {k: v for k, v in result.items() if k != "timings"}
    out["median_s"] = timings.medians()
    out["ratios"] = {v: ratio(result, v).as_dict() for v in VARIANTS if ratio(result, v) is not None}
    pack = ours_over_pack(result)
    out["ours_over_pack"] = pack.as_dict() if pack else None
    out["samples_s"] = timings.samples
    return out


READING = (
    "Times: the process's CPU time on CPU (one thread; wall time would count other jobs on this shared "
    "machine), wall time between synchronizations on a GPU. Each figure is the median over interleaved rounds "
    "(every variant timed once per round, round after round), followed by `±` the half-width of its 95 % "
    "confidence interval (distribution-free: order statistics of the per-round values; the wider side). "
    "Ratios are taken per round, so a load change on the shared machine hits numerator and denominator "
    "alike. `text ms`: the text-only attention (77 tokens) "
    "on the operator. `x` columns: ratio to a text-only call on the same kernel: our rows to `text`; `pack` "
    "to ComfyUI's attention function on the text alone; diffusers rows to diffusers' text-only processor on "
    "the same module (they include the to_q/k/v/out projections). `ours`: the shipped processor (image K/V "
    "cached per run, formulation chosen per signature); `separate` / `single`: ours forced to one "
    "formulation; `fused`: one block-diagonal xformers call (n/a without an xformers kernel); `pack`: what "
    "cubiq/ComfyUI_IPAdapter_plus does per call (sigma read to the host, cond and uncond K/V projected, "
    "repeated and concatenated, text and image attention through ComfyUI's attention function, added; see "
    "`standard_pack`). `ours / pack`: our time over the pack's, per round (below 1: ours is faster). "
    f"{NA}: does not run here. Peak memory: extra bytes allocated at the peak of one call (torch.cuda; n/a on "
    "CPU).")


if __name__ == "__main__":
    main()
