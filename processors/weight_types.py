"""Per-block adapter weights: the `weight_type` choices with the de-facto standard pack's meanings.

Blocks are counted per SpatialTransformer in forward order (input blocks, the middle block, output
blocks): `t` in 0..L-1, L = 16 for SD1.5 and 11 for SDXL. The style/composition presets name
SpatialTransformers of those two layouts (InstantStyle's "style" and "layout" blocks). Unlike the
standard pack, the middle block really receives its weight (that pack registers it under a key
ComfyUI never looks up).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional

WEIGHT_TYPES: tuple[str, ...] = (
    "linear", "ease in", "ease out", "ease in-out", "reverse in-out", "weak input", "weak output",
    "weak middle", "strong middle", "style transfer", "composition", "strong style transfer",
    "style and composition", "style transfer precise", "composition precise",
)

_SD15_STYLE = (0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15)
_SDXL_STYLE_BLOCK, _SDXL_COMPOSITION_BLOCK = 6, 3  # up_blocks.0.attentions.1, down_blocks.2.attentions.1


@dataclass(frozen=True)
class BlockWeight:
    """The weight at one block; `swap` moves the image to the negative rows there (precise modes)."""

    weight: float
    swap: bool = False


def _preset(weight_type: str, w: float, sdxl: bool, wc: Optional[float] = None) -> dict[int, float]:
    """Sparse presets: blocks not listed get no adapter at all. `wc`: the composition blocks' weight of the
    style-and-composition presets (Style & Composition's weight_composition)."""
    if weight_type == "style transfer":
        return {_SDXL_STYLE_BLOCK: w} if sdxl else dict.fromkeys(_SD15_STYLE, w)
    if weight_type == "composition":
        return {_SDXL_COMPOSITION_BLOCK: w} if sdxl else {4: w * 0.25, 5: w}
    if weight_type == "strong style transfer":
        excluded = {_SDXL_COMPOSITION_BLOCK} if sdxl else {4, 5}
        return {t: w for t in range(11 if sdxl else 16) if t not in excluded}
    if weight_type in ("style and composition", "style transfer precise"):
        # The standard pack's Advanced node gives the composition blocks a fixed 1.0 in "style and
        # composition" (its separate composition weight defaults to 1) and `weight` in the precise mode.
        if wc is None:
            wc = 1.0 if weight_type == "style and composition" else w
        if sdxl:
            return {_SDXL_COMPOSITION_BLOCK: wc, _SDXL_STYLE_BLOCK: w}
        return {**dict.fromkeys(_SD15_STYLE, w), 4: wc * 0.25, 5: wc}
    if weight_type == "strong style and composition":  # Style & Composition with expand_style
        wc = w if wc is None else wc
        return {t: (wc if t in _composition_blocks(sdxl) else w) for t in range(11 if sdxl else 16)}
    if weight_type == "composition precise":
        if sdxl:
            return {t: (w if t in (_SDXL_COMPOSITION_BLOCK, _SDXL_STYLE_BLOCK) else w * 0.1) for t in range(11)}
        return {**{t: (w * 0.1 if t in (6, 7, 8) else w) for t in range(16)}, 4: w * 0.25, 5: w}
    raise KeyError(weight_type)


def _composition_blocks(sdxl: bool) -> set[int]:
    return {_SDXL_COMPOSITION_BLOCK} if sdxl else {4, 5}


def _swap(weight_type: str, t: int, sdxl: bool) -> bool:
    """Precise modes move the image to the negative rows: on the composition blocks (style transfer precise)
    or everywhere else (composition precise)."""
    if weight_type == "style transfer precise":
        return t in _composition_blocks(sdxl)
    if weight_type == "composition precise":
        return t not in _composition_blocks(sdxl)
    return False


def block_weight(weight_type: str, weight: float, t: int, layers: int, block: str, sdxl: bool,
                 layer_weights: Optional[Mapping[int, float]] = None) -> BlockWeight:
    """Weight at SpatialTransformer `t` of `layers`, in a block of kind `block` ("input"/"middle"/"output").

    `layer_weights` (from `parse_layer_weights`) overrides the weight type's per-block weights: block t gets
    `layer_weights[t] * weight`, blocks not listed none; the precise types keep their negative-row swap.
    """
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type must be one of {', '.join(WEIGHT_TYPES)}; got {weight_type!r}")
    if layer_weights is not None:
        value = layer_weights.get(t, 0.0) * weight
        return BlockWeight(value, _swap(weight_type, t, sdxl) and value != 0.0)
    half = layers / 2
    if weight_type == "linear":
        return BlockWeight(weight)
    if weight_type == "ease in":
        return BlockWeight(weight * (0.05 + 0.95 * (1 - t / layers)))
    if weight_type == "ease out":
        return BlockWeight(weight * (0.05 + 0.95 * (t / layers)))
    if weight_type == "ease in-out":
        return BlockWeight(weight * (0.05 + 0.95 * (1 - abs(t - half) / half)))
    if weight_type == "reverse in-out":
        return BlockWeight(weight * (0.05 + 0.95 * (abs(t - half) / half)))
    weak = {"weak input": {"input"}, "weak output": {"output"}, "weak middle": {"middle"},
            "strong middle": {"input", "output"}}
    if weight_type in weak:
        return BlockWeight(weight * 0.2 if block in weak[weight_type] else weight)
    value = _preset(weight_type, weight, sdxl).get(t, 0.0)
    return BlockWeight(value, _swap(weight_type, t, sdxl) and value != 0.0)


def style_composition_weights(weight_style: float, weight_composition: float, expand_style: bool, t: int,
                              sdxl: bool) -> tuple[float, float]:
    """(style image weight, composition image weight) at SpatialTransformer `t` for Style & Composition.

    The blocks and weights are the "style and composition" preset (with expand_style: every block, the
    standard pack's internal "strong style and composition"); the composition blocks get the composition
    image, all others the style image.
    """
    kind = "strong style and composition" if expand_style else "style and composition"
    value = _preset(kind, weight_style, sdxl, wc=weight_composition).get(t, 0.0)
    return (0.0, value) if t in _composition_blocks(sdxl) else (value, 0.0)


def parse_layer_weights(text: str, layers: int) -> Optional[dict[int, float]]:
    """Parse a `layer_weights` string ("index:weight, ..."; commas or new lines between entries) into
    {SpatialTransformer index: weight}; None for an empty string (no override).

    Indices count SpatialTransformers in forward order, as `transformer_index` does (the standard pack's
    "Mad Scientist" node): SD1.5 0-5 input, 6 middle, 7-15 output; SDXL 0-3 input, 4 middle, 5-10 output.
    """
    entries = [e.strip() for line in text.splitlines() for e in line.split(",")]
    entries = [e for e in entries if e]
    if not entries:
        return None
    parsed: dict[int, float] = {}
    for entry in entries:
        index, weight = _parse_entry(entry, layers)
        if index in parsed:
            raise ValueError(f"layer_weights: index {index} appears twice; give each index once")
        parsed[index] = weight
    return parsed


def _parse_entry(entry: str, layers: int) -> tuple[int, float]:
    expected = f"expected 'index:weight' with an integer index 0..{layers - 1} and a number, e.g. '3:1.0'"
    if entry.count(":") != 1:
        raise ValueError(f"layer_weights: {entry!r} is not an 'index:weight' pair; {expected}")
    index_text, weight_text = (part.strip() for part in entry.split(":"))
    try:
        index = int(index_text)
    except ValueError:
        raise ValueError(f"layer_weights: index {index_text!r} in {entry!r} is not an integer; {expected}") from None
    try:
        weight = float(weight_text)
    except ValueError:
        raise ValueError(f"layer_weights: weight {weight_text!r} in {entry!r} is not a number; {expected}") from None
    if not 0 <= index < layers:
        raise ValueError(f"layer_weights: index {index} in {entry!r} is out of range: this model has {layers} "
                         f"blocks with cross-attention (indices 0..{layers - 1})")
    if not math.isfinite(weight):
        raise ValueError(f"layer_weights: weight in {entry!r} must be a finite number")
    return index, weight
