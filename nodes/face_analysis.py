"""XformersFaceAnalysisLoader: an InsightFace model pack (detector + recognizer ONNX) on onnxruntime."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..processors.face import MODEL_PACKS, PROVIDER_CHOICES, FaceAnalysis, find_model_pack, load_face_analysis
from ..processors.face.analysis import FaceAnalysisError, ModelPackError, OnnxRuntimeMissingError
from .folders import register_insightface_folder
from .types import CATEGORY, XformersFaceAnalysis
from .validation import ValidatesCombos, require_choice

logger = logging.getLogger(__name__)


def load_pack(model_name: str, provider: str) -> FaceAnalysis:
    """The FaceAnalysis for pack `model_name` in ComfyUI's insightface folders on `provider` (cached per files'
    mtimes). Node errors name the input that is wrong; shared with Unified Loader FaceID."""
    require_choice("model_name", model_name, list(MODEL_PACKS))
    require_choice("provider", provider, list(PROVIDER_CHOICES))
    roots = register_insightface_folder()
    try:
        pack = find_model_pack(model_name, roots)
        analysis = load_face_analysis(pack, provider)
    except OnnxRuntimeMissingError as error:
        raise RuntimeError(f"Face Analysis Loader: {error}") from error
    except ModelPackError as error:
        raise FileNotFoundError(f"model_name '{model_name}': {error}") from error
    except FaceAnalysisError as error:
        raise RuntimeError(f"model_name '{model_name}': {error}") from error
    logger.info("face analysis: %s", analysis.describe())
    return analysis

class XformersFaceAnalysisLoader(ValidatesCombos, io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="XformersFaceAnalysisLoader",
            display_name="Face Analysis Loader (xformers)",
            category=CATEGORY,
            description="Loads an InsightFace model pack's face detector (SCRFD) and face recognizer (ArcFace) "
                        "from models/insightface/models/<model_name>/ and runs them with onnxruntime: no "
                        "insightface build needed. Needs `pip install onnxruntime` (or onnxruntime-gpu). "
                        "InsightFace's pretrained models are for non-commercial research use.",
            inputs=[
                io.Combo.Input("model_name", options=list(MODEL_PACKS), default="buffalo_l",
                               tooltip="The model pack folder in models/insightface/models/. buffalo_l (det_10g + "
                                       "w600k_r50) is what FaceID adapters were trained with; antelopev2 "
                                       "(scrfd_10g_bnkps + glintr100) is what InstantID uses."),
                io.Combo.Input("provider", options=list(PROVIDER_CHOICES), default="CPU",
                               tooltip="Where onnxruntime runs the models. CUDA needs onnxruntime-gpu, DirectML "
                                       "onnxruntime-directml, OpenVINO onnxruntime-openvino, CoreML macOS. One "
                                       "that this onnxruntime cannot run falls back to CPU, logged with the "
                                       "reason. Face analysis runs once per image, so CPU is usually fine."),
            ],
            outputs=[XformersFaceAnalysis.Output(display_name="face_analysis",
                                                 tooltip="Connect to Apply xformers IP-Adapter FaceID.")],
        )

    @classmethod
    def execute(cls, model_name: str, provider: str) -> io.NodeOutput:
        return io.NodeOutput(load_pack(model_name, provider))


__all__ = ["XformersFaceAnalysisLoader", "load_pack"]
