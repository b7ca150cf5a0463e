"""5-point face alignment: a similarity transform (Umeyama) onto the ArcFace landmark template, and the warp.

Behaviour matches InsightFace's ``face_align.estimate_norm`` / ``norm_crop`` (the crop FaceID adapters were
trained on): the template is the 112 px ArcFace one, scaled by size/112 for multiples of 112 (224, 336, ...),
or by size/128 and shifted right by 8*size/128 for multiples of 128 (128, 256, 512). The warp is bilinear with
a zero border and pixel centres at integer coordinates, which is what OpenCV's ``warpAffine`` (INTER_LINEAR,
BORDER_CONSTANT 0) computes; OpenCV quantises the sample position to 1/32 px on uint8 images, we do not, so crops
differ from OpenCV's by at most about one grey level.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Left eye, right eye, nose tip, left and right mouth corners in a 112x112 ArcFace crop (InsightFace's arcface_dst).
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32)


def arcface_template(size: int) -> np.ndarray:
    """The 5 reference landmarks [5, 2] (float64) for a `size` x `size` crop, scaled as InsightFace scales them."""
    if size <= 0 or (size % 112 and size % 128):
        raise ValueError(f"aligned crop size must be a multiple of 112 or 128, got {size}")
    template = ARCFACE_TEMPLATE_112.astype(np.float64)
    if size % 112 == 0:
        return template * (size / 112.0)
    ratio = size / 128.0
    shifted = template * ratio
    shifted[:, 0] += 8.0 * ratio  # the 128-based crops centre the 112 template horizontally
    return shifted


def similarity_umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (rotation, uniform scale, translation; no reflection) mapping `src`
    points [N, 2] onto `dst` [N, 2] (Umeyama 1991). Returns the 3x3 homogeneous matrix (float64).

    Raises ValueError when the source points are degenerate (all equal, or fewer than 2).
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"need matching [N>=2, 2] point sets, got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c ** 2).sum() / len(src)
    if not np.isfinite(src_var) or src_var <= 1e-12:
        raise ValueError("the source points are all the same point: no similarity transform is defined")
    covariance = dst_c.T @ src_c / len(src)
    u, singular, vt = np.linalg.svd(covariance)
    # Force a proper rotation (det +1): flip the weakest axis when the best orthogonal fit is a reflection.
    signs = np.array([1.0, 1.0 if np.linalg.det(u) * np.linalg.det(vt) > 0 else -1.0])
    rotation = u @ np.diag(signs) @ vt
    scale = float((singular * signs).sum() / src_var)
    matrix = np.eye(3)
    matrix[:2, :2] = scale * rotation
    matrix[:2, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def estimate_norm(kps: np.ndarray, size: int = 112) -> np.ndarray:
    """The 2x3 affine matrix (float64) taking image coordinates to the aligned `size` crop for 5 keypoints."""
    kps = np.asarray(kps, dtype=np.float64)
    if kps.shape != (5, 2):
        raise ValueError(f"need 5 keypoints [5, 2], got shape {kps.shape}")
    return similarity_umeyama(kps, arcface_template(size))[:2]


def warp_affine(image: torch.Tensor, matrix: np.ndarray, size: int) -> torch.Tensor:
    """Warp `image` [H, W, C] by the 2x3 `matrix` (image -> output coordinates) into [size, size, C].

    Each output pixel (x, y) samples the input at inverse(matrix) @ (x, y, 1), bilinearly, with zeros outside
    the image (OpenCV's warpAffine convention: pixel centres at integer coordinates). Keeps the input's dtype
    (computed in float32 for integer or half inputs).
    """
    if image.ndim != 3:
        raise ValueError(f"need an image [H, W, C], got shape {tuple(image.shape)}")
    height, width = image.shape[0], image.shape[1]
    full = np.vstack([np.asarray(matrix, dtype=np.float64), [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(full)
    ys, xs = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64), indexing="ij")
    src_x = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    src_y = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    # grid_sample with align_corners=False puts pixel i's centre at (2i + 1) / W - 1
    grid = np.stack([(2.0 * src_x + 1.0) / width - 1.0, (2.0 * src_y + 1.0) / height - 1.0], axis=-1)
    work_dtype = image.dtype if image.dtype in (torch.float32, torch.float64) else torch.float32
    source = image.to(work_dtype).permute(2, 0, 1).unsqueeze(0)
    grid_t = torch.from_numpy(grid).to(device=image.device, dtype=work_dtype).unsqueeze(0)
    warped = F.grid_sample(source, grid_t, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped[0].permute(1, 2, 0).to(image.dtype)
