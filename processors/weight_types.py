"""Per-block adapter weights: the `weight_type` choices with the de-facto standard pack's meanings.

Blocks are counted per SpatialTransformer in forward order (input blocks, the middle block, output
blocks): `t` in 0..L-1, L = 16 for SD1.5 and 11 for SDXL. The style/composition presets name
SpatialTransformers of those two layouts (InstantStyle's "style" and "layout" blocks). Unlike the
standard pack, the middle block really receives its weight (that pack registers it under a key
ComfyUI never looks up).
"""

from __future__ import annotations

from dataclasses import dataclass

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


def _preset(weight_type: str, w: float, sdxl: bool) -> dict[int, float]:
    """Sparse presets: blocks not listed get no adapter at all."""
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
        wc = 1.0 if weight_type == "style and composition" else w
        if sdxl:
            return {_SDXL_COMPOSITION_BLOCK: wc, _SDXL_STYLE_BLOCK: w}
        return {**dict.fromkeys(_SD15_STYLE, w), 4: wc * 0.25, 5: wc}
    if weight_type == "composition precise":
        if sdxl:
            return {t: (w if t in (_SDXL_COMPOSITION_BLOCK, _SDXL_STYLE_BLOCK) else w * 0.1) for t in range(11)}
        return {**{t: (w * 0.1 if t in (6, 7, 8) else w) for t in range(16)}, 4: w * 0.25, 5: w}
    raise KeyError(weight_type)


def _composition_blocks(sdxl: bool) -> set[int]:
    return {_SDXL_COMPOSITION_BLOCK} if sdxl else {4, 5}


def block_weight(weight_type: str, weight: float, t: int, layers: int, block: str, sdxl: bool) -> BlockWeight:
    """Weight at SpatialTransformer `t` of `layers`, in a block of kind `block` ("input"/"middle"/"output")."""
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type must be one of {', '.join(WEIGHT_TYPES)}; got {weight_type!r}")
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
    preset = _preset(weight_type, weight, sdxl)
    value = preset.get(t, 0.0)
    swap = False
    if weight_type == "style transfer precise":
        swap = t in _composition_blocks(sdxl)
    elif weight_type == "composition precise":
        swap = t not in _composition_blocks(sdxl)
    return BlockWeight(value, swap and value != 0.0)
