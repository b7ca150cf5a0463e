"""ApplyXformersIPAdapterAttention: condition a model on reference images through every attn2 site."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from comfy_api.latest import io

from ..processors.backends import AttentionOpConfig
from ..processors.ipadapter import (COMBINE_EMBEDS, EMBEDS_SCALING, AdapterKVCache, ImageTokens, IPAdapterModel,
                                    base_model_name, validate_against_sites)
from ..processors.ipadapter.enhance import MAX_ENHANCE_TILES, enhanced_image_tokens
from ..processors.masks import check_mask
from ..processors.weight_types import WEIGHT_TYPES, BlockWeight, block_weight, parse_layer_weights
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
                model_input(), ipadapter_input(), clip_vision_input(),
                io.Image.Input("image", tooltip="Reference image(s). Several images are combined as "
                                                "combine_embeds says. Non-square images are center-cropped."),
                weight_input("weight", "Strength of the image prompt (0 = no effect, negative = push away)."),
                weight_type_input(), *window_inputs(), combine_input("concat"), embeds_scaling_input(),
                attention_op_input(), attn_mask_input(), image_negative_input(), layer_weights_input(),
                io.Int.Input("enhance_tiles", default=1, min=1, max=MAX_ENHANCE_TILES, optional=True,
                             tooltip=ENHANCE_TILES_TOOLTIP),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def execute(cls, model, ipadapter, clip_vision, image, weight: float, weight_type: str, start_at: float,
                end_at: float, combine_embeds: str, embeds_scaling: str, attention_op=None, attn_mask=None,
                image_negative=None, layer_weights: str = "", enhance_tiles: int = 1) -> io.NodeOutput:
        from .families import APPLY_HANDLERS, family_handler  # families import this module's input helpers

        handler = family_handler(APPLY_HANDLERS, ipadapter)
        if handler is not None:
            if enhance_tiles != 1:
                raise ValueError(f"enhance_tiles must be 1 (off) for {type(ipadapter).__name__} adapters; it works "
                                 "with SD1.5/SDXL plus, plus face and full face adapters")
            return io.NodeOutput(handler(
                model=model, ipadapter=ipadapter, clip_vision=clip_vision, image=image, weight=weight,
                weight_type=weight_type, start_at=start_at, end_at=end_at, combine_embeds=combine_embeds,
                embeds_scaling=embeds_scaling, attention_op=attention_op, attn_mask=attn_mask,
                image_negative=image_negative, layer_weights=layer_weights))
        target = prepare_target(model, ipadapter, weight, start_at, end_at, attention_op, attn_mask)
        tokens = enhanced_image_tokens(ipadapter, lambda pixels: clip_vision.encode_image(pixels), image,
                                       image_negative, combine_embeds, enhance_tiles)
        return io.NodeOutput(apply_tokens(target, tokens, weight, weight_type, embeds_scaling, layer_weights))


# Inputs shared by Apply, Apply Embeds and Style & Composition: same names, ranges and tooltips everywhere.

def model_input() -> io.Model.Input:
    return io.Model.Input("model", tooltip="The diffusion model (SD1.5 or SDXL) to condition.")


def model_output() -> io.Model.Output:
    return io.Model.Output(display_name="model", tooltip="The model with the adapter applied.")


def ipadapter_input() -> XformersIPAdapter.Input:
    return XformersIPAdapter.Input("ipadapter", tooltip="From Load IP-Adapter Model (xformers).")


def clip_vision_input() -> io.ClipVision.Input:
    return io.ClipVision.Input("clip_vision", tooltip="The CLIP vision encoder this IP-Adapter was trained with "
                                                      "(ViT-H for most, ViT-bigG for SDXL base and vit-G).")


def weight_input(name: str, tooltip: str) -> io.Float.Input:
    return io.Float.Input(name, default=1.0, min=-1.0, max=5.0, step=0.05, tooltip=tooltip)


def weight_type_input() -> io.Combo.Input:
    return io.Combo.Input("weight_type", options=list(WEIGHT_TYPES), default="linear", tooltip=WEIGHT_TYPE_TOOLTIP)


def window_inputs() -> list[io.Float.Input]:
    return [io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.001,
                           tooltip="Fraction of the sampling schedule where the adapter starts acting."),
            io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.001,
                           tooltip="Fraction of the sampling schedule where the adapter stops acting.")]


def combine_input(default: str) -> io.Combo.Input:
    return io.Combo.Input("combine_embeds", options=list(COMBINE_EMBEDS), default=default,
                          tooltip="How several reference images combine: concat keeps all their tokens; add, "
                                  "subtract (first minus the others), average and norm average merge their CLIP "
                                  "embeddings into one.")


def embeds_scaling_input() -> io.Combo.Input:
    return io.Combo.Input("embeds_scaling", options=list(EMBEDS_SCALING), default="V only",
                          tooltip="Where the weight applies: V only scales the adapter's output (classic); K+V "
                                  "scales its keys and values; the C penalty variants scale by weight x "
                                  "width/1280; K+mean(V) scales only the mean of the values.")


def attention_op_input() -> AttentionOp.Input:
    return AttentionOp.Input("attention_op", optional=True,
                             tooltip="From Select Attention Op. Unconnected: the operator of Patch Model Attention "
                                     "(xformers) if the model has one, else 'auto'.")


def attn_mask_input() -> io.Mask.Input:
    return io.Mask.Input("attn_mask", optional=True,
                         tooltip="Where the adapter acts (white = full effect). Any size and aspect ratio: it is "
                                 "resized to each block's token grid.")


def image_negative_input() -> io.Image.Input:
    return io.Image.Input("image_negative", optional=True,
                          tooltip="Image(s) for the negative (unconditional) side. Default: zero embeddings for "
                                  "base adapters, a black image for plus/full-face adapters.")


ENHANCE_TILES_TOOLTIP = (
    "CLIP-vision enhancer: also cut each reference into N x N tiles, encode every tile at CLIP's full input size "
    "and pool their patch tokens back into one more encoding, fed after the plain one (combine_embeds mixes them). "
    "More detail from large references. 1 = off. Plus, plus face and full face adapters only (base adapters get "
    "a node error: their pooled embedding has no patch grid)."
)

LAYER_WEIGHTS_TOOLTIP = (
    "Optional per-block weights that replace the weight type's: 'index:weight, ...' (commas or new lines), the "
    "standard pack's Mad Scientist indices: one per UNet block with cross-attention, in forward order (SD1.5: "
    "0-5 input, 6 middle, 7-15 output; SDXL: 0-3 input, 4 middle, 5-10 output). Each is multiplied by weight; "
    "blocks not listed get no adapter. Empty: the weight type decides."
)


def layer_weights_input() -> io.String.Input:
    return io.String.Input("layer_weights", default="", multiline=True, optional=True, tooltip=LAYER_WEIGHTS_TOOLTIP)


@dataclass(frozen=True)
class Target:
    """A model and an adapter checked against each other, with the options every application shares."""

    model: Any
    ipadapter: IPAdapterModel
    sites: list[Attn2Site]
    mask: Optional[torch.Tensor]
    config: Optional[AttentionOpConfig]
    sigma_window: tuple[float, float]

    @property
    def sdxl(self) -> bool:
        return base_model_name(self.ipadapter.info.cross_attention_dim) == "SDXL"


def prepare_target(model, ipadapter, weight: float, start_at: float, end_at: float, attention_op,
                   attn_mask) -> Target:
    """Check the scalar inputs, the mask, the adapter against the model's sites and the operator (before any
    image is encoded, so a wrong model fails fast)."""
    _check_scalars(ipadapter, weight, start_at, end_at, attention_op)
    mask = check_mask(attn_mask) if attn_mask is not None else None
    sites = attn2_sites(model)
    validate_against_sites(ipadapter.info, sites, "the model")
    if attention_op is not None:
        check_operator(attention_op, model, masked=mask is not None)
    return Target(model, ipadapter, sites, mask, attention_op, _sigma_window(model, start_at, end_at))


def apply_tokens(target: Target, tokens: ImageTokens, weight: float, weight_type: str, embeds_scaling: str,
                 layer_weights: str = ""):
    """Apply and Apply Embeds past their inputs: per-block weights (weight type or layer_weights), one
    application, installed at every site. Returns the patched clone."""
    weights = site_weights(target, weight, weight_type, layer_weights)
    patched = install_application(target, tokens, weights, embeds_scaling)
    logger.info("applied %s at %d attn2 sites (weight %s, %s%s)", target.ipadapter.describe(), len(target.sites),
                weight, weight_type, ", layer_weights " + layer_weights.strip() if layer_weights.strip() else "")
    return patched


def site_weights(target: Target, weight: float, weight_type: str, layer_weights: str) -> list[BlockWeight]:
    """Each site's weight (and precise-mode swap): the weight type's curve, or `layer_weights` where given."""
    if not isinstance(layer_weights, str):
        raise TypeError(f"layer_weights must be a string 'index:weight, ...'; got {type(layer_weights).__name__}")
    layers = transformer_count(target.model)
    overrides = parse_layer_weights(layer_weights, layers)
    return [block_weight(weight_type, weight, s.transformer_index, layers, s.block, target.sdxl, overrides)
            for s in target.sites]


def install_application(target: Target, tokens: ImageTokens, weights: list[BlockWeight], embeds_scaling: str,
                        model=None):
    """One adapter application with per-site `weights`, installed on `model` (default: the target's model)."""
    application = AdapterApplication(
        kv=AdapterKVCache(target.ipadapter, tokens, [w.weight for w in weights], embeds_scaling),
        swaps=tuple(w.swap for w in weights),
        sigma_window=target.sigma_window,
        mask=target.mask,
        config=target.config,
        label=target.ipadapter.name,
    )
    return install(target.model if model is None else model, target.sites, application)


def _check_scalars(ipadapter, weight: float, start_at: float, end_at: float, attention_op) -> None:
    if not isinstance(ipadapter, IPAdapterModel):
        raise TypeError(f"ipadapter must come from Load IP-Adapter Model (xformers); got {type(ipadapter).__name__}")
    if not math.isfinite(weight):
        raise ValueError(f"weight must be a finite number; got {weight}")
    if not (math.isfinite(start_at) and math.isfinite(end_at) and 0.0 <= start_at <= end_at <= 1.0):
        raise ValueError(f"start_at and end_at must satisfy 0 <= start_at <= end_at <= 1; got {start_at}, {end_at}")
    if attention_op is not None and not isinstance(attention_op, AttentionOpConfig):
        raise TypeError("attention_op must come from Select Attention Op")


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
