"""The embeds workflow: encode reference images once, combine, save, load and apply the CLIP features.

Apply Embeds runs the same path as Apply (nodes/apply.py `prepare_target` + `apply_tokens`): only where the
CLIP features come from differs, so Encoder -> Apply Embeds samples exactly as Apply does.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import folder_paths
import torch
from comfy_api.latest import io

from ..processors.ipadapter import (COMBINE_METHODS, ImageTokens, IPAdapterModel, check_image_batch,
                                    encode_embeddings, tokens_from_embeddings)
from ..processors.ipadapter.embeds import (EMBEDS_SUFFIX, AdapterEmbeds, check_fits, combine,
                                           embeds_for, load_embeds, mask_clip_input, save_embeds, weighted)
from .apply import (apply_tokens, attention_op_input, attn_mask_input, clip_vision_input, embeds_scaling_input,
                    ipadapter_input, layer_weights_input, model_input, model_output, prepare_target, weight_input,
                    weight_type_input, window_inputs)
from .types import CATEGORY, XformersIPAdapterEmbeds
from .validation import ValidatesCombos, require_choice

logger = logging.getLogger(__name__)

EMBEDS_CATEGORY = f"{CATEGORY}/embeds"
MAX_COMBINED = 5
LOAD_HINT = "a .safetensors file saved by Save IP-Adapter Embeds (xformers), copied into ComfyUI's input folder"


def _require_adapter(ipadapter) -> IPAdapterModel:
    if not isinstance(ipadapter, IPAdapterModel):
        raise TypeError(f"ipadapter must come from Load IP-Adapter Model (xformers); got {type(ipadapter).__name__}")
    return ipadapter


def _require_embeds(name: str, value) -> AdapterEmbeds:
    if not isinstance(value, AdapterEmbeds):
        raise TypeError(f"{name} must come from IP-Adapter Encoder, Combine Embeds or Load Embeds (xformers); got "
                        f"{type(value).__name__} (the standard pack's EMBEDS do not say what they are: re-encode)")
    return value


class XformersIPAdapterEncoder(ValidatesCombos, io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="XformersIPAdapterEncoder",
            display_name="IP-Adapter Encoder (xformers)",
            category=EMBEDS_CATEGORY,
            description="Encodes reference images with CLIP vision into the features this IP-Adapter is fed "
                        "with (image embeddings for base adapters, hidden states for plus and full-face), "
                        "multiplied by weight. Combine, save or apply them with the other embeds nodes.",
            inputs=[
                ipadapter_input(), clip_vision_input(),
                io.Image.Input("image", tooltip="Reference image(s); each gives one entry of the embeds."),
                io.Float.Input("weight", default=1.0, min=-1.0, max=3.0, step=0.01,
                               tooltip="Multiplies the positive embeds (as the standard pack's encoder does); "
                                       "useful to weigh images against each other before Combine Embeds."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Masks the CLIP input: black areas of the image are hidden from CLIP "
                                      "vision (replaced by CLIP's mean colour). One mask, or one per image."),
                io.Image.Input("image_negative", optional=True,
                               tooltip="Image(s) for neg_embeds. Default: zero embeddings for base adapters, "
                                       "a black image's hidden states for plus/full-face adapters."),
            ],
            outputs=[
                XformersIPAdapterEmbeds.Output(display_name="pos_embeds",
                                               tooltip="The images' CLIP features, times weight."),
                XformersIPAdapterEmbeds.Output(display_name="neg_embeds",
                                               tooltip="The negative side's CLIP features (not weighted)."),
            ],
        )

    @classmethod
    def execute(cls, ipadapter, clip_vision, image, weight: float, mask=None, image_negative=None) -> io.NodeOutput:
        from .families import ENCODER_HANDLERS, family_handler

        handler = family_handler(ENCODER_HANDLERS, ipadapter)
        if handler is not None:  # another family's features (e.g. SD3.5: SigLIP hidden states): (pos, neg)
            return io.NodeOutput(*handler(ipadapter=ipadapter, clip_vision=clip_vision, image=image, weight=weight,
                                          mask=mask, image_negative=image_negative))
        ipadapter = _require_adapter(ipadapter)
        image = check_image_batch(image, "image")
        clip_input = mask_clip_input(image, mask) if mask is not None else image
        positive, negative = encode_embeddings(ipadapter, lambda pixels: clip_vision.encode_image(pixels),
                                               clip_input, image_negative)
        pos = weighted(embeds_for(ipadapter.info, positive, ipadapter.info.describe()), weight)
        neg = embeds_for(ipadapter.info, negative, ipadapter.info.describe())
        logger.info("encoded %s", pos.describe())
        return io.NodeOutput(pos, neg)


class XformersIPAdapterCombineEmbeds(ValidatesCombos, io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        more = [XformersIPAdapterEmbeds.Input(f"embeds_{i}", optional=True,
                                              tooltip="More embeds, from the same kind of adapter.")
                for i in range(2, MAX_COMBINED + 1)]
        return io.Schema(
            node_id="XformersIPAdapterCombineEmbeds",
            display_name="IP-Adapter Combine Embeds (xformers)",
            category=EMBEDS_CATEGORY,
            description="Combines up to five embeds (every image of each) into one: concat keeps them all, "
                        "the other methods merge them into a single entry before projection.",
            inputs=[
                XformersIPAdapterEmbeds.Input("embeds_1", tooltip="Embeds from IP-Adapter Encoder or Load Embeds."),
                io.Combo.Input("method", options=list(COMBINE_METHODS), default="concat",
                               tooltip="concat keeps every image; add sums; subtract is the first minus the mean "
                                       "of the others; average; norm average divides each value by its norm "
                                       "across the images, then averages; max / min per value."),
                *more,
            ],
            outputs=[XformersIPAdapterEmbeds.Output(display_name="embeds", tooltip="The combined embeds.")],
        )

    @classmethod
    def execute(cls, embeds_1, method: str, **others) -> io.NodeOutput:
        parts = [("embeds_1", _require_embeds("embeds_1", embeds_1))]
        parts += [(name, _require_embeds(name, others[name])) for name in sorted(others) if others[name] is not None]
        return io.NodeOutput(combine(parts, method))


def embeds_tokens(ipadapter: IPAdapterModel, pos_embeds, neg_embeds) -> ImageTokens:
    """Image tokens from embeds, as Apply builds them from images with combine_embeds 'concat'."""
    positive = check_fits(_require_embeds("pos_embeds", pos_embeds), ipadapter.info, "pos_embeds")
    if neg_embeds is not None:
        negative = check_fits(_require_embeds("neg_embeds", neg_embeds), ipadapter.info, "neg_embeds")
    else:
        if ipadapter.info.clip_output != "image_embeds":
            logger.warning("neg_embeds not connected: zeros are the negative for this %s adapter; the original "
                           "uses a black image's hidden states (connect the Encoder's neg_embeds for that)",
                           ipadapter.info.variant)
        negative = torch.zeros_like(positive[:1])
    return tokens_from_embeddings(ipadapter, positive, negative, "concat")


class ApplyXformersIPAdapterEmbeds(ValidatesCombos, io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ApplyXformersIPAdapterEmbeds",
            display_name="Apply xformers IP-Adapter Embeds",
            category=EMBEDS_CATEGORY,
            description="Apply xformers IP-Adapter Attention for embeds instead of images: the same patching, "
                        "weights, window, mask and operator. The embeds must come from this kind of adapter "
                        "(same CLIP vision output and width).",
            inputs=[
                model_input(), ipadapter_input(),
                XformersIPAdapterEmbeds.Input("pos_embeds", tooltip="From IP-Adapter Encoder, Combine Embeds or "
                                                                    "Load Embeds (xformers)."),
                weight_input("weight", "Strength of the image prompt (0 = no effect, negative = push away)."),
                weight_type_input(), *window_inputs(), embeds_scaling_input(),
                XformersIPAdapterEmbeds.Input("neg_embeds", optional=True,
                                              tooltip="The Encoder's neg_embeds. Unconnected: zeros."),
                attention_op_input(), attn_mask_input(), layer_weights_input(),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def execute(cls, model, ipadapter, pos_embeds, weight: float, weight_type: str, start_at: float, end_at: float,
                embeds_scaling: str, neg_embeds=None, attention_op=None, attn_mask=None,
                layer_weights: str = "") -> io.NodeOutput:
        from .families import EMBEDS_HANDLERS, family_handler

        handler = family_handler(EMBEDS_HANDLERS, ipadapter)
        if handler is not None:
            return io.NodeOutput(handler(
                model=model, ipadapter=ipadapter, pos_embeds=pos_embeds, weight=weight, weight_type=weight_type,
                start_at=start_at, end_at=end_at, embeds_scaling=embeds_scaling, neg_embeds=neg_embeds,
                attention_op=attention_op, attn_mask=attn_mask, layer_weights=layer_weights))
        target = prepare_target(model, _require_adapter(ipadapter), weight, start_at, end_at, attention_op,
                                attn_mask)
        tokens = embeds_tokens(ipadapter, pos_embeds, neg_embeds)
        return io.NodeOutput(apply_tokens(target, tokens, weight, weight_type, embeds_scaling, layer_weights))


class SaveXformersIPAdapterEmbeds(ValidatesCombos, io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SaveXformersIPAdapterEmbeds",
            display_name="Save IP-Adapter Embeds (xformers)",
            category=EMBEDS_CATEGORY,
            description="Saves embeds as a .safetensors file in ComfyUI's output folder, with metadata naming "
                        "the CLIP vision output, width and adapter kind. Copy it to the input folder to load it.",
            inputs=[
                XformersIPAdapterEmbeds.Input("embeds", tooltip="The embeds to save."),
                io.String.Input("filename_prefix", default="ipadapter_embeds/embeds",
                                tooltip="File name start, relative to the output folder; a counter and "
                                        ".safetensors are appended."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, embeds, filename_prefix: str) -> io.NodeOutput:
        embeds = _require_embeds("embeds", embeds)
        folder, name, counter, _, _ = folder_paths.get_save_image_path(filename_prefix,
                                                                       folder_paths.get_output_directory())
        path = Path(folder) / f"{name}_{counter:05}_{EMBEDS_SUFFIX}"
        save_embeds(embeds, path)
        logger.info("saved %s to %s", embeds.describe(), path)
        return io.NodeOutput()


def embeds_files() -> list[str]:
    """Embeds files (and pickles, listed so that choosing one explains why it is refused) in the input folder."""
    root = folder_paths.get_input_directory()
    found = []
    for folder, _, files in os.walk(root):
        for file in files:
            if file.lower().endswith((EMBEDS_SUFFIX, ".ipadpt")):
                found.append(os.path.relpath(os.path.join(folder, file), root).replace(os.sep, "/"))
    return sorted(found)


class LoadXformersIPAdapterEmbeds(ValidatesCombos, io.ComfyNode):
    COMBO_HINTS = {"embeds_file": LOAD_HINT}

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoadXformersIPAdapterEmbeds",
            display_name="Load IP-Adapter Embeds (xformers)",
            category=EMBEDS_CATEGORY,
            description="Loads embeds saved by Save IP-Adapter Embeds (xformers) from ComfyUI's input folder. "
                        "Only safetensors: pickled files (the standard pack's .ipadpt) are refused, never opened.",
            inputs=[io.Combo.Input("embeds_file", options=embeds_files(),
                                   tooltip="A .safetensors embeds file in ComfyUI's input folder (subfolders too).")],
            outputs=[XformersIPAdapterEmbeds.Output(display_name="embeds", tooltip="The saved embeds, bit for bit.")],
        )

    @classmethod
    def execute(cls, embeds_file: str) -> io.NodeOutput:
        require_choice("embeds_file", embeds_file, embeds_files(), LOAD_HINT)
        embeds = load_embeds(Path(folder_paths.get_input_directory()) / embeds_file)
        logger.info("loaded %s from %s", embeds.describe(), embeds_file)
        return io.NodeOutput(embeds)

    @classmethod
    def fingerprint_inputs(cls, embeds_file: str) -> str:
        """Re-run when the file changes (ComfyUI caches the output otherwise)."""
        path = Path(folder_paths.get_input_directory()) / embeds_file
        stat = path.stat() if path.is_file() else None
        return f"{embeds_file}:{stat.st_size}:{stat.st_mtime_ns}" if stat else embeds_file


NODES = [XformersIPAdapterEncoder, XformersIPAdapterCombineEmbeds, ApplyXformersIPAdapterEmbeds,
         SaveXformersIPAdapterEmbeds, LoadXformersIPAdapterEmbeds]
