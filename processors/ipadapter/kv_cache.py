"""Per-site image keys/values, computed once per sampling run instead of at every step and block."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..tensor_cache import TensorCache
from .errors import IPAdapterInputError
from .tokens import ImageTokens
from .weights import IPAdapterModel

EMBEDS_SCALING = ("V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty")
# The standard pack's C penalty divides the K width by 1280 (the widest SD1.5/SDXL attn2 inner dim).
C_PENALTY_WIDTH = 1280.0
# Sampling computes in one (device, dtype); two per site leave room for a second (e.g. a wrapped patch or a
# preview at another precision) before the least recently used pair is dropped and rebuilt (one linear each).
KV_PAIRS_PER_SITE = 2


@dataclass(frozen=True, eq=False)
class SiteKVEntry:
    """Image K/V [1, L, inner] for one site, already scaled; the IP attention output is times out_scale."""

    k_cond: torch.Tensor
    v_cond: torch.Tensor
    k_uncond: torch.Tensor
    v_uncond: torch.Tensor
    out_scale: float



def _mean_per_image(v: torch.Tensor, tokens_per_image: int) -> torch.Tensor:
    """Token mean of each reference image's block of tokens, broadcast back over that block.

    With "concat" the standard pack keeps images in separate K/V rows, so its mean is per image.
    """
    b, length, width = v.shape
    if tokens_per_image <= 0 or length % tokens_per_image:
        return v.mean(dim=1, keepdim=True).expand_as(v)
    blocks = v.reshape(b, length // tokens_per_image, tokens_per_image, width)
    return blocks.mean(dim=2, keepdim=True).expand_as(blocks).reshape(b, length, width)


def scale_kv(k: torch.Tensor, v: torch.Tensor, weight: float, embeds_scaling: str,
             tokens_per_image: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Apply `embeds_scaling` to one site's K/V; returns (k, v, output scale)."""
    if embeds_scaling == "V only":
        return k, v, weight
    if embeds_scaling != "K+V":
        weight = weight * k.shape[-1] / C_PENALTY_WIDTH
    if embeds_scaling == "K+mean(V) w/ C penalty":
        mean = _mean_per_image(v, tokens_per_image)
        return k * weight, (v - mean) + mean * weight, 1.0
    return k * weight, v * weight, 1.0


class AdapterKVCache:
    """Lazily computes `to_k_ip`/`to_v_ip` of the image tokens per (site, device, dtype) and keeps them.

    Reused across steps and CFG rows until `release()` (the host calls it at the end of a sampling run and
    when the model is unloaded) or `keep_device()` (the model moved). Never mutates the model or the tokens
    (ComfyUI caches node outputs and may share them between runs): K/V are fresh tensors, computed in float32
    then cast.
    """

    def __init__(self, model: IPAdapterModel, tokens: ImageTokens, site_weights: Sequence[float],
                 embeds_scaling: str = "V only") -> None:
        if embeds_scaling not in EMBEDS_SCALING:
            raise IPAdapterInputError(
                f"embeds_scaling must be one of {', '.join(EMBEDS_SCALING)}; got {embeds_scaling!r}")
        weights = tuple(float(w) for w in site_weights)
        if len(weights) != model.info.num_sites:
            raise IPAdapterInputError(f"got {len(weights)} site weights for {model.info.num_sites} sites")
        if not all(math.isfinite(w) for w in weights):
            raise IPAdapterInputError("IP-Adapter weights must be finite numbers")
        self.model = model
        self.tokens = tokens
        self.site_weights = weights
        self.embeds_scaling = embeds_scaling
        self.store = TensorCache("image K/V", KV_PAIRS_PER_SITE * len(weights))

    def __deepcopy__(self, memo: dict) -> "AdapterKVCache":
        # Host option dicts get deep-copied; the cache is read-only state, so share it.
        return self

    def release(self) -> None:
        """Free every cached K/V; they are recomputed where next asked for."""
        self.store.clear()

    def keep_device(self, device: torch.device) -> None:
        """Free the K/V cached on any other device (the model moved to `device`)."""
        self.store.keep_device(device)

    def get(self, site_index: int, device: torch.device | str, dtype: torch.dtype) -> SiteKVEntry:
        device = torch.device(device)
        return self.store.get((site_index, device, dtype), lambda: self._compute(site_index, device, dtype))

    def _compute(self, i: int, device: torch.device, dtype: torch.dtype) -> SiteKVEntry:
        (kc, vc), (ku, vu), scale = site_kv(self.model, i, (self.tokens.cond, self.tokens.uncond),
                                            self.site_weights[i], self.embeds_scaling,
                                            self.tokens.tokens_per_image, device, dtype)
        return SiteKVEntry(k_cond=kc, v_cond=vc, k_uncond=ku, v_uncond=vu, out_scale=scale)


@torch.no_grad()
def site_kv(model: IPAdapterModel, i: int, token_sets: Sequence[torch.Tensor], weight, embeds_scaling: str,
            tokens_per_image: int, device: torch.device, dtype: torch.dtype):
    """`to_k_ip`/`to_v_ip` of site `i` for each token set (in float32, then cast to `dtype`), scaled by
    `embeds_scaling`: ([(k, v) per set], output scale). `weight` is a float, or a tensor that broadcasts
    over the sets' rows (one weight per frame)."""
    wk = model.to_k_ip[i].weight.to(device=device, dtype=torch.float32)
    wv = model.to_v_ip[i].weight.to(device=device, dtype=torch.float32)
    rows, scale = [], weight
    for tokens in token_sets:
        x = tokens.to(device=device, dtype=torch.float32)
        k, v, scale = scale_kv(F.linear(x, wk), F.linear(x, wv), weight, embeds_scaling, tokens_per_image)
        rows.append((k.to(dtype), v.to(dtype)))
    return (*rows, scale)


def rows_for_chunks(cond: tuple[torch.Tensor, torch.Tensor], uncond: tuple[torch.Tensor, torch.Tensor],
                    chunks: Sequence[int], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image K/V per batch row for a `cond_or_uncond` layout: chunk c gets the negative image's (uncond) pair
    when c == 1, the positive's otherwise. A batch of one kind gets that `[1, T, C]` pair itself (the engine
    broadcasts it); mixed batches one row per latent. Shared by the attn2 and DiT applications."""
    negative = [c == 1 for c in chunks]
    if all(negative) or not any(negative):
        return uncond if negative[0] else cond
    per_chunk = batch // len(chunks)
    k, v = (torch.cat([(u if n else c).expand(per_chunk, -1, -1) for n in negative]) for c, u in zip(cond, uncond))
    return k, v
