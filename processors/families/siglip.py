"""SigLIP's attention-pooling head (transformers' `SiglipMultiheadAttentionPoolingHead`), pure torch.

InstantX's Flux IP-Adapter is fed SigLIP so400m's `pooler_output`: one learned probe attends over the encoder's
post-layernorm tokens, then a residual MLP. ComfyUI's SigLIP CLIP vision model has no such head (its loader
keeps the encoder only), so the head's weights come from the SigLIP file itself (`vision_model.head.*`,
present in google/siglip-so400m-patch14-384's model.safetensors); nodes/flux.py finds them.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

HEAD_PREFIX = "vision_model.head."
HEAD_KEYS = ("probe", "attention.in_proj_weight", "attention.in_proj_bias", "attention.out_proj.weight",
             "attention.out_proj.bias", "layernorm.weight", "layernorm.bias", "mlp.fc1.weight", "mlp.fc1.bias",
             "mlp.fc2.weight", "mlp.fc2.bias")
HEAD_DIM = 72  # so400m: 1152 = 16 heads x 72 (base/large SigLIP: 64)
LAYERNORM_EPS = 1e-6


class SiglipPoolingHead:
    """`[N, L, W]` post-layernorm tokens -> `[N, W]` pooled output. Weights as read (any dtype), computed in
    float32."""

    def __init__(self, weights: Mapping[str, torch.Tensor], heads: int | None = None) -> None:
        missing = [k for k in HEAD_KEYS if k not in weights]
        if missing:
            raise KeyError(f"SigLIP pooling head lacks {', '.join(HEAD_PREFIX + k for k in missing)}")
        self.weights = {k: weights[k].float() for k in HEAD_KEYS}
        self.width = self.weights["probe"].shape[-1]
        self.fingerprint: torch.Tensor | None = None  # what identifies the encoder it came with (hosts)
        self.heads = heads or max(1, self.width // (HEAD_DIM if self.width % HEAD_DIM == 0 else 64))

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        w = {k: v.to(tokens.device) for k, v in self.weights.items()}
        x = tokens.float()
        batch, length, width = x.shape
        wq, wk, wv = w["attention.in_proj_weight"].chunk(3)
        bq, bk, bv = w["attention.in_proj_bias"].chunk(3)
        probe = w["probe"].reshape(1, 1, width).expand(batch, 1, width)
        q = F.linear(probe, wq, bq).view(batch, 1, self.heads, -1).transpose(1, 2)
        k = F.linear(x, wk, bk).view(batch, length, self.heads, -1).transpose(1, 2)
        v = F.linear(x, wv, bv).view(batch, length, self.heads, -1).transpose(1, 2)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, 1, width)
        hidden = F.linear(attended, w["attention.out_proj.weight"], w["attention.out_proj.bias"])
        normed = F.layer_norm(hidden, (width,), w["layernorm.weight"], w["layernorm.bias"], LAYERNORM_EPS)
        mlp = F.linear(F.gelu(F.linear(normed, w["mlp.fc1.weight"], w["mlp.fc1.bias"]), approximate="tanh"),
                       w["mlp.fc2.weight"], w["mlp.fc2.bias"])
        return (hidden + mlp)[:, 0]
