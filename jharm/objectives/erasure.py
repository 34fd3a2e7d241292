"""Concept-erasure objectives (METHODS.md §1): ESD and Co-Erasing.

The losses take the noise predictor as ``eps_fn(params, z, t, context,
ip_tokens=None, ip_scale=None) -> eps`` so they serve the SD UNet and the
ShapesWorld UNet alike. The frozen teacher's two passes (∅ and the concept)
run as ONE batched call; the student runs once. Targets are wrapped in
``stop_gradient``.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

EpsFn = Callable[..., jnp.ndarray]


def negative_guidance_target(eps_uncond: jnp.ndarray, eps_cond: jnp.ndarray, eta: float) -> jnp.ndarray:
    """ESD target: eps(∅) − η (eps(c) − eps(∅))."""
    return eps_uncond - eta * (eps_cond - eps_uncond)


def esd_loss(student_params, teacher_params, eps_fn: EpsFn, z_t, t, cond_context, uncond_context, *, eta: float = 1.0):
    """ESD: MSE(eps_θ(z, c, t), eps*(z, ∅, t) − η[eps*(z, c, t) − eps*(z, ∅, t)])."""
    both = eps_fn(
        teacher_params,
        jnp.concatenate([z_t, z_t]),
        jnp.concatenate([t, t]),
        jnp.concatenate([uncond_context, cond_context]),
    )
    eps_uncond, eps_cond = jnp.split(both, 2)
    target = jax.lax.stop_gradient(negative_guidance_target(eps_uncond, eps_cond, eta))
    prediction = eps_fn(student_params, z_t, t, cond_context)
    loss = jnp.mean((prediction.astype(jnp.float32) - target.astype(jnp.float32)) ** 2)
    return loss, {"loss": loss}


def refine_image_tokens(image_tokens: jnp.ndarray, text_embeddings: jnp.ndarray) -> jnp.ndarray:
    """Co-Erasing's text-guided refinement (no parameters, one head).

    c_img = softmax(Q Kᵀ / √D) V with Q = the N image tokens (B, N, D) and
    K = V = the concept prompt's token embeddings (B, L, D): each refined token
    is a convex mix of the prompt's token embeddings.
    """
    scale = 1.0 / math.sqrt(image_tokens.shape[-1])
    logits = jnp.einsum("bnd,bld->bnl", image_tokens.astype(jnp.float32), text_embeddings.astype(jnp.float32)) * scale
    weights = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bnl,bld->bnd", weights, text_embeddings.astype(jnp.float32)).astype(text_embeddings.dtype)


def blur_sigma(kernel_size: int) -> float:
    """σ = 0.3((k − 1)/2 − 1) + 0.8, the default for a k-tap Gaussian blur."""
    return 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8


def gaussian_blur(x: jnp.ndarray, kernel_size: int) -> jnp.ndarray:
    """Depthwise Gaussian blur of NHWC ``x`` with reflect padding (separable)."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"blur kernel size must be odd and positive, got {kernel_size}")
    if kernel_size == 1:
        return x
    half = kernel_size // 2
    coords = jnp.arange(kernel_size, dtype=jnp.float32) - half
    kernel = jnp.exp(-0.5 * (coords / blur_sigma(kernel_size)) ** 2)
    kernel = (kernel / kernel.sum()).astype(x.dtype)
    padded = jnp.pad(x, ((0, 0), (half, half), (half, half), (0, 0)), mode="reflect")
    h, w = x.shape[1], x.shape[2]
    rows = sum(kernel[i] * padded[:, i:i + h] for i in range(kernel_size))
    return sum(kernel[j] * rows[:, :, j:j + w] for j in range(kernel_size))


def co_erasing_loss(student_params, teacher_params, eps_fn: EpsFn, z_t, t, text_context, uncond_context,
                    refined_image_tokens, *, eta: float = 1.0, ip_scale: float = 1.0):
    """Co-Erasing: ESD's negative guidance with the condition [c_text; c_img].

    The concept branch feeds the refined image tokens through the decoupled
    IP-Adapter keys/values; the ∅ branch is text-only ("text_uncond"): in the
    batched teacher call its rows get ip scale 0, which is exactly plain
    attention. ``teacher_params`` is the frozen stage-1 (ESD) model.
    """
    batch = z_t.shape[0]
    scales = jnp.concatenate([jnp.zeros((batch,)), jnp.full((batch,), ip_scale)]).astype(z_t.dtype)
    both = eps_fn(
        teacher_params,
        jnp.concatenate([z_t, z_t]),
        jnp.concatenate([t, t]),
        jnp.concatenate([uncond_context, text_context]),
        ip_tokens=jnp.concatenate([refined_image_tokens, refined_image_tokens]),
        ip_scale=scales,
    )
    eps_uncond, eps_cond = jnp.split(both, 2)
    target = jax.lax.stop_gradient(negative_guidance_target(eps_uncond, eps_cond, eta))
    prediction = eps_fn(student_params, z_t, t, text_context, ip_tokens=refined_image_tokens,
                        ip_scale=jnp.full((batch,), ip_scale, z_t.dtype))
    loss = jnp.mean((prediction.astype(jnp.float32) - target.astype(jnp.float32)) ** 2)
    return loss, {"loss": loss}
