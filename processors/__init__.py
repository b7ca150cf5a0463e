"""The engine: IP-Adapter attention on xformers or PyTorch SDPA. Pure torch; never imports ComfyUI.

Modules: `backends` (operator registry and dispatch), `bias` (aligned attention biases), `masks`, `fused`
(block-diagonal packing), `ip_attention` (XFormersIPAdapterAttnProcessor), `diffusers_processor`
(the same engine for diffusers' Attention), `ipadapter` (IP-Adapter files and image tokens).
"""
