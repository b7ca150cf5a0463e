"""XformersIPAdapterUnifiedLoaderFaceID: a FaceID preset's adapter, CLIP vision and LoRA, found by what the files
are, the LoRA applied with ComfyUI's own LoRA loader, and the face analysis models.

Files are identified from their headers (processors/ipadapter/identify.py), the preset rules are
processors/ipadapter/presets.py (FACEID_PRESETS, choose, choose_lora): the same code as the Unified Loader's.
Nothing in the model folders is written.
"""

from __future__ import annotations

import logging
from comfy_api.latest import io

from ..processors.face import PROVIDER_CHOICES
from ..processors.ipadapter import load_ipadapter_file
from ..processors.ipadapter.faceid_adapter import FaceIDAdapterModel
from ..processors.ipadapter.identify import ADAPTER, CLIP_VISION, FACEID_LORA, Identified
from ..processors.ipadapter.presets import (FACEID_PRESET_NAMES, FACEID_PRESETS, FaceIDPreset, choose, choose_lora,
                                            preset_named)
from .face_analysis import load_pack
from .folders import FOLDER
from .types import CATEGORY, XformersFaceAnalysis, XformersIPAdapter
from .unified_loader import CLIP_VISION_FOLDER, _load_clip_vision, _model_sites, _warn_on_name, scan
from .validation import ValidatesCombos, require_choice

logger = logging.getLogger(__name__)

LORA_FOLDER = "loras"
# The model pack FaceID adapters were trained with (InsightFace buffalo_l: det_10g + w600k_r50).
FACEID_MODEL_PACK = "buffalo_l"


class XformersIPAdapterUnifiedLoaderFaceID(ValidatesCombos, io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="XformersIPAdapterUnifiedLoaderFaceID",
            display_name="IP-Adapter Unified Loader FaceID (xformers)",
            category=CATEGORY,
            description="Finds the FaceID IP-Adapter for a preset, the CLIP vision model it needs (Plus variants) "
                        "and its FaceID LoRA by what the files are (tensor shapes read from their headers; any "
                        "file name works, names only break ties between same-shaped files), applies the LoRA to "
                        "the model with ComfyUI's own LoRA loader, and loads the InsightFace buffalo_l models "
                        "for face analysis. Connect the outputs to Apply xformers IP-Adapter FaceID.",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.5 or SDXL model: the adapter and LoRA are chosen to fit "
                                                "it. The FaceID LoRA is applied to a copy."),
                io.Combo.Input("preset", options=list(FACEID_PRESET_NAMES), default="FACEID PLUS V2",
                               tooltip="Which FaceID adapter: FACEID (4 tokens), FACEID PLUS / PLUS V2 (face "
                                       "embedding + CLIP vision of the face crop; V2 adds weight_faceidv2), "
                                       "FACEID PORTRAIT (16 tokens, several photos; no LoRA), FACEID PORTRAIT "
                                       "UNNORM (SDXL, strong; no LoRA)."),
                io.Float.Input("lora_strength", default=0.6, min=0.0, max=1.0, step=0.01,
                               tooltip="Strength of the FaceID LoRA on the model (FACEID and PLUS presets; the "
                                       "Portrait presets have no LoRA). 0 = no LoRA (then none is needed)."),
                io.Combo.Input("provider", options=list(PROVIDER_CHOICES), default="CPU",
                               tooltip="Where onnxruntime runs face analysis (as in Face Analysis Loader); one "
                                       "that cannot run here falls back to CPU, logged with the reason."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the preset's FaceID LoRA applied "
                                                              "at lora_strength (unchanged for Portrait presets)."),
                XformersIPAdapter.Output(display_name="ipadapter",
                                         tooltip="The preset's FaceID IP-Adapter: connect to Apply xformers "
                                                 "IP-Adapter FaceID."),
                io.ClipVision.Output(display_name="clip_vision",
                                     tooltip="The CLIP vision model (ViT-H) for Plus presets; nothing for the "
                                             "others, which do not use CLIP vision."),
                XformersFaceAnalysis.Output(display_name="face_analysis",
                                            tooltip="InsightFace buffalo_l face analysis on onnxruntime."),
            ],
        )

    @classmethod
    def execute(cls, model, preset: str, lora_strength: float, provider: str) -> io.NodeOutput:
        require_choice("preset", preset, list(FACEID_PRESET_NAMES))  # a linked value is unknown at validation
        require_choice("provider", provider, list(PROVIDER_CHOICES))
        if not 0.0 <= lora_strength <= 1.0:
            raise ValueError(f"lora_strength must be between 0 and 1; got {lora_strength}")
        rules = preset_named(preset, FACEID_PRESETS)
        choice = choose(rules, _model_sites(model), scan(FOLDER, ADAPTER), scan(CLIP_VISION_FOLDER, CLIP_VISION))
        _warn_on_name(choice)
        adapter = load_faceid_adapter(choice.adapter.path, rules)
        clip_vision = _load_clip_vision(choice.clip_vision.path) if choice.clip_vision is not None else None
        patched = apply_faceid_lora(model, rules, choice.adapter, lora_strength)
        face_analysis = load_pack(FACEID_MODEL_PACK, provider)
        logger.info("preset %r: %s%s", preset, adapter.describe(),
                    f" with {choice.clip_vision.describe()}" if choice.clip_vision is not None else "")
        return io.NodeOutput(patched, adapter, clip_vision, face_analysis)


def load_faceid_adapter(path: str, preset: FaceIDPreset) -> FaceIDAdapterModel:
    """The chosen file, read as the preset says: Plus or Plus V2 is the preset's choice (same shapes)."""
    adapter = load_ipadapter_file(path)
    if not isinstance(adapter, FaceIDAdapterModel):  # the choice was made from this file's own shapes
        raise ValueError(f"{path} is no longer a FaceID IP-Adapter: it changed on disk; run the graph again")
    return adapter.with_plus_v2(preset.plus_v2)


def lora_files() -> list[Identified]:
    """Every file in ComfyUI's loras folders, identified as FaceID LoRA or not (headers only, cached)."""
    return scan(LORA_FOLDER, FACEID_LORA)


def apply_faceid_lora(model, preset: FaceIDPreset, adapter: Identified, strength: float):
    """The model with the FaceID LoRA trained with `adapter` at `strength` (ComfyUI's load_lora_for_models, model
    only); the model itself where the preset has no LoRA or the strength is 0."""
    if not preset.lora or strength == 0.0:
        return model
    import comfy.sd
    import comfy.utils

    lora = choose_lora(preset, adapter, lora_files())
    weights = comfy.utils.load_torch_file(lora.path, safe_load=True)
    patched, _ = comfy.sd.load_lora_for_models(model, None, weights, strength, 0.0)
    logger.info("FaceID LoRA %s (%s) applied at %s", lora.name, lora.describe(), strength)
    return patched

