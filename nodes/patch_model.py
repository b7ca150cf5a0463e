"""PatchXformersModelAttention: every self- and cross-attention of the model on the selected operator."""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from ..processors.backends import AttentionOpConfig
from ..processors.bias import aligned_bias
from ..processors.layout import host_heads_view
from ..processors.planner import Planner
from .patch import MODEL_OP_KEY
from .planning import check_operator, start_run_log
from .types import CATEGORY, AttentionOp
from .validation import ValidatesCombos

logger = logging.getLogger(__name__)


def make_override(config: AttentionOpConfig):
    """An `optimized_attention_override` running ComfyUI's attention calls through the planner."""
    planner = Planner(config)

    def override(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                 skip_output_reshape=False, **kwargs):
        if kwargs.get("scale") is not None or kwargs.get("enable_gqa"):
            # a call shape we do not translate: let ComfyUI's own function run it
            return func(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                        skip_output_reshape=skip_output_reshape, **kwargs)
        out_dtype = q.dtype
        if attn_precision == torch.float32 and q.dtype != torch.float32:
            q, k, v = q.float(), k.float(), v.float()
        q4, k4, v4 = (host_heads_view(t, heads, skip_reshape) for t in (q, k, v))
        bias = None
        if mask is not None:
            shape = (q4.shape[0], q4.shape[2], q4.shape[1], k4.shape[1])
            bias = aligned_bias(mask, shape, q4.dtype, q4.device)
        out = planner.attention(q4, k4, v4, bias)
        if skip_output_reshape:
            return out.transpose(1, 2).to(out_dtype)
        return out.reshape(out.shape[0], out.shape[1], -1).to(out_dtype)

    return override


class PatchXformersModelAttention(ValidatesCombos, io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PatchXformersModelAttention",
            display_name="Patch Model Attention (xformers)",
            category=CATEGORY,
            description="Runs ALL attention of the model (self- and cross-attention) on the operator chosen in "
                        "Select Attention Op, through ComfyUI's per-model attention override. IP-Adapters "
                        "applied to this model use the same operator unless given their own.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model whose attention to route."),
                AttentionOp.Input("attention_op", tooltip="From Select Attention Op."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with its attention routed.")],
        )

    @classmethod
    def execute(cls, model, attention_op: AttentionOpConfig) -> io.NodeOutput:
        if not isinstance(attention_op, AttentionOpConfig):
            raise TypeError("attention_op must come from Select Attention Op")
        check_operator(attention_op, model, adapters=0)
        patched = model.clone()
        options = patched.model_options.setdefault("transformer_options", {})
        options["optimized_attention_override"] = make_override(attention_op)
        options[MODEL_OP_KEY] = attention_op
        start_run_log(patched)
        logger.info("model attention routed to %r", attention_op.op)
        return io.NodeOutput(patched)
