"""Full-size SD1.5 and SDXL UNet layouts built with ComfyUI's own UNetModel on the meta device.

No weights are allocated, so tests can enumerate attn2 sites of the real layouts (16 for SD1.5, 70 for
SDXL) in milliseconds. The detection-relevant settings (context dim, channels, linear projections,
ADM width, heads) are read from ``comfy.supported_models.SD15`` / ``SDXL`` (``unet_config`` plus
``unet_extra_config``); the structure below completes them the way a real checkpoint is detected.
"""
from __future__ import annotations

from . import comfy_bootstrap

COMMON = dict(image_size=32, in_channels=4, out_channels=4, use_spatial_transformer=True, legacy=False,
              use_temporal_resblock=False)
STRUCTURE = {
    "SD15": dict(num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                 # output blocks are numbered from the deepest level; UNetModel pops this list from its end
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]),
    "SDXL": dict(num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4], num_classes="sequential",
                 transformer_depth_middle=10, transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10]),
}
EXPECTED_ATTN2_SITES = {"SD15": 16, "SDXL": 70}


def unet_config(name: str) -> dict:
    """UNetModel kwargs for "SD15" or "SDXL"."""
    comfy_bootstrap.bootstrap()
    import comfy.supported_models as sm

    model = getattr(sm, name)
    return {**COMMON, **STRUCTURE[name], **model.unet_config, **model.unet_extra_config}


def meta_unet(name: str):
    """ComfyUI's UNetModel for "SD15" or "SDXL", parameters on the meta device."""
    comfy_bootstrap.bootstrap()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel(**unet_config(name), device="meta", operations=comfy.ops.disable_weight_init)


def attn2_sites(diffusion_model) -> list[tuple[str, int, int]]:
    """(block name, block number, transformer index) of every cross-attention in SpatialTransformers,
    in the order input, middle, output (the ids ``set_model_attn2_replace`` takes)."""
    from comfy.ldm.modules.attention import SpatialTransformer

    sites = []

    def scan(block_name, number, block):
        for layer in block:
            if isinstance(layer, SpatialTransformer):
                for index, tb in enumerate(layer.transformer_blocks):
                    if getattr(tb, "attn2", None) is not None:
                        sites.append((block_name, number, index))

    for number, block in enumerate(diffusion_model.input_blocks):
        scan("input", number, block)
    if diffusion_model.middle_block is not None:
        scan("middle", 0, diffusion_model.middle_block)
    for number, block in enumerate(diffusion_model.output_blocks):
        scan("output", number, block)
    return sites
