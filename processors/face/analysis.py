"""FaceAnalysis: detect, align and embed faces with an InsightFace model pack's ONNX files on onnxruntime.

A model pack is a folder ``<root>/models/<name>/`` (``buffalo_l``, ``antelopev2``) as InsightFace lays it out.
The detector and the recognizer are found by their input/output signatures (the usual file names are only
tried first), so renamed files work and the pack's other models (landmarks, gender/age) are ignored.

Colour order: the packs' networks were trained on RGB input (InsightFace reads images with OpenCV as BGR and its
``blobFromImage(..., swapRB=True)`` hands the networks RGB), and the FaceID adapters were trained on embeddings
computed that way. ``FaceAnalysis(channels="RGB")`` (default) does the same. ComfyUI_IPAdapter_plus passes
ComfyUI's RGB arrays to InsightFace unchanged, so its networks see BGR: ``channels="BGR"`` reproduces its
embeddings exactly.

Recognizer input: (v - 127.5) / 127.5 on 0..255 values, as InsightFace feeds the packs' ONNX recognizers
(w600k_r50, glintr100). Old MXNet-converted recognizers that normalise inside the graph are not supported.

onnxruntime is imported when a pack is loaded, never at import time, and is not a hard requirement of the pack
(users install ``onnxruntime`` or ``onnxruntime-gpu``; the two distributions clash, so we cannot pick for them).
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Sequence, Union

import numpy as np
import torch

from . import scrfd
from .align import estimate_norm, warp_affine

logger = logging.getLogger(__name__)

# Node choice -> onnxruntime execution provider.
PROVIDERS = {
    "CPU": "CPUExecutionProvider",
    "CUDA": "CUDAExecutionProvider",
    "ROCM": "ROCMExecutionProvider",
    "CoreML": "CoreMLExecutionProvider",
    "DirectML": "DmlExecutionProvider",
    "OpenVINO": "OpenVINOExecutionProvider",
}
PROVIDER_CHOICES = tuple(PROVIDERS)
# Which onnxruntime distribution carries each provider (for the "unavailable" reason).
PROVIDER_PACKAGES = {
    "CPU": "onnxruntime",
    "CUDA": "onnxruntime-gpu (instead of onnxruntime)",
    "ROCM": "a ROCm build of onnxruntime from AMD (recent onnxruntime releases list MIGraphX instead)",
    "CoreML": "onnxruntime on macOS",
    "DirectML": "onnxruntime-directml (Windows, instead of onnxruntime)",
    "OpenVINO": "onnxruntime-openvino (instead of onnxruntime)",
}
# Pack name -> (detector file, recognizer file) as the packs ship them; tried first, signatures decide.
MODEL_PACKS = {
    "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx"),
    "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx"),
}
# The packs' other models (3D/2D landmarks, gender/age): never opened.
KNOWN_OTHER_MODELS = ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx")
RECOGNIZER_SIZE = 112
ARCFACE_MEAN = 127.5
ARCFACE_STD = 127.5
CHANNEL_ORDERS = ("RGB", "BGR")
INSTALL_HINT = ("install it with the Python that runs ComfyUI: `python -m pip install onnxruntime` "
                "(CPU, macOS CoreML), or `python -m pip install onnxruntime-gpu` for NVIDIA CUDA (never both)")


class FaceAnalysisError(RuntimeError):
    """Face analysis cannot be set up or run; the message says what to do."""


class OnnxRuntimeMissingError(FaceAnalysisError, ImportError):
    """onnxruntime is not installed (or does not import)."""


class ModelPackError(FaceAnalysisError, FileNotFoundError):
    """The model pack folder is missing, or lacks a usable detector or recognizer."""


def import_onnxruntime() -> ModuleType:
    """onnxruntime, or OnnxRuntimeMissingError naming the pip command."""
    try:
        return importlib.import_module("onnxruntime")
    except ImportError as error:
        raise OnnxRuntimeMissingError(f"face analysis needs onnxruntime, which cannot be imported ({error}); "
                                      f"{INSTALL_HINT}") from error


def providers_report() -> dict:
    """Every provider choice with availability: {"onnxruntime": version or None, "problem": "" or why
    onnxruntime is unusable, "providers": [{"name", "onnx_name", "available", "reason"}]} (reason "" when
    available). Available = listed by onnxruntime.get_available_providers() of the installed build."""
    try:
        ort = import_onnxruntime()
    except OnnxRuntimeMissingError as error:
        return {"onnxruntime": None, "problem": str(error),
                "providers": [{"name": n, "onnx_name": p, "available": False, "reason": "onnxruntime is not "
                               "installed"} for n, p in PROVIDERS.items()]}
    available = set(ort.get_available_providers())
    known = set(ort.get_all_providers()) if hasattr(ort, "get_all_providers") else set()
    version = getattr(ort, "__version__", "unknown")
    rows = []
    for name, onnx_name in PROVIDERS.items():
        reason = ""
        if onnx_name not in available:
            where = "is not built into this onnxruntime" if onnx_name in known else \
                "is not part of this onnxruntime version at all"
            reason = (f"{onnx_name} {where} (onnxruntime {version} offers: {', '.join(sorted(available))}); "
                      f"it comes with {PROVIDER_PACKAGES[name]}")
        rows.append({"name": name, "onnx_name": onnx_name, "available": not reason, "reason": reason})
    return {"onnxruntime": version, "problem": "", "providers": rows}


def resolve_provider(provider: str) -> tuple[str, str]:
    """(provider choice that will run, reason it is not the requested one or ""). An unavailable provider falls
    back to CPU, with the reason (logged by the caller); an unknown name is a ValueError."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {', '.join(PROVIDER_CHOICES)}, got {provider!r}")
    rows = {row["name"]: row for row in providers_report()["providers"]}
    if rows[provider]["available"]:
        return provider, ""
    return "CPU", rows[provider]["reason"]


