"""Regional IP-Adapter parameters (the XFORMERS_IPADAPTER_PARAMS input type): one region per reference image, each with
its own weight, weight type, start/end window and mask, applied together by Apply From Params.

Immutable: a params value is a tuple of frozen regions, so combining params never changes the inputs (ComfyUI
caches node outputs and may hand the same value to several nodes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from ..masks import check_mask
from ..weight_types import WEIGHT_TYPES
from .errors import IPAdapterInputError
from .validation import check_image_batch


@dataclass(frozen=True, eq=False)
class Region:
    """One reference image and where and how strongly it conditions the model."""

    image: torch.Tensor  # IMAGE [B, H, W, C]
    weight: float
    weight_type: str
    start_at: float
    end_at: float
    mask: Optional[torch.Tensor] = None  # [Bm, H, W] in 0..1, never all zero; None: everywhere


@dataclass(frozen=True)
class IPAdapterParams:
    """The regions of one or more Regional Conditioning nodes, in order."""

    regions: tuple[Region, ...]


def region_mask(mask: object, label: str = "mask") -> torch.Tensor:
    """A region's MASK checked: [Bm, H, W] floats in 0..1 with some non-zero value (a region that covers nothing
    would silently do nothing)."""
    if not isinstance(mask, torch.Tensor):
        raise IPAdapterInputError(f"{label} must be a MASK; got {type(mask).__name__}")
    mask = check_mask(mask, label)
    if not bool((mask > 0).any()):
        raise IPAdapterInputError(f"{label} is zero everywhere: the region has zero area and would change "
                                  "nothing; draw the region in white or disconnect the mask")
    return mask


def make_region(image: object, weight: float, weight_type: str, start_at: float, end_at: float,
                mask: object = None) -> Region:
    """A checked region; errors name the Regional Conditioning input that is wrong."""
    if not isinstance(image, torch.Tensor):
        raise IPAdapterInputError(f"image must be an IMAGE; got {type(image).__name__}")
    image = check_image_batch(image, "image")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise IPAdapterInputError(f"image_weight must be a finite number; got {weight!r}")
    if weight_type not in WEIGHT_TYPES:
        raise IPAdapterInputError(f"weight_type must be one of {', '.join(WEIGHT_TYPES)}; got {weight_type!r}")
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (start_at, end_at)) \
            or not 0.0 <= start_at <= end_at <= 1.0:
        raise IPAdapterInputError(f"start_at and end_at must satisfy 0 <= start_at <= end_at <= 1; got "
                                  f"{start_at!r}, {end_at!r}")
    return Region(image, float(weight), weight_type, float(start_at), float(end_at),
                  None if mask is None else region_mask(mask))


def combine_params(parts: Iterable[tuple[str, object]]) -> IPAdapterParams:
    """The regions of every connected `(input name, params)` in order; anything else is an error naming it."""
    regions: list[Region] = []
    for name, params in parts:
        if params is None:
            continue
        if not isinstance(params, IPAdapterParams):
            raise IPAdapterInputError(f"{name} must come from IP-Adapter Regional Conditioning (xformers) or "
                                      f"Combine Params; got {type(params).__name__}")
        regions.extend(params.regions)
    return IPAdapterParams(tuple(regions))


def check_mask_batches(params: IPAdapterParams) -> None:
    """Mask i of a batch conditions latent i, so regions with several masks must agree on how many: masks of
    2 and 3 frames fit no latent batch (one region would miss a frame or the other have one too many)."""
    batches = {(i + 1, r.mask.shape[0]) for i, r in enumerate(params.regions)
               if r.mask is not None and r.mask.shape[0] > 1}
    if len({count for _, count in batches}) > 1:
        listed = ", ".join(f"{count} (region {i})" for i, count in sorted(batches))
        raise IPAdapterInputError(f"ipadapter_params: the region masks have batches of {listed}, which fit no "
                                  "latent batch: give each region one mask, or one per latent (the same count "
                                  "in every region)")
