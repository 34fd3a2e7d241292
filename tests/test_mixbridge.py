"""MixBridge: vmapped stacked experts equal a Python loop; router output is a distribution."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jharm.models import mixbridge


class _TinyExpert(nn.Module):
    @nn.compact
    def __call__(self, x, t):
        h = nn.Conv(8, (3, 3), padding=1)(x) + t[:, None, None, None] * 0.01
        return nn.Conv(3, (3, 3), padding=1)(nn.silu(h))


def test_vmapped_experts_equal_loop_and_mixture():
    expert = _TinyExpert()
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    t = jnp.array([3.0, 7.0])
    params = [expert.init(jax.random.key(i), x, t)["params"] for i in range(3)]
    stacked = mixbridge.stack_expert_params(params)
    fn = lambda p, x, t: expert.apply({"params": p}, x, t)  # noqa: E731
    outs = mixbridge.experts_apply(fn, stacked, x, t)
    for i in range(3):
        np.testing.assert_allclose(outs[i], fn(params[i], x, t), atol=1e-6)
    router = mixbridge.Router(mixbridge.RouterConfig(num_experts=3, widths=(8, 16)))
    rparams = router.init(jax.random.key(9), x)["params"]
    pred, w, _ = mixbridge.mixbridge_predict(fn, router, {"experts": stacked, "router": rparams}, x, t, x)
    np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, atol=1e-6)
    max_router = mixbridge.Router(mixbridge.RouterConfig(num_experts=3, widths=(8, 16), pool="max"))
    np.testing.assert_allclose(np.asarray(max_router.apply({"params": rparams}, x)).sum(-1), 1.0, atol=1e-6)
    expected = sum(np.asarray(w)[:, i, None, None, None] * np.asarray(outs[i]) for i in range(3))
    np.testing.assert_allclose(pred, expected, atol=1e-5)
    np.testing.assert_allclose(mixbridge.experts_apply(fn, stacked, x, t, mode="loop"), outs, atol=1e-6)
    xs = jax.random.normal(jax.random.key(5), (3, 2, 8, 8, 3))  # per-expert inputs (the divide phase)
    ts = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    each = mixbridge.map_experts(fn, stacked, xs, ts, shared=False)
    for i in range(3):
        np.testing.assert_allclose(each[i], fn(params[i], xs[i], ts[i]), atol=1e-6)
    np.testing.assert_allclose(mixbridge.map_experts(fn, stacked, xs, ts, shared=False, mode="loop"), each, atol=1e-6)
    with pytest.raises(ValueError, match="unknown experts mode"):
        mixbridge.map_experts(fn, stacked, x, t, mode="pmap")
    back = mixbridge.unstack_expert_params(stacked)
    np.testing.assert_array_equal(jax.tree_util.tree_leaves(back[1])[0], jax.tree_util.tree_leaves(params[1])[0])


def test_stack_rejects_mismatched_experts():
    with pytest.raises(ValueError, match="expert 1"):
        mixbridge.stack_expert_params([{"a": jnp.zeros(2)}, {"b": jnp.zeros(2)}])
