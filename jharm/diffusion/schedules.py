"""DDPM noise schedules and the forward-process algebra (pure, jittable).

Conventions (the same as diffusers):

- Training timesteps are integers ``t = 0 .. N-1`` (``N = num_train_timesteps``);
  ``alphas_cumprod[t]`` (written ᾱ_t) is the signal fraction at ``t``:
  ``x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) eps``. Samplers walk ``t`` *downwards*.
- ``prediction_type`` says what the network outputs: ``"epsilon"`` (the noise),
  ``"v_prediction"`` (``v = sqrt(ᾱ) eps - sqrt(1-ᾱ) x0``, SD 2.x 768) or
  ``"sample"`` (x0 itself).
- Every function taking ``t`` accepts a Python int, a traced int scalar, or a
  per-example int array of shape ``(B,)``; the coefficients broadcast over the
  trailing dimensions of ``x``.

The beta arrays are computed on the host in float32 exactly like diffusers'
schedulers, so ``alphas_cumprod`` agrees with theirs to float32 rounding.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


@dataclasses.dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A discrete DDPM noise schedule plus the diffusers options samplers need.

    ``betas`` and ``alphas_cumprod`` are the pytree data (so a schedule can be a
    ``jax.jit`` argument); every other field is static metadata.

    Attributes:
      betas: (N,) float32 per-step noise variances.
      alphas_cumprod: (N,) float32 ᾱ_t = prod_{s<=t} (1 - beta_s).
      num_train_timesteps: N.
      prediction_type: "epsilon" | "v_prediction" | "sample".
      steps_offset: added to "leading" inference timesteps (SD uses 1).
      set_alpha_to_one: DDIM's ᾱ after the last step: 1.0 if True, else ᾱ_0.
      clip_sample: clamp the predicted x0 to ±clip_sample_range (DDIM/DDPM).
      clip_sample_range: see clip_sample.
      timestep_spacing: "leading" | "trailing" | "linspace", or None to use
        each sampler's diffusers default (leading for DDIM/DDPM, linspace for
        Euler/LMS), which is what diffusers does when the config omits it.
      variance_type: DDPM ancestral noise: "fixed_small" (posterior variance),
        "fixed_small_log" (same, via log) or "fixed_large" (beta_t).
    """

    betas: jax.Array
    alphas_cumprod: jax.Array
    num_train_timesteps: int = 1000
    prediction_type: str = "epsilon"
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    timestep_spacing: str | None = None
    variance_type: str = "fixed_small"


jax.tree_util.register_dataclass(
    NoiseSchedule,
    data_fields=["betas", "alphas_cumprod"],
    meta_fields=[
        "num_train_timesteps", "prediction_type", "steps_offset", "set_alpha_to_one",
        "clip_sample", "clip_sample_range", "timestep_spacing", "variance_type",
    ],
)


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    """Glide/improved-DDPM cosine schedule, discretised per step (float64 host math)."""
    def alpha_bar(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)])


