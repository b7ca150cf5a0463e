"""attn2 sites enumerated from real ComfyUI UNet layouts (SD1.5 and SDXL built on the meta device)."""

from types import SimpleNamespace

import pytest

from harness import host_helpers as hh
from harness import meta_unets


def patcher(unet):
    return SimpleNamespace(get_model_object=lambda name: {"diffusion_model": unet}[name])


@pytest.mark.parametrize("name, count, transformers, middle_t, heads", [
    ("SD15", 16, 16, 6, {8}), ("SDXL", 70, 11, 4, {10, 20})])
def test_site_counts_order_and_transformer_indices(pack, name, count, transformers, middle_t, heads):
    sites_module = hh.pack_module("nodes.sites")
    unet = meta_unets.meta_unet(name)
    sites = sites_module.attn2_sites(patcher(unet))
    assert len(sites) == count
    assert sites_module.transformer_count(patcher(unet)) == transformers
    assert [s.index for s in sites] == list(range(count))
    kinds = [s.block for s in sites]
    # adapter weight order: every input site, then every output site, then the middle block
    assert kinds == sorted(kinds, key=["input", "output", "middle"].index)
    middle = [s for s in sites if s.block == "middle"]
    assert middle and all(s.key[:2] == ("middle", 0) and s.transformer_index == middle_t for s in middle)
    assert {s.heads for s in sites} == heads
    assert {s.context_dim for s in sites} == {768 if name == "SD15" else 2048}
    assert set(s.key for s in sites) == set(meta_unets.attn2_sites(unet))  # same keys as a plain scan


def test_sd15_keys_and_head_dims(pack):
    sites = hh.pack_module("nodes.sites").attn2_sites(patcher(meta_unets.meta_unet("SD15")))
    inputs = [s.key for s in sites if s.block == "input"]
    outputs = [s.key for s in sites if s.block == "output"]
    assert inputs == [("input", n, 0) for n in (1, 2, 4, 5, 7, 8)]
    assert outputs == [("output", n, 0) for n in range(3, 12)]
    assert sorted({s.dim_head for s in sites}) == [40, 80, 160]
