"""Float64 reference maths of IP-Adapter attention, written from the formula alone.

    out = attn(q, k_text, v_text) + sum_i scale_i * mask_i * attn(q, k_i, v_i)
    attn(q, k, v) = softmax(q k^T / sqrt(d)) v, per batch row and head, each softmax over its own keys

This is the expected value of the engine, single-pass and host tests, so it shares no code with the engine
(nothing from processors/): a broadcasting mistake there cannot hide here. Shapes, as the engine's contract
states them (docs/architecture.md, ``IPBranch``):

- q `[B, Mq, H*D]`; text k/v `[1 or B, Mt, H*D]` (v may have another head width than k);
- each branch: any object with attributes ``k``, ``v`` (`[Bk, L, H*D]`, Bk = 1, B or n*B: with n*B the
  n consecutive rows b*n .. b*n+n-1 are batch row b's images, folded one after the other into its key axis),
  ``scale`` (a float or a `[B]` tensor, one per batch row) and ``mask`` (None or `[1 or B, Mq]` weights
  over the queries, multiplying the adapter's output).

Returns float64 `[B, Mq, H*Dv]`, whatever the input dtypes.
"""
from __future__ import annotations

from typing import Any, Sequence, Union

import torch

Scale = Union[float, torch.Tensor]


def _per_batch_row(x: torch.Tensor, batch: int) -> torch.Tensor:
    """`[Bx, L, C]` -> `[B, Bx/B * L, C]` float64: a batch of 1 is shared by every row, n*B rows fold into
    the token axis (row b keeps its own n images in order)."""
    x = x.double()
    if x.shape[0] == 1:
        return x.expand(batch, -1, -1)
    if x.shape[0] % batch:
        raise ValueError(f"keys/values batch {x.shape[0]} is neither 1 nor a multiple of {batch}")
    return x.reshape(batch, -1, x.shape[-1])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for each batch row and head: `[B, Mq, H*D]` -> float64 `[B, Mq, H*Dv]`."""
    batch, queries, _ = q.shape
    qh = q.double().reshape(batch, queries, heads, -1)
    kh = _per_batch_row(k, batch).reshape(batch, -1, heads, qh.shape[-1])
    vh = _per_batch_row(v, batch)
    vh = vh.reshape(batch, vh.shape[1], heads, -1)
    scores = torch.einsum("bqhd,bkhd->bhqk", qh, kh) / qh.shape[-1] ** 0.5
    out = torch.einsum("bhqk,bkhe->bqhe", scores.softmax(dim=-1), vh)
    return out.reshape(batch, queries, -1)


def _output_weight(scale: Scale, mask: torch.Tensor | None, batch: int, queries: int) -> torch.Tensor:
    """scale * mask as a float64 `[B, Mq, 1]` weight per batch row and query."""
    weight = torch.ones(batch, queries, 1, dtype=torch.float64)
    if isinstance(scale, torch.Tensor):
        weight = weight * scale.detach().double().cpu().reshape(-1, 1, 1)
    else:
        weight = weight * float(scale)
    if mask is not None:
        weight = weight * mask.detach().double().cpu().reshape(mask.shape[0], queries, 1)
    return weight


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                        branches: Sequence[Any] = ()) -> torch.Tensor:
    """The text attention plus every branch's attention, weighted by its scale and mask (float64)."""
    batch, queries, _ = q.shape
    out = attention(q, k, v, heads)
    for branch in branches:
        image = attention(q, branch.k, branch.v, heads)
        out = out + image * _output_weight(branch.scale, branch.mask, batch, queries).to(image.device)
    return out
