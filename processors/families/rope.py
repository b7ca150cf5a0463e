"""Rotary position embeddings in the Flux layout: the inverse rotation, to recover a query before RoPE.

Flux (ComfyUI's `comfy/ldm/flux/math.py`, BFL's reference) rotates each adjacent pair (x0, x1) of a head's
channels by a 2x2 matrix `pe[..., d, :, :]` = [[cos, -sin], [sin, cos]], `pe` being `[B, 1, L, D/2, 2, 2]`
(float32). Adapters that attend with the query before RoPE (Flux IP-Adapters, diffusers'
`FluxIPAdapterAttnProcessor`) get it back by applying the transpose: rotations are orthogonal.
"""

from __future__ import annotations

import torch


def undo_rope(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """`x` `[B, H, L, D]` after RoPE with `pe` -> `x` before it, in x's dtype (computed in pe's dtype, float32,
    as the rotation was). `pe` may cover more tokens than `x` only if aligned at the end (not supported: the
    lengths must match)."""
    if pe.shape[-4] != x.shape[-2]:
        raise ValueError(f"RoPE table covers {pe.shape[-4]} tokens, the query has {x.shape[-2]}")
    rotated = x.to(pe.dtype).reshape(*x.shape[:-1], -1, 2, 1)  # [..., D/2, 2 (row i), 1]
    # x[j] = sum_i pe[i, j] * rotated[i]
    original = pe[..., 0, :] * rotated[..., 0, :]
    original.addcmul_(pe[..., 1, :], rotated[..., 1, :])
    return original.reshape(x.shape).type_as(x)
