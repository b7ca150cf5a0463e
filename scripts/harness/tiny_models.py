"""Tiny synthetic random-weight model files for host and e2e tests (no downloads).

Every tensor is filled here with a fixed seed (norm weights 1, norm biases 0, other biases 0, other
weights randn * std), saved as fp16 safetensors, and written only when missing (atomic rename), into
``<cache>/<ComfyUI model folder>/<file>``; the default cache is ``.cache/models/`` in the repo.

Layouts:

- ``diffusion_models/tiny_sd15_unet.safetensors``: one-level SD1.5 UNet that ComfyUI's UNETLoader
  detects as SD15; 4 attn2 sites (input 1, middle 0, output 0, output 1), inner dim 320, context 768.
- ``text_encoders/tiny_clip_l.safetensors``: full-size random CLIP-L text encoder (197 keys; a partial one
  encodes to NaN).
- ``clip_vision/random_vit_h.safetensors`` (default) or ``random_vit_l.safetensors``: full-size random
  CLIP vision model in the HF ``CLIPVisionModelWithProjection`` layout that the stock CLIPVisionLoader
  detects (it needs every layer at full width).
- ``vae_approx/taesd_{encoder,decoder}.safetensors``: random TAESD (VAELoader "taesd").
- ``ipadapter/tiny_sd15_base.safetensors`` (ImageProjModel, 4 tokens) and
  ``ipadapter/tiny_sd15_plus.safetensors`` (Resampler, 16 tokens) for the tiny UNet, sized for the
  generated CLIP vision model.
- FaceID adapters (``ipadapter/ip-adapter-faceid*_tiny_sd15.safetensors``), their LoRA (``loras/``) and the
  tiny InsightFace pack (``insightface/models/buffalo_l``): tiny_faceid.py.
"""
from __future__ import annotations

import json
import logging
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors.torch import save_file

from . import REPO_ROOT

log = logging.getLogger(__name__)

DEFAULT_CACHE = REPO_ROOT / ".cache" / "models"
SEED = 20240917
DTYPE = torch.float16
STD = 0.02

# (kind, shape) per key; kind is "norm" (weight 1 / bias 0), "zero", "randn" or "randn:<std>".
Layout = dict[str, tuple[str, tuple[int, ...]]]

# --- model geometry -----------------------------------------------------------------------------------

TINY_UNET_CONFIG = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1],
    channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=1,
    context_dim=768, num_heads=8, num_head_channels=-1, use_spatial_transformer=True, legacy=False,
    use_linear_in_transformer=False, adm_in_channels=None, use_temporal_attention=False,
    use_temporal_resblock=False,
)
TINY_UNET_ATTN2_SITES = (("input", 1, 0), ("middle", 0, 0), ("output", 0, 0), ("output", 1, 0))
TINY_UNET_INNER_DIM = 320
CROSS_ATTENTION_DIM = 768

CLIP_TEXT_L = dict(hidden=768, layers=12, intermediate=3072, vocab=49408, positions=77, projection=768)
CLIP_VISION = {
    # name: hidden, layers, intermediate, projection_dim (image_embeds width), patch, image size
    "vit-h": dict(hidden=1280, layers=32, intermediate=5120, projection=1024, patch=14, image=224),
    "vit-l": dict(hidden=1024, layers=24, intermediate=4096, projection=768, patch=14, image=224),
}
PLUS_RESAMPLER = dict(dim=64, depth=1, heads=1, dim_head=64, num_queries=16, ff_mult=4)


@dataclass
class TinyModels:
    """Where the generated files are, and the dimensions tests need to know."""

    root: Path
    clip_vision_kind: str
    files: dict[str, Path] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # seconds spent generating, per file

    @property
    def clip_embed_dim(self) -> int:  # CLIP vision image_embeds width (projection_dim)
        return CLIP_VISION[self.clip_vision_kind]["projection"]

    @property
    def clip_hidden_dim(self) -> int:  # CLIP vision hidden size (penultimate_hidden_states width)
        return CLIP_VISION[self.clip_vision_kind]["hidden"]

    def name(self, key: str) -> str:
        """File name as the ComfyUI loader combos list it (relative to its model folder)."""
        return self.files[key].name


# --- filling and saving ---------------------------------------------------------------------------------

