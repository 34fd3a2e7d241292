"""I2SB: the image-to-image Schrödinger bridge (Liu et al., ICML 2023), METHODS.md §3.

Discrete steps n = 0..N-1 between the clean image x0 (n = 0) and the degraded
x1 (n = N-1):

* β_n: linspace(√1e-4, √(β_max/N), N)², made symmetric (first half, mirrored);
* σ_fwd(n) = √(Σ_{m≤n} β_m),  σ_bwd(n) = √(Σ_{m≥n} β_m);
* x_n = μ_x0 x0 + μ_x1 x1 + √var ξ with the Gaussian-product coefficients of
  (a, b) = (σ_fwd, σ_bwd): μ_x0 = b²/(a²+b²), μ_x1 = a²/(a²+b²),
  var = a²b²/(a²+b²) (no noise in the OT-ODE variant);
* the network predicts (x_n − x0)/σ_fwd(n); x0_hat = x_n − σ_fwd(n)·net;
* sampling from x1 over evenly spaced steps, posterior of (σ_fwd(n_prev), σ_Δ).

Checked against NVlabs/I2SB (``i2sb/diffusion.py``, ``i2sb/runner.py``). Note
σ_fwd(0) = √β_0 = 0.01, not 0: the cumulative sum includes the current β.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def symmetric_betas(interval: int = 1000, beta_max: float = 0.3, beta_min: float = 1e-4) -> np.ndarray:
    """The symmetric β schedule (float64, host)."""
    if interval < 2 or interval % 2:
        raise ValueError(f"interval must be an even number >= 2, got {interval}")
    betas = np.linspace(beta_min**0.5, (beta_max / interval) ** 0.5, interval, dtype=np.float64) ** 2
    half = betas[: interval // 2]
    return np.concatenate([half, np.flip(half)])


def gaussian_product_coefficients(a, b):
    """(μ_x0, μ_x1, var) of the product of N(x0, a²) and N(x1, b²)."""
    a2, b2 = a * a, b * b
    denom = a2 + b2
    return b2 / denom, a2 / denom, a2 * b2 / denom


@dataclasses.dataclass(frozen=True, eq=False)
class BridgeSchedule:
    """Per-step arrays of one bridge (float32 device arrays; N static)."""

    betas: jax.Array
    std_fwd: jax.Array
    std_bwd: jax.Array
    mu_x0: jax.Array
    mu_x1: jax.Array
    std_sb: jax.Array
    noise_levels: jax.Array
    interval: int = 1000
    ot_ode: bool = False


jax.tree_util.register_dataclass(
    BridgeSchedule,
    data_fields=["betas", "std_fwd", "std_bwd", "mu_x0", "mu_x1", "std_sb", "noise_levels"],
    meta_fields=["interval", "ot_ode"],
)


def make_bridge_schedule(interval: int = 1000, beta_max: float = 0.3, *, ot_ode: bool = False,
                         t0: float = 1e-4, t1: float = 1.0) -> BridgeSchedule:
    """The I2SB schedule; ``noise_levels[n]`` is the network's timestep input."""
    betas = symmetric_betas(interval, beta_max)
    std_fwd = np.sqrt(np.cumsum(betas))
    std_bwd = np.sqrt(np.flip(np.cumsum(np.flip(betas))))
    mu_x0, mu_x1, var = gaussian_product_coefficients(std_fwd, std_bwd)
    noise_levels = np.linspace(t0, t1, interval, dtype=np.float64) * interval
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return BridgeSchedule(f32(betas), f32(std_fwd), f32(std_bwd), f32(mu_x0), f32(mu_x1), f32(np.sqrt(var)),
                          f32(noise_levels), interval, ot_ode)


def _per_sample(values: jax.Array, n, ndim: int) -> jax.Array:
    out = jnp.take(values, jnp.asarray(n))
    return out.reshape(out.shape + (1,) * (ndim - out.ndim)) if out.ndim else out


