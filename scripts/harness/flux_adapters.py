"""Synthetic Flux IP-Adapters in the real key layouts (XLabs v1/v2, InstantX), sized for a tiny Flux.

XLabs (safetensors, flat): `ip_adapter_proj_model.proj.{weight,bias}` [context*T, embed], `.norm.{weight,bias}`
[context], `double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj.{weight,bias}` [width, context].
InstantX (.bin nested or flat-prefix): `image_proj.proj.0` [2*embed, embed], `image_proj.proj.2`
[context*T, 2*embed], `image_proj.norm` [context], `ip_adapter.{i}.to_{k,v}_ip.weight` [width, context] for every
double then single block. Real sizes: width 3072, context 4096, embed 768 (XLabs) / 1152 (InstantX).
"""
from __future__ import annotations

import torch

XLABS_BLOCK = "double_blocks.{}.processor.ip_adapter_double_stream_{}_proj.{}"


def _randn(g: torch.Generator, *shape: int, scale: float = 0.2) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


def xlabs_tensors(width: int = 64, context: int = 48, embed: int = 32, tokens: int = 4, doubles: int = 1,
                  seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"ip_adapter_proj_model.proj.weight": _randn(g, context * tokens, embed),
           "ip_adapter_proj_model.proj.bias": _randn(g, context * tokens),
           "ip_adapter_proj_model.norm.weight": 1 + _randn(g, context, scale=0.1),
           "ip_adapter_proj_model.norm.bias": _randn(g, context, scale=0.1)}
    for i in range(doubles):
        for kind in "kv":
            out[XLABS_BLOCK.format(i, kind, "weight")] = _randn(g, width, context)
            out[XLABS_BLOCK.format(i, kind, "bias")] = _randn(g, width)
    return out


def instantx_tensors(width: int = 64, context: int = 48, embed: int = 32, tokens: int = 8, blocks: int = 2,
                     seed: int = 0, nested: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    proj = {"proj.0.weight": _randn(g, 2 * embed, embed), "proj.0.bias": _randn(g, 2 * embed),
            "proj.2.weight": _randn(g, context * tokens, 2 * embed), "proj.2.bias": _randn(g, context * tokens),
            "norm.weight": 1 + _randn(g, context, scale=0.1), "norm.bias": _randn(g, context, scale=0.1)}
    ip = {f"{i}.to_{kind}_ip.weight": _randn(g, width, context) for i in range(blocks) for kind in "kv"}
    if nested:
        return {"image_proj": proj, "ip_adapter": ip}
    return {**{f"image_proj.{k}": v for k, v in proj.items()}, **{f"ip_adapter.{k}": v for k, v in ip.items()}}


def siglip_head_tensors(width: int = 32, mlp: int = 48, seed: int = 0) -> dict[str, torch.Tensor]:
    """`vision_model.head.*` of a SigLIP vision model (the attention-pooling head), random."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"probe": (1, 1, width), "attention.in_proj_weight": (3 * width, width), "attention.in_proj_bias":
              (3 * width,), "attention.out_proj.weight": (width, width), "attention.out_proj.bias": (width,),
              "layernorm.weight": (width,), "layernorm.bias": (width,), "mlp.fc1.weight": (mlp, width),
              "mlp.fc1.bias": (mlp,), "mlp.fc2.weight": (width, mlp), "mlp.fc2.bias": (width,)}
    return {f"vision_model.head.{k}": _randn(g, *s) for k, s in shapes.items()}
