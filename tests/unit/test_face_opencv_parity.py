"""The face pipeline's image operations against OpenCV, which InsightFace uses for them: norm_crop's warpAffine
(INTER_LINEAR, zero border) and the detector's resize (INTER_LINEAR). OpenCV works on uint8 with 1/32-pixel
positions and fixed-point weights, so agreement is within one grey level, almost everywhere exact."""
import numpy as np
import pytest
import torch

from harness.testing import require

cv2 = require("cv2")

from processors.face import scrfd  # noqa: E402
from processors.face.align import estimate_norm, warp_affine  # noqa: E402


@pytest.mark.parametrize("size", [112, 224, 256])
def test_aligned_crop_matches_warp_affine(size):
    rng = np.random.default_rng(size)
    image = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    kps = np.array([[150, 120], [210, 118], [182, 160], [158, 195], [205, 193]], np.float64) + rng.normal(0, 3, (5, 2))
    matrix = estimate_norm(kps, size)
    reference = cv2.warpAffine(image, matrix, (size, size), borderValue=0.0).astype(np.float32)
    ours = warp_affine(torch.from_numpy(image).float(), matrix, size).round().numpy()
    difference = np.abs(reference - ours)
    assert difference.max() <= 1.0 and difference.mean() < 0.01


@pytest.mark.parametrize("height, width", [(300, 400), (1000, 700), (512, 512)])
def test_letterbox_resize_matches_cv2_resize(height, width):
    image = np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    new_h, new_w = scrfd.resized_shape(height, width, 640)
    reference = cv2.resize(image, (new_w, new_h)).astype(np.float32)
    box = scrfd.letterbox(torch.from_numpy(image).float(), 640)
    ours = box.tensor[0, :, :new_h, :new_w].transpose(1, 2, 0) * 128 + 127.5
    difference = np.abs(reference - ours)
    assert difference.max() <= 1.0 + 1e-4 and difference.mean() < 0.2
    assert box.scale == pytest.approx(new_h / height)


def test_detector_input_is_insightfaces_blob_of_a_bgr_image():
    """InsightFace reads images with OpenCV (BGR) and builds the detector input with blobFromImage(1/128, mean
    127.5, swapRB=True): the network sees RGB. Ours, from ComfyUI's RGB image with channels="RGB", is that blob."""
    rgb = np.random.default_rng(5).integers(0, 256, (400, 300, 3), dtype=np.uint8)
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    new_h, new_w = scrfd.resized_shape(400, 300, 640)
    canvas = np.zeros((640, 640, 3), np.uint8)
    canvas[:new_h, :new_w] = cv2.resize(bgr, (new_w, new_h))
    blob = cv2.dnn.blobFromImage(canvas, 1.0 / 128, (640, 640), (127.5, 127.5, 127.5), swapRB=True)
    ours = scrfd.letterbox(torch.from_numpy(rgb).float(), 640, channels="RGB").tensor
    assert np.abs(blob - ours).max() <= 1.0 / 128 + 1e-6
    swapped = scrfd.letterbox(torch.from_numpy(rgb).float(), 640, channels="BGR").tensor
    assert np.abs(blob - swapped).max() > 0.5
