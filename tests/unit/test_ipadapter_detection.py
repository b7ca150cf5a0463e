"""Shape-only detection of every released IP-Adapter variant (synthetic, zero-memory tensors)."""
from __future__ import annotations

import pytest

from tests.unit.ipadapter_fixtures import (SD15_INNER, SDXL_INNER, build, image_proj_shapes, ip_layer_shapes, lazy,
                                mlp_proj_shapes, resampler_shapes)
from processors.ipadapter import (IPAdapterFileError, clip_encoder_name, detect_adapter, normalize_layout,
                                  projection_config)

H_EMB, G_EMB, H_HID = 1024, 1280, 1280
SD15_PLUS = resampler_shapes(dim=768, depth=4, heads=12, queries=16, clip_width=H_HID, out=768)
SDXL_PLUS = resampler_shapes(dim=1280, depth=4, heads=20, queries=16, clip_width=H_HID, out=2048)

# name, image_proj shapes, context dim, inner dims, expected (variant, projection, tokens, output, width, encoder)
CASES = [
    ("sd15 base", image_proj_shapes(H_EMB, 768), 768, SD15_INNER,
     ("base", "ImageProjModel", 4, "image_embeds", 1024, "ViT-H")),
    ("sd15 light", image_proj_shapes(H_EMB, 768), 768, SD15_INNER,
     ("base", "ImageProjModel", 4, "image_embeds", 1024, "ViT-H")),
    ("sd15 vit-G", image_proj_shapes(G_EMB, 768), 768, SD15_INNER,
     ("base", "ImageProjModel", 4, "image_embeds", 1280, "ViT-bigG")),
    ("sd15 plus", SD15_PLUS, 768, SD15_INNER,
     ("plus", "Resampler", 16, "penultimate_hidden_states", 1280, "ViT-H")),
    ("sd15 plus-face", SD15_PLUS, 768, SD15_INNER,
     ("plus", "Resampler", 16, "penultimate_hidden_states", 1280, "ViT-H")),
    ("sd15 full-face", mlp_proj_shapes(H_HID, 768), 768, SD15_INNER,
     ("full-face", "MLPProjModel", 257, "penultimate_hidden_states", 1280, "ViT-H")),
    ("sdxl base (bigG)", image_proj_shapes(G_EMB, 2048), 2048, SDXL_INNER,
     ("base", "ImageProjModel", 4, "image_embeds", 1280, "ViT-bigG")),
    ("sdxl vit-h", image_proj_shapes(H_EMB, 2048), 2048, SDXL_INNER,
     ("base", "ImageProjModel", 4, "image_embeds", 1024, "ViT-H")),
    ("sdxl plus vit-h", SDXL_PLUS, 2048, SDXL_INNER,
     ("plus", "Resampler", 16, "penultimate_hidden_states", 1280, "ViT-H")),
    ("sdxl plus-face vit-h", SDXL_PLUS, 2048, SDXL_INNER,
     ("plus", "Resampler", 16, "penultimate_hidden_states", 1280, "ViT-H")),
]


@pytest.mark.parametrize("layout", ["nested", "flat", "adapter_modules"])
@pytest.mark.parametrize("name,proj,cross,inner,expected", CASES, ids=[c[0] for c in CASES])
def test_detects_every_variant(name, proj, cross, inner, expected, layout):
    info = detect_adapter(normalize_layout(build(proj, ip_layer_shapes(cross, inner), lazy, layout)))
    variant, projection, tokens, output, width, encoder = expected
    assert (info.variant, info.projection, info.num_tokens) == (variant, projection, tokens)
    assert (info.clip_output, info.clip_width, info.clip_encoder) == (output, width, encoder)
    assert info.cross_attention_dim == cross
    assert info.num_sites == (16 if cross == 768 else 70)
    assert info.base_model == ("SD1.5" if cross == 768 else "SDXL")
    assert info.site_inner_dims == tuple(inner)
    text = info.describe()
    assert info.base_model in text and encoder in text and variant in text


@pytest.mark.parametrize("proj,expected", [
    (SD15_PLUS, {"dim": 768, "depth": 4, "heads": 12, "num_queries": 16, "embedding_dim": 1280,
                 "output_dim": 768, "ff_mult": 4, "dim_head": 64}),
    (SDXL_PLUS, {"dim": 1280, "depth": 4, "heads": 20, "num_queries": 16, "embedding_dim": 1280,
                 "output_dim": 2048, "ff_mult": 4, "dim_head": 64}),
])
def test_resampler_hyperparameters_from_shapes(proj, expected):
    name, cfg = projection_config({k: lazy(s) for k, s in proj.items()})
    assert name == "Resampler" and cfg == expected


def test_site_order_follows_weight_numbers():
    inner = (320, 640, 1280, 640)
    sd = build(image_proj_shapes(H_EMB, 768), ip_layer_shapes(768, inner))
    assert detect_adapter(sd).site_inner_dims == inner


@pytest.mark.parametrize("width,kind,family", [
    (768, "image_embeds", "ViT-L"), (1024, "image_embeds", "ViT-H"), (1280, "image_embeds", "ViT-bigG"),
    (1024, "penultimate_hidden_states", "ViT-L"), (1280, "penultimate_hidden_states", "ViT-H"),
    (1664, "penultimate_hidden_states", "ViT-bigG"), (999, "image_embeds", None),
])
def test_clip_encoder_names(width, kind, family):
    assert clip_encoder_name(width, kind) == family


def test_unknown_context_dim_is_unknown_base_model():
    sd = build(image_proj_shapes(H_EMB, 1024), ip_layer_shapes(1024, (320, 640)))
    assert detect_adapter(sd).base_model == "unknown"


def _broken(mutate) -> dict:
    sd = build(image_proj_shapes(H_EMB, 768), ip_layer_shapes(768, (320, 640, 1280)))
    mutate(sd)
    return sd


@pytest.mark.parametrize("mutate,message", [
    (lambda sd: sd["ip_adapter"].pop("3.to_k_ip.weight"), "odd numbers without gaps"),
    (lambda sd: sd["ip_adapter"].pop("3.to_v_ip.weight"), "3.to_v_ip.weight"),
    (lambda sd: sd["ip_adapter"].update({"5.to_k_ip.weight": lazy((1280, 2048))}), "mix cross-attention"),
    (lambda sd: sd["ip_adapter"].clear(), "no 'N.to_k_ip.weight'"),
    (lambda sd: sd.update(image_proj={"foo.weight": lazy((3, 3))}), "no known projection"),
    (lambda sd: sd.update(image_proj={k: lazy(s) for k, s in image_proj_shapes(H_EMB, 2048).items()}),
     "2048-d tokens but to_k_ip expects 768"),
    (lambda sd: sd.update(image_proj={"perceiver_resampler.proj_in.weight": lazy((768, 1280))}), "FaceID"),
    (lambda sd: sd.update(image_proj={"proj.0.weight": lazy((1024, 512)), "proj.2.weight": lazy((3072, 1024))}),
     "FaceID"),
])
def test_malformed_adapters_are_refused(mutate, message):
    with pytest.raises(IPAdapterFileError, match=message):
        detect_adapter(_broken(mutate))
