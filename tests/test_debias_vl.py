import numpy as np
import pytest

from jharm.edits import debias_vl


def test_projection_suppresses_attribute_direction_and_keeps_orthogonal():
    rng = np.random.default_rng(0)
    d = 16
    direction = np.zeros(d)
    direction[0] = 1.0
    base = rng.normal(size=(4, d))
    base[:, 0] = 0
    a, b = base + 0.5 * direction, base - 0.5 * direction
    p = debias_vl.debias_projection(a, b, lam=500.0)
    ctx = rng.normal(size=(2, 77, d)).astype(np.float32)
    out = debias_vl.apply_projection(ctx, p)
    # Along the spurious direction the embedding shrinks by ~1/(1 + λ·m), m its variance.
    na, nb = a / np.linalg.norm(a, axis=-1, keepdims=True), b / np.linalg.norm(b, axis=-1, keepdims=True)
    diffs = na - nb
    m = diffs.T @ diffs / 4
    np.testing.assert_allclose(p, np.linalg.inv(500 * m + np.eye(d)), atol=1e-12)
    assert np.abs(out[..., 0]).max() < 0.05 * np.abs(ctx[..., 0]).max()
    # Directions orthogonal to every difference are untouched.
    ortho = np.linalg.svd(diffs)[2][np.linalg.matrix_rank(diffs):]
    np.testing.assert_allclose(ortho @ p, ortho, atol=1e-8)


def test_bad_pairs():
    with pytest.raises(ValueError, match="pairs"):
        debias_vl.debias_projection(np.zeros((2, 4)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="does not match"):
        debias_vl.apply_projection(np.zeros((77, 5)), np.eye(4))
