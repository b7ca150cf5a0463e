"""Embeds: combine methods against plain maths, fit checks, the CLIP-input mask, safetensors save/load."""
from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from processors.ipadapter import (COMBINE_METHODS, IPAdapterFileError, IPAdapterInputError, IPAdapterMismatchError,
                                  ipadapter_from_state_dict)
from processors.ipadapter.embeds import (CLIP_MEAN, AdapterEmbeds, check_fits, combine, load_embeds,
                                         mask_clip_input, save_embeds, weighted)
from tests.unit.ipadapter_fixtures import TINY_CLIP, tiny_adapter


def _embeds(rows: list[list[float]], source: str = "test adapter") -> AdapterEmbeds:
    return AdapterEmbeds(torch.tensor(rows, dtype=torch.float32), "image_embeds", source)


A = [[1.0, -2.0, 3.0], [4.0, 0.5, -6.0]]
B = [[-1.0, 2.0, 0.0]]
C = [[2.0, 2.0, 2.0]]


def _plain(method: str) -> list[list[float]]:
    """Every image of A, B, C in order, combined per element with Python arithmetic only."""
    rows = A + B + C
    columns = list(zip(*rows))
    if method == "concat":
        return rows
    if method == "add":
        return [[sum(c) for c in columns]]
    if method == "subtract":
        return [[c[0] - sum(c[1:]) / (len(c) - 1) for c in columns]]
    if method == "average":
        return [[sum(c) / len(c) for c in columns]]
    if method == "norm average":
        return [[sum(x / sum(y * y for y in c) ** 0.5 for x in c) / len(c) for c in columns]]
    if method == "max":
        return [[max(c) for c in columns]]
    return [[min(c) for c in columns]]


@pytest.mark.parametrize("method", COMBINE_METHODS)
def test_combine_methods_match_plain_maths(method):
    parts = [("embeds_1", _embeds(A)), ("embeds_2", _embeds(B)), ("embeds_3", _embeds(C))]
    out = combine(parts, method)
    expected = _plain(method)
    assert out.tensor.shape == (len(expected), 3)
    assert [x for row in out.tensor.tolist() for x in row] == pytest.approx([x for row in expected for x in row], rel=1e-6)
    assert out.clip_output == "image_embeds" and out.source == "test adapter"
    assert parts[0][1].tensor.tolist() == A  # inputs untouched (ComfyUI caches them)


def test_combine_hidden_states_per_element_and_single_input():
    hidden = AdapterEmbeds(torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) - 10, "penultimate_hidden_states")
    assert torch.equal(combine([("embeds_1", hidden)], "max").tensor, hidden.tensor[1:])  # max over the 2 images
    assert torch.equal(combine([("embeds_1", hidden)], "min").tensor, hidden.tensor[:1])
    assert combine([("embeds_1", hidden)], "concat") is hidden


def test_combine_refuses_other_kinds_and_unknown_methods():
    hidden = AdapterEmbeds(torch.zeros(1, 5, 3), "penultimate_hidden_states")
    with pytest.raises(IPAdapterMismatchError, match="embeds_2 are .*penultimate_hidden_states.*embeds_1 are"):
        combine([("embeds_1", _embeds(B)), ("embeds_2", hidden)], "add")
    with pytest.raises(IPAdapterMismatchError, match="embeds_2"):
        combine([("embeds_1", _embeds(B)), ("embeds_2", _embeds([[1.0, 2.0]]))], "concat")
    with pytest.raises(IPAdapterInputError, match="method must be one of .*max, min"):
        combine([("embeds_1", _embeds(B))], "median")


def test_weight_scales_positive_features_only_when_not_one():
    e = _embeds(A)
    assert weighted(e, 1.0) is e
    assert weighted(e, -0.5).tensor.tolist() == [[-0.5, 1.0, -1.5], [-2.0, -0.25, 3.0]]
    with pytest.raises(IPAdapterInputError, match="finite"):
        weighted(e, float("nan"))


def test_embeds_describe_themselves_and_refuse_bad_tensors():
    e = AdapterEmbeds(torch.zeros(2, 257, 1280), "penultimate_hidden_states", "SD1.5 plus")
    assert e.encoder == "ViT-H" and e.num_images == 2 and e.width == 1280
    assert "1280-d penultimate_hidden_states from ViT-H (2x257x1280" in e.describe()
    with pytest.raises(IPAdapterInputError, match="3 dims"):
        AdapterEmbeds(torch.zeros(2, 1280), "penultimate_hidden_states")
    with pytest.raises(IPAdapterInputError, match="float32"):
        AdapterEmbeds(torch.zeros(1, 4, dtype=torch.float16), "image_embeds")


