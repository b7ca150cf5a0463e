"""Tiny DiT models (Flux now; SD3 builders welcome here) built from ComfyUI's own model classes.

ComfyUI's Flux detection fixes the width at 3072 (24 heads, axes_dim [16, 56, 56]), so a tiny Flux cannot be
loaded from a checkpoint file through `comfy.sd`; the builder instantiates `comfy.supported_models.Flux` with a
small unet_config and wraps `comfy.model_base.Flux` in a ModelPatcher, exactly what the loader would build for
a full-size file (same classes, same forward, same dit replace hooks). Call `comfy_bootstrap.bootstrap()` first.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# hidden 64 = 2 heads x 32; axes_dim sums to the head dim, as Flux's [16, 56, 56] sums to 128
TINY_FLUX = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=48,
                 hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12],
                 theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)


@dataclass(frozen=True)
class TinyFlux:
    patcher: object  # comfy.model_patcher.ModelPatcher
    config: dict

    @property
    def width(self) -> int:
        return self.config["hidden_size"]

    @property
    def heads(self) -> int:
        return self.config["num_heads"]


def tiny_flux(seed: int = 0, **overrides) -> TinyFlux:
    """A random-weight Flux ModelPatcher (fp32, CPU) from ComfyUI's own classes; `overrides` change the config
    (e.g. depth=2, hidden_size=96 with axes_dim summing to hidden_size/num_heads)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config = {**TINY_FLUX, **overrides}
    model_config = comfy.supported_models.Flux(dict(config))
    model_config.set_inference_dtype(torch.float32, None)
    torch.manual_seed(seed)
    model = model_config.get_model({}, device="cpu")
    with torch.no_grad():
        for parameter in model.diffusion_model.parameters():
            parameter.normal_(0.0, 0.2)  # random, not zero: every path of the block carries signal
    offload = comfy.model_management.unet_offload_device()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=offload)
    return TinyFlux(patcher, config)


def flux_inputs(tiny: TinyFlux, batch: int = 2, height: int = 8, width: int = 8, txt_tokens: int = 5,
                seed: int = 1) -> dict:
    """Inputs for `patcher.model.apply_model`: latent x `[B, 16, H, W]`, timestep, context, y, guidance."""
    g = torch.Generator().manual_seed(seed)
    cfg = tiny.config
    return dict(x=torch.randn(batch, cfg["in_channels"], height, width, generator=g),
                t=torch.full((batch,), 0.7),
                c_crossattn=torch.randn(batch, txt_tokens, cfg["context_in_dim"], generator=g),
                y=torch.randn(batch, cfg["vec_in_dim"], generator=g),
                guidance=torch.full((batch,), 3.5))


def run_flux(patcher, inputs: dict, transformer_options: dict | None = None) -> torch.Tensor:
    """One denoiser call the way ComfyUI's sampler makes it (model_options' transformer_options, sigmas,
    cond_or_uncond), without a sampler: returns the model's output."""
    options = dict(patcher.model_options.get("transformer_options", {}))
    options.update(transformer_options or {})
    options.setdefault("sigmas", inputs["t"])
    options.setdefault("cond_or_uncond", [0] * 1 if inputs["x"].shape[0] == 1 else [1, 0])
    model = patcher.model
    with torch.no_grad():
        return model.apply_model(inputs["x"], inputs["t"], c_crossattn=inputs["c_crossattn"], y=inputs["y"],
                                 guidance=inputs["guidance"], transformer_options=options)
