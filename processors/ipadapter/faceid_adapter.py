"""The loaded FaceID adapter and its image tokens (face embeddings, and for Plus the CLIP features of the crops).

A `FaceIDAdapterModel` is an `IPAdapterModel` (same per-site `to_k_ip`/`to_v_ip`, so the attn2 engine, the K/V
cache, weight types, masks and operator choice serve it unchanged) whose projection takes face embeddings;
the tokens it produces are ordinary `ImageTokens`. Shapes and variants: faceid.py.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from .errors import IPAdapterFileError, IPAdapterInputError
from .faceid import FACEID_PROJECTION_CLASSES, FaceIDInfo, detect_faceid, faceid_projection_config, plus_v2_from_name
from .tokens import ImageTokens, _resize_batch, check_combine, combine_embeddings
from .validation import check_finite
from .weights import IPAdapterModel, _check_finite, _load_strict, _site_linears, normalize_layout

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class FaceIDAdapterModel(IPAdapterModel):
    """A loaded FaceID IP-Adapter: `info` is a FaceIDInfo; `image_proj` takes face embeddings (Plus: and CLIP
    hidden states). Read-only, like every IPAdapterModel."""

    info: FaceIDInfo

    def with_plus_v2(self, plus_v2: bool) -> "FaceIDAdapterModel":
        """The same weights (shared, not copied) read as Plus (False) or Plus V2 (True)."""
        if self.info.variant != "faceid-plus" or self.info.plus_v2 == plus_v2:
            return self
        return dataclasses.replace(self, info=dataclasses.replace(self.info, plus_v2=plus_v2))


def nested_or_none(tensors: Mapping[str, Any]) -> Optional[dict[str, dict[str, torch.Tensor]]]:
    """The nested form of an adapter file's tensors, or None when they are no adapter layout at all (the SD
    path then reports what the file is)."""
    try:
        return normalize_layout(tensors)
    except IPAdapterFileError:
        return None


def faceid_from_state_dict(nested: Mapping[str, Mapping[str, torch.Tensor]], name: str) -> FaceIDAdapterModel:
    """Build a FaceIDAdapterModel (projection in float32, strict keys) from nested FaceID weights."""
    try:
        _check_finite(nested)
        info = detect_faceid(nested)
        if info is None:
            raise IPAdapterFileError("not a FaceID IP-Adapter layout")
        info = dataclasses.replace(info, plus_v2=plus_v2_from_name(info, name))
        projection, cfg = faceid_projection_config(nested["image_proj"])
        with torch.device("meta"):
            module = FACEID_PROJECTION_CLASSES[projection](**cfg)
        image_proj = _load_strict(module, nested["image_proj"], projection).float()
        model = FaceIDAdapterModel(info=info, image_proj=image_proj, to_k_ip=_site_linears(nested["ip_adapter"], "k"),
                                   to_v_ip=_site_linears(nested["ip_adapter"], "v"), name=name)
    except IPAdapterFileError as exc:
        raise IPAdapterFileError(f"{name}: {exc}") from exc
    logger.debug("built %s", model.describe())
    return model


def _check_faces(model: FaceIDAdapterModel, faces: torch.Tensor) -> torch.Tensor:
    if faces.dim() != 2 or faces.shape[0] == 0 or faces.shape[1] != model.info.face_width:
        raise IPAdapterInputError(f"face embeddings have shape {tuple(faces.shape)}; this FaceID adapter expects "
                                  f"[faces, {model.info.face_width}]")
    check_finite(faces, "the face embeddings")
    return faces.float().unsqueeze(1)  # [n, 1, W]: one embedding token per face, as the projections expect


@torch.no_grad()
def _project(model: FaceIDAdapterModel, faces: torch.Tensor, clip: Optional[torch.Tensor],
             shortcut_scale: Optional[float]) -> torch.Tensor:
    param = next(model.image_proj.parameters())
    faces = faces.to(device=param.device, dtype=torch.float32)
    if model.info.needs_clip_vision:
        clip = clip.to(device=param.device, dtype=torch.float32)
        tokens = model.image_proj(faces, clip, shortcut_scale)
    else:
        tokens = model.image_proj(faces)
    check_finite(tokens, "the projected face tokens")
    return tokens


def faceid_tokens(model: FaceIDAdapterModel, faces: torch.Tensor, combine: str = "concat",
                  clip_positive: Optional[torch.Tensor] = None, clip_negative: Optional[torch.Tensor] = None,
                  weight_faceidv2: float = 1.0) -> ImageTokens:
    """Cond/uncond tokens from n face embeddings [n, 512] (the variant's normed or raw embedding).

    As the standard pack: the embeddings (and for Plus the crops' CLIP hidden states) are combined over the
    faces by `combine` ("concat" keeps n x T tokens: Portrait's several faces); the uncond side is zero face
    embeddings, for Plus with `clip_negative` (image_negative's or a black image's hidden states, one row per
    face for concat, else its first row). Plus V2 adds the face tokens scaled by `weight_faceidv2`."""
    check_combine(combine)
    cond_faces = combine_embeddings(_check_faces(model, faces), combine)
    uncond_faces = torch.zeros_like(cond_faces)
    cond_clip = uncond_clip = None
    if model.info.needs_clip_vision:
        if clip_positive is None or clip_negative is None:
            raise IPAdapterInputError(f"{model.info.display_name} needs the CLIP vision features of the face crops")
        if clip_positive.shape[0] != faces.shape[0]:
            raise IPAdapterInputError(f"{clip_positive.shape[0]} CLIP feature rows for {faces.shape[0]} faces")
        cond_clip = combine_embeddings(clip_positive.float(), combine)
        uncond_clip = _resize_batch(clip_negative.float(), faces.shape[0]) if combine == "concat" else clip_negative[:1]
    scale = float(weight_faceidv2) if model.info.plus_v2 else None
    cond = _project(model, cond_faces, cond_clip, scale)
    uncond = _project(model, uncond_faces, uncond_clip, scale)
    return ImageTokens(cond=cond.reshape(1, -1, cond.shape[-1]), uncond=uncond.reshape(1, -1, uncond.shape[-1]),
                       tokens_per_image=cond.shape[1])
