"""SD3.5 InstantX IP-Adapter: cost per joint-attention call at SD3.5 Large's width against diffusers' processor,
and the per-step overhead on the tiny SD3 model through the real ComfyUI path.

1. Joint attention (diffusers' Attention of a JointTransformerBlock, 38 heads x 64 = 2432 wide, qk_norm rms_norm,
   SD3.5 Large's config; 333 text tokens; 64 adapter tokens; identical weights):
     plain      diffusers' JointAttnProcessor2_0 (no adapter)
     diffusers  SD3IPAdapterJointAttnProcessor2_0 (norm_ip + to_k/v_ip + the image attention, all per call)
     ours       the plain call, plus the adapter as the pack runs it on the q, k, v the host hands it
                (processors/families/sd3.py: block_image_kv + joint_image_attention on the planner)
   ours/diffusers per round (median and 95 % interval), and the adapter's own cost (call minus plain) both ways.
   CPU default: 1024 image tokens (a 512x512 image), batch 1, fp32, one thread: SD3.5's 4096 tokens (1024x1024)
   take about 4 s per call on one CPU thread, too long for interleaved rounds on a shared machine; --tokens 4096
   runs them (and --device cuda with fp16 is the real setting).
2. Per step on the tiny SD3 (ComfyUI's MMDiT, 2 joint blocks, 128 wide; 16x16 latent, batch 2 = cond + uncond):
   the model call with the adapter (Apply Embeds' handler) / without, same kernel. The tiny model does almost
   nothing per step, so this ratio bounds the adapter's fixed cost (resampler once per call, K/V per block).
"""

from __future__ import annotations

import argparse
import logging
from typing import Callable

import torch

from common import Table, bootstrap_comfy, environment, setup_threads, time_interleaved, write_results

LARGE = dict(heads=38, head_dim=64, text=333, ip_tokens=64, temb=1280)


