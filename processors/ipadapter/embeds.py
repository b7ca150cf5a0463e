"""IP-Adapter embeds: the CLIP vision features an adapter is fed with, as a value that can be combined,
saved, loaded and applied later (projection to image tokens happens when they are applied).

Like the standard pack's EMBEDS, the positive features already carry the Encoder's weight. Unlike them,
they say what they are (which CLIP vision output, its width), so embeds from another adapter kind are
refused by name instead of failing inside the projection, and they are saved as safetensors with that
description as metadata: nothing is ever unpickled.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from .detection import AdapterInfo, clip_encoder_name
from .errors import IPAdapterFileError, IPAdapterInputError, IPAdapterMismatchError
from .tokens import COMBINE_METHODS, check_combine, combine_embeddings
from .validation import CLIP_OUTPUTS, check_finite

FORMAT = "xformers_ipadapter_embeds"
FORMAT_VERSION = "1"
TENSOR_KEY = "embeds"
EMBEDS_SUFFIX = ".safetensors"
PICKLED_SUFFIXES = (".ipadpt", ".pt", ".pth", ".bin", ".ckpt", ".pkl")
# ComfyUI's CLIP preprocessing normalizes with these; a pixel equal to the mean is 0 after normalization.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_RE_ENCODE = ("re-encode the reference image with IP-Adapter Encoder (xformers) and save the embeds with "
              "Save IP-Adapter Embeds (xformers)")


@dataclass(frozen=True, eq=False)
class AdapterEmbeds:
    """CLIP vision features for an IP-Adapter: [n, W] `image_embeds` or [n, N, W] penultimate hidden states
    (float32, n images), plus what they are. `source` names the adapter kind they were encoded for (shown in
    messages and saved as metadata); it is not checked: any adapter fed by the same output and width fits."""

    tensor: torch.Tensor
    clip_output: str
    source: str = field(default="unknown adapter")

    def __post_init__(self) -> None:
        if self.clip_output not in CLIP_OUTPUTS:
            raise IPAdapterInputError(f"embeds: unknown CLIP vision output {self.clip_output!r}; expected one of "
                                      f"{', '.join(CLIP_OUTPUTS)}")
        dims = 2 if self.clip_output == "image_embeds" else 3
        if not isinstance(self.tensor, torch.Tensor) or self.tensor.dim() != dims or self.tensor.shape[0] == 0:
            shape = tuple(self.tensor.shape) if isinstance(self.tensor, torch.Tensor) else type(self.tensor).__name__
            raise IPAdapterInputError(f"embeds of '{self.clip_output}' must be a tensor with {dims} dims and at "
                                      f"least one image; got {shape}")
        if self.tensor.dtype != torch.float32:
            raise IPAdapterInputError(f"embeds must be float32; got {self.tensor.dtype}")

    @property
    def width(self) -> int:
        return int(self.tensor.shape[-1])

    @property
    def num_images(self) -> int:
        return int(self.tensor.shape[0])

    @property
    def encoder(self) -> str:
        return clip_encoder_name(self.width, self.clip_output) or "an unusual encoder"

    def describe(self) -> str:
        dims = "x".join(str(d) for d in self.tensor.shape)
        return f"{self.width}-d {self.clip_output} from {self.encoder} ({dims}, encoded for {self.source})"

    def replace_tensor(self, tensor: torch.Tensor) -> "AdapterEmbeds":
        return AdapterEmbeds(tensor, self.clip_output, self.source)


def embeds_for(info: AdapterInfo, features: torch.Tensor, source: str) -> AdapterEmbeds:
    return AdapterEmbeds(features.float(), info.clip_output, source)


def check_fits(embeds: AdapterEmbeds, info: AdapterInfo, label: str) -> torch.Tensor:
    """The features of `embeds` if the adapter `info` is fed with them; else an error naming both sides."""
    if embeds.clip_output != info.clip_output or embeds.width != info.clip_width:
        wanted = clip_encoder_name(info.clip_width, info.clip_output) or "an unusual encoder"
        raise IPAdapterMismatchError(
            f"{label} are {embeds.describe()}, but this IP-Adapter ({info.describe()}) is fed with "
            f"{info.clip_width}-d {info.clip_output} from {wanted}: encode the image with IP-Adapter Encoder "
            "(xformers) using this IP-Adapter and its CLIP vision model")
    return embeds.tensor


def weighted(embeds: AdapterEmbeds, weight: float) -> AdapterEmbeds:
    """The Encoder's weight, applied to the features as the standard pack does (weight 1 leaves them as they are)."""
    if not math.isfinite(weight):
        raise IPAdapterInputError(f"weight must be a finite number; got {weight}")
    return embeds if weight == 1.0 else embeds.replace_tensor(embeds.tensor * weight)


