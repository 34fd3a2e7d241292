"""Sampler parity with diffusers' schedulers, step by step, plus the scan features
(guidance hook, SLD, two-stage context switch, dynamic partial sampling).

The "model" is a fixed deterministic function of (x, t, context) written
identically in JAX and torch, so both sides see the same model outputs; the
diffusers side is the ordinary pipeline loop (scale_model_input, one batched
call over [uncond; cond], CFG, scheduler.step).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, LMSDiscreteScheduler

from jharm.diffusion import CFG, SLD, from_scheduler_config, make_plan, sample, sld_preset, step_noise
from jharm.diffusion.guidance import SLD_PRESETS

B, H, W, C = 2, 4, 4, 3
SD_CONFIG = {  # SD 1.x scheduler_config.json (as shipped, with the DDIM class defaults it relies on)
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False, "trained_betas": None,
}
SD21_CONFIG = dict(SD_CONFIG, prediction_type="v_prediction")
REFERENCE = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "euler": EulerDiscreteScheduler, "lms": LMSDiscreteScheduler}

_rs = np.random.RandomState(0)
WEIGHT = (_rs.randn(C, C) / math.sqrt(C)).astype(np.float32)


# Mostly "x is noise" plus a context- and t-dependent term: keeps CFG-7.5 latents
# in a realistic range (|x| < ~10), where 1e-5 is a meaningful float32 bound.
def model_jax(x, t, ctx):
    h = jnp.tanh(x @ WEIGHT + ctx[:, None, None, :])
    return 0.9 * x + 0.3 * h * (0.5 + 0.5 * jnp.cos(t / 1000.0 * (math.pi / 2)))[:, None, None, None]


def model_torch(x, t, ctx):
    h = torch.tanh(x @ torch.from_numpy(WEIGHT) + ctx[:, None, None, :])
    return 0.9 * x + 0.3 * h * (0.5 + 0.5 * torch.cos(t / 1000.0 * (math.pi / 2)))[:, None, None, None]


def _inputs(seed=1, rows=2):
    rs = np.random.RandomState(seed)
    x_T = rs.randn(B, H, W, C).astype(np.float32)
    contexts = rs.randn(rows, B, C).astype(np.float32)
    return x_T, contexts


def reference_loop(scheduler, method, num_steps, x_T, contexts, guidance_scale, noises, monkeypatch, eta=0.0,
                   guide=None):
    """diffusers' denoising loop; returns the VP latent after each step (float64 numpy)."""
    scheduler.set_timesteps(num_steps)
    x = torch.from_numpy(x_T) * scheduler.init_noise_sigma
    ctx = torch.from_numpy(contexts).reshape(-1, C)
    rows = contexts.shape[0]
    current = {}
    monkeypatch.setattr("diffusers.schedulers.scheduling_ddpm.randn_tensor", lambda *a, **k: current["noise"])
    state = {}
    out_traj = []
    for i, t in enumerate(scheduler.timesteps):
        x_in = scheduler.scale_model_input(x, t)
        out = model_torch(torch.cat([x_in] * rows), t.float().expand(rows * B), ctx).reshape(rows, B, H, W, C)
        eps = guide(out, i, state) if guide else out[0] + guidance_scale * (out[1] - out[0])
        kwargs = {}
        current["noise"] = torch.from_numpy(np.array(noises[i]))
        if method == "ddim" and eta > 0:
            kwargs = dict(eta=eta, variance_noise=current["noise"])
        x = scheduler.step(eps, t, x, **kwargs).prev_sample
        scale = 1.0 / math.sqrt(float(scheduler.sigmas[i + 1]) ** 2 + 1) if method in ("euler", "lms") else 1.0
        out_traj.append(x.double().numpy() * scale)
    return np.stack(out_traj)


def jharm_run(plan, x_T, contexts, guidance=None, guidance_scale=7.5, **kw):
    fn = jax.jit(lambda x, c: sample(model_jax, plan, x, c, guidance=guidance, guidance_scale=guidance_scale,
                                     rng=jax.random.PRNGKey(3), return_trajectory=True, **kw))
    x, traj = fn(jnp.asarray(x_T), jnp.asarray(contexts))
    return np.asarray(x), np.asarray(traj)


