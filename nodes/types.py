"""Connection types (MODEL-like wire types) this pack adds to ComfyUI graphs."""

from comfy_api.latest import io

AttentionOp = io.Custom("ATTENTION_OP")
XformersIPAdapter = io.Custom("XFORMERS_IPADAPTER")
# CLIP vision features for an adapter, weight applied (processors/ipadapter/embeds.py AdapterEmbeds)
XformersIPAdapterEmbeds = io.Custom("XFORMERS_IPADAPTER_EMBEDS")
# regions for Apply From Params (processors/ipadapter/params.py IPAdapterParams)
XformersIPAdapterParams = io.Custom("XFORMERS_IPADAPTER_PARAMS")
# face detector + recognizer of an InsightFace model pack (processors/face/analysis.py FaceAnalysis)
XformersFaceAnalysis = io.Custom("XFORMERS_FACE_ANALYSIS")

CATEGORY = "xformers IP-Adapter"