def q_sample(schedule: BridgeSchedule, n, x0: jax.Array, x1: jax.Array, noise: jax.Array | None = None) -> jax.Array:
    """x_n given the pair; ``n`` scalar or (B,). No noise with OT-ODE or ``noise=None``."""
    if x0.shape != x1.shape:
        raise ValueError(f"x0 and x1 must have the same shape, got {x0.shape} and {x1.shape}")
    mu_x0 = _per_sample(schedule.mu_x0, n, x0.ndim)
    mu_x1 = _per_sample(schedule.mu_x1, n, x0.ndim)
    x_n = mu_x0 * x0 + mu_x1 * x1
    if noise is not None and not schedule.ot_ode:
        x_n = x_n + _per_sample(schedule.std_sb, n, x0.ndim) * noise
    return x_n


def training_label(schedule: BridgeSchedule, n, x_n: jax.Array, x0: jax.Array) -> jax.Array:
    """The network's regression target (x_n − x0)/σ_fwd(n)."""
    return (x_n - x0) / _per_sample(schedule.std_fwd, n, x_n.ndim)


def predict_x0(schedule: BridgeSchedule, n, x_n: jax.Array, net_out: jax.Array, clip: bool = False) -> jax.Array:
    """x0_hat = x_n − σ_fwd(n)·net, optionally clipped to [−1, 1]."""
    x0 = x_n - _per_sample(schedule.std_fwd, n, x_n.ndim) * net_out
    return jnp.clip(x0, -1.0, 1.0) if clip else x0


def posterior_step(schedule: BridgeSchedule, n_prev, n, x_n: jax.Array, x0: jax.Array,
                   noise: jax.Array | None) -> jax.Array:
    """Sample x_{n_prev} from p(x_{n_prev} | x_n, x0) (n_prev < n); no noise if ``noise`` is None."""
    std_n = jnp.take(schedule.std_fwd, n)
    std_prev = jnp.take(schedule.std_fwd, n_prev)
    std_delta = jnp.sqrt(std_n**2 - std_prev**2)
    mu_x0, mu_xn, var = gaussian_product_coefficients(std_prev, std_delta)
    x_prev = mu_x0 * x0 + mu_xn * x_n
    if noise is not None and not schedule.ot_ode:
        x_prev = x_prev + jnp.sqrt(var) * noise
    return x_prev


def sampling_steps(interval: int, nfe: int) -> np.ndarray:
    """Evenly spaced step indices 0 = s_0 < ... < s_nfe = N−1 (as I2SB's ``space_indices``)."""
    if not 1 <= nfe <= interval - 1:
        raise ValueError(f"nfe must be in [1, {interval - 1}], got {nfe}")
    return np.linspace(0, interval - 1, nfe + 1).round().astype(np.int32)


NetFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_n, timestep input (B,)) -> net output


def sample(net_fn: NetFn, schedule: BridgeSchedule, x1: jax.Array, *, nfe: int, rng: jax.Array | None = None,
           clip_denoise: bool = True) -> jax.Array:
    """Run the bridge from x1 to x0 in ``nfe`` network calls (one ``lax.scan``).

    Fresh noise at every step but the last; none at all with OT-ODE (then
    ``rng`` may be None). Returns ``(x, x0_hat)``: the state after the last
    posterior step (I2SB's output, still mixed with x1 by μ_x1(0) ≈ 7e-4
    because σ_fwd(0) = 0.01) and the network's last clean estimate.
    """
    steps = sampling_steps(schedule.interval, nfe)
    pairs = np.stack([steps[:-1], steps[1:]], axis=1)[::-1].copy()  # (n_prev, n), n descending
    stochastic = not schedule.ot_ode
    if stochastic and rng is None:
        raise ValueError("stochastic bridge sampling needs rng (or use the OT-ODE schedule)")
    batch = x1.shape[0]

    def body(x_n, inputs):
        index, pair = inputs
        n_prev, n = pair[0], pair[1]
        t = jnp.full((batch,), jnp.take(schedule.noise_levels, n))
        x0_hat = predict_x0(schedule, n, x_n, net_fn(x_n, t), clip=clip_denoise)
        if stochastic:
            noise = jax.random.normal(jax.random.fold_in(rng, index), x_n.shape, x_n.dtype)
            noise = jnp.where(n_prev == 0, 0.0, noise)
        else:
            noise = None
        return posterior_step(schedule, n_prev, n, x_n, x0_hat, noise), x0_hat

    x, x0_hats = jax.lax.scan(body, x1, (jnp.arange(len(pairs)), jnp.asarray(pairs)))
    return x, x0_hats[-1]
