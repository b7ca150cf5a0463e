"""Building blocks for in-process host tests: a tiny CLIP vision model, adapters for the tiny UNet, sampling.

The stock CLIPVisionLoader needs a full-size ViT (hundreds of MB, seconds per encode on 2 cores); the
behaviour tests use ComfyUI's own `ClipVisionModel` class with a tiny config instead, filled with seeded
random weights. The e2e tests use the stock loader with a full-size random ViT-L.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

from . import tiny_models as tm

TINY_CLIP_VISION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                        patch_size=14, image_size=224, projection_dim=96, hidden_act="gelu",
                        layer_norm_eps=1e-5, model_type="clip_vision_model", num_channels=3)


def pack_module(name: str):
    """A submodule of the pack as ComfyUI loaded it (e.g. "nodes.apply")."""
    return importlib.import_module(f"xformers_ipadapter.{name}")


def tiny_clip_vision(workdir: Path):
    import comfy.clip_vision

    config = Path(workdir) / "tiny_clip_vision.json"
    config.write_text(json.dumps(TINY_CLIP_VISION))
    model = comfy.clip_vision.ClipVisionModel(str(config))
    layout = tm._module_layout(model.model, lambda key, p: "randn")
    missing, unexpected = model.load_sd(tm.fill(layout, seed=7, dtype=torch.float32))
    assert not missing and not unexpected
    return model


def adapter(kind: str, seed: int = 1, sites: int = 4, inner: int = tm.TINY_UNET_INNER_DIM,
            cross: int = tm.CROSS_ATTENTION_DIM):
    """An IP-Adapter for the tiny UNet sized for TINY_CLIP_VISION: "base" (image_embeds) or "plus" (hidden)."""
    ipadapter = pack_module("processors.ipadapter")
    if kind == "base":
        layout = tm.ipadapter_base_layout(TINY_CLIP_VISION["projection_dim"], cross=cross)
    else:
        layout = tm.ipadapter_plus_layout(TINY_CLIP_VISION["hidden_size"], cross=cross)
    layout = {k: v for k, v in layout.items() if not k.startswith("ip_adapter.")}
    layout.update(tm._ip_layers(sites=sites, inner=inner, cross=cross))
    state = {k: t.float() * (25.0 if k.startswith("ip_adapter.") else 1.0)  # a visible effect on the latent
             for k, t in tm.fill(layout, seed=seed).items()}
    return ipadapter.ipadapter_from_state_dict(state, name=f"tiny {kind}")


def conditioning(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, tm.CROSS_ATTENTION_DIM, generator=gen), {}]]


def sample(model, steps: int = 3, cfg: float = 4.0, seed: int = 0, size: int = 64, batch: int = 1,
           positive=None, negative=None):
    """A real KSampler run (euler, normal) on fixed noise and conditioning (default: conditioning(1) and (2));
    returns the latent."""
    import comfy.sample

    latent = torch.zeros(batch, 4, size // 8, size // 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    positive = conditioning(1) if positive is None else positive
    negative = conditioning(2) if negative is None else negative
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative,
                               latent, seed=seed, disable_pbar=True)


def image(seed: int, batch: int = 1, height: int = 224, width: int = 224) -> torch.Tensor:
    return torch.rand(batch, height, width, 3, generator=torch.Generator().manual_seed(seed))