def combine(parts: Sequence[tuple[str, AdapterEmbeds]], method: str) -> AdapterEmbeds:
    """Stack every image of `parts` ((input name, embeds) in order) and combine them with `method`
    (`combine_embeddings`: concat keeps them all)."""
    check_combine(method, COMBINE_METHODS, "method")
    first_name, first = parts[0]
    for name, other in parts[1:]:
        if (other.clip_output, tuple(other.tensor.shape[1:])) != (first.clip_output, tuple(first.tensor.shape[1:])):
            raise IPAdapterMismatchError(f"{name} are {other.describe()}; {first_name} are {first.describe()}: "
                                         "embeds combine only when they come from the same CLIP vision output")
    if len(parts) == 1 and method == "concat":
        return first
    stacked = torch.cat([p.tensor for _, p in parts], dim=0)
    return first.replace_tensor(combine_embeddings(stacked, method))


def mask_clip_input(image: torch.Tensor, mask: torch.Tensor, mean: Sequence[float] = CLIP_MEAN) -> torch.Tensor:
    """Mask an IMAGE batch [B, H, W, C] before CLIP vision: where the mask is 0 the pixel becomes CLIP's mean
    colour, which normalization turns into 0, as the standard pack's encoder (it multiplies the normalized
    pixels by the mask). The mask [Bm, h, w] (Bm 1 or B) is resized to the image (stretched if its aspect differs)."""
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    if mask.dim() != 3 or mask.shape[0] not in (1, image.shape[0]) or mask.shape[1] == 0 or mask.shape[2] == 0:
        raise IPAdapterInputError(f"mask has shape {tuple(mask.shape)}; expected [1, H, W] or one mask per image "
                                  f"([{image.shape[0]}, H, W])")
    if not bool(torch.isfinite(mask).all()):
        raise IPAdapterInputError("mask contains NaN or infinite values")
    mask = mask.to(device=image.device, dtype=image.dtype).clamp(0.0, 1.0)
    if tuple(mask.shape[1:]) != tuple(image.shape[1:3]):
        mask = F.interpolate(mask.unsqueeze(1), size=tuple(image.shape[1:3]), mode="bilinear",
                             align_corners=False).squeeze(1)
    fill = torch.tensor(mean, device=image.device, dtype=image.dtype)[: image.shape[-1]]
    mask = mask.unsqueeze(-1)
    return image * mask + fill * (1.0 - mask)  # exact where the mask is 0 or 1


def metadata(embeds: AdapterEmbeds) -> dict[str, str]:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "clip_output": embeds.clip_output,
            "clip_width": str(embeds.width), "clip_encoder": embeds.encoder, "adapter": embeds.source,
            "shape": json.dumps(list(embeds.tensor.shape))}


def save_embeds(embeds: AdapterEmbeds, path: Path) -> None:
    """Write `embeds` as a safetensors file (the tensor bit for bit, float32) with `metadata`."""
    save_file({TENSOR_KEY: embeds.tensor.detach().cpu().contiguous()}, str(path), metadata=metadata(embeds))


def _refuse_pickles(path: Path) -> None:
    if path.suffix.lower() in PICKLED_SUFFIXES:
        raise IPAdapterFileError(
            f"{path.name} is a pickled file (e.g. from ComfyUI_IPAdapter_plus's IPAdapter Save Embeds); pickles "
            f"can run code when loaded and are never opened here: {_RE_ENCODE}")
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head[:2] == b"PK" or head[:1] == b"\x80":  # a torch.save zip archive, or a raw pickle stream
        raise IPAdapterFileError(f"{path.name} holds a pickle, not safetensors (a renamed torch.save file?); it "
                                 f"is never opened here: {_RE_ENCODE}")


def load_embeds(path: Path) -> AdapterEmbeds:
    """Read embeds saved by `save_embeds`; anything else (pickles included, never unpickled) is refused."""
    path = Path(path)
    _refuse_pickles(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            keys = list(handle.keys())
            tensor = handle.get_tensor(TENSOR_KEY) if keys == [TENSOR_KEY] else None
    except Exception as error:  # safetensors raises its own types for a malformed header
        raise IPAdapterFileError(f"{path.name} is not a readable safetensors file ({error}): {_RE_ENCODE}") from None
    if meta.get("format") != FORMAT or tensor is None:
        raise IPAdapterFileError(f"{path.name} holds no IP-Adapter embeds (no '{FORMAT}' metadata or not exactly "
                                 f"one '{TENSOR_KEY}' tensor): {_RE_ENCODE}")
    if meta.get("clip_width") != str(tensor.shape[-1]) or meta.get("shape") != json.dumps(list(tensor.shape)):
        raise IPAdapterFileError(f"{path.name}: its metadata ({meta.get('shape')}, width {meta.get('clip_width')}) "
                                 f"does not describe its tensor {list(tensor.shape)}: the file is damaged")
    try:
        embeds = AdapterEmbeds(tensor, meta.get("clip_output", ""), meta.get("adapter", "unknown adapter"))
    except IPAdapterInputError as error:
        raise IPAdapterFileError(f"{path.name}: {error}") from None
    check_finite(embeds.tensor, f"the embeds in {path.name}")
    return embeds

