"""ApplyXformersIPAdapterTiled: references of any aspect ratio, cut into square tiles, each tile conditioning only
its own region of the picture (layout: processors/ipadapter/tiles.py).

One CLIP vision call encodes every tile; each tile is then one adapter application with its tile's mask,
installed through Apply's path (nodes/apply.py), so the tiles add up in one sampling run.
"""
from __future__ import annotations

import dataclasses
import logging

import torch
from comfy_api.latest import io

from ..processors.images import check_range, sharpen
from ..processors.ipadapter import encode_embeddings, tokens_from_embeddings
from ..processors.ipadapter.tiles import TILE_SIZE, cut_tiles, fit_mask, fit_reference, tile_layout, tile_masks
from ..processors.ipadapter.validation import check_image_batch
from ..processors.masks import check_mask
from .apply import (apply_tokens, attention_op_input, attn_mask_input, clip_vision_input, combine_input,
                    embeds_scaling_input, image_negative_input, ipadapter_input, layer_weights_input, model_input,
                    model_output, prepare_target, weight_input, weight_type_input, window_inputs)
from .types import CATEGORY
from .validation import ValidatesCombos

logger = logging.getLogger(__name__)


class ApplyXformersIPAdapterTiled(ValidatesCombos, io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ApplyXformersIPAdapterTiled",
            display_name="Apply xformers IP-Adapter Tiled",
            category=CATEGORY,
            description=f"For references that are not square or full of detail: the reference is cut into "
                        f"{TILE_SIZE} px square tiles along its long side (2x2 when nearly square, at most 4 "
                        "along a side, overlapping evenly), and each tile conditions only its own region of "
                        "the picture. Give the reference the picture's aspect ratio. Returns the tiles and "
                        "their masks so you can see them.",
            inputs=[
                model_input(), ipadapter_input(), clip_vision_input(),
                io.Image.Input("image", tooltip="The reference image(s), any aspect ratio."),
                weight_input("weight", "Strength of every tile (0 = no effect, negative = push away)."),
                weight_type_input(), *window_inputs(), combine_input("concat"), embeds_scaling_input(),
                io.Float.Input("sharpening", default=0.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Contrast adaptive sharpening of the resized reference before it is cut "
                                       "(as Prep Image For ClipVision): 0 = off, 1 = strongest."),
                attention_op_input(), attn_mask_input(), image_negative_input(), layer_weights_input(),
            ],
            outputs=[
                model_output(),
                io.Image.Output(display_name="tiles", tooltip=f"The {TILE_SIZE}x{TILE_SIZE} tiles, row by row "
                                                              "(each tile's images together)."),
                io.Mask.Output(display_name="masks", tooltip="Each tile's attention mask over the reference, in "
                                                             "the tiles' order."),
            ],
        )

    @classmethod
    def execute(cls, model, ipadapter, clip_vision, image, weight: float, weight_type: str, start_at: float,
                end_at: float, combine_embeds: str, embeds_scaling: str, sharpening: float, attention_op=None,
                attn_mask=None, image_negative=None, layer_weights: str = "") -> io.NodeOutput:
        image = check_image_batch(image, "image")
        check_range("sharpening", sharpening, 0.0, 1.0)
        if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a MASK; got {type(attn_mask).__name__}")
        _, height, width, _ = image.shape
        layout = tile_layout(height, width)
        tiles = cut_tiles(sharpen(fit_reference(image, layout), float(sharpening)), layout)
        user_mask = check_mask(attn_mask) if attn_mask is not None else None
        masks = tile_masks(fit_mask(user_mask, height, width, layout), layout)
        target = prepare_target(model, ipadapter, weight, start_at, end_at, attention_op, masks[0])
        positive, negative = encode_embeddings(ipadapter, lambda pixels: clip_vision.encode_image(pixels),
                                               torch.cat(tiles), image_negative)
        per_tile = image.shape[0]
        patched = model
        for index, mask in enumerate(masks):
            rows = slice(index * per_tile, (index + 1) * per_tile)
            # an image_negative is encoded once for all tiles; the default negative has one row per tile image
            tokens = tokens_from_embeddings(ipadapter, positive[rows],
                                            negative if image_negative is not None else negative[rows],
                                            combine_embeds)
            patched = apply_tokens(dataclasses.replace(target, model=patched, mask=mask), tokens, weight,
                                   weight_type, embeds_scaling, layer_weights)
        logger.info("tiled reference %dx%d -> %d tiles of %d px", height, width, layout.count, TILE_SIZE)
        return io.NodeOutput(patched, torch.cat(tiles), torch.cat(masks))
