"""XformersPrepImageForClipVision and XformersIPAdapterNoise: reference and negative images for the adapter.

The image maths is processors/images.py; these nodes check their inputs and name the one that is wrong.
"""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..processors.images import (CLIP_SIZE, CROP_POSITIONS, INTERPOLATIONS, MAX_BLUR, NOISE_TYPES, make_noise,
                                 prep_for_clip_vision)
from ..processors.ipadapter.validation import check_image_batch
from .types import CATEGORY
from .validation import ValidatesCombos

logger = logging.getLogger(__name__)


class XformersPrepImageForClipVision(ValidatesCombos, io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="XformersPrepImageForClipVision",
            display_name="Prep Image For ClipVision (xformers)",
            category=CATEGORY,
            description=f"Makes each image a {CLIP_SIZE}x{CLIP_SIZE} square the way CLIP vision sees it, choosing "
                        "which part to keep (or padding instead of cropping), with a chosen resampling filter and "
                        "optional sharpening. Connect the output to the image input of the apply nodes.",
            inputs=[
                io.Image.Input("image", tooltip="The reference image(s) to prepare."),
                io.Combo.Input("interpolation", options=list(INTERPOLATIONS), default="LANCZOS",
                               tooltip="Resampling filter (Pillow's names). LANCZOS keeps the most detail; "
                                       "NEAREST keeps hard pixel edges."),
                io.Combo.Input("crop_position", options=list(CROP_POSITIONS), default="center",
                               tooltip="Which square part of a non-square image to keep: top/bottom (tall "
                                       "images), left/right (wide images), center; pad adds black borders "
                                       "instead, so nothing is cut off."),
                io.Float.Input("sharpening", default=0.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Contrast adaptive sharpening after resizing: 0 = off, 1 = strongest. "
                                       "Helps small details survive the downscale to 224."),
            ],
            outputs=[io.Image.Output(display_name="IMAGE",
                                     tooltip=f"{CLIP_SIZE}x{CLIP_SIZE} images, one per input image.")],
        )

    @classmethod
    def execute(cls, image, interpolation: str, crop_position: str, sharpening: float) -> io.NodeOutput:
        image = check_image_batch(image, "image")
        return io.NodeOutput(prep_for_clip_vision(image, interpolation, crop_position, sharpening))


class XformersIPAdapterNoise(ValidatesCombos, io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="XformersIPAdapterNoise",
            display_name="IP-Adapter Noise (xformers)",
            category=CATEGORY,
            description="Makes a negative image for the image_negative input: the image (or black) degraded by "
                        "noise. The adapter then steers away from the noise, which often gives cleaner results "
                        "than the default negative. Deterministic: the same inputs always give the same image.",
            inputs=[
                io.Combo.Input("type", options=list(NOISE_TYPES), default="fade",
                               tooltip="fade: blend toward random noise; dissolve: replace that share of the "
                                       "values by noise; gaussian: add normal noise; shuffle: warp, turn "
                                       "upside down and add noise."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="How much noise: 0 leaves the image as it is (except shuffle, which "
                                       "still warps and turns it)."),
                io.Int.Input("blur", default=0, min=0, max=MAX_BLUR, step=1,
                             tooltip="Gaussian blur kernel size after the noise (0 = none; an even size is "
                                     "rounded up to the next odd one)."),
                io.Image.Input("image", optional=True,
                               tooltip="Image to degrade (center-cropped and resized to 224x224). "
                                       "Unconnected: a black 224x224 image."),
            ],
            outputs=[io.Image.Output(display_name="IMAGE",
                                     tooltip="The negative image: connect it to image_negative of the apply "
                                             "nodes or the encoder.")],
        )

    @classmethod
    def execute(cls, type: str, strength: float, blur: int, image=None) -> io.NodeOutput:  # noqa: A002
        if image is not None:
            image = check_image_batch(image, "image")
        return io.NodeOutput(make_noise(type, strength, blur, image))
