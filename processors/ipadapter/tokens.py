"""Image tokens (projected CLIP features) for the positive and negative CFG rows, host-agnostic.

The caller passes `encode`, a callable from an IMAGE batch [B, H, W, C] in 0..1 to a CLIP vision output
(ComfyUI's `clip_vision.encode_image` fits), so this module never imports a host.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .errors import IPAdapterInputError, IPAdapterMismatchError
from .faceid import USE_FACEID_NODE
from .validation import check_finite, check_image_batch, validate_clip_output
from .weights import IPAdapterModel

COMBINE_EMBEDS = ("concat", "add", "subtract", "average", "norm average")
# Combine Embeds offers two more, element-wise over the images (the standard pack's IPAdapterCombineEmbeds).
COMBINE_METHODS = COMBINE_EMBEDS + ("max", "min")

Encoder = Callable[[torch.Tensor], Any]


@dataclass(frozen=True, eq=False)
class ImageTokens:
    """Projected image tokens [1, n*T, C] (float32) for the cond and uncond rows; n images of T tokens."""

    cond: torch.Tensor
    uncond: torch.Tensor
    tokens_per_image: int

    @property
    def num_images(self) -> int:
        return self.cond.shape[1] // self.tokens_per_image


def check_combine(combine: str, options: tuple[str, ...] = COMBINE_EMBEDS, label: str = "combine_embeds") -> None:
    if combine not in options:
        raise IPAdapterInputError(f"{label} must be one of {', '.join(options)}; got {combine!r}")


def combine_embeddings(embeds: torch.Tensor, combine: str) -> torch.Tensor:
    """Combine n CLIP embeddings ([n, W] or [n, N, W]) over the image axis, before projection.

    Same meanings as the de-facto standard pack, so workflows give the same result after swapping nodes:
    "concat" keeps every image (their tokens are concatenated after projection); "add" sums; "subtract"
    is the first minus the mean of the others; "average" is the mean; "norm average" divides every
    element by its L2 norm *across the images* (dim 0, element-wise) and then averages. One image is
    never combined (the "norm average" formula would otherwise reduce it to its signs). "max" and "min"
    (Combine Embeds only) take the element-wise maximum / minimum over the images.
    """
    check_combine(combine, COMBINE_METHODS, "method")
    if combine == "concat" or embeds.shape[0] == 1:
        return embeds
    if combine == "add":
        return embeds.sum(dim=0, keepdim=True)
    if combine == "subtract":
        return embeds[:1] - embeds[1:].mean(dim=0, keepdim=True)
    if combine == "average":
        return embeds.mean(dim=0, keepdim=True)
    if combine == "max":
        return embeds.amax(dim=0, keepdim=True)
    if combine == "min":
        return embeds.amin(dim=0, keepdim=True)
    norms = torch.linalg.vector_norm(embeds, dim=0, keepdim=True)
    return (embeds / norms).mean(dim=0, keepdim=True)


def _resize_batch(embeds: torch.Tensor, count: int) -> torch.Tensor:
    """Trim, or repeat the last row, so the negative has as many images as the positive."""
    if embeds.shape[0] >= count:
        return embeds[:count]
    extra = embeds[-1:].expand(count - embeds.shape[0], *embeds.shape[1:])
    return torch.cat([embeds, extra], dim=0)


def _negative_embeds(model: IPAdapterModel, encode: Encoder, image: torch.Tensor,
                     image_negative: torch.Tensor | None, positive: torch.Tensor) -> torch.Tensor:
    """The original IP-Adapter's uncond: zero embeddings, or CLIP hidden states of a black image."""
    if image_negative is not None:
        image_negative = check_image_batch(image_negative, "image_negative")
        return validate_clip_output(model.info, encode(image_negative)).float()
    if model.info.clip_output == "image_embeds":
        return torch.zeros_like(positive)
    # All black images encode alike: encode one and repeat it.
    black = validate_clip_output(model.info, encode(torch.zeros_like(image[:1]))).float()
    return black.expand(positive.shape[0], *black.shape[1:])


@torch.no_grad()
def project(model: IPAdapterModel, embeds: torch.Tensor) -> torch.Tensor:
    """Project CLIP features with the adapter's projection model in float32 -> [n, T, C]."""
    if model.info.variant.startswith("faceid"):  # FaceID projections take face embeddings (faceid_adapter.py)
        raise IPAdapterMismatchError(USE_FACEID_NODE)
    param = next(model.image_proj.parameters())
    tokens = model.image_proj(embeds.to(device=param.device, dtype=torch.float32))
    check_finite(tokens, "the projected image tokens")
    return tokens


def encode_embeddings(model: IPAdapterModel, encode: Encoder, image: torch.Tensor,
                      image_negative: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The CLIP features `model` is fed with (float32) for `image` and for the negative side: the encoded
    `image_negative`, else the original IP-Adapter's uncond (zeros, or a black image's hidden states)."""
    image = check_image_batch(image, "image")
    positive = encode_positive(model, encode, image)
    return positive, _negative_embeds(model, encode, image, image_negative, positive)


def encode_positive(model: IPAdapterModel, encode: Encoder, image: torch.Tensor, label: str = "image") -> torch.Tensor:
    """The CLIP features `model` is fed with for `image` (float32), checked."""
    return validate_clip_output(model.info, encode(check_image_batch(image, label))).float()


def tokens_from_embeddings(model: IPAdapterModel, positive: torch.Tensor, negative: torch.Tensor,
                           combine: str = "concat") -> ImageTokens:
    """Combine and project CLIP features into cond/uncond image tokens.

    For "concat" the n images give n*T tokens, and the negative is trimmed or padded (last image
    repeated) to n images so both rows have the same length; other modes keep one negative image,
    as the standard pack does.
    """
    check_combine(combine)
    cond_embeds = combine_embeddings(positive, combine)
    uncond_embeds = _resize_batch(negative, positive.shape[0]) if combine == "concat" else negative[:1]
    cond, uncond = project(model, cond_embeds), project(model, uncond_embeds)
    per_image = cond.shape[1]
    return ImageTokens(cond=cond.reshape(1, -1, cond.shape[-1]), uncond=uncond.reshape(1, -1, uncond.shape[-1]),
                       tokens_per_image=per_image)


def image_tokens(model: IPAdapterModel, encode: Encoder, image: torch.Tensor,
                 image_negative: torch.Tensor | None = None, combine: str = "concat") -> ImageTokens:
    """Encode `image` (and `image_negative`), combine and project them into cond/uncond image tokens."""
    check_combine(combine)
    return tokens_from_embeddings(model, *encode_embeddings(model, encode, image, image_negative), combine)
