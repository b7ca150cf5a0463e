"""processors/images.py: square crop/pad, resampling (Pillow as the oracle), sharpening, deterministic noise."""

from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from processors.images import (CROP_POSITIONS, INTERPOLATIONS, make_noise, noise_base, prep_for_clip_vision,
                               resize, sharpen)

FILTERED = [i for i in INTERPOLATIONS if i != "NEAREST"]


def rows_image(height: int, width: int) -> torch.Tensor:
    """[1, H, W, 3]: channel 0 = row index / 1000, channel 1 = column index / 1000, channel 2 = 1."""
    rows = torch.arange(height, dtype=torch.float32)[:, None].expand(height, width) / 1000
    cols = torch.arange(width, dtype=torch.float32)[None, :].expand(height, width) / 1000
    return torch.stack([rows, cols, torch.ones(height, width)], dim=-1)[None]


@pytest.mark.parametrize("interpolation", FILTERED)
@pytest.mark.parametrize("shape", [(300, 200, 224, 224), (100, 90, 224, 224), (224, 224, 100, 50),
                                   (37, 500, 224, 224)])
def test_resize_matches_pillow_float_resampling(interpolation, shape):
    in_h, in_w, out_h, out_w = shape
    pixels = np.random.default_rng(1).random((in_h, in_w)).astype(np.float32)
    expected = np.asarray(Image.fromarray(pixels, mode="F").resize((out_w, out_h), Image.Resampling[interpolation]))
    got = resize(torch.from_numpy(pixels)[None, :, :, None], out_h, out_w, interpolation)[0, :, :, 0].numpy()
    assert got.shape == (out_h, out_w)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_nearest_takes_the_pixel_under_each_output_centre():
    image = rows_image(300, 77)
    out = resize(image, 224, 224, "NEAREST")
    want_rows = [int((Fraction(2 * i + 1, 2) * Fraction(300, 224))) for i in range(224)]
    want_cols = [int((Fraction(2 * i + 1, 2) * Fraction(77, 224))) for i in range(224)]
    assert (out[0, :, 0, 0] * 1000).round().int().tolist() == want_rows
    assert (out[0, 0, :, 1] * 1000).round().int().tolist() == want_cols


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_flat_image_stays_flat_and_input_is_untouched(interpolation):
    image = torch.full((2, 123, 301, 3), 0.25)
    before = image.clone()
    out = prep_for_clip_vision(image, interpolation, "center", 0.0)
    assert out.shape == (2, 224, 224, 3)
    assert torch.allclose(out, torch.full_like(out, 0.25), atol=1e-6)
    assert torch.equal(image, before)


@pytest.mark.parametrize("position, first_row", [("top", 0), ("bottom", 100), ("center", 50), ("left", 50),
                                                 ("right", 50)])
def test_crop_positions_on_a_portrait_image(position, first_row):
    out = prep_for_clip_vision(rows_image(300, 200), "NEAREST", position, 0.0, size=200)  # no resampling
    assert out.shape == (1, 200, 200, 3)
    assert (out[0, :, 0, 0] * 1000).round().int().tolist() == list(range(first_row, first_row + 200))
    assert (out[0, 0, :, 1] * 1000).round().int().tolist() == list(range(200))


@pytest.mark.parametrize("position, first_col", [("left", 0), ("right", 100), ("center", 50), ("top", 50),
                                                 ("bottom", 50)])
def test_crop_positions_on_a_landscape_image(position, first_col):
    out = prep_for_clip_vision(rows_image(200, 300), "NEAREST", position, 0.0, size=200)
    assert (out[0, 0, :, 1] * 1000).round().int().tolist() == list(range(first_col, first_col + 200))
    assert (out[0, :, 0, 0] * 1000).round().int().tolist() == list(range(200))


def test_pad_keeps_everything_and_adds_black_bars():
    image = torch.ones(1, 5, 2, 3)  # odd difference: 1 column before, 2 after
    out = prep_for_clip_vision(image, "NEAREST", "pad", 0.0, size=5)
    assert out.shape == (1, 5, 5, 3)
    assert out[0, 0, :, 0].tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]
    wide = prep_for_clip_vision(torch.ones(1, 2, 6, 3), "NEAREST", "pad", 0.0, size=6)
    assert wide[0, :, 0, 0].tolist() == [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]


def test_pad_of_a_square_image_changes_nothing():
    image = torch.rand(1, 224, 224, 3)
    assert torch.equal(prep_for_clip_vision(image, "LANCZOS", "pad", 0.0), image)


def test_sharpening_hand_computed_centre_and_flat_regions():
    # centre 0.5, all 8 neighbours 0.25: soft min 0.25 + 0.25, soft max 0.5 + 0.25;
    # amp = sqrt(min(0.5, 2 - 0.75) / 0.75); lobe = -amp / 5 at amount 1; out = (4 * 0.25 * lobe + 0.5) / (1 + 4 lobe)
    image = torch.full((1, 3, 3, 1), 0.25)
    image[0, 1, 1, 0] = 0.5
    amp = (0.5 / 0.75) ** 0.5
    lobe = -amp / 5
    expected = (1.0 * lobe + 0.5) / (1 + 4 * lobe)
    assert sharpen(image, 1.0)[0, 1, 1, 0].item() == pytest.approx(expected, rel=1e-5)
    flat = torch.full((1, 8, 8, 3), 0.6)
    assert torch.allclose(sharpen(flat, 1.0), flat)
    assert torch.equal(sharpen(image, 0.0), image)


