"""DiT block bookkeeping shared by the Flux and SD3.5 adapters (pure torch; the ComfyUI side is nodes/dit_patch.py).

A DiT adapter attaches to a sequence of blocks (Flux: the double blocks, then the single ones; SD3: the joint
blocks). Weight curves run over that sequence; only the curves have a meaning there (the SD presets name UNet
blocks), so only those are accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..ipadapter.errors import IPAdapterInputError
from ..masks import mask_to_tokens
from ..weight_types import block_weight, parse_layer_weights

DOUBLE, SINGLE = "double_block", "single_block"
# transformer_options key through which the latent-shape wrapper (nodes/dit_patch.py) passes the latent's shape:
# a DiT block's inputs carry no token grid, which masks need.
LATENT_SHAPE_KEY = "xformers_ipadapter_latent_shape"
# the weight types that mean something over a block sequence (the rest name SD1.5/SDXL UNet blocks)
DIT_WEIGHT_TYPES = ("linear", "ease in", "ease out", "ease in-out", "reverse in-out")


@dataclass(frozen=True)
class DitBlock:
    """One block: its key in `patches_replace["dit"]` and its place among the blocks an adapter patches."""

    kind: str  # DOUBLE or SINGLE
    index: int
    position: int  # 0 .. total-1 over the patched sequence
    total: int

    @property
    def key(self) -> tuple[str, int]:
        return self.kind, self.index


def block_sequence(doubles: int, singles: int = 0) -> tuple[DitBlock, ...]:
    """Every double block, then every single block, numbered along the sequence."""
    total = doubles + singles
    return tuple([DitBlock(DOUBLE, i, i, total) for i in range(doubles)] +
                 [DitBlock(SINGLE, i, doubles + i, total) for i in range(singles)])


def dit_block_weights(weight_type: str, weight: float, total: int, family: str) -> tuple[float, ...]:
    """The weight at each position of a `total`-block sequence; a weight type without meaning there is an
    error listing those that have one."""
    if weight_type not in DIT_WEIGHT_TYPES:
        raise IPAdapterInputError(
            f"weight_type {weight_type!r} has no meaning for {family} adapters (it names SD1.5/SDXL UNet blocks); "
            f"choose one of: {', '.join(DIT_WEIGHT_TYPES)}")
    return tuple(block_weight(weight_type, weight, t, total, "", False).weight for t in range(total))


def sequence_weights(weight_type: str, weight: float, total: int, layer_weights: str,
                     family: str) -> tuple[float, ...]:
    """The weight at each block of the sequence: `layer_weights` ('index:weight, ...' over the sequence, times
    weight; blocks not listed get none) when given, else the weight type's curve (`dit_block_weights`)."""
    if not isinstance(layer_weights, str):
        raise TypeError(f"layer_weights must be a string 'index:weight, ...'; got {type(layer_weights).__name__}")
    overrides = parse_layer_weights(layer_weights, total)
    if overrides is not None:
        return tuple(overrides.get(t, 0.0) * weight for t in range(total))
    return dit_block_weights(weight_type, weight, total, family)


def match_count(negative: torch.Tensor, count: int) -> torch.Tensor:
    """Negative embeddings, as many as the positive ones (the last repeats, extra ones are dropped)."""
    index = torch.arange(count).clamp(max=negative.shape[0] - 1)
    return negative[index]


def latent_grid(options: dict, patch_size: int) -> Optional[tuple[int, int]]:
    """The image-token grid of the latent being denoised (rounded up per patch), when the wrapper recorded it."""
    shape = options.get(LATENT_SHAPE_KEY)
    if shape is None:
        return None
    height, width = int(shape[-2]), int(shape[-1])
    return -(-height // patch_size), -(-width // patch_size)


def mask_rows(mask: torch.Tensor, grid: tuple[int, int], rows: int, lead: int, query_len: int,
              chunks: int) -> torch.Tensor:
    """`[rows, query_len]` weights over a block's queries: the user mask resized to the latent's token grid at
    positions `lead .. lead + h*w` (after the text tokens), 0 elsewhere (text rows, reference-latent tokens).
    Mask i applies to latent i of each chunk (the last one repeats), as the attn2 patches do."""
    tokens = mask_to_tokens(mask, grid)  # [Bm, h*w]
    per_chunk = rows // chunks
    index = torch.arange(per_chunk, device=tokens.device).clamp(max=tokens.shape[0] - 1)
    tokens = tokens[index].repeat(chunks, 1)
    out = tokens.new_zeros(rows, query_len)
    span = min(tokens.shape[1], query_len - lead)
    out[:, lead:lead + span] = tokens[:, :span]
    return out