def test_check_fits_names_both_sides():
    base = ipadapter_from_state_dict(tiny_adapter("base")).info
    plus = ipadapter_from_state_dict(tiny_adapter("plus")).info
    good = AdapterEmbeds(torch.ones(1, TINY_CLIP), "image_embeds")
    assert check_fits(good, base, "pos_embeds") is good.tensor
    hidden = AdapterEmbeds(torch.ones(1, 5, TINY_CLIP), "penultimate_hidden_states")
    with pytest.raises(IPAdapterMismatchError) as error:
        check_fits(hidden, base, "pos_embeds")
    message = str(error.value)
    assert "pos_embeds are" in message and "penultimate_hidden_states" in message and "fed with 32-d image_embeds" in message
    with pytest.raises(IPAdapterMismatchError, match=r"neg_embeds are 7-d .* fed with 32-d penultimate"):
        check_fits(AdapterEmbeds(torch.ones(1, 5, 7), "penultimate_hidden_states"), plus, "neg_embeds")


def test_mask_hides_pixels_behind_the_clip_mean():
    image = torch.rand(2, 4, 6, 3, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 4, 6)
    mask[:, :, :3] = 1.0
    out = mask_clip_input(image, mask)
    assert torch.equal(out[:, :, :3], image[:, :, :3])
    mean = torch.tensor(CLIP_MEAN)
    assert torch.allclose(out[:, :, 3:], mean.expand_as(out[:, :, 3:]))
    half = mask_clip_input(image, torch.full((2, 4, 6), 0.5))
    assert torch.allclose(half, (image + mean) / 2)
    assert mask_clip_input(image, torch.ones(2, 8, 12)).allclose(image)  # resized to the image
    with pytest.raises(IPAdapterInputError, match="one mask per image"):
        mask_clip_input(image, torch.ones(3, 4, 6))
    with pytest.raises(IPAdapterInputError, match="NaN"):
        mask_clip_input(image, torch.full((1, 4, 6), float("nan")))


# --- save / load ---------------------------------------------------------------------------------------------

def test_round_trip_is_bit_identical_with_metadata(tmp_path):
    tensor = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(3))
    tensor[0, 0, 0] = 1e-38  # subnormal-adjacent values survive too
    embeds = AdapterEmbeds(tensor, "penultimate_hidden_states", "SD1.5 IP-Adapter (plus)")
    path = tmp_path / "e.safetensors"
    save_embeds(embeds, path)
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["format"] == "xformers_ipadapter_embeds" and meta["clip_output"] == "penultimate_hidden_states"
    assert meta["clip_width"] == "7" and json.loads(meta["shape"]) == [3, 5, 7]
    assert meta["adapter"] == "SD1.5 IP-Adapter (plus)"
    loaded = load_embeds(path)
    assert torch.equal(loaded.tensor, tensor) and loaded.tensor.dtype == torch.float32
    assert (loaded.clip_output, loaded.source) == (embeds.clip_output, embeds.source)


class Trap:
    """Unpickling this would record the call: proves nothing is ever unpickled."""

    called = False

    def __reduce__(self):
        return (Trap._fire, ())

    @staticmethod
    def _fire():
        Trap.called = True
        return None


@pytest.mark.parametrize("name", ["old.ipadpt", "renamed.safetensors", "raw.safetensors"])
def test_pickles_are_refused_unopened_with_advice(tmp_path, name):
    path = tmp_path / name
    if name == "raw.safetensors":
        path.write_bytes(pickle.dumps(Trap()))
    else:
        torch.save({"embeds": torch.zeros(1, 4), "trap": Trap()}, path)
    with pytest.raises(IPAdapterFileError, match="pickle") as error:
        load_embeds(path)
    assert "IP-Adapter Encoder (xformers)" in str(error.value) and "Save IP-Adapter Embeds" in str(error.value)
    assert not Trap.called


def test_other_safetensors_and_damaged_files_are_refused(tmp_path):
    other = tmp_path / "model.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(IPAdapterFileError, match="holds no IP-Adapter embeds"):
        load_embeds(other)
    lying = tmp_path / "lying.safetensors"
    save_file({"embeds": torch.zeros(2, 4)}, str(lying), metadata={
        "format": "xformers_ipadapter_embeds", "clip_output": "image_embeds", "clip_width": "8", "shape": "[2, 8]"})
    with pytest.raises(IPAdapterFileError, match="damaged"):
        load_embeds(lying)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(struct.pack("<Q", 10**9) + b"{")
    with pytest.raises(IPAdapterFileError, match="not a readable safetensors"):
        load_embeds(corrupt)
