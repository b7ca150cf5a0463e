"""User masks resized to a transformer block's token grid."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_mask(mask: torch.Tensor) -> torch.Tensor:
    """A MASK input as `[Bm, H, W]` floats; raises on shapes that cannot be a mask or have zero area."""
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim != 3:
        raise ValueError(f"attn_mask must be [H, W] or [batch, H, W]; got shape {tuple(mask.shape)}")
    if mask.numel() == 0:
        raise ValueError(f"attn_mask has zero area (shape {tuple(mask.shape)}): draw or load a non-empty mask")
    if not torch.isfinite(mask).all():
        raise ValueError("attn_mask contains NaN or infinite values")
    return mask.float()


def mask_to_tokens(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """`[Bm, H, W]` -> `[Bm, h*w]` for a block whose tokens form an `h x w` grid (any aspect ratio)."""
    resized = F.interpolate(mask.unsqueeze(1), size=grid, mode="bilinear", align_corners=False)
    return resized.flatten(1)
