"""XformersIPAdapterWeights: per-frame weight schedules and cross-fade image sets for animation."""

from __future__ import annotations

from comfy_api.latest import io

from ..processors.ipadapter.frame_schedule import METHODS, TIMINGS, frame_schedule
from .types import CATEGORY
from .validation import ValidatesCombos

MAX_FRAMES = 9999


def _frame_input(name: str, default: int, tooltip: str) -> io.Int.Input:
    return io.Int.Input(name, default=default, min=0, max=MAX_FRAMES, step=1, tooltip=tooltip)


class XformersIPAdapterWeights(ValidatesCombos, io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="XformersIPAdapterWeights",
            display_name="IP-Adapter Weights (xformers)",
            category=CATEGORY,
            description="Per-frame weights for Apply xformers IP-Adapter Batch (the standard pack's IPAdapter "
                        "Weights): a custom list or a timed curve, laid out over an image batch so two Apply "
                        "Batch nodes (image_1 with weights, image_2 with weights_invert) cross-fade the images.",
            inputs=[
                io.String.Input("weights", default="1.0, 0.0", multiline=True,
                                tooltip="Numbers separated by commas or new lines. custom: one weight per frame; "
                                        "other timings: the curve runs from the first to the last number."),
                io.Combo.Input("timing", options=list(TIMINGS), default="linear",
                               tooltip="custom = the listed weights as they are; linear, ease_in_out, ease_in "
                                       "(sine), ease_out (1 - cosine): a curve from the first to the last weight; "
                                       "random: values between them, the same for the same inputs."),
                _frame_input("frames", 0, "Frames of the schedule (at least 2 for a curve). With custom timing, "
                                          "0 or at least the number of weights listed."),
                _frame_input("start_frame", 0, "Frame where the curve starts; earlier frames hold the first weight."),
                _frame_input("end_frame", MAX_FRAMES, "Frame where the curve ends (at most frames); later frames "
                                                      "hold the last weight."),
                _frame_input("add_starting_frames", 0, "With an image: frames added at the start holding the first "
                                                       "weight and image."),
                _frame_input("add_ending_frames", 0, "With an image: frames added at the end holding the last "
                                                     "weight and image."),
                io.Combo.Input("method", options=list(METHODS), default="full batch",
                               tooltip="With an image batch: full batch = the schedule once per image; shift "
                                       "batches = image k fades into image k+1 (image_1 -> image_2); alternate "
                                       "batches = the same with the two slots swapped at every transition."),
                io.Image.Input("image", optional=True,
                               tooltip="Images to lay the schedule out over (one schedule per image or per pair)."),
            ],
            outputs=[
                io.Float.Output(display_name="weights", tooltip="The weight of every frame, a list for Apply "
                                                                "xformers IP-Adapter Batch's weight."),
                io.Float.Output(display_name="weights_invert", tooltip="The same weights in reverse order (for "
                                                                       "the image_2 side of a cross-fade)."),
                io.Int.Output(display_name="total_frames", tooltip="How many frames the weights cover: make the "
                                                                   "latent batch this long."),
                io.Image.Output(display_name="image_1", tooltip="One image per frame (with an image input): the "
                                                                "side weighted by weights."),
                io.Image.Output(display_name="image_2", tooltip="One image per frame for shift/alternate batches: "
                                                                "the side weighted by weights_invert."),
            ],
        )

    @classmethod
    def execute(cls, weights: str, timing: str, frames: int, start_frame: int, end_frame: int,
                add_starting_frames: int, add_ending_frames: int, method: str, image=None) -> io.NodeOutput:
        schedule = frame_schedule(weights, timing, frames, start_frame, end_frame, add_starting_frames,
                                  add_ending_frames, method, image)
        return io.NodeOutput(schedule.weights, schedule.weights_invert, schedule.total_frames, schedule.image_1,
                             schedule.image_2)