def _noises(num_steps):
    return [np.asarray(step_noise(jax.random.PRNGKey(3), i, (B, H, W, C))) for i in range(num_steps)]


CASES = [
    # (config, method, steps, eta, extra config)
    (SD_CONFIG, "ddim", 50, 0.0, {}),
    (SD_CONFIG, "ddim", 50, 0.7, {}),
    (SD_CONFIG, "ddpm", 50, 0.0, {}),
    (SD_CONFIG, "euler", 50, 0.0, {}),
    (SD_CONFIG, "lms", 50, 0.0, {}),
    (SD21_CONFIG, "ddim", 50, 0.0, {}),
    (SD21_CONFIG, "ddim", 30, 1.0, {}),
    (SD21_CONFIG, "ddpm", 30, 0.0, {}),
    (SD21_CONFIG, "euler", 30, 0.0, {}),
    (SD21_CONFIG, "lms", 30, 0.0, {}),
    (SD_CONFIG, "ddim", 33, 0.0, {"timestep_spacing": "trailing"}),
    (SD_CONFIG, "ddim", 20, 0.0, {"timestep_spacing": "linspace", "set_alpha_to_one": True}),
    (SD_CONFIG, "euler", 25, 0.0, {"timestep_spacing": "leading"}),
    (SD_CONFIG, "lms", 25, 0.0, {"timestep_spacing": "trailing"}),
    ({"beta_schedule": "squaredcos_cap_v2"}, "ddpm", 40, 0.0, {"timestep_spacing": "trailing"}),
    ({"beta_schedule": "linear", "variance_type": "fixed_large"}, "ddpm", 25, 0.0, {}),
    ({"beta_schedule": "linear", "prediction_type": "sample"}, "ddim", 25, 0.0, {}),  # clip_sample default True
]


@pytest.mark.parametrize("config,method,steps,eta,extra", CASES)
def test_trajectory_matches_diffusers(config, method, steps, eta, extra, monkeypatch):
    config = dict(config, **extra)
    x_T, contexts = _inputs()
    noises = _noises(steps)
    ref = reference_loop(REFERENCE[method].from_config(config), method, steps, x_T, contexts, 7.5, noises,
                         monkeypatch, eta=eta)
    plan = make_plan(from_scheduler_config(config), method, steps, eta=eta)
    x, traj = jharm_run(plan, x_T, contexts)
    assert traj.shape == ref.shape
    err = np.abs(traj - ref).max()
    assert err <= 1e-5, f"{method} max abs error {err:.3g} over {steps} steps"
    np.testing.assert_array_equal(x, traj[-1])
    assert np.abs(ref[-1] - x_T).max() > 0.1  # something actually happened


def test_sld_sampling_matches_diffusers_pipeline_math(monkeypatch):
    """DDIM + SLD(medium) through the scan vs the diffusers loop using the safe
    pipeline's own perform_safety_guidance on the same model outputs."""
    from diffusers.pipelines.deprecated.stable_diffusion_safe.pipeline_stable_diffusion_safe import (
        StableDiffusionPipelineSafe,
    )

    x_T, contexts = _inputs(seed=5, rows=3)
    steps, gs = 25, 7.5
    for preset in ("medium", "max"):
        warm, s_s, lam, s_m, beta = SLD_PRESETS[preset]

        def guide(out, i, state):
            # that helper takes [cond, uncond, safety] (its own order) and returns (guidance, momentum)
            g, state["m"] = StableDiffusionPipelineSafe.perform_safety_guidance(
                None, True, state.get("m"), out[1] - out[0], [out[1], out[0], out[2]], i, s_s, warm, lam, s_m, beta)
            return out[0] + gs * g

        ref = reference_loop(DDIMScheduler.from_config(SD_CONFIG), "ddim", steps, x_T, contexts, gs, _noises(steps),
                             monkeypatch, guide=guide)
        plan = make_plan(from_scheduler_config(SD_CONFIG), "ddim", steps)
        _, traj = jharm_run(plan, x_T, contexts, guidance=sld_preset(preset, gs))
        assert np.abs(traj - ref).max() <= 1e-5
        _, plain = jharm_run(plan, x_T, contexts[:2])
        assert np.abs(plain[-1] - traj[-1]).max() > 1e-3  # the safety term changed the result


