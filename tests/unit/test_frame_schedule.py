"""IP-Adapter Weights' schedules against the plain formulas, written out here."""
from __future__ import annotations

import math

import pytest
import torch

from processors.ipadapter import IPAdapterInputError
from processors.ipadapter.frame_schedule import frame_schedule, parse_weights, timed_weights


def schedule(weights="0.0, 1.0", timing="linear", frames=5, start_frame=0, end_frame=9999, add_starting_frames=0,
             add_ending_frames=0, method="full batch", image=None):
    return frame_schedule(weights, timing, frames, start_frame, end_frame, add_starting_frames, add_ending_frames,
                          method, image)


def frames_of(count: int) -> torch.Tensor:
    """`count` images whose pixels all equal their index, so a layout can be read back as indices."""
    return torch.arange(count, dtype=torch.float32)[:, None, None, None].expand(count, 2, 2, 3).clone()


def indices(image: torch.Tensor) -> list[int]:
    return [int(v) for v in image[:, 0, 0, 0]]


def test_parse_accepts_commas_new_lines_and_blanks():
    assert parse_weights("1, 0.5\n0.25,,\n -1 ") == [1.0, 0.5, 0.25, -1.0]
    for bad in ("1, x", "1, nan", "inf"):
        with pytest.raises(IPAdapterInputError, match="weights"):
            parse_weights(bad)


@pytest.mark.parametrize("timing,curve", [
    ("linear", lambda t: t),
    ("ease_in_out", lambda t: 0.5 - 0.5 * math.cos(math.pi * t)),
    ("ease_in", lambda t: math.sin(0.5 * math.pi * t)),
    ("ease_out", lambda t: 1.0 - math.cos(0.5 * math.pi * t)),
])
def test_curves_run_from_first_to_last_weight(timing, curve):
    got = timed_weights([0.2, 9.0, 1.4], timing, frames=7, start_frame=0, end_frame=9999)
    expected = [0.2 + 1.2 * curve(i / 6) for i in range(7)]
    assert got == pytest.approx(expected, abs=1e-12)
    assert got[0] == 0.2 and got[-1] == 1.4


def test_start_and_end_frames_hold_the_ends():
    got = timed_weights([1.0, 0.0], "linear", frames=10, start_frame=2, end_frame=6)
    # frames 0-1 hold 1.0, frames 2..5 go 1 -> 0 in 3 steps, frames 6-9 hold 0.0
    assert got == pytest.approx([1.0, 1.0, 1.0, 2 / 3, 1 / 3, 0.0, 0.0, 0.0, 0.0, 0.0])


def test_curve_defaults_and_minimum_length():
    assert timed_weights([], "linear", frames=0, start_frame=0, end_frame=9999) == [0.0, 1.0]
    assert timed_weights([0.5], "ease_in", frames=3, start_frame=0, end_frame=9999) == [0.5, 0.5, 0.5]


def test_random_is_within_the_ends_and_the_same_every_time():
    first = timed_weights([0.3, 0.8], "random", frames=12, start_frame=0, end_frame=9999)
    assert first == timed_weights([0.3, 0.8], "random", frames=12, start_frame=0, end_frame=9999)
    assert len(first) == 12 and all(0.3 <= w <= 0.8 for w in first) and len(set(first)) > 1


def test_custom_keeps_the_list_and_checks_frames():
    assert timed_weights([0.1, 0.7, 0.3], "custom", frames=0, start_frame=0, end_frame=9999) == [0.1, 0.7, 0.3]
    assert timed_weights([], "custom", frames=0, start_frame=0, end_frame=9999) == [0.0]
    with pytest.raises(IPAdapterInputError, match="weights lists 3 values but frames is 2"):
        timed_weights([0.1, 0.7, 0.3], "custom", frames=2, start_frame=0, end_frame=9999)


@pytest.mark.parametrize("start,end,frames", [(5, 5, 10), (6, 3, 10), (12, 9999, 10)])
def test_frames_out_of_range_are_named(start, end, frames):
    with pytest.raises(IPAdapterInputError, match="start_frame"):
        timed_weights([1.0, 0.0], "linear", frames=frames, start_frame=start, end_frame=end)


def test_full_batch_repeats_the_schedule_per_image():
    out = schedule("1, 0", frames=3, image=frames_of(2))
    assert out.weights == [1.0, 0.5, 0.0, 1.0, 0.5, 0.0]
    assert indices(out.image_1) == [0, 0, 0, 1, 1, 1] and out.image_2 is None
    assert out.weights_invert == out.weights[::-1] and out.total_frames == 6


def test_shift_batches_fade_each_image_into_the_next():
    out = schedule("1, 0", frames=2, image=frames_of(3), method="shift batches")
    assert out.weights == [1.0, 0.0, 1.0, 0.0]
    assert indices(out.image_1) == [0, 0, 1, 1] and indices(out.image_2) == [1, 1, 2, 2]


@pytest.mark.parametrize("count", [2, 3, 4, 5])
def test_alternate_batches_swap_slots_and_invert_every_other_transition(count):
    w = [1.0, 0.25, 0.0]  # custom: min 0, max 1, so inverted within its range = 1 - w
    out = schedule("1, 0.25, 0", timing="custom", frames=0, image=frames_of(count), method="alternate batches")
    inverted = [1.0 - x for x in w]
    expected_weights, slot_1, slot_2 = [], [], []
    for k in range(count - 1):  # transition k: images k and k+1, the even one in slot 1
        even, odd = (k, k + 1) if k % 2 == 0 else (k + 1, k)
        expected_weights += w if k % 2 == 0 else inverted
        slot_1 += [even] * 3
        slot_2 += [odd] * 3
    assert out.weights == pytest.approx(expected_weights)
    assert indices(out.image_1) == slot_1 and indices(out.image_2) == slot_2


def test_added_frames_hold_first_and_last():
    out = schedule("1, 0", frames=2, image=frames_of(3), method="shift batches", add_starting_frames=2,
                   add_ending_frames=1)
    assert out.weights == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    assert indices(out.image_1) == [0, 0, 0, 0, 1, 1, 2] and indices(out.image_2) == [0, 0, 1, 1, 2, 2, 2]
    # without an image the standard pack adds no frames
    assert schedule("1, 0", frames=2, add_starting_frames=2).weights == [1.0, 0.0]


def test_cross_fading_needs_two_images_and_a_known_method():
    with pytest.raises(IPAdapterInputError, match="at least 2"):
        schedule(image=frames_of(1), method="shift batches")
    with pytest.raises(IPAdapterInputError, match="method"):
        schedule(method="every other")
    with pytest.raises(IPAdapterInputError, match="timing"):
        schedule(timing="bounce")
    with pytest.raises(IPAdapterInputError, match="frames"):
        schedule(frames=-1)
