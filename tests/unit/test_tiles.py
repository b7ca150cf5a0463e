"""Tiled references (processors/ipadapter/tiles.py), the CLIP-vision enhancer's tiling and pooling
(processors/ipadapter/enhance.py) and regional params (processors/ipadapter/params.py), against plain maths."""
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from processors.ipadapter.enhance import check_enhance_tiles, pool_tile_tokens, split_grid
from processors.ipadapter.errors import IPAdapterInputError
from processors.ipadapter.params import IPAdapterParams, check_mask_batches, combine_params, make_region
from processors.ipadapter.tiles import cut_tiles, fit_mask, fit_reference, tile_layout, tile_masks

T = 256


def coords_image(height: int, width: int) -> torch.Tensor:
    """[1, H, W, 3]: channel 0 = row / H, channel 1 = column / W, channel 2 = 0.5."""
    rows = (torch.arange(height, dtype=torch.float32)[:, None] / height).expand(height, width)
    cols = (torch.arange(width, dtype=torch.float32)[None, :] / width).expand(height, width)
    return torch.stack([rows, cols, torch.full((height, width), 0.5)], dim=-1)[None]


# (height, width) -> (square crop, resized (h, w), kept (h, w), tile tops, tile lefts), worked out by hand
LAYOUTS = {
    (512, 1024): (False, (256, 512), (256, 512), [0], [0, 256]),  # 2:1 -> two tiles side by side
    (300, 300): (True, (512, 512), (512, 512), [0, 256], [0, 256]),  # square -> 2 x 2
    (300, 380): (True, (512, 512), (512, 512), [0, 256], [0, 256]),  # 0.79: still treated as square
    (256, 640): (False, (256, 640), (256, 640), [0], [0, 192, 384]),  # 3 tiles overlapping by 64
    (1000, 400): (False, (640, 256), (640, 256), [0, 192, 384], [0]),  # tall 2.5:1
    (100, 1000): (False, (256, 2560), (256, 1024), [0], [0, 256, 512, 768]),  # 10:1 -> middle 4 tiles
    (300, 400): (False, (256, 341), (256, 341), [0], [0, 85]),  # 0.75: not square; overlap 171
}


@pytest.mark.parametrize("size", list(LAYOUTS))
def test_layout_matches_hand_worked_examples(size):
    square, resized, kept, tops, lefts = LAYOUTS[size]
    layout = tile_layout(*size)
    assert (layout.square, layout.resized, layout.size) == (square, resized, kept)
    assert list(layout.boxes) == [(t, l) for t in tops for l in lefts]
    assert layout.count == len(tops) * len(lefts)


@pytest.mark.parametrize("height,width", [(57, 901), (901, 57), (333, 222), (224, 1999), (640, 480), (1, 5)])
def test_tiles_cover_the_kept_reference_inside_its_bounds(height, width):
    layout = tile_layout(height, width)
    kept_h, kept_w = layout.size
    covered = torch.zeros(kept_h, kept_w, dtype=torch.int64)
    for top, left in layout.boxes:
        assert 0 <= top and top + T <= kept_h and 0 <= left and left + T <= kept_w
        covered[top:top + T, left:left + T] += 1
    assert bool((covered >= 1).all())
    assert math.ceil(kept_h / T) <= 4 and math.ceil(kept_w / T) <= 4
    assert min(kept_h, kept_w) == T or layout.square


def test_cut_tiles_are_the_fitted_reference_at_their_boxes():
    image = coords_image(512, 1024)
    layout = tile_layout(512, 1024)
    fitted = fit_reference(image, layout)
    assert fitted.shape == (1, 256, 512, 3)
    tiles = cut_tiles(fitted, layout)
    assert [t.shape for t in tiles] == [(1, T, T, 3)] * 2
    assert torch.equal(tiles[1], fitted[:, :, 256:512])
    # the right tile shows the right half of the reference: its column channel starts near 0.5
    assert abs(float(tiles[1][0, 128, 0, 1]) - 0.5) < 0.01 and float(tiles[0][0, 128, 0, 1]) < 0.01


