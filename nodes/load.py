"""LoadXformersIPAdapter: an IP-Adapter file from the `ipadapter` model folder."""

from __future__ import annotations

import logging

import folder_paths
from comfy_api.latest import io

from ..processors.ipadapter import load_ipadapter_file
from .folders import FOLDER
from .types import CATEGORY, XformersIPAdapter
from .validation import ValidatesCombos, require_choice

logger = logging.getLogger(__name__)


FILE_HINT = ("a file in models/ipadapter or an ipadapter path of extra_model_paths.yaml; put the file there, "
             "then press R in the UI or restart")


class LoadXformersIPAdapter(ValidatesCombos, io.ComfyNode):
    COMBO_HINTS = {"ipadapter_file": FILE_HINT}

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoadXformersIPAdapter",
            display_name="Load IP-Adapter Model (xformers)",
            category=CATEGORY,
            description="Loads an IP-Adapter (.safetensors, or .bin holding only tensors) from models/ipadapter. "
                        "Its variant (base, plus, full-face), CLIP vision input and base model (SD1.5/SDXL) "
                        "are read from the tensor shapes, never from the file name.",
            inputs=[io.Combo.Input("ipadapter_file", options=folder_paths.get_filename_list(FOLDER),
                                   tooltip="A file in models/ipadapter (or an ipadapter path from "
                                           "extra_model_paths.yaml). .safetensors is preferred.")],
            outputs=[XformersIPAdapter.Output(display_name="ipadapter",
                                              tooltip="Connect to Apply xformers IP-Adapter Attention.")],
        )

    @classmethod
    def execute(cls, ipadapter_file: str) -> io.NodeOutput:
        # a linked value is unknown at validation; a wrong type would fail deep in os.path.join
        require_choice("ipadapter_file", ipadapter_file, folder_paths.get_filename_list(FOLDER), FILE_HINT)
        path = folder_paths.get_full_path_or_raise(FOLDER, ipadapter_file)
        model = load_ipadapter_file(path)
        logger.info("loaded %s", model.describe())
        return io.NodeOutput(model)
