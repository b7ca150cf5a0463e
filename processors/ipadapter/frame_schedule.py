"""Per-frame weight schedules for animation (the IP-Adapter Weights node's maths), host-agnostic.

Behaviour follows the de-facto standard pack's IPAdapterWeights so migrated workflows animate the same way:

- `custom`: the listed weights, one per frame.
- other timings: a curve from the first listed weight to the last (0 -> 1 when none are listed) over
  `start_frame` .. `end_frame` of `frames` frames (at least 2), holding the first value before `start_frame`
  and the last after `end_frame`. With i = 0 .. n over the transition (n = its length - 1), t = i / n:
  linear t; ease_in_out (1 - cos(pi t)) / 2; ease_in sin(pi t / 2); ease_out 1 - cos(pi t / 2) (the standard
  pack's names for these two curves); random a uniform draw between the two ends, seeded so the same inputs
  always give the same weights.
- with an image batch, the schedule is laid out per image (`method`): `full batch` repeats it for every
  image; `shift batches` cross-fades image k into image k+1 (image_1 / image_2); `alternate batches` swaps
  the two slots at every transition, using the schedule inverted within its own range on every other one.
  `add_starting_frames` / `add_ending_frames` then hold the first / last weight and image (only with an
  image, as in the standard pack).
- `weights_invert` is the schedule reversed; `total_frames` its length.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .errors import IPAdapterInputError

TIMINGS = ("custom", "linear", "ease_in_out", "ease_in", "ease_out", "random")
METHODS = ("full batch", "shift batches", "alternate batches")
# `random` is reproducible: the same inputs give the same weights in every run and process.
RANDOM_SEED = 0

_CURVES: dict[str, Callable[[float], float]] = {
    "linear": lambda t: t,
    "ease_in_out": lambda t: (1 - math.cos(t * math.pi)) / 2,
    "ease_in": lambda t: math.sin(t * math.pi / 2),
    "ease_out": lambda t: 1 - math.cos(t * math.pi / 2),
}


@dataclass(frozen=True)
class FrameSchedule:
    weights: list[float]
    weights_invert: list[float]
    image_1: Optional[torch.Tensor]
    image_2: Optional[torch.Tensor]

    @property
    def total_frames(self) -> int:
        return len(self.weights)


def parse_weights(text: str) -> list[float]:
    """Numbers separated by commas or new lines; blanks are skipped."""
    if not isinstance(text, str):
        raise IPAdapterInputError(f"weights must be a string of numbers separated by commas; got "
                                  f"{type(text).__name__}")
    values = []
    for part in text.replace("\n", ",").split(","):
        if not part.strip():
            continue
        try:
            value = float(part)
        except ValueError:
            raise IPAdapterInputError(f"weights: {part.strip()!r} is not a number; expected numbers separated "
                                      f"by commas or new lines, e.g. '1.0, 0.5, 0.0'") from None
        if not math.isfinite(value):
            raise IPAdapterInputError(f"weights: {part.strip()!r} is not a finite number")
        values.append(value)
    return values


def timed_weights(listed: list[float], timing: str, frames: int, start_frame: int, end_frame: int) -> list[float]:
    """The per-frame schedule before any image layout (see the module docstring)."""
    if timing not in TIMINGS:
        raise IPAdapterInputError(f"timing must be one of {', '.join(TIMINGS)}; got {timing!r}")
    for name, value in (("frames", frames), ("start_frame", start_frame), ("end_frame", end_frame)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise IPAdapterInputError(f"{name} must be a whole number >= 0; got {value!r}")
    if timing == "custom":
        if frames > 0 and len(listed) > frames:
            raise IPAdapterInputError(f"weights lists {len(listed)} values but frames is {frames}: with timing "
                                      f"'custom' give at most one weight per frame (or set frames to 0)")
        return list(listed) or [0.0]
    frames = max(frames, 2)
    first, last = (listed[0], listed[-1]) if listed else (0.0, 1.0)
    stop = min(end_frame, frames)
    if start_frame >= stop:
        raise IPAdapterInputError(f"start_frame ({start_frame}) must be below end_frame ({end_frame}) and below "
                                  f"frames ({frames}): the transition would have no frames")
    span = stop - start_frame
    if timing == "random":
        draw = random.Random(RANDOM_SEED)
        ramp = [draw.uniform(first, last) for _ in range(span)]
    else:
        curve = _CURVES[timing]
        ramp = [first + (last - first) * curve(i / (span - 1)) for i in range(span - 1)] + [last]
    return [first] * start_frame + ramp + [last] * (frames - stop)


def _inverted_in_range(weights: list[float]) -> list[float]:
    high, low = max(weights), min(weights)
    return [high - (w - low) for w in weights]


def _layout(schedule: list[float], image: torch.Tensor, method: str):
    """(weights, image_1, image_2) with each image (pair) held for one schedule's length."""
    count, per = image.shape[0], len(schedule)
    if method == "full batch":
        return schedule * count, image.repeat_interleave(per, 0), None
    if count < 2:
        raise IPAdapterInputError(f"method '{method}' cross-fades between images and needs at least 2; the image "
                                  f"batch has {count}")
    if method == "shift batches":
        return (schedule * (count - 1), image[:-1].repeat_interleave(per, 0),
                image[1:].repeat_interleave(per, 0))
    # alternate batches: transition k fades image k into image k+1 with the two slots swapped on every other
    # transition, so slot 1 holds the even images and slot 2 the odd ones; odd transitions run inverted
    transitions = count - 1
    first = torch.tensor([2 * ((k + 1) // 2) for k in range(transitions)])
    second = torch.tensor([2 * (k // 2) + 1 for k in range(transitions)])
    inverted = _inverted_in_range(schedule)
    weights = [w for k in range(transitions) for w in (schedule if k % 2 == 0 else inverted)]
    return weights, image[first].repeat_interleave(per, 0), image[second].repeat_interleave(per, 0)


def frame_schedule(weights: str, timing: str, frames: int, start_frame: int, end_frame: int,
                   add_starting_frames: int, add_ending_frames: int, method: str,
                   image: Optional[torch.Tensor] = None) -> FrameSchedule:
    if method not in METHODS:
        raise IPAdapterInputError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    for name, value in (("add_starting_frames", add_starting_frames), ("add_ending_frames", add_ending_frames)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise IPAdapterInputError(f"{name} must be a whole number >= 0; got {value!r}")
    schedule = timed_weights(parse_weights(weights), timing, frames, start_frame, end_frame)
    image_1 = image_2 = None
    if image is not None:
        if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[0] == 0:
            raise IPAdapterInputError("image must be an IMAGE batch [frames, height, width, channels] with at "
                                      "least one image")
        schedule, image_1, image_2 = _layout(schedule, image, method)
        head, tail = image[:1], image[-1:]
        schedule = [schedule[0]] * add_starting_frames + schedule + [schedule[-1]] * add_ending_frames
        pad = (lambda x: torch.cat([head.expand(add_starting_frames, *head.shape[1:]), x,
                                    tail.expand(add_ending_frames, *tail.shape[1:])]))
        image_1 = pad(image_1)
        image_2 = pad(image_2) if image_2 is not None else None
    return FrameSchedule(schedule, schedule[::-1], image_1, image_2)
