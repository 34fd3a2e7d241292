"""MixBridge objectives vs NumPy."""
import jax.numpy as jnp
import numpy as np

from jharm.objectives import backdoor


def test_mixture_loss_wrs_entropy_match_numpy():
    rng = np.random.default_rng(0)
    e, b = 3, 5
    outs = rng.normal(size=(e, b, 4, 4, 3)).astype(np.float32)
    logits = rng.normal(size=(b, e))
    w = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    label = rng.normal(size=(b, 4, 4, 3)).astype(np.float32)
    task = np.array([0, 1, 2, 0, 1])

    loss, m = backdoor.mixbridge_loss(jnp.asarray(outs), jnp.asarray(w), jnp.asarray(label), jnp.asarray(task), 3, wrs_weight=1.0)

    pred = np.einsum("be,ebhwc->bhwc", w, outs)
    per = ((pred - label) ** 2).mean(axis=(1, 2, 3))
    wrs = ((w - 1 / 3) ** 2).mean(0).sum()
    np.testing.assert_allclose(float(loss), per.mean() + wrs, rtol=1e-5)
    np.testing.assert_allclose(float(m["loss_task1"]), per[task == 1].mean(), rtol=1e-5)
    ent = -(w * np.log2(w)).sum(-1).mean()
    np.testing.assert_allclose(float(m["entropy_bits"]), ent, rtol=1e-5)


def test_entropy_bounds():
    uniform = jnp.full((1, 4), 0.25)
    hard = jnp.array([[1.0, 0, 0, 0]])
    np.testing.assert_allclose(backdoor.routing_entropy_bits(uniform), [2.0], atol=1e-6)
    np.testing.assert_allclose(backdoor.routing_entropy_bits(hard), [0.0], atol=1e-6)
    assert float(backdoor.weight_reallocation_loss(uniform)) == 0.0
