"""Scanned samplers: DDIM (eta >= 0), DDPM ancestral, Euler and LMS discrete.

One core, :func:`sample`, runs any of them as a ``jax.lax.scan`` over steps.

Conventions:

- A :class:`SamplerPlan` is built once on the host (:func:`make_plan`) from a
  schedule, a method and a step count; it holds every per-step array
  (timesteps, ᾱ, noise stds, sigmas, LMS coefficients) exactly as diffusers'
  ``set_timesteps`` computes them. It is a pytree: pass it into ``jax.jit``.
- Step *index* ``i = 0 .. S-1`` counts sampling steps; the model *timestep*
  ``plan.timesteps[i]`` is descending (e.g. 981, 961, ..., 1 for SD's DDIM-50).
  Euler/LMS timesteps may be fractional ("linspace" spacing).
- "The sample at index k" is the latent before step k runs (k = 0: pure noise,
  k = S: the final sample). :func:`sample` always takes and returns latents in
  the variance-preserving convention, i.e. what the model sees at that index
  (x_t = sqrt(ᾱ) x0 + sqrt(1-ᾱ) eps). Euler/LMS integrate the equivalent
  ``x0 + sigma eps`` internally; the conversion is done at the boundaries.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jharm.diffusion.guidance import CFG
from jharm.diffusion.schedules import NoiseSchedule, x0_eps_from_output

METHODS = ("ddim", "ddpm", "euler", "lms")
# diffusers' class defaults when the scheduler config does not say.
_DEFAULT_SPACING = {"ddim": "leading", "ddpm": "leading", "euler": "linspace", "lms": "linspace"}
LMS_ORDER = 4

PyTree = Any
# (x (N, ...), t (N,) float32, context pytree with leading dim N) -> model output (N, ...)
ModelFn = Callable[[jax.Array, jax.Array, PyTree], jax.Array]


@dataclasses.dataclass(frozen=True, eq=False)
class SamplerPlan:
    """Per-step constants of one sampler run (arrays are pytree data, the rest static).

    Attributes:
      timesteps: (S,) float32 model timesteps, descending.
      alpha_t, alpha_prev: (S,) ᾱ at the step's timestep and at its target
        (DDIM/DDPM; zeros for Euler/LMS).
      noise_std: (S,) std of the fresh Gaussian noise added at each step (0: none).
      sigmas: (S+1,) Euler/LMS noise levels sqrt((1-ᾱ)/ᾱ), last 0 (zeros for DDIM/DDPM).
      lms_coeffs: (S, 4) LMS weights of the newest..oldest derivative (zeros otherwise).
      init_noise_sigma: scale of the initial noise in the sampler's own convention.
      method, num_steps, prediction_type, clip_sample, clip_sample_range: static.
      stochastic: static; whether some step adds fresh noise (then
        :func:`sample` needs ``rng``).
    """

    timesteps: jax.Array
    alpha_t: jax.Array
    alpha_prev: jax.Array
    noise_std: jax.Array
    sigmas: jax.Array
    lms_coeffs: jax.Array
    init_noise_sigma: jax.Array
    method: str = "ddim"
    num_steps: int = 50
    prediction_type: str = "epsilon"
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    stochastic: bool = False


jax.tree_util.register_dataclass(
    SamplerPlan,
    data_fields=["timesteps", "alpha_t", "alpha_prev", "noise_std", "sigmas", "lms_coeffs", "init_noise_sigma"],
    meta_fields=["method", "num_steps", "prediction_type", "clip_sample", "clip_sample_range", "stochastic"],
)


def inference_timesteps(schedule: NoiseSchedule, num_steps: int, method: str = "ddim",
                        timestep_spacing: str | None = None) -> np.ndarray:
    """The descending timesteps diffusers' ``set_timesteps`` gives for ``method``:
    int64 for DDIM/DDPM, float32 (possibly fractional) for Euler/LMS."""
    n, s = schedule.num_train_timesteps, int(num_steps)
    if not 1 <= s <= n:
        raise ValueError(f"num_steps={num_steps} must be in [1, num_train_timesteps={n}]")
    spacing = timestep_spacing or schedule.timestep_spacing or _DEFAULT_SPACING[method]
    discrete = method in ("ddim", "ddpm")
    if spacing == "linspace":
        if discrete:
            return np.linspace(0, n - 1, s).round()[::-1].astype(np.int64)
        return np.linspace(0, n - 1, s, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ts = (np.arange(0, s) * (n // s)).round()[::-1] + schedule.steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(n, 0, -n / s)) - 1
    else:
        raise ValueError(f"timestep_spacing={spacing!r}; expected leading, trailing or linspace")
    return ts.astype(np.int64) if discrete else ts.astype(np.float32)


def _lms_coefficients(sigmas: np.ndarray, order: int = LMS_ORDER) -> np.ndarray:
    """Linear multistep weights: ∫_{σ_i}^{σ_{i+1}} of each Lagrange basis polynomial
    through the last ``min(i+1, order)`` sigmas. Integrated exactly (the
    integrand is a polynomial), which is what diffusers' numerical quad approximates."""
    sig = sigmas.astype(np.float64)
    steps = len(sig) - 1
    coeffs = np.zeros((steps, order), np.float64)
    poly = np.polynomial.polynomial
    for i in range(steps):
        o = min(i + 1, order)
        for cur in range(o):
            basis = np.array([1.0])
            for k in range(o):
                if k != cur:
                    basis = poly.polymul(basis, [-sig[i - k], 1.0]) / (sig[i - cur] - sig[i - k])
            antider = poly.polyint(basis)
            coeffs[i, cur] = poly.polyval(sig[i + 1], antider) - poly.polyval(sig[i], antider)
    return coeffs.astype(np.float32)


