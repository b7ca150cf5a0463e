"""Synthetic FaceID IP-Adapters and FaceID LoRAs in the original key layouts (no downloads).

Layouts are written out here by hand from the releases' key names (h94/IP-Adapter-FaceID: nested
``image_proj`` / ``ip_adapter`` with ``{n}.to_{q,k,v,out}_lora.{down,up}.weight`` for every attention processor,
attn1 even, attn2 odd; the LoRA files in kohya naming ``lora_unet_<diffusers module>.lora_{down,up}.weight``),
never derived from the pack's modules, so strict loading is a real check.

- ``faceid_adapter_layout(kind, ...)``: kind "faceid" (MLP, 4 tokens, LoRA keys), "plus" (MLP + face
  perceiver, LoRA keys), "portrait" (MLP, 16 tokens), "portrait-unnorm" (Resampler fed by 512-d embeddings).
- ``faceid_lora_layout(unet_config, rank)``: the LoRA file for a UNet config, its module names from ComfyUI's
  own diffusers name map (``comfy.utils.unet_to_diffusers``), so ComfyUI's LoRA loader maps every key.
- ``faceid_plan`` / ``generate_faceid(root)``: tiny files for the tiny SD1.5 UNet (tiny_models.py) in ``ipadapter/``
  and ``loras/``; ``write_face_models(root)`` the tiny InsightFace pack (tiny_onnx.py). tiny_models.generate
  writes all of them, so the test servers' model folders hold what the FaceID example needs.
"""
from __future__ import annotations

import logging
import re
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import tiny_models as tm

log = logging.getLogger(__name__)

Shape = tuple[int, ...]
FACE_DIM = 512
LORA_RANK = 8
# attn2 inner dims in weight order (input, output, middle) of the released UNets.
SD15_INNER = (320, 320, 640, 640, 1280, 1280) + (1280,) * 3 + (640,) * 3 + (320,) * 3 + (1280,)
SDXL_INNER = (640,) * 4 + (1280,) * 20 + (1280,) * 30 + (640,) * 6 + (1280,) * 10
# Released FaceID Plus: perceiver width = cross-attention width, 4 layers, 64-d heads, feed-forward x4.
_LORA_MODULE = re.compile(r"\.attn[12]\.to_(q|k|v|out\.0)\.weight$")


def _mlp_shapes(cross: int, tokens: int, hidden: int = 2 * FACE_DIM) -> dict[str, Shape]:
    return {"proj.0.weight": (hidden, FACE_DIM), "proj.0.bias": (hidden,),
            "proj.2.weight": (cross * tokens, hidden), "proj.2.bias": (cross * tokens,),
            "norm.weight": (cross,), "norm.bias": (cross,)}


def _perceiver_shapes(prefix: str, dim: int, depth: int, inner: int, ff: int, clip: int, out: int,
                      latents: Optional[int] = None) -> dict[str, Shape]:
    shapes: dict[str, Shape] = {}
    if latents:
        shapes[prefix + "latents"] = (1, latents, dim)
    shapes.update({prefix + "proj_in.weight": (dim, clip), prefix + "proj_in.bias": (dim,),
                   prefix + "proj_out.weight": (out, dim), prefix + "proj_out.bias": (out,),
                   prefix + "norm_out.weight": (out,), prefix + "norm_out.bias": (out,)})
    for n in range(depth):
        a, f = f"{prefix}layers.{n}.0.", f"{prefix}layers.{n}.1."
        shapes.update({a + "norm1.weight": (dim,), a + "norm1.bias": (dim,), a + "norm2.weight": (dim,),
                       a + "norm2.bias": (dim,), a + "to_q.weight": (inner, dim), a + "to_kv.weight": (2 * inner, dim),
                       a + "to_out.weight": (dim, inner), f + "0.weight": (dim,), f + "0.bias": (dim,),
                       f + "1.weight": (ff, dim), f + "3.weight": (dim, ff)})
    return shapes


def image_proj_shapes(kind: str, cross: int, clip_hidden: int = 1280, depth: int = 4,
                      inner: Optional[int] = None, ff_mult: int = 4, resampler_dim: Optional[int] = None
                      ) -> dict[str, Shape]:
    """image_proj shapes of a FaceID kind; `inner`/`depth`/`ff_mult` shrink the perceivers for tiny files."""
    if kind in ("faceid", "portrait"):
        return _mlp_shapes(cross, 4 if kind == "faceid" else 16)
    if kind == "plus":
        shapes = _mlp_shapes(cross, 4)
        shapes.update(_perceiver_shapes("perceiver_resampler.", cross, depth, inner or cross, cross * ff_mult,
                                        clip_hidden, cross))
        return shapes
    if kind == "portrait-unnorm":  # released: Resampler of width 1280, 20 heads, 16 queries, for SDXL
        dim = resampler_dim or 1280
        return _perceiver_shapes("", dim, depth, inner or dim, dim * ff_mult, FACE_DIM, cross, latents=16)
    raise ValueError(f"unknown FaceID kind {kind!r}")


def ip_adapter_shapes(cross: int, inner_dims: Sequence[int], rank: Optional[int]) -> dict[str, Shape]:
    """`{2i+1}.to_k_ip/to_v_ip` per attn2 site; with `rank`, LoRA keys for every attention processor."""
    shapes: dict[str, Shape] = {}
    for i, inner in enumerate(inner_dims):
        if rank:
            for n, context in ((2 * i, inner), (2 * i + 1, cross)):  # attn1 (self), attn2 (cross)
                for proj, width in (("q", inner), ("k", context), ("v", context), ("out", inner)):
                    shapes[f"{n}.to_{proj}_lora.down.weight"] = (rank, width)
                    shapes[f"{n}.to_{proj}_lora.up.weight"] = (inner, rank)
        shapes[f"{2 * i + 1}.to_k_ip.weight"] = (inner, cross)
        shapes[f"{2 * i + 1}.to_v_ip.weight"] = (inner, cross)
    return shapes