@dataclass(frozen=True, eq=False)
class DetectedFace:
    """One face: `bbox` (x1, y1, x2, y2) and `kps` [5, 2] (eyes, nose, mouth corners; read-only float32) in
    image pixels, detector `score`, and `embedding` [512] float32 (the recognizer's raw output, on CPU)."""

    bbox: tuple[float, float, float, float]
    kps: np.ndarray
    score: float
    embedding: torch.Tensor

    @property
    def normed_embedding(self) -> torch.Tensor:
        """The embedding divided by its L2 norm (InsightFace's normed_embedding)."""
        return self.embedding / self.embedding.norm().clamp_min(1e-12)

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.bbox
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)


@dataclass(frozen=True)
class _Signature:
    input_name: str
    input_shape: tuple
    output_names: tuple[str, ...]
    output_shapes: tuple[tuple, ...]


def _signature(session: Any) -> _Signature:
    inputs, outputs = session.get_inputs(), session.get_outputs()
    return _Signature(inputs[0].name, tuple(inputs[0].shape) if len(inputs) == 1 else (),
                      tuple(o.name for o in outputs), tuple(tuple(o.shape) for o in outputs))


def _is_detector(sig: _Signature) -> bool:
    return len(sig.input_shape) == 4 and sig.input_shape[1] == 3 and len(sig.output_names) in scrfd.LAYOUTS


def _is_recognizer(sig: _Signature) -> bool:
    return (len(sig.input_shape) == 4 and tuple(sig.input_shape[1:]) == (3, RECOGNIZER_SIZE, RECOGNIZER_SIZE)
            and len(sig.output_names) == 1 and len(sig.output_shapes[0]) == 2 and sig.output_shapes[0][1] == 512)


def find_model_pack(name: str, roots: Iterable[Union[str, Path]]) -> Path:
    """The folder of pack `name`: the first ``<root>/models/<name>`` holding .onnx files (also one level deeper,
    ``<name>/<name>``, where an unpacked archive nests it). ModelPackError names every folder looked at and the
    files expected."""
    if name not in MODEL_PACKS:
        raise ValueError(f"model_name must be one of {', '.join(MODEL_PACKS)}, got {name!r}")
    looked: list[str] = []
    for root in roots:
        base = Path(root) / "models" / name
        for folder in (base, base / name):
            looked.append(str(folder))
            if folder.is_dir() and any(folder.glob("*.onnx")):
                return folder
    detector, recognizer = MODEL_PACKS[name]
    raise ModelPackError(
        f"InsightFace model pack '{name}' not found: looked in {', '.join(looked) or '(no insightface folder)'}. "
        f"Put the pack's files there: {detector} (face detector) and {recognizer} (face recognizer), e.g. "
        f"models/insightface/models/{name}/{detector}")


