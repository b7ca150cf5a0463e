"""weight_type semantics per block, SD1.5 (16 SpatialTransformers) and SDXL (11), middle block included."""

import pytest

from processors.weight_types import WEIGHT_TYPES, block_weight

SD15 = [("input", t) for t in range(6)] + [("middle", 6)] + [("output", t) for t in range(7, 16)]
SDXL = [("input", t) for t in range(4)] + [("middle", 4)] + [("output", t) for t in range(5, 11)]


def weights(weight_type, w=1.0, sdxl=False):
    layout = SDXL if sdxl else SD15
    return [block_weight(weight_type, w, t, len(layout), block, sdxl) for block, t in layout]


def test_linear_is_flat_and_reaches_the_middle_block():
    assert [b.weight for b in weights("linear", 0.7)] == [0.7] * 16
    assert weights("linear", 0.7)[6].weight == 0.7  # SD1.5 middle block (t=6)
    assert weights("linear", 0.7, sdxl=True)[4].weight == 0.7  # SDXL middle block (t=4)


def test_ease_curves():
    ease_in = [b.weight for b in weights("ease in")]
    ease_out = [b.weight for b in weights("ease out")]
    assert ease_in == sorted(ease_in, reverse=True) and ease_out == sorted(ease_out)
    assert ease_in[0] == pytest.approx(1.0) and ease_out[0] == pytest.approx(0.05)
    in_out = [b.weight for b in weights("ease in-out")]
    assert max(in_out) == pytest.approx(1.0) and in_out.index(max(in_out)) == 8  # peaks at L/2
    reverse = [b.weight for b in weights("reverse in-out")]
    assert reverse[8] == pytest.approx(0.05) and reverse[0] == pytest.approx(1.0)


@pytest.mark.parametrize("weight_type, weak_blocks", [
    ("weak input", {"input"}), ("weak output", {"output"}), ("weak middle", {"middle"}),
    ("strong middle", {"input", "output"})])
def test_weak_and_strong_blocks(weight_type, weak_blocks):
    for (block, _), bw in zip(SD15, weights(weight_type, 2.0)):
        assert bw.weight == pytest.approx(0.4 if block in weak_blocks else 2.0)


def test_style_and_composition_presets_sdxl():
    style = [b.weight for b in weights("style transfer", 1.5, sdxl=True)]
    assert style == [1.5 if t == 6 else 0.0 for t in range(11)]
    comp = [b.weight for b in weights("composition", 1.5, sdxl=True)]
    assert comp == [1.5 if t == 3 else 0.0 for t in range(11)]
    strong = [b.weight for b in weights("strong style transfer", 1.0, sdxl=True)]
    assert strong == [0.0 if t == 3 else 1.0 for t in range(11)]
    both = [b.weight for b in weights("style and composition", 0.5, sdxl=True)]
    assert both == [0.5 if t == 6 else 1.0 if t == 3 else 0.0 for t in range(11)]


def test_style_and_composition_presets_sd15():
    style = [b.weight for b in weights("style transfer")]
    assert [t for t, w in enumerate(style) if w] == [0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15]
    comp = [b.weight for b in weights("composition", 2.0)]
    assert comp[4] == pytest.approx(0.5) and comp[5] == 2.0 and sum(comp) == pytest.approx(2.5)


def test_precise_modes_swap_the_right_blocks():
    precise = weights("style transfer precise", 1.0, sdxl=True)
    assert [t for t, b in enumerate(precise) if b.swap] == [3]
    assert [t for t, b in enumerate(precise) if b.weight] == [3, 6]
    comp = weights("composition precise", 1.0, sdxl=True)
    assert [t for t, b in enumerate(comp) if not b.swap] == [3]
    assert comp[6].weight == 1.0 and comp[0].weight == pytest.approx(0.1)
    sd15 = weights("style transfer precise")
    assert [t for t, b in enumerate(sd15) if b.swap] == [4, 5]


def test_every_weight_type_is_defined_and_unknown_ones_are_named():
    for weight_type in WEIGHT_TYPES:
        assert len(weights(weight_type)) == 16
    with pytest.raises(ValueError, match="weight_type must be one of"):
        block_weight("heavy", 1.0, 0, 16, "input", False)
