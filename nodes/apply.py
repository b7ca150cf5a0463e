"""ApplyXformersIPAdapterAttention: condition a model on reference images through every attn2 site."""

from __future__ import annotations

import logging
import math
from typing import Optional

from comfy_api.latest import io

from ..processors.backends import AttentionOpConfig
from ..processors.ipadapter import (COMBINE_EMBEDS, EMBEDS_SCALING, AdapterKVCache, IPAdapterModel, base_model_name,
                                    image_tokens, validate_against_sites)
from ..processors.masks import check_mask
from ..processors.weight_types import WEIGHT_TYPES, block_weight
from .patch import ALWAYS, AdapterApplication, IPAdapterAttn2Patch, release_caches_with_model
from .planning import check_operator, start_run_log
from .sites import Attn2Site, attn2_sites, transformer_count
from .types import CATEGORY, AttentionOp, XformersIPAdapter
from .validation import ValidatesCombos

logger = logging.getLogger(__name__)

CALLBACK_KEY = "xformers_ipadapter"

WEIGHT_TYPE_TOOLTIP = (
    "How the weight is spread over the UNet's blocks (input, middle, output), with the standard IP-Adapter "
    "pack's meanings: linear = the same everywhere; ease in/out = stronger at the input/output blocks; weak "
    "input/output/middle = x0.2 there; strong middle = x0.2 elsewhere; style transfer / composition = only "
    "InstantStyle's style / layout blocks; precise variants also push the other aspect away through the "
    "negative. The middle block really receives its weight here."
)


class ApplyXformersIPAdapterAttention(ValidatesCombos, io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ApplyXformersIPAdapterAttention",
            display_name="Apply xformers IP-Adapter Attention",
            category=CATEGORY,
            description="Conditions the model on reference images with an IP-Adapter: every cross-attention "
                        "of the UNet (middle block included) adds attention to the image tokens, computed on "
                        "xformers with the chosen operator or on PyTorch SDPA where xformers cannot run. "
                        "Chain several to combine adapters; the input model is never modified.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (SD1.5 or SDXL) to condition."),
                XformersIPAdapter.Input("ipadapter", tooltip="From Load IP-Adapter Model (xformers)."),
                io.ClipVision.Input("clip_vision", tooltip="The CLIP vision encoder this IP-Adapter was trained "
                                                           "with (ViT-H for most, ViT-bigG for SDXL base and vit-G)."),
                io.Image.Input("image", tooltip="Reference image(s). Several images are combined as "
                                                "combine_embeds says. Non-square images are center-cropped."),
                io.Float.Input("weight", default=1.0, min=-1.0, max=5.0, step=0.05,
                               tooltip="Strength of the image prompt (0 = no effect, negative = push away)."),
                io.Combo.Input("weight_type", options=list(WEIGHT_TYPES), default="linear",
                               tooltip=WEIGHT_TYPE_TOOLTIP),
                io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Fraction of the sampling schedule where the adapter starts acting."),
                io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Fraction of the sampling schedule where the adapter stops acting."),
                io.Combo.Input("combine_embeds", options=list(COMBINE_EMBEDS), default="concat",
                               tooltip="How several reference images combine: concat keeps all their tokens; "
                                       "add, subtract (first minus the others), average and norm average merge "
                                       "their CLIP embeddings into one."),
                io.Combo.Input("embeds_scaling", options=list(EMBEDS_SCALING), default="V only",
                               tooltip="Where the weight applies: V only scales the adapter's output (classic); "
                                       "K+V scales its keys and values; the C penalty variants scale by "
                                       "weight x width/1280; K+mean(V) scales only the mean of the values."),
                AttentionOp.Input("attention_op", optional=True,
                                  tooltip="From Select Attention Op. Unconnected: the operator of Patch Model "
                                          "Attention (xformers) if the model has one, else 'auto'."),
                io.Mask.Input("attn_mask", optional=True,
                              tooltip="Where the adapter acts (white = full effect). Any size and aspect ratio: "
                                      "it is resized to each block's token grid."),
                io.Image.Input("image_negative", optional=True,
                               tooltip="Image(s) for the negative (unconditional) side. Default: zero embeddings "
                                       "for base adapters, a black image for plus/full-face adapters."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with the adapter applied.")],
        )

    @classmethod
    def execute(cls, model, ipadapter, clip_vision, image, weight: float, weight_type: str, start_at: float,
                end_at: float, combine_embeds: str, embeds_scaling: str, attention_op=None, attn_mask=None,
                image_negative=None) -> io.NodeOutput:
        _check_scalars(ipadapter, weight, start_at, end_at, attention_op)
        mask = check_mask(attn_mask) if attn_mask is not None else None
        sites = attn2_sites(model)
        validate_against_sites(ipadapter.info, sites, "the model")
        if attention_op is not None:
            check_operator(attention_op, model, masked=mask is not None)
        tokens = image_tokens(ipadapter, lambda pixels: clip_vision.encode_image(pixels), image, image_negative,
                              combine_embeds)
        weights = _block_weights(model, sites, weight_type, weight, ipadapter.info.cross_attention_dim)
        application = AdapterApplication(
            kv=AdapterKVCache(ipadapter, tokens, [w.weight for w in weights], embeds_scaling),
            swaps=tuple(w.swap for w in weights),
            sigma_window=_sigma_window(model, start_at, end_at),
            mask=mask,
            config=attention_op,
            label=ipadapter.name,
        )
        patched = install(model, sites, application)
        logger.info("applied %s at %d attn2 sites (weight %s, %s)", ipadapter.describe(), len(sites), weight,
                    weight_type)
        return io.NodeOutput(patched)


