"""Per-step cost of the IP-Adapter in a real ComfyUI KSampler run (comfy.sample.sample, euler, CFG batch 2).

Models: the tiny UNet of the harness, and full-size SD1.5- / SDXL-shaped UNets (ComfyUI's UNetModel from the
model configs, random weights filled in memory, wrapped in a ModelPatcher as comfy.sd does). The adapter is a
random "base" IP-Adapter (4 image tokens) with to_k_ip/to_v_ip sized for every attn2 site (16 SD1.5, 70
SDXL), applied with the pack's real nodes, so the measured path is the shipped one.

All runs use the SAME attention operator (`--op`, default auto), so their difference is the adapter alone:
  plain       the model through Patch Model Attention (PatchXformersModelAttention.execute) on that op: every
              self- and cross-attention on our operator registry
  ip-adapter  that patched model through Apply xformers IP-Adapter Attention (no attention_op of its own,
              so it follows the model's operator)
  apply embeds  the same adapter and image through Encoder -> Apply Embeds (its per-step path is Apply's)
Per step = time of a warm sampling run / steps (CPU: process CPU time, GPU: wall time; common.clock); the two
runs alternate round after round, the overhead is the median of the per-round ratios with its 95 %
confidence interval (common.estimate).

CPU (default): tiny at 64x64, SD1.5 at 256x256, fp32. GPU (--device cuda): tiny, SD1.5 512x512 and SDXL
1024x1024 in fp16.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from common import (RESULTS, Table, bootstrap_comfy, environment, estimate, pyplot, setup_threads, time_rounds,
                    write_results)

SD15_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                 channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                 transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1], transformer_depth_middle=1,
                 context_dim=768, num_heads=8, num_head_channels=-1, use_spatial_transformer=True, legacy=False,
                 use_linear_in_transformer=False, adm_in_channels=None, use_temporal_attention=False,
                 use_temporal_resblock=False)
SDXL_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
                 channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
                 transformer_depth_output=[10, 10, 10, 2, 2, 2, 0, 0, 0], transformer_depth_middle=10,
                 context_dim=2048, num_heads=-1, num_head_channels=64, use_spatial_transformer=True, legacy=False,
                 use_linear_in_transformer=True, adm_in_channels=2816, use_temporal_attention=False,
                 use_temporal_resblock=False)


@dataclass(frozen=True)
class Setup:
    name: str
    size: int
    steps: int
    repeats: int


def bootstrap(device: str):
    """ComfyUI in-process (--cpu on CPU, its default device otherwise) and the pack as ComfyUI loads it."""
    from harness import comfy_bootstrap

    bootstrap_comfy(device)
    comfy_bootstrap.load_pack()
    from harness import host_helpers, tiny_models

    return host_helpers, tiny_models


def _randomize_(module: torch.nn.Module, seed: int) -> None:
    """Small random weights in place: N(0, 1/fan_in) matrices/convs, zero biases, unit norms."""
    gen = torch.Generator().manual_seed(seed)
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for mod in module.modules():
            for name, p in mod.named_parameters(recurse=False):
                if isinstance(mod, norms):
                    p.fill_(1.0 if name == "weight" else 0.0)
                elif name == "bias" or p.ndim < 2:
                    p.zero_()
                else:
                    fan_in = p[0].numel()
                    p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)


def full_unet(config: dict, dtype: torch.dtype):
    """A ModelPatcher around ComfyUI's model for `config`, random weights, as comfy.sd builds it."""
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher

    model_config = comfy.model_detection.model_config_from_unet_config(dict(config))
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, "")
    _randomize_(model.diffusion_model, seed=0)
    model = model.to(comfy.model_management.unet_offload_device())
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def random_adapter(hh, tm, model, cross: int):
    """A base IP-Adapter (4 tokens) for the tiny CLIP vision, with to_k_ip/to_v_ip sized per attn2 site."""
    sites_mod = hh.pack_module("nodes.sites")
    ipadapter = hh.pack_module("processors.ipadapter")
    layout = tm.ipadapter_base_layout(hh.TINY_CLIP_VISION["projection_dim"], cross=cross)
    layout = {k: v for k, v in layout.items() if not k.startswith("ip_adapter.")}
    for site in sites_mod.attn2_sites(model):
        for name in ("to_k_ip", "to_v_ip"):
            layout[f"ip_adapter.{2 * site.index + 1}.{name}.weight"] = ("randn", (site.heads * site.dim_head, cross))
    state = {k: t.float() for k, t in tm.fill(layout, seed=5).items()}
    return ipadapter.ipadapter_from_state_dict(state, name="random base")


