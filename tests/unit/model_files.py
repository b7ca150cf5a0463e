"""IP-Adapter layouts for identification tests (flat "image_proj." / "ip_adapter." keys, as the .safetensors
releases), on top of scripts/harness/model_files.py's header writer and CLIP vision layouts."""
from __future__ import annotations

from harness.model_files import (CLIP_SIZES, Shape, clip_hf_shapes, clip_openclip_shapes,  # noqa: F401
                                 folder_snapshot, write_safetensors)
from tests.unit.ipadapter_fixtures import (SD15_INNER, SDXL_INNER, image_proj_shapes, ip_layer_shapes,
                                           mlp_proj_shapes, resampler_shapes)

H_EMB, G_EMB, H_HID = 1024, 1280, 1280
SD15_PLUS = resampler_shapes(dim=768, depth=4, heads=12, queries=16, clip_width=H_HID, out=768)
SDXL_PLUS = resampler_shapes(dim=1280, depth=4, heads=20, queries=16, clip_width=H_HID, out=2048)


def adapter_shapes(kind: str, family: str = "SD1.5", inner=None) -> dict[str, Shape]:
    """kind: "base" (ViT-H), "vit-g" (base fed by bigG), "plus" (same shapes for plus face), "full-face"."""
    cross = 768 if family == "SD1.5" else 2048
    inner = inner or (SD15_INNER if family == "SD1.5" else SDXL_INNER)
    proj = {"base": image_proj_shapes(H_EMB, cross), "vit-g": image_proj_shapes(G_EMB, cross),
            "plus": SD15_PLUS if family == "SD1.5" else SDXL_PLUS,
            "full-face": mlp_proj_shapes(H_HID, cross)}[kind]
    shapes = {f"image_proj.{k}": s for k, s in proj.items()}
    shapes.update({f"ip_adapter.{k}": s for k, s in ip_layer_shapes(cross, inner).items()})
    return shapes
