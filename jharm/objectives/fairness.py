"""LightFair's distance constraints (METHODS.md §2), as pure jittable functions.

Shapes: C concepts ("doctor", "a square"), A attributes ("female"/"male",
colours), D embedding dims. Similarities are cosines between text embeddings
(pooled EOS through the frozen text projection) and image-attribute centroids.

* ``equalized_odds``  ℓ_o: per concept, the std over attributes of
  ``s(emb(neutral prompt), μ_a) - γ_a``; 0 when the neutral prompt is equally
  close to every centroid (after the target offsets γ).
* ``equalized_quality`` ℓ_q: per concept, the std over attributes of
  ``s(emb(prompt naming a), μ_a)``.

Stds are ``sqrt(var + eps)`` so that the gradient stays finite when all
similarities are equal (the optimum), where a plain sqrt would give NaN.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

DEFAULT_EPS = 1e-8


def cosine_similarity(a: jnp.ndarray, b: jnp.ndarray, eps: float = 1e-8) -> jnp.ndarray:
    """Cosine similarity along the last axis (broadcasting)."""
    a = a / jnp.sqrt(jnp.sum(a * a, axis=-1, keepdims=True) + eps)
    b = b / jnp.sqrt(jnp.sum(b * b, axis=-1, keepdims=True) + eps)
    return jnp.sum(a * b, axis=-1)


def safe_std(x: jnp.ndarray, axis: int = -1, eps: float = DEFAULT_EPS) -> jnp.ndarray:
    """Population std with ``sqrt(var + eps)``: finite gradient at zero variance."""
    centred = x - jnp.mean(x, axis=axis, keepdims=True)
    return jnp.sqrt(jnp.mean(centred * centred, axis=axis) + eps)


def target_offsets(target: np.ndarray | None, num_attributes: int, temperature: float = 0.01) -> np.ndarray:
    """γ_a = T·log(A·π_a): the offsets under which a softmax over similarities
    (temperature T) reproduces the target distribution π (jharm default).

    ``target=None`` means uniform, γ = 0.
    """
    if target is None:
        return np.zeros((num_attributes,), np.float32)
    target = np.asarray(target, np.float64)
    if target.shape[-1] != num_attributes:
        raise ValueError(f"target distribution has {target.shape[-1]} entries, expected {num_attributes} (one per attribute)")
    if np.any(target <= 0) or not np.allclose(target.sum(-1), 1.0, atol=1e-6):
        raise ValueError(f"target distribution must be positive and sum to 1, got {target.tolist()}")
    return (temperature * np.log(num_attributes * target)).astype(np.float32)


def equalized_odds(neutral_emb, centroids, offsets=None, eps: float = DEFAULT_EPS):
    """ℓ_o averaged over concepts.

    Args:
      neutral_emb: (C, D) embeddings of the neutral prompts.
      centroids: (C, A, D) image-embedding centroids per concept and attribute.
      offsets: None, (A,) or (C, A) target offsets γ (see ``target_offsets``).
    """
    sims = cosine_similarity(neutral_emb[:, None, :], centroids)  # (C, A)
    if offsets is not None:
        sims = sims - offsets
    return jnp.mean(safe_std(sims, axis=-1, eps=eps))


def equalized_quality(attribute_emb, centroids, eps: float = DEFAULT_EPS):
    """ℓ_q averaged over concepts; ``attribute_emb`` (C, A, D): prompt naming a."""
    sims = cosine_similarity(attribute_emb, centroids)  # (C, A)
    return jnp.mean(safe_std(sims, axis=-1, eps=eps))


def keep_close(emb, emb_original):
    """Usability regulariser: mean squared distance to the original encoder's embeddings."""
    return jnp.mean(jnp.sum((emb - emb_original) ** 2, axis=-1))


def lightfair_loss(
    neutral_emb,
    attribute_emb,
    centroids,
    *,
    offsets=None,
    lambda_q: float = 1.0,
    lambda_r: float = 0.0,
    keep_emb=None,
    keep_emb_original=None,
    eps: float = DEFAULT_EPS,
):
    """ℓ_o + λ_q ℓ_q (+ λ_r keep-close). Returns (loss, metrics)."""
    l_o = equalized_odds(neutral_emb, centroids, offsets, eps)
    l_q = equalized_quality(attribute_emb, centroids, eps)
    loss = l_o + lambda_q * l_q
    metrics = {"loss_odds": l_o, "loss_quality": l_q}
    if lambda_r and keep_emb is not None:
        l_r = keep_close(keep_emb, keep_emb_original)
        loss = loss + lambda_r * l_r
        metrics["loss_keep"] = l_r
    metrics["loss"] = loss
    return loss, metrics