def conditioning(seed: int, cross: int, sdxl: bool):
    gen = torch.Generator().manual_seed(seed)
    extra = {"pooled_output": torch.randn(1, 1280, generator=gen)} if sdxl else {}
    return [[torch.randn(1, 77, cross, generator=gen), extra]]


def sampler(model, setup: Setup, cross: int, sdxl: bool) -> Callable[[], torch.Tensor]:
    import comfy.sample

    latent = torch.zeros(1, 4, setup.size // 8, setup.size // 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    positive, negative = conditioning(1, cross, sdxl), conditioning(2, cross, sdxl)
    return lambda: comfy.sample.sample(model, noise, setup.steps, 5.0, "euler", "normal", positive, negative,
                                       latent, seed=0, disable_pbar=True)


def time_runs(fns: dict[str, Callable], repeats: int, device: str):
    for fn in fns.values():
        fn()  # warm-up: model load, K/V cache, operator resolution
    return time_rounds(fns, device, repeats)


def same_op_models(hh, tm, model, cross: int, op: str, workdir):
    """(plain, ip-adapter, ip-adapter embeds) models on one operator: Patch Model Attention, then the adapter
    applied to it by Apply, and by Encoder -> Apply Embeds on the same inputs."""
    config = hh.pack_module("processors.backends").AttentionOpConfig(op=op)
    plain = hh.pack_module("nodes.patch_model").PatchXformersModelAttention.execute(model, config).result[0]
    apply_node = hh.pack_module("nodes.apply").ApplyXformersIPAdapterAttention
    embeds = hh.pack_module("nodes.embeds")
    adapter, clip_vision = random_adapter(hh, tm, model, cross), hh.tiny_clip_vision(workdir)
    window = dict(weight=1.0, weight_type="linear", start_at=0.0, end_at=1.0, embeds_scaling="V only")
    patched = apply_node.execute(plain, adapter, clip_vision, hh.image(0), combine_embeds="concat",
                                 **window).result[0]
    pos, neg = embeds.XformersIPAdapterEncoder.execute(adapter, clip_vision, hh.image(0), weight=1.0).result
    from_embeds = embeds.ApplyXformersIPAdapterEmbeds.execute(plain, adapter, pos, neg_embeds=neg,
                                                              **window).result[0]
    return plain, patched, from_embeds


def measure(hh, tm, name: str, model, setup: Setup, cross: int, device: str, op: str, workdir) -> dict:
    sdxl = cross == 2048
    plain, patched, from_embeds = same_op_models(hh, tm, model, cross, op, workdir)
    planner = hh.pack_module("processors.planner")  # the report lines of the run come from the planner
    planner.begin_run()
    with torch.inference_mode():
        timings = time_runs({"plain": sampler(plain, setup, cross, sdxl),
                             "ip-adapter": sampler(patched, setup, cross, sdxl),
                             "apply embeds": sampler(from_embeds, setup, cross, sdxl)}, setup.repeats, device)
    per_step = {k: estimate([t / setup.steps for t in v]) for k, v in timings.samples.items()}
    overhead = timings.ratio("ip-adapter", "plain")
    embeds_vs_apply = timings.ratio("apply embeds", "ip-adapter")
    result = {"model": name, "op": op, "size": setup.size, "steps": setup.steps, "repeats": setup.repeats,
              "sites": len(hh.pack_module("nodes.sites").attn2_sites(model)),
              "plain_s": per_step["plain"].as_dict(), "ip_s": per_step["ip-adapter"].as_dict(),
              "embeds_s": per_step["apply embeds"].as_dict(), "ratio": overhead.as_dict(),
              "embeds_ratio": embeds_vs_apply.as_dict(), "samples_s": timings.samples,
              "reports": planner.run_reports()}
    print(f"{name:6s} {setup.size}x{setup.size} op {op}: plain {per_step['plain'].text('.4f')} s/step, IP-Adapter "
          f"{per_step['ip-adapter'].text('.4f')} s/step, ratio {overhead.text('.3f')}; Apply Embeds / Apply "
          f"{embeds_vs_apply.text('.3f')}", flush=True)
    return result


def plan(device: str, quick: bool, dtype: torch.dtype) -> list[tuple[str, Optional[dict], Setup, int]]:
    """(name, unet config or None for the tiny UNet, setup, cross dim). Rounds: 6 or more give a 95 % interval
    of the median (common.estimate); the full-size CPU model gets as many as ~3 minutes of CPU time allow."""
    if device.startswith("cuda"):
        return [("tiny", None, Setup("tiny", 64, 10, 15), 768),
                ("SD1.5", SD15_UNET, Setup("SD1.5", 512, 10, 9), 768),
                ("SDXL", SDXL_UNET, Setup("SDXL", 1024, 5, 7), 2048)]
    return [("tiny", None, Setup("tiny", 64, 4, 7 if quick else 21), 768),
            ("SD1.5", SD15_UNET, Setup("SD1.5", 256, 1 if quick else 2, 3 if quick else 7), 768)]


def run(args: argparse.Namespace) -> list[dict]:
    hh, tm = bootstrap(args.device)
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for name, config, setup, cross in plan(args.device, args.quick, dtype):
            if args.models and name not in args.models:
                continue
            model = full_unet(tm.TINY_UNET_CONFIG if config is None else config, dtype)
            results.append(measure(hh, tm, name, model, setup, cross, args.device, args.op, workdir))
            del model
    return results


def report(args: argparse.Namespace, results: list[dict]) -> None:
    stem = args.stem or f"sampling_step_{'gpu' if args.device.startswith('cuda') else 'cpu'}" + (
        "_quick" if args.quick else "")
    t = Table(["model", "op", "attn2 sites", "size", "steps x rounds", "plain ms/step", "IP-Adapter ms/step",
               "overhead ratio (95 % CI)", "added", "Apply Embeds ms/step", "Apply Embeds / Apply (95 % CI)"])
    for r in results:
        ratio = r["ratio"]
        low, high = ratio["ci95"]
        t.add(r["model"], r["op"], r["sites"], f"{r['size']}x{r['size']}", f"{r['steps']} x {r['repeats']}",
              _ms(r["plain_s"]), _ms(r["ip_s"]), _ratio(ratio),
              f"{(ratio['median'] - 1) * 100:+.1f} % [{(low - 1) * 100:+.1f}, {(high - 1) * 100:+.1f}]",
              _ms(r["embeds_s"]), _ratio(r["embeds_ratio"]))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    labels = [f"{r['model']}\n{r['size']}px" for r in results]
    medians = [r["ratio"]["median"] for r in results]
    errors = [[m - r["ratio"]["ci95"][0] for m, r in zip(medians, results)],
              [r["ratio"]["ci95"][1] - m for m, r in zip(medians, results)]]
    ax.bar(labels, medians, yerr=errors, capsize=4, color="tab:blue")
    ax.axhline(1.05, color="red", linestyle="--", linewidth=1, label="goal: +5 %")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylim(0.9, max(1.1, max(r["ratio"]["ci95"][1] for r in results) + 0.05))
    ax.set_ylabel("step time with / without IP-Adapter\n(same operator; bars: 95 % CI)", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = f"{stem}.png"
    fig.savefig(RESULTS / png, dpi=110)
    plt.close(fig)
    reports = sorted({line for r in results for line in r["reports"]})
    sections = [("How to read", READING),
                ("Per-step overhead of the IP-Adapter", f"![plot]({png})\n\n" + t.markdown()),
                ("What ran (resolution reports)", "\n".join(f"- {line}" for line in reports) or "none")]
    path = write_results(stem, "KSampler step with and without the IP-Adapter", environment(args.device),
                         sections, results)
    print(f"wrote {path}")


def _ratio(ratio: dict) -> str:
    low, high = ratio["ci95"]
    return f"{ratio['median']:.3f} [{low:.3f}, {high:.3f}]"


def _ms(per_step: dict) -> str:
    low, high = per_step["ci95"]
    return f"{per_step['median'] * 1e3:.1f} ±{max(per_step['median'] - low, high - per_step['median']) * 1e3:.1f}"


READING = (
    "`plain`: the model through Patch Model Attention on the op; `IP-Adapter`: that model with the adapter "
    "applied (it follows the model's op), so both run every attention on the same operator and the ratio is "
    "the adapter's cost alone. `Apply Embeds`: the same adapter and image through Encoder -> Apply Embeds "
    "instead of Apply (the same per-step path: its ratio to Apply should contain 1.000). Per step: time of one warm sampling run / steps (CPU: the process's CPU time, "
    "one thread; GPU: wall time). The two runs alternate, "
    "one each per round; ms/step: median over rounds ± the half-width of its 95 % confidence interval; "
    "overhead: median of the per-round ratios IP-Adapter / plain, with its 95 % confidence interval "
    "(distribution-free, order statistics). An interval that contains 1.000 means no overhead is measurable "
    "at that noise.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument("--threads", type=int, help="CPU threads (default 1: stable on a shared machine)")
    parser.add_argument("--models", nargs="*", help="subset of: tiny SD1.5 SDXL")
    parser.add_argument("--op", default="auto", help="the attention op of both runs (default auto)")
    parser.add_argument("--stem", help="results file stem")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # ComfyUI warns about models it unloads between setups
    setup_threads(args.device, args.threads)
    report(args, run(args))


if __name__ == "__main__":
    main()