def _linspace32(start: float, end: float, n: int) -> np.ndarray:
    """float32 linspace rounded the way torch's CPU kernel rounds it (from both
    ends, one fused multiply-add per element), so beta arrays are bit-identical
    to diffusers'; numpy's own float32 linspace differs in the last bit."""
    s, e = np.float64(np.float32(start)), np.float64(np.float32(end))
    step = np.float64((np.float32(end) - np.float32(start)) / np.float32(max(n - 1, 1)))
    i = np.arange(n, dtype=np.float64)
    return np.where(i < n // 2, s + step * i, e - step * (n - 1 - i)).astype(np.float32)


def betas_for(kind: str, num_train_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """The (N,) float32 beta array of a named schedule (host numpy)."""
    n = int(num_train_timesteps)
    if kind == "linear":
        betas = _linspace32(beta_start, beta_end, n)
    elif kind == "scaled_linear":  # SD: linear in sqrt(beta)
        betas = _linspace32(beta_start**0.5, beta_end**0.5, n) ** 2
    elif kind in ("squaredcos_cap_v2", "cosine"):
        betas = _cosine_betas(n)
    else:
        raise ValueError(f"unknown beta schedule {kind!r}; supported: {', '.join(BETA_SCHEDULES)} (or 'cosine')")
    return np.asarray(betas, dtype=np.float32)


def _check_choice(name: str, value, choices, source: str = "") -> None:
    if value not in choices:
        where = f"{source}: " if source else ""
        raise ValueError(f"{where}{name}={value!r} is not supported; expected one of {', '.join(map(str, choices))}")


def schedule_from_betas(betas, **options: Any) -> NoiseSchedule:
    """A schedule from an explicit beta array (diffusers' ``trained_betas``)."""
    betas = np.asarray(betas, dtype=np.float32)
    if betas.ndim != 1 or betas.size == 0 or np.any(betas <= 0) or np.any(betas >= 1):
        raise ValueError(f"betas must be a non-empty 1-D array in (0, 1); got shape {betas.shape}")
    options.setdefault("num_train_timesteps", betas.size)
    if options["num_train_timesteps"] != betas.size:
        raise ValueError(f"num_train_timesteps={options['num_train_timesteps']} but {betas.size} betas were given")
    _check_choice("prediction_type", options.get("prediction_type", "epsilon"), PREDICTION_TYPES)
    _check_choice("timestep_spacing", options.get("timestep_spacing"), TIMESTEP_SPACINGS + (None,))
    _check_choice("variance_type", options.get("variance_type", "fixed_small"), VARIANCE_TYPES)
    # torch.cumprod accumulates float32 in double; doing the same matches diffusers bit for bit.
    alphas_cumprod = np.cumprod((1.0 - betas).astype(np.float64)).astype(np.float32)
    return NoiseSchedule(betas=jnp.asarray(betas), alphas_cumprod=jnp.asarray(alphas_cumprod), **options)


def make_schedule(
    kind: str = "scaled_linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    **options: Any,
) -> NoiseSchedule:
    """Build a schedule: ``kind`` in "scaled_linear" (SD), "linear", "squaredcos_cap_v2"/"cosine".

    ``options`` are the other :class:`NoiseSchedule` fields (prediction_type,
    steps_offset, set_alpha_to_one, clip_sample, timestep_spacing, ...). The
    defaults are jharm's, not diffusers' class defaults: ``clip_sample=False``
    (latents are not in [-1, 1]); use :func:`from_scheduler_config` to get
    exactly what a diffusers ``scheduler_config.json`` means.
    """
    return schedule_from_betas(betas_for(kind, num_train_timesteps, beta_start, beta_end),
                               num_train_timesteps=num_train_timesteps, **options)


def sd_schedule(prediction_type: str = "epsilon") -> NoiseSchedule:
    """Stable Diffusion 1.x/2.x training schedule (scaled_linear 0.00085..0.012,
    steps_offset 1, set_alpha_to_one False); ``"v_prediction"`` for SD 2.x 768."""
    return make_schedule("scaled_linear", 1000, 0.00085, 0.012, prediction_type=prediction_type,
                         steps_offset=1, set_alpha_to_one=False)


# Options jharm does not implement; accepting them silently would sample wrongly.
_UNSUPPORTED = {
    "rescale_betas_zero_snr": (False, None),
    "thresholding": (False, None),
    "use_karras_sigmas": (False, None),
    "use_exponential_sigmas": (False, None),
    "use_beta_sigmas": (False, None),
    "interpolation_type": ("linear", None),
    "timestep_type": ("discrete", None),
    "final_sigmas_type": ("zero", None),
}


def from_scheduler_config(config: Mapping[str, Any] | str | os.PathLike) -> NoiseSchedule:
    """Read a diffusers scheduler config (a dict, a ``scheduler_config.json`` path,
    or a folder containing one) with diffusers' defaults for missing keys.

    Honours beta_schedule / beta_start / beta_end / trained_betas,
    prediction_type, steps_offset, set_alpha_to_one, clip_sample(_range),
    timestep_spacing and variance_type. Options that would change sampling and
    that jharm does not implement (zero-SNR rescaling, dynamic thresholding,
    Karras/exponential/beta sigmas, learned variances, ...) raise ``ValueError``
    naming the key and the file, as does an unknown beta_schedule.
    """
    source = "scheduler config"
    if isinstance(config, (str, os.PathLike)):
        from jharm.weights.io import read_json

        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "scheduler_config.json")
        source, config = path, read_json(path)
    cfg = dict(config)
    for key, allowed in _UNSUPPORTED.items():
        if key in cfg and cfg[key] not in allowed:
            raise ValueError(f"{source}: {key}={cfg[key]!r} is not supported by jharm's samplers")
    variance_type = cfg.get("variance_type") or "fixed_small"
    _check_choice("variance_type", variance_type, VARIANCE_TYPES, source)
    prediction_type = cfg.get("prediction_type") or "epsilon"
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES, source)
    spacing = cfg.get("timestep_spacing")
    _check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS + (None,), source)
    n = int(cfg.get("num_train_timesteps", 1000))
    options = dict(
        num_train_timesteps=n,
        prediction_type=prediction_type,
        steps_offset=int(cfg.get("steps_offset", 0)),
        set_alpha_to_one=bool(cfg.get("set_alpha_to_one", True)),
        clip_sample=bool(cfg.get("clip_sample", True)),
        clip_sample_range=float(cfg.get("clip_sample_range", 1.0)),
        timestep_spacing=spacing,
        variance_type=variance_type,
    )
    if cfg.get("trained_betas") is not None:
        return schedule_from_betas(cfg["trained_betas"], **options)
    kind = cfg.get("beta_schedule", "linear")
    _check_choice("beta_schedule", kind, BETA_SCHEDULES, source)
    betas = betas_for(kind, n, float(cfg.get("beta_start", 0.0001)), float(cfg.get("beta_end", 0.02)))
    return schedule_from_betas(betas, **options)


