"""Additive attention biases that every bias-taking kernel accepts.

xformers' tensor-bias kernels require the bias dtype to equal the query's, and every stride but the last to
be a multiple of 128 bits (8 elements for fp16/bf16, 4 for fp32); bool masks crash its checks. We allocate
the last dimension rounded up to a multiple of 8 directly in the final dtype and device, write the values,
slice back and expand: strides stay aligned and nothing is re-packed afterwards.
"""

from __future__ import annotations

import torch

PAD_MULTIPLE = 8


def alignment(dtype: torch.dtype) -> int:
    """Stride alignment (in elements) xformers requires for a bias of this dtype."""
    return max(1, 128 // torch.finfo(dtype).bits)


def _as_additive(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if values.dtype == torch.bool:  # True = attend, False = blocked
        return torch.zeros((), dtype=dtype, device=values.device).expand(values.shape).masked_fill(
            ~values, float("-inf"))
    return values


def aligned_bias(values: torch.Tensor, shape: tuple[int, int, int, int], dtype: torch.dtype,
                 device: torch.device | str) -> torch.Tensor:
    """`values` (ndim 2-4, broadcastable to `shape` = (B, H, Mq, Mk); bool keep-mask or additive floats) as an
    additive bias of `shape`, in `dtype` on `device`, with every stride but the last aligned."""
    if not 2 <= values.ndim <= 4:
        raise ValueError(f"an attention mask needs 2 to 4 dims ([Mq, Mk], [B, Mq, Mk] or [B, H, Mq, Mk]); "
                         f"got shape {tuple(values.shape)}")
    while values.ndim < 4:  # [Mq, Mk] -> [1, 1, Mq, Mk]; [B, Mq, Mk] -> [B, 1, Mq, Mk]
        values = values.unsqueeze(1 if values.ndim == 3 else 0)
    batch, heads, q_len, k_len = shape
    if values.shape[-1] != k_len:
        raise ValueError(f"attention mask has {values.shape[-1]} keys; the attention has {k_len}")
    try:
        torch.broadcast_shapes(values.shape, shape)
    except RuntimeError:
        raise ValueError(f"attention mask of shape {tuple(values.shape)} does not broadcast to {shape}") from None
    padded = -(-k_len // PAD_MULTIPLE) * PAD_MULTIPLE
    buffer = torch.zeros((*values.shape[:3], padded), dtype=dtype, device=device)
    buffer[..., :k_len] = _as_additive(values, dtype)
    return buffer[..., :k_len].expand(batch, heads, q_len, k_len)


def is_aligned(bias: torch.Tensor) -> bool:
    """The check xformers' cutlass operator applies to a tensor bias."""
    step = alignment(bias.dtype)
    return bias.stride(-1) == 1 and all(s % step == 0 for s in bias.stride()[:-1])
