"""Flux.1 IP-Adapters (XLabs v1/v2, InstantX) behind Apply and Apply Embeds (handlers registered in families.py).

The adapter attaches through nodes/dit_patch.py (the host's dit replace hook and attention override); the maths
is processors/families/flux.py. The adapter's weights get a ModelPatcher of their own, returned by the block
patches' `models()`, so ComfyUI loads them with the model and offloads them under memory pressure.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional

import comfy.model_management
import comfy.model_patcher
import folder_paths
import torch

from ..processors.backends import AttentionOpConfig
from ..processors.families.dit import DIT_WEIGHT_TYPES, match_count, sequence_weights
from ..processors.families.flux import (INSTANTX, XLABS, FluxApplication, FluxGeometry, FluxIPAdapterModel,
                                        check_fits, encoder_error, tokens_for)
from ..processors.families.siglip import HEAD_KEYS, HEAD_PREFIX, SiglipPoolingHead
from ..processors.ipadapter.errors import IPAdapterInputError, IPAdapterMismatchError
from ..processors.ipadapter.tokens import check_combine, combine_embeddings
from ..processors.ipadapter.validation import check_image_batch
from ..processors.masks import check_mask
from .apply import _sigma_window
from .dit_patch import install_dit, record_latent_shape
from .patch import processor_for
from .planning import start_run_log

logger = logging.getLogger(__name__)

FINGERPRINT_KEY = "vision_model.post_layernorm.weight"
SIGLIP_FILE_HINT = (
    "Put google/siglip-so400m-patch14-384's model.safetensors (it holds the pooling head, vision_model.head.*) in "
    "models/clip_vision and load that file with Load CLIP Vision")


def flux_geometry(model) -> Optional[FluxGeometry]:
    """The Flux model's width, heads and blocks, or None when the model is not a Flux DiT."""
    from comfy.ldm.flux.model import Flux

    diffusion = model.get_model_object("diffusion_model")
    if not isinstance(diffusion, Flux):
        return None
    return FluxGeometry(width=diffusion.hidden_size, heads=diffusion.num_heads, doubles=len(diffusion.double_blocks),
                        singles=len(diffusion.single_blocks), patch_size=diffusion.patch_size)


def model_name(model) -> str:
    config = getattr(model.model, "model_config", None)
    return type(config).__name__ if config is not None else type(model.model).__name__


# ------------------------------------------------------------------------------------------------------------
# Encoding: CLIP ViT-L image_embeds (XLabs), SigLIP pooled output (InstantX)


def encode(adapter: FluxIPAdapterModel, clip_vision, image: torch.Tensor, label: str) -> torch.Tensor:
    """`[N, embed_dim]` float32 features of `image` as this adapter is fed."""
    info = adapter.info
    out = clip_vision.encode_image(check_image_batch(image, label))
    embeds = out["image_embeds"]
    if info.kind == XLABS:
        if embeds.ndim != 2:
            raise encoder_error(info, embeds.shape[-1], "token sequences (a SigLIP model, not CLIP)")
        if embeds.shape[-1] != info.embed_dim:
            raise encoder_error(info, embeds.shape[-1], "image_embeds")
        return embeds.float()
    if embeds.ndim == 2:  # CLIP models give projected vectors; SigLIP gives its token sequence
        raise encoder_error(info, embeds.shape[-1], "CLIP image_embeds (not SigLIP)")
    tokens = out["last_hidden_state"]
    if tokens.shape[-1] != info.embed_dim:
        raise encoder_error(info, tokens.shape[-1], "SigLIP tokens")
    return siglip_head(clip_vision)(tokens).float()


_head_cache: dict[tuple[str, float], SiglipPoolingHead] = {}


