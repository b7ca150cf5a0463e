"""The engine behind diffusers' attention-processor interface.

A drop-in for `diffusers.models.attention_processor.IPAdapterAttnProcessor2_0` (same constructor, same
`to_k_ip`/`to_v_ip` state dict, same call signature), so `pipe.load_ip_adapter(...)` weights work unchanged,
but attention runs through our operator registry: xformers with a chosen operator where it can, PyTorch
SDPA where it cannot, with aligned text biases and optional fused mode.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .backends import AttentionOpConfig
from .bias import aligned_bias
from .ip_attention import IPBranch, XFormersIPAdapterAttnProcessor


def _downsample_mask(mask: torch.Tensor, batch: int, q_len: int, inner: int) -> torch.Tensor:
    """diffusers' own mask downsampling (so masked results match it), as `[B, Mq]` weights."""
    from diffusers.image_processor import IPAdapterMaskProcessor

    return IPAdapterMaskProcessor.downsample(mask, batch, q_len, inner)[..., 0]


class DiffusersXFormersIPAdapterAttnProcessor(nn.Module):
    """IP-Adapter attention processor for diffusers `Attention` modules, computed by our engine."""

    def __init__(self, hidden_size: int, cross_attention_dim: Optional[int] = None,
                 num_tokens: Sequence[int] | int = (4,), scale: float | list = 1.0,
                 attention_op: Optional[AttentionOpConfig] = None) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.cross_attention_dim = cross_attention_dim
        self.num_tokens = list(num_tokens) if isinstance(num_tokens, (tuple, list)) else [num_tokens]
        self.scale = scale if isinstance(scale, list) else [scale] * len(self.num_tokens)
        if len(self.scale) != len(self.num_tokens):
            raise ValueError(f"scale has {len(self.scale)} entries; num_tokens has {len(self.num_tokens)}")
        width = cross_attention_dim or hidden_size
        self.to_k_ip = nn.ModuleList(nn.Linear(width, hidden_size, bias=False) for _ in self.num_tokens)
        self.to_v_ip = nn.ModuleList(nn.Linear(width, hidden_size, bias=False) for _ in self.num_tokens)
        self.engine = XFormersIPAdapterAttnProcessor(attention_op)

    @property
    def attention_op(self) -> Optional[AttentionOpConfig]:
        return self.engine.attention_op

    @attention_op.setter
    def attention_op(self, value: Optional[AttentionOpConfig]) -> None:
        self.engine.attention_op = value

    def _branches(self, ip_hidden_states, masks, batch: int, q_len: int) -> list[IPBranch]:
        branches = []
        for states, scale, to_k, to_v, mask in zip(ip_hidden_states, self.scale, self.to_k_ip, self.to_v_ip, masks):
            scales = scale if isinstance(scale, list) else [scale] * (mask.shape[1] if mask is not None else 1)
            if all(s == 0 for s in scales):
                continue
            if mask is None:  # [B, n_img, T, C] (or [B, T, C]): images concatenated along the tokens
                tokens = states.reshape(states.shape[0], -1, states.shape[-1])
                branches.append(IPBranch(to_k(tokens), to_v(tokens), scales[0]))
                continue
            for i, s in enumerate(scales):  # one attention per masked image
                weights = _downsample_mask(mask[:, i], batch, q_len, self.hidden_size)
                branches.append(IPBranch(to_k(states[:, i]), to_v(states[:, i]), s, weights))
        return branches

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask: Optional[torch.Tensor] = None, temb=None, scale: float = 1.0,
                 ip_adapter_masks=None) -> torch.Tensor:
        if not isinstance(encoder_hidden_states, tuple):
            raise ValueError("encoder_hidden_states must be a tuple (text states, [image states per adapter]), "
                             "as diffusers' IP-Adapter pipelines pass it")
        text_states, ip_hidden_states = encoder_hidden_states
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial = hidden_states.shape if hidden_states.ndim == 4 else None
        if spatial is not None:
            hidden_states = hidden_states.view(spatial[0], spatial[1], -1).transpose(1, 2)
        batch, q_len = hidden_states.shape[:2]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            text_states = attn.norm_encoder_hidden_states(text_states)
        query, key, value = attn.to_q(hidden_states), attn.to_k(text_states), attn.to_v(text_states)
        text_bias = None
        if attention_mask is not None:
            prepared = attn.prepare_attention_mask(attention_mask, text_states.shape[1], batch)
            prepared = prepared.view(batch, attn.heads, -1, prepared.shape[-1])
            text_bias = aligned_bias(prepared, (batch, attn.heads, q_len, key.shape[1]), query.dtype, query.device)
        masks = list(ip_adapter_masks) if ip_adapter_masks is not None else [None] * len(self.scale)
        if len(masks) != len(self.scale) or len(ip_hidden_states) != len(self.scale):
            raise ValueError(f"ip_adapter_masks ({len(masks)}), scales ({len(self.scale)}) and image states "
                             f"({len(ip_hidden_states)}) must have one entry per adapter")
        branches = self._branches(ip_hidden_states, masks, batch, q_len)
        out = self.engine(query, key, value, attn.heads, branches, text_bias=text_bias)
        out = attn.to_out[1](attn.to_out[0](out))
        if spatial is not None:
            out = out.transpose(-1, -2).reshape(spatial)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
