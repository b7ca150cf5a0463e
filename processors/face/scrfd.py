"""SCRFD face detector: input letterboxing and output decoding (anchors, distances, NMS).

Behaviour of InsightFace's ``model_zoo/scrfd.py`` for the packs' detectors (``det_10g.onnx`` in buffalo_l,
``scrfd_10g_bnkps.onnx`` in antelopev2): the image is resized to fit a square input (default 640) keeping its
aspect ratio, placed at the top-left of a zero canvas, normalised as (v - 127.5) / 128 with v in 0..255. The
network returns, per stride (8, 16, 32), a score, 4 box distances and 10 keypoint offsets for each of 2 anchors at
every stride-th pixel; distances are in stride units. Boxes above the score threshold (0.5) are kept, sorted by
score and thinned by NMS (IoU 0.4, InsightFace's +1 pixel area convention).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_INPUT_SIZE = 640
SCORE_THRESHOLD = 0.5
NMS_THRESHOLD = 0.4
# What the network's output count says about its heads (InsightFace's SCRFD routing): only layouts with
# keypoints are usable here, since alignment needs the 5 points.
LAYOUTS = {9: ((8, 16, 32), 2), 15: ((8, 16, 32, 64, 128), 1)}


@dataclass(frozen=True)
class Letterbox:
    """An image resized into the detector input: `scale` = resized / original, content at the top-left."""

    tensor: np.ndarray  # [1, 3, size, size] float32, normalised
    scale: float


@dataclass(frozen=True)
class Detections:
    """Detections in original image pixels, best score first: boxes [N, 4] (x1, y1, x2, y2), scores [N],
    kps [N, 5, 2]."""

    boxes: np.ndarray
    scores: np.ndarray
    kps: np.ndarray


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(new_height, new_width) of an image fitted into a `size` square, InsightFace's integer truncation."""
    if height / width > 1.0:
        return size, int(size / (height / width))
    return int(size * (height / width)), size


def letterbox(image_u8: torch.Tensor, size: int = DEFAULT_INPUT_SIZE, channels: str = "RGB") -> Letterbox:
    """The detector input for `image_u8` [H, W, 3] (RGB, float values 0..255 already quantised to integers).

    Resize is bilinear with half-pixel centres and no antialiasing (OpenCV's INTER_LINEAR), rounded back to
    integers as OpenCV's uint8 resize does. `channels` "BGR" feeds the network the channels reversed.
    """
    height, width = int(image_u8.shape[0]), int(image_u8.shape[1])
    new_h, new_w = resized_shape(height, width, size)
    if new_h < 1 or new_w < 1:
        raise ValueError(f"image {width}x{height} is too thin to fit a {size} px detector input")
    chw = image_u8.permute(2, 0, 1).unsqueeze(0).to(torch.float32)
    if (new_h, new_w) != (height, width):
        chw = F.interpolate(chw, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=False)
        chw = chw.round().clamp(0, 255)
    if channels == "BGR":
        chw = chw.flip(1)
    canvas = torch.zeros((1, 3, size, size), dtype=torch.float32)
    canvas[:, :, :new_h, :new_w] = chw
    normalised = ((canvas - 127.5) / 128.0).numpy()
    return Letterbox(tensor=np.ascontiguousarray(normalised), scale=new_h / height)


def anchor_centers(height: int, width: int, stride: int, num_anchors: int) -> np.ndarray:
    """Anchor centres [height*width*num_anchors, 2] (x, y) in input pixels: row by row, each location repeated
    `num_anchors` times consecutively (the order of the network's outputs)."""
    ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    centers = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float32) * stride
    return np.repeat(centers, num_anchors, axis=0)


def distance2bbox(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """Boxes [N, 4] from points [N, 2] and distances [N, 4] to the left, top, right and bottom edges."""
    return np.stack([points[:, 0] - distance[:, 0], points[:, 1] - distance[:, 1],
                     points[:, 0] + distance[:, 2], points[:, 1] + distance[:, 3]], axis=-1)


def distance2kps(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """Keypoints [N, K, 2] from points [N, 2] and offsets [N, 2K] (x0, y0, x1, y1, ...)."""
    offsets = distance.reshape(len(distance), distance.shape[1] // 2, 2)
    return points[:, None, :] + offsets


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float = NMS_THRESHOLD) -> list[int]:
    """Indices kept by greedy non-maximum suppression, best score first. Overlap is IoU with areas counted as
    (x2 - x1 + 1) * (y2 - y1 + 1), as InsightFace counts them; a box goes when its IoU with a kept one > threshold."""
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        best, rest = int(order[0]), order[1:]
        keep.append(best)
        inter_w = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + 1)
        inter_h = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + 1)
        inter = inter_w * inter_h
        overlap = inter / (areas[best] + areas[rest] - inter)
        order = rest[overlap <= threshold]
    return keep


def _per_stride(output: np.ndarray, width: int) -> np.ndarray:
    """One head's output as [N, width] (some exports add a leading batch dimension of 1)."""
    array = np.asarray(output, dtype=np.float32)
    return array.reshape(-1, width)


def decode(outputs: list[np.ndarray], input_height: int, input_width: int,
           score_threshold: float = SCORE_THRESHOLD) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidates above `score_threshold` from the raw outputs (scores per stride, then boxes, then keypoints),
    in input pixels: boxes [M, 4], scores [M], kps [M, 5, 2]; not yet sorted or thinned."""
    if len(outputs) not in LAYOUTS:
        raise ValueError(f"an SCRFD detector with keypoints has 9 or 15 outputs, this one has {len(outputs)}")
    strides, num_anchors = LAYOUTS[len(outputs)]
    heads = len(strides)
    boxes, scores, kps = [], [], []
    for index, stride in enumerate(strides):
        centers = anchor_centers(input_height // stride, input_width // stride, stride, num_anchors)
        stride_scores = _per_stride(outputs[index], 1)[:, 0]
        if len(stride_scores) != len(centers):
            raise ValueError(f"stride {stride}: {len(stride_scores)} scores for {len(centers)} anchors of a "
                             f"{input_width}x{input_height} input")
        positive = np.nonzero(stride_scores >= score_threshold)[0]
        box_dist = _per_stride(outputs[index + heads], 4)[positive] * stride
        kps_dist = _per_stride(outputs[index + 2 * heads], 10)[positive] * stride
        boxes.append(distance2bbox(centers[positive], box_dist))
        kps.append(distance2kps(centers[positive], kps_dist))
        scores.append(stride_scores[positive])
    return np.concatenate(boxes), np.concatenate(scores), np.concatenate(kps)


def postprocess(outputs: list[np.ndarray], input_size: int, scale: float,
                score_threshold: float = SCORE_THRESHOLD, nms_threshold: float = NMS_THRESHOLD) -> Detections:
    """Decoded, thinned detections in original image pixels (divided by the letterbox `scale`), best first."""
    boxes, scores, kps = decode(outputs, input_size, input_size, score_threshold)
    keep = nms(boxes, scores, nms_threshold)
    return Detections(boxes=boxes[keep] / scale, scores=scores[keep], kps=kps[keep] / scale)