def _sld_numpy(outs, momentum, step, gs, warm, s_s, lam, s_m, beta):
    """Independent transcription of METHODS.md §1 SLD (float64)."""
    unc, cond, safe = (o.astype(np.float64) for o in outs)
    g = cond - unc
    mu = np.clip(s_s * np.abs(cond - safe), None, 1.0)
    mu[(cond - safe) >= lam] = 0.0
    gamma = mu * (safe - unc) + s_m * momentum
    momentum = beta * momentum + (1 - beta) * gamma
    if step >= warm:
        g = g - gamma
    return unc + gs * g, momentum


@pytest.mark.parametrize("preset", sorted(SLD_PRESETS))
def test_sld_guidance_matches_formula(preset):
    rs = np.random.RandomState(7)
    guide = sld_preset(preset, guidance_scale=6.0)
    call = jax.jit(lambda o, m, i: guide(o, m, i))
    mom_j = guide.init(jnp.zeros((B, H, W, C)))
    mom_n = np.zeros((B, H, W, C))
    for step in range(20):
        # small differences so the threshold / clip branches are all exercised
        outs = rs.randn(3, B, H, W, C).astype(np.float32) * np.float32(0.01 * (1 + step % 3))
        eps_j, mom_j = call(jnp.asarray(outs), mom_j, step)
        eps_n, mom_n = _sld_numpy(outs, mom_n, step, 6.0, *SLD_PRESETS[preset])
        assert np.abs(np.asarray(eps_j) - eps_n).max() <= 1e-6
        assert np.abs(np.asarray(mom_j) - mom_n).max() <= 1e-6


def test_sld_presets_and_errors():
    assert sld_preset("strong") == SLD(7.5, 7, 2000.0, 0.025, 0.5, 0.7)
    with pytest.raises(ValueError, match="unknown SLD preset"):
        sld_preset("extreme")
    with pytest.raises(ValueError, match="3 condition rows"):
        sld_preset("max")(jnp.zeros((2, 1, 3)), jnp.zeros((1, 3)), 0)
    # CFG with a single row (unconditional model) is the identity
    outs = jnp.arange(6.0).reshape(1, 2, 3)
    np.testing.assert_array_equal(CFG(3.0)(outs, (), 0)[0], outs[0])


def _plan(method="ddim", steps=20, **kw):
    return make_plan(from_scheduler_config(SD_CONFIG), method, steps, **kw)


@pytest.mark.parametrize("method", ["ddim", "euler"])
def test_two_stage_context_switch(method):
    """t >= switch_t uses contexts A, t < switch_t the late contexts B; switch_t traced."""
    x_T, a = _inputs(seed=2)
    _, b = _inputs(seed=3)
    plan = _plan(method)
    run = jax.jit(lambda tau: sample(model_jax, plan, jnp.asarray(x_T), jnp.asarray(a),
                                     late_contexts=jnp.asarray(b), switch_t=tau))
    only = jax.jit(lambda c: sample(model_jax, plan, jnp.asarray(x_T), c))
    only_a, only_b = np.asarray(only(jnp.asarray(a))), np.asarray(only(jnp.asarray(b)))
    np.testing.assert_array_equal(np.asarray(run(0.0)), only_a)  # every t >= 0: original contexts
    np.testing.assert_array_equal(np.asarray(run(1000.0)), only_b)  # every t < 1000: late contexts
    assert np.abs(only_a - only_b).max() > 1e-3
    # a switch in the middle equals running A for the steps with t >= tau, then B from there
    ts = np.asarray(plan.timesteps)
    k = 8
    tau = float(ts[k - 1])  # steps 0..k-1 have t >= tau
    mixed = np.asarray(run(tau))
    x_k = sample(model_jax, plan, jnp.asarray(x_T), jnp.asarray(a), stop_index=k)
    two = sample(model_jax, plan, x_k, jnp.asarray(b), start_index=k)
    np.testing.assert_allclose(mixed, np.asarray(two), atol=1e-6, rtol=0)
    assert run._cache_size() == 1  # one compilation for all switch times


