"""ApplyXformersIPAdapterBatch: one reference image and one weight per frame of a latent batch (animation)."""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence, Union

import torch
from comfy_api.latest import io

from ..processors.ipadapter import IPAdapterInputError, image_tokens
from ..processors.ipadapter.frames import FrameKVCache, check_frame_weights
from .apply import (apply_tokens, attention_op_input, attn_mask_input, clip_vision_input, combine_input,
                    embeds_scaling_input, image_negative_input, install, ipadapter_input, layer_weights_input,
                    model_input, model_output, prepare_target, site_weights, weight_input, weight_type_input,
                    window_inputs)
from .patch import AdapterApplication
from .types import CATEGORY
from .validation import ValidatesCombos

logger = logging.getLogger(__name__)

Weight = Union[float, Sequence[float]]


class ApplyXformersIPAdapterBatch(ValidatesCombos, io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ApplyXformersIPAdapterBatch",
            display_name="Apply xformers IP-Adapter Batch",
            category=CATEGORY,
            description="Apply for animation: with unfold_batch, image i conditions latent (frame) i with weight "
                        "i, the last image and weight repeating for later frames; frames follow the frame "
                        "indices of ComfyUI's context windows. The image keys/values of all frames are computed "
                        "once per run. Without unfold_batch it is Apply, encoding the images in batches.",
            inputs=[
                model_input(), ipadapter_input(), clip_vision_input(),
                io.Image.Input("image", tooltip="Reference images: one per frame with unfold_batch (the last "
                                                "repeats for later frames), else combined as combine_embeds says."),
                weight_input("weight", "Strength of the image prompt (0 = no effect, negative = push away). Also "
                                       "takes a per-frame list (from IP-Adapter Weights): with unfold_batch frame i "
                                       "gets weight i (the last repeats); without it only the first is used."),
                weight_type_input(), *window_inputs(),
                io.Boolean.Input("unfold_batch", default=True,
                                 tooltip="On: image i and weight i condition latent i (one frame each). Off: every "
                                         "latent gets all images, as Apply does."),
                io.Int.Input("encode_batch_size", default=0, min=0, max=4096,
                             tooltip="How many images CLIP vision encodes at once (0 = all at once). Lower it "
                                     "when many frames do not fit in memory together."),
                combine_input("concat"), embeds_scaling_input(),
                attention_op_input(), attn_mask_input(), image_negative_input(), layer_weights_input(),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def execute(cls, model, ipadapter, clip_vision, image, weight: Weight, weight_type: str, start_at: float,
                end_at: float, unfold_batch: bool, encode_batch_size: int, combine_embeds: str,
                embeds_scaling: str, attention_op=None, attn_mask=None, image_negative=None,
                layer_weights: str = "") -> io.NodeOutput:
        check_attn2_family(ipadapter)
        frame_weights = frame_weight_list(weight)
        check_batch_inputs(image, frame_weights, unfold_batch, encode_batch_size)
        target = prepare_target(model, ipadapter, frame_weights[0], start_at, end_at, attention_op, attn_mask)
        encode = chunked_encoder(clip_vision, encode_batch_size)
        if not unfold_batch:
            if len(frame_weights) > 1:
                logger.info("Apply Batch without unfold_batch uses the first of %d per-frame weights (%s), as the "
                            "standard pack does", len(frame_weights), frame_weights[0])
            tokens = image_tokens(ipadapter, encode, image, image_negative, combine_embeds)
            return io.NodeOutput(apply_tokens(target, tokens, frame_weights[0], weight_type, embeds_scaling,
                                              layer_weights))
        tokens = image_tokens(ipadapter, encode, image, image_negative, "concat")  # one image per frame
        per_site = site_weights(target, 1.0, weight_type, layer_weights)
        application = AdapterApplication(
            kv=FrameKVCache(target.ipadapter, tokens, [w.weight for w in per_site], frame_weights, embeds_scaling),
            swaps=tuple(w.swap for w in per_site), sigma_window=target.sigma_window, mask=target.mask,
            config=target.config, label=target.ipadapter.name)
        logger.info("applied %s per frame at %d attn2 sites (%d images, %d weights, %s)",
                    target.ipadapter.describe(), len(target.sites), image.shape[0], len(frame_weights), weight_type)
        return io.NodeOutput(install(target.model, target.sites, application))


def check_attn2_family(ipadapter: Any) -> None:
    """Apply Batch runs the SD1.5/SDXL attn2 path; another family's adapter gets a message naming it."""
    from .families import APPLY_HANDLERS, family_handler  # families import apply.py's input helpers

    if family_handler(APPLY_HANDLERS, ipadapter) is not None:
        raise IPAdapterInputError(f"Apply xformers IP-Adapter Batch takes SD1.5 and SDXL IP-Adapters; this one is "
                                  f"a {type(ipadapter).__name__}: use Apply xformers IP-Adapter Attention (one "
                                  f"image for every frame) or that family's own node")


def frame_weight_list(weight: Any) -> tuple[float, ...]:
    """`weight` as a tuple of per-frame weights: a number, or the list a FLOAT link carries from the
    Weights node."""
    if isinstance(weight, (list, tuple)):
        return check_frame_weights(weight)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise IPAdapterInputError(f"weight must be a number or a list of per-frame numbers (from IP-Adapter "
                                  f"Weights); got {type(weight).__name__}")
    if not math.isfinite(weight):
        raise IPAdapterInputError(f"weight must be a finite number; got {weight}")
    return (float(weight),)


def check_batch_inputs(image: Any, weights: tuple[float, ...], unfold_batch: bool, encode_batch_size: Any) -> None:
    if not isinstance(unfold_batch, bool):
        raise IPAdapterInputError(f"unfold_batch must be true or false; got {unfold_batch!r}")
    if isinstance(encode_batch_size, bool) or not isinstance(encode_batch_size, int) or encode_batch_size < 0:
        raise IPAdapterInputError(f"encode_batch_size must be a whole number >= 0 (0 = all at once); got "
                                  f"{encode_batch_size!r}")
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[0] == 0:
        raise IPAdapterInputError("image must be an IMAGE batch [frames, height, width, channels] with at least "
                                  "one image")
    if unfold_batch and image.shape[0] > 1 and len(weights) > image.shape[0]:
        raise IPAdapterInputError(
            f"weight has {len(weights)} per-frame values but image has {image.shape[0]} frames: with unfold_batch "
            f"weight i belongs to image i, so give as many images as weights (IP-Adapter Weights' image_1 output "
            f"has exactly that many), or a single image for every frame")


def chunked_encoder(clip_vision: Any, batch_size: int):
    """`clip_vision.encode_image`, run on at most `batch_size` images at a time (0 = all at once), with the
    tensor fields of the outputs concatenated."""
    def encode(pixels: torch.Tensor):
        if batch_size <= 0 or pixels.shape[0] <= batch_size:
            return clip_vision.encode_image(pixels)
        outputs = [clip_vision.encode_image(chunk) for chunk in torch.split(pixels, batch_size)]
        return EncodedBatch({name: torch.cat([getattr(o, name) for o in outputs])
                             for name, value in vars(outputs[0]).items() if isinstance(value, torch.Tensor)})
    return encode


class EncodedBatch:
    """CLIP vision outputs of several chunks joined: the fields read by attribute or by key, like ComfyUI's."""

    def __init__(self, fields: dict[str, torch.Tensor]) -> None:
        self.__dict__.update(fields)

    def __getitem__(self, key: str) -> torch.Tensor:
        return getattr(self, key)