class FaceAnalysis:
    """Detector + recognizer sessions of one model pack on one provider. Immutable after construction; `analyze`
    may be called from several threads (onnxruntime sessions are thread-safe for run()).

    `provider` is a PROVIDER_CHOICES name; when onnxruntime cannot run it, CPU runs instead and `fallback_reason`
    says why (logged once here). `channels` is the colour order fed to the networks (see the module docstring).
    """

    __slots__ = ("pack_dir", "name", "provider_requested", "provider", "fallback_reason", "channels",
                 "detector_path", "recognizer_path", "ignored_files", "score_threshold", "nms_threshold",
                 "_detector", "_recognizer", "_det_sig", "_rec_sig", "_frozen")

    def __init__(self, pack_dir: Union[str, Path], provider: str = "CPU", *, channels: str = "RGB",
                 score_threshold: float = scrfd.SCORE_THRESHOLD, nms_threshold: float = scrfd.NMS_THRESHOLD):
        if channels not in CHANNEL_ORDERS:
            raise ValueError(f"channels must be 'RGB' or 'BGR', got {channels!r}")
        ort = import_onnxruntime()
        self.pack_dir = Path(pack_dir)
        self.name = self.pack_dir.name
        self.provider_requested = provider
        self.provider, self.fallback_reason = resolve_provider(provider)
        if self.fallback_reason:
            logger.warning("face analysis: provider %s unavailable, running on CPU: %s", provider,
                           self.fallback_reason)
        self.channels = channels
        self.score_threshold, self.nms_threshold = float(score_threshold), float(nms_threshold)
        detector, recognizer, self.ignored_files = _open_pack(ort, self.pack_dir, self.provider)
        self.detector_path, self._detector, self._det_sig = detector
        self.recognizer_path, self._recognizer, self._rec_sig = recognizer
        self._frozen = True

    def __setattr__(self, key: str, value: Any) -> None:
        if getattr(self, "_frozen", False):
            raise AttributeError(f"FaceAnalysis is immutable (tried to set {key})")
        object.__setattr__(self, key, value)

    def __repr__(self) -> str:
        return (f"FaceAnalysis({self.name}: {self.detector_path.name} + {self.recognizer_path.name}, "
                f"provider {self.provider}, channels {self.channels})")

    def describe(self) -> str:
        """One line for logs and the node UI."""
        text = f"{self.name} ({self.detector_path.name}, {self.recognizer_path.name}) on {self.provider}"
        return text + (f" (requested {self.provider_requested}: {self.fallback_reason})"
                       if self.fallback_reason else "")

    # -- detection -------------------------------------------------------------------------------------------
    def detect(self, image: torch.Tensor, det_size: int = scrfd.DEFAULT_INPUT_SIZE) -> scrfd.Detections:
        """Faces in `image` [H, W, 3] float 0..1 (RGB), best score first (no embeddings)."""
        return self._detect_pixels(_to_pixels(image), det_size)

    def _detect_pixels(self, pixels: torch.Tensor, det_size: int) -> scrfd.Detections:
        box = scrfd.letterbox(pixels, det_size, self.channels)
        outputs = self._detector.run(list(self._det_sig.output_names), {self._det_sig.input_name: box.tensor})
        return scrfd.postprocess(outputs, det_size, box.scale, self.score_threshold, self.nms_threshold)

    # -- recognition -----------------------------------------------------------------------------------------
    def embed_crops(self, crops_u8: torch.Tensor) -> torch.Tensor:
        """Raw ArcFace embeddings [N, 512] float32 of aligned 112x112 crops [N, 112, 112, 3] (RGB, values 0..255)."""
        chw = crops_u8.to(torch.float32).permute(0, 3, 1, 2)
        if self.channels == "BGR":
            chw = chw.flip(1)
        blob = ((chw - ARCFACE_MEAN) / ARCFACE_STD).contiguous().numpy()
        batch_dim = self._rec_sig.input_shape[0]
        if isinstance(batch_dim, int) and batch_dim != len(blob):  # fixed batch export: one crop per run
            outputs = [self._run_recognizer(blob[i:i + 1]) for i in range(len(blob))]
            return torch.from_numpy(np.concatenate(outputs)).to(torch.float32)
        return torch.from_numpy(self._run_recognizer(blob)).to(torch.float32)

    def _run_recognizer(self, blob: np.ndarray) -> np.ndarray:
        return np.asarray(self._recognizer.run(None, {self._rec_sig.input_name: blob})[0], dtype=np.float32)

    # -- the whole pipeline ----------------------------------------------------------------------------------
    def analyze(self, image: torch.Tensor, det_sizes: Sequence[int] = (scrfd.DEFAULT_INPUT_SIZE,)
                ) -> list[DetectedFace]:
        """Every face in `image` [H, W, 3] float 0..1 (RGB), largest box first (ties: higher score first), each
        with its embedding. Tries each of `det_sizes` in turn until one finds a face (ComfyUI_IPAdapter_plus tries
        640, 576, ..., 320: STANDARD_DET_SIZES). No face: an empty list."""
        pixels = _to_pixels(image)
        for size in det_sizes:
            found = self._detect_pixels(pixels, size)
            if len(found.scores):
                break
        else:
            return []
        crops = torch.stack([warp_affine(pixels, estimate_norm(kps, RECOGNIZER_SIZE), RECOGNIZER_SIZE)
                             for kps in found.kps]).round().clamp(0, 255)
        embeddings = self.embed_crops(crops)
        faces = []
        for box, score, kps, embedding in zip(found.boxes, found.scores, found.kps, embeddings):
            points = np.array(kps, dtype=np.float32)
            points.setflags(write=False)
            faces.append(DetectedFace(bbox=tuple(float(v) for v in box), kps=points, score=float(score),
                                      embedding=embedding.clone()))
        return sorted(faces, key=lambda face: (-face.area, -face.score))

    @staticmethod
    def aligned_crop(image: torch.Tensor, face: Union[DetectedFace, np.ndarray], size: int = 224) -> torch.Tensor:
        """The 5-point aligned crop [size, size, 3] of `face` (or its keypoints [5, 2]) from `image` [H, W, 3],
        same dtype and range as `image`: InsightFace's norm_crop (224 for SD1.5 FaceID Plus, 256 for SDXL)."""
        kps = face.kps if isinstance(face, DetectedFace) else np.asarray(face)
        _check_image(image)
        return warp_affine(image, estimate_norm(kps, size), size)