def test_guidance_interval():
    """Guidance only for t_lo <= t < t_hi: the full range is plain CFG, an empty one the prompt row
    alone, a split equals the two-stage run with the prompt in both rows above the split."""
    x_T, ctx = _inputs(seed=5)
    plan = _plan("ddim", steps=12)
    run = jax.jit(lambda lo, hi: sample(model_jax, plan, jnp.asarray(x_T), jnp.asarray(ctx), guidance_scale=5.0,
                                        guidance_interval=(lo, hi)))
    cfg = np.asarray(sample(model_jax, plan, jnp.asarray(x_T), jnp.asarray(ctx), guidance_scale=5.0))
    np.testing.assert_array_equal(np.asarray(run(0.0, 2000.0)), cfg)
    prompt_only = np.asarray(sample(model_jax, plan, jnp.asarray(x_T), jnp.asarray(ctx[1:])))
    np.testing.assert_allclose(np.asarray(run(0.0, 0.0)), prompt_only, atol=1e-6, rtol=0)
    assert np.abs(cfg - prompt_only).max() > 1e-3
    tau = float(np.asarray(plan.timesteps)[5])
    both_prompt = np.stack([ctx[1], ctx[1]])
    two_stage = sample(model_jax, plan, jnp.asarray(x_T), jnp.asarray(both_prompt), guidance_scale=5.0,
                       late_contexts=jnp.asarray(ctx), switch_t=tau)
    np.testing.assert_allclose(np.asarray(run(0.0, tau)), np.asarray(two_stage), atol=1e-6, rtol=0)
    assert run._cache_size() == 1  # bounds are traced
    with pytest.raises(ValueError, match="guidance_interval"):
        sample(model_jax, plan, jnp.asarray(x_T), jnp.asarray(ctx), guidance_interval=(0.0,))


@pytest.mark.parametrize("method,eta", [("ddim", 0.0), ("ddpm", 0.0), ("lms", 0.0)])
def test_dynamic_stop_index_equals_static(method, eta):
    """ESD's x_t: sampling to a traced index k inside jit equals running exactly k steps."""
    x_T, ctx = _inputs(seed=4)
    plan = _plan(method, steps=12, eta=eta)
    key = jax.random.PRNGKey(11)
    dynamic = jax.jit(lambda k: sample(model_jax, plan, jnp.asarray(x_T), jnp.asarray(ctx), guidance_scale=3.0,
                                       rng=key, stop_index=k))
    for k in (0, 5, 12):
        static = sample(model_jax, plan, jnp.asarray(x_T), jnp.asarray(ctx), guidance_scale=3.0, rng=key,
                        stop_index=k)
        if method == "lms":  # XLA fuses the 4-term multistep sum differently under lax.cond: 1-ulp noise
            np.testing.assert_allclose(np.asarray(dynamic(k)), np.asarray(static), atol=1e-6, rtol=0)
        else:
            np.testing.assert_array_equal(np.asarray(dynamic(k)), np.asarray(static))
    assert dynamic._cache_size() == 1
    if method == "lms":
        return  # a restarted multistep method has no derivative history: not a continuation
    # a traced start index too: continuing from k gives the full run
    x_5 = sample(model_jax, plan, jnp.asarray(x_T), jnp.asarray(ctx), guidance_scale=3.0, rng=key, stop_index=5)
    full = sample(model_jax, plan, jnp.asarray(x_T), jnp.asarray(ctx), guidance_scale=3.0, rng=key)
    resumed = jax.jit(lambda s: sample(model_jax, plan, x_5, jnp.asarray(ctx), guidance_scale=3.0, rng=key,
                                       start_index=s))(5)
    np.testing.assert_allclose(np.asarray(resumed), np.asarray(full), atol=1e-6, rtol=0)


def test_model_called_once_per_step_on_stacked_conditions():
    calls = []

    def model(x, t, ctx):
        calls.append((x.shape, t.shape, ctx.shape))
        return model_jax(x, t, ctx)

    x_T, ctx = _inputs(rows=3)
    sample(model, _plan(steps=5), jnp.asarray(x_T), jnp.asarray(ctx), guidance=sld_preset("weak"))
    assert calls == [((3 * B, H, W, C), (3 * B,), (3 * B, C))]  # traced once inside the scan


