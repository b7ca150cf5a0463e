"""SelectXformersAttentionOp: which attention operator runs, and how masks and adapters are computed."""

from __future__ import annotations

import comfy.model_management
from comfy_api.latest import io

from ..processors import planner
from ..processors.backends import MASK_MODES, ON_UNSUPPORTED, OP_CHOICES, AttentionOpConfig
from .types import CATEGORY, AttentionOp
from .validation import ValidatesCombos

OP_TOOLTIP = (
    "Attention operator for the IP-Adapter (and, through Patch Model Attention, the whole model). "
    "auto: xformers where it can run the inputs, else PyTorch SDPA. xformers: xformers' own dispatcher. "
    "xformers:<kernel>: one xformers kernel. sdpa / sdpa:<backend>: PyTorch scaled_dot_product_attention. "
    "Which ones can run on this machine is shown in the list and logged."
)


class SelectXformersAttentionOp(ValidatesCombos, io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SelectXformersAttentionOp",
            display_name="Select Attention Op",
            category=CATEGORY,
            description="Chooses the attention operator and options used by Apply xformers IP-Adapter Attention "
                        "and Patch Model Attention (xformers). Unconnected, those nodes use 'auto'.",
            inputs=[
                io.Combo.Input("op", options=list(OP_CHOICES), default="auto", tooltip=OP_TOOLTIP),
                io.Combo.Input("mask_mode", options=list(MASK_MODES), default="multiply output",
                               tooltip="How attn_mask limits the adapter. multiply output: the adapter's attention "
                                       "output is weighted by the mask (any operator, the usual IP-Adapter "
                                       "behaviour). attention bias: the mask gates the adapter inside the softmax "
                                       "through an additive bias (xformers' cutlass kernel or SDPA)."),
                io.Boolean.Input("fused", default=False,
                                 tooltip="Compute the text attention and every adapter in ONE xformers call "
                                         "(block-diagonal). Needs an xformers operator that takes a block-diagonal "
                                         "mask; otherwise separate calls run and the log says why (with "
                                         "on_unsupported = error, the node stops with an error instead)."),
                io.Combo.Input("on_unsupported", options=list(ON_UNSUPPORTED), default="fall back",
                               tooltip="If the chosen operator cannot run the inputs: fall back to PyTorch SDPA "
                                       "(logged once per run with the reason) or stop with an error."),
            ],
            outputs=[AttentionOp.Output(display_name="attention_op",
                                        tooltip="Connect to the attention_op input of the apply/patch nodes.")],
        )

    @classmethod
    def execute(cls, op: str, mask_mode: str, fused: bool, on_unsupported: str) -> io.NodeOutput:
        config = AttentionOpConfig(op=op, mask_mode=mask_mode, fused=fused, on_unsupported=on_unsupported)
        planner.check_config(config, comfy.model_management.get_torch_device())
        return io.NodeOutput(config)
