"""XformersIPAdapterUnifiedLoader: the IP-Adapter and CLIP vision for a preset, found by what the files are.

Every file ComfyUI lists for the `ipadapter` and `clip_vision` folders (extra_model_paths.yaml included) is
identified from its tensor shapes (processors/ipadapter/identify.py: headers only, cached per path, size and
mtime); the preset rules are processors/ipadapter/presets.py. Nothing in the model folders is written.
"""

from __future__ import annotations

import logging
import os
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import folder_paths
from comfy_api.latest import io

from ..processors.ipadapter import IPAdapterModel, load_ipadapter_file
from ..processors.ipadapter.identify import ADAPTER, CLIP_VISION, FileIdentifier, Identified
from ..processors.ipadapter.presets import PRESET_NAMES, Choice, choose, preset_named
from .folders import FOLDER
from .sites import attn2_sites
from .types import CATEGORY, XformersIPAdapter
from .validation import ValidatesCombos, require_choice

logger = logging.getLogger(__name__)

CLIP_VISION_FOLDER = "clip_vision"
IDENTIFIER = FileIdentifier()


@dataclass(frozen=True)
class _Pipeline:
    """What a unified loader produced, so a chained loader can reuse what it loaded (by file identity)."""

    adapter_key: tuple
    clip_key: tuple
    clip_vision: Any


# Adapter output -> its pipeline. Weak keys: an entry lives exactly as long as ComfyUI keeps that output.
_PIPELINES: "weakref.WeakKeyDictionary[IPAdapterModel, _Pipeline]" = weakref.WeakKeyDictionary()


def scan(folder: str, role: str) -> list[Identified]:
    """Every file ComfyUI lists for `folder`, identified (cached). Reads headers only."""
    found = []
    for name in folder_paths.get_filename_list(folder):
        path = folder_paths.get_full_path(folder, name)
        if path:
            found.append(IDENTIFIER.identify(path, role, name))
    return found


def _file_key(path: str) -> tuple:
    stat = os.stat(path)
    return os.path.abspath(path), stat.st_size, stat.st_mtime_ns


def _load_clip_vision(path: str):
    import comfy.clip_vision

    clip = comfy.clip_vision.load(path)
    if clip is None:
        raise ValueError(f"ComfyUI could not load the CLIP vision file {path}: re-download it")
    return clip


def _model_sites(model) -> list:
    try:
        return attn2_sites(model)
    except AttributeError as exc:  # no UNet input/output blocks: not an SD1.5/SDXL model
        raise ValueError("model: not an SD1.5 or SDXL UNet (it has no input/output blocks with cross-attention); "
                         "IP-Adapter presets exist for SD1.5 and SDXL") from exc


def _warn_on_name(choice: Choice) -> None:
    if not choice.name_says_it:
        logger.warning("preset %r: no file's name says it is this kind; using %s, which has the same shapes "
                       "(download %s for the real one)", choice.preset.name, choice.adapter.name,
                       "/".join(choice.preset.downloads.values()) or "it")


class XformersIPAdapterUnifiedLoader(ValidatesCombos, io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="XformersIPAdapterUnifiedLoader",
            display_name="IP-Adapter Unified Loader (xformers)",
            category=CATEGORY,
            description="Finds the IP-Adapter and CLIP vision model for a preset by what the files are (tensor "
                        "shapes read from their headers), in every ipadapter and clip_vision folder ComfyUI "
                        "knows: any file name works. Names only break ties between same-shaped files (light "
                        "vs standard, plus vs plus face). Chain loaders through `ipadapter` to reuse what an "
                        "earlier one loaded.",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.5 or SDXL model: the adapter is chosen to fit its "
                                                "cross-attention layers. Passed through unchanged."),
                io.Combo.Input("preset", options=list(PRESET_NAMES), default="STANDARD (medium strength)",
                               tooltip="Which adapter: LIGHT and STANDARD (base, ViT-H), VIT-G (base, "
                                       "ViT-bigG), PLUS, PLUS FACE (16 tokens), FULL FACE (SD1.5 only)."),
                XformersIPAdapter.Input("ipadapter", optional=True,
                                        tooltip="Optional: the ipadapter output of another unified loader. Files "
                                                "it already loaded (adapter or CLIP vision) are reused."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The input model, unchanged."),
                XformersIPAdapter.Output(display_name="ipadapter",
                                         tooltip="The preset's IP-Adapter: connect to Apply xformers IP-Adapter "
                                                 "Attention (or to the next unified loader)."),
                io.ClipVision.Output(display_name="clip_vision",
                                     tooltip="The CLIP vision model this adapter is fed with: connect to the "
                                             "Apply node's clip_vision."),
            ],
        )

    @classmethod
    def execute(cls, model, preset: str, ipadapter: Optional[IPAdapterModel] = None) -> io.NodeOutput:
        require_choice("preset", preset, list(PRESET_NAMES))  # a linked value is unknown at validation
        if ipadapter is not None and not isinstance(ipadapter, IPAdapterModel):
            raise TypeError(f"ipadapter must come from another IP-Adapter Unified Loader (xformers) or Load "
                            f"IP-Adapter Model (xformers); got {type(ipadapter).__name__}")
        upstream = _PIPELINES.get(ipadapter) if ipadapter is not None else None
        reuse = {upstream.adapter_key[0], upstream.clip_key[0]} if upstream else set()
        choice = choose(preset_named(preset), _model_sites(model), scan(FOLDER, ADAPTER),
                        scan(CLIP_VISION_FOLDER, CLIP_VISION), reuse)
        _warn_on_name(choice)
        adapter, clip_vision, pipeline = _load(choice, ipadapter, upstream)
        _PIPELINES[adapter] = pipeline
        logger.info("preset %r: %s with %s", preset, adapter.describe(), choice.clip_vision.describe())
        return io.NodeOutput(model, adapter, clip_vision)


def _load(choice: Choice, upstream_adapter: Optional[IPAdapterModel],
          upstream: Optional[_Pipeline]) -> tuple[IPAdapterModel, Any, _Pipeline]:
    """Load the chosen files, reusing what the chained loader already holds for the same file."""
    adapter_key, clip_key = _file_key(choice.adapter.path), _file_key(choice.clip_vision.path)
    if upstream is not None and upstream.adapter_key == adapter_key:
        adapter = upstream_adapter
    else:
        adapter = load_ipadapter_file(choice.adapter.path)
    if upstream is not None and upstream.clip_key == clip_key:
        clip_vision = upstream.clip_vision
    else:
        clip_vision = _load_clip_vision(choice.clip_vision.path)
    return adapter, clip_vision, _Pipeline(adapter_key, clip_key, clip_vision)
