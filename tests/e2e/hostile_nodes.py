"""Test-only ComfyUI nodes (V1 API) for tests/e2e/test_hostile_inputs.py: values that stock nodes never make.

The test copies this file into its server's custom_nodes folder; it is never part of the pack.
"""
import json

import torch


class XipaTestCastImage:
    """IMAGE in another dtype, as a careless custom node could hand it on."""

    CATEGORY = "testing"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "dtype": (["float16", "bfloat16", "uint8"],)}}

    def run(self, image, dtype):
        if dtype == "uint8":
            return ((image * 255).round().to(torch.uint8),)
        return (image.to(getattr(torch, dtype)),)


class XipaTestScaleMask:
    """MASK times any factor (stock mask nodes clamp to 0..1)."""

    CATEGORY = "testing"
    RETURN_TYPES = ("MASK",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mask": ("MASK",), "factor": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0})}}

    def run(self, mask, factor):
        return (mask * factor,)


class XipaTestComboValue:
    """Any JSON value on a COMBO output: what a linked combo input receives, unseen by /prompt validation."""

    CATEGORY = "testing"
    RETURN_TYPES = ("COMBO",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("STRING", {"default": "0"})}}

    def run(self, value):
        return (json.loads(value),)


NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in (XipaTestCastImage, XipaTestScaleMask, XipaTestComboValue)}
