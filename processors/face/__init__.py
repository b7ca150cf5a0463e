"""Face analysis without a compiled build: the InsightFace model pack's ONNX files run with onnxruntime.

Detection (SCRFD, scrfd.py), 5-point alignment (align.py) and the ArcFace embedding (analysis.py). Pure
numpy/torch plus onnxruntime, imported only when a pack is loaded; never imports ComfyUI or insightface.
"""

from .align import ARCFACE_TEMPLATE_112, arcface_template, estimate_norm, similarity_umeyama, warp_affine
from .analysis import (
    MODEL_PACKS,
    STANDARD_DET_SIZES,
    PROVIDER_CHOICES,
    DetectedFace,
    FaceAnalysis,
    FaceAnalysisError,
    ModelPackError,
    OnnxRuntimeMissingError,
    find_model_pack,
    load_face_analysis,
    providers_report,
)

__all__ = [
    "ARCFACE_TEMPLATE_112", "arcface_template", "estimate_norm", "similarity_umeyama", "warp_affine",
    "MODEL_PACKS", "STANDARD_DET_SIZES", "PROVIDER_CHOICES", "DetectedFace", "FaceAnalysis", "FaceAnalysisError", "ModelPackError",
    "OnnxRuntimeMissingError", "find_model_pack", "load_face_analysis", "providers_report",
]
