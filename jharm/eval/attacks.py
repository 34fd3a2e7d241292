"""Adversarial prompt attacks on erased models (METHODS.md §1).

UnlearnDiffAtk-style: k prefix tokens as relaxed one-hot rows θ ∈ Δ^V (one
simplex per token), their embeddings θ @ E fed through the text encoder in
place of the token embeddings at positions 1..k, θ optimised with Adam on the
erased model's denoising loss on images of the concept, and projected back to
the simplex after every step; the final prompt takes argmax θ. The attack is
one jitted ``lax.scan`` over iterations.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax


def project_to_simplex(v: jnp.ndarray) -> jnp.ndarray:
    """Euclidean projection of each row of ``v`` onto the probability simplex
    (Duchi et al. 2008: sort, find the threshold, clip)."""
    n = v.shape[-1]
    u = jnp.sort(v, axis=-1)[..., ::-1]
    css = jnp.cumsum(u, axis=-1) - 1.0
    ind = jnp.arange(1, n + 1, dtype=v.dtype)
    cond = u - css / ind > 0
    rho = jnp.sum(cond, axis=-1, keepdims=True)
    theta = jnp.take_along_axis(css, rho - 1, axis=-1) / rho.astype(v.dtype)
    return jnp.maximum(v - theta, 0.0)


@dataclasses.dataclass(frozen=True)
class PrefixAttackConfig:
    num_tokens: int = 5
    # Adam moves each θ entry by about lr per step: at 0.01 x 40 steps the argmax rarely leaves
    # its random start (measured on ShapesWorld, docs/erasure.md), at 0.1 x 100 it does.
    steps: int = 100
    learning_rate: float = 0.1
    # Token ids the attack may not use (BOS/EOS/pad); their θ stays 0.
    banned_ids: tuple[int, ...] = ()


def prefix_attack(
    rng: jax.Array,
    token_embedding: jnp.ndarray,
    loss_from_prefix: Callable[[jnp.ndarray, jax.Array], jnp.ndarray],
    config: PrefixAttackConfig = PrefixAttackConfig(),
):
    """Optimise k relaxed prefix tokens; returns (token ids (k,), θ (k, V), losses (steps,)).

    Args:
      token_embedding: (V, D) the text encoder's token-embedding table.
      loss_from_prefix: ``(prefix_embeds (k, D), rng) -> scalar``: builds the
        prompt with these embeddings at the prefix positions, encodes it, and
        returns the erased model's denoising loss on target images (lower =
        the model reconstructs the concept).
    """
    vocab = token_embedding.shape[0]
    allowed = jnp.ones((vocab,), bool)
    if config.banned_ids:
        allowed = allowed.at[jnp.asarray(config.banned_ids)].set(False)
    init_rng, loop_rng = jax.random.split(rng)
    start_ids = jax.random.categorical(init_rng, jnp.where(allowed, 0.0, -jnp.inf), shape=(config.num_tokens,))
    theta = jax.nn.one_hot(start_ids, vocab, dtype=jnp.float32)
    optimizer = optax.adam(config.learning_rate)

    def objective(theta, key):
        return loss_from_prefix(theta @ token_embedding.astype(jnp.float32), key)

    def body(carry, key):
        theta, opt_state = carry
        loss, grad = jax.value_and_grad(objective)(theta, key)
        updates, opt_state = optimizer.update(grad, opt_state, theta)
        theta = project_to_simplex(jnp.where(allowed, optax.apply_updates(theta, updates), -1e9))
        return (theta, opt_state), loss

    (theta, _), losses = jax.lax.scan(body, (theta, optimizer.init(theta)), jax.random.split(loop_rng, config.steps))
    return jnp.argmax(theta, axis=-1), theta, losses