def fill(layout: Layout, seed: int, dtype: torch.dtype = DTYPE) -> dict[str, torch.Tensor]:
    """Materialize a layout deterministically (keys in the given order, one generator)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, (kind, shape) in layout.items():
        if kind == "norm":
            t = torch.ones(shape) if key.endswith("weight") else torch.zeros(shape)
        elif kind == "zero":
            t = torch.zeros(shape)
        else:
            std = float(kind.split(":", 1)[1]) if ":" in kind else STD
            t = torch.randn(shape, generator=gen).mul_(std)
        out[key] = t.to(dtype).contiguous()
    return out


def _write(path: Path, build: Callable[[], dict[str, torch.Tensor]], timings: dict, force: bool = False) -> Path:
    if path.is_file() and not force:
        return path
    t0 = time.perf_counter()
    tensors = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    timings[path.name] = time.perf_counter() - t0
    log.info("generated %s (%.1f MB) in %.1f s", path, path.stat().st_size / 1e6, timings[path.name])
    return path


def _module_layout(module: torch.nn.Module, weight_kind: Callable[[str, torch.Tensor], str]) -> Layout:
    """Layout of a module built on the meta device; normalization layers get 1/0, biases 0."""
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    layout: Layout = {}
    for mod_name, mod in module.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            key = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(mod, norms):
                kind = "norm"
            elif p_name == "bias":
                kind = "zero"
            else:
                kind = weight_kind(key, p)
            layout[key] = (kind, tuple(p.shape))
    return layout


def _comfy():
    """Bootstrap ComfyUI in-process (generation builds ComfyUI's own modules on the meta device)."""
    from . import comfy_bootstrap

    comfy_bootstrap.bootstrap()


# --- layouts --------------------------------------------------------------------------------------------

def tiny_unet_layout(config: dict | None = None) -> Layout:
    _comfy()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    cfg = dict(TINY_UNET_CONFIG if config is None else config)
    unet = UNetModel(**cfg, device="meta", operations=comfy.ops.manual_cast)
    return _module_layout(unet, lambda key, p: "randn")


def taesd_layout(part: str) -> Layout:
    """TAESD encoder or decoder; conv weights ~ N(0, 1/fan_in) so decoded images are not flat."""
    _comfy()
    from comfy.taesd import taesd

    with torch.device("meta"):
        module = taesd.Encoder() if part == "encoder" else taesd.Decoder()

    def kind(key, p):
        fan_in = p[0].numel() if p.ndim > 1 else 1
        return f"randn:{fan_in ** -0.5:.6g}"

    return _module_layout(module, kind)


def _clip_layers(prefix: str, layers: int, hidden: int, intermediate: int) -> Layout:
    layout: Layout = {}
    for i in range(layers):
        p = f"{prefix}encoder.layers.{i}."
        for ln in ("layer_norm1", "layer_norm2"):
            layout[p + ln + ".weight"] = ("norm", (hidden,))
            layout[p + ln + ".bias"] = ("norm", (hidden,))
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            layout[p + f"self_attn.{proj}.weight"] = ("randn", (hidden, hidden))
            layout[p + f"self_attn.{proj}.bias"] = ("zero", (hidden,))
        layout[p + "mlp.fc1.weight"] = ("randn", (intermediate, hidden))
        layout[p + "mlp.fc1.bias"] = ("zero", (intermediate,))
        layout[p + "mlp.fc2.weight"] = ("randn", (hidden, intermediate))
        layout[p + "mlp.fc2.bias"] = ("zero", (hidden,))
    return layout


def clip_text_l_layout() -> Layout:
    """HF CLIPTextModel (+ text_projection) key names, the layout ComfyUI's CLIPLoader reads for SD1.5."""
    c = CLIP_TEXT_L
    layout: Layout = {
        "text_model.embeddings.token_embedding.weight": ("randn", (c["vocab"], c["hidden"])),
        "text_model.embeddings.position_embedding.weight": ("randn:0.01", (c["positions"], c["hidden"])),
    }
    layout.update(_clip_layers("text_model.", c["layers"], c["hidden"], c["intermediate"]))
    layout["text_model.final_layer_norm.weight"] = ("norm", (c["hidden"],))
    layout["text_model.final_layer_norm.bias"] = ("norm", (c["hidden"],))
    layout["text_projection.weight"] = ("randn", (c["projection"], c["hidden"]))
    return layout


def clip_vision_layout(kind: str = "vit-h") -> Layout:
    """HF CLIPVisionModelWithProjection key names (``vision_model.*``, ``visual_projection.weight``).

    ComfyUI's clip_vision.load picks its config from ``vision_model.encoder.layers.{30,22}`` being present
    (ViT-H / ViT-L) and loads every other key by name, so the widths must be the real ones.
    """
    c = CLIP_VISION[kind]
    positions = (c["image"] // c["patch"]) ** 2 + 1
    layout: Layout = {
        "vision_model.embeddings.class_embedding": ("randn", (c["hidden"],)),
        "vision_model.embeddings.patch_embedding.weight": ("randn", (c["hidden"], 3, c["patch"], c["patch"])),
        "vision_model.embeddings.position_embedding.weight": ("randn", (positions, c["hidden"])),
        # "pre_layrnorm" is the real (misspelt) HF name
        "vision_model.pre_layrnorm.weight": ("norm", (c["hidden"],)),
        "vision_model.pre_layrnorm.bias": ("norm", (c["hidden"],)),
    }
    layout.update(_clip_layers("vision_model.", c["layers"], c["hidden"], c["intermediate"]))
    layout["vision_model.post_layernorm.weight"] = ("norm", (c["hidden"],))
    layout["vision_model.post_layernorm.bias"] = ("norm", (c["hidden"],))
    layout["visual_projection.weight"] = ("randn", (c["projection"], c["hidden"]))
    return layout


def _ip_layers(sites: int = len(TINY_UNET_ATTN2_SITES), inner: int = TINY_UNET_INNER_DIM,
               cross: int = CROSS_ATTENTION_DIM) -> Layout:
    """ip_adapter.{2i+1}.to_k_ip / to_v_ip for each attn2 site (original IP-Adapter numbering)."""
    layout: Layout = {}
    for i in range(sites):
        for name in ("to_k_ip", "to_v_ip"):
            layout[f"ip_adapter.{2 * i + 1}.{name}.weight"] = ("randn", (inner, cross))
    return layout


def ipadapter_base_layout(clip_embed_dim: int, tokens: int = 4, cross: int = CROSS_ATTENTION_DIM) -> Layout:
    """Original IP-Adapter (ImageProjModel: Linear(clip_embed_dim -> tokens*cross) + LayerNorm(cross))."""
    layout: Layout = {
        "image_proj.proj.weight": ("randn", (tokens * cross, clip_embed_dim)),
        "image_proj.proj.bias": ("zero", (tokens * cross,)),
        "image_proj.norm.weight": ("norm", (cross,)),
        "image_proj.norm.bias": ("norm", (cross,)),
    }
    layout.update(_ip_layers(cross=cross))
    return layout


def ipadapter_plus_layout(clip_hidden_dim: int, cross: int = CROSS_ATTENTION_DIM, **resampler) -> Layout:
    """IP-Adapter plus (original Resampler: latents, proj_in, depth x (PerceiverAttention, FeedForward),
    proj_out, norm_out). PerceiverAttention: to_q [heads*dim_head, dim], to_kv [2*heads*dim_head, dim],
    to_out [dim, heads*dim_head], all without bias; FeedForward: LayerNorm, Linear(dim, dim*mult), GELU,
    Linear(dim*mult, dim), without bias (keys .0, .1, .3)."""
    r = {**PLUS_RESAMPLER, **resampler}
    dim, inner, ff = r["dim"], r["heads"] * r["dim_head"], r["dim"] * r["ff_mult"]
    layout: Layout = {
        "image_proj.latents": ("randn", (1, r["num_queries"], dim)),
        "image_proj.proj_in.weight": ("randn", (dim, clip_hidden_dim)),
        "image_proj.proj_in.bias": ("zero", (dim,)),
    }
    for n in range(r["depth"]):
        p = f"image_proj.layers.{n}."
        for ln in ("0.norm1", "0.norm2", "1.0"):
            layout[p + ln + ".weight"] = ("norm", (dim,))
            layout[p + ln + ".bias"] = ("norm", (dim,))
        layout[p + "0.to_q.weight"] = ("randn", (inner, dim))
        layout[p + "0.to_kv.weight"] = ("randn", (2 * inner, dim))
        layout[p + "0.to_out.weight"] = ("randn", (dim, inner))
        layout[p + "1.1.weight"] = ("randn", (ff, dim))
        layout[p + "1.3.weight"] = ("randn", (dim, ff))
    layout["image_proj.proj_out.weight"] = ("randn", (cross, dim))
    layout["image_proj.proj_out.bias"] = ("zero", (cross,))
    layout["image_proj.norm_out.weight"] = ("norm", (cross,))
    layout["image_proj.norm_out.bias"] = ("norm", (cross,))
    layout.update(_ip_layers(cross=cross))
    return layout


# --- generation -----------------------------------------------------------------------------------------

def _seed(name: str) -> int:
    return SEED + zlib.crc32(name.encode())


def generate(root: Path | str | None = None, clip_vision: str = "vit-h", force: bool = False,
             only: Iterable[str] | None = None) -> TinyModels:
    """Write every tiny model that is missing under `root` (default .cache/models/) and describe them.

    `clip_vision`: "vit-h" (1024-d image_embeds, 1280-d hidden: what SD1.5 IP-Adapters use) or "vit-l"
    (768 / 1024, the smallest the stock CLIPVisionLoader accepts). The IP-Adapter files are sized for it
    (names get a ``_vit_l`` suffix for ViT-L). `only`: a subset of keys of TinyModels.files to generate.
    """
    root = Path(root) if root is not None else DEFAULT_CACHE
    models = TinyModels(root=root, clip_vision_kind=clip_vision)
    cv = clip_vision.replace("-", "_")
    suffix = "" if clip_vision == "vit-h" else "_" + cv  # the default keeps the plain names
    plan: dict[str, tuple[str, Callable[[], Layout]]] = {
        "unet": ("diffusion_models/tiny_sd15_unet.safetensors", tiny_unet_layout),
        "clip_l": ("text_encoders/tiny_clip_l.safetensors", clip_text_l_layout),
        "clip_vision": (f"clip_vision/random_{cv}.safetensors", lambda: clip_vision_layout(clip_vision)),
        "taesd_encoder": ("vae_approx/taesd_encoder.safetensors", lambda: taesd_layout("encoder")),
        "taesd_decoder": ("vae_approx/taesd_decoder.safetensors", lambda: taesd_layout("decoder")),
        "ipadapter_base": (f"ipadapter/tiny_sd15_base{suffix}.safetensors",
                           lambda: ipadapter_base_layout(models.clip_embed_dim)),
        "ipadapter_plus": (f"ipadapter/tiny_sd15_plus{suffix}.safetensors",
                           lambda: ipadapter_plus_layout(models.clip_hidden_dim)),
    }
    from .tiny_faceid import faceid_plan, write_face_models  # FaceID adapters, their LoRA and face models

    plan.update(faceid_plan(models.clip_hidden_dim))
    wanted = set(plan) if only is None else set(only)
    for key, (rel, layout_fn) in plan.items():
        path = root / rel
        models.files[key] = path
        if key in wanted:
            _write(path, lambda: fill(layout_fn(), _seed(rel)), models.timings, force=force)
    if only is None:
        write_face_models(root)
    return models


def write_extra_model_paths(yaml_path: Path | str, models_dir: Path | str, custom_nodes_dir: Path | str) -> Path:
    """extra_model_paths.yaml pointing ComfyUI's model folders at `models_dir` and loading the custom nodes
    found in `custom_nodes_dir`."""
    models_dir, custom_nodes_dir = Path(models_dir).resolve(), Path(custom_nodes_dir).resolve()
    folders = ("checkpoints", "diffusion_models", "text_encoders", "clip_vision", "vae", "vae_approx", "ipadapter",
               "loras", "insightface")
    # JSON strings are valid YAML scalars, so any path is quoted safely.
    lines = ["xformers_ipadapter_tests:", f"    base_path: {json.dumps(str(models_dir))}"]
    lines += [f"    {folder}: {json.dumps(folder)}" for folder in folders]
    lines.append(f"    custom_nodes: {json.dumps(str(custom_nodes_dir))}")
    path = Path(yaml_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path

