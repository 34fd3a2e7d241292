"""MixBridge (METHODS.md §3): M+1 bridge experts mixed by a router.

The experts share one architecture (an ADM bridge network); their params are
stacked on a leading axis and run under ``jax.vmap``, so the expert axis can be
sharded over a mesh axis (logical axis name ``experts``) and the M+1 forward
passes are one batched computation, not a Python loop. The router reads the
degraded input x1 only (not x_n, not t), as in the official code, so the
mixture weights are computed once per sample and reused at every sampling step.

Two ways to run the experts (``mode``), same numbers: ``"vmap"`` (default) is
one batched computation whose expert axis XLA can shard; ``"loop"`` slices
the stacked params and runs the experts one after another inside the same
jitted program. On XLA:CPU a vmapped conv with per-expert kernels *and*
per-expert inputs becomes a grouped convolution whose CPU kernels are slow
(bench/mixbridge_step.py measures it); ``"loop"`` avoids that, at a compile
time that grows with the number of experts. Use ``"vmap"`` on accelerators.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

PyTree = Any


def stack_expert_params(expert_params: Sequence[PyTree]) -> PyTree:
    """Stack per-expert param trees (same structure) on a new leading axis."""
    if not expert_params:
        raise ValueError("need at least one expert")
    structure = jax.tree_util.tree_structure(expert_params[0])
    for i, params in enumerate(expert_params[1:], start=1):
        if jax.tree_util.tree_structure(params) != structure:
            raise ValueError(f"expert {i} has a different param structure from expert 0")
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *expert_params)


def unstack_expert_params(stacked: PyTree) -> list[PyTree]:
    num = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    return [jax.tree_util.tree_map(lambda x, i=i: x[i], stacked) for i in range(num)]


EXPERT_MODES = ("vmap", "loop")


def num_experts(stacked_params: PyTree) -> int:
    return int(jax.tree_util.tree_leaves(stacked_params)[0].shape[0])


def map_experts(fn: Callable[..., jnp.ndarray], stacked_params: PyTree, *args, shared: bool = True,
                mode: str = "vmap") -> jnp.ndarray:
    """``fn(params_i, *args_i)`` for every expert i, stacked on a new leading axis (E, ...).

    ``shared``: every expert reads the same ``args`` (the merged mixture); else
    every arg has a leading expert axis and expert i reads slice i (the divide
    phase, each expert on its own task's batch). ``None`` args pass through.
    """
    if mode == "vmap":
        return jax.vmap(fn, in_axes=(0,) + ((None if shared else 0),) * len(args))(stacked_params, *args)
    if mode != "loop":
        raise ValueError(f"unknown experts mode {mode!r}; expected one of {EXPERT_MODES}")
    outs = []
    for i in range(num_experts(stacked_params)):
        pick = lambda tree, i=i: jax.tree_util.tree_map(lambda a: a[i], tree)  # noqa: E731
        outs.append(fn(pick(stacked_params), *(args if shared else [pick(a) for a in args])))
    return jnp.stack(outs)


def experts_apply(expert_fn: Callable[[PyTree, jnp.ndarray, jnp.ndarray], jnp.ndarray], stacked_params: PyTree,
                  x: jnp.ndarray, t: jnp.ndarray, mode: str = "vmap") -> jnp.ndarray:
    """All experts on the same batch: (E, B, ...). ``expert_fn(params, x, t)``."""
    return map_experts(expert_fn, stacked_params, x, t, mode=mode)


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    num_experts: int
    widths: tuple[int, ...] = (32, 64, 128)
    blocks_per_stage: int = 1
    norm_groups: int = 8
    pool: str = "mean"  # global pooling before the classifier: "mean" (ResNet) or "max"

    def __post_init__(self):
        if self.pool not in ("mean", "max"):
            raise ValueError(f"router pool must be 'mean' or 'max', got {self.pool!r}")


class _ResidualBlock(nn.Module):
    features: int
    stride: int
    groups: int

    @nn.compact
    def __call__(self, x):
        residual = x
        y = nn.Conv(self.features, (3, 3), (self.stride, self.stride), padding=1, use_bias=False, name="conv1")(x)
        y = nn.relu(nn.GroupNorm(min(self.groups, self.features), name="norm1")(y))
        y = nn.Conv(self.features, (3, 3), padding=1, use_bias=False, name="conv2")(y)
        y = nn.GroupNorm(min(self.groups, self.features), name="norm2")(y)
        if residual.shape != y.shape:
            residual = nn.Conv(self.features, (1, 1), (self.stride, self.stride), use_bias=False, name="shortcut")(residual)
        return nn.relu(y + residual)


class Router(nn.Module):
    """A small ResNet classifier over the degraded input, softmax over experts.

    The official code uses an ImageNet ResNet-50; the router's size is a config
    choice here (GroupNorm instead of BatchNorm keeps it a pure function), and so
    is the global pooling: a small trigger in a small image is found far more
    easily with max pooling (``pool="max"``) than with ResNet's mean.
    """

    config: RouterConfig

    @nn.compact
    def __call__(self, x1: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        x = nn.Conv(cfg.widths[0], (3, 3), padding=1, name="stem")(x1)
        for stage, width in enumerate(cfg.widths):
            for block in range(cfg.blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                x = _ResidualBlock(width, stride, cfg.norm_groups, name=f"stages_{stage}_{block}")(x)
        x = jnp.max(x, axis=(1, 2)) if cfg.pool == "max" else jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(cfg.num_experts, name="fc")(x)
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def mixbridge_predict(expert_fn, router: Router, params: dict, x_n, t, x1, mode: str = "vmap"):
    """The mixture's network output Σ_i w_i(x1) · net_i(x_n, n) and the weights w.

    ``params = {"experts": stacked expert params, "router": router params}``.
    """
    from jharm.objectives.backdoor import mixture_prediction

    weights = router.apply({"params": params["router"]}, x1)
    outputs = experts_apply(expert_fn, params["experts"], x_n, t, mode=mode)
    return mixture_prediction(outputs, weights), weights, outputs