STANDARD_DET_SIZES = tuple(range(640, 256, -64))  # 640, 576, 512, 448, 384, 320


def _check_image(image: torch.Tensor) -> None:
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[-1] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"face analysis needs one RGB image [H, W, 3] with values 0..1, got {shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"face analysis got an empty image {tuple(image.shape)}")


def _to_pixels(image: torch.Tensor) -> torch.Tensor:
    """0..1 floats -> integer-valued float32 0..255 on CPU, truncating as ComfyUI's image-to-uint8 does."""
    _check_image(image)
    return (image.detach().to("cpu", torch.float32) * 255.0).clamp(0, 255).floor()


def _session(ort: ModuleType, path: Path, provider: str) -> Any:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # onnxruntime's own warnings about unused initialisers are noise here
    providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "CPU" else [])
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as error:  # onnxruntime raises its own exception types for unreadable models
        raise ModelPackError(f"{path} is not a model onnxruntime can load ({type(error).__name__}: {error}); "
                             "download it again") from error


def _open_pack(ort: ModuleType, folder: Path, provider: str):
    """((detector path, session, signature), (recognizer ...), ignored file names) for the pack in `folder`."""
    if not folder.is_dir():
        raise ModelPackError(f"model pack folder {folder} does not exist")
    expected = MODEL_PACKS.get(folder.name, ())
    files = sorted(folder.glob("*.onnx"), key=lambda p: (p.name not in expected, p.name))
    detector = recognizer = None
    ignored: list[str] = []
    for path in files:
        if path.name in KNOWN_OTHER_MODELS or (detector and recognizer):
            ignored.append(path.name)
            continue
        session = _session(ort, path, provider)
        sig = _signature(session)
        if detector is None and _is_detector(sig):
            detector = (path, session, sig)
        elif recognizer is None and _is_recognizer(sig):
            recognizer = (path, session, sig)
        else:
            ignored.append(path.name)
    missing = [what for what, got in (("a face detector (SCRFD with keypoints: input [1, 3, H, W], 9 or 15 "
                                       "outputs)", detector),
                                      ("a face recognizer (ArcFace: input [N, 3, 112, 112], output [N, 512])",
                                       recognizer)) if got is None]
    if missing:
        names = " and ".join(expected) if expected else "det_10g.onnx and w600k_r50.onnx (buffalo_l)"
        raise ModelPackError(f"model pack folder {folder} lacks {' and '.join(missing)}; it holds "
                             f"{', '.join(p.name for p in files) or 'no .onnx files'}. Expected {names}.")
    return detector, recognizer, tuple(ignored)


# -- bounded cache of loaded packs, shared by the loader nodes ---------------------------------------------------
_CACHE_SIZE = 4
_cache: "OrderedDict[tuple, FaceAnalysis]" = OrderedDict()
_cache_lock = threading.Lock()


def _pack_key(folder: Path, provider: str, channels: str) -> tuple:
    stats = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.glob("*.onnx")))
    return str(folder.resolve()), provider, channels, stats


def load_face_analysis(pack_dir: Union[str, Path], provider: str = "CPU", *, channels: str = "RGB"
                       ) -> FaceAnalysis:
    """A FaceAnalysis for the pack folder, cached per (folder, provider, channels, every .onnx file's size and
    mtime); at most 4 are kept (least recently used dropped). A changed file loads afresh."""
    folder = Path(pack_dir)
    if not folder.is_dir():
        raise ModelPackError(f"model pack folder {folder} does not exist")
    key = _pack_key(folder, provider, channels)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    analysis = FaceAnalysis(folder, provider, channels=channels)
    with _cache_lock:
        _cache[key] = analysis
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return analysis


def clear_cache() -> None:
    """Drop every cached FaceAnalysis (tests)."""
    with _cache_lock:
        _cache.clear()
