"""What a model file is (an IP-Adapter kind, a CLIP vision size), from its tensor shapes alone.

Only the file's index of tensors is read, never their data: for `.safetensors` the 8-byte little-endian header
length and the JSON header after it; for other files (`.bin`, `.pt`, ...) `torch.load(weights_only=True,
mmap=True)`, which unpickles only tensor records (never code) and maps the data without reading it. The
shapes become meta tensors, so the adapter rules are `detection.detect_adapter`'s own (one set of rules for
loaded and unloaded files). Results are cached per (path, size, mtime): an unchanged file is never read twice.
Nothing here ever writes to a model folder.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from ..tensor_cache import TensorCache
from .detection import AdapterInfo, detect_adapter
from .errors import IPAdapterError
from .faceid import faceid_lora_from_shapes
from .families import read_flux_adapter, read_sd3_adapter
from .weights import _NESTED_ALIASES, _PREFIXES, SAFETENSORS_SUFFIXES, normalize_layout

logger = logging.getLogger(__name__)

# A real header is at most a few MB (ViT-bigG: ~60 kB); anything larger is not a safetensors file.
MAX_HEADER_BYTES = 100 * 1024 * 1024
IDENTITY_CACHE_ENTRIES = 4096

_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_ADAPTER_PARTS = {p.rstrip(".") for p in _PREFIXES} | set(_NESTED_ALIASES)

Shapes = dict[str, tuple[torch.dtype, tuple[int, ...]]]


class UnreadableFile(IPAdapterError):
    """The file's tensor index could not be read (not a model file, truncated, unsafe)."""


# --- reading tensor shapes ------------------------------------------------------------------------------------

def _header_entry(key: str, value: Any) -> tuple[torch.dtype, tuple[int, ...], int]:
    if not (isinstance(value, dict) and isinstance(value.get("shape"), list) and "data_offsets" in value):
        raise UnreadableFile(f"header entry {key!r} is not a tensor record")
    dtype = _SAFETENSORS_DTYPES.get(value.get("dtype"))
    if dtype is None:
        raise UnreadableFile(f"tensor {key!r} has dtype {value.get('dtype')!r}, which torch cannot hold")
    shape = tuple(int(n) for n in value["shape"])
    start, end = (int(n) for n in value["data_offsets"])
    if not 0 <= start <= end:
        raise UnreadableFile(f"tensor {key!r} has data offsets {start}..{end}")
    return dtype, shape, end


