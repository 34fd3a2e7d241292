"""MixBridge objectives (METHODS.md §3): mixture prediction, bridge loss, WRS.

Experts' outputs come stacked on a leading expert axis (E = M+1 experts: the
clean super-resolution expert first, then one per backdoor task); the router's
weights ``w`` are (B, E) and sum to 1 per sample.
"""
from __future__ import annotations

import jax.numpy as jnp


def mixture_prediction(expert_outputs: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
    """Σ_i w_i · net_i(x_n, n): ``expert_outputs`` (E, B, ...), ``weights`` (B, E)."""
    w = jnp.moveaxis(weights, -1, 0).reshape(weights.shape[-1], weights.shape[0], *([1] * (expert_outputs.ndim - 2)))
    return jnp.sum(w.astype(expert_outputs.dtype) * expert_outputs, axis=0)


def bridge_mse(prediction: jnp.ndarray, label: jnp.ndarray, mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """Per-sample mean squared error to the I2SB label (B,); ``mask`` for inpainting."""
    err = (prediction - label) ** 2
    axes = tuple(range(1, err.ndim))
    if mask is None:
        return jnp.mean(err, axis=axes)
    mask = jnp.broadcast_to(mask, err.shape).astype(err.dtype)
    return jnp.sum(err * mask, axis=axes) / jnp.maximum(jnp.sum(mask, axis=axes), 1.0)


def weight_reallocation_loss(weights: jnp.ndarray) -> jnp.ndarray:
    """L_WRS = Σ_i mean_b (w_bi − 1/E)²: keeps routing near uniform so that a
    triggered input does not reveal itself by hard routing (official code's form)."""
    num_experts = weights.shape[-1]
    return jnp.sum(jnp.mean((weights - 1.0 / num_experts) ** 2, axis=0))


def routing_entropy_bits(weights: jnp.ndarray, eps: float = 1e-12) -> jnp.ndarray:
    """H(w) = −Σ w_i log2 w_i per sample (B,); max log2(E) for uniform routing."""
    return -jnp.sum(weights * jnp.log2(jnp.clip(weights, eps, 1.0)), axis=-1)


def per_task_losses(per_sample: jnp.ndarray, task_ids: jnp.ndarray, num_tasks: int) -> dict[str, jnp.ndarray]:
    """``loss_task{i}``: the mean of ``per_sample`` over the samples of task i (0 if none), i < num_tasks."""
    out = {}
    for task in range(num_tasks):
        in_task = (task_ids == task).astype(per_sample.dtype)
        out[f"loss_task{task}"] = jnp.sum(per_sample * in_task) / jnp.maximum(jnp.sum(in_task), 1.0)
    return out


def mixbridge_loss(expert_outputs, weights, label, task_ids, num_tasks: int, *, wrs_weight: float = 1.0, mask=None):
    """Clean + per-task bridge losses and WRS.

    ``task_ids`` (B,) is 0 for clean pairs and i for backdoor task i. Because
    each sample belongs to one task and tasks are drawn with probability p(task),
    the batch mean of the per-sample errors is the ``Σ_task p(task) E‖·‖²`` sum;
    per-task means are reported as metrics.
    """
    prediction = mixture_prediction(expert_outputs, weights)
    per_sample = bridge_mse(prediction, label, mask)
    loss = jnp.mean(per_sample)
    metrics = {"loss_bridge": loss}
    metrics.update(per_task_losses(per_sample, task_ids, num_tasks))
    if wrs_weight:
        wrs = weight_reallocation_loss(weights)
        loss = loss + wrs_weight * wrs
        metrics["loss_wrs"] = wrs
    metrics["entropy_bits"] = jnp.mean(routing_entropy_bits(weights))
    metrics["loss"] = loss
    return loss, metrics
