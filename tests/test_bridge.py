"""I2SB bridge vs an independent NumPy transcription of the formulas (float64)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jharm.diffusion import bridge


def _np_schedule(n=1000, beta_max=0.3):
    b = np.linspace(1e-4**0.5, (beta_max / n) ** 0.5, n) ** 2
    b = np.concatenate([b[: n // 2], b[: n // 2][::-1]])
    fwd = np.sqrt(np.cumsum(b))
    bwd = np.sqrt(np.cumsum(b[::-1])[::-1])
    mu0 = bwd**2 / (fwd**2 + bwd**2)
    mu1 = fwd**2 / (fwd**2 + bwd**2)
    var = fwd**2 * bwd**2 / (fwd**2 + bwd**2)
    return b, fwd, bwd, mu0, mu1, np.sqrt(var)


def test_schedule_matches_numpy_and_endpoints():
    s = bridge.make_bridge_schedule(1000, 0.3)
    b, fwd, bwd, mu0, mu1, std = _np_schedule()
    for got, want in [(s.betas, b), (s.std_fwd, fwd), (s.std_bwd, bwd), (s.mu_x0, mu0), (s.mu_x1, mu1), (s.std_sb, std)]:
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-6, atol=1e-9)
    assert float(s.std_fwd[0]) == pytest.approx(0.01, rel=1e-6)  # sqrt(beta_0), not 0
    # Endpoints: x_0 ~ x0 and x_{N-1} ~ x1, up to β_0 = 1e-4 against Σβ (σ(0) = 0.01, not 0).
    total = b.sum()
    assert float(s.mu_x0[0]) == pytest.approx(total / (total + b[0]), rel=1e-6)
    assert float(s.mu_x1[-1]) == pytest.approx(total / (total + b[-1]), rel=1e-6)
    assert 1 - float(s.mu_x1[-1]) < 1e-3 and 1 - float(s.mu_x0[0]) < 1e-3
    np.testing.assert_allclose(np.asarray(s.betas), np.asarray(s.betas)[::-1], rtol=1e-7)  # symmetric
    np.testing.assert_allclose(np.asarray(s.noise_levels)[[0, -1]], [0.1, 1000.0], rtol=1e-6)


def test_q_sample_label_and_x0_prediction():
    s = bridge.make_bridge_schedule(1000, 0.3)
    _, fwd, _, mu0, mu1, std = _np_schedule()
    rng = np.random.default_rng(0)
    x0, x1, xi = (rng.normal(size=(3, 4, 4, 3)).astype(np.float32) for _ in range(3))
    n = np.array([0, 500, 999])
    x_n = bridge.q_sample(s, jnp.asarray(n), jnp.asarray(x0), jnp.asarray(x1), jnp.asarray(xi))
    want = mu0[n, None, None, None] * x0 + mu1[n, None, None, None] * x1 + std[n, None, None, None] * xi
    np.testing.assert_allclose(x_n, want, atol=1e-5)
    label = bridge.training_label(s, jnp.asarray(n), x_n, jnp.asarray(x0))
    np.testing.assert_allclose(label, (want - x0) / fwd[n, None, None, None], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bridge.predict_x0(s, jnp.asarray(n), x_n, label), x0, atol=1e-5)
    # n = N-1: the degraded end, x1 up to the μ_x0(N-1) ≈ 7e-4 offset.
    np.testing.assert_allclose(bridge.q_sample(s, 999, jnp.asarray(x0), jnp.asarray(x1)), mu0[-1] * x0 + mu1[-1] * x1, atol=1e-6)


def test_posterior_step_matches_numpy():
    s = bridge.make_bridge_schedule(1000, 0.3)
    _, fwd, _, _, _, _ = _np_schedule()
    rng = np.random.default_rng(1)
    x_n, x0, xi = (rng.normal(size=(2, 4, 4, 3)).astype(np.float32) for _ in range(3))
    got = bridge.posterior_step(s, 300, 600, jnp.asarray(x_n), jnp.asarray(x0), jnp.asarray(xi))
    a, d = fwd[300], np.sqrt(fwd[600] ** 2 - fwd[300] ** 2)
    want = d**2 / (a**2 + d**2) * x0 + a**2 / (a**2 + d**2) * x_n + np.sqrt(a**2 * d**2 / (a**2 + d**2)) * xi
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("nfe", [1, 10, 100])
def test_ot_ode_sampler_with_perfect_oracle_returns_x0(nfe):
    s = bridge.make_bridge_schedule(1000, 1.0, ot_ode=True)
    rng = np.random.default_rng(2)
    x0, x1 = (jnp.asarray(rng.uniform(-1, 1, size=(2, 8, 8, 3)), jnp.float32) for _ in range(2))
    levels = np.asarray(s.noise_levels)

    def oracle(x_n, t):  # the exact label for whatever step t encodes
        n = jnp.asarray(np.searchsorted(levels, np.asarray(t)[0]))
        return bridge.training_label(s, n, x_n, x0)

    net = lambda x, t: jax.pure_callback(lambda x_, t_: np.asarray(oracle(x_, t_)), x, x, t)  # noqa: E731
    out, x0_hat = bridge.sample(net, s, x1, nfe=nfe, clip_denoise=False)
    np.testing.assert_allclose(x0_hat, x0, atol=1e-5)  # the perfect oracle's estimate is x0 exactly
    # ...and every posterior step stays on the OT path, ending at its n = 0 point.
    np.testing.assert_allclose(out, bridge.q_sample(s, 0, x0, x1), atol=1e-5)


def test_stochastic_sampler_is_seeded_and_bad_input():
    s = bridge.make_bridge_schedule(100, 0.3)
    x1 = jnp.zeros((1, 4, 4, 3))
    net = lambda x, t: jnp.zeros_like(x)  # noqa: E731
    a = bridge.sample(net, s, x1, nfe=5, rng=jax.random.key(0))[0]
    b = bridge.sample(net, s, x1, nfe=5, rng=jax.random.key(0))[0]
    np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(a).max()) > 0  # noise was injected
    with pytest.raises(ValueError, match="needs rng"):
        bridge.sample(net, s, x1, nfe=5)
    with pytest.raises(ValueError, match="same shape"):
        bridge.q_sample(s, 3, jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="even"):
        bridge.make_bridge_schedule(999)
