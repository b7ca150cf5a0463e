"""Flux IP-Adapters: per-step overhead on the tiny Flux and the image attention at Flux.1's shapes vs diffusers.

1. Image attention per block call at Flux.1's width (24 heads x 128 = 3072; context 4096), diffusers'
   `FluxIPAdapterAttnProcessor` IP part on the same inputs (its to_k_ip/to_v_ip projections run per call, as
   diffusers does) against ours (processors/families/flux.py on the engine: K/V cached once per run, the
   attention added to the block output with `base=`). Rows: XLabs v2 (16 tokens), InstantX (128 tokens, K/V
   RMS-normalised). CPU default: 1024 image tokens (a 512x512 image), batch 1, fp32, one thread; --tokens 4096
   runs Flux.1's 1024x1024 shape (about 4x slower per call).
2. Per model call on the tiny Flux (ComfyUI's own classes, 1 double + 1 single block, 64 wide; 16x16 latent,
   batch 2): with the adapter / without, same kernel. The tiny model does almost nothing, so this ratio bounds
   the fixed cost the patch adds per block (override, RoPE undo, one engine call).
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.nn.functional as F

from common import Table, bootstrap_comfy, environment, setup_threads, time_interleaved, write_results

HEADS, HEAD_DIM, CONTEXT = 24, 128, 4096


def attention_variants(tokens: int, ip_tokens: int, instantx: bool) -> dict[str, Callable[[], object]]:
    from processors.families.flux import FluxApplication, FluxGeometry, FluxIPAdapterModel, FluxAdapterInfo, \
        INSTANTX, XLABS, XLabsProjection
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    width = HEADS * HEAD_DIM
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, HEADS, tokens, HEAD_DIM, generator=g)
    img = torch.randn(1, tokens, width, generator=g)
    ip_hidden = torch.randn(1, ip_tokens, CONTEXT, generator=g)
    processor = FluxIPAdapterAttnProcessor(hidden_size=width, cross_attention_dim=CONTEXT, num_tokens=(ip_tokens,))
    processor.requires_grad_(False)

    def diffusers_ip():
        # the IP loop of FluxIPAdapterAttnProcessor.__call__ (its query is the pre-RoPE image query, [B, L, H, D])
        ip_query = q.transpose(1, 2)
        out = torch.zeros_like(img)
        key = processor.to_k_ip[0](ip_hidden).view(1, -1, HEADS, HEAD_DIM)
        value = processor.to_v_ip[0](ip_hidden).view(1, -1, HEADS, HEAD_DIM)
        if instantx:  # InstantX's processor normalises K/V per head
            key, value = (F.rms_norm(t, (HEAD_DIM,), eps=1e-5) for t in (key, value))
        hidden = dispatch_attention_fn(ip_query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
        out += 1.0 * hidden.reshape(1, -1, width)
        return img + out

    info = FluxAdapterInfo(INSTANTX if instantx else XLABS, ip_tokens, 8, CONTEXT, width, 1)
    with torch.device("meta"):
        projection = XLabsProjection(8, CONTEXT, ip_tokens)
    to_k, to_v = processor.to_k_ip[0], processor.to_v_ip[0]
    model = FluxIPAdapterModel(info, projection, [to_k], [to_v])
    application = FluxApplication(model=model, cond=ip_hidden, uncond=ip_hidden,
                                  geometry=FluxGeometry(width, HEADS, 1, 0), weights=(1.0,))

    class Call:  # what nodes/dit_patch.py hands the adapter: the block, its options and the captured query
        block = application.blocks()[0]
        options = {"cond_or_uncond": [0]}
        txt_len = 0

        @staticmethod
        def query_before_rope():
            return q

    def ours():
        return application._attend(Call, q, img, None, lead_in_mask=0)

    return {"diffusers": diffusers_ip, "ours": ours}


def attention_section(tokens: int, budget: float) -> tuple[str, list]:
    table = Table(["adapter", "image tokens", "diffusers ms", "ours ms", "ours/diffusers (95 % CI)"])
    data = []
    for name, ip_tokens, instantx in (("XLabs v2", 16, False), ("InstantX", 128, True)):
        timings = time_interleaved(attention_variants(tokens, ip_tokens, instantx), "cpu", budget)
        ratio = timings.ratio("ours", "diffusers")
        table.add(name, tokens, f"{timings.median('diffusers') * 1e3:.2f}", f"{timings.median('ours') * 1e3:.2f}",
                  ratio.text(".3f"))
        data.append({"adapter": name, "tokens": tokens, "medians": timings.medians(), "ratio": ratio.as_dict()})
    return table.markdown(), data


def step_section(budget: float) -> tuple[str, list]:
    from harness import comfy_bootstrap
    from harness.flux_adapters import instantx_tensors, xlabs_tensors
    from harness.tiny_dit import flux_inputs, run_flux, tiny_flux

    pack = comfy_bootstrap.load_pack()
    flux_mod = __import__(f"{pack.__name__}.nodes.flux", fromlist=["install_flux"])
    reader = __import__(f"{pack.__name__}.processors.families.flux", fromlist=["read_flux_adapter"])
    tiny = tiny_flux(seed=1)
    inputs = flux_inputs(tiny, batch=2, height=16, width=16)
    geometry = flux_mod.flux_geometry(tiny.patcher)
    embeds = torch.randn(1, 32)
    variants = {"plain": lambda: run_flux(tiny.patcher, inputs)}
    for name, tensors in (("XLabs", xlabs_tensors(64, 48, 32, 16)), ("InstantX", instantx_tensors(64, 48, 32, 128))):
        adapter = reader.read_flux_adapter(tensors, name)
        patched = flux_mod.install_flux(tiny.patcher, adapter, geometry, embeds, torch.zeros_like(embeds), 1.0,
                                        "linear", 0.0, 1.0, None, None, "")
        variants[name] = (lambda p: lambda: run_flux(p, inputs))(patched)
    timings = time_interleaved(variants, "cpu", budget)
    table = Table(["adapter", "plain ms", "with adapter ms", "with/plain (95 % CI)"])
    data = []
    for name in ("XLabs", "InstantX"):
        ratio = timings.ratio(name, "plain")
        table.add(name, f"{timings.median('plain') * 1e3:.2f}", f"{timings.median(name) * 1e3:.2f}",
                  ratio.text(".3f"))
        data.append({"adapter": name, "ratio": ratio.as_dict()})
    return table.markdown(), data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--budget", type=float, default=8.0, help="seconds of timing per section")
    parser.add_argument("--stem", default="dit_step_cpu", help="results/<stem>.md and .json")
    args = parser.parse_args()
    setup_threads("cpu", None)
    bootstrap_comfy("cpu")
    attention, attention_data = attention_section(args.tokens, args.budget)
    step, step_data = step_section(args.budget)
    path = write_results(args.stem, "Flux IP-Adapters: image attention vs diffusers, per-step overhead",
                         environment("cpu"),
                         [("Image attention per block call (Flux.1 width 3072, 24 x 128)", attention),
                          ("Per model call on the tiny Flux (1 double + 1 single block)", step)],
                         {"attention": attention_data, "step": step_data})
    print(path.read_text())


if __name__ == "__main__":
    main()