def _coef(values: jax.Array, t, ndim: int) -> jax.Array:
    """``values[t]`` shaped to broadcast against an array of rank ``ndim`` (batch first)."""
    v = values[jnp.asarray(t, jnp.int32)]
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def _sqrt_alphas(schedule: NoiseSchedule, t, ndim: int) -> tuple[jax.Array, jax.Array]:
    abar = _coef(schedule.alphas_cumprod, t, ndim)
    return jnp.sqrt(abar), jnp.sqrt(1 - abar)


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t) -> jax.Array:
    """Forward process: ``x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) noise``."""
    a, s = _sqrt_alphas(schedule, t, x0.ndim)
    return a * x0 + s * noise


def get_velocity(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t) -> jax.Array:
    """The v-prediction target ``v = sqrt(ᾱ_t) noise - sqrt(1 - ᾱ_t) x0``."""
    a, s = _sqrt_alphas(schedule, t, x0.ndim)
    return a * noise - s * x0


def training_target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t) -> jax.Array:
    """What the network should output at ``x_t = add_noise(x0, noise, t)``,
    according to ``schedule.prediction_type`` (noise, v, or x0)."""
    if schedule.prediction_type == "epsilon":
        return noise
    if schedule.prediction_type == "v_prediction":
        return get_velocity(schedule, x0, noise, t)
    return x0


def diffusion_loss(schedule: NoiseSchedule, pred: jax.Array, x0: jax.Array, noise: jax.Array, t,
                   min_snr_gamma: float = 0.0) -> jax.Array:
    """The denoising loss: mean squared error of ``pred`` (the network's output at
    ``add_noise(x0, noise, t)``) to the training target; with ``min_snr_gamma > 0``
    each example's error is weighted by :func:`min_snr_weight`."""
    err = (pred - training_target(schedule, x0, noise, t)) ** 2
    if not min_snr_gamma:
        return jnp.mean(err)
    per_example = jnp.mean(err, axis=tuple(range(1, err.ndim)))
    return jnp.mean(per_example * min_snr_weight(schedule, t, min_snr_gamma))


def eps_to_x0(schedule: NoiseSchedule, x_t: jax.Array, eps: jax.Array, t) -> jax.Array:
    """x0 implied by a noise prediction: ``(x_t - sqrt(1-ᾱ) eps) / sqrt(ᾱ)``."""
    a, s = _sqrt_alphas(schedule, t, x_t.ndim)
    return (x_t - s * eps) / a


def x0_to_eps(schedule: NoiseSchedule, x_t: jax.Array, x0: jax.Array, t) -> jax.Array:
    """Noise implied by an x0 prediction: ``(x_t - sqrt(ᾱ) x0) / sqrt(1-ᾱ)``."""
    a, s = _sqrt_alphas(schedule, t, x_t.ndim)
    return (x_t - a * x0) / s


