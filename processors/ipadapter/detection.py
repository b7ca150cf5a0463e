"""Identify an IP-Adapter from tensor shapes alone (never from its file name)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .errors import IPAdapterFileError
from .projection import projection_config

# Full-face adapters project every CLIP hidden token: 16x16 patches + class token for ViT-H/14 at 224 px.
FULL_FACE_TOKENS = 257

# CLIP vision widths by output kind: pooled projection width, and penultimate hidden width.
_CLIP_FAMILIES: dict[str, dict[int, str]] = {
    "image_embeds": {768: "ViT-L", 1024: "ViT-H", 1280: "ViT-bigG"},
    "penultimate_hidden_states": {1024: "ViT-L", 1280: "ViT-H", 1664: "ViT-bigG"},
}
_BASE_MODELS: dict[int, str] = {768: "SD1.5", 2048: "SDXL"}
_SITE_KEY = re.compile(r"^(\d+)\.to_k_ip\.weight$")


def clip_encoder_name(width: int, clip_output: str) -> str | None:
    """The CLIP vision family that produces `width`-d `clip_output` (None when no common one does)."""
    return _CLIP_FAMILIES.get(clip_output, {}).get(width)


def base_model_name(cross_attention_dim: int) -> str:
    """SD1.5 / SDXL from the cross-attention (text context) width; "unknown" otherwise."""
    return _BASE_MODELS.get(cross_attention_dim, "unknown")


@dataclass(frozen=True)
class AdapterInfo:
    """What an IP-Adapter file is, derived from its shapes; used for validation and for log lines."""

    variant: str                 # "base" | "plus" | "full-face"
    projection: str              # projection class name
    num_tokens: int              # image tokens per reference image
    clip_output: str             # "image_embeds" | "penultimate_hidden_states"
    clip_width: int              # feature width the projection expects
    cross_attention_dim: int     # 768 SD1.5, 2048 SDXL
    num_sites: int               # attn2 sites it has weights for
    base_model: str              # "SD1.5" | "SDXL" | "unknown"
    site_inner_dims: tuple[int, ...]  # to_k_ip out features, in site order

    @property
    def clip_encoder(self) -> str | None:
        return clip_encoder_name(self.clip_width, self.clip_output)

    def describe(self) -> str:
        encoder = self.clip_encoder or "unknown encoder"
        return (f"{self.base_model} IP-Adapter ({self.variant}, {self.projection}, {self.num_tokens} tokens, "
                f"{self.clip_width}-d {self.clip_output} from {encoder}, cross-attention "
                f"{self.cross_attention_dim}, {self.num_sites} sites)")


def site_indices(ip_adapter: Mapping[str, Any]) -> list[int]:
    """Site order i for the weight keys `2i+1.to_k_ip.weight`; checks that they are complete."""
    numbers = sorted(int(m.group(1)) for k in ip_adapter if (m := _SITE_KEY.match(k)))
    expected = [2 * i + 1 for i in range(len(numbers))]
    if not numbers:
        raise IPAdapterFileError("ip_adapter weights contain no 'N.to_k_ip.weight' tensors")
    if numbers != expected:
        raise IPAdapterFileError(f"ip_adapter weight numbers {numbers[:8]}... are not 1, 3, 5, ... "
                                 "(odd numbers without gaps)")
    missing = [f"{n}.to_v_ip.weight" for n in numbers if f"{n}.to_v_ip.weight" not in ip_adapter]
    if missing:
        raise IPAdapterFileError(f"ip_adapter weights lack {', '.join(missing[:4])}")
    return list(range(len(numbers)))


def _site_shapes(ip_adapter: Mapping[str, torch.Tensor]) -> tuple[tuple[int, ...], int]:
    inner: list[int] = []
    contexts: set[int] = set()
    for i in site_indices(ip_adapter):
        for kind in ("k", "v"):
            out_f, in_f = ip_adapter[f"{2 * i + 1}.to_{kind}_ip.weight"].shape
            contexts.add(in_f)
        inner.append(int(ip_adapter[f"{2 * i + 1}.to_k_ip.weight"].shape[0]))
    if len(contexts) != 1:
        raise IPAdapterFileError(f"ip_adapter weights mix cross-attention widths {sorted(contexts)}")
    return tuple(inner), contexts.pop()


def _variant(projection: str, cfg: Mapping[str, int]) -> tuple[str, int, str, int, int]:
    """variant, tokens, CLIP output, CLIP width and token width for a projection config."""
    if projection == "MLPProjModel":
        return ("full-face", FULL_FACE_TOKENS, "penultimate_hidden_states", cfg["clip_embeddings_dim"],
                cfg["cross_attention_dim"])
    if projection == "Resampler":
        return "plus", cfg["num_queries"], "penultimate_hidden_states", cfg["embedding_dim"], cfg["output_dim"]
    return "base", cfg["num_tokens"], "image_embeds", cfg["clip_embeddings_dim"], cfg["cross_attention_dim"]


def detect_adapter(state_dict: Mapping[str, Mapping[str, torch.Tensor]]) -> AdapterInfo:
    """Detect an adapter from a nested {"image_proj": ..., "ip_adapter": ...} state dict's shapes.

    Only `.shape` is read, so meta tensors work too: identify.py feeds shapes read from a file header that way,
    and loaded and unloaded files follow these same rules. FaceID adapters get a FaceIDInfo (faceid.py)."""
    from .faceid import detect_faceid  # faceid.py builds on this module

    faceid = detect_faceid(state_dict)
    if faceid is not None:
        return faceid
    projection, cfg = projection_config(state_dict["image_proj"])
    variant, tokens, clip_output, clip_width, token_width = _variant(projection, cfg)
    inner, context = _site_shapes(state_dict["ip_adapter"])
    if token_width != context:
        raise IPAdapterFileError(f"image_proj produces {token_width}-d tokens but to_k_ip expects {context}-d")
    return AdapterInfo(variant=variant, projection=projection, num_tokens=tokens, clip_output=clip_output,
                       clip_width=clip_width, cross_attention_dim=context, num_sites=len(inner),
                       base_model=base_model_name(context), site_inner_dims=inner)
