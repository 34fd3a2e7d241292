"""debias-VL (Chuang et al. 2023): project spurious attribute directions out of
the prompt's text embeddings (METHODS.md §2, fairness baseline).

P = (λ M + I)⁻¹ with M = mean over attribute-prompt pairs (a, b) of
(z_a − z_b)(z_a − z_b)ᵀ, z the L2-normalised EOS embeddings of the pair's
prompts ("a photo of a male doctor" / "... female doctor"). P is applied to
every token embedding of the conditional prompt (the 77 x D context the UNet
reads). λ = 500 by default.
"""
from __future__ import annotations

import numpy as np


def debias_projection(pairs_a: np.ndarray, pairs_b: np.ndarray, lam: float = 500.0) -> np.ndarray:
    """The (D, D) projection from paired embeddings (N, D) and (N, D)."""
    a, b = np.asarray(pairs_a, np.float64), np.asarray(pairs_b, np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"attribute prompt pairs must be two (N, D) arrays with N >= 1, got {a.shape} and {b.shape}")
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    diffs = a - b
    m = diffs.T @ diffs / diffs.shape[0]
    return np.linalg.inv(lam * m + np.eye(m.shape[0]))


def apply_projection(context: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """Apply P to every token embedding: (..., L, D) @ Pᵀ (P is symmetric)."""
    context = np.asarray(context)
    if context.shape[-1] != projection.shape[0]:
        raise ValueError(f"context dim {context.shape[-1]} does not match the projection's {projection.shape[0]}")
    return (context.astype(np.float64) @ projection.T).astype(context.dtype)
