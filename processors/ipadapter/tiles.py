"""Tiled references: where a reference of any aspect ratio is cut into square tiles, and the attention mask
each tile gets. Pure torch, no host.

The layout is the standard IP-Adapter pack's (IPAdapterTiled), so workflows behave the same after switching:

1. A nearly square reference (0.75 < height/width < 1.33) is center-cropped to a square and resized to
   2 x 2 tiles. Any other is resized so its short side is one tile, the long side in proportion.
2. Longer than 4 tiles (height/width above 4 or below 1/4): the middle 4 tiles of the long side are kept.
3. Tiles along each side: ceil(side / tile); when they do not fit exactly they overlap evenly, tile i starting
   at int(i * (tile - overlap)) with overlap = (n * tile - side) / (n - 1).

Each tile conditions the model only over its own region: its mask is zero everywhere except the tile's box,
where it is the user's attention mask (default all ones), fitted to the reference the same way the image is.
The masks are in the reference's coordinates and are stretched to the latent, so the reference should have
the picture's aspect ratio.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..images import resize, square_window

# Tiles are 256 px as in the standard pack (more likely to divide the latent than 224); CLIP vision resizes each
# to its 224 px input.
TILE_SIZE = 256
MAX_TILES = 4
SQUARE_RATIOS = (0.75, 1.33)  # open interval of height/width treated as square


@dataclass(frozen=True)
class TileLayout:
    """How one reference size becomes tiles: optional square crop, resize, optional center crop, tile boxes."""

    square: bool  # center-cropped to a square first
    resized: tuple[int, int]  # (height, width) after the resize
    size: tuple[int, int]  # (height, width) after the long side is limited to MAX_TILES tiles
    boxes: tuple[tuple[int, int], ...]  # (top, left) of each tile, row by row
    tile: int = TILE_SIZE

    @property
    def count(self) -> int:
        return len(self.boxes)


def tile_layout(height: int, width: int, tile: int = TILE_SIZE) -> TileLayout:
    """The layout for a `height` x `width` reference (see the module docstring)."""
    if height < 1 or width < 1:
        raise ValueError(f"the reference image has no pixels ({height}x{width})")
    ratio = height / width
    square = SQUARE_RATIOS[0] < ratio < SQUARE_RATIOS[1]
    if square:
        resized = (2 * tile, 2 * tile)
    elif height < width:
        resized = (tile, int(tile * width / height))
    else:
        resized = (int(tile * height / width), tile)
    size = resized
    if ratio > MAX_TILES or ratio < 1.0 / MAX_TILES:
        size = (tile, MAX_TILES * tile) if height < width else (MAX_TILES * tile, tile)
    tops, lefts = _starts(size[0], tile), _starts(size[1], tile)
    return TileLayout(square, resized, size, tuple((t, l) for t in tops for l in lefts), tile)


def _starts(side: int, tile: int) -> list[int]:
    count = math.ceil(side / tile)
    overlap = max(0.0, (count * tile - side) / (count - 1 if count > 1 else 1))
    return [int(i * (tile - overlap)) for i in range(count)]


def _center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`x` [B, H, W, ...] cropped to its central `height` x `width`."""
    top, left = (x.shape[1] - height) // 2, (x.shape[2] - width) // 2
    return x[:, top:top + height, left:left + width]


def _fit(x: torch.Tensor, layout: TileLayout, interpolation: str) -> torch.Tensor:
    """`x` [B, H, W, C] cropped and resized as `layout` says, values clamped to 0..1."""
    if layout.square:
        top, left, side = square_window(x.shape[1], x.shape[2], "center")
        x = x[:, top:top + side, left:left + side]
    x = resize(x, layout.resized[0], layout.resized[1], interpolation).clamp(0.0, 1.0)
    return _center_crop(x, *layout.size)


def fit_reference(image: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    """The reference [B, H, W, C] as the tiles are cut from it (Lanczos, like Pillow's)."""
    return _fit(image, layout, "LANCZOS")


def fit_mask(mask: Optional[torch.Tensor], height: int, width: int, layout: TileLayout) -> torch.Tensor:
    """The attention mask [Bm, h, w] (any size; None = all ones) on the fitted reference's grid [Bm, H', W']:
    first stretched over the `height` x `width` reference, then cropped and resized like it."""
    if mask is None:
        mask = torch.ones(1, height, width)
    stretched = resize(mask.unsqueeze(-1).float(), height, width, "BILINEAR").clamp(0.0, 1.0)
    return _fit(stretched, layout, "BILINEAR").squeeze(-1)


def cut_tiles(image: torch.Tensor, layout: TileLayout) -> list[torch.Tensor]:
    """Each tile [B, tile, tile, C] of the fitted reference, in layout order."""
    size = layout.tile
    return [image[:, top:top + size, left:left + size] for top, left in layout.boxes]


def tile_masks(mask: torch.Tensor, layout: TileLayout) -> list[torch.Tensor]:
    """Each tile's attention mask [Bm, H', W']: the fitted mask inside the tile's box, zero elsewhere."""
    size = layout.tile
    masks = []
    for top, left in layout.boxes:
        tile_mask = torch.zeros_like(mask)
        tile_mask[:, top:top + size, left:left + size] = mask[:, top:top + size, left:left + size]
        masks.append(tile_mask)
    return masks
