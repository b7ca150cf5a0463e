"""The SD3.5 InstantX reader: recognised by keys and shapes (flat or nested), broken files named, other families'
files left alone."""

import pytest
import torch

from harness.sd3_models import instantx_sd3_state_dict, nested, shape_with
from processors.families.sd3 import SD3IPAdapter, is_sd3_layout, read_sd3_adapter
from processors.ipadapter.errors import IPAdapterFileError

SHAPE = shape_with(hidden=192, head_dim=64, blocks=3, encoder_width=40, tokens=6, resampler_hidden=128)


def test_reads_flat_and_nested_layouts_with_their_shapes():
    state = instantx_sd3_state_dict(SHAPE)
    flat, tree = read_sd3_adapter(state, "a.safetensors"), read_sd3_adapter(nested(state), "ip-adapter.bin")
    for adapter in (flat, tree):
        assert isinstance(adapter, SD3IPAdapter)
        info = adapter.info
        assert (info.hidden, info.blocks, info.head_dim, info.heads, info.encoder_width, info.tokens,
                info.temb_dim) == (192, 3, 64, 3, 40, 6, 128)
        assert len(adapter.image_proj.layers) == 4 and len(adapter.ip_adapter) == 3
        assert not any(p.requires_grad for p in adapter.parameters())
    assert all(torch.equal(a, b) for a, b in zip(flat.state_dict().values(), tree.state_dict().values()))
    assert "38" not in flat.describe() and "192" in flat.describe()


def test_other_layouts_are_not_claimed():
    state = instantx_sd3_state_dict(SHAPE)
    no_time = {k: v for k, v in state.items() if "time_embedding" not in k}  # a resampler without timestep
    assert read_sd3_adapter(no_time, "x") is None and not is_sd3_layout(no_time)
    sd15_like = {"image_proj.proj.weight": torch.zeros(3072, 1024), "ip_adapter.1.to_k_ip.weight": torch.zeros(320, 768)}
    assert read_sd3_adapter(sd15_like, "x") is None


@pytest.mark.parametrize("damage", ["missing block key", "wrong shape", "gap in blocks"])
def test_broken_files_are_named(damage):
    state = instantx_sd3_state_dict(SHAPE)
    if damage == "missing block key":
        del state["ip_adapter.1.to_v_ip.weight"]
    elif damage == "wrong shape":
        state["ip_adapter.2.to_k_ip.weight"] = torch.zeros(192, 100)
    else:
        state = {k: v for k, v in state.items() if not k.startswith("ip_adapter.1.")}
    with pytest.raises(IPAdapterFileError, match="broken.safetensors: an SD3.5 InstantX IP-Adapter file, but"):
        read_sd3_adapter(state, "broken.safetensors")