def test_square_reference_is_center_cropped_before_the_resize():
    image = coords_image(300, 380)  # 40 columns cut on each side
    fitted = fit_reference(image, tile_layout(300, 380))
    assert fitted.shape == (1, 512, 512, 3)
    assert abs(float(fitted[0, 256, 0, 1]) - 40 / 380) < 0.01
    assert abs(float(fitted[0, 256, -1, 1]) - 339 / 380) < 0.01


def test_tile_masks_are_the_fitted_mask_inside_the_box_and_zero_outside():
    layout = tile_layout(512, 1024)
    user = torch.zeros(1, 64, 128)
    user[:, :, :64] = 1.0  # left half only
    fitted = fit_mask(user, 512, 1024, layout)
    assert fitted.shape == (1, 256, 512)
    masks = tile_masks(fitted, layout)
    assert len(masks) == 2
    expected_left = torch.zeros(1, 256, 512)
    expected_left[:, :, :256] = fitted[:, :, :256]
    assert torch.equal(masks[0], expected_left)
    assert float(masks[0][:, :, :250].min()) > 0.99  # away from the bilinear edge the left half is white
    assert float(masks[1][:, :, 262:].max()) == 0.0  # past the bilinear edge the right tile's region is black
    assert torch.equal(masks[0] + masks[1], fitted)  # no overlap: the tiles partition the mask


def test_default_mask_is_ones_and_overlapping_tiles_share_their_overlap():
    layout = tile_layout(256, 640)
    masks = tile_masks(fit_mask(None, 256, 640, layout), layout)
    total = sum(masks)
    assert total.shape == (1, 256, 640)
    # tiles at 0, 192, 384: columns 192..255 and 384..447 are covered twice
    expected = torch.ones(1, 256, 640)
    expected[:, :, 192:256] = 2
    expected[:, :, 384:448] = 2
    assert torch.equal(total, expected)


def test_mask_batches_are_kept_per_tile():
    layout = tile_layout(512, 1024)
    masks = tile_masks(fit_mask(torch.ones(3, 10, 20), 512, 1024, layout), layout)
    assert [m.shape for m in masks] == [(3, 256, 512)] * 2


# --- CLIP-vision enhancer -----------------------------------------------------------------------------------

def test_split_grid_orders_tiles_row_by_row_image_by_image():
    image = torch.rand(2, 9, 12, 3)
    tiles = split_grid(image, 3)
    assert tiles.shape == (18, 3, 4, 3)
    for b in range(2):
        for i in range(3):
            for j in range(3):
                assert torch.equal(tiles[b * 9 + i * 3 + j], image[b, i * 3:i * 3 + 3, j * 4:j * 4 + 4])
    assert split_grid(torch.rand(1, 10, 11, 3), 3).shape == (9, 3, 3, 3)  # remainders left out
    with pytest.raises(IPAdapterInputError, match="enhance_tiles"):
        split_grid(torch.rand(1, 2, 5, 3), 3)


