"""LightFair losses vs an independent NumPy computation (values and gradients)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jharm.objectives import fairness


def _np_cos(a, b):
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(-1)


def _np_loss(neutral, attr, cents, gamma, lam_q, eps=1e-8):
    s_o = _np_cos(neutral[:, None], cents) - gamma
    l_o = np.mean(np.sqrt(((s_o - s_o.mean(-1, keepdims=True)) ** 2).mean(-1) + eps))
    s_q = _np_cos(attr, cents)
    l_q = np.mean(np.sqrt(((s_q - s_q.mean(-1, keepdims=True)) ** 2).mean(-1) + eps))
    return l_o + lam_q * l_q


def _np_grad(fn, x, h=1e-6):
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        g[idx] = (fn(xp) - fn(xm)) / (2 * h)
    return g


@pytest.mark.parametrize("num_attributes", [2, 4])
def test_lightfair_loss_matches_numpy(num_attributes):
    rng = np.random.default_rng(0)
    c, d = 3, 8
    neutral = rng.normal(size=(c, d))
    attr = rng.normal(size=(c, num_attributes, d))
    cents = rng.normal(size=(c, num_attributes, d))
    target = rng.dirichlet(np.ones(num_attributes))
    gamma = fairness.target_offsets(target, num_attributes).astype(np.float64)

    def jax_loss(n, a):
        return fairness.lightfair_loss(n, a, jnp.asarray(cents), offsets=jnp.asarray(gamma), lambda_q=0.5)[0]

    with jax.enable_x64(True):
        value, (g_n, g_a) = jax.value_and_grad(jax_loss, argnums=(0, 1))(jnp.asarray(neutral), jnp.asarray(attr))
        expected = _np_loss(neutral, attr, cents, gamma, 0.5)
        np.testing.assert_allclose(float(value), expected, atol=1e-10)
        np.testing.assert_allclose(np.asarray(g_n), _np_grad(lambda x: _np_loss(x, attr, cents, gamma, 0.5), neutral), atol=1e-5)
        np.testing.assert_allclose(np.asarray(g_a), _np_grad(lambda x: _np_loss(neutral, x, cents, gamma, 0.5), attr), atol=1e-5)


def test_equal_similarities_give_finite_gradient():
    # The neutral prompt is exactly equidistant from both centroids: the optimum.
    cents = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])
    neutral = jnp.array([[1.0, 1.0]])
    value, grad = jax.value_and_grad(lambda n: fairness.equalized_odds(n, cents))(neutral)
    assert np.isfinite(np.asarray(grad)).all()
    assert float(value) == pytest.approx(1e-4, rel=1e-3)  # sqrt(eps)


def test_target_offsets_reproduce_target_under_softmax():
    target = np.array([0.7, 0.3])
    gamma = fairness.target_offsets(target, 2, temperature=0.01)
    # Similarities that satisfy ℓ_o = 0 are s = γ + const; their softmax at T is the target.
    sims = gamma + 0.2
    probs = np.exp(sims / 0.01) / np.exp(sims / 0.01).sum()
    np.testing.assert_allclose(probs, target, atol=1e-6)


@pytest.mark.parametrize("bad", [[0.5, 0.6], [1.0, 0.0], [0.2, 0.3, 0.5]])
def test_target_offsets_reject_bad_targets(bad):
    with pytest.raises(ValueError, match="target distribution"):
        fairness.target_offsets(np.array(bad), 2)
