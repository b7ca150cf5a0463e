"""FaceID IP-Adapters: projection models in the original key layout and detection from tensor shapes.

The FaceID family conditions on an InsightFace (ArcFace) face embedding instead of, or besides, a CLIP image
embedding. The attention side is the ordinary IP-Adapter one (`{2i+1}.to_k_ip` / `to_v_ip` per attn2 site);
FaceID and FaceID Plus checkpoints also carry the weights of a LoRA for the UNet's attention
(`{n}.to_q_lora.down.weight`, ...), released separately as a ComfyUI LoRA file: those keys are read here only
to tell the variants apart and to know the LoRA's rank.

| variant                  | projection (image_proj keys)                        | tokens | fed with                        |
|--------------------------|-----------------------------------------------------|--------|---------------------------------|
| `faceid`                 | MLPProjModelFaceId: proj.0, proj.2, norm (+ LoRA)   | 4      | normed face embedding           |
| `faceid-portrait`        | MLPProjModelFaceId, no LoRA keys                    | 16     | normed face embedding, n faces  |
| `faceid-plus` (V1 / V2)  | ProjModelFaceIdPlus: proj, norm, perceiver_resampler.* | 4   | normed embedding + CLIP hidden states of the aligned face crop |
| `faceid-portrait-unnorm` | Resampler (latents ...) whose input is 512-d        | 16     | raw (unnormalised) embedding    |

Plus and Plus V2 have identical shapes: V2 adds the projected face tokens back as a shortcut,
`tokens = x + weight_faceidv2 * resampler(x, clip)`. Which one a file is cannot be read from it: see
`plus_v2_from_name` (the README's FaceID section explains the rule). Module attribute names are the file format: real
checkpoints load strict. Written from the published architecture (IP-Adapter's ip_adapter_faceid.py, the
Apache-2.0 diffusers IPAdapterFaceIDImageProjection / IPAdapterFaceIDPlusImageProjection).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import nn

from .detection import AdapterInfo, _site_shapes, base_model_name
from .errors import IPAdapterFileError
from .projection import RESAMPLER_DIM_HEAD, Resampler, _resampler_config, perceiver_layers, resample

# InsightFace's ArcFace recognizers (buffalo_l w600k_r50, antelopev2 glintr100) output 512-d embeddings.
FACE_EMBEDDING_DIM = 512
# Which InsightFace output a variant is fed with (DetectedFace attribute names).
NORMED, UNNORMED = "normed_embedding", "embedding"
# Side of the aligned face crop CLIP vision sees (the standard pack's norm_crop sizes): SD1.5 224, SDXL 256.
FACE_CROP_SIZE = {"SD1.5": 224, "SDXL": 256}
# A CLIP vision is not needed: FaceIDInfo.clip_output for the variants fed with the face embedding alone.
NO_CLIP = "none"
# What every path for CLIP-fed adapters says when it is given a FaceID adapter.
USE_FACEID_NODE = "this is a FaceID adapter: use Apply xformers IP-Adapter FaceID (with a Face Analysis Loader)"

_LORA_KEY = re.compile(r"^(\d+)\.to_(q|k|v|out)_lora\.(down|up)\.weight$")
VARIANT_NAMES = {"faceid": "FaceID", "faceid-plus": "FaceID Plus", "faceid-portrait": "FaceID Portrait",
                 "faceid-portrait-unnorm": "FaceID Portrait unnorm"}


# --- projection models ------------------------------------------------------------------------------------

def _id_mlp(id_dim: int, hidden: int, out: int) -> nn.Sequential:
    """The face-embedding MLP; a Sequential so its keys are `proj.0` and `proj.2` as in the files."""
    return nn.Sequential(nn.Linear(id_dim, hidden), nn.GELU(), nn.Linear(hidden, out))


class MLPProjModelFaceId(nn.Module):
    """FaceID and Portrait: face embedding -> MLP -> `num_tokens` tokens, each layer-normed."""

    def __init__(self, cross_attention_dim: int, id_embeddings_dim: int = FACE_EMBEDDING_DIM,
                 hidden_dim: int = 2 * FACE_EMBEDDING_DIM, num_tokens: int = 4) -> None:
        super().__init__()
        self.cross_attention_dim = cross_attention_dim
        self.num_tokens = num_tokens
        self.proj = _id_mlp(id_embeddings_dim, hidden_dim, cross_attention_dim * num_tokens)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, id_embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(id_embeds).reshape(-1, self.num_tokens, self.cross_attention_dim)
        return self.norm(tokens)


class FacePerceiverResampler(nn.Module):
    """The Plus resampler: the face tokens (as latents) attend to the CLIP hidden states of the face crop.

    Unlike the plus adapters' Resampler it has no learned latents: the caller passes them."""

    def __init__(self, dim: int, depth: int, dim_head: int, heads: int, embedding_dim: int, output_dim: int,
                 ff_mult: int = 4) -> None:
        super().__init__()
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = perceiver_layers(dim, depth, dim_head, heads, ff_mult)

    def forward(self, latents: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        latents = resample(self.layers, self.proj_in(hidden_states), latents)
        return self.norm_out(self.proj_out(latents))


class ProjModelFaceIdPlus(nn.Module):
    """FaceID Plus / Plus V2: face tokens refined by the CLIP hidden states of the aligned face crop."""

    def __init__(self, cross_attention_dim: int, id_embeddings_dim: int = FACE_EMBEDDING_DIM,
                 hidden_dim: int = 2 * FACE_EMBEDDING_DIM, clip_embeddings_dim: int = 1280, num_tokens: int = 4,
                 depth: int = 4, heads: Optional[int] = None, dim_head: int = RESAMPLER_DIM_HEAD,
                 ff_mult: int = 4) -> None:
        super().__init__()
        self.cross_attention_dim = cross_attention_dim
        self.num_tokens = num_tokens
        self.proj = _id_mlp(id_embeddings_dim, hidden_dim, cross_attention_dim * num_tokens)
        self.norm = nn.LayerNorm(cross_attention_dim)
        self.perceiver_resampler = FacePerceiverResampler(
            dim=cross_attention_dim, depth=depth, dim_head=dim_head,
            heads=heads if heads is not None else cross_attention_dim // dim_head,
            embedding_dim=clip_embeddings_dim, output_dim=cross_attention_dim, ff_mult=ff_mult)

    def forward(self, id_embeds: torch.Tensor, clip_embeds: torch.Tensor,
                shortcut_scale: Optional[float] = None) -> torch.Tensor:
        """`shortcut_scale` None: Plus (resampler output only); a number s: Plus V2, face tokens + s x output."""
        face = self.norm(self.proj(id_embeds).reshape(-1, self.num_tokens, self.cross_attention_dim))
        out = self.perceiver_resampler(face, clip_embeds)
        return out if shortcut_scale is None else face + shortcut_scale * out


FACEID_PROJECTION_CLASSES: dict[str, type[nn.Module]] = {
    cls.__name__: cls for cls in (MLPProjModelFaceId, ProjModelFaceIdPlus, Resampler)
}


# --- what a file is -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FaceIDInfo(AdapterInfo):
    """An AdapterInfo for the FaceID family. `clip_output`/`clip_width` describe the CLIP vision input (Plus:
    penultimate hidden states of the face crop; others: none, width 0), the face fields the InsightFace input."""

    face_embedding: str = NORMED         # DetectedFace attribute the projection is fed with
    face_width: int = FACE_EMBEDDING_DIM
    lora_rank: Optional[int] = None      # rank of the LoRA keys the file carries (FaceID, Plus); None without
    lora_modules: int = 0                # attention processors with LoRA keys (2 per attn2 site)
    plus_v2: bool = False                # Plus only: the shortcut scaled by weight_faceidv2

    @property
    def needs_clip_vision(self) -> bool:
        return self.clip_output != NO_CLIP

    @property
    def display_name(self) -> str:
        return VARIANT_NAMES[self.variant] + (" V2" if self.plus_v2 else "")

    @property
    def face_crop_size(self) -> int:
        return FACE_CROP_SIZE.get(self.base_model, 224)

    def describe(self) -> str:
        inputs = f"{self.face_width}-d {'normed' if self.face_embedding == NORMED else 'raw'} face embedding"
        if self.needs_clip_vision:
            inputs += (f" + {self.clip_width}-d CLIP {self.clip_encoder or 'vision'} hidden states of the "
                       f"{self.face_crop_size} px face crop")
        lora = f", LoRA rank {self.lora_rank}" if self.lora_rank else ""
        return (f"{self.base_model} {self.display_name} IP-Adapter ({self.projection}, {self.num_tokens} tokens, "
                f"{inputs}{lora}, cross-attention {self.cross_attention_dim}, {self.num_sites} sites)")


def is_faceid_layout(image_proj: Mapping[str, Any], ip_adapter: Mapping[str, Any]) -> bool:
    """Whether these weights are a FaceID adapter's (keys and shapes only)."""
    if "perceiver_resampler.proj_in.weight" in image_proj:
        return True
    if "proj.2.weight" in image_proj and "proj.3.weight" not in image_proj:
        return True
    return "latents" in image_proj and _input_width(image_proj, "proj_in.weight") == FACE_EMBEDDING_DIM


def _input_width(sd: Mapping[str, Any], key: str) -> Optional[int]:
    tensor = sd.get(key)
    return int(tensor.shape[-1]) if tensor is not None and tensor.dim() == 2 else None


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise IPAdapterFileError(f"FaceID image_proj weights lack '{key}'")
    return tuple(sd[key].shape)


def _mlp_config(sd: Mapping[str, Any]) -> dict[str, int]:
    hidden, id_dim = _shape(sd, "proj.0.weight")
    out_features = _shape(sd, "proj.2.weight")[0]
    cross = _shape(sd, "norm.weight")[0]
    if out_features % cross:
        raise IPAdapterFileError(f"proj.2.weight rows ({out_features}) are not a multiple of norm width ({cross})")
    return {"cross_attention_dim": cross, "id_embeddings_dim": id_dim, "hidden_dim": hidden,
            "num_tokens": out_features // cross}


def _plus_config(sd: Mapping[str, Any]) -> dict[str, int]:
    cfg = _mlp_config(sd)
    prefix = "perceiver_resampler."
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(rf"{prefix}layers\.(\d+)\.", k))), default=-1)
    inner = _shape(sd, prefix + "layers.0.0.to_q.weight")[0]
    ff_inner = _shape(sd, prefix + "layers.0.1.1.weight")[0]
    dim = cfg["cross_attention_dim"]
    if inner % RESAMPLER_DIM_HEAD or ff_inner % dim:
        raise IPAdapterFileError(f"unsupported FaceID Plus resampler widths (attention {inner}, feed-forward "
                                 f"{ff_inner}, tokens {dim})")
    output = _shape(sd, prefix + "proj_out.weight")[0]
    if output != dim:  # the V2 shortcut adds the face tokens to the resampler output
        raise IPAdapterFileError(f"FaceID Plus resampler outputs {output}-d tokens but its face tokens are {dim}-d")
    return {**cfg, "clip_embeddings_dim": _shape(sd, prefix + "proj_in.weight")[1], "depth": depth,
            "heads": inner // RESAMPLER_DIM_HEAD, "ff_mult": ff_inner // dim}


def faceid_projection_config(image_proj: Mapping[str, Any]) -> tuple[str, dict[str, int]]:
    """The FaceID projection class name and constructor arguments for these `image_proj` shapes."""
    if "perceiver_resampler.proj_in.weight" in image_proj:
        return "ProjModelFaceIdPlus", _plus_config(image_proj)
    if "latents" in image_proj:
        return "Resampler", _resampler_config(image_proj)
    return "MLPProjModelFaceId", _mlp_config(image_proj)


def _lora_shape(ip_adapter: Mapping[str, Any]) -> tuple[Optional[int], int]:
    """(rank, number of attention processors) of the LoRA keys in `ip_adapter`; (None, 0) without any."""
    ranks, processors = set(), set()
    for key, tensor in ip_adapter.items():
        m = _LORA_KEY.match(key)
        if m:
            processors.add(int(m.group(1)))
            ranks.add(int(tensor.shape[0] if m.group(3) == "down" else tensor.shape[1]))
    if len(ranks) > 1:
        raise IPAdapterFileError(f"the FaceID LoRA keys mix ranks {sorted(ranks)}")
    return (ranks.pop() if ranks else None), len(processors)


def _variant(projection: str, cfg: Mapping[str, int], lora_rank: Optional[int]) -> tuple[str, str, int, str, int]:
    """variant, face input, tokens, CLIP output and CLIP width."""
    if projection == "ProjModelFaceIdPlus":
        return "faceid-plus", NORMED, cfg["num_tokens"], "penultimate_hidden_states", cfg["clip_embeddings_dim"]
    if projection == "Resampler":
        return "faceid-portrait-unnorm", UNNORMED, cfg["num_queries"], NO_CLIP, 0
    # The standard pack's rule: the LoRA keys make it FaceID, their absence Portrait (16 tokens in the releases).
    variant = "faceid" if lora_rank is not None else "faceid-portrait"
    return variant, NORMED, cfg["num_tokens"], NO_CLIP, 0


def _token_width(projection: str, cfg: Mapping[str, int]) -> int:
    return cfg["output_dim"] if projection == "Resampler" else cfg["cross_attention_dim"]


def detect_faceid(state_dict: Mapping[str, Mapping[str, Any]]) -> Optional[FaceIDInfo]:
    """FaceIDInfo for a nested {"image_proj", "ip_adapter"} state dict, or None when it is no FaceID adapter.

    Reads shapes only (meta tensors work); raises IPAdapterFileError for a FaceID layout that is broken."""
    image_proj, ip_adapter = state_dict["image_proj"], state_dict["ip_adapter"]
    if not is_faceid_layout(image_proj, ip_adapter):
        return None
    projection, cfg = faceid_projection_config(image_proj)
    face_width = cfg["embedding_dim"] if projection == "Resampler" else cfg["id_embeddings_dim"]
    rank, processors = _lora_shape(ip_adapter)
    variant, face, tokens, clip_output, clip_width = _variant(projection, cfg, rank)
    inner, context = _site_shapes(ip_adapter)
    if _token_width(projection, cfg) != context:
        raise IPAdapterFileError(f"image_proj produces {_token_width(projection, cfg)}-d tokens but to_k_ip "
                                 f"expects {context}-d")
    base = base_model_name(context)
    return FaceIDInfo(variant=variant, projection=projection, num_tokens=tokens, clip_output=clip_output,
                      clip_width=clip_width, cross_attention_dim=context, num_sites=len(inner), base_model=base,
                      site_inner_dims=inner, face_embedding=face, face_width=face_width, lora_rank=rank,
                      lora_modules=processors, plus_v2=variant == "faceid-plus" and base == "SDXL")


def plus_v2_from_name(info: FaceIDInfo, file_name: str) -> bool:
    """Plus or Plus V2, which the shapes cannot tell. SDXL: always V2 (the only SDXL Plus released). SD1.5: V2
    when the file name says so ("v2" in it, e.g. ip-adapter-faceid-plusv2_sd15), the standard pack's rule."""
    if info.variant != "faceid-plus":
        return False
    return info.base_model == "SDXL" or "v2" in os.path.basename(file_name).lower()


def read_faceid(tensors: Mapping[str, Any], name: str) -> Optional[Any]:
    """families.READERS entry: a FaceIDAdapterModel when `tensors` are a FaceID adapter's, else None."""
    # weights.py imports families.py, which imports this module: the builder (which needs weights.py) is
    # imported when a file is read, not at import time.
    from .faceid_adapter import faceid_from_state_dict, nested_or_none

    nested = nested_or_none(tensors)
    if nested is None or not is_faceid_layout(nested["image_proj"], nested["ip_adapter"]):
        return None
    return faceid_from_state_dict(nested, name)


# --- the FaceID LoRA files (ComfyUI's `loras` folder) -------------------------------------------------------------

# A LoRA on one attention projection of the diffusers UNet, in the namings ComfyUI loads: kohya (the released
# files: lora_unet_<block>_attn1_to_out_0.lora_down.weight), PEFT (unet.<block>.attn1.to_out.0.lora_A.weight) and
# diffusers' older processor keys (unet.<block>.attn1.processor.to_out_lora.down.weight).
_LORA_FILE_KEY = re.compile(
    r"^(?:lora_unet_|unet\.)?(?P<block>[\w.]+?)[._]attn(?P<attn>[12])[._](?:processor\.)?to_(?P<proj>q|k|v|out)"
    r"(?:[._]0)?(?:_lora)?\.(?P<part>lora_down\.weight|lora_up\.weight|lora_A\.weight|lora_B\.weight|"
    r"lora\.down\.weight|lora\.up\.weight|down\.weight|up\.weight|alpha)$")
_LORA_DOWN = ("lora_down.weight", "lora_A.weight", "lora.down.weight", "down.weight")


@dataclass(frozen=True)
class FaceIDLoraInfo:
    """A FaceID LoRA as read from its shapes: LoRA on the UNet's attention projections only (q, k, v, out of
    every attn1 and attn2), as the released *_lora.safetensors files hold."""

    rank: int
    modules: int         # attention processors it covers (attn1 + attn2 of every transformer block)
    context_dim: int     # attn2 key/value input width: 768 SD1.5, 2048 SDXL

    @property
    def base_model(self) -> str:
        return base_model_name(self.context_dim)

    def fits(self, adapter: AdapterInfo) -> bool:
        """Whether this LoRA is the one trained with `adapter`: its LoRA keys' rank, processors and model."""
        return (isinstance(adapter, FaceIDInfo) and adapter.lora_rank == self.rank
                and adapter.lora_modules == self.modules and adapter.cross_attention_dim == self.context_dim)

    def describe(self) -> str:
        return (f"{self.base_model} FaceID LoRA (rank {self.rank}, {self.modules} attention layers, "
                f"cross-attention {self.context_dim})")


def faceid_lora_from_shapes(shapes: Mapping[str, tuple[Any, tuple[int, ...]]]) -> FaceIDLoraInfo:
    """FaceIDLoraInfo from a LoRA file's {key: (dtype, shape)}; IPAdapterFileError when it is another LoRA."""
    modules, ranks, contexts = set(), set(), set()
    for key, (_, shape) in shapes.items():
        m = _LORA_FILE_KEY.match(key)
        if m is None:
            raise IPAdapterFileError(f"not a FaceID LoRA: it has {key!r} (a FaceID LoRA holds only the UNet's "
                                     "attention q/k/v/out projections)")
        modules.add((m["block"].replace(".", "_"), m["attn"]))
        if m["part"] in _LORA_DOWN:
            ranks.add(shape[0])
            if m["attn"] == "2" and m["proj"] == "k":
                contexts.add(shape[1])
    if len(ranks) != 1 or len(contexts) != 1:
        raise IPAdapterFileError(f"not a FaceID LoRA: ranks {sorted(ranks)}, cross-attention widths "
                                 f"{sorted(contexts)} (one of each expected)")
    return FaceIDLoraInfo(rank=ranks.pop(), modules=len(modules), context_dim=contexts.pop())
