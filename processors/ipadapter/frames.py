"""One reference image and one weight per frame (Apply Batch with `unfold_batch`), host-agnostic.

The image K/V of the N frames are projected once per (site, device, dtype) as `[N, T, inner]` (T tokens per
image) and kept in the same bounded store as the shared K/V; a sampling call gathers its batch rows from them
with `index_select` on a frame-index tensor. Which frames a call holds is the caller's business (the latent's
position in the batch, or the frame indices a context-window sampler announces); the index tensor is built
once per distinct layout and cached with the rows, so no call reads a tensor value back to the host.

Frames past the last image reuse the last image, frames past the last weight the last weight (the standard
pack's rule for unfolded batches). Per-frame weights scale the output per row (`V only`) or are folded into
each frame's keys and values (`K+V` and the C-penalty variants), exactly as a single weight is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..tensor_cache import TensorCache
from .errors import IPAdapterInputError
from .kv_cache import AdapterKVCache, site_kv
from .tokens import ImageTokens
from .weights import IPAdapterModel


# Frame-index tensors, shared by every site: one per distinct window a run meets (a static schedule has a few,
# a uniform one a few per step). They are tiny; keeping them means a call whose rows were evicted regathers on
# the device without copying its indices from the host again.
INDEX_ENTRIES = 64


@dataclass(frozen=True, eq=False)
class FrameKVEntry:
    """Image K/V of every frame at one site, `[rows, T, inner]`, and the output scale per weight `[weights]`
    (rows = images under `V only`, max(images, weights) when the weights are folded into K/V)."""

    k_cond: torch.Tensor
    v_cond: torch.Tensor
    k_uncond: torch.Tensor
    v_uncond: torch.Tensor
    scale: torch.Tensor


def check_frame_weights(weights: Sequence[float]) -> tuple[float, ...]:
    values = tuple(weights)
    if not values:
        raise IPAdapterInputError("weight is an empty list: give one weight per frame (or a single number)")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise IPAdapterInputError(f"weight lists {value!r}; every per-frame weight must be a finite number")
    return tuple(float(v) for v in values)


class FrameKVCache(AdapterKVCache):
    """Per-frame image K/V: `tokens` holds one image per frame ("concat" of N images); `site_weights` are the
    per-site factors of the weight type (for a weight of 1), `frame_weights` the weight of each frame."""

    def __init__(self, model: IPAdapterModel, tokens: ImageTokens, site_weights: Sequence[float],
                 frame_weights: Sequence[float], embeds_scaling: str = "V only") -> None:
        self.frame_weights = check_frame_weights(frame_weights)
        if not any(self.frame_weights):  # every frame at 0: the adapter adds nothing anywhere
            site_weights = [0.0] * len(site_weights)
        super().__init__(model, tokens, site_weights, embeds_scaling)
        self.images = tokens.num_images
        self.frame_count = max(self.images, len(self.frame_weights))
        self.indices = TensorCache("frame indices", INDEX_ENTRIES)

    def release(self) -> None:
        super().release()
        self.indices.clear()

    def keep_device(self, device: torch.device) -> None:
        super().keep_device(device)
        self.indices.keep_device(device)

    def _compute(self, i: int, device: torch.device, dtype: torch.dtype) -> FrameKVEntry:
        per_image = self.tokens.tokens_per_image
        cond = self.tokens.cond.reshape(self.images, per_image, -1)
        uncond = self.tokens.uncond.reshape(self.images, per_image, -1)
        weights = torch.tensor(self.frame_weights, device=device, dtype=torch.float32) * self.site_weights[i]
        if self.embeds_scaling == "V only":  # K/V once per image; the weights scale the output per row
            (kc, vc), (ku, vu), _ = site_kv(self.model, i, (cond, uncond), 1.0, "V only", per_image, device, dtype)
            return FrameKVEntry(kc, vc, ku, vu, weights.to(dtype))
        rows = torch.arange(self.frame_count)
        image_of, weight_of = rows.clamp(max=self.images - 1), rows.clamp(max=len(self.frame_weights) - 1)
        (kc, vc), (ku, vu), _ = site_kv(self.model, i, (cond[image_of], uncond[image_of]),
                                        weights[weight_of.to(device)][:, None, None], self.embeds_scaling,
                                        per_image, device, dtype)
        return FrameKVEntry(kc, vc, ku, vu, torch.ones(1, device=device, dtype=dtype))

    def frame_rows(self, site_index: int, device: torch.device, dtype: torch.dtype, negative: Sequence[bool],
                   frames: Sequence[int], swap: bool = False
                   ) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """K/V `[len(negative) * len(frames), T, inner]` and the scale per row for a batch whose chunk c is
        negative when negative[c] and whose rows within a chunk are `frames` (frame indices, host ints)."""
        if swap and not any(negative):
            return None  # precise modes: only the negative rows get the image
        entry = self.get(site_index, device, dtype)
        frames = tuple(frames)
        index = self.indices.get((device, frames), lambda: torch.tensor(frames, device=device, dtype=torch.long))
        return gather_rows(entry, index, negative, swap)


def gather_rows(entry: FrameKVEntry, frames: torch.Tensor, negative: Sequence[bool], swap: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows of `entry` for frame indices `frames` (a device tensor), per chunk: uncond K/V on negative
    chunks, cond K/V elsewhere; with `swap` (precise modes) the cond image on negative chunks and a zero scale
    on the others. Indices past the last image or weight take the last one."""
    kv_index = frames.clamp(max=entry.k_cond.shape[0] - 1)
    frame_scale = entry.scale.index_select(0, frames.clamp(max=entry.scale.shape[0] - 1))
    keys, values, scales = [], [], []
    for is_negative in negative:
        uncond = is_negative and not swap
        keys.append((entry.k_uncond if uncond else entry.k_cond).index_select(0, kv_index))
        values.append((entry.v_uncond if uncond else entry.v_cond).index_select(0, kv_index))
        scales.append(frame_scale if is_negative or not swap else torch.zeros_like(frame_scale))
    return torch.cat(keys), torch.cat(values), torch.cat(scales)