def make_plan(schedule: NoiseSchedule, method: str, num_steps: int, *, eta: float = 0.0,
              timestep_spacing: str | None = None) -> SamplerPlan:
    """Precompute a sampler run on the host (needs a concrete ``schedule``).

    Args:
      schedule: the model's training schedule.
      method: "ddim" | "ddpm" | "euler" | "lms".
      num_steps: number of sampling steps S.
      eta: DDIM stochasticity (0 = deterministic DDIM, 1 = DDPM-like variance).
      timestep_spacing: overrides ``schedule.timestep_spacing``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown sampler {method!r}; expected one of {', '.join(METHODS)}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if eta and method != "ddim":
        raise ValueError(f"eta applies to DDIM only (method={method!r})")
    ts = inference_timesteps(schedule, num_steps, method, timestep_spacing)
    s = len(ts)
    abar = np.asarray(schedule.alphas_cumprod, np.float32)
    zeros_s = np.zeros(s, np.float32)
    alpha_t, alpha_prev, std = zeros_s, zeros_s, zeros_s
    sigmas, lms = np.zeros(s + 1, np.float32), np.zeros((s, LMS_ORDER), np.float32)
    init_sigma = np.float32(1.0)
    one = np.float32(1.0)
    if method == "ddim":
        # diffusers' DDIM steps to t - N//S whatever the spacing; below 0 it uses the final ᾱ.
        prev = ts - schedule.num_train_timesteps // s
        final = one if schedule.set_alpha_to_one else abar[0]
        alpha_t = abar[ts]
        alpha_prev = np.where(prev >= 0, abar[np.maximum(prev, 0)], final).astype(np.float32)
        var = ((one - alpha_prev) / (one - alpha_t)) * (one - alpha_t / alpha_prev)
        std = (np.float32(eta) * np.sqrt(var)).astype(np.float32)
    elif method == "ddpm":
        prev = np.concatenate([ts[1:], [-1]])
        alpha_t = abar[ts]
        alpha_prev = np.where(prev >= 0, abar[np.maximum(prev, 0)], one).astype(np.float32)
        beta = one - alpha_t / alpha_prev
        var = np.maximum((one - alpha_prev) / (one - alpha_t) * beta, np.float32(1e-20))
        if schedule.variance_type == "fixed_large":
            var = beta
        std = np.where(ts > 0, np.sqrt(var), 0).astype(np.float32)  # no noise on the step from t = 0
    else:
        all_sigmas = np.sqrt((one - abar) / abar)
        sig = np.interp(ts, np.arange(len(all_sigmas)), all_sigmas)
        sigmas = np.concatenate([sig, [0.0]]).astype(np.float32)
        spacing = timestep_spacing or schedule.timestep_spacing or _DEFAULT_SPACING[method]
        smax = sigmas.max()
        init_sigma = smax if spacing in ("linspace", "trailing") else np.sqrt(smax**2 + 1)
        if method == "lms":
            lms = _lms_coefficients(sigmas)
    f32 = lambda a: jnp.asarray(np.asarray(a, np.float32))  # noqa: E731
    return SamplerPlan(
        timesteps=f32(ts), alpha_t=f32(alpha_t), alpha_prev=f32(alpha_prev), noise_std=f32(std),
        sigmas=f32(sigmas), lms_coeffs=f32(lms), init_noise_sigma=f32(init_sigma),
        method=method, num_steps=s, prediction_type=schedule.prediction_type,
        clip_sample=schedule.clip_sample and method in ("ddim", "ddpm"),
        clip_sample_range=schedule.clip_sample_range, stochastic=bool(np.any(std > 0)),
    )


def step_noise(rng: jax.Array, step_index, shape, dtype=jnp.float32) -> jax.Array:
    """The fresh noise :func:`sample` adds at step ``step_index``: a key folded
    with the index, so a run stopped at step k draws exactly the first k noises
    of a full run."""
    # Drawn flat then reshaped: the same values as drawing ``shape`` directly
    # (partitionable threefry counts in row-major order), but XLA:CPU compiles
    # the N-d version several times slower.
    flat = jax.random.normal(jax.random.fold_in(rng, step_index), (int(np.prod(shape)),), dtype)
    return flat.reshape(shape)


# --- one step of each method: (plan, i, x, model_output, aux, noise) -> (x_next, aux) ---

def _vp_x0(plan: SamplerPlan, i, x, out):
    x0, eps = x0_eps_from_output(plan.prediction_type, x, out, plan.alpha_t[i])
    if plan.clip_sample:
        x0 = jnp.clip(x0, -plan.clip_sample_range, plan.clip_sample_range)
    return x0, eps


def _ddim_update(plan, i, x, out, aux, noise):
    x0, eps = _vp_x0(plan, i, x, out)
    a_prev, std = plan.alpha_prev[i], plan.noise_std[i]
    x_next = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev - std**2) * eps
    if noise is not None:
        x_next = x_next + std * noise
    return x_next, aux


def _ddpm_update(plan, i, x, out, aux, noise):
    x0, _ = _vp_x0(plan, i, x, out)
    a_t, a_prev = plan.alpha_t[i], plan.alpha_prev[i]
    cur_alpha = a_t / a_prev
    # Posterior mean of q(x_prev | x_t, x0) (DDPM eq. 7).
    mean = (jnp.sqrt(a_prev) * (1 - cur_alpha) / (1 - a_t)) * x0 + (jnp.sqrt(cur_alpha) * (1 - a_prev) / (1 - a_t)) * x
    return (mean if noise is None else mean + plan.noise_std[i] * noise), aux


def _sigma_derivative(plan, i, x, out):
    """dx/dsigma of the probability-flow ODE in the x0 + sigma·eps convention."""
    sigma = plan.sigmas[i]
    if plan.prediction_type == "epsilon":
        x0 = x - sigma * out
    elif plan.prediction_type == "v_prediction":
        x0 = out * (-sigma / jnp.sqrt(sigma**2 + 1)) + x / (sigma**2 + 1)
    else:
        x0 = out
    return (x - x0) / sigma


def _euler_update(plan, i, x, out, aux, noise):
    return x + _sigma_derivative(plan, i, x, out) * (plan.sigmas[i + 1] - plan.sigmas[i]), aux


def _lms_update(plan, i, x, out, history, noise):
    history = jnp.concatenate([_sigma_derivative(plan, i, x, out)[None], history[:-1]])
    update = plan.lms_coeffs[i, 0] * history[0]
    for j in range(1, LMS_ORDER):  # weights of derivatives not yet seen are 0
        update = update + plan.lms_coeffs[i, j] * history[j]
    return x + update, history


_UPDATES = {"ddim": _ddim_update, "ddpm": _ddpm_update, "euler": _euler_update, "lms": _lms_update}


def _vp_scale(plan: SamplerPlan, index) -> jax.Array:
    """Factor from the sampler's own convention to the VP latent at ``index``."""
    return 1.0 / jnp.sqrt(plan.sigmas[index] ** 2 + 1)


