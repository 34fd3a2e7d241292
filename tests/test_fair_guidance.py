"""Fair Diffusion guidance vs an independent NumPy transcription."""
import jax
import jax.numpy as jnp
import numpy as np

from jharm.diffusion import guidance


def _np_fair(outs, dirs, steps, g=7.5, s_e=4.0, thr=0.95, warm=2, s_m=0.5, beta=0.6):
    mom = np.zeros_like(outs[0][0])
    results = []
    for i in range(steps):
        o = outs[i]
        uncond, cond = o[0], o[1]
        edit = np.zeros_like(uncond)
        for e in range(o.shape[0] - 2):
            psi = dirs[:, e][:, None, None, None] * (o[2 + e] - uncond)
            for b in range(psi.shape[0]):
                for c in range(psi.shape[-1]):
                    cut = np.quantile(np.abs(psi[b, ..., c]), thr)
                    m = np.abs(psi[b, ..., c]) >= cut
                    edit[b, ..., c] += np.where(m, psi[b, ..., c] * s_e, 0)
        edit = edit + s_m * mom
        mom = beta * mom + (1 - beta) * edit
        out = uncond + g * (cond - uncond)
        results.append(out + edit if i >= warm else out)
    return results


def test_fair_diffusion_matches_numpy():
    rng = np.random.default_rng(0)
    steps = 4
    outs = [rng.normal(size=(4, 2, 6, 6, 3)).astype(np.float32) for _ in range(steps)]
    dirs = np.array([[1.0, -1.0], [-1.0, 1.0]], np.float32)
    rule = guidance.FairDiffusion(jnp.asarray(dirs), warmup_steps=2)
    state = rule.init(jnp.zeros((2, 6, 6, 3)))
    step = jax.jit(lambda o, s, i: rule(o, s, i))
    expected = _np_fair(outs, dirs, steps)
    for i in range(steps):
        got, state = step(jnp.asarray(outs[i]), state, i)
        np.testing.assert_allclose(np.asarray(got), expected[i], atol=1e-5)


def test_balanced_directions():
    d = np.asarray(guidance.balanced_directions(jax.random.key(0), 8))
    assert d.shape == (8, 2) and (d[:, 0] == 1).sum() == 4
    np.testing.assert_array_equal(d[:, 1], -d[:, 0])
