"""Guidance rules that combine the per-condition model outputs of one step.

The sampler calls the model ONCE per step on a batch stacked over conditions
and hands the outputs to a guidance object as ``outs`` of shape
``(n_conditions, B, ...)`` in the order the contexts were stacked:
row 0 = unconditional (∅), row 1 = the prompt, rows 2.. = extra conditions
(SLD's safety concept, Fair Diffusion's edit concepts, ...).

A guidance object is a pytree (its numeric fields may be traced) with

- ``init(x) -> state``: the initial carried state (a pytree, e.g. momentum),
- ``__call__(outs, state, step_index) -> (output, new_state)``: the combined
  model output (same kind as the model's: epsilon or v) used for the step.

Guidance acts on the raw model outputs, as diffusers' pipelines do, also for
v-prediction models.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def _pytree_dataclass(cls):
    """Frozen dataclass whose fields are all pytree data (so they may be traced)."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(cls, data_fields=names, meta_fields=[])


@_pytree_dataclass
class CFG:
    """Classifier-free guidance: ``out(∅) + scale · (out(p) − out(∅))``.

    With a single condition row (no unconditional branch) the output is that
    row unchanged.
    """

    scale: float = 7.5

    def init(self, x: jax.Array):
        return ()

    def __call__(self, outs: jax.Array, state, step_index):
        if outs.shape[0] == 1:
            return outs[0], state
        return outs[0] + self.scale * (outs[1] - outs[0]), state


@_pytree_dataclass
class SLD:
    """Safe Latent Diffusion (Schramowski et al., CVPR 2023); rows [∅, prompt, safety concept S].

    g = out(p) − out(∅); μ = min(s_S · |out(p) − out(S)|, 1), set to 0 where
    out(p) − out(S) ≥ λ; γ = μ ⊙ (out(S) − out(∅)) + s_m ν;
    ν ← β_m ν + (1 − β_m) γ (updated every step, warm-up included);
    after ``warmup_steps`` steps g ← g − γ; output = out(∅) + guidance_scale · g.
    As in diffusers' pipeline, the safety term is off when ``sld_scale <= 1``.
    The carried state is the momentum ν (zeros at the start).
    """

    guidance_scale: float = 7.5
    warmup_steps: int = 10
    sld_scale: float = 1000.0
    threshold: float = 0.01
    momentum_scale: float = 0.3
    momentum_beta: float = 0.4

    def init(self, x: jax.Array):
        return jnp.zeros_like(x)

    def __call__(self, outs: jax.Array, momentum, step_index):
        if outs.shape[0] != 3:
            raise ValueError(f"SLD needs 3 condition rows [uncond, prompt, safety concept]; got {outs.shape[0]}")
        uncond, cond, safety = outs[0], outs[1], outs[2]
        guide = cond - uncond
        diff = cond - safety
        mu = jnp.where(diff >= self.threshold, 0.0, jnp.minimum(jnp.abs(diff) * self.sld_scale, 1.0))
        gamma = (safety - uncond) * mu + self.momentum_scale * momentum
        new_momentum = self.momentum_beta * momentum + (1 - self.momentum_beta) * gamma
        enabled = jnp.asarray(self.sld_scale) > 1.0
        apply = jnp.logical_and(enabled, jnp.asarray(step_index) >= self.warmup_steps)
        guide = jnp.where(apply, guide - gamma, guide)
        new_momentum = jnp.where(enabled, new_momentum, momentum)
        return uncond + self.guidance_scale * guide, new_momentum


# (warmup δ, s_S, λ, s_m, β_m) from the paper / diffusers' SafetyConfig.
SLD_PRESETS = {
    "weak": (15, 20.0, 0.0, 0.0, 0.0),
    "medium": (10, 1000.0, 0.01, 0.3, 0.4),
    "strong": (7, 2000.0, 0.025, 0.5, 0.7),
    "max": (0, 5000.0, 1.0, 0.5, 0.7),
}


def sld_preset(name: str, guidance_scale: float = 7.5) -> SLD:
    """The SLD configuration ``name`` in weak | medium | strong | max."""
    if name not in SLD_PRESETS:
        raise ValueError(f"unknown SLD preset {name!r}; expected one of {', '.join(SLD_PRESETS)}")
    warmup, sld_scale, threshold, mom_scale, mom_beta = SLD_PRESETS[name]
    return SLD(guidance_scale, warmup, sld_scale, threshold, mom_scale, mom_beta)


@_pytree_dataclass
class FairDiffusion:
    """Fair Diffusion (Friedrich et al. 2023): semantic guidance towards a randomly
    drawn attribute per image; rows [∅, prompt, edit concept 1, ..., edit concept E].

    Per concept e: ψ_e = sign_e · s_e · (out(c_e) − out(∅)), kept only where
    |ψ_e| is in the top ``1 − threshold`` of its (sample, channel) map
    (threshold 0.95 = top 5 %); ψ = Σ_e ψ_e + s_m ν; ν ← β_m ν + (1 − β_m) ψ;
    after ``warmup_steps`` the output is CFG + ψ. ``directions`` (B, E) holds
    the per-image signs (+1 towards, −1 away), e.g. +"female person"
    −"male person" for half the images and the reverse for the others
    (:func:`balanced_directions`). The carried state is ν.
    """

    directions: jax.Array
    guidance_scale: float = 7.5
    edit_scale: float = 4.0
    threshold: float = 0.95
    warmup_steps: int = 5
    momentum_scale: float = 0.5
    momentum_beta: float = 0.6

    def init(self, x: jax.Array):
        return jnp.zeros_like(x)

    def __call__(self, outs: jax.Array, momentum, step_index):
        num_edits = outs.shape[0] - 2
        if num_edits < 1 or self.directions.shape[-1] != num_edits:
            raise ValueError(f"Fair Diffusion needs rows [uncond, prompt, {self.directions.shape[-1]} edit concepts]; "
                             f"got {outs.shape[0]} rows")
        uncond, cond = outs[0], outs[1]
        edit = jnp.zeros_like(uncond)
        for e in range(num_edits):
            sign = self.directions[:, e].reshape((-1,) + (1,) * (uncond.ndim - 1)).astype(uncond.dtype)
            psi = sign * (outs[2 + e] - uncond)
            # Quantile over the spatial positions of each (sample, channel) map (NHWC).
            flat = jnp.abs(psi).reshape(psi.shape[0], -1, psi.shape[-1])
            cutoff = jnp.quantile(flat, self.threshold, axis=1)[:, None, None, :]
            edit = edit + jnp.where(jnp.abs(psi) >= cutoff, psi * self.edit_scale, 0.0)
        edit = edit + self.momentum_scale * momentum
        new_momentum = self.momentum_beta * momentum + (1 - self.momentum_beta) * edit
        guided = uncond + self.guidance_scale * (cond - uncond)
        guided = jnp.where(jnp.asarray(step_index) >= self.warmup_steps, guided + edit, guided)
        return guided, new_momentum


def balanced_directions(rng: jax.Array, batch: int) -> jax.Array:
    """(B, 2) signs: half the images +concept0/−concept1, half the reverse, shuffled."""
    first = jnp.where(jnp.arange(batch) % 2 == 0, 1.0, -1.0)
    first = jax.random.permutation(rng, first)
    return jnp.stack([first, -first], axis=-1)
