"""Image maths of Prep Image For ClipVision and IP-Adapter Noise. Pure torch, no ComfyUI.

Images are ComfyUI IMAGE tensors: ``[B, H, W, C]`` floats in 0..1. Everything here returns new tensors and never
writes into its inputs (ComfyUI caches node outputs, so an input may be another node's cached output).

Resampling uses the filters Pillow offers under the same names (box, triangle, Hamming, Keys cubic with a = -0.5,
Lanczos-3, nearest), as separable weight matrices widened by the scale factor when shrinking (antialiasing), so a
224x224 reference looks like the one Pillow makes, but stays in float, on the image's device, without an 8-bit
round trip per image.
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

CLIP_SIZE = 224
INTERPOLATIONS = ("LANCZOS", "BICUBIC", "HAMMING", "BILINEAR", "BOX", "NEAREST")
CROP_POSITIONS = ("top", "bottom", "left", "right", "center", "pad")
NOISE_TYPES = ("fade", "dissolve", "gaussian", "shuffle")
MAX_BLUR = 32

# Shuffle's elastic warp: displacement amplitude (pixels of a 224 image at full scale) and the smoothing of the
# random field at strength 0; strength 1 leaves the field unsmoothed (every pixel moves on its own).
_SHUFFLE_ALPHA = 75.0
_SHUFFLE_MAX_SIGMA = 3.5

Kernel = Callable[[torch.Tensor], torch.Tensor]


def _box(x: torch.Tensor) -> torch.Tensor:
    return ((x > -0.5) & (x <= 0.5)).to(x.dtype)


def _triangle(x: torch.Tensor) -> torch.Tensor:
    return (1.0 - x.abs()).clamp_min(0.0)


def _hamming(x: torch.Tensor) -> torch.Tensor:
    inside = x.abs() < 1.0
    return torch.where(inside, torch.sinc(x) * (0.54 + 0.46 * torch.cos(math.pi * x)), torch.zeros_like(x))


def _keys_cubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    t = x.abs()
    near = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
    far = ((a * t - 5.0 * a) * t + 8.0 * a) * t - 4.0 * a
    return torch.where(t < 1.0, near, torch.where(t < 2.0, far, torch.zeros_like(t)))


def _lanczos3(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x.abs() < 3.0, torch.sinc(x) * torch.sinc(x / 3.0), torch.zeros_like(x))


# interpolation -> (support radius at scale 1, kernel)
_FILTERS: dict[str, tuple[float, Kernel]] = {
    "BOX": (0.5, _box),
    "BILINEAR": (1.0, _triangle),
    "HAMMING": (1.0, _hamming),
    "BICUBIC": (2.0, _keys_cubic),
    "LANCZOS": (3.0, _lanczos3),
}


def resample_matrix(in_size: int, out_size: int, interpolation: str,
                    device: Optional[torch.device] = None) -> torch.Tensor:
    """``[out_size, in_size]`` float64 weights: output sample i = sum_j W[i, j] * input sample j.

    Output sample i sits at input coordinate (i + 0.5) * in/out (pixel centres). When shrinking, the kernel is
    stretched by the scale so every input pixel contributes (antialiasing); taps are clipped to the image and
    each row renormalised to sum 1, so flat regions stay flat up to the borders.
    """
    scale = in_size / out_size
    centers = (torch.arange(out_size, dtype=torch.float64, device=device) + 0.5) * scale
    taps = torch.arange(in_size, dtype=torch.float64, device=device)
    if interpolation == "NEAREST":
        index = torch.floor(centers).clamp(max=in_size - 1).long()
        return F.one_hot(index, in_size).to(torch.float64)
    support, kernel = _FILTERS[interpolation]
    stretch = max(scale, 1.0)
    radius = support * stretch
    first = torch.floor(centers - radius + 0.5).clamp(min=0)
    stop = torch.floor(centers + radius + 0.5).clamp(max=in_size)
    weights = kernel((taps[None, :] - centers[:, None] + 0.5) / stretch)
    window = (taps[None, :] >= first[:, None]) & (taps[None, :] < stop[:, None])
    weights = weights * window
    return weights / weights.sum(dim=1, keepdim=True)


def resize(image: torch.Tensor, height: int, width: int, interpolation: str) -> torch.Tensor:
    """``image`` [B, H, W, C] resampled to [B, height, width, C] (unclamped: cubic and Lanczos may ring)."""
    _, in_h, in_w, _ = image.shape
    out = image
    if in_w != width:
        cols = resample_matrix(in_w, width, interpolation, image.device).to(image.dtype)
        out = torch.einsum("bhwc,pw->bhpc", out, cols)
    if in_h != height:
        rows = resample_matrix(in_h, height, interpolation, image.device).to(image.dtype)
        out = torch.einsum("bhwc,ph->bpwc", out, rows)
    return out if out is not image else image.clone()


def square_window(height: int, width: int, position: str) -> tuple[int, int, int]:
    """(top, left, side) of the largest square at ``position``; top/bottom keep it centred horizontally,
    left/right vertically."""
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    if position == "top":
        top = 0
    elif position == "bottom":
        top = height - side
    elif position == "left":
        left = 0
    elif position == "right":
        left = width - side
    return top, left, side


def pad_to_square(image: torch.Tensor) -> torch.Tensor:
    """Black borders on the short side, split evenly (the odd pixel goes after), so nothing is cut off."""
    _, height, width, _ = image.shape
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    # F.pad pads the last dims first: C (none), W, H
    return F.pad(image, (0, 0, left, side - width - left, top, side - height - top), value=0.0)


def to_square(image: torch.Tensor, crop_position: str) -> torch.Tensor:
    if crop_position == "pad":
        return pad_to_square(image)
    top, left, side = square_window(image.shape[1], image.shape[2], crop_position)
    return image[:, top:top + side, left:left + side, :]


def sharpen(image: torch.Tensor, amount: float) -> torch.Tensor:
    """Contrast adaptive sharpening (AMD FidelityFX CAS): a 3x3 unsharp cross whose strength per pixel falls
    where the neighbourhood already has strong contrast, so edges sharpen without halos. ``amount`` 0..1 moves the
    peak negative lobe from -1/8 to -1/5 of the centre. Borders repeat the edge pixel."""
    if amount <= 0:
        return image
    x = image.permute(0, 3, 1, 2)
    height, width = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")

    def shifted(dy: int, dx: int) -> torch.Tensor:
        return padded[..., 1 + dy:1 + dy + height, 1 + dx:1 + dx + width]

    north, south, west, east = shifted(-1, 0), shifted(1, 0), shifted(0, -1), shifted(0, 1)
    cross = torch.stack([north, south, west, east, x])
    corners = torch.stack([shifted(-1, -1), shifted(-1, 1), shifted(1, -1), shifted(1, 1)])
    # soft minimum / maximum over 0..2: the cross's extreme plus the corners'
    low = cross.amin(0) + corners.amin(0)
    high = cross.amax(0) + corners.amax(0)
    headroom = torch.minimum(low, 2.0 - high)
    amp = torch.where(high > 0, headroom / high.clamp_min(1e-12), torch.zeros_like(high)).clamp(0.0, 1.0).sqrt()
    lobe = -amp * (1.0 / 8.0 + amount * (1.0 / 5.0 - 1.0 / 8.0))
    out = ((north + south + west + east) * lobe + x) / (1.0 + 4.0 * lobe)
    return out.clamp(0.0, 1.0).permute(0, 2, 3, 1)


def prep_for_clip_vision(image: torch.Tensor, interpolation: str = "LANCZOS", crop_position: str = "center",
                         sharpening: float = 0.0, size: int = CLIP_SIZE) -> torch.Tensor:
    """A square ``size`` x ``size`` version of each image: cropped at ``crop_position`` (or padded black for
    ``pad``), resampled with ``interpolation``, then sharpened by ``sharpening`` (0 = off)."""
    check_choice("interpolation", interpolation, INTERPOLATIONS)
    check_choice("crop_position", crop_position, CROP_POSITIONS)
    check_range("sharpening", sharpening, 0.0, 1.0)
    square = to_square(image, crop_position)
    out = resize(square, size, size, interpolation).clamp(0.0, 1.0)
    return sharpen(out, float(sharpening))


# --- noise ------------------------------------------------------------------------------------------------

def content_seed(image: torch.Tensor) -> int:
    """A seed that depends only on the image's shape and its 8-bit pixel values: the same picture gives the same
    seed on any device and in any run (a float sum would depend on reduction order)."""
    quantized = (image.detach().float() * 255.0).round().clamp(0, 255).to(torch.uint8).cpu().contiguous()
    digest = hashlib.sha256(repr(tuple(image.shape)).encode())
    digest.update(quantized.numpy().tobytes())
    return int.from_bytes(digest.digest()[:8], "little") & (2**63 - 1)


def blur_kernel_size(blur: int) -> int:
    """The odd kernel size a ``blur`` setting means (an even value is rounded up)."""
    return blur + 1 if blur % 2 == 0 else blur


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: Optional[float] = None) -> torch.Tensor:
    """Separable Gaussian blur of ``x`` [N, C, H, W] with mirrored borders. Without ``sigma``, the width the
    kernel size implies (OpenCV's rule: 0.3 * ((k - 1) / 2 - 1) + 0.8)."""
    if kernel_size <= 1:
        return x
    if sigma is None:
        sigma = 0.3 * ((kernel_size - 1) * 0.5 - 1.0) + 0.8
    half = kernel_size // 2
    offsets = torch.arange(-half, half + 1, dtype=torch.float64, device=x.device)
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    taps = (taps / taps.sum()).to(x.dtype)
    channels = x.shape[1]
    mode = "reflect" if min(x.shape[-2:]) > half else "replicate"
    out = F.pad(x, (half, half, half, half), mode=mode)
    out = F.conv2d(out, taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(out, taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def _uniform(generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    # drawn on the CPU so the same seed gives the same numbers on every device
    return torch.rand(like.shape, generator=generator, dtype=torch.float32).to(like.device, like.dtype)


def _normal(generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(like.shape, generator=generator, dtype=torch.float32).to(like.device, like.dtype)


def elastic_warp(image: torch.Tensor, generator: torch.Generator, alpha: float, sigma: float) -> torch.Tensor:
    """Move every pixel by a random displacement field (uniform in -1..1, smoothed by a Gaussian of ``sigma``
    pixels, scaled to ``alpha`` pixels at 224), sampled bilinearly; outside the image is black."""
    batch, height, width, _ = image.shape
    field = _uniform(generator, torch.empty(1, 2, height, width, device=image.device)) * 2.0 - 1.0
    if sigma > 0:
        size = int(8 * sigma) + 1
        field = gaussian_blur(field, size + 1 if size % 2 == 0 else size, sigma)
    # grid_sample's coordinates span -1..1 over the image: alpha pixels of 224 become alpha / 224 * 2 / 2 units
    shift = field * torch.tensor([alpha / width, alpha / height], device=image.device).view(1, 2, 1, 1)
    ys = torch.linspace(-1 + 1 / height, 1 - 1 / height, height, device=image.device)
    xs = torch.linspace(-1 + 1 / width, 1 - 1 / width, width, device=image.device)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([grid_x, grid_y], dim=-1)[None] + shift.permute(0, 2, 3, 1)
    warped = F.grid_sample(image.permute(0, 3, 1, 2), grid.expand(batch, -1, -1, -1).to(image.dtype),
                           mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped.permute(0, 2, 3, 1)


def noise_base(image: Optional[torch.Tensor], size: int = CLIP_SIZE) -> torch.Tensor:
    """What the noise starts from: the image centre-cropped and resized (bicubic) to size x size, or one black
    image without an image."""
    if image is None:
        return torch.zeros(1, size, size, 3)
    return resize(to_square(image, "center"), size, size, "BICUBIC").clamp(0.0, 1.0)


def make_noise(kind: str, strength: float, blur: int, image: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A negative image for the IP-Adapter: ``image`` (or black) degraded by ``kind`` of noise.

    fade: blended toward uniform noise by ``strength``; dissolve: that fraction of the values replaced by uniform
    noise; gaussian: plus normal noise of std ``strength``; shuffle: elastically warped (less smoothing at higher
    strength), turned 180 degrees and multiplied/offset by normal noise. Then clamped to 0..1 and blurred with an
    odd ``blur`` kernel (0 = none). Deterministic: the random numbers come from a generator seeded by the image's
    content, so the same inputs always give bit-identical output, and no global random state is touched.
    """
    check_choice("type", kind, NOISE_TYPES)
    check_range("strength", strength, 0.0, 1.0)
    check_range("blur", blur, 0, MAX_BLUR)
    base = noise_base(image)
    generator = torch.Generator(device="cpu").manual_seed(content_seed(base))
    if kind == "fade":
        noisy = base * (1 - strength) + _uniform(generator, base) * strength
    elif kind == "dissolve":
        replaced = (_uniform(generator, base) < strength).to(base.dtype)
        noisy = base * (1 - replaced) + _uniform(generator, base) * replaced
    elif kind == "gaussian":
        noisy = base + _normal(generator, base) * strength
    else:
        warped = elastic_warp(base, generator, _SHUFFLE_ALPHA, (1 - strength) * _SHUFFLE_MAX_SIGMA)
        turned = torch.flip(warped, dims=(1, 2))
        grain = _normal(generator, turned) * (strength * 0.75)
        noisy = turned * (1 - grain) + grain
    noisy = noisy.clamp(0.0, 1.0)
    if blur > 0:
        noisy = gaussian_blur(noisy.permute(0, 3, 1, 2), blur_kernel_size(int(blur))).permute(0, 2, 3, 1)
    return noisy.contiguous()


# --- argument checks (the node shows these messages) ------------------------------------------------------

def check_choice(name: str, value: object, options: tuple) -> None:
    if value not in options:
        raise ValueError(f"{name}: {value!r} is not one of {', '.join(repr(o) for o in options)}")


def check_range(name: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high \
            or (isinstance(value, float) and math.isnan(value)):
        raise ValueError(f"{name} must be a number from {low} to {high}; got {value!r}")
