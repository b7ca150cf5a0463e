"""Regional conditioning: each region of the picture gets its own reference image and its own prompt.

`XformersIPAdapterRegionalConditioning` describes one region (reference, weights, window, mask) and masks that
region's text conditioning through ComfyUI's own conditioning-mask keys, the ones core's Conditioning (Set
Mask) node writes: the sampler weights each conditioning by its mask. `XformersIPAdapterCombineParams` gathers
regions; `ApplyXformersIPAdapterFromParams` applies them all in one sampling run, one adapter application per
region with its own mask, through Apply's path (nodes/apply.py).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Optional

import torch
from comfy_api.latest import io

from ..processors.ipadapter import image_tokens
from ..processors.ipadapter.errors import IPAdapterInputError
from ..processors.ipadapter.params import IPAdapterParams, check_mask_batches, combine_params, make_region
from .apply import (apply_tokens, attention_op_input, clip_vision_input, combine_input, embeds_scaling_input,
                    image_negative_input, ipadapter_input, model_input, model_output, prepare_target,
                    weight_input, weight_type_input, window_inputs)
from .types import CATEGORY, XformersIPAdapterParams
from .validation import ValidatesCombos

logger = logging.getLogger(__name__)

MAX_PARAMS = 5
PARAMS_TOOLTIP = "Regions from IP-Adapter Regional Conditioning (xformers) or Combine Params (xformers)."


class XformersIPAdapterRegionalConditioning(ValidatesCombos, io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="XformersIPAdapterRegionalConditioning",
            display_name="IP-Adapter Regional Conditioning (xformers)",
            category=CATEGORY,
            description="One region of the picture with its own reference image and prompt: the image goes to "
                        "Apply From Params (with its weight, weight type, window and mask), and the prompts "
                        "are masked to the region the way Conditioning (Set Mask) does, with prompt_weight as "
                        "strength. Combine the positive/negative outputs of all regions (Conditioning Combine) "
                        "for the sampler.",
            inputs=[
                io.Image.Input("image", tooltip="The reference image(s) for this region."),
                weight_input("image_weight", "Strength of the region's reference image (0 = none, negative = "
                                             "push away)."),
                io.Float.Input("prompt_weight", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Strength of the region's prompts inside the mask (the conditioning's "
                                       "mask_strength). Unused without a mask."),
                weight_type_input(), *window_inputs(),
                io.Mask.Input("mask", optional=True,
                              tooltip="The region (white = inside). Any size: stretched to the latent. One mask, "
                                      "or one per latent. Unconnected: the whole picture, prompts unmasked."),
                io.Conditioning.Input("positive", optional=True,
                                      tooltip="The region's positive prompt, to be masked to the region."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="The region's negative prompt, to be masked to the region."),
            ],
            outputs=[
                XformersIPAdapterParams.Output(display_name="IPADAPTER_PARAMS",
                                               tooltip="This region, for Combine Params or Apply From Params."),
                io.Conditioning.Output(display_name="positive",
                                       tooltip="The positive prompt masked to the region (None if unconnected)."),
                io.Conditioning.Output(display_name="negative",
                                       tooltip="The negative prompt masked to the region (None if unconnected)."),
            ],
        )

    @classmethod
    def execute(cls, image, image_weight: float, prompt_weight: float, weight_type: str, start_at: float,
                end_at: float, mask=None, positive=None, negative=None) -> io.NodeOutput:
        region = make_region(image, image_weight, weight_type, start_at, end_at, mask)
        if isinstance(prompt_weight, bool) or not isinstance(prompt_weight, (int, float)) \
                or not math.isfinite(prompt_weight) or prompt_weight < 0:
            raise IPAdapterInputError(f"prompt_weight must be a finite number >= 0; got {prompt_weight!r}")
        positive = masked_conditioning(positive, region.mask, float(prompt_weight), "positive")
        negative = masked_conditioning(negative, region.mask, float(prompt_weight), "negative")
        return io.NodeOutput(IPAdapterParams((region,)), positive, negative)


def masked_conditioning(conditioning: Any, mask: Optional[torch.Tensor], strength: float, label: str):
    """A copy of `conditioning` whose entries carry ComfyUI's conditioning-mask keys (what core's
    ConditioningSetMask writes, "default" area): the sampler multiplies this conditioning's prediction by
    mask x strength (comfy/samplers.py get_area_and_mult). Unchanged without a mask; the input is never
    modified."""
    if conditioning is None or mask is None:
        return conditioning
    if not isinstance(conditioning, list) or not all(
            isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], dict)
            for entry in conditioning):
        raise IPAdapterInputError(f"{label} must be a CONDITIONING (from a prompt encoder); got "
                                  f"{type(conditioning).__name__}")
    keys = {"mask": mask, "set_area_to_bounds": False, "mask_strength": strength}
    return [[tensor, {**options, **keys}] for tensor, options in conditioning]


class XformersIPAdapterCombineParams(ValidatesCombos, io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        optional = [XformersIPAdapterParams.Input(f"params_{i}", optional=True, tooltip=PARAMS_TOOLTIP)
                    for i in range(3, MAX_PARAMS + 1)]
        return io.Schema(
            node_id="XformersIPAdapterCombineParams",
            display_name="IP-Adapter Combine Params (xformers)",
            category=CATEGORY,
            description="Gathers the regions of several Regional Conditioning nodes (in input order) so that "
                        "one Apply From Params applies them all. Chain it for more than five.",
            inputs=[XformersIPAdapterParams.Input("params_1", tooltip=PARAMS_TOOLTIP),
                    XformersIPAdapterParams.Input("params_2", tooltip=PARAMS_TOOLTIP), *optional],
            outputs=[XformersIPAdapterParams.Output(display_name="params",
                                                    tooltip="All the regions, params_1's first.")],
        )

    @classmethod
    def execute(cls, params_1, params_2, params_3=None, params_4=None, params_5=None) -> io.NodeOutput:
        if params_1 is None or params_2 is None:
            raise IPAdapterInputError("params_1 and params_2 must both be connected")
        named = [("params_1", params_1), ("params_2", params_2), ("params_3", params_3), ("params_4", params_4),
                 ("params_5", params_5)]
        return io.NodeOutput(combine_params(named))


class ApplyXformersIPAdapterFromParams(ValidatesCombos, io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ApplyXformersIPAdapterFromParams",
            display_name="Apply xformers IP-Adapter From Params",
            category=CATEGORY,
            description="Applies every region of the params in one sampling run: each region's reference "
                        "conditions the model with its own weight, weight type, start/end and mask, exactly "
                        "as one Apply node per region would. The input model is never modified.",
            inputs=[
                model_input(), ipadapter_input(), clip_vision_input(),
                XformersIPAdapterParams.Input("ipadapter_params", tooltip=PARAMS_TOOLTIP),
                combine_input("concat"), embeds_scaling_input(), image_negative_input(), attention_op_input(),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def execute(cls, model, ipadapter, clip_vision, ipadapter_params, combine_embeds: str, embeds_scaling: str,
                image_negative=None, attention_op=None) -> io.NodeOutput:
        params = combine_params([("ipadapter_params", ipadapter_params)])
        if not params.regions:
            raise IPAdapterInputError("ipadapter_params holds no region: connect IP-Adapter Regional "
                                      "Conditioning (xformers)")
        check_mask_batches(params)

        def encode(pixels):
            return clip_vision.encode_image(pixels)

        patched = model
        for region in params.regions:
            target = prepare_target(patched, ipadapter, region.weight, region.start_at, region.end_at,
                                    attention_op, region.mask)
            tokens = image_tokens(ipadapter, encode, region.image, image_negative, combine_embeds)
            patched = apply_tokens(target, tokens, region.weight, region.weight_type, embeds_scaling)
        logger.info("applied %d regions", len(params.regions))
        return io.NodeOutput(patched)


NODES = [XformersIPAdapterRegionalConditioning, XformersIPAdapterCombineParams, ApplyXformersIPAdapterFromParams]
