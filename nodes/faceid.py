"""ApplyXformersIPAdapterFaceID: condition a model on a person's face with a FaceID IP-Adapter.

Faces come from the Face Analysis Loader (processors/face: detection, 5-point alignment, ArcFace embedding on
onnxruntime); the tokens from the FaceID projection (processors/ipadapter/faceid_adapter.py); everything after
that is Apply's own path (prepare_target -> apply_tokens -> install): same attn2 engine, K/V cache, weight types,
masks, operator choice and immutable patching.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

import torch
from comfy_api.latest import io

from ..processors.face import STANDARD_DET_SIZES, FaceAnalysis
from ..processors.ipadapter import check_image_batch, validate_clip_output
from ..processors.ipadapter.faceid import NORMED, USE_FACEID_NODE
from ..processors.ipadapter.faceid_adapter import FaceIDAdapterModel, faceid_tokens
from .apply import (apply_tokens, attention_op_input, attn_mask_input, combine_input, embeds_scaling_input,
                    model_input, model_output, prepare_target, weight_input, weight_type_input, window_inputs)
from .types import CATEGORY, XformersFaceAnalysis, XformersIPAdapter
from .validation import ValidatesCombos

logger = logging.getLogger(__name__)


class ApplyXformersIPAdapterFaceID(ValidatesCombos, io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ApplyXformersIPAdapterFaceID",
            display_name="Apply xformers IP-Adapter FaceID",
            category=CATEGORY,
            description="Keeps a person's face: finds the face in each reference image (largest one), embeds it "
                        "with the Face Analysis Loader's models and conditions the model through a FaceID "
                        "IP-Adapter (FaceID, FaceID Plus / Plus V2, Portrait, Portrait unnorm; read from the "
                        "file's shapes) at every cross-attention, middle block included. Plus variants also "
                        "encode the aligned face crop with CLIP vision. Use the matching FaceID LoRA (Unified "
                        "Loader FaceID applies it). The input model is never modified.",
            inputs=[
                model_input(),
                XformersIPAdapter.Input("ipadapter", tooltip="A FaceID IP-Adapter, from Load IP-Adapter Model "
                                                             "(xformers) or IP-Adapter Unified Loader FaceID."),
                XformersFaceAnalysis.Input("face_analysis", tooltip="From Face Analysis Loader (xformers) or the "
                                                                    "Unified Loader FaceID: finds and embeds faces."),
                io.Image.Input("image", tooltip="Reference photo(s) of the person. Each needs a face; with several "
                                                "faces the largest is used. Several images combine as "
                                                "combine_embeds says (Portrait: several photos of one person)."),
                weight_input("weight", "Strength of the face prompt (0 = no effect, negative = push away)."),
                io.Float.Input("weight_faceidv2", default=1.0, min=-1.0, max=5.0, step=0.05,
                               tooltip="FaceID Plus V2 only: how much of the face embedding's own tokens are "
                                       "added to the CLIP-refined ones (the V2 shortcut). No effect on other "
                                       "variants."),
                weight_type_input(), combine_input("concat"), *window_inputs(), embeds_scaling_input(),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="FaceID Plus and Plus V2 only (required there): the CLIP vision "
                                            "model (ViT-H) that encodes the aligned face crop."),
                io.Image.Input("image_negative", optional=True,
                               tooltip="FaceID Plus / Plus V2: image(s) whose CLIP encoding is the negative side "
                                       "(default: a black image). The face part of the negative is always a "
                                       "zero embedding, as in the standard pack; other variants ignore it."),
                attn_mask_input(), attention_op_input(),
            ],
            outputs=[model_output(),
                     io.Image.Output(display_name="face_image",
                                     tooltip="The aligned face crops that were used, one per reference image "
                                             "(224 px for SD1.5 adapters, 256 px for SDXL).")],
        )

    @classmethod
    def execute(cls, model, ipadapter, face_analysis, image, weight: float, weight_faceidv2: float,
                weight_type: str, combine_embeds: str, start_at: float, end_at: float, embeds_scaling: str,
                clip_vision=None, image_negative=None, attn_mask=None, attention_op=None) -> io.NodeOutput:
        _check_inputs(ipadapter, face_analysis, weight_faceidv2, clip_vision)
        target = prepare_target(model, ipadapter, weight, start_at, end_at, attention_op, attn_mask)
        faces, crops = analyze_faces(face_analysis, check_image_batch(image, "image"), ipadapter)
        clip_positive, clip_negative = _clip_features(ipadapter, clip_vision, crops, image_negative)
        tokens = faceid_tokens(ipadapter, faces, combine_embeds, clip_positive, clip_negative, weight_faceidv2)
        patched = apply_tokens(target, tokens, weight, weight_type, embeds_scaling)
        return io.NodeOutput(patched, crops)


def _check_inputs(ipadapter, face_analysis, weight_faceidv2: float, clip_vision) -> None:
    if not isinstance(ipadapter, FaceIDAdapterModel):
        what = ipadapter.describe() if hasattr(ipadapter, "describe") else type(ipadapter).__name__
        raise ValueError(f"ipadapter: {what} is not a FaceID IP-Adapter; use Apply xformers IP-Adapter Attention "
                         "for it, or load a FaceID adapter (ip-adapter-faceid*) here")
    if not isinstance(face_analysis, FaceAnalysis):
        raise TypeError(f"face_analysis must come from Face Analysis Loader (xformers); got "
                        f"{type(face_analysis).__name__}")
    if not math.isfinite(weight_faceidv2):
        raise ValueError(f"weight_faceidv2 must be a finite number; got {weight_faceidv2}")
    if ipadapter.info.needs_clip_vision and clip_vision is None:
        raise ValueError(f"clip_vision: {ipadapter.info.display_name} encodes the aligned face crop with CLIP "
                         f"vision: connect the CLIP vision model it was trained with ({ipadapter.info.clip_width}-d "
                         "hidden states: ViT-H, CLIP-ViT-H-14-laion2B-s32B-b79K)")


def analyze_faces(face_analysis: FaceAnalysis, images: torch.Tensor,
                  ipadapter: FaceIDAdapterModel) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings [n, 512] of the variant's kind, aligned crops [n, S, S, 3]): the largest face of each image.
    No face in an image is a node error naming it (1-based)."""
    embeddings, crops = [], []
    for i, picture in enumerate(images):
        found = face_analysis.analyze(picture, det_sizes=STANDARD_DET_SIZES)
        if not found:
            raise ValueError(f"image: no face found in image {i + 1} of {images.shape[0]} (counted from 1), even "
                             f"at smaller detector sizes: use a photo where the face is visible and not too small, "
                             "or crop closer to it")
        face = found[0]  # largest first
        if len(found) > 1:
            logger.info("image %d of %d: %d faces found; using the largest (box %s)", i + 1, images.shape[0],
                        len(found), tuple(round(v) for v in face.bbox))
        embedding = face.normed_embedding if ipadapter.info.face_embedding == NORMED else face.embedding
        embeddings.append(embedding.float().cpu())
        crops.append(FaceAnalysis.aligned_crop(picture, face, ipadapter.info.face_crop_size).cpu())
    return torch.stack(embeddings), torch.stack(crops)


def _clip_features(ipadapter: FaceIDAdapterModel, clip_vision, crops: torch.Tensor,
                   image_negative) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Plus: CLIP hidden states of the crops, and of image_negative or a black image (the standard pack's
    negative). Other variants: none (image_negative is not used, logged)."""
    if not ipadapter.info.needs_clip_vision:
        if image_negative is not None:
            logger.warning("image_negative is not used by %s adapters: their negative is a zero face embedding",
                           ipadapter.info.display_name)
        return None, None

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return validate_clip_output(ipadapter.info, clip_vision.encode_image(pixels)).float()

    negative = (check_image_batch(image_negative, "image_negative") if image_negative is not None
                else torch.zeros_like(crops[:1]))
    return encode(crops), encode(negative)


def refuse_faceid_adapter(**_inputs: Any) -> Any:
    """Apply / Apply Embeds handler for FaceID adapters (nodes/families.py): they need faces, not CLIP images."""
    raise ValueError(f"ipadapter: {USE_FACEID_NODE}")