def test_more_sharpening_moves_an_edge_further():
    edge = torch.full((1, 16, 16, 1), 0.2)  # CAS leaves pixels next to pure black alone (no headroom)
    edge[:, :, 8:] = 0.6
    edge[:, :, 7] = 0.3
    half, full = sharpen(edge, 0.5), sharpen(edge, 1.0)
    assert half[0, 5, 7, 0] != pytest.approx(0.3)
    assert abs(full[0, 5, 7, 0] - 0.3) > abs(half[0, 5, 7, 0] - 0.3)
    assert float(full.min()) >= 0.0 and float(full.max()) <= 1.0


@pytest.mark.parametrize("name, call", [
    ("interpolation", lambda: prep_for_clip_vision(torch.rand(1, 8, 8, 3), "CUBIC", "center", 0.0)),
    ("crop_position", lambda: prep_for_clip_vision(torch.rand(1, 8, 8, 3), "BOX", "middle", 0.0)),
    ("sharpening", lambda: prep_for_clip_vision(torch.rand(1, 8, 8, 3), "BOX", "center", 1.5)),
    ("type", lambda: make_noise("salt", 0.5, 0)),
    ("strength", lambda: make_noise("fade", -0.1, 0)),
    ("blur", lambda: make_noise("fade", 0.5, 33)),
])
def test_bad_arguments_name_the_input(name, call):
    with pytest.raises(ValueError, match=f"^{name}"):
        call()


# --- noise ----------------------------------------------------------------------------------------------

@pytest.fixture
def photo() -> torch.Tensor:
    return torch.rand(1, 224, 224, 3, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("kind", ["fade", "dissolve", "gaussian", "shuffle"])
def test_noise_is_deterministic_and_leaves_global_rng_alone(kind, photo):
    state = torch.get_rng_state()
    first = make_noise(kind, 0.4, 3, photo)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(1234)  # global state must not matter
    second = make_noise(kind, 0.4, 3, photo.clone())
    assert torch.equal(first, second)
    assert first.shape == (1, 224, 224, 3) and float(first.min()) >= 0 and float(first.max()) <= 1
    assert not torch.equal(first, make_noise(kind, 0.6, 3, photo))  # strength matters
    assert not torch.equal(first, make_noise(kind, 0.4, 3, torch.flip(photo, dims=(2,))))  # so does the image


@pytest.mark.parametrize("kind", ["fade", "dissolve", "gaussian"])
def test_strength_zero_returns_the_image(kind, photo):
    assert torch.equal(make_noise(kind, 0.0, 0, photo), photo)


def test_shuffle_at_strength_zero_still_rearranges(photo):
    out = make_noise("shuffle", 0.0, 0, photo)
    assert (out - photo).abs().mean() > 0.05


def test_fade_is_a_blend_with_uniform_noise():
    grey = torch.full((1, 224, 224, 3), 0.5)
    full = make_noise("fade", 1.0, 0, grey)
    assert abs(full.mean().item() - 0.5) < 0.01 and abs(full.var().item() - 1 / 12) < 0.005  # U(0, 1)
    half = make_noise("fade", 0.5, 0, grey)
    assert torch.allclose(half, 0.25 + 0.5 * full, atol=1e-6)  # same draws: 0.5 * 0.5 + 0.5 * u


def test_dissolve_replaces_about_strength_of_the_values():
    grey = torch.full((1, 224, 224, 3), 0.5)
    changed = (make_noise("dissolve", 0.3, 0, grey) != 0.5).float().mean().item()
    assert changed == pytest.approx(0.3, abs=0.01)


def test_gaussian_adds_noise_of_std_strength():
    grey = torch.full((1, 224, 224, 3), 0.5)
    delta = make_noise("gaussian", 0.1, 0, grey) - 0.5
    assert delta.mean().item() == pytest.approx(0.0, abs=0.002)
    assert delta.std().item() == pytest.approx(0.1, rel=0.02)


def test_blur_rounds_even_sizes_up_and_smooths(photo):
    assert torch.equal(make_noise("fade", 1.0, 4, photo), make_noise("fade", 1.0, 5, photo))
    sharp, soft = make_noise("fade", 1.0, 0, photo), make_noise("fade", 1.0, 7, photo)
    assert soft.var() < sharp.var() / 4
    assert soft.mean().item() == pytest.approx(sharp.mean().item(), abs=0.01)  # a blur keeps the mean


def test_noise_without_image_starts_from_black_and_with_a_batch_keeps_it():
    assert torch.equal(make_noise("gaussian", 0.0, 0), torch.zeros(1, 224, 224, 3))
    black = make_noise("fade", 0.5, 0)
    assert black.shape == (1, 224, 224, 3) and float(black.max()) <= 0.5
    batch = torch.rand(2, 300, 180, 3)
    before = batch.clone()
    out = make_noise("dissolve", 0.5, 0, batch)
    assert out.shape == (2, 224, 224, 3) and torch.equal(batch, before)


def test_noise_base_centre_crops_then_resizes():
    image = torch.zeros(1, 300, 200, 3)
    image[:, 50:250] = 1.0  # exactly the centre square is white
    assert torch.allclose(noise_base(image), torch.ones(1, 224, 224, 3), atol=1e-6)


@pytest.mark.parametrize("position", CROP_POSITIONS)
def test_every_position_gives_clip_size(position):
    assert prep_for_clip_vision(torch.rand(3, 97, 150, 3), "BICUBIC", position, 0.3).shape == (3, 224, 224, 3)