def test_guidance_is_a_traced_jit_argument():
    """Sweeping the CFG scale or an SLD parameter does not recompile."""
    x_T, ctx = _inputs(rows=3)
    plan = _plan(steps=5)
    run = jax.jit(lambda g: sample(model_jax, plan, jnp.asarray(x_T), jnp.asarray(ctx), guidance=g))
    a, b = run(sld_preset("medium", 3.0)), run(sld_preset("medium", 5.0))
    run(SLD(7.5, 2, 10.0, 0.0, 0.1, 0.2))
    assert run._cache_size() == 1 and np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
    want = sample(model_jax, plan, jnp.asarray(x_T), jnp.asarray(ctx), guidance=sld_preset("medium", 5.0))
    np.testing.assert_allclose(np.asarray(b), np.asarray(want), atol=1e-6, rtol=0)


def test_pytree_contexts_and_unconditional_model():
    x_T, ctx = _inputs()
    plan = _plan(steps=6)
    tree = {"text": jnp.asarray(ctx), "extra": jnp.zeros((2, B, 5))}
    got = sample(lambda x, t, c: model_jax(x, t, c["text"] + c["extra"].sum(-1, keepdims=True)), plan,
                 jnp.asarray(x_T), tree)
    ref = sample(model_jax, plan, jnp.asarray(x_T), jnp.asarray(ctx))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    uncond = sample(lambda x, t, c: model_jax(x, t, jnp.zeros((x.shape[0], C))), plan, jnp.asarray(x_T))
    cond_zero = sample(model_jax, plan, jnp.asarray(x_T), jnp.zeros((1, B, C)))
    np.testing.assert_array_equal(np.asarray(uncond), np.asarray(cond_zero))


def test_sample_errors():
    x_T, ctx = _inputs()
    x_T, ctx = jnp.asarray(x_T), jnp.asarray(ctx)
    with pytest.raises(ValueError, match="pass rng"):
        sample(model_jax, _plan("ddpm", 5), x_T, ctx)
    with pytest.raises(ValueError, match=r"leading dims \(n_conditions, batch\)"):
        sample(model_jax, _plan(steps=5), x_T, ctx[:, :1])
    with pytest.raises(ValueError, match="switch_t"):
        sample(model_jax, _plan(steps=5), x_T, ctx, late_contexts=ctx)
    with pytest.raises(ValueError, match="start_index <= stop_index"):
        sample(model_jax, _plan(steps=5), x_T, ctx, start_index=3, stop_index=2)
    with pytest.raises(ValueError, match="unknown sampler"):
        _plan("heun")
    with pytest.raises(ValueError, match="DDIM only"):
        _plan("euler", eta=0.3)


def test_plan_constants_match_diffusers():
    sched = from_scheduler_config(SD_CONFIG)
    for method in ("euler", "lms"):
        ref = REFERENCE[method].from_config(SD_CONFIG)
        ref.set_timesteps(30)
        plan = make_plan(sched, method, 30)
        np.testing.assert_array_equal(np.asarray(plan.timesteps), ref.timesteps.numpy())
        # torch's vectorised float32 sqrt is not always correctly rounded: 1 ulp
        np.testing.assert_allclose(np.asarray(plan.sigmas), ref.sigmas.numpy(), rtol=2e-7, atol=0)
        assert float(plan.init_noise_sigma) == pytest.approx(float(ref.init_noise_sigma), rel=1e-7)
    # LMS weights: exact polynomial integrals vs diffusers' numerical quadrature
    ref = LMSDiscreteScheduler.from_config(SD_CONFIG)
    ref.set_timesteps(30)
    coeffs = np.asarray(make_plan(sched, "lms", 30).lms_coeffs)
    for i in range(30):
        order = min(i + 1, 4)
        want = [ref.get_lms_coefficient(order, i, c) for c in range(order)]
        np.testing.assert_allclose(coeffs[i, :order], want, rtol=1e-5, atol=1e-7)
        assert np.all(coeffs[i, order:] == 0)