def v_to_x0(schedule: NoiseSchedule, x_t: jax.Array, v: jax.Array, t) -> jax.Array:
    """x0 from a v prediction: ``sqrt(ᾱ) x_t - sqrt(1-ᾱ) v``."""
    a, s = _sqrt_alphas(schedule, t, x_t.ndim)
    return a * x_t - s * v


def v_to_eps(schedule: NoiseSchedule, x_t: jax.Array, v: jax.Array, t) -> jax.Array:
    """Noise from a v prediction: ``sqrt(ᾱ) v + sqrt(1-ᾱ) x_t``."""
    a, s = _sqrt_alphas(schedule, t, x_t.ndim)
    return a * v + s * x_t


def eps_to_v(schedule: NoiseSchedule, x_t: jax.Array, eps: jax.Array, t) -> jax.Array:
    """v from a noise prediction (through the implied x0)."""
    return get_velocity(schedule, eps_to_x0(schedule, x_t, eps, t), eps, t)


def x0_eps_from_output(prediction_type: str, x_t: jax.Array, output: jax.Array, abar) -> tuple[jax.Array, jax.Array]:
    """(x0, eps) implied by a raw model output at signal fraction ``abar`` (ᾱ, broadcastable)."""
    a, s = jnp.sqrt(abar), jnp.sqrt(1 - abar)
    if prediction_type == "epsilon":
        return (x_t - s * output) / a, output
    if prediction_type == "v_prediction":
        return a * x_t - s * output, a * output + s * x_t
    if prediction_type == "sample":
        return output, (x_t - a * output) / s
    raise ValueError(f"prediction_type={prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")


def output_to_x0_eps(schedule: NoiseSchedule, x_t: jax.Array, output: jax.Array, t) -> tuple[jax.Array, jax.Array]:
    """(x0, eps) implied by a raw model output at timestep(s) ``t``, per ``schedule.prediction_type``."""
    abar = _coef(schedule.alphas_cumprod, t, x_t.ndim)
    return x0_eps_from_output(schedule.prediction_type, x_t, output, abar)


def snr(schedule: NoiseSchedule, t) -> jax.Array:
    """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t) at integer timestep(s) ``t``."""
    abar = schedule.alphas_cumprod[jnp.asarray(t, jnp.int32)]
    return abar / (1 - abar)


def min_snr_weight(schedule: NoiseSchedule, t, gamma: float) -> jax.Array:
    """Min-SNR-γ loss weights (Hang et al., ICCV 2023) at timestep(s) ``t``.

    The x0-space weight ``min(SNR, γ)`` expressed for the schedule's
    ``prediction_type``: ``min(SNR, γ) / SNR`` for epsilon targets,
    ``min(SNR, γ) / (SNR + 1)`` for v targets, ``min(SNR, γ)`` for x0 targets
    (the forms of diffusers' ``compute_snr`` recipe). Multiply the per-example
    MSE by it; low-noise steps, which dominate the plain loss, get less weight.
    """
    if gamma <= 0:
        raise ValueError(f"min-SNR gamma must be > 0, found {gamma}")
    s = snr(schedule, t)
    clipped = jnp.minimum(s, gamma)
    if schedule.prediction_type == "epsilon":
        return clipped / s
    if schedule.prediction_type == "v_prediction":
        return clipped / (s + 1)
    return clipped


TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


def training_timesteps(rng: np.random.Generator, n: int, num_train_timesteps: int, sampling: str = "uniform",
                       logit_mean: float = 0.0, logit_std: float = 1.0) -> np.ndarray:
    """``n`` integer training timesteps in ``[0, num_train_timesteps)`` (host side, int32).

    ``"uniform"``: DDPM's uniform draw. ``"logit_normal"``: ``t = ⌊N·sigmoid(u)⌋``
    with ``u ~ N(logit_mean, logit_std²)`` (SD3's timestep density), which puts
    the batches where the image's layout is decided (mid noise) and fewer at
    the ends.
    """
    _check_choice("timestep sampling", sampling, TIMESTEP_SAMPLINGS)
    if sampling == "uniform":
        return rng.integers(0, num_train_timesteps, n).astype(np.int32)
    if logit_std <= 0:
        raise ValueError(f"logit_normal timestep sampling needs logit_std > 0, found {logit_std}")
    u = 1.0 / (1.0 + np.exp(-rng.normal(logit_mean, logit_std, n)))
    return np.minimum((u * num_train_timesteps).astype(np.int32), num_train_timesteps - 1)
