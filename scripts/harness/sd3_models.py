"""Synthetic SD3.5 InstantX IP-Adapter weights in the release's key layout (no downloads).

The layout is the InstantX SD3.5-Large-IP-Adapter file's (`image_proj.*` with `layers.{i}.0.to_kv`-style names,
`ip_adapter.{i}.{norm_ip.linear, to_k_ip, to_v_ip, norm_q, norm_k, norm_ip_k}`), as diffusers'
loaders/transformer_sd3.py reads it; the real file's sizes are in `REAL`. Norm weights are drawn around 1 and
the others small, so every parameter changes the output.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SD3AdapterShape:
    hidden: int = 128  # the model's width: heads x head_dim
    head_dim: int = 64
    blocks: int = 2
    encoder_width: int = 48  # SigLIP so400m: 1152
    tokens: int = 8  # resampler queries: 64
    resampler_hidden: int = 128  # 1280
    resampler_heads: int = 2  # 20 (64 wide each)
    depth: int = 4  # diffusers' converter builds 4 layers
    timestep_in: int = 32  # 320


REAL = SD3AdapterShape(hidden=2432, head_dim=64, blocks=38, encoder_width=1152, tokens=64, resampler_hidden=1280,
                       resampler_heads=20, depth=4, timestep_in=320)


def _shapes(s: SD3AdapterShape) -> dict[str, tuple[int, ...]]:
    h, inner = s.resampler_hidden, s.resampler_heads * 64
    shapes: dict[str, tuple[int, ...]] = {
        "image_proj.latents": (1, s.tokens, h),
        "image_proj.proj_in.weight": (h, s.encoder_width), "image_proj.proj_in.bias": (h,),
        "image_proj.proj_out.weight": (s.hidden, h), "image_proj.proj_out.bias": (s.hidden,),
        "image_proj.norm_out.weight": (s.hidden,), "image_proj.norm_out.bias": (s.hidden,),
        "image_proj.time_embedding.linear_1.weight": (h, s.timestep_in),
        "image_proj.time_embedding.linear_1.bias": (h,),
        "image_proj.time_embedding.linear_2.weight": (h, h), "image_proj.time_embedding.linear_2.bias": (h,),
    }
    for i in range(s.depth):
        p = f"image_proj.layers.{i}."
        shapes.update({
            p + "0.norm1.weight": (h,), p + "0.norm1.bias": (h,), p + "0.norm2.weight": (h,), p + "0.norm2.bias": (h,),
            p + "0.to_q.weight": (inner, h), p + "0.to_kv.weight": (2 * inner, h), p + "0.to_out.weight": (h, inner),
            p + "1.0.weight": (h,), p + "1.0.bias": (h,), p + "1.1.weight": (4 * h, h), p + "1.3.weight": (h, 4 * h),
            p + "2.1.weight": (4 * h, h), p + "2.1.bias": (4 * h,),
        })
    for i in range(s.blocks):
        p = f"ip_adapter.{i}."
        shapes.update({
            p + "norm_ip.linear.weight": (2 * s.hidden, h), p + "norm_ip.linear.bias": (2 * s.hidden,),
            p + "to_k_ip.weight": (s.hidden, s.hidden), p + "to_v_ip.weight": (s.hidden, s.hidden),
            p + "norm_q.weight": (s.head_dim,), p + "norm_k.weight": (s.head_dim,), p + "norm_ip_k.weight": (s.head_dim,),
        })
    return shapes


def instantx_sd3_state_dict(shape: SD3AdapterShape = SD3AdapterShape(), seed: int = 0,
                            dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A flat `image_proj.*` / `ip_adapter.*` state dict of random weights in InstantX's layout."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, size in _shapes(shape).items():
        is_norm = key.endswith("norm1.weight") or key.endswith("norm2.weight") or ".1.0.weight" in key or \
            "norm_out.weight" in key or key.endswith("norm_q.weight") or key.endswith("norm_k.weight") or \
            key.endswith("norm_ip_k.weight")
        values = torch.randn(size, generator=gen)
        if is_norm:
            values = 1.0 + 0.2 * values
        elif key.endswith("latents"):
            values = values / shape.resampler_hidden ** 0.5
        else:
            fan_in = size[-1] if len(size) > 1 else 64
            values = values / fan_in ** 0.5
        out[key] = values.to(dtype)
    return out


def nested(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The `.bin` release's nesting: {"image_proj": {...}, "ip_adapter": {...}} (also diffusers' input)."""
    out: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in state.items():
        head, rest = key.split(".", 1)
        out[head][rest] = value
    return out


def shape_with(**changes) -> SD3AdapterShape:
    return replace(SD3AdapterShape(), **changes)


def describe(shape: SD3AdapterShape) -> dict:
    return asdict(shape)


class HostLikeProcessor:
    """What ComfyUI's MMDiT does around our patch, on diffusers' Attention modules (a diffusers processor): q/k
    through the block's own norms, one joint attention over text-then-image tokens, then our image attention
    (processors/families/sd3.py) added to the image part before the output projections.

    `branch(attn)` returns the adapter's JointBranch for this call (the benchmark computes its K/V inside, as
    diffusers' processor does); `attend` is the engine's plain attention (Planner.attention)."""

    def __init__(self, branch, attend) -> None:
        self.branch, self.attend = branch, attend

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **_):
        heads = attn.heads

        def project(x, to_q, to_k, to_v, norm_q, norm_k):
            q, k, v = (layer(x).unflatten(-1, (heads, -1)) for layer in (to_q, to_k, to_v))
            q, k = (t if norm is None else norm(t) for t, norm in ((q, norm_q), (k, norm_k)))
            return q.flatten(-2), k.flatten(-2), v.flatten(-2)

        img = project(hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
        txt = project(encoder_hidden_states, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj,
                      attn.norm_added_q, attn.norm_added_k)
        q, k, v = (torch.cat([t, i], dim=1).unflatten(-1, (heads, -1)).transpose(1, 2) for t, i in zip(txt, img))
        joint = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(-2)
        length = encoder_hidden_states.shape[1]
        host_q = getattr(attn.norm_q, "weight", None)
        host_k = getattr(attn.norm_k, "weight", None)
        from processors.families.sd3 import joint_image_attention

        branch = self.branch(attn) if callable(self.branch) else self.branch
        image = joint[:, length:] + joint_image_attention(*img, heads, [branch], self.attend,
                                                          host_q_norm=host_q, host_k_norm=host_k)
        return attn.to_out[0](image), attn.to_add_out(joint[:, :length])
