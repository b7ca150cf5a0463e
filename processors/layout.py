"""xformers' BMHK layout: the one place that turns host tensors into `[B, M, H, K]` views."""

from __future__ import annotations

import torch


def heads_view(x: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """`[Bx, N, H*D]` -> `[B, Bx/B*N or N, H, D]`, a view where the layout allows; batch 1 is expanded.

    Bx may be a multiple of the query batch: several images folded into the token axis, as ComfyUI's own
    attention does with stacked keys.
    """
    head_dim = x.shape[-1] // heads
    if x.shape[0] == 1 and batch != 1:
        return x.view(1, -1, heads, head_dim).expand(batch, -1, -1, -1)
    if x.shape[0] % batch:
        raise ValueError(f"keys/values batch {x.shape[0]} is not 1 or a multiple of the query batch {batch}")
    return x.reshape(batch, -1, heads, head_dim)


def host_heads_view(x: torch.Tensor, heads: int, skip_reshape: bool) -> torch.Tensor:
    """ComfyUI's attention inputs as BMHK: `[B, N, H*D]`, or `[B, H, N, D]` when the host passes
    `skip_reshape=True`."""
    if skip_reshape:
        return x.transpose(1, 2)
    return heads_view(x, x.shape[0], heads)
