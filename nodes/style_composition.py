"""ApplyXformersIPAdapterStyleComposition: one image for style, another for composition, on SD1.5 and SDXL.

Two adapter applications installed through `install()`: the style image at the style blocks, the composition
image at the composition blocks (processors/weight_types.py `style_composition_weights`, the "style and
composition" preset's table). Each site runs only the application with a weight there, so this costs what the
standard pack's single application with a per-block image does.
"""

from __future__ import annotations

import logging
import math

from comfy_api.latest import io

from ..processors.ipadapter import encode_embeddings, encode_positive, tokens_from_embeddings
from ..processors.weight_types import BlockWeight, style_composition_weights
from .apply import (attention_op_input, attn_mask_input, clip_vision_input, combine_input, embeds_scaling_input,
                    image_negative_input, install_application, ipadapter_input, model_input, model_output,
                    prepare_target, weight_input, window_inputs)
from .types import CATEGORY
from .validation import ValidatesCombos

logger = logging.getLogger(__name__)


class ApplyXformersIPAdapterStyleComposition(ValidatesCombos, io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ApplyXformersIPAdapterStyleComposition",
            display_name="IP-Adapter Style & Composition (xformers)",
            category=CATEGORY,
            description="Takes the style from one image and the composition (layout) from another: the style "
                        "image conditions InstantStyle's style blocks, the composition image its layout blocks "
                        "(SDXL: up_blocks.0.attentions.1 / down_blocks.2.attentions.1; SD1.5: the standard pack's "
                        "blocks). Works on SD1.5 and SDXL.",
            inputs=[
                model_input(), ipadapter_input(), clip_vision_input(),
                io.Image.Input("image_style", tooltip="The image whose style (colours, texture, medium) to take."),
                io.Image.Input("image_composition", tooltip="The image whose composition (layout, pose) to take."),
                weight_input("weight_style", "Strength of the style image (0 = none, negative = push away)."),
                weight_input("weight_composition", "Strength of the composition image at its blocks."),
                io.Boolean.Input("expand_style", default=False,
                                 tooltip="Feed the style image to every block except the composition ones "
                                         "(stronger style), instead of the style blocks only."),
                combine_input("average"), *window_inputs(), embeds_scaling_input(),
                image_negative_input(), attention_op_input(), attn_mask_input(),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def execute(cls, model, ipadapter, clip_vision, image_style, image_composition, weight_style: float,
                weight_composition: float, expand_style: bool, combine_embeds: str, start_at: float, end_at: float,
                embeds_scaling: str, image_negative=None, attention_op=None, attn_mask=None) -> io.NodeOutput:
        if not math.isfinite(weight_composition):
            raise ValueError(f"weight_composition must be a finite number; got {weight_composition}")
        if not isinstance(expand_style, bool):
            raise TypeError(f"expand_style must be a boolean; got {type(expand_style).__name__}")
        target = prepare_target(model, ipadapter, weight_style, start_at, end_at, attention_op, attn_mask)

        def encode(pixels):
            return clip_vision.encode_image(pixels)

        style, negative = encode_embeddings(ipadapter, encode, image_style, image_negative)
        composition = encode_positive(ipadapter, encode, image_composition, "image_composition")
        split = [style_composition_weights(weight_style, weight_composition, expand_style, s.transformer_index,
                                           target.sdxl) for s in target.sites]
        patched = install_application(target, tokens_from_embeddings(ipadapter, style, negative, combine_embeds),
                                      [BlockWeight(w) for w, _ in split], embeds_scaling)
        patched = install_application(target, tokens_from_embeddings(ipadapter, composition, negative,
                                                                     combine_embeds),
                                      [BlockWeight(w) for _, w in split], embeds_scaling, model=patched)
        logger.info("applied %s for style (weight %s%s) and composition (weight %s)", ipadapter.describe(),
                    weight_style, ", expanded" if expand_style else "", weight_composition)
        return io.NodeOutput(patched)