def siglip_head(clip_vision) -> SiglipPoolingHead:
    """SigLIP's pooling head for this CLIP vision model: from its own weights when the host kept them, else from
    the file in models/clip_vision whose encoder is this one (matched by its final layernorm's weights, not the
    file name) and which holds the head."""
    state = clip_vision.model.state_dict()
    if all(HEAD_PREFIX + k in state for k in HEAD_KEYS):
        return SiglipPoolingHead({k: state[HEAD_PREFIX + k] for k in HEAD_KEYS})
    fingerprint = state.get(FINGERPRINT_KEY)
    if fingerprint is not None:
        for path in _clip_vision_files():
            head = _head_from_file(path, fingerprint)
            if head is not None:
                return head
    raise IPAdapterMismatchError(
        "the InstantX Flux IP-Adapter is fed SigLIP's pooled output, made by SigLIP's attention-pooling head "
        f"({HEAD_PREFIX}*); the CLIP vision model given to clip_vision has no such head (ComfyUI's loader keeps the "
        "encoder only) and no file in models/clip_vision holds this encoder together with its head. "
        f"{SIGLIP_FILE_HINT}.")


def _clip_vision_files() -> list[Path]:
    names = folder_paths.get_filename_list("clip_vision")
    paths = [folder_paths.get_full_path("clip_vision", n) for n in names if n.lower().endswith(".safetensors")]
    return [Path(p) for p in paths if p]


def _head_from_file(path: Path, fingerprint: torch.Tensor) -> Optional[SiglipPoolingHead]:
    from safetensors import safe_open

    key = (str(path), path.stat().st_mtime)
    if key in _head_cache:
        head = _head_cache[key]
        return head if head.fingerprint.equal(fingerprint.float().cpu()) else None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            keys = set(handle.keys())
            if HEAD_PREFIX + "probe" not in keys or FINGERPRINT_KEY not in keys:
                return None
            theirs = handle.get_tensor(FINGERPRINT_KEY)
            if theirs.to(fingerprint.dtype).cpu().ne(fingerprint.cpu()).any():
                return None
            head = SiglipPoolingHead({k: handle.get_tensor(HEAD_PREFIX + k) for k in HEAD_KEYS})
    except Exception as error:  # noqa: BLE001 (an unreadable neighbour file is not this node's error)
        logger.debug("skipped %s looking for a SigLIP head: %s", path, error)
        return None
    head.fingerprint = theirs.to(fingerprint.dtype).float().cpu()
    _head_cache[key] = head
    logger.info("SigLIP pooling head read from %s", path.name)
    return head


# ------------------------------------------------------------------------------------------------------------
# Apply and Apply Embeds


def adapter_patcher(adapter: FluxIPAdapterModel):
    """One ModelPatcher per loaded adapter (shared by every Apply using it), so model management moves it."""
    if adapter.host_handle is None:
        adapter.host_handle = comfy.model_patcher.ModelPatcher(
            adapter, load_device=comfy.model_management.get_torch_device(),
            offload_device=comfy.model_management.unet_offload_device())
    return adapter.host_handle


def _check_inputs(model, adapter: FluxIPAdapterModel, weight: float, start_at: float, end_at: float,
                  weight_type: str, embeds_scaling: str, attention_op) -> FluxGeometry:
    geometry = flux_geometry(model)
    check_fits(adapter.info, geometry, model_name(model))
    if not math.isfinite(weight):
        raise IPAdapterInputError(f"weight must be a finite number; got {weight}")
    if not (math.isfinite(start_at) and math.isfinite(end_at) and 0.0 <= start_at <= end_at <= 1.0):
        raise IPAdapterInputError(f"start_at and end_at must satisfy 0 <= start_at <= end_at <= 1; got {start_at}, "
                                  f"{end_at}")
    if weight_type not in DIT_WEIGHT_TYPES:
        raise IPAdapterInputError(
            f"weight_type {weight_type!r} has no meaning for Flux adapters (it names SD1.5/SDXL UNet blocks); choose "
            f"one of: {', '.join(DIT_WEIGHT_TYPES)}")
    if embeds_scaling != "V only":
        raise IPAdapterInputError(f"embeds_scaling must be 'V only' for Flux adapters (they scale the image "
                                  f"attention's output); got {embeds_scaling!r}")
    if attention_op is not None and not isinstance(attention_op, AttentionOpConfig):
        raise TypeError("attention_op must come from Select Attention Op")
    return geometry


def _block_weights(weight_type: str, weight: float, total: int, layer_weights: str) -> tuple[float, ...]:
    return sequence_weights(weight_type, weight, total, layer_weights, "Flux")


