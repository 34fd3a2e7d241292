"""Metrics vs independent computations (torch conv for SSIM, closed forms)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jharm.eval import metrics


def _torch_ssim(x, y, c1=1e-4, c2=9e-4):
    # Independent implementation: depthwise 2-D conv with the outer-product window.
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    g = g / g.sum()
    win = (g[:, None] * g[None, :])[None, None]
    x = torch.tensor(x).permute(0, 3, 1, 2)
    y = torch.tensor(y).permute(0, 3, 1, 2)
    c = x.shape[1]
    win = win.repeat(c, 1, 1, 1)
    f = lambda t: F.conv2d(t, win, groups=c)  # noqa: E731
    mx, my = f(x), f(y)
    sxx, syy, sxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
    m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return m.mean(dim=(1, 2, 3)).numpy()


def test_ssim_and_psnr_match_independent_computation():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(3, 32, 32, 3))
    y = np.clip(x + rng.normal(scale=0.1, size=x.shape), 0, 1)
    np.testing.assert_allclose(metrics.ssim(x, y), _torch_ssim(x, y), atol=1e-10)
    np.testing.assert_allclose(metrics.ssim(x, x), 1.0, atol=1e-12)
    mse = ((x - y) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(metrics.psnr(x, y), 10 * np.log10(1 / mse))


def test_metric_input_errors():
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 9, 3)))
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 8, 3)))


def test_bias_o_and_frequencies():
    assert metrics.bias_o([0.5, 0.5]) == 0.0
    assert metrics.bias_o([0.85, 0.15]) == pytest.approx(0.7)
    # K=4, one attribute only: every pair involving it differs by 1 (3 of 6 pairs).
    assert metrics.bias_o([1, 0, 0, 0]) == pytest.approx(0.5)
    np.testing.assert_allclose(metrics.attribute_frequencies(np.array([0, 1, 1, 3]), 4), [0.25, 0.5, 0, 0.25])
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        metrics.attribute_frequencies(np.array([0, 2]), 2)


def test_attack_success_rate():
    out = metrics.attack_success_rate([1, 0, 0, 0], [0, 1, 0, 1])
    assert out == {"pre_asr": 0.25, "asr": 0.75}
