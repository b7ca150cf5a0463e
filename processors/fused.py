"""Text attention and every adapter's attention in ONE xformers call.

Each attention uses the same queries against its own keys, with its own softmax. xformers'
`BlockDiagonalMask` packs them: the queries are repeated once per attention along the sequence (batch 1),
the keys and values are concatenated, and block i of the queries only sees block i of the keys. This is
exactly the separate attentions (not a joint softmax over all keys).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from .xformers_env import xformers_status

PackedRunner = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], torch.Tensor]


def fused_unavailable_reason() -> str:
    status = xformers_status()
    return "" if status.importable else f"fused mode needs xformers' BlockDiagonalMask: {status.problem}"


def pack(q: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]):
    """BMHK q `[B, Mq, H, D]` and per-attention keys/values `[B, Mk_i, H, D]` -> (bias, qp, kp, vp), batch 1."""
    fmha = xformers_status().fmha
    if fmha is None:
        raise RuntimeError(fused_unavailable_reason())
    return fmha.BlockDiagonalMask.from_tensor_lists_qkv([q] * len(keys), list(keys), list(values))


def unpack(bias: Any, out: torch.Tensor) -> list[torch.Tensor]:
    """The packed output back to one `[B, Mq, H, Dv]` tensor per attention (views, no copy)."""
    return list(bias.split_queries(out))


def run_fused(q: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
              runner: PackedRunner) -> list[torch.Tensor]:
    bias, qp, kp, vp = pack(q, keys, values)
    return unpack(bias, runner(qp, kp, vp, bias))


def materialized_runner(qp: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, bias: Any) -> torch.Tensor:
    """Reference for CPU tests: the block-diagonal bias made dense and run with PyTorch SDPA."""
    heads = qp.shape[2]
    dense = bias.materialize((1, heads, qp.shape[1], kp.shape[1]), dtype=qp.dtype, device=qp.device)
    out = F.scaled_dot_product_attention(qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2),
                                         attn_mask=dense)
    return out.transpose(1, 2)
