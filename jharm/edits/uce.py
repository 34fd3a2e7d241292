"""Unified Concept Editing (Gandikota et al., WACV 2024): closed-form edits of
every cross-attention ``to_k``/``to_v`` projection (METHODS.md §1).

In PyTorch orientation (W: out x in, token embeddings c as columns)::

    W = (λ W0 + s_e Σ_i v_i* c_iᵀ + s_p Σ_j (W0 c_j) c_jᵀ)
        (λ I + s_e Σ_i c_i c_iᵀ + s_p Σ_j c_j c_jᵀ)⁻¹,     v_i* = W0 c_i*.

Because every v* is W0 applied to a guide embedding, the left factor is
``W0 M`` with ``M = λ I + s_e Σ c_i* c_iᵀ + s_p Σ c_j c_jᵀ``; with Flax kernels
K = W0ᵀ (in x out) the edit is ``K' = B⁻¹ Mᵀ K`` — one (D x D) solve shared by
all layers that read D-dim context. Solved in float64 on host, stored in the
params' dtype. UCE-debias is the same edit with guides ``c_i + Σ_a α_a e_a``.
"""
from __future__ import annotations

import re
from typing import Iterable

import numpy as np
from flax import traverse_util

DEFAULT_TARGETS = (r"attn2/to_k/kernel$", r"attn2/to_v/kernel$")


def uce_transform(edit: np.ndarray, guide: np.ndarray, preserve: np.ndarray | None, *,
                  lam: float = 0.5, erase_scale: float = 1.0, preserve_scale: float = 1.0) -> np.ndarray:
    """The (D, D) matrix T with K' = T K for every edited kernel K (in x out).

    Args:
      edit: (N_e, D) embeddings c_i of the tokens to edit.
      guide: (N_e, D) embeddings c_i* whose outputs the edited tokens should take.
      preserve: (N_p, D) embeddings c_j whose outputs must not change, or None.
    """
    edit = np.asarray(edit, np.float64)
    guide = np.asarray(guide, np.float64)
    if edit.ndim != 2 or edit.shape != guide.shape:
        raise ValueError(f"edit and guide embeddings must both be (N, D); got {edit.shape} and {guide.shape}")
    if edit.shape[0] == 0:
        raise ValueError("UCE needs at least one token to edit (the concept prompt tokenized to nothing?)")
    dim = edit.shape[1]
    b = lam * np.eye(dim) + erase_scale * edit.T @ edit
    m = lam * np.eye(dim) + erase_scale * edit.T @ guide  # = (λI + s_e Σ c_i* c_iᵀ)ᵀ
    if preserve is not None and len(preserve):
        preserve = np.asarray(preserve, np.float64)
        if preserve.ndim != 2 or preserve.shape[1] != dim:
            raise ValueError(f"preserve embeddings must be (N, {dim}); got {preserve.shape}")
        gram = preserve_scale * preserve.T @ preserve
        b += gram
        m += gram
    return np.linalg.solve(b, m)


def apply_uce(params, edit, guide, preserve=None, *, lam: float = 0.5, erase_scale: float = 1.0,
              preserve_scale: float = 1.0, targets: Iterable[str] = DEFAULT_TARGETS):
    """Return ``params`` with every kernel matching ``targets`` edited by UCE.

    Raises if no kernel matches or a matching kernel's input dim differs from the
    embeddings' dim (the error names the param path, expected and found dims).
    """
    patterns = [re.compile(p) for p in targets]
    flat = traverse_util.flatten_dict(params)
    transform = uce_transform(edit, guide, preserve, lam=lam, erase_scale=erase_scale, preserve_scale=preserve_scale)
    dim = transform.shape[0]
    edited = 0
    out = {}
    for path, value in flat.items():
        name = "/".join(path)
        if any(p.search(name) for p in patterns):
            kernel = np.asarray(value)
            if kernel.ndim != 2 or kernel.shape[0] != dim:
                raise ValueError(f"UCE: {name} has kernel shape {kernel.shape}; expected ({dim}, out) to match the "
                                 f"{dim}-dim token embeddings")
            out[path] = (transform @ kernel.astype(np.float64)).astype(kernel.dtype)
            edited += 1
        else:
            out[path] = value
    if not edited:
        raise ValueError(f"UCE: no parameter matches {list(targets)}")
    return traverse_util.unflatten_dict(out)