def attention_variants(tokens: int, batch: int, device: str, dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    """plain / diffusers / ours on one joint attention. ComfyUI hands our patch the block's q, k (through the
    block's RMSNorm) and v, which its joint attention computes anyway, so "ours" is the plain call plus the
    adapter's work on those tensors: its K/V (norm_ip, to_k_ip, to_v_ip, RMSNorm) and the image attention, added
    to the image part of an output buffer. Correctness of the same code path: tests/unit/test_sd3_parity.py."""
    from diffusers.models.attention import JointTransformerBlock
    from diffusers.models.attention_processor import JointAttnProcessor2_0, SD3IPAdapterJointAttnProcessor2_0
    from processors.families.sd3 import JointBranch, SD3BlockAdapter, block_image_kv, joint_image_attention
    from processors.planner import Planner

    heads, head_dim = LARGE["heads"], LARGE["head_dim"]
    width = heads * head_dim
    torch.manual_seed(0)
    block = JointTransformerBlock(dim=width, num_attention_heads=heads, attention_head_dim=head_dim,
                                  context_pre_only=False, qk_norm="rms_norm")
    attn = block.attn.to(device, dtype).eval()
    theirs = SD3IPAdapterJointAttnProcessor2_0(width, width, head_dim, LARGE["temb"], scale=0.5).to(device, dtype)
    ours = SD3BlockAdapter(width, LARGE["temb"], head_dim)
    ours.load_state_dict(theirs.state_dict())  # the per-block names are the same on both sides
    ours = ours.to(device, dtype)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(batch, tokens, width, generator=g).to(device, dtype)
    text = torch.randn(batch, LARGE["text"], width, generator=g).to(device, dtype)
    ip_tokens = torch.randn(batch, LARGE["ip_tokens"], width, generator=g).to(device, dtype)
    temb = torch.randn(batch, LARGE["temb"], generator=g).to(device, dtype)
    with torch.no_grad():  # what the host's joint attention receives for the image stream
        q = attn.norm_q(attn.to_q(hidden).unflatten(-1, (heads, head_dim))).flatten(-2)
        k = attn.norm_k(attn.to_k(hidden).unflatten(-1, (heads, head_dim))).flatten(-2)
        v = attn.to_v(hidden).unflatten(-1, (heads, head_dim))  # ComfyUI passes v as [B, L, H, D]
    output = torch.zeros_like(hidden)
    attend = Planner().attention
    plain = JointAttnProcessor2_0()

    def run_plain():
        with torch.no_grad():
            return plain(attn, hidden, text)

    def run_theirs():
        with torch.no_grad():
            return theirs(attn, hidden, text, ip_hidden_states=ip_tokens, temb=temb)

    def run_ours():
        with torch.no_grad():
            run_plain()
            ip_k, ip_v = block_image_kv(ours, ip_tokens, temb, head_dim)
            branch = JointBranch(ip_k, ip_v, ours.norm_q.weight, ours.norm_k.weight, 0.5)
            output.add_(joint_image_attention(q, k, v, heads, [branch], attend, attn.norm_q.weight,
                                              attn.norm_k.weight))

    return {"plain": run_plain, "diffusers": run_theirs, "ours": run_ours}


def tiny_step_variants() -> dict[str, Callable[[], object]]:
    import importlib

    from harness.sd3_models import instantx_sd3_state_dict, shape_with
    from harness.tiny_dit import run_sd3, sd3_inputs, tiny_sd3

    sd3_engine = importlib.import_module("xformers_ipadapter.processors.families.sd3")
    nodes_sd3 = importlib.import_module("xformers_ipadapter.nodes.sd3")
    embeds_module = importlib.import_module("xformers_ipadapter.processors.ipadapter.embeds")
    tiny = tiny_sd3()
    shape = shape_with(hidden=tiny.width, head_dim=64, blocks=tiny.blocks)  # a tiny adapter for the tiny model
    adapter = sd3_engine.read_sd3_adapter(instantx_sd3_state_dict(shape), "bench.safetensors")
    embeds = embeds_module.AdapterEmbeds(torch.randn(1, 10, shape.encoder_width), "penultimate_hidden_states", "bench")
    patched = nodes_sd3.apply_sd3_embeds(tiny.patcher, adapter, embeds, 0.5, "linear", 0.0, 1.0, "V only")
    inputs = sd3_inputs(tiny, height=16, width=16)

    def step(model):
        def run():
            # a new sigmas tensor per call, as the sampler passes per step: the resampler runs every call
            return run_sd3(model, inputs, {"sigmas": inputs["t"].clone()})
        return run

    return {"plain": step(tiny.patcher), "ip-adapter": step(patched)}


def resampler_variant(device: str, dtype: torch.dtype, rows: int) -> dict[str, Callable[[], object]]:
    """The real-size resampler (SigLIP 729 x 1152 in, 1280 wide, 4 layers, 64 tokens out) on `rows` rows: what
    the adapter adds once per step at SD3.5 Large's size, whatever the image size."""
    from harness.sd3_models import REAL, instantx_sd3_state_dict, shape_with
    from processors.families.sd3 import read_sd3_adapter

    shape = shape_with(**{**REAL.__dict__, "blocks": 1})
    adapter = read_sd3_adapter(instantx_sd3_state_dict(shape), "real.safetensors").to(device, dtype)
    features = torch.randn(rows, 729, 1152).to(device, dtype)
    timesteps = torch.full((rows,), 500.0, device=device)

    def run():
        with torch.no_grad():
            return adapter.image_proj(features, timesteps)
    return {"resampler": run}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=None, help="image tokens (CPU default 1024, GPU 4096)")
    parser.add_argument("--batch", type=int, default=None, help="CPU default 1, GPU 2")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of timing per section")
    parser.add_argument("--stem", default=None, help="results file name (default sd3_step_cpu / sd3_step_gpu)")
    parser.add_argument("--attention-only", action="store_true", help="skip the resampler and tiny-step sections")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    gpu = args.device.startswith("cuda")
    setup_threads(args.device, args.threads)
    tokens = args.tokens or (4096 if gpu else 1024)
    batch = args.batch or (2 if gpu else 1)
    dtype = torch.float16 if gpu else torch.float32
    bootstrap_comfy(args.device)
    from harness import comfy_bootstrap

    comfy_bootstrap.load_pack()

    attention = time_interleaved(attention_variants(tokens, batch, args.device, dtype), args.device, args.budget,
                                 min_repeats=9, max_repeats=30)
    medians = attention.medians()
    table = Table(["shape", "plain (ms)", "diffusers (ms)", "ours (ms)", "ours / diffusers [95 % CI]",
                   "adapter cost: ours / diffusers"])
    ratio = attention.ratio("ours", "diffusers")
    cost = (medians["ours"] - medians["plain"]) / max(medians["diffusers"] - medians["plain"], 1e-12)
    table.add(f"B {batch}, {tokens} image + {LARGE['text']} text tokens, {LARGE['heads']}x{LARGE['head_dim']}, "
              f"{LARGE['ip_tokens']} adapter tokens, {str(dtype).removeprefix('torch.')}",
              f"{medians['plain'] * 1e3:.1f}", f"{medians['diffusers'] * 1e3:.1f}", f"{medians['ours'] * 1e3:.1f}",
              ratio.text(".3f"), f"{cost:.3f}")

    resampler = None
    if not args.attention_only:
        resampler = time_interleaved(resampler_variant(args.device, dtype, 2), args.device, args.budget / 4,
                                     min_repeats=9, max_repeats=20)
        table.add("resampler once per step, real size, 2 rows (cond + uncond)", "", "",
                  f"{resampler.median('resampler') * 1e3:.1f}", "", "")

    steps = {} if gpu or args.attention_only else time_interleaved(tiny_step_variants(), args.device, args.budget / 2, min_repeats=15)
    step_table = Table(["model", "plain (ms/step)", "with adapter (ms/step)", "ratio [95 % CI]"])
    if steps:
        step_medians = steps.medians()
        step_table.add("tiny SD3 (2 joint blocks, 128 wide), 16x16 latent, batch 2; tiny adapter (8 tokens)",
                       f"{step_medians['plain'] * 1e3:.2f}", f"{step_medians['ip-adapter'] * 1e3:.2f}",
                       steps.ratio("ip-adapter", "plain").text(".2f"))
    path = write_results(
        args.stem or f"sd3_step_{'gpu' if gpu else 'cpu'}", "SD3.5 InstantX IP-Adapter: joint attention and per-step cost",
        environment(args.device),
        [("Joint attention at SD3.5 Large width vs diffusers' SD3IPAdapterJointAttnProcessor2_0", table.markdown()),
         ("Per step on the tiny SD3 (ComfyUI's MMDiT)", step_table.markdown() if steps else "not run")],
        {"attention": {k: v for k, v in attention.samples.items()}, "resampler": resampler.samples if resampler else {},
         "steps": {k: v for k, v in steps.samples.items()} if steps else {}})
    print(path.read_text())


if __name__ == "__main__":
    main()
