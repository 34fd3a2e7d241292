"""Corruptions vs independent references (torch pooling/interpolation, hand-computed kernel values)."""
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from jharm.diffusion import corruptions as C


def _images(shape=(2, 32, 32, 3), seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, size=shape).astype(np.float32)


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).double()


def test_sr_pool_matches_torch_avg_pool_and_nearest():
    x = _images()
    want = F.interpolate(F.avg_pool2d(_nchw(x), 4), scale_factor=4, mode="nearest").numpy().transpose(0, 2, 3, 1)
    got = C.super_resolution(x, "pool")
    assert got.shape == x.shape
    np.testing.assert_allclose(got, want, atol=1e-6)
    got2, mask = C.corrupt("sr4x-pool", x)
    assert mask is None and np.array_equal(got, got2)


def test_bicubic_kernel_known_values():
    # Keys' kernel, a = -0.5: k(0.125) = 1.5·0.125³ - 2.5·0.125² + 1; k(1.125) = -0.5·x³ + 2.5·x² - 4x + 2.
    np.testing.assert_allclose(C.cubic(np.array([0.0, 0.125, 1.0, 1.125, 2.0, 2.5])),
                               [1.0, 0.9638671875, 0.0, -0.0478515625, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(C.cubic(np.array([1.5]), a=-0.75), [-0.09375], atol=1e-12)  # torch's a
    taps = C.bicubic_taps(4)
    assert taps.shape == (16,) and abs(taps.sum() - 1) < 1e-12
    np.testing.assert_allclose(taps, taps[::-1], atol=1e-15)  # symmetric about the block centre
    raw = C.cubic((np.arange(16) - 8 + 0.5) / 4)
    assert taps[8] == pytest.approx(0.9638671875 / raw.sum()) and taps[12] == pytest.approx(-0.0478515625 / raw.sum())


def test_bicubic_interior_matches_torch_antialiased_bicubic():
    # torch's antialias=True bicubic uses a = -0.5 with the kernel stretched by the factor: the same filter,
    # but it renormalises at the borders where I2SB reflects; compare outputs whose taps stay inside.
    x = _images((2, 32, 40, 3), seed=1)
    low = C.bicubic_downsample(x)
    want = F.interpolate(_nchw(x), scale_factor=0.25, mode="bicubic", antialias=True,
                         align_corners=False).numpy().transpose(0, 2, 3, 1)
    assert low.shape == (2, 8, 10, 3)
    np.testing.assert_allclose(low[:, 2:6, 2:8], want[:, 2:6, 2:8], atol=1e-5)
    assert np.abs(low[:, 0] - want[:, 0]).max() > 1e-3  # borders really differ (reflection)
    # Output (0, 0) by hand: its taps read pixels -6..9, and reflection maps pixel -k to k - 1.
    taps = C.bicubic_taps()
    idx = np.arange(16) + 2 - 8
    idx = np.where(idx < 0, -idx - 1, idx)
    assert low[0, 0, 0, 0] == pytest.approx(taps @ x[0][idx][:, idx, 0].astype(np.float64) @ taps, abs=1e-5)
    const = np.full((1, 16, 16, 3), 0.3, np.float32)
    np.testing.assert_allclose(C.super_resolution(const, "bicubic"), const, atol=1e-6)


def test_blur_matches_torch_conv_with_zero_padding_in_unit_range():
    x = _images((1, 20, 24, 3), seed=2)
    for name, taps in [("uni", np.full(9, 1 / 9)), ("gauss", np.exp(-0.5 * (np.arange(-2, 3) / 10.0) ** 2))]:
        taps = taps / taps.sum()
        k2 = torch.from_numpy(np.outer(taps, taps))[None, None].repeat(3, 1, 1, 1)
        want = F.conv2d((_nchw(x) + 1) / 2, k2, padding=len(taps) // 2, groups=3) * 2 - 1
        got, _ = C.corrupt(f"blur-{name}", x)
        np.testing.assert_allclose(got, want.numpy().transpose(0, 2, 3, 1), atol=1e-5)
    assert abs(C.gaussian_taps()[2] - 1 / np.exp(-0.5 * (np.arange(-2, 3) / 10.0) ** 2).sum()) < 1e-12


def test_jpeg_via_pil_quality_ordering():
    g = np.random.default_rng(3)
    smooth = np.cumsum(g.normal(size=(2, 32, 32, 3)), axis=2)
    x = np.clip(smooth / np.abs(smooth).max(), -1, 1).astype(np.float32)
    errors = {q: float(np.abs(C.jpeg(x, q) - x).mean()) for q in (5, 10, 90)}
    assert errors[5] > errors[10] > errors[90] > 0
    # Independent decode of the same bytes (uint8 quantisation -> PIL -> back).
    pixels = np.clip(np.round((x[0] + 1) * 127.5), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=10)
    want = np.asarray(Image.open(buf), np.float32) / 127.5 - 1
    np.testing.assert_allclose(C.corrupt("jpeg-10", x)[0][0], want, atol=1e-6)
    with pytest.raises(ValueError, match="quality"):
        C.jpeg(x, 0)


def test_center_mask_and_inpaint():
    m = C.center_mask(32, 48)
    assert m.shape == (32, 48, 1) and m.sum() == 16 * 24
    assert m[8:24, 12:36].all() and m[:8].sum() == 0 and m[:, :12].sum() == 0
    x = _images((3, 32, 48, 3))
    x1, mask = C.corrupt("inpaint-center", x)
    assert mask.shape == (3, 32, 48, 1) and np.all(x1[:, 8:24, 12:36] == 1.0)
    np.testing.assert_array_equal(x1[:, :8], x[:, :8])


def test_freeform_masks_coverage_and_determinism():
    x = _images((6, 64, 64, 3))
    for lo, hi in [(10, 20), (20, 30), (30, 40)]:
        x1, mask = C.corrupt(f"inpaint-freeform{lo}{hi}", x, rng=np.random.default_rng(7))
        cover = mask.mean(axis=(1, 2, 3))
        assert np.all((cover >= lo / 100) & (cover <= hi / 100)), cover
        assert set(np.unique(mask)) <= {0.0, 1.0}
        np.testing.assert_array_equal(x1, x * (1 - mask) + mask)
        assert len({m.tobytes() for m in mask}) == 6  # every image its own mask
    again = C.corrupt("inpaint-freeform1020", x, rng=np.random.default_rng(7))[1]
    first = C.corrupt("inpaint-freeform1020", x, rng=np.random.default_rng(7))[1]
    np.testing.assert_array_equal(again, first)
    small = C.freeform_mask(np.random.default_rng(0), 32, 32, (0.1, 0.2))  # ShapesWorld size
    assert 0.1 <= small.mean() <= 0.2
    with pytest.raises(ValueError, match="rng"):
        C.corrupt("inpaint-freeform1020", x)


def test_bad_inputs():
    x = _images()
    with pytest.raises(ValueError, match="unknown corruption 'sr8x-pool'.*sr4x-pool"):
        C.corrupt("sr8x-pool", x)
    with pytest.raises(ValueError, match="unknown corruption"):
        C.corrupt("blur-box", x)
    with pytest.raises(ValueError, match="not divisible"):
        C.super_resolution(_images((1, 30, 32, 3)))
    with pytest.raises(ValueError, match="NHWC"):
        C.blur(x[0])
