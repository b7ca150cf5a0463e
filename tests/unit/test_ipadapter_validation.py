"""Validation errors name both sides and the fix."""
from __future__ import annotations

import pytest
import torch

from processors.ipadapter import (IPAdapterInputError, IPAdapterMismatchError, SiteSpec, check_image_batch,
                                  detect_adapter, validate_against_sites, validate_clip_output)
from tests.unit.ipadapter_fixtures import (SD15_INNER, SDXL_INNER, build, image_proj_shapes, ip_layer_shapes,
                                           resampler_shapes)

SD15 = detect_adapter(build(image_proj_shapes(1024, 768), ip_layer_shapes(768, SD15_INNER)))
SDXL_G = detect_adapter(build(image_proj_shapes(1280, 2048), ip_layer_shapes(2048, SDXL_INNER)))
SD15_PLUS = detect_adapter(build(resampler_shapes(768, 4, 12, 16, 1280, 768), ip_layer_shapes(768, SD15_INNER)))


def _sites(inner_dims, context, dim_head):
    return [SiteSpec(key=("input", i, 0), heads=inner // dim_head, dim_head=dim_head, context_dim=context)
            for i, inner in enumerate(inner_dims)]


SD15_SITES = _sites(SD15_INNER, 768, 40)
SDXL_SITES = _sites(SDXL_INNER, 2048, 64)


def test_matching_sites_pass():
    validate_against_sites(SD15, SD15_SITES)
    validate_against_sites(SDXL_G, SDXL_SITES)
    assert SD15_SITES[0].inner_dim == 320


def test_sdxl_adapter_on_sd15_model():
    with pytest.raises(IPAdapterMismatchError) as err:
        validate_against_sites(SDXL_G, SD15_SITES)
    assert ("this IP-Adapter is for SDXL (cross-attention 2048, 70 sites); the model is SD1.5 (768, 16 sites)"
            in str(err.value))
    assert "load an IP-Adapter made for SD1.5" in str(err.value)


def test_sd15_adapter_on_sdxl_model_names_the_label():
    with pytest.raises(IPAdapterMismatchError, match=r"is for SD1\.5 \(cross-attention 768, 16 sites\); "
                                                     r"the checkpoint is SDXL \(2048, 70 sites\)"):
        validate_against_sites(SD15, SDXL_SITES, model_label="the checkpoint")


def test_same_family_different_layout():
    with pytest.raises(IPAdapterMismatchError, match="4 sites.*different UNet layout"):
        validate_against_sites(SD15, SD15_SITES[:4])


def test_one_site_with_wrong_inner_dim():
    sites = list(SD15_SITES)
    sites[2] = SiteSpec(key=("input", 4, 0), heads=8, dim_head=40, context_dim=768)
    with pytest.raises(IPAdapterMismatchError) as err:
        validate_against_sites(SD15, sites)
    assert "('input', 4, 0)" in str(err.value) and "320" in str(err.value) and "weight 5 has 640" in str(err.value)


class AttrOutput:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_clip_width_mismatch_message():
    with pytest.raises(IPAdapterMismatchError) as err:
        validate_clip_output(SDXL_G, {"image_embeds": torch.randn(1, 1024)})
    assert str(err.value) == ("this IP-Adapter expects 1280-d CLIP vision embeddings (ViT-bigG); the CLIP vision "
                              "output has 1024 (ViT-H): load CLIP-ViT-bigG-14")


def test_hidden_state_width_mismatch_message():
    out = AttrOutput(image_embeds=torch.randn(1, 1280), penultimate_hidden_states=torch.randn(1, 257, 1664))
    with pytest.raises(IPAdapterMismatchError, match=r"expects 1280-d CLIP vision hidden states \(ViT-H\); "
                                                     r"the CLIP vision output has 1664 \(ViT-bigG\): load CLIP-ViT-H-14"):
        validate_clip_output(SD15_PLUS, out)


@pytest.mark.parametrize("wrap", [dict, lambda **kw: AttrOutput(**kw)], ids=["mapping", "attributes"])
def test_right_output_is_selected(wrap):
    emb, hid = torch.randn(2, 1024), torch.randn(2, 257, 1280)
    out = wrap(image_embeds=emb, penultimate_hidden_states=hid)
    assert validate_clip_output(SD15, out) is emb
    assert validate_clip_output(SD15_PLUS, out) is hid


def test_missing_output_kind():
    with pytest.raises(IPAdapterMismatchError, match="penultimate_hidden_states"):
        validate_clip_output(SD15_PLUS, AttrOutput(image_embeds=torch.randn(1, 1024)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_embeddings(bad):
    emb = torch.randn(2, 1024)
    emb[1, 3] = bad
    with pytest.raises(IPAdapterInputError, match="NaN or infinite"):
        validate_clip_output(SD15, {"image_embeds": emb})


def test_wrong_rank_and_empty_outputs():
    with pytest.raises(IPAdapterInputError, match="expected 2 dims"):
        validate_clip_output(SD15, {"image_embeds": torch.randn(1, 3, 1024)})
    with pytest.raises(IPAdapterInputError):
        validate_clip_output(SD15, {"image_embeds": torch.randn(0, 1024)})


@pytest.mark.parametrize("image", [None, torch.zeros(0, 8, 8, 3), torch.zeros(8, 8, 3)])
def test_empty_image_batch(image):
    with pytest.raises(IPAdapterInputError, match="image batch is empty: connect at least one image"):
        check_image_batch(image)
    check_image_batch(torch.zeros(1, 8, 8, 3))
