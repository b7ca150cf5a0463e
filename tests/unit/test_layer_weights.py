"""layer_weights strings (the standard pack's Mad Scientist indices) and the Style & Composition block table."""

import pytest

from processors.weight_types import block_weight, parse_layer_weights, style_composition_weights


def test_parse_accepts_commas_new_lines_and_spaces():
    assert parse_layer_weights("", 16) is None and parse_layer_weights(" ,\n ", 16) is None
    assert parse_layer_weights("0:1, 6:0.5,\n15 : -1e-1", 16) == {0: 1.0, 6: 0.5, 15: -0.1}
    assert parse_layer_weights("3:2\n4:0", 11) == {3: 2.0, 4: 0.0}


@pytest.mark.parametrize("text, message", [
    ("3", "not an 'index:weight' pair"),
    ("3:1:2", "not an 'index:weight' pair"),
    ("x:1", "index 'x' in 'x:1' is not an integer"),
    ("1.5:1", "is not an integer"),
    ("3:strong", "weight 'strong' in '3:strong' is not a number"),
    ("11:1", r"index 11 in '11:1' is out of range: this model has 11 blocks .* 0..10"),
    ("-1:1", "out of range"),
    ("2:inf", "finite"),
    ("2:1, 2:0.5", "index 2 appears twice"),
])
def test_parse_errors_name_the_entry_and_the_format(text, message):
    with pytest.raises(ValueError, match=message):
        parse_layer_weights(text, 11)


def test_layer_weights_override_the_weight_type_times_weight():
    overrides = {0: 1.0, 6: 0.5}
    got = [block_weight("ease in", 2.0, t, 16, "input", False, overrides).weight for t in range(16)]
    assert got == [2.0] + [0.0] * 5 + [1.0] + [0.0] * 9


def test_precise_types_keep_their_swap_with_layer_weights():
    overrides = {3: 1.0, 6: 1.0, 0: 0.0}
    style = {t: block_weight("style transfer precise", 1.0, t, 11, "input", True, overrides) for t in (0, 3, 6)}
    assert style[3].swap and not style[6].swap and not style[0].swap  # SDXL composition block t3 is swapped
    comp = {t: block_weight("composition precise", 1.0, t, 11, "input", True, overrides) for t in (3, 6)}
    assert comp[6].swap and not comp[3].swap
    assert not block_weight("linear", 1.0, 3, 11, "input", True, overrides).swap


# Style & Composition, written out from the standard pack's tables (docs: its "style and composition" and
# internal "strong style and composition" weight dicts): SDXL style block t6, composition block t3; SD1.5 style
# t0-3 and t9-15, composition t4 (x0.25) and t5.
@pytest.mark.parametrize("sdxl, expand, expected", [
    (True, False, {3: (0.0, 0.7), 6: (2.0, 0.0)}),
    (True, True, {**{t: (2.0, 0.0) for t in range(11)}, 3: (0.0, 0.7)}),
    (False, False, {**{t: (2.0, 0.0) for t in (0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15)}, 4: (0.0, 0.175),
                    5: (0.0, 0.7)}),
    (False, True, {**{t: (2.0, 0.0) for t in range(16)}, 4: (0.0, 0.7), 5: (0.0, 0.7)}),
])
def test_style_composition_block_table(sdxl, expand, expected):
    layers = 11 if sdxl else 16
    got = {t: style_composition_weights(2.0, 0.7, expand, t, sdxl) for t in range(layers)}
    for t in range(layers):
        assert got[t] == pytest.approx(expected.get(t, (0.0, 0.0))), t


def test_style_and_composition_weight_type_keeps_composition_at_one():
    """Apply's 'style and composition' weight type is unchanged: the composition blocks get 1.0."""
    assert block_weight("style and composition", 0.4, 3, 11, "input", True).weight == 1.0
    assert block_weight("style and composition", 0.4, 6, 11, "output", True).weight == 0.4
