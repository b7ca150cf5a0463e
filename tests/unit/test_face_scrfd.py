"""SCRFD decoding (processors/face/scrfd.py) against plain arithmetic written here: anchor order, box and keypoint
distances, thresholds, NMS with InsightFace's +1 area convention, letterboxing and the scale back to the image."""
import numpy as np
import pytest
import torch

from processors.face import scrfd


def test_anchor_centers_row_major_with_anchors_repeated():
    centers = scrfd.anchor_centers(height=2, width=3, stride=16, num_anchors=2)
    expected = []
    for row in range(2):
        for col in range(3):
            expected += [[col * 16, row * 16]] * 2
    np.testing.assert_array_equal(centers, np.array(expected, np.float32))


def test_distance2bbox_and_kps():
    points = np.array([[10.0, 20.0], [0.0, 5.0]], np.float32)
    boxes = scrfd.distance2bbox(points, np.array([[1, 2, 3, 4], [0.5, 0.5, 0.5, 0.5]], np.float32))
    np.testing.assert_allclose(boxes, [[9, 18, 13, 24], [-0.5, 4.5, 0.5, 5.5]])
    offsets = np.arange(20, dtype=np.float32).reshape(2, 10)
    kps = scrfd.distance2kps(points, offsets)
    assert kps.shape == (2, 5, 2)
    np.testing.assert_allclose(kps[0, 2], [10 + 4, 20 + 5])
    np.testing.assert_allclose(kps[1, 4], [0 + 18, 5 + 19])


def _outputs(size, entries):
    """Raw 9-output tensors for a `size` input: all scores 0 except entries {(stride, index): (score, box, kps)}
    with distances in stride units."""
    scores, boxes, kps = [], [], []
    for stride in (8, 16, 32):
        n = (size // stride) ** 2 * 2
        s, b, k = np.zeros((n, 1), np.float32), np.zeros((n, 4), np.float32), np.zeros((n, 10), np.float32)
        for (st, index), (score, box, points) in entries.items():
            if st == stride:
                s[index, 0], b[index], k[index] = score, box, points
        scores.append(s), boxes.append(b), kps.append(k)
    return scores + boxes + kps


def test_decode_finds_the_anchor_and_scales_distances_by_stride():
    size = 64  # stride 16: a 4x4 grid, 2 anchors per cell
    index = (2 * 4 + 3) * 2 + 1  # row 2, column 3, second anchor -> centre (48, 32)
    points = np.arange(10, dtype=np.float32) / 10
    outputs = _outputs(size, {(16, index): (0.9, [1, 2, 0.5, 0.25], points), (8, 5): (0.49, [1, 1, 1, 1], points)})
    boxes, scores, kps = scrfd.decode(outputs, size, size, score_threshold=0.5)
    np.testing.assert_allclose(scores, [0.9])
    np.testing.assert_allclose(boxes, [[48 - 16, 32 - 32, 48 + 8, 32 + 4]])
    expected_kps = np.stack([48 + points[0::2] * 16, 32 + points[1::2] * 16], axis=-1)
    np.testing.assert_allclose(kps[0], expected_kps, rtol=1e-6)


def test_decode_rejects_a_detector_without_keypoints():
    with pytest.raises(ValueError, match="9 or 15 outputs"):
        scrfd.decode([np.zeros((1, 1))] * 6, 64, 64)


def test_decode_rejects_outputs_that_do_not_fit_the_input():
    outputs = _outputs(64, {})
    with pytest.raises(ValueError, match="stride 8"):
        scrfd.decode(outputs, 128, 128)


def test_nms_plus_one_iou():
    boxes = np.array([[0, 0, 9, 9], [1, 1, 10, 10], [0, 0, 4, 9], [50, 50, 60, 60]], np.float32)
    scores = np.array([0.8, 0.9, 0.7, 0.6], np.float32)
    # IoU with +1 areas: box1 vs box0: inter 9*9=81, areas 100+100 -> 81/119 = 0.68 > 0.4 -> dropped
    # box2 vs box1 (kept best): inter x 1..4 -> 4, y 1..9 -> 9 = 36; areas 50, 100 -> 36/114 = 0.32 -> kept
    assert scrfd.nms(boxes, scores, 0.4) == [1, 2, 3]
    # at threshold 0.3 box2 (0.316 against box1) goes too
    assert scrfd.nms(boxes, scores, 0.3) == [1, 3]


def test_letterbox_wide_image_top_left_with_zero_padding():
    image = torch.full((100, 200, 3), 255.0)
    image[..., 0] = 0.0  # red channel dark
    box = scrfd.letterbox(image, size=64, channels="RGB")
    assert box.tensor.shape == (1, 3, 64, 64) and box.scale == pytest.approx(32 / 100)
    pad = (0 - 127.5) / 128
    np.testing.assert_allclose(box.tensor[0, :, 32:, :], pad)                  # below the content: zeros
    np.testing.assert_allclose(box.tensor[0, 0, :32, :], pad)                  # red is 0
    np.testing.assert_allclose(box.tensor[0, 1:, :32, :], (255 - 127.5) / 128)
    flipped = scrfd.letterbox(image, size=64, channels="BGR")
    np.testing.assert_allclose(flipped.tensor[0, 2, :32, :], pad)              # red is now the last channel


def test_letterbox_tall_image_keeps_aspect_with_truncation():
    assert scrfd.resized_shape(300, 200, 640) == (640, int(640 / 1.5))
    assert scrfd.resized_shape(200, 300, 640) == (int(640 * 200 / 300), 640)


def test_postprocess_returns_image_pixels_best_first():
    size = 64
    a = (0 * 8 + 1) * 2       # stride 8, row 0, col 1 -> centre (8, 0)
    b = (3 * 4 + 3) * 2       # stride 16, row 3, col 3 -> centre (48, 48)
    outputs = _outputs(size, {(8, a): (0.6, [1, 0, 1, 1], np.zeros(10)), (16, b): (0.95, [1, 1, 1, 1], np.zeros(10))})
    found = scrfd.postprocess(outputs, size, scale=0.5)
    np.testing.assert_allclose(found.scores, [0.95, 0.6])
    np.testing.assert_allclose(found.boxes, [[64, 64, 128, 128], [0, 0, 32, 16]])
    np.testing.assert_allclose(found.kps[0], np.full((5, 2), 96.0))