def faceid_adapter_layout(kind: str, cross: int = tm.CROSS_ATTENTION_DIM,
                          inner_dims: Sequence[int] = (tm.TINY_UNET_INNER_DIM,) * len(tm.TINY_UNET_ATTN2_SITES),
                          rank: int = LORA_RANK, **proj) -> dict[str, Shape]:
    """Flat `image_proj.` / `ip_adapter.` shapes of a FaceID adapter (LoRA keys for faceid and plus)."""
    shapes = {f"image_proj.{k}": s for k, s in image_proj_shapes(kind, cross, **proj).items()}
    lora = rank if kind in ("faceid", "plus") else None
    shapes.update({f"ip_adapter.{k}": s for k, s in ip_adapter_shapes(cross, inner_dims, lora).items()})
    return shapes


_NORM_KEY = re.compile(r"(^|\.)(norm|norm_out|norm1|norm2|layers\.\d+\.1\.0)\.(weight|bias)$")


def tiny_layout(shapes: dict[str, Shape]) -> tm.Layout:
    """A tiny_models Layout (layer norms 1/0, biases 0, weights randn) for these shapes."""
    layout: tm.Layout = {}
    for key, shape in shapes.items():
        kind = "norm" if _NORM_KEY.search(key) else "zero" if key.endswith(".bias") else "randn"
        layout[key] = (kind, shape)
    return layout


def faceid_lora_layout(unet_config: Optional[dict] = None, rank: int = LORA_RANK) -> tm.Layout:
    """A FaceID LoRA file for this UNet: every attn1/attn2 q, k, v, out of every transformer block."""
    tm._comfy()
    import comfy.utils

    config = dict(tm.TINY_UNET_CONFIG if unet_config is None else unet_config)
    unet = tm.tiny_unet_layout(config)
    layout: tm.Layout = {}
    for diffusers_key, comfy_key in sorted(comfy.utils.unet_to_diffusers(config).items()):
        if not _LORA_MODULE.search(diffusers_key):
            continue
        out_features, in_features = unet[comfy_key][1][:2]
        name = "lora_unet_" + diffusers_key[: -len(".weight")].replace(".", "_")
        layout[name + ".lora_down.weight"] = ("randn", (rank, in_features))
        layout[name + ".lora_up.weight"] = ("randn", (out_features, rank))
    return layout


# The tiny files: file name -> kind. The names follow the releases (names only break ties between same shapes).
TINY_FACEID_FILES = {
    "faceid": "ip-adapter-faceid_tiny_sd15.safetensors",
    "plus": "ip-adapter-faceid-plusv2_tiny_sd15.safetensors",
    "portrait": "ip-adapter-faceid-portrait_tiny_sd15.safetensors",
    "portrait-unnorm": "ip-adapter-faceid-portrait-unnorm_tiny_sd15.safetensors",
}
TINY_PROJ = {"plus": dict(depth=1, inner=64, ff_mult=1), "portrait-unnorm": dict(depth=1, inner=64, ff_mult=1,
                                                                                 resampler_dim=64)}


def tiny_adapter_layout(kind: str, clip_hidden: int) -> tm.Layout:
    """A tiny FaceID adapter for the tiny SD1.5 UNet; Plus sized for a CLIP vision of `clip_hidden` width."""
    proj = dict(TINY_PROJ.get(kind, {}))
    if kind == "plus":
        proj["clip_hidden"] = clip_hidden
    return tiny_layout(faceid_adapter_layout(kind, **proj))


def faceid_plan(clip_hidden: int) -> dict[str, tuple[str, Callable[[], tm.Layout]]]:
    """tiny_models.generate's plan entries: the tiny FaceID adapters (Plus sized for a CLIP vision of
    `clip_hidden` width) in ipadapter/ and the FaceID LoRA of the tiny UNet in loras/."""
    plan = {f"faceid_{kind}": (f"ipadapter/{name}", partial(tiny_adapter_layout, kind, clip_hidden))
            for kind, name in TINY_FACEID_FILES.items()}
    plan["faceid_lora"] = ("loras/ip-adapter-faceid_tiny_sd15_lora.safetensors", faceid_lora_layout)
    return plan


def write_face_models(root: Path | str) -> Optional[Path]:
    """The tiny buffalo_l pack in <root>/insightface/models/ when missing (needs the `onnx` package: without it
    nothing is written and None returned, so a machine without the test tools still gets the other models)."""
    folder = Path(root) / "insightface" / "models" / "buffalo_l"
    if folder.is_dir():
        return folder
    try:
        from . import tiny_onnx
    except ImportError as error:
        log.warning("tiny face analysis models not written (%s): FaceID examples need them", error)
        return None
    return tiny_onnx.write_model_pack(root, "buffalo_l")


def generate_faceid(root: Path | str | None = None, clip_hidden: int = tm.CLIP_VISION["vit-l"]["hidden"],
                    force: bool = False) -> dict[str, Path]:
    """Write the tiny FaceID adapters (ipadapter/) and the FaceID LoRA (loras/) when missing; their paths by
    kind ("faceid", "plus", "portrait", "portrait-unnorm", "lora")."""
    root = Path(root) if root is not None else tm.DEFAULT_CACHE
    files: dict[str, Path] = {}
    for key, (rel, layout_fn) in faceid_plan(clip_hidden).items():
        files[key.removeprefix("faceid_")] = tm._write(root / rel, lambda: tm.fill(layout_fn(), tm._seed(rel)), {},
                                                       force=force)
    return files
