"""The CLIP-vision enhancer (`enhance_tiles` on Apply): more detail from a reference than one 224 px encoding.

Each reference is also cut into an N x N grid of tiles, each tile encoded on its own (at CLIP's full input
size, so small details survive), and the tiles' patch tokens are laid side by side into one (N*g) x (N*g)
grid and average-pooled back to the g x g grid of one image; the class tokens are averaged. The result is one
more penultimate-hidden-state sequence per reference, fed to the adapter after the plain encodings, so
`combine_embeds` decides how it mixes (concat: both sets of tokens; average: their mean), as in the standard
IP-Adapter pack's encoder with its default ratio. Only adapters fed by hidden states (plus, plus face, full
face) can take it: a pooled `image_embeds` vector has no spatial grid to pool.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import IPAdapterInputError
from .tokens import Encoder, ImageTokens, encode_embeddings, image_tokens, tokens_from_embeddings
from .validation import validate_clip_output
from .weights import IPAdapterModel

MAX_ENHANCE_TILES = 16


def check_enhance_tiles(model: IPAdapterModel, tiles: object) -> int:
    """`enhance_tiles` as an int in 1..16; above 1 only for adapters fed by penultimate hidden states."""
    if isinstance(tiles, bool) or not isinstance(tiles, int) or not 1 <= tiles <= MAX_ENHANCE_TILES:
        raise IPAdapterInputError(f"enhance_tiles must be a whole number from 1 (off) to {MAX_ENHANCE_TILES}; "
                                  f"got {tiles!r}")
    if tiles > 1 and model.info.clip_output != "penultimate_hidden_states":
        raise IPAdapterInputError(
            f"enhance_tiles={tiles} needs an adapter fed by CLIP vision hidden states (plus, plus face, full "
            f"face); {model.describe()} is fed by the pooled '{model.info.clip_output}', which has no patch "
            "grid to pool: set enhance_tiles to 1 or load a plus adapter")
    return tiles


def split_grid(image: torch.Tensor, tiles: int) -> torch.Tensor:
    """[B, H, W, C] -> [B * tiles^2, H // tiles, W // tiles, C]: each image's tiles row by row, image by image
    (the remainder pixels at the right and bottom are left out)."""
    _, height, width, _ = image.shape
    h, w = height // tiles, width // tiles
    if h < 1 or w < 1:
        raise IPAdapterInputError(f"image of {height}x{width} pixels cannot be cut into {tiles}x{tiles} tiles "
                                  "(enhance_tiles): lower enhance_tiles")
    grid = image[:, :h * tiles, :w * tiles].reshape(-1, tiles, h, tiles, w, image.shape[-1])
    return grid.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, image.shape[-1])


def pool_tile_tokens(hidden: torch.Tensor, tiles: int) -> torch.Tensor:
    """[B * tiles^2, L, C] tile encodings (class token first when L - 1 is a square) -> [B, L, C]: patch tokens
    merged into one grid and average-pooled to one tile's grid, class tokens averaged."""
    count, length, channels = hidden.shape
    has_class = _is_square(length - 1)
    side = math.isqrt(length - 1 if has_class else length)
    if not has_class and side * side != length:
        raise IPAdapterInputError(f"CLIP vision hidden states of {length} tokens form no square patch grid; "
                                  "enhance_tiles cannot pool them: set enhance_tiles to 1")
    per_image = hidden.reshape(count // tiles ** 2, tiles, tiles, length, channels)
    patches = per_image[..., int(has_class):, :].reshape(-1, tiles, tiles, side, side, channels)
    # rows: tile row then patch row; columns: tile column then patch column
    merged = patches.permute(0, 5, 1, 3, 2, 4).reshape(-1, channels, tiles * side, tiles * side)
    pooled = F.adaptive_avg_pool2d(merged, (side, side)).flatten(2).transpose(1, 2)
    if not has_class:
        return pooled
    classes = per_image[..., 0, :].mean(dim=(1, 2)).unsqueeze(1)
    return torch.cat([classes, pooled], dim=1)


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def enhanced_image_tokens(model: IPAdapterModel, encode: Encoder, image: torch.Tensor,
                          image_negative: torch.Tensor | None, combine: str, tiles: int) -> ImageTokens:
    """Apply's image tokens with the enhancer: `image_tokens` when `tiles` is 1, else each reference's plain
    encoding followed by its pooled tiles' encoding (the negative side is not enhanced)."""
    if check_enhance_tiles(model, tiles) == 1:
        return image_tokens(model, encode, image, image_negative, combine)
    positive, negative = encode_embeddings(model, encode, image, image_negative)
    tile_features = validate_clip_output(model.info, encode(split_grid(image.float(), tiles))).float()
    pooled = pool_tile_tokens(tile_features, tiles)
    return tokens_from_embeddings(model, torch.cat([positive, pooled]), negative, combine)