def _check_scalars(ipadapter, weight: float, start_at: float, end_at: float, attention_op) -> None:
    if not isinstance(ipadapter, IPAdapterModel):
        raise TypeError(f"ipadapter must come from Load IP-Adapter Model (xformers); got {type(ipadapter).__name__}")
    if not math.isfinite(weight):
        raise ValueError(f"weight must be a finite number; got {weight}")
    if not (math.isfinite(start_at) and math.isfinite(end_at) and 0.0 <= start_at <= end_at <= 1.0):
        raise ValueError(f"start_at and end_at must satisfy 0 <= start_at <= end_at <= 1; got {start_at}, {end_at}")
    if attention_op is not None and not isinstance(attention_op, AttentionOpConfig):
        raise TypeError("attention_op must come from Select Attention Op")


def _block_weights(model, sites: list[Attn2Site], weight_type: str, weight: float, context_dim: int):
    layers = transformer_count(model)
    sdxl = base_model_name(context_dim) == "SDXL"
    return [block_weight(weight_type, weight, s.transformer_index, layers, s.block, sdxl) for s in sites]


def _sigma_window(model, start_at: float, end_at: float) -> tuple[float, float]:
    if start_at <= 0.0 and end_at >= 1.0:
        return ALWAYS
    sampling = model.get_model_object("model_sampling")
    return float(sampling.percent_to_sigma(start_at)), float(sampling.percent_to_sigma(end_at))


def install(model, sites: list[Attn2Site], application: AdapterApplication):
    """Clone the model and put a patch holding `application` at every site; upstream stays untouched."""
    patched = model.clone()
    existing = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for site in sites:
        current: Optional[object] = existing.get(site.key, existing.get(site.key[:2]))
        if getattr(current, "is_xformers_ipadapter_patch", False) and current.site == site:
            patch = current.with_application(application)
        else:
            patch = IPAdapterAttn2Patch(site, (application,), wrapped=current)
        patched.set_model_attn2_replace(patch, *site.key)
    start_run_log(patched)
    release_caches_with_model(patched)  # the adapters' caches follow the model: freed after runs and on unload
    return patched