def install_flux(model, adapter: FluxIPAdapterModel, geometry: FluxGeometry, positive: torch.Tensor,
                 negative: torch.Tensor, weight: float, weight_type: str, start_at: float, end_at: float,
                 attention_op, attn_mask, layer_weights: str):
    """The patched clone: one FluxApplication at every block the adapter attends in."""
    total = geometry.doubles + (geometry.singles if adapter.info.includes_singles else 0)
    mask = check_mask(attn_mask) if attn_mask is not None else None
    application = FluxApplication(
        model=adapter, cond=tokens_for(adapter, positive), uncond=tokens_for(adapter, negative), geometry=geometry,
        weights=_block_weights(weight_type, weight, total, layer_weights),
        sigma_window=_sigma_window(model, start_at, end_at), mask=mask, config=attention_op,
        engine_for=processor_for, patcher=adapter_patcher(adapter))
    patched = install_dit(model, application)
    if mask is not None:
        record_latent_shape(patched)
    start_run_log(patched)
    logger.info("applied %s at %d blocks (weight %s, %s)", adapter.describe(), total, weight, weight_type)
    return patched


def apply_flux(*, model, ipadapter: FluxIPAdapterModel, clip_vision, image, weight: float, weight_type: str,
               start_at: float, end_at: float, combine_embeds: str, embeds_scaling: str, attention_op=None,
               attn_mask=None, image_negative=None, layer_weights: str = "") -> Any:
    """ApplyXformersIPAdapterAttention for a Flux adapter."""
    geometry = _check_inputs(model, ipadapter, weight, start_at, end_at, weight_type, embeds_scaling, attention_op)
    check_combine(combine_embeds)
    positive = combine_embeddings(encode(ipadapter, clip_vision, image, "image"), combine_embeds)
    if image_negative is not None:
        negative = combine_embeddings(encode(ipadapter, clip_vision, image_negative, "image_negative"),
                                      combine_embeds)
        negative = _match_count(negative, positive.shape[0])
    else:
        negative = torch.zeros_like(positive)  # zero embeddings: the default for image_embeds-fed adapters
    return install_flux(model, ipadapter, geometry, positive, negative, weight, weight_type, start_at, end_at,
                        attention_op, attn_mask, layer_weights)


def apply_flux_embeds(*, model, ipadapter: FluxIPAdapterModel, pos_embeds, weight: float, weight_type: str,
                      start_at: float, end_at: float, embeds_scaling: str, neg_embeds=None, attention_op=None,
                      attn_mask=None, layer_weights: str = "") -> Any:
    """ApplyXformersIPAdapterEmbeds for a Flux adapter: embeds are `[n, embed_dim]` vectors (image_embeds)."""
    geometry = _check_inputs(model, ipadapter, weight, start_at, end_at, weight_type, embeds_scaling, attention_op)
    positive = _embeds_tensor(ipadapter, pos_embeds, "pos_embeds")
    negative = torch.zeros_like(positive) if neg_embeds is None else \
        _match_count(_embeds_tensor(ipadapter, neg_embeds, "neg_embeds"), positive.shape[0])
    return install_flux(model, ipadapter, geometry, positive, negative, weight, weight_type, start_at, end_at,
                        attention_op, attn_mask, layer_weights)


def _embeds_tensor(adapter: FluxIPAdapterModel, embeds, label: str) -> torch.Tensor:
    tensor = getattr(embeds, "tensor", None)
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{label} must come from an IP-Adapter embeds node; got {type(embeds).__name__}")
    if tensor.ndim != 2 or tensor.shape[-1] != adapter.info.embed_dim:
        raise encoder_error(adapter.info, tensor.shape[-1], f"{label} (shape {tuple(tensor.shape)})")
    return tensor.float()


_match_count = match_count  # shared with SD3.5 (processors/families/dit.py)


FLUX_APPLY = {FluxIPAdapterModel: apply_flux}
FLUX_EMBEDS = {FluxIPAdapterModel: apply_flux_embeds}
__all__ = ["FLUX_APPLY", "FLUX_EMBEDS", "INSTANTX", "XLABS", "SIGLIP_FILE_HINT", "flux_geometry"]
