"""5-point alignment (processors/face/align.py): the similarity transform against hand-computed ones, the ArcFace
template scaling, and the warp against a plain-loop bilinear sampler written here."""
import math

import numpy as np
import pytest
import torch

from processors.face import align

TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                         [41.5493, 92.3655], [70.7299, 92.2041]])


def test_two_points_hand_computed():
    # (0,0)->(1,1) and (1,0)->(1,3): the unit x step becomes (0, 2): scale 2, rotation +90 degrees, shift (1, 1)
    matrix = align.similarity_umeyama(np.array([[0, 0], [1, 0]]), np.array([[1, 1], [1, 3]]))
    np.testing.assert_allclose(matrix, [[0, -2, 1], [2, 0, 1], [0, 0, 1]], atol=1e-12)


def test_recovers_an_exact_similarity():
    angle, scale, shift = math.radians(30), 1.7, np.array([5.0, -3.0])
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    src = np.random.default_rng(0).uniform(0, 100, (5, 2))
    dst = src @ (scale * rotation).T + shift
    matrix = align.similarity_umeyama(src, dst)
    np.testing.assert_allclose(matrix[:2, :2], scale * rotation, atol=1e-10)
    np.testing.assert_allclose(matrix[:2, 2], shift, atol=1e-9)


def test_never_returns_a_reflection():
    src = np.array([[0, 0], [10, 0], [0, 10], [10, 10], [5, 7]], float)
    mirrored = src * [-1, 1]
    matrix = align.similarity_umeyama(src, mirrored)
    assert np.linalg.det(matrix[:2, :2]) > 0


def test_least_squares_fit_of_noisy_points_beats_perturbations():
    rng = np.random.default_rng(3)
    src = rng.uniform(0, 50, (5, 2))
    dst = src * 2.0 + 7 + rng.normal(0, 0.5, (5, 2))
    matrix = align.similarity_umeyama(src, dst)

    def error(m):
        return ((src @ m[:2, :2].T + m[:2, 2] - dst) ** 2).sum()

    best = error(matrix)
    for _ in range(20):  # any nearby similarity fits worse
        a, b = rng.normal(0, 1e-3, 2)
        other = matrix.copy()
        other[:2, :2] += [[a, -b], [b, a]]
        other[:2, 2] += rng.normal(0, 1e-2, 2)
        assert error(other) >= best


def test_degenerate_points_are_an_error():
    with pytest.raises(ValueError, match="same point"):
        align.similarity_umeyama(np.ones((5, 2)), np.zeros((5, 2)))


@pytest.mark.parametrize("size, ratio, shift", [(112, 1, 0), (224, 2, 0), (336, 3, 0), (128, 1, 8), (256, 2, 16)])
def test_template_scaling(size, ratio, shift):
    expected = TEMPLATE_112 * ratio + [shift, 0]
    np.testing.assert_allclose(align.arcface_template(size), expected, rtol=1e-6)


def test_template_rejects_other_sizes():
    with pytest.raises(ValueError, match="multiple of 112 or 128"):
        align.arcface_template(100)


def test_estimate_norm_maps_keypoints_onto_the_template():
    # keypoints = the 224 template shrunk by 2 and moved by (30, 40): the crop matrix undoes exactly that
    kps = TEMPLATE_112 + [30, 40]
    matrix = align.estimate_norm(kps, 224)
    # float32 template as InsightFace stores it: agreement to its precision
    np.testing.assert_allclose(matrix, [[2, 0, -60], [0, 2, -80]], atol=2e-5)


def _bilinear_oracle(image, matrix, size):
    """cv2.warpAffine INTER_LINEAR / BORDER_CONSTANT 0 written out pixel by pixel."""
    inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))
    height, width, channels = image.shape
    out = np.zeros((size, size, channels))
    for y in range(size):
        for x in range(size):
            sx, sy, _ = inverse @ [x, y, 1]
            x0, y0 = math.floor(sx), math.floor(sy)
            fx, fy = sx - x0, sy - y0
            for dy, wy in ((0, 1 - fy), (1, fy)):
                for dx, wx in ((0, 1 - fx), (1, fx)):
                    yy, xx = y0 + dy, x0 + dx
                    if 0 <= yy < height and 0 <= xx < width:
                        out[y, x] += wy * wx * image[yy, xx]
    return out


def test_warp_matches_the_bilinear_oracle():
    image = np.random.default_rng(1).uniform(0, 1, (23, 31, 3))
    matrix = align.similarity_umeyama(TEMPLATE_112 / 5 + [2, 1], TEMPLATE_112 / 112 * 16)[:2]
    warped = align.warp_affine(torch.from_numpy(image), matrix, 16)
    np.testing.assert_allclose(warped.numpy(), _bilinear_oracle(image, matrix, 16), atol=1e-9)


def test_warp_integer_shift_and_zero_border():
    image = torch.arange(1, 17, dtype=torch.float32).reshape(4, 4, 1)
    warped = align.warp_affine(image, np.array([[1.0, 0, 1], [0, 1, 0]]), 4)  # output x = input x + 1
    assert warped[:, 0, 0].tolist() == [0, 0, 0, 0]
    assert torch.equal(warped[:, 1:, 0], image[:, :3, 0])


def test_warp_keeps_dtype_and_rejects_non_images():
    image = torch.rand(8, 8, 3, dtype=torch.float16)
    assert align.warp_affine(image, np.eye(3)[:2], 8).dtype == torch.float16
    with pytest.raises(ValueError, match=r"\[H, W, C\]"):
        align.warp_affine(torch.rand(1, 8, 8, 3), np.eye(3)[:2], 8)
