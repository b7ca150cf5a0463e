"""Tiny synthetic InsightFace model packs: ONNX files with the real packs' signatures and decodable maths.

Generated at test time with the ``onnx`` package's helper API (no downloads, a few kB each). Signatures as the
real files have them:

- detector (``det_10g.onnx`` / ``scrfd_10g_bnkps.onnx``): one input ``input.1`` float32 [1, 3, ?, ?]; 9 outputs,
  scores [N, 1] for strides 8, 16, 32, then boxes [N, 4], then keypoints [N, 10] (det_10g's names 448, 471, 494,
  451, 474, 497, 454, 477, 500), N = (H / stride) * (W / stride) * 2 anchors.
- recognizer (``w600k_r50.onnx`` / ``glintr100.onnx``): input ``input.1`` float32 [None, 3, 112, 112], one
  output [None, 512] (``683`` / ``1333``).
- antelopev2 also gets the models a loader must ignore: ``2d106det.onnx`` [None, 3, 192, 192] -> [None, 212] and
  ``genderage.onnx`` [None, 3, 96, 96] -> [None, 3].

The detector's maths: a pixel is "face" where its normalised channel mean is above 0 (a bright pixel on a dark
background), through a steep sigmoid. The score of an anchor is that brightness at its centre; its box distances
are the counts of face pixels to its left / above it and from it to the right / below in its row / column (CumSum
and ReduceSum), so every anchor inside a bright axis-aligned rectangle predicts exactly that rectangle
[x1, y1, x2, y2) and NMS keeps one. Keypoints are fixed fractions of the box (KPS_FRACTIONS: the ArcFace template
over 112), so ``expected_kps(box)`` is known. Faces must not share image rows or columns (the counts would add up).

The recognizer: 8x8 average pooling to [N, 3, 14, 14], flatten, a fixed seeded random linear map to 512 plus a bias:
different images give different embeddings, the same image the same one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 13
IR_VERSION = 8  # readable by every onnxruntime since 1.10
DET_10G_OUTPUTS = ("448", "471", "494", "451", "474", "497", "454", "477", "500")
SCRFD_10G_BNKPS_OUTPUTS = ("score_8", "score_16", "score_32", "bbox_8", "bbox_16", "bbox_32",
                           "kps_8", "kps_16", "kps_32")
STRIDES = (8, 16, 32)
SHARPNESS = 40.0
RECOGNIZER_SEED = 1402
# Left eye, right eye, nose, left and right mouth corner as fractions of the box (the ArcFace template / 112).
KPS_FRACTIONS = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                          [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64) / 112.0
PACKS = {
    "buffalo_l": {"det_10g.onnx": "detector:det_10g", "w600k_r50.onnx": "recognizer:683"},
    "antelopev2": {"scrfd_10g_bnkps.onnx": "detector:scrfd", "glintr100.onnx": "recognizer:1333",
                   "2d106det.onnx": "landmark", "genderage.onnx": "genderage"},
}


def _const(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(array), name))


def _model(nodes, inputs, outputs, name: str) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tiny_onnx")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def _per_anchor(prefix: str, source: str, stride: int, channels: int) -> list[onnx.NodeProto]:
    """Sample `source` [1, C, H, W] at every stride-th pixel and lay it out [h*w*2, C] (row, column, anchor)."""
    p = f"{prefix}{stride}"
    return [
        _const(f"{p}_starts", np.array([0, 0], np.int64)),
        _const(f"{p}_ends", np.array([2 ** 31 - 1] * 2, np.int64)),
        _const(f"{p}_axes", np.array([2, 3], np.int64)),
        _const(f"{p}_steps", np.array([stride, stride], np.int64)),
        helper.make_node("Slice", [source, f"{p}_starts", f"{p}_ends", f"{p}_axes", f"{p}_steps"], [f"{p}_grid"]),
        helper.make_node("Transpose", [f"{p}_grid"], [f"{p}_hwc"], perm=[0, 2, 3, 1]),
        _const(f"{p}_axis3", np.array([3], np.int64)),
        helper.make_node("Unsqueeze", [f"{p}_hwc", f"{p}_axis3"], [f"{p}_one"]),
        helper.make_node("Concat", [f"{p}_one", f"{p}_one"], [f"{p}_two"], axis=3),
        _const(f"{p}_shape", np.array([-1, channels], np.int64)),
        helper.make_node("Reshape", [f"{p}_two", f"{p}_shape"], [f"{p}_rows"]),
    ]


def detector_model(output_names: Sequence[str] = DET_10G_OUTPUTS) -> onnx.ModelProto:
    """The SCRFD-signature detector described in the module docstring."""
    nodes = [
        _const("bright_w", np.full((1, 3, 1, 1), SHARPNESS / 3.0, np.float32)),
        _const("bright_b", np.zeros((1,), np.float32)),
        helper.make_node("Conv", ["input.1", "bright_w", "bright_b"], ["bright_logit"]),
        helper.make_node("Sigmoid", ["bright_logit"], ["bright"]),
    ]
    for axis, before, after in ((3, "left", "right"), (2, "top", "bottom")):
        nodes += [
            _const(f"axis_{axis}", np.array(axis, np.int64)),
            _const(f"axes_{axis}", np.array([axis], np.int64)),
            helper.make_node("CumSum", ["bright", f"axis_{axis}"], [f"cum_{axis}"]),
            helper.make_node("Sub", [f"cum_{axis}", "bright"], [before]),          # face pixels before this one
            helper.make_node("ReduceSum", ["bright", f"axes_{axis}"], [f"total_{axis}"], keepdims=1),
            helper.make_node("Sub", [f"total_{axis}", before], [after]),           # this one and after it
        ]
    # keypoint offsets as linear maps of (left, top, right, bottom): dx = (fx - 1) * left + fx * right, dy alike
    kps_weight = np.zeros((10, 4, 1, 1), np.float32)
    for j, (fx, fy) in enumerate(KPS_FRACTIONS):
        kps_weight[2 * j, 0, 0, 0], kps_weight[2 * j, 2, 0, 0] = fx - 1.0, fx
        kps_weight[2 * j + 1, 1, 0, 0], kps_weight[2 * j + 1, 3, 0, 0] = fy - 1.0, fy
    nodes += [helper.make_node("Concat", ["left", "top", "right", "bottom"], ["dist"], axis=1),
              _const("kps_w", kps_weight),
              helper.make_node("Conv", ["dist", "kps_w"], ["kps_pixels"])]
    outputs = []
    for index, stride in enumerate(STRIDES):
        nodes += [_const(f"inv_{stride}", np.array(1.0 / stride, np.float32)),
                  helper.make_node("Mul", ["dist", f"inv_{stride}"], [f"dist_s{stride}"]),
                  helper.make_node("Mul", ["kps_pixels", f"inv_{stride}"], [f"kps_s{stride}"])]
        nodes += _per_anchor("score", "bright", stride, 1) + _per_anchor("box", f"dist_s{stride}", stride, 4) \
            + _per_anchor("kps", f"kps_s{stride}", stride, 10)
        for head, (prefix, width) in enumerate((("score", 1), ("box", 4), ("kps", 10))):
            name = output_names[index + 3 * head]
            nodes.append(helper.make_node("Identity", [f"{prefix}{stride}_rows"], [name]))
            outputs.append((3 * head + index, helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                                            [f"n{stride}", width])))
    inputs = [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "?", "?"])]
    return _model(nodes, inputs, [info for _, info in sorted(outputs, key=lambda pair: pair[0])], "tiny_scrfd")


def _pooled_linear(size: int, pool: int, width: int, output_name: str, seed: int, name: str) -> onnx.ModelProto:
    """[None, 3, size, size] -> average pool -> flatten -> fixed random linear map + bias -> [None, width]."""
    features = 3 * (size // pool) ** 2
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("AveragePool", ["input.1"], ["pooled"], kernel_shape=[pool, pool], strides=[pool, pool]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        _const("weight", (rng.standard_normal((features, width)) / np.sqrt(features)).astype(np.float32)),
        _const("bias", (0.1 * rng.standard_normal(width)).astype(np.float32)),
        helper.make_node("MatMul", ["flat", "weight"], ["projected"]),
        helper.make_node("Add", ["projected", "bias"], [output_name]),
    ]
    inputs = [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, size, size])]
    outputs = [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["None", width])]
    return _model(nodes, inputs, outputs, name)


def recognizer_model(output_name: str = "683", seed: int = RECOGNIZER_SEED) -> onnx.ModelProto:
    """The ArcFace-signature recognizer: [None, 3, 112, 112] -> [None, 512]."""
    return _pooled_linear(112, 8, 512, output_name, seed, "tiny_arcface")


def landmark_model() -> onnx.ModelProto:
    """A 2d106det-signature model ([None, 3, 192, 192] -> [None, 212]) that a loader must ignore."""
    return _pooled_linear(192, 16, 212, "fc1", 7, "tiny_landmark")


def genderage_model() -> onnx.ModelProto:
    """A genderage-signature model ([None, 3, 96, 96] -> [None, 3]) that a loader must ignore."""
    return _pooled_linear(96, 8, 3, "fc1", 9, "tiny_genderage")


def _build(kind: str) -> onnx.ModelProto:
    if kind == "detector:det_10g":
        return detector_model(DET_10G_OUTPUTS)
    if kind == "detector:scrfd":
        return detector_model(SCRFD_10G_BNKPS_OUTPUTS)
    if kind.startswith("recognizer:"):
        return recognizer_model(kind.split(":", 1)[1])
    return {"landmark": landmark_model, "genderage": genderage_model}[kind]()


def save(model: onnx.ModelProto, path: Path) -> Path:
    """Write `model` to `path` atomically (parallel test processes may write the same file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(model.SerializeToString())
    os.replace(temporary, path)
    return path


def write_model_pack(models_dir: os.PathLike, name: str = "buffalo_l") -> Path:
    """Write pack `name` (buffalo_l or antelopev2) as ``<models_dir>/insightface/models/<name>/*.onnx``, the
    layout ComfyUI users have (models_dir = ComfyUI's models folder). Returns the pack folder."""
    folder = Path(models_dir) / "insightface" / "models" / name
    for file_name, kind in PACKS[name].items():
        save(_build(kind), folder / file_name)
    return folder


def draw_face(image: torch.Tensor, box: Sequence[int], value: float = 1.0) -> torch.Tensor:
    """A copy of `image` [H, W, 3] with the pixel rectangle box = (x1, y1, x2, y2), x2/y2 exclusive, set to
    `value`: a "face" for the tiny detector (which finds exactly that box on a dark image)."""
    x1, y1, x2, y2 = (int(v) for v in box)
    out = image.clone()
    out[y1:y2, x1:x2, :] = value
    return out


def expected_kps(box: Sequence[float]) -> np.ndarray:
    """The keypoints [5, 2] the tiny detector reports for a face drawn at `box` (x1, y1, x2, y2)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return np.stack([x1 + KPS_FRACTIONS[:, 0] * (x2 - x1), y1 + KPS_FRACTIONS[:, 1] * (y2 - y1)], axis=-1)
