"""The V3 extension: registers the ipadapter folder, the server routes and every node of the pack."""

from __future__ import annotations

import logging

from comfy_api.latest import ComfyExtension, io

from . import routes
from .folders import register_insightface_folder, register_ipadapter_folder
from .face_analysis import XformersFaceAnalysisLoader
from .faceid import ApplyXformersIPAdapterFaceID
from .unified_loader_faceid import XformersIPAdapterUnifiedLoaderFaceID
from .apply import ApplyXformersIPAdapterAttention
from .embeds import NODES as EMBEDS_NODES
from .image_prep import XformersIPAdapterNoise, XformersPrepImageForClipVision
from .load import LoadXformersIPAdapter
from .patch_model import PatchXformersModelAttention
from .select_op import SelectXformersAttentionOp
from .unified_loader import XformersIPAdapterUnifiedLoader
from .style_composition import ApplyXformersIPAdapterStyleComposition
from .regional import NODES as REGIONAL_NODES
from .tiled import ApplyXformersIPAdapterTiled
from .batch import ApplyXformersIPAdapterBatch
from .frame_weights import XformersIPAdapterWeights

logger = logging.getLogger(__name__)


_route_registered = False


def _register_route() -> None:
    global _route_registered
    try:
        from server import PromptServer
    except ImportError:  # imported without the server (tests, scripts)
        return
    if not _route_registered and getattr(PromptServer, "instance", None) is not None:
        routes.register(PromptServer.instance)
        _route_registered = True


def setup() -> None:
    """Idempotent: ComfyUI 0.3.x never calls on_load, newer hosts may; get_node_list calls this too."""
    register_ipadapter_folder()
    register_insightface_folder()
    _register_route()


class XformersIPAdapterExtension(ComfyExtension):
    async def on_load(self) -> None:
        setup()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        setup()
        return [LoadXformersIPAdapter, SelectXformersAttentionOp, ApplyXformersIPAdapterAttention,
                PatchXformersModelAttention, XformersIPAdapterUnifiedLoader,
                XformersPrepImageForClipVision, XformersIPAdapterNoise,
                XformersFaceAnalysisLoader, ApplyXformersIPAdapterFaceID, XformersIPAdapterUnifiedLoaderFaceID,
                *EMBEDS_NODES, ApplyXformersIPAdapterStyleComposition,
                ApplyXformersIPAdapterBatch, XformersIPAdapterWeights,
                *REGIONAL_NODES, ApplyXformersIPAdapterTiled]
