"""User masks resized to a transformer block's token grid."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def check_mask(mask: torch.Tensor, label: str = "attn_mask") -> torch.Tensor:
    """A MASK input as `[Bm, H, W]` float32 in 0..1; raises on shapes that cannot be a mask or have zero area.

    Called once per application (at the apply node), so its log lines appear once, not per attention call.
    Values outside 0..1 are clamped here, so `multiply output` and `attention bias` read the same mask (a
    mask of 7 would otherwise multiply the adapter's output by 7, past the weight limit).
    """
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim != 3:
        raise ValueError(f"{label} must be [H, W] or [batch, H, W]; got shape {tuple(mask.shape)}")
    if mask.numel() == 0:
        raise ValueError(f"{label} has zero area (shape {tuple(mask.shape)}): draw or load a non-empty mask")
    if not torch.isfinite(mask).all():
        raise ValueError(f"{label} contains NaN or infinite values")
    mask = _clamped(mask.float(), label)
    if mask.shape[0] > 1:
        logger.info("%s", mask_batch_rule(mask.shape[0]))
    return mask


def _clamped(mask: torch.Tensor, label: str) -> torch.Tensor:
    low, high = float(mask.min()), float(mask.max())
    if low >= 0.0 and high <= 1.0:
        return mask
    logger.warning("%s values range from %g to %g; clamped to 0..1 (1 = full adapter effect)", label, low, high)
    return mask.clamp(0.0, 1.0)


def mask_batch_rule(count: int) -> str:
    """How `count` masks meet a latent batch (the rule of nodes/patch.py's per-row masks), for the log."""
    return (f"attn_mask has {count} masks: mask i applies to latent i of the batch; latents beyond the last mask "
            f"reuse it, masks beyond the batch are unused")


def mask_to_tokens(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """`[Bm, H, W]` -> `[Bm, h*w]` for a block whose tokens form an `h x w` grid (any aspect ratio)."""
    resized = F.interpolate(mask.unsqueeze(1), size=grid, mode="bilinear", align_corners=False)
    return resized.flatten(1)