def _context_rows(contexts: PyTree, batch: int, what: str) -> int:
    leaves = jax.tree_util.tree_leaves(contexts)
    if not leaves:
        return 1
    n = leaves[0].shape[0]
    for leaf in leaves:
        if leaf.ndim < 2 or leaf.shape[:2] != (n, batch):
            raise ValueError(f"{what}: every leaf must have leading dims (n_conditions, batch) = ({n}, {batch}); "
                             f"found shape {leaf.shape}")
    return n


def _call_model(model_fn: ModelFn, x, t, contexts, n: int) -> jax.Array:
    """ONE model call on the batch stacked over the n condition rows -> (n, B, ...)."""
    b = x.shape[0]
    xs = jnp.broadcast_to(x[None], (n,) + x.shape).reshape((n * b,) + x.shape[1:])
    ts = jnp.full((n * b,), t, jnp.float32)
    ctx = jax.tree_util.tree_map(lambda a: a.reshape((n * b,) + a.shape[2:]), contexts)
    out = model_fn(xs, ts, ctx)
    return out.reshape((n, b) + out.shape[1:])


def _is_static(v) -> bool:
    return v is None or isinstance(v, (int, np.integer))


def sample(
    model_fn: ModelFn,
    plan: SamplerPlan,
    x_T: jax.Array,
    contexts: PyTree = None,
    *,
    guidance: Any = None,
    guidance_scale: float = 7.5,
    rng: jax.Array | None = None,
    late_contexts: PyTree = None,
    switch_t=None,
    guidance_interval=None,
    start_index=0,
    stop_index=None,
    return_trajectory: bool = False,
):
    """Run the sampler of ``plan`` from step ``start_index`` to ``stop_index`` as one ``lax.scan``.

    Pure and traceable: call it inside ``jax.jit`` (build ``model_fn`` from traced
    params there, e.g. ``lambda x, t, c: unet.apply(params, x, t, c)``).

    Args:
      model_fn: ``(x (N, ...), t (N,) float32, context) -> output (N, ...)``,
        epsilon / v / x0 per the schedule's prediction_type. Called ONCE per step
        on the latents repeated over all condition rows.
      plan: from :func:`make_plan`.
      x_T: (B, ...) latents. With ``start_index == 0`` (the usual case) standard
        normal noise, scaled by ``plan.init_noise_sigma`` as diffusers does;
        otherwise the VP latent at ``start_index`` (e.g. ``add_noise`` of an image).
      contexts: pytree whose leaves are (n_conditions, B, ...): row 0 the
        unconditional context, row 1 the prompt, further rows for the guidance
        (SLD's safety concept, ...). ``None`` for an unconditional model.
      guidance: a guidance object (see :mod:`jharm.diffusion.guidance`) combining
        the rows and carrying its own state through the scan; default
        ``CFG(guidance_scale)``.
      rng: PRNG key; required when the plan adds noise (DDPM, DDIM with eta > 0).
        Step i uses :func:`step_noise` ``(rng, i, ...)``.
      late_contexts, switch_t: two-stage sampling: steps whose model timestep
        is ``t >= switch_t`` use ``contexts``, steps with ``t < switch_t`` use
        ``late_contexts`` (same structure). ``switch_t`` may be traced: both are
        selected inside the scan, nothing recompiles.
      guidance_interval: ``(t_lo, t_hi)``: guidance only at steps whose model
        timestep satisfies ``t_lo <= t < t_hi``; the other steps take the prompt
        row's output unguided (row 1, or row 0 with a single row). Guidance in
        the high-noise steps is what collapses a prompt's attribute distribution
        onto its majority (Kynkäänniemi et al. 2024 apply it in a limited
        interval). The guidance state is still carried through every step.
        Bounds may be traced. ``None``: every step.
      start_index, stop_index: run steps ``start_index <= i < stop_index``
        (default all S). Python ints scan only those steps; traced ints (e.g. a
        random k inside a jitted train step) scan all S steps and skip the rest
        with ``lax.cond``, so they compile once. LMS starts its multistep
        history afresh at ``start_index`` (as diffusers does with a begin index).
      return_trajectory: also return the VP latents after every scanned step.

    Returns:
      The VP latent at index ``stop_index`` (the final sample when it is S),
      shaped like ``x_T``; with ``return_trajectory`` a tuple ``(x, trajectory)``
      where ``trajectory[j]`` is the latent after the j-th scanned step.
    """
    num = plan.num_steps
    guidance = CFG(guidance_scale) if guidance is None else guidance
    n_rows = _context_rows(contexts, x_T.shape[0], "contexts")
    if late_contexts is not None:
        if switch_t is None:
            raise ValueError("late_contexts needs switch_t (steps with t < switch_t use late_contexts)")
        if jax.tree_util.tree_structure(late_contexts) != jax.tree_util.tree_structure(contexts):
            raise ValueError("late_contexts must have the same pytree structure as contexts")
        for a, b in zip(jax.tree_util.tree_leaves(contexts), jax.tree_util.tree_leaves(late_contexts)):
            if a.shape != b.shape:
                raise ValueError(f"late_contexts leaf shape {b.shape} differs from contexts leaf shape {a.shape}")
    if guidance_interval is not None and len(guidance_interval) != 2:
        raise ValueError(f"guidance_interval must be (t_lo, t_hi), got {guidance_interval!r}")
    stochastic = plan.stochastic
    if stochastic and rng is None:
        raise ValueError(f"the {plan.method} plan adds noise at some step: pass rng")

    static = _is_static(start_index) and _is_static(stop_index)
    if static:
        start, stop = int(start_index), num if stop_index is None else int(stop_index)
        if not 0 <= start <= stop <= num:
            raise ValueError(f"need 0 <= start_index <= stop_index <= {num}; got {start}, {stop}")
        indices = jnp.arange(start, stop)
    else:
        start = jnp.clip(jnp.asarray(start_index, jnp.int32), 0, num)
        stop = jnp.clip(jnp.asarray(num if stop_index is None else stop_index, jnp.int32), start, num)
        indices = jnp.arange(num)
    dtype = x_T.dtype
    in_scale = jnp.where(start == 0, plan.init_noise_sigma, 1.0 / _vp_scale(plan, start))
    x = x_T * in_scale.astype(dtype)
    history = jnp.zeros((LMS_ORDER,) + x.shape, dtype) if plan.method == "lms" else ()
    update = _UPDATES[plan.method]

    def run_step(carry, i):
        x, aux, state = carry
        t = plan.timesteps[i]
        ctx = contexts
        if late_contexts is not None:
            early = t >= switch_t
            ctx = jax.tree_util.tree_map(lambda a, b: jnp.where(early, a, b), contexts, late_contexts)
        x_in = x * _vp_scale(plan, i).astype(dtype)
        outs = _call_model(model_fn, x_in, t, ctx, n_rows).astype(dtype)
        out, state = guidance(outs, state, i)
        if guidance_interval is not None:
            lo, hi = guidance_interval
            out = jnp.where((t >= lo) & (t < hi), out, outs[min(1, n_rows - 1)])
        noise = step_noise(rng, i, x.shape, dtype) if stochastic else None
        x, aux = update(plan, i, x, out.astype(dtype), aux, noise)
        return x, aux, state

    def body(carry, i):
        if static:
            carry = run_step(carry, i)
        else:
            carry = jax.lax.cond((i >= start) & (i < stop), run_step, lambda c, _: c, carry, i)
        out = carry[0] * _vp_scale(plan, i + 1).astype(dtype) if return_trajectory else None
        return carry, out

    (x, _, _), trajectory = jax.lax.scan(body, (x, history, guidance.init(x)), indices)
    x = x * _vp_scale(plan, stop).astype(dtype)
    return (x, trajectory) if return_trajectory else x
