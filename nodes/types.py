"""Connection types (MODEL-like wire types) this pack adds to ComfyUI graphs."""

from comfy_api.latest import io

AttentionOp = io.Custom("ATTENTION_OP")
XformersIPAdapter = io.Custom("XFORMERS_IPADAPTER")

CATEGORY = "xformers IP-Adapter"
