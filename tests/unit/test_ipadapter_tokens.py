"""Image tokens: which CLIP output, which negative, how images combine, float32 projection."""
from __future__ import annotations

import pytest
import torch

from processors.ipadapter import (COMBINE_EMBEDS, IPAdapterInputError, image_tokens, ipadapter_from_state_dict)
from tests.unit.ipadapter_fixtures import TINY_CLIP, tiny_adapter


class FakeClip:
    """Deterministic CLIP stand-in: features depend on the pixels; records every batch it encodes."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        gen = torch.Generator().manual_seed(7)
        self.w_emb = torch.randn(3, TINY_CLIP, generator=gen)
        self.w_hid = torch.randn(3, 5, TINY_CLIP, generator=gen)
        self.bias = torch.randn(5, TINY_CLIP, generator=gen)
        self.dtype = dtype
        self.calls: list[torch.Tensor] = []

    def __call__(self, image: torch.Tensor) -> dict:
        self.calls.append(image.clone())
        rgb = image.mean(dim=(1, 2))  # [B, 3]
        return {"image_embeds": (rgb @ self.w_emb + 0.5).to(self.dtype),
                "penultimate_hidden_states": (torch.einsum("bc,ctw->btw", rgb, self.w_hid) + self.bias).to(self.dtype)}

    def features(self, image: torch.Tensor, kind: str) -> torch.Tensor:
        out = FakeClip.__call__(self, image)[kind].float()
        self.calls.pop()
        return out


def _model(kind: str):
    return ipadapter_from_state_dict(tiny_adapter(kind))


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 8, 6, 3, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _proj(model, feats: torch.Tensor) -> torch.Tensor:
    return model.image_proj(feats)


def test_base_positive_and_zero_negative():
    model, clip, img = _model("base"), FakeClip(), _images(1)
    toks = image_tokens(model, clip, img)
    torch.testing.assert_close(toks.cond, _proj(model, clip.features(img, "image_embeds")))
    torch.testing.assert_close(toks.uncond, _proj(model, torch.zeros(1, TINY_CLIP)))
    assert len(clip.calls) == 1  # no black-image encode for image_embeds adapters
    assert toks.cond.shape == (1, 4, 24) and toks.tokens_per_image == 4 and toks.num_images == 1


@pytest.mark.parametrize("kind,tokens", [("plus", 4), ("full", 5)])
def test_hidden_state_adapters_use_black_image_negative(kind, tokens):
    model, clip, img = _model(kind), FakeClip(), _images(2)
    toks = image_tokens(model, clip, img)
    black = torch.zeros(1, 8, 6, 3)
    assert torch.equal(clip.calls[-1], black)  # the negative is the encoding of a black image of that size
    hid = clip.features(img, "penultimate_hidden_states")
    want_cond = _proj(model, hid).reshape(1, -1, 24)
    want_uncond = _proj(model, clip.features(black, "penultimate_hidden_states")).repeat(1, 2, 1)
    torch.testing.assert_close(toks.cond, want_cond)
    torch.testing.assert_close(toks.uncond, want_uncond)
    assert toks.cond.shape == (1, 2 * tokens, 24) and toks.num_images == 2


def test_image_negative_is_encoded_and_matched_in_count():
    model, clip = _model("plus"), FakeClip()
    img, neg = _images(3, seed=1), _images(1, seed=2)
    toks = image_tokens(model, clip, img, image_negative=neg)
    assert torch.equal(clip.calls[1], neg)
    neg_tokens = _proj(model, clip.features(neg, "penultimate_hidden_states"))
    torch.testing.assert_close(toks.uncond, neg_tokens.repeat(1, 3, 1))


def _combined(feats: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "add":
        return feats[0] + feats[1] + feats[2]
    if mode == "subtract":
        return feats[0] - (feats[1] + feats[2]) / 2
    if mode == "average":
        return (feats[0] + feats[1] + feats[2]) / 3
    norm = (feats[0] ** 2 + feats[1] ** 2 + feats[2] ** 2).sqrt()  # element-wise, across the images
    return (feats[0] / norm + feats[1] / norm + feats[2] / norm) / 3


@pytest.mark.parametrize("mode", ["add", "subtract", "average", "norm average"])
@pytest.mark.parametrize("kind,feature", [("base", "image_embeds"), ("plus", "penultimate_hidden_states")])
def test_combine_modes_act_on_clip_features(mode, kind, feature):
    model, clip, img = _model(kind), FakeClip(), _images(3)
    toks = image_tokens(model, clip, img, combine=mode)
    feats = clip.features(img, feature)
    torch.testing.assert_close(toks.cond, _proj(model, _combined(feats, mode)[None]), atol=1e-5, rtol=1e-5)
    assert toks.uncond.shape == toks.cond.shape == (1, 4, 24)


def test_concat_keeps_every_image_in_order():
    model, clip, img = _model("base"), FakeClip(), _images(3)
    toks = image_tokens(model, clip, img, combine="concat")
    for i in range(3):
        torch.testing.assert_close(toks.cond[:, 4 * i:4 * i + 4], _proj(model, clip.features(img[i:i + 1],
                                                                                          "image_embeds")))


def test_single_image_is_never_combined():
    model, clip, img = _model("base"), FakeClip(), _images(1)
    base = image_tokens(model, clip, img).cond
    for mode in COMBINE_EMBEDS:
        torch.testing.assert_close(image_tokens(model, clip, img, combine=mode).cond, base)


def test_fp16_clip_output_is_projected_in_float32():
    model, clip, img = _model("plus"), FakeClip(torch.float16), _images(1)
    toks = image_tokens(model, clip, img)
    assert toks.cond.dtype == toks.uncond.dtype == torch.float32
    feats = FakeClip.__call__(clip, img)["penultimate_hidden_states"].float()
    torch.testing.assert_close(toks.cond, _proj(model, feats))


def test_bad_inputs_fail_before_encoding():
    model, clip = _model("base"), FakeClip()
    with pytest.raises(IPAdapterInputError, match="image batch is empty"):
        image_tokens(model, clip, torch.zeros(0, 8, 8, 3))
    with pytest.raises(IPAdapterInputError, match="combine_embeds"):
        image_tokens(model, clip, _images(1), combine="max")
    assert clip.calls == []
    with pytest.raises(IPAdapterInputError, match="image_negative batch is empty"):
        image_tokens(model, clip, _images(1), image_negative=torch.zeros(0, 8, 8, 3))


def test_nan_clip_output_is_reported():
    model = _model("base")
    with pytest.raises(IPAdapterInputError, match="NaN"):
        image_tokens(model, lambda image: {"image_embeds": torch.full((1, TINY_CLIP), float("nan"))}, _images(1))
