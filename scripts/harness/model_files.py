"""Model files for identification tests and benchmarks, written from the safetensors format spec by hand (not
with the pack's code, nor with the safetensors library): 8-byte little-endian header length, JSON header, data.

The data section is a sparse hole (or garbage), so a full-size ViT-bigG costs a few kB of disk. CLIP vision
layouts are the real key names of ComfyUI's two loadable layouts (HF and OpenCLIP).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Optional

Shape = tuple[int, ...]
DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "I8": 1, "U8": 1}

def write_safetensors(path: Path, shapes: Mapping[str, Shape], dtype: str = "F16", data: Optional[str] = None,
                      cut: int = 0) -> int:
    """Write a safetensors file; returns the header length. `data`: None = sparse zeros, "garbage" = 0xA5 bytes
    (not valid in any way a reader could check); `cut`: bytes removed from the end (a truncated download)."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = DTYPE_BYTES[dtype]
        for n in shape:
            size *= n
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        if data == "garbage":
            f.write(b"\xa5" * offset)
        f.truncate(8 + len(raw) + offset - cut)
    return len(raw)


# --- CLIP vision -----------------------------------------------------------------------------------------------

# published sizes: layers, hidden (penultimate width), MLP, projection (image_embeds width)
CLIP_SIZES = {"ViT-L": (24, 1024, 4096, 768), "ViT-H": (32, 1280, 5120, 1024), "ViT-bigG": (48, 1664, 8192, 1280)}


def clip_hf_shapes(size: str, image: int = 224, projection: bool = True) -> dict[str, Shape]:
    layers, hidden, mlp, proj = CLIP_SIZES[size]
    positions = (image // 14) ** 2 + 1
    shapes: dict[str, Shape] = {
        "vision_model.embeddings.class_embedding": (hidden,),
        "vision_model.embeddings.patch_embedding.weight": (hidden, 3, 14, 14),
        "vision_model.embeddings.position_embedding.weight": (positions, hidden),
        "vision_model.pre_layrnorm.weight": (hidden,), "vision_model.pre_layrnorm.bias": (hidden,),
        "vision_model.post_layernorm.weight": (hidden,), "vision_model.post_layernorm.bias": (hidden,),
    }
    for i in range(layers):
        p = f"vision_model.encoder.layers.{i}."
        for ln in ("layer_norm1", "layer_norm2"):
            shapes[p + ln + ".weight"] = shapes[p + ln + ".bias"] = (hidden,)
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[p + f"self_attn.{name}.weight"] = (hidden, hidden)
            shapes[p + f"self_attn.{name}.bias"] = (hidden,)
        shapes[p + "mlp.fc1.weight"], shapes[p + "mlp.fc1.bias"] = (mlp, hidden), (mlp,)
        shapes[p + "mlp.fc2.weight"], shapes[p + "mlp.fc2.bias"] = (hidden, mlp), (hidden,)
    if projection:
        shapes["visual_projection.weight"] = (proj, hidden)
    return shapes


def clip_openclip_shapes(size: str) -> dict[str, Shape]:
    """open_clip's visual tower (`visual.` keys), as in open_clip_pytorch_model files; ComfyUI converts them."""
    layers, hidden, mlp, proj = CLIP_SIZES[size]
    shapes: dict[str, Shape] = {"visual.class_embedding": (hidden,), "visual.conv1.weight": (hidden, 3, 14, 14),
                                "visual.positional_embedding": (257, hidden), "visual.ln_pre.weight": (hidden,),
                                "visual.ln_pre.bias": (hidden,), "visual.ln_post.weight": (hidden,),
                                "visual.ln_post.bias": (hidden,), "visual.proj": (hidden, proj)}
    for i in range(layers):
        p = f"visual.transformer.resblocks.{i}."
        shapes.update({p + "ln_1.weight": (hidden,), p + "ln_1.bias": (hidden,), p + "ln_2.weight": (hidden,),
                       p + "ln_2.bias": (hidden,), p + "attn.in_proj_weight": (3 * hidden, hidden),
                       p + "attn.in_proj_bias": (3 * hidden,), p + "attn.out_proj.weight": (hidden, hidden),
                       p + "attn.out_proj.bias": (hidden,), p + "mlp.c_fc.weight": (mlp, hidden),
                       p + "mlp.c_fc.bias": (mlp,), p + "mlp.c_proj.weight": (hidden, mlp),
                       p + "mlp.c_proj.bias": (hidden,)})
    return shapes


def folder_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file below root: equal before and after = nothing written."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            st = os.stat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_size, st.st_mtime_ns)
    return out