def read_safetensors_shapes(path: str | Path, opener: Callable[..., Any] = open) -> Shapes:
    """{key: (dtype, shape)} from the safetensors header; reads 8 + header-length bytes and nothing else.

    Raises UnreadableFile when the file is not safetensors or its data is shorter than the header declares
    (an interrupted download)."""
    with opener(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise UnreadableFile(f"{size} bytes: too short to be a safetensors file")
        length = int.from_bytes(prefix, "little")
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise UnreadableFile(f"header length {length} does not fit the file ({size} bytes): not a safetensors "
                                 "file, or a truncated one")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise UnreadableFile(f"the header is not valid JSON ({exc}): not a safetensors file") from exc
    if not isinstance(header, dict):
        raise UnreadableFile("the header is not a JSON object: not a safetensors file")
    shapes: Shapes = {}
    data_end = 0
    for key, value in header.items():
        if key == "__metadata__":
            continue
        dtype, shape, end = _header_entry(key, value)
        shapes[key] = (dtype, shape)
        data_end = max(data_end, end)
    if 8 + length + data_end > size:
        raise UnreadableFile(f"truncated: the header declares {8 + length + data_end} bytes, the file has {size} "
                             "(an interrupted download?): re-download it")
    return shapes


def _flatten(tree: Mapping[str, Any], prefix: str, out: Shapes) -> None:
    for key, value in tree.items():
        if isinstance(value, torch.Tensor):
            out[prefix + str(key)] = (value.dtype, tuple(value.shape))
        elif isinstance(value, Mapping):
            _flatten(value, f"{prefix}{key}.", out)


def read_torch_shapes(path: str | Path) -> Shapes:
    """{key: (dtype, shape)} of a torch zip file (nested dicts flattened with dots), without reading tensor data:
    weights_only refuses anything but tensors and containers, mmap leaves the data on disk."""
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # UnpicklingError for code references, RuntimeError for legacy or broken archives
        raise UnreadableFile(f"not read: only tensor files in torch's zip format are identified "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); prefer .safetensors") from exc
    if not isinstance(data, Mapping):
        raise UnreadableFile(f"holds a {type(data).__name__}, not a dict of tensors")
    shapes: Shapes = {}
    _flatten(data, "", shapes)
    return shapes


def read_shapes(path: str | Path) -> Shapes:
    """The tensor index of a model file, by suffix: safetensors header, or a torch zip file's records."""
    if Path(path).suffix.lower() in SAFETENSORS_SUFFIXES:
        return read_safetensors_shapes(path)
    return read_torch_shapes(path)


def meta_tensors(shapes: Shapes) -> dict[str, torch.Tensor]:
    """Meta tensors (shape and dtype, no memory) for shape-only rules written for real tensors."""
    return {key: torch.empty(shape, dtype=dtype, device="meta") for key, (dtype, shape) in shapes.items()}


# --- IP-Adapters --------------------------------------------------------------------------------------------

def adapter_from_shapes(shapes: Shapes) -> AdapterInfo:
    """The AdapterInfo that loading the file would give (same rules: detect_adapter on meta tensors)."""
    tensors = meta_tensors(shapes)
    _refuse_dit_family(tensors)
    if not any(key.split(".", 1)[0] in _ADAPTER_PARTS for key in shapes):
        raise UnreadableFile("not an IP-Adapter (no image_proj / ip_adapter tensors)")
    return detect_adapter(normalize_layout(tensors))


def _refuse_dit_family(tensors: Mapping[str, torch.Tensor]) -> None:
    """A Flux or SD3.5 adapter is a real IP-Adapter, only not one a preset (SD1.5/SDXL) can use: say what it is
    instead of the attn2 detection's layout complaint (FaceID files go on to detect_adapter, which knows them).
    Both readers build on meta tensors without reading values."""
    for reader in (read_flux_adapter, read_sd3_adapter):
        model = reader(tensors, "file")
        if model is not None:
            raise UnreadableFile(f"{model.info.describe()}: the presets choose SD1.5/SDXL adapters; load this "
                                 "one with Load IP-Adapter Model (xformers)")


# --- CLIP vision ------------------------------------------------------------------------------------------

# (layers, hidden width, projection width) of the encoders ComfyUI's clip_vision.load has a config for. ComfyUI
# picks the config by the highest layer index present (47, 30, 22), so those counts are the ones it can load.
_CLIP_SIZES: dict[tuple[int, int], tuple[str, Optional[int]]] = {
    (48, 1664): ("ViT-bigG", 1280), (32, 1280): ("ViT-H", 1024), (24, 1024): ("ViT-L", 768),
}
_HF_LAYER = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm1\.weight$")
_OPENCLIP_LAYER = re.compile(r"^visual\.transformer\.resblocks\.(\d+)\.ln_1\.weight$")
_DINO_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.layer_scale2\.lambda1$")


@dataclass(frozen=True)
class ClipVisionInfo:
    """A CLIP vision encoder as read from its shapes: what it outputs, and how wide."""

    name: str                    # "ViT-L", "ViT-H", "ViT-bigG" (+ "-336" for 336 px ViT-L)
    layout: str                  # "HF" (vision_model.*) or "OpenCLIP" (visual.*)
    layers: int
    hidden_width: int            # penultimate_hidden_states width
    embeds_width: Optional[int]  # image_embeds width (projection); None without a projection
    image_size: int

    def output_width(self, clip_output: str) -> Optional[int]:
        return self.embeds_width if clip_output == "image_embeds" else self.hidden_width

    def fits(self, adapter: AdapterInfo) -> bool:
        """Whether this encoder's output is what `adapter` is fed with (kind and width)."""
        return self.output_width(adapter.clip_output) == adapter.clip_width

    def describe(self) -> str:
        embeds = f"{self.embeds_width}-d image_embeds" if self.embeds_width else "no image_embeds"
        return (f"CLIP vision {self.name} ({self.layers} layers, {embeds}, {self.hidden_width}-d hidden states, "
                f"{self.image_size} px, {self.layout} keys)")


def _layer_count(shapes: Shapes, pattern: re.Pattern) -> int:
    return 1 + max((int(m.group(1)) for k in shapes if (m := pattern.match(k))), default=-1)


def _dim(shapes: Shapes, key: str, axis: int) -> Optional[int]:
    entry = shapes.get(key)
    try:
        return int(entry[1][axis]) if entry is not None else None
    except IndexError:  # a tensor of fewer dims than the layout has: the caller reports the missing width
        return None


def _clip_geometry(shapes: Shapes) -> tuple[str, int, Optional[int], Optional[int], Optional[int], Optional[int]]:
    """layout, layers, hidden, projection, positions and patch size in either key layout ComfyUI loads."""
    layers = _layer_count(shapes, _HF_LAYER)
    if layers:
        return ("HF", layers, _dim(shapes, "vision_model.encoder.layers.0.layer_norm1.weight", 0),
                _dim(shapes, "visual_projection.weight", 0),
                _dim(shapes, "vision_model.embeddings.position_embedding.weight", 0),
                _dim(shapes, "vision_model.embeddings.patch_embedding.weight", -1))
    layers = _layer_count(shapes, _OPENCLIP_LAYER)
    if layers:  # ComfyUI converts these keys; the projection is stored transposed ([hidden, projection])
        return ("OpenCLIP", layers, _dim(shapes, "visual.transformer.resblocks.0.ln_1.weight", 0),
                _dim(shapes, "visual.proj", 1), _dim(shapes, "visual.positional_embedding", 0),
                _dim(shapes, "visual.conv1.weight", -1))
    if _layer_count(shapes, _DINO_LAYER):
        raise UnreadableFile("a DINOv2 image encoder: it has no CLIP output an IP-Adapter is fed with")
    raise UnreadableFile("not a CLIP vision model (no vision_model.* or visual.* encoder layers)")


def clip_vision_from_shapes(shapes: Shapes) -> ClipVisionInfo:
    layout, layers, hidden, projection, positions, patch = _clip_geometry(shapes)
    known = _CLIP_SIZES.get((layers, hidden or 0))
    if known is None:
        raise UnreadableFile(f"an image encoder with {layers} layers of width {hidden}, which ComfyUI's CLIP vision "
                             "loader has no configuration for (it loads ViT-L, ViT-H and ViT-bigG)")
    name, expected_projection = known
    if projection is not None and projection != expected_projection:
        raise UnreadableFile(f"a {name}-sized encoder whose projection is {projection}-d, not {expected_projection}: "
                             "ComfyUI cannot load it")
    image_size = int(round((positions - 1) ** 0.5)) * patch if positions and patch else 224
    if name == "ViT-L" and image_size != 224:
        name = f"ViT-L-{image_size}"
    return ClipVisionInfo(name=name, layout=layout, layers=layers, hidden_width=hidden, embeds_width=projection,
                          image_size=image_size)


# --- identification with a cache ---------------------------------------------------------------------------

ADAPTER, CLIP_VISION, FACEID_LORA = "ipadapter", "clip_vision", "faceid_lora"
_READERS: dict[str, Callable[[Shapes], Any]] = {ADAPTER: adapter_from_shapes, CLIP_VISION: clip_vision_from_shapes,
                                                FACEID_LORA: faceid_lora_from_shapes}


@dataclass(frozen=True)
class Identified:
    """One file of a model folder: what it is (`info`), or why it is not usable (`problem`)."""

    path: str
    name: str                      # as ComfyUI lists it (relative to its model folder)
    role: str                      # ADAPTER, CLIP_VISION or FACEID_LORA: what it was looked at as
    info: Any = None               # AdapterInfo / ClipVisionInfo / FaceIDLoraInfo; None when `problem` says why not
    problem: str = ""

    def describe(self) -> str:
        return self.info.describe() if self.info is not None else f"not usable: {self.problem}"


class FileIdentifier:
    """Identifies model files by shape, caching each answer under (role, path, size, mtime): a file that is
    replaced or edited gets a new key, an unchanged one is never read again (bounded LRU)."""

    def __init__(self, capacity: int = IDENTITY_CACHE_ENTRIES,
                 reader: Callable[[str | Path], Shapes] = read_shapes) -> None:
        self._cache = TensorCache("model file identification", capacity)
        self._reader = reader
        self.reads = 0  # files actually read (cache misses)

    def identify(self, path: str | Path, role: str, name: Optional[str] = None) -> Identified:
        path = os.path.abspath(path)
        name = name or os.path.basename(path)
        try:
            stat = os.stat(path)
        except OSError as exc:
            return Identified(path, name, role, problem=f"cannot be read ({exc.strerror})")
        found = self._cache.get((role, path, stat.st_size, stat.st_mtime_ns), lambda: self._read(path, role))
        info, problem = found
        return Identified(path, name, role, info=info, problem=problem)

    def _read(self, path: str, role: str) -> tuple[Any, str]:
        self.reads += 1
        try:
            return _READERS[role](self._reader(path)), ""
        except IPAdapterError as exc:
            return None, str(exc)
        except OSError as exc:
            return None, f"cannot be read ({exc.strerror or exc})"

    def __len__(self) -> int:
        return len(self._cache)

    def clear(self) -> None:
        self._cache.clear()
