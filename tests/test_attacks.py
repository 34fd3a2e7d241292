"""Prefix attack: simplex projection vs brute force; the attack finds a planted optimum."""
import jax
import jax.numpy as jnp
import numpy as np

from jharm.eval import attacks


def _np_project(v):
    # Independent: bisection on the threshold τ with Σ max(v − τ, 0) = 1.
    lo, hi = v.min() - 1, v.max()
    for _ in range(200):
        mid = (lo + hi) / 2
        if np.maximum(v - mid, 0).sum() > 1:
            lo = mid
        else:
            hi = mid
    return np.maximum(v - (lo + hi) / 2, 0)


def test_projection_matches_bisection():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(6, 17)) * 3
    got = np.asarray(attacks.project_to_simplex(jnp.asarray(v)))
    for row, out in zip(v, got):
        np.testing.assert_allclose(out, _np_project(row), atol=1e-5)
        assert abs(out.sum() - 1) < 1e-5 and out.min() >= 0


def test_attack_recovers_planted_tokens():
    rng = np.random.default_rng(1)
    # D > V: embeddings are independent, so the relaxed problem's unique optimum is the vertex.
    table = jnp.asarray(rng.normal(size=(30, 64)), jnp.float32)
    target = jnp.stack([table[7], table[23]])

    def loss(prefix, key):
        return jnp.sum((prefix - target) ** 2)

    cfg = attacks.PrefixAttackConfig(num_tokens=2, steps=100, learning_rate=0.05, banned_ids=(0, 1))
    ids, theta, losses = jax.jit(lambda k: attacks.prefix_attack(k, table, loss, cfg))(jax.random.key(0))
    assert list(np.asarray(ids)) == [7, 23]
    assert float(losses[-1]) < 1e-3 * float(losses[0])
    assert float(theta[:, :2].max()) == 0.0  # banned ids never used
