"""Image projection models with the module layout of the original IP-Adapter release.

The attribute names and nesting are part of the file format: real checkpoints are loaded with strict
key checking, so `proj`, `norm`, `latents`, `proj_in`, `layers.N.0.*`, `layers.N.1.*`, `proj_out` and
`norm_out` must stay exactly as they are. Written from the published architecture (Apache-2.0 reference:
tencent-ailab/IP-Adapter); hyper-parameters are inferred from tensor shapes by `projection_config`.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .errors import IPAdapterFileError

# Every released Resampler uses 64-d heads; the head count is not recoverable from shapes otherwise.
RESAMPLER_DIM_HEAD = 64


class ImageProjModel(nn.Module):
    """Base / light / vit-G adapters: one pooled CLIP embedding -> `num_tokens` context tokens."""

    def __init__(self, cross_attention_dim: int, clip_embeddings_dim: int, num_tokens: int = 4) -> None:
        super().__init__()
        self.cross_attention_dim = cross_attention_dim
        self.num_tokens = num_tokens
        self.proj = nn.Linear(clip_embeddings_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(image_embeds).reshape(-1, self.num_tokens, self.cross_attention_dim)
        return self.norm(tokens)


class MLPProjModel(nn.Module):
    """Full-face adapters: an MLP applied to every CLIP hidden token (257 tokens for ViT-H/14 at 224 px)."""

    def __init__(self, cross_attention_dim: int, clip_embeddings_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.Linear(clip_embeddings_dim, clip_embeddings_dim),
            nn.GELU(),
            nn.Linear(clip_embeddings_dim, cross_attention_dim),
            nn.LayerNorm(cross_attention_dim),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden_states)


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    """Pre-norm bias-free MLP block; Sequential so the keys are `0` (norm), `1` and `3` (linears)."""
    inner = int(dim * mult)
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


class PerceiverAttention(nn.Module):
    """Latents attend to the image features and to themselves (keys/values over [x, latents])."""

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8) -> None:
        super().__init__()
        self.dim_head = dim_head
        self.heads = heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        latents = self.norm2(latents)
        q = self._heads(self.to_q(latents))
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        # Same maths as the reference (softmax(q k^T / sqrt(d)) v); projection runs in fp32, so the
        # reference's split-scale fp16 trick is not needed.
        out = F.scaled_dot_product_attention(q, self._heads(k), self._heads(v))
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class Resampler(nn.Module):
    """Plus / plus-face adapters: a Perceiver resampler from CLIP hidden states to `num_queries` tokens."""

    def __init__(self, dim: int = 768, depth: int = 4, dim_head: int = 64, heads: int = 12,
                 num_queries: int = 16, embedding_dim: int = 1280, output_dim: int = 768,
                 ff_mult: int = 4) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim ** 0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = perceiver_layers(dim, depth, dim_head, heads, ff_mult)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(hidden_states.shape[0], -1, -1)
        latents = resample(self.layers, self.proj_in(hidden_states), latents)
        return self.norm_out(self.proj_out(latents))


def perceiver_layers(dim: int, depth: int, dim_head: int, heads: int, ff_mult: int) -> nn.ModuleList:
    """`depth` x (PerceiverAttention, feed-forward): keys `layers.N.0.*` and `layers.N.1.*` (also FaceID Plus')."""
    return nn.ModuleList(
        nn.ModuleList([PerceiverAttention(dim, dim_head, heads), feed_forward(dim, ff_mult)]) for _ in range(depth)
    )


def resample(layers: nn.ModuleList, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """The latents after every residual attention + feed-forward layer over the features `x`."""
    for attn, ff in layers:
        latents = attn(x, latents) + latents
        latents = ff(latents) + latents
    return latents


PROJECTION_CLASSES: dict[str, type[nn.Module]] = {
    cls.__name__: cls for cls in (ImageProjModel, Resampler, MLPProjModel)
}


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise IPAdapterFileError(f"image_proj weights lack '{key}'")
    return tuple(sd[key].shape)


def _resampler_config(sd: Mapping[str, torch.Tensor]) -> dict[str, int]:
    _, num_queries, dim = _shape(sd, "latents")
    # Depth from every layer index, so a layer missing one tensor is reported as a missing key.
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))), default=-1)
    inner = _shape(sd, "layers.0.0.to_q.weight")[0]
    ff_inner = _shape(sd, "layers.0.1.1.weight")[0]
    if inner % RESAMPLER_DIM_HEAD or ff_inner % dim:
        raise IPAdapterFileError(f"unsupported Resampler widths (attention {inner}, feed-forward {ff_inner})")
    return {"dim": dim, "depth": depth, "dim_head": RESAMPLER_DIM_HEAD, "heads": inner // RESAMPLER_DIM_HEAD,
            "num_queries": num_queries, "embedding_dim": _shape(sd, "proj_in.weight")[1],
            "output_dim": _shape(sd, "proj_out.weight")[0], "ff_mult": ff_inner // dim}


def _image_proj_config(sd: Mapping[str, torch.Tensor]) -> dict[str, int]:
    out_features, clip_dim = _shape(sd, "proj.weight")
    cross = _shape(sd, "norm.weight")[0]
    if out_features % cross:
        raise IPAdapterFileError(f"proj.weight rows ({out_features}) are not a multiple of norm width ({cross})")
    return {"cross_attention_dim": cross, "clip_embeddings_dim": clip_dim, "num_tokens": out_features // cross}


def projection_config(sd: Mapping[str, torch.Tensor]) -> tuple[str, dict[str, Any]]:
    """Name the projection class and its constructor arguments from the `image_proj` tensor shapes."""
    if "perceiver_resampler.proj_in.weight" in sd or ("proj.2.weight" in sd and "proj.3.weight" not in sd):
        # FaceID projections are the FaceID family's (faceid.py); load_ipadapter_file builds those adapters.
        raise IPAdapterFileError("FaceID IP-Adapter weights: build them with faceid_adapter.faceid_from_state_dict "
                                 "(load_ipadapter_file does)")
    if "proj.3.weight" in sd:
        return "MLPProjModel", {"cross_attention_dim": _shape(sd, "proj.3.weight")[0],
                                "clip_embeddings_dim": _shape(sd, "proj.0.weight")[1]}
    if "latents" in sd:
        return "Resampler", _resampler_config(sd)
    if "proj.weight" in sd:
        return "ImageProjModel", _image_proj_config(sd)
    raise IPAdapterFileError("image_proj weights match no known projection model "
                             f"(keys: {', '.join(sorted(sd)[:6]) or 'none'})")
