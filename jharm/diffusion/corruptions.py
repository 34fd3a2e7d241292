"""I2SB's image degradations x0 -> x1 (host-side NumPy, NHWC, values in [-1, 1]).

Names follow I2SB's ``--corrupt`` strings: ``sr4x-pool``, ``sr4x-bicubic``,
``jpeg-<quality>``, ``blur-uni``, ``blur-gauss``, ``inpaint-center``,
``inpaint-freeform<lo><hi>`` (e.g. ``inpaint-freeform1020``: 10-20 % holes).
:func:`corrupt` dispatches by name and returns ``(x1, mask)`` (mask only for
inpainting: (B, H, W, 1), 1 = hole).

Choices and deviations from NVlabs/I2SB (documented, deliberate):

* SR: the down-sampling operators are I2SB's (4x4 mean; or the 16-tap
  a = -0.5 bicubic filter with stride 4 and reflected borders), applied as
  separable matrices directly; I2SB applies them through DDRM's SVD, whose
  bicubic variant also zeroes singular values < 0.03 (a solver detail).
  Both are followed by nearest up-sampling back to the input size.
* Blur: the full symmetric kernel (9 taps of 1/9, or 5 Gaussian taps with
  sigma 10, I2SB's values) with zero padding in [0, 1] intensity as I2SB;
  I2SB's DDRM matrix drops the last tap and truncates small singular values.
* JPEG: a real codec (PIL, 4:2:0 chroma subsampling) instead of I2SB's
  differentiable torch re-implementation.
* Free-form masks: generated (random thick strokes, as Palette's free-form
  masks) to a coverage range, deterministic per generator; I2SB downloads
  Palette's fixed set of 10k masks, which jharm cannot fetch. Centre masks
  are I2SB's (the middle h/2 x w/2 box). Holes are filled with white (1).
"""
from __future__ import annotations

import io
import math
import re

import numpy as np

SR_FACTOR = 4
UNIFORM_TAPS = 9
GAUSS_TAPS, GAUSS_SIGMA = 5, 10.0


def _check_images(x: np.ndarray, name: str = "x0") -> np.ndarray:
    x = np.asarray(x, np.float32)
    if x.ndim != 4:
        raise ValueError(f"{name} must be NHWC (4-d), got shape {x.shape}")
    return x


def cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter ``a`` (I2SB/PIL: -0.5; torch's plain bicubic: -0.75)."""
    x = np.abs(np.asarray(x, np.float64))
    near = (a + 2) * x**3 - (a + 3) * x**2 + 1
    far = a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_taps(factor: int = SR_FACTOR, a: float = -0.5) -> np.ndarray:
    """The 4·factor normalised taps of the anti-aliased bicubic down-sampler, at offsets (i - 2f + 0.5)/f."""
    offsets = (np.arange(4 * factor) - 2 * factor + 0.5) / factor
    taps = cubic(offsets, a)
    return taps / taps.sum()


def _filter_matrix(taps: np.ndarray, size: int, stride: int, border: str) -> np.ndarray:
    """(size // stride, size) matrix of a strided 1-d filter; tap t of output o reads pixel o·s + s//2 + t - len//2."""
    out = np.zeros((size // stride, size))
    for o in range(size // stride):
        for t, weight in enumerate(taps):
            j = o * stride + stride // 2 + t - len(taps) // 2
            if border == "reflect":  # half-sample symmetric: -1 -> 0, size -> size - 1
                j = -j - 1 if j < 0 else (2 * size - 1 - j if j >= size else j)
            elif not 0 <= j < size:  # zero padding
                continue
            out[o, j] += weight
    return out


def _separable(x: np.ndarray, taps: np.ndarray, stride: int, border: str) -> np.ndarray:
    rows = _filter_matrix(taps, x.shape[1], stride, border)
    cols = _filter_matrix(taps, x.shape[2], stride, border)
    return np.einsum("oh,bhwc,pw->bopc", rows, x.astype(np.float64), cols).astype(np.float32)


def upsample_nearest(x: np.ndarray, factor: int = SR_FACTOR) -> np.ndarray:
    """Nearest-neighbour up-sampling of NHWC images by an integer factor."""
    return np.repeat(np.repeat(x, factor, axis=1), factor, axis=2)


def pool_downsample(x: np.ndarray, factor: int = SR_FACTOR) -> np.ndarray:
    """factor x factor average pooling of NHWC images."""
    x = _check_images(x)
    n, h, w, c = x.shape
    if h % factor or w % factor:
        raise ValueError(f"image size {h}x{w} is not divisible by the pooling factor {factor}")
    return x.reshape(n, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def bicubic_downsample(x: np.ndarray, factor: int = SR_FACTOR, a: float = -0.5) -> np.ndarray:
    """Anti-aliased bicubic down-sampling by ``factor`` (reflected borders), as I2SB's ``sr4x-bicubic``."""
    x = _check_images(x)
    if x.shape[1] % factor or x.shape[2] % factor:
        raise ValueError(f"image size {x.shape[1]}x{x.shape[2]} is not divisible by the SR factor {factor}")
    return _separable(x, bicubic_taps(factor, a), factor, "reflect")


def super_resolution(x0: np.ndarray, filt: str = "pool", factor: int = SR_FACTOR) -> np.ndarray:
    """x1 for factor-x SR: down-sample (``pool`` or ``bicubic``) then nearest up-sample back to x0's size."""
    if filt == "pool":
        low = pool_downsample(x0, factor)
    elif filt == "bicubic":
        low = bicubic_downsample(x0, factor)
    else:
        raise ValueError(f"unknown SR filter {filt!r}; expected 'pool' or 'bicubic'")
    return upsample_nearest(low, factor)


def gaussian_taps(taps: int = GAUSS_TAPS, sigma: float = GAUSS_SIGMA) -> np.ndarray:
    """Normalised Gaussian taps at integer offsets -taps//2 .. taps//2."""
    offsets = np.arange(taps) - taps // 2
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    return weights / weights.sum()


def blur(x0: np.ndarray, kernel: str = "uni") -> np.ndarray:
    """Separable blur: ``uni`` (9 taps of 1/9) or ``gauss`` (5 taps, sigma 10); zero padding in [0, 1] intensity."""
    x0 = _check_images(x0)
    if kernel == "uni":
        taps = np.full(UNIFORM_TAPS, 1.0 / UNIFORM_TAPS)
    elif kernel == "gauss":
        taps = gaussian_taps()
    else:
        raise ValueError(f"unknown blur kernel {kernel!r}; expected 'uni' or 'gauss'")
    # I2SB blurs in [0, 1]: the zero border is black, not mid-gray.
    return _separable((x0 + 1) / 2, taps, 1, "zero") * 2 - 1


def jpeg(x0: np.ndarray, quality: int) -> np.ndarray:
    """JPEG-compress each image at ``quality`` (1..95) with PIL and decode it again."""
    from PIL import Image  # host-side codec; imported lazily like every optional dependency

    x0 = _check_images(x0)
    if not 1 <= int(quality) <= 95:
        raise ValueError(f"JPEG quality must be in 1..95, got {quality}")
    if x0.shape[-1] not in (1, 3):
        raise ValueError(f"JPEG needs 1 or 3 channels, got {x0.shape[-1]}")
    pixels = np.clip(np.round((x0 + 1) * 127.5), 0, 255).astype(np.uint8)
    out = np.empty_like(x0)
    for i, image in enumerate(pixels):
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="JPEG",
                                                                              quality=int(quality))
        decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())), np.float32)
        out[i] = (decoded.reshape(image.shape) / 127.5) - 1
    return out


def center_mask(height: int, width: int) -> np.ndarray:
    """I2SB's centre mask (H, W, 1) float32: 1 on the box [h/4, h/4 + h/2) x [w/4, w/4 + w/2)."""
    mask = np.zeros((height, width, 1), np.float32)
    mask[height // 4: height // 4 + height // 2, width // 4: width // 4 + width // 2] = 1
    return mask


def freeform_mask(rng: np.random.Generator, height: int, width: int,
                  coverage: tuple[float, float] = (0.1, 0.2), max_tries: int = 200) -> np.ndarray:
    """A random free-form mask (H, W, 1) of thick strokes whose hole fraction lies in ``coverage``.

    Strokes (random walks of 2-6 segments, brush 5-15 % of the image side) are
    added until the coverage reaches ``coverage[0]``; a stroke that would pass
    ``coverage[1]`` is redrawn thinner. Deterministic given ``rng``'s state.
    """
    from PIL import Image, ImageDraw

    lo, hi = coverage
    if not 0 <= lo < hi <= 1:
        raise ValueError(f"coverage must satisfy 0 <= lo < hi <= 1, got {coverage}")
    side = min(height, width)
    mask = Image.new("L", (width, height), 0)
    covered = 0.0
    for _ in range(max_tries):
        if covered >= lo:
            break
        candidate = mask.copy()
        draw = ImageDraw.Draw(candidate)
        brush = max(1, int(round(side * rng.uniform(0.05, 0.15) * (1 if covered < lo / 2 else 0.5))))
        point = (rng.uniform(0, width), rng.uniform(0, height))
        for _ in range(int(rng.integers(2, 7))):
            angle, length = rng.uniform(0, 2 * math.pi), rng.uniform(0.1, 0.4) * side
            nxt = (float(np.clip(point[0] + length * math.cos(angle), 0, width - 1)),
                   float(np.clip(point[1] + length * math.sin(angle), 0, height - 1)))
            draw.line([point, nxt], fill=255, width=brush)
            r = brush / 2  # round joints, as a brush stroke
            draw.ellipse([nxt[0] - r, nxt[1] - r, nxt[0] + r, nxt[1] + r], fill=255)
            point = nxt
        fraction = float(np.mean(np.asarray(candidate) > 0))
        if fraction <= hi:
            mask, covered = candidate, fraction
    if not lo <= covered <= hi:
        raise RuntimeError(f"could not reach mask coverage {coverage} in {max_tries} strokes (got {covered:.3f})")
    return (np.asarray(mask) > 0).astype(np.float32)[..., None]


def inpaint(x0: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Fill the holes (mask 1) with white: x0·(1 - m) + m, as I2SB."""
    x0 = _check_images(x0)
    mask = np.asarray(mask, np.float32)
    return x0 * (1 - mask) + mask


_FREEFORM = re.compile(r"inpaint-freeform(\d\d)(\d\d)")
NAMES = ("sr4x-pool", "sr4x-bicubic", "jpeg-<quality>", "blur-uni", "blur-gauss", "inpaint-center",
         "inpaint-freeform<lo%><hi%>")


def check_name(name: str) -> None:
    """Raise ValueError naming the known corruptions unless ``name`` is one."""
    if not (name in ("sr4x-pool", "sr4x-bicubic", "blur-uni", "blur-gauss", "inpaint-center")
            or re.fullmatch(r"jpeg-\d+", name) or _FREEFORM.fullmatch(name)):
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(NAMES)}")


def corrupt(name: str, x0: np.ndarray, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Degrade a batch by I2SB corruption ``name``; returns ``(x1, mask)`` (mask None except inpainting).

    ``rng`` is needed only by free-form inpainting (one mask per image).
    """
    check_name(name)
    x0 = _check_images(x0)
    if name.startswith("sr4x-"):
        return super_resolution(x0, name.split("-")[1]), None
    if name.startswith("jpeg-"):
        return jpeg(x0, int(name.split("-")[1])), None
    if name.startswith("blur-"):
        return blur(x0, name.split("-")[1]), None
    if name == "inpaint-center":
        mask = np.broadcast_to(center_mask(*x0.shape[1:3]), x0.shape[:3] + (1,)).copy()
    else:
        if rng is None:
            raise ValueError(f"{name} draws random masks: pass rng (a numpy Generator)")
        match = _FREEFORM.fullmatch(name)
        coverage = (int(match.group(1)) / 100, int(match.group(2)) / 100)
        mask = np.stack([freeform_mask(rng, *x0.shape[1:3], coverage) for _ in range(x0.shape[0])])
    return inpaint(x0, mask), mask
