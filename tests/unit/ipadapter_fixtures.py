"""Synthetic IP-Adapter state dicts in the original release's key layout (written out by hand here, not
derived from our modules, so strict loading is a real check). Nothing is downloaded."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

Shape = tuple[int, ...]
Maker = Callable[[Shape], torch.Tensor]

# attn2 inner dims in weight order (input, output, middle); research notes section 2c.
SD15_INNER = (320, 320, 640, 640, 1280, 1280) + (1280,) * 3 + (640,) * 3 + (320,) * 3 + (1280,)
SDXL_INNER = (640,) * 4 + (1280,) * 20 + (1280,) * 30 + (640,) * 6 + (1280,) * 10


def lazy(shape: Shape) -> torch.Tensor:
    """A tensor with the right shape and no memory: enough for shape-only detection."""
    return torch.zeros(()).expand(shape)


def zeros(shape: Shape) -> torch.Tensor:
    return torch.zeros(shape)


def random_maker(seed: int = 0, scale: float = 0.2) -> Maker:
    gen = torch.Generator().manual_seed(seed)
    return lambda shape: torch.randn(shape, generator=gen) * scale


def image_proj_shapes(clip_width: int, cross: int, tokens: int = 4) -> dict[str, Shape]:
    return {"proj.weight": (tokens * cross, clip_width), "proj.bias": (tokens * cross,),
            "norm.weight": (cross,), "norm.bias": (cross,)}


def mlp_proj_shapes(clip_width: int, cross: int) -> dict[str, Shape]:
    return {"proj.0.weight": (clip_width, clip_width), "proj.0.bias": (clip_width,),
            "proj.2.weight": (cross, clip_width), "proj.2.bias": (cross,),
            "proj.3.weight": (cross,), "proj.3.bias": (cross,)}


def resampler_shapes(dim: int, depth: int, heads: int, queries: int, clip_width: int, out: int,
                     dim_head: int = 64, ff_mult: int = 4) -> dict[str, Shape]:
    inner = heads * dim_head
    shapes: dict[str, Shape] = {"latents": (1, queries, dim), "proj_in.weight": (dim, clip_width),
                                "proj_in.bias": (dim,), "proj_out.weight": (out, dim), "proj_out.bias": (out,),
                                "norm_out.weight": (out,), "norm_out.bias": (out,)}
    for n in range(depth):
        a, f = f"layers.{n}.0.", f"layers.{n}.1."
        shapes.update({a + "norm1.weight": (dim,), a + "norm1.bias": (dim,), a + "norm2.weight": (dim,),
                       a + "norm2.bias": (dim,), a + "to_q.weight": (inner, dim),
                       a + "to_kv.weight": (2 * inner, dim), a + "to_out.weight": (dim, inner),
                       f + "0.weight": (dim,), f + "0.bias": (dim,), f + "1.weight": (dim * ff_mult, dim),
                       f + "3.weight": (dim, dim * ff_mult)})
    return shapes


def ip_layer_shapes(cross: int, inner_dims: Sequence[int]) -> dict[str, Shape]:
    shapes: dict[str, Shape] = {}
    for i, inner in enumerate(inner_dims):
        shapes[f"{2 * i + 1}.to_k_ip.weight"] = (inner, cross)
        shapes[f"{2 * i + 1}.to_v_ip.weight"] = (inner, cross)
    return shapes


def build(proj_shapes: dict[str, Shape], ip_shapes: dict[str, Shape], make: Maker = lazy,
          layout: str = "nested") -> dict:
    """State dict in one of the file layouts: "nested", "flat" or "adapter_modules" (flat alias)."""
    proj = {k: make(s) for k, s in proj_shapes.items()}
    ip = {k: make(s) for k, s in ip_shapes.items()}
    for key in [k for k, s in proj_shapes.items() if len(s) == 1 and k.endswith(".weight")]:
        proj[key] = proj[key] + 1.0  # the only 1-D weights are layer norms: near 1, like trained ones
    if layout == "nested":
        return {"image_proj": proj, "ip_adapter": ip}
    ip_prefix = "ip_adapter." if layout == "flat" else "adapter_modules."
    flat = {f"image_proj.{k}": v for k, v in proj.items()}
    flat.update({ip_prefix + k: v for k, v in ip.items()})
    return flat


# Small but structurally complete adapters for numeric tests (clip width 32, context 24).
TINY_CLIP, TINY_CROSS, TINY_INNER = 32, 24, (16, 32, 16)


def tiny_adapter(kind: str, seed: int = 0, layout: str = "nested", inner: Sequence[int] = TINY_INNER) -> dict:
    if kind == "base":
        proj = image_proj_shapes(TINY_CLIP, TINY_CROSS, tokens=4)
    elif kind == "plus":
        proj = resampler_shapes(dim=16, depth=2, heads=2, queries=4, clip_width=TINY_CLIP, out=TINY_CROSS,
                                ff_mult=2)
    else:
        proj = mlp_proj_shapes(TINY_CLIP, TINY_CROSS)
    return build(proj, ip_layer_shapes(TINY_CROSS, inner), random_maker(seed), layout)
