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
    import comfy.patcher_extension

    options = dict(patcher.model_options.get("transformer_options", {}))
    # as CFGGuider.outer_sample does: the patcher's wrappers (e.g. DIFFUSION_MODEL) travel in the options
    options["wrappers"] = comfy.patcher_extension.copy_nested_dicts(patcher.wrappers)
    options.update(transformer_options or {})
    options.setdefault("sigmas", inputs["t"])
    options.setdefault("cond_or_uncond", [0] * 1 if inputs["x"].shape[0] == 1 else [1, 0])
    model = patcher.model
    with torch.no_grad():
        return model.apply_model(inputs["x"], inputs["t"], c_crossattn=inputs["c_crossattn"], y=inputs["y"],
                                 guidance=inputs["guidance"], transformer_options=options)


# --- SD3 (MMDiT) ------------------------------------------------------------------------------------------------
# ComfyUI's MMDiT is 64 x depth wide with `depth` heads of 64 (its detection derives both from the weights), so a
# depth-2 model is 128 wide: the smallest SD3 the real loader would also detect. qk_norm "rms" as SD3.5 Large.
TINY_SD3 = dict(in_channels=16, out_channels=16, patch_size=2, depth=2, adm_in_channels=32,
                context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 48, "out_features": 128}},
                pos_embed_max_size=8, num_patches=64, qk_norm="rms", pos_embed_scaling_factor=None,
                x_block_self_attn_layers=[], input_size=None)


@dataclass(frozen=True)
class TinySD3:
    patcher: object  # comfy.model_patcher.ModelPatcher
    config: dict

    @property
    def width(self) -> int:
        return 64 * self.config["depth"]

    @property
    def blocks(self) -> int:
        return self.config["depth"]


def tiny_sd3(seed: int = 0, **overrides) -> TinySD3:
    """A random-weight SD3 ModelPatcher (fp32, CPU) from `comfy.supported_models.SD3` + `comfy.model_base.SD3`;
    `overrides` change the unet config (depth=3 is 192 wide; qk_norm=None drops the q/k RMSNorm)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config = {**TINY_SD3, **overrides}
    if "depth" in overrides and "context_embedder_config" not in overrides:
        config["context_embedder_config"] = {"target": "torch.nn.Linear",
                                             "params": {"in_features": 48, "out_features": 64 * config["depth"]}}
    model_config = comfy.supported_models.SD3(dict(config))
    model_config.set_inference_dtype(torch.float32, None)
    torch.manual_seed(seed)
    model = model_config.get_model({}, device="cpu")
    with torch.no_grad():
        for name, parameter in model.diffusion_model.named_parameters():
            if name.endswith(("ln_q.weight", "ln_k.weight")):
                parameter.copy_(1.0 + 0.3 * torch.randn_like(parameter))  # q/k norms that are not identities
            else:
                parameter.normal_(0.0, 0.2)
        for buffer in model.diffusion_model.buffers():  # pos_embed: allocated empty (a file would fill it)
            buffer.normal_(0.0, 0.2)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    return TinySD3(patcher, config)


def sd3_inputs(tiny: TinySD3, batch: int = 2, height: int = 8, width: int = 8, txt_tokens: int = 5,
               seed: int = 1, sigma: float = 0.7) -> dict:
    """Inputs for `patcher.model.apply_model`: latent x `[B, 16, H, W]`, sigma t, context, pooled y."""
    g = torch.Generator().manual_seed(seed)
    cfg = tiny.config
    return dict(x=torch.randn(batch, cfg["in_channels"], height, width, generator=g), t=torch.full((batch,), sigma),
                c_crossattn=torch.randn(batch, txt_tokens, 48, generator=g),
                y=torch.randn(batch, cfg["adm_in_channels"], generator=g))


def run_sd3(patcher, inputs: dict, transformer_options: dict | None = None) -> torch.Tensor:
    """One denoiser call as ComfyUI's sampler makes it (sigmas, cond_or_uncond), through the patcher's wrappers."""
    import comfy.patcher_extension

    options = dict(patcher.model_options.get("transformer_options", {}))
    # as CFGGuider.outer_sample does: the patcher's wrappers (e.g. DIFFUSION_MODEL) travel in the options
    options["wrappers"] = comfy.patcher_extension.copy_nested_dicts(patcher.wrappers)
    options.update(transformer_options or {})
    options.setdefault("sigmas", inputs["t"])
    options.setdefault("cond_or_uncond", [0] if inputs["x"].shape[0] == 1 else [1, 0])
    options["wrappers"] = patcher.wrappers  # what the sampler merges in (DIFFUSION_MODEL wrappers)
    with torch.no_grad():
        return patcher.model.apply_model(inputs["x"], inputs["t"], c_crossattn=inputs["c_crossattn"], y=inputs["y"],
                                         transformer_options=options)