@pytest.mark.parametrize("tiles,side,has_class", [(2, 4, True), (3, 4, True), (2, 3, False)])
def test_pool_tile_tokens_is_the_block_mean_of_the_merged_grid(tiles, side, has_class):
    images, channels = 2, 5
    length = side * side + int(has_class)
    hidden = torch.randn(images * tiles * tiles, length, channels, dtype=torch.float64)
    pooled = pool_tile_tokens(hidden, tiles)
    assert pooled.shape == (images, length, channels)
    offset = int(has_class)
    for b in range(images):
        def merged(r, c):  # token at row r, column c of the (tiles*side)^2 grid of image b
            tile = b * tiles * tiles + (r // side) * tiles + (c // side)
            return hidden[tile, offset + (r % side) * side + (c % side)]

        for i in range(side):
            for j in range(side):
                block = [merged(tiles * i + u, tiles * j + v) for u in range(tiles) for v in range(tiles)]
                expected = sum(block) / len(block)
                assert torch.allclose(pooled[b, offset + i * side + j], expected)
        if has_class:
            expected_class = hidden[b * tiles * tiles:(b + 1) * tiles * tiles, 0].mean(0)
            assert torch.allclose(pooled[b, 0], expected_class)


def test_pool_refuses_token_counts_without_a_square_grid():
    with pytest.raises(IPAdapterInputError, match="square"):
        pool_tile_tokens(torch.randn(4, 7, 3), 2)


def fake_adapter(clip_output: str):
    return SimpleNamespace(info=SimpleNamespace(clip_output=clip_output), describe=lambda: f"adapter ({clip_output})")


def test_enhance_tiles_checks_its_value_and_the_adapter_kind():
    plus, base = fake_adapter("penultimate_hidden_states"), fake_adapter("image_embeds")
    assert check_enhance_tiles(plus, 1) == 1 and check_enhance_tiles(plus, 16) == 16
    assert check_enhance_tiles(base, 1) == 1  # off: fine for every adapter
    for bad in (0, 17, True, 2.0, "2"):
        with pytest.raises(IPAdapterInputError, match="enhance_tiles"):
            check_enhance_tiles(plus, bad)
    with pytest.raises(IPAdapterInputError, match="enhance_tiles=2 needs an adapter fed by CLIP vision hidden"):
        check_enhance_tiles(base, 2)


# --- regional params ----------------------------------------------------------------------------------------

def region(mask=None, **overrides):
    args = dict(image=torch.rand(1, 8, 8, 3), weight=0.7, weight_type="linear", start_at=0.0, end_at=1.0)
    return make_region(**{**args, **overrides}, mask=mask)


@pytest.mark.parametrize("overrides,match", [
    (dict(image=None), "image must be an IMAGE"),
    (dict(image=torch.rand(0, 8, 8, 3)), "image batch is empty"),
    (dict(weight=float("nan")), "image_weight must be a finite number"),
    (dict(weight="1"), "image_weight must be a finite number"),
    (dict(weight_type="loud"), "weight_type must be one of"),
    (dict(start_at=0.6, end_at=0.5), "start_at and end_at"),
    (dict(end_at=float("inf")), "start_at and end_at"),
    (dict(mask=torch.zeros(1, 8, 8)), "mask is zero everywhere"),
    (dict(mask=torch.zeros(1, 0, 8)), "mask has zero area"),
    (dict(mask=torch.zeros(2, 2, 8, 8)), r"mask must be \[H, W\]"),
    (dict(mask=[[1.0]]), "mask must be a MASK"),
])
def test_region_inputs_are_checked_and_named(overrides, match):
    with pytest.raises(ValueError, match=match):
        region(**overrides)


def test_region_mask_is_batched_and_clamped_and_regions_are_immutable():
    r = region(mask=torch.full((8, 8), 3.0))
    assert r.mask.shape == (1, 8, 8) and float(r.mask.max()) == 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.weight = 2.0
    assert r.weight == 0.7 and isinstance(r.weight, float)


def test_combine_params_keeps_order_and_leaves_inputs_alone():
    a, b, c = (IPAdapterParams((region(weight=w),)) for w in (0.1, 0.2, 0.3))
    combined = combine_params([("params_1", a), ("params_2", b), ("params_3", None), ("params_4", c)])
    assert [r.weight for r in combined.regions] == [0.1, 0.2, 0.3]
    assert [r.weight for r in a.regions] == [0.1] and isinstance(combined.regions, tuple)
    with pytest.raises(IPAdapterInputError, match="params_2 must come from IP-Adapter Regional Conditioning"):
        combine_params([("params_1", a), ("params_2", {"image": []})])


def test_mask_batches_must_fit_one_latent_batch():
    one, three, also_three, two = (region(mask=torch.ones(n, 4, 4)) for n in (1, 3, 3, 2))
    check_mask_batches(IPAdapterParams((one, three, also_three, region())))
    with pytest.raises(IPAdapterInputError, match=r"batches of 3 \(region 2\), 2 \(region 3\).*fit no latent"):
        check_mask_batches(IPAdapterParams((one, three, two)))
