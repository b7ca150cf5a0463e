"""xformers IP-Adapter for ComfyUI.

ComfyUI imports this file as a custom node package. Nothing from ComfyUI is imported at module level, so
`processors/` stays usable on its own; the V3 entry point loads the node modules when ComfyUI asks for them.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes.extension import XformersIPAdapterExtension

    return XformersIPAdapterExtension()
