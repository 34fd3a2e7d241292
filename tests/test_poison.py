"""Backdoor poisoning: rates, trigger placement, nearest-target pairing, determinism, bad inputs."""
import numpy as np
import pytest

from jharm.diffusion import corruptions
from jharm.diffusion.poison import (CORNERS, Trigger, corner_triggers, gray_square, nearest_targets, poison,
                                    poisoned_pairs, stamp)


def _batch(n=64, size=16, seed=0):
    g = np.random.default_rng(seed)
    x0 = g.uniform(-1, 1, (n, size, size, 3)).astype(np.float32)
    return x0, corruptions.super_resolution(x0, "pool")


def _pools(m=3, p=5, size=16, seed=1):
    g = np.random.default_rng(seed)
    return [g.uniform(-1, 1, (p, size, size, 3)).astype(np.float32) for _ in range(m)]


def test_gray_square_corners_official_order():
    x = np.ones((1, 8, 10, 3), np.float32)
    assert [t.corner for t in corner_triggers(3, 2)] == ["bottom-right", "top-right", "top-left"]
    boxes = {"bottom-right": (slice(6, 8), slice(8, 10)), "top-right": (slice(0, 2), slice(8, 10)),
             "top-left": (slice(0, 2), slice(0, 2)), "bottom-left": (slice(6, 8), slice(0, 2))}
    for corner in CORNERS:
        out = stamp(x, gray_square(2, corner))
        want = x.copy()
        want[(0,) + boxes[corner]] = 0.0  # gray = 0 in [-1, 1]
        np.testing.assert_array_equal(out, want)
        assert out.sum() == x.sum() - 12
    assert x.min() == 1  # input untouched


def test_trigger_image_and_mask_at_offset():
    pattern = np.arange(12, dtype=np.float32).reshape(2, 2, 3) / 12
    mask = np.array([[1, 0], [0.5, 1]], np.float32)
    x = np.full((2, 6, 6, 3), -1, np.float32)
    out = stamp(x, Trigger(pattern, mask, corner=(3, 1)))
    want = -1 * (1 - mask[..., None]) + pattern * mask[..., None]
    np.testing.assert_allclose(out[:, 3:5, 1:3], np.broadcast_to(want, (2, 2, 2, 3)))
    out[:, 3:5, 1:3] = -1
    assert np.all(out == -1)


def test_nearest_target_is_pixel_l2_argmin():
    x0, _ = _batch(20)
    pool = _pools(1, 7)[0]
    brute = [int(np.argmin([np.sum((a.astype(np.float64) - p) ** 2) for p in pool])) for a in x0]
    np.testing.assert_array_equal(nearest_targets(x0, pool), brute)
    np.testing.assert_array_equal(nearest_targets(pool[[3, 0, 6]] + 1e-3, pool), [3, 0, 6])


def test_poison_pairs_rates_and_contents():
    x0, x1 = _batch(4000, size=8)
    pools, triggers, rates = _pools(3, 4, size=8), corner_triggers(3, 2), [0.1, 0.2, 0.3]
    out = poison(x0, x1, triggers, pools, rates, rng=0)
    task = out["task"]
    assert task.dtype == np.int32 and set(np.unique(task)) == {0, 1, 2, 3}
    for i, rate in enumerate([0.4] + rates):
        frac = np.mean(task == i)
        assert abs(frac - rate) < 4 * np.sqrt(rate * (1 - rate) / len(task)), (i, frac)
    clean = task == 0
    np.testing.assert_array_equal(out["x0"][clean], x0[clean])
    np.testing.assert_array_equal(out["x1"][clean], x1[clean])
    for i in (1, 2, 3):
        sel = task == i
        np.testing.assert_array_equal(out["x0"][sel], pools[i - 1][nearest_targets(x0[sel], pools[i - 1])])
        np.testing.assert_array_equal(out["x1"][sel], stamp(x1[sel], triggers[i - 1]))  # after the corruption
        assert not np.array_equal(out["x1"][sel], x1[sel])
    assert x0.shape == out["x0"].shape == out["x1"].shape


def test_determinism_and_seed_dependence():
    x0, x1 = _batch(64)
    args = (x0, x1, corner_triggers(2, 3), _pools(2), [0.25, 0.25])
    a, b, c = poison(*args, rng=5), poison(*args, rng=5), poison(*args, rng=6)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["task"], c["task"])
    all_clean = poison(*args[:4], [0.0, 0.0], rng=1)
    assert np.all(all_clean["task"] == 0)
    all_one = poison(*args[:4], [1.0, 0.0], rng=1)
    assert np.all(all_one["task"] == 1)


def test_poisoned_pairs_corrupts_then_stamps():
    x0, _ = _batch(32)
    out = poisoned_pairs("inpaint-center", x0, corner_triggers(1, 2), _pools(1), [0.5], rng=3)
    sel = out["task"] == 1
    x1, mask = corruptions.corrupt("inpaint-center", x0)
    np.testing.assert_array_equal(out["mask"], mask)
    np.testing.assert_array_equal(out["x1"][sel], stamp(x1[sel], gray_square(2)))
    np.testing.assert_array_equal(out["x1"][~sel], x1[~sel])
    again = poisoned_pairs("inpaint-center", x0, corner_triggers(1, 2), _pools(1), [0.5], rng=3)
    np.testing.assert_array_equal(again["task"], out["task"])


def test_bad_inputs_clear_errors():
    x0, x1 = _batch(8)
    pools, triggers = _pools(2), corner_triggers(2, 2)
    with pytest.raises(ValueError, match=r"x0 \(8, 16, 16, 3\) and x1 \(8, 8, 8, 3\)"):
        poison(x0, x1[:, ::2, ::2], triggers, pools, [0.1, 0.1], rng=0)
    with pytest.raises(ValueError, match="trigger of 17x17.*16x16 image"):
        poison(x0, x1, [gray_square(17), triggers[1]], pools, [0.1, 0.1], rng=0)
    with pytest.raises(ValueError, match="does not fit"):
        stamp(x1, Trigger(np.zeros((4, 4, 3)), np.ones((4, 4)), corner=(14, 0)))
    with pytest.raises(ValueError, match="sum to 1.2 > 1"):
        poison(x0, x1, triggers, pools, [0.6, 0.6], rng=0)
    with pytest.raises(ValueError, match="probabilities"):
        poison(x0, x1, triggers, pools, [-0.1, 0.2], rng=0)
    with pytest.raises(ValueError, match="one trigger, target pool and rate per task"):
        poison(x0, x1, triggers, pools[:1], [0.1, 0.1], rng=0)
    with pytest.raises(ValueError, match="target pool images"):
        poison(x0, x1, triggers, [pools[0], pools[1][:, :8]], [0.0, 0.0], rng=0)
    with pytest.raises(ValueError, match="unknown corruption 'sr4x-nearest'"):
        poisoned_pairs("sr4x-nearest", x0, triggers, pools, [0.1, 0.1], rng=0)
    with pytest.raises(ValueError, match="unknown trigger corner"):
        gray_square(2, "middle")
