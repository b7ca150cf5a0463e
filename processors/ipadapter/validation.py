"""Checks that an IP-Adapter fits the diffusion model and the CLIP vision output, with fix-it messages."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .detection import AdapterInfo, base_model_name, clip_encoder_name
from .errors import IPAdapterInputError, IPAdapterMismatchError
from .faceid import NO_CLIP, USE_FACEID_NODE

logger = logging.getLogger(__name__)

CLIP_OUTPUTS = ("image_embeds", "penultimate_hidden_states")
_ENCODER_FILES = {"ViT-L": "CLIP-ViT-L-14", "ViT-H": "CLIP-ViT-H-14", "ViT-bigG": "CLIP-ViT-bigG-14"}


@dataclass(frozen=True)
class SiteSpec:
    """One attn2 site of the diffusion model, as the host enumerates it (input, output, middle order)."""

    key: tuple
    heads: int
    dim_head: int
    context_dim: int

    @property
    def inner_dim(self) -> int:
        return self.heads * self.dim_head


def _model_label(context_dims: set[int]) -> str:
    names = {base_model_name(c) for c in context_dims}
    return names.pop() if len(names) == 1 and "unknown" not in names else "a different base model"


def validate_against_sites(info: AdapterInfo, sites: Sequence[SiteSpec], model_label: str = "the model") -> None:
    """Raise IPAdapterMismatchError unless the adapter has one matching weight pair per attn2 site."""
    contexts = {s.context_dim for s in sites}
    if len(sites) != info.num_sites or contexts != {info.cross_attention_dim}:
        ctx = "/".join(str(c) for c in sorted(contexts)) or "none"
        other = _model_label(contexts)
        fix = (f"load an IP-Adapter made for {other}, or use a {info.base_model} checkpoint"
               if other != info.base_model else "this IP-Adapter was trained for a different UNet layout")
        raise IPAdapterMismatchError(
            f"this IP-Adapter is for {info.base_model} (cross-attention {info.cross_attention_dim}, "
            f"{info.num_sites} sites); {model_label} is {other} ({ctx}, {len(sites)} sites): {fix}")
    for i, (site, inner) in enumerate(zip(sites, info.site_inner_dims)):
        if site.inner_dim != inner:
            raise IPAdapterMismatchError(
                f"attn2 site {site.key} of {model_label} has inner dim {site.inner_dim} "
                f"({site.heads} heads x {site.dim_head}), but the IP-Adapter's weight {2 * i + 1} has {inner}: "
                "this IP-Adapter was trained for a different UNet layout")


def _clip_field(clip_output: Any, name: str) -> Any:
    value = getattr(clip_output, name, None)
    if value is None:
        try:
            value = clip_output[name]
        except (KeyError, TypeError, IndexError):
            value = None
    return value


def _family(width: int, kind: str) -> str:
    return clip_encoder_name(width, kind) or "an unusual encoder"


def check_image_batch(image: torch.Tensor | None, label: str = "image") -> torch.Tensor:
    """An IMAGE input must be a non-empty [B, H, W, C] batch of floats in 0..1; returned as float32.

    IMAGE is float32 by ComfyUI's convention, and the host's CLIP preprocessing (bicubic resize) has no
    half-precision CPU kernel: an fp16/bf16 image from another node is cast here (lossless), not refused.
    """
    if image is None or not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[0] == 0:
        raise IPAdapterInputError(f"{label} batch is empty: connect at least one image")
    if not image.is_floating_point():
        raise IPAdapterInputError(f"{label} has dtype {image.dtype}; an IMAGE holds floats in 0..1 (float32): "
                                  "convert it with the node that produced it")
    if image.dtype != torch.float32:
        logger.debug("%s: %s IMAGE cast to float32 for CLIP vision", label, image.dtype)
        image = image.float()
    return image


def check_finite(tensor: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise IPAdapterInputError(
            f"{what} contains NaN or infinite values: the CLIP vision model overflowed or its file is "
            "corrupt (try running it in fp32, e.g. ComfyUI's --fp32-text-enc, or re-download it)")


def validate_clip_output(info: AdapterInfo, clip_output: Any) -> torch.Tensor:
    """Return the CLIP tensor this adapter consumes, after checking kind, width and values."""
    kind = info.clip_output
    if kind == NO_CLIP:  # FaceID / Portrait: fed by face embeddings alone
        raise IPAdapterMismatchError(USE_FACEID_NODE)
    feats = _clip_field(clip_output, kind)
    if not isinstance(feats, torch.Tensor):
        raise IPAdapterMismatchError(f"this IP-Adapter needs the CLIP vision output '{kind}', which the "
                                     "connected CLIP vision model does not provide: load a CLIP vision model")
    expected_dims = 2 if kind == "image_embeds" else 3
    if feats.dim() != expected_dims or feats.shape[0] == 0:
        raise IPAdapterInputError(f"CLIP vision '{kind}' has shape {tuple(feats.shape)}; expected "
                                  f"{expected_dims} dims with at least one image")
    width = int(feats.shape[-1])
    if width != info.clip_width:
        want = _family(info.clip_width, kind)
        got = _family(width, kind)
        fix = f"load {_ENCODER_FILES[want]}" if want in _ENCODER_FILES else "load the matching CLIP vision model"
        noun = "embeddings" if kind == "image_embeds" else "hidden states"
        raise IPAdapterMismatchError(
            f"this IP-Adapter expects {info.clip_width}-d CLIP vision {noun} ({want}); the CLIP vision output "
            f"has {width} ({got}): {fix}")
    check_finite(feats, f"CLIP vision '{kind}'")
    return feats
