"""Noise schedules and forward-process algebra vs diffusers' schedulers."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, LMSDiscreteScheduler

from jharm.diffusion import schedules as S
from jharm.diffusion.samplers import inference_timesteps

KINDS = [("scaled_linear", 0.00085, 0.012), ("linear", 1e-4, 0.02), ("squaredcos_cap_v2", 1e-4, 0.02)]


@pytest.mark.parametrize("kind,start,end", KINDS)
@pytest.mark.parametrize("n", [1000, 37])
def test_betas_and_alphas_cumprod_identical_to_diffusers(kind, start, end, n):
    ours = S.make_schedule(kind, n, start, end)
    ref = DDPMScheduler(num_train_timesteps=n, beta_schedule=kind, beta_start=start, beta_end=end)
    np.testing.assert_array_equal(np.asarray(ours.betas), ref.betas.numpy())
    np.testing.assert_array_equal(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy())


def test_cosine_alias_and_trained_betas():
    cos = S.make_schedule("cosine", 100)
    np.testing.assert_array_equal(np.asarray(cos.betas), np.asarray(S.make_schedule("squaredcos_cap_v2", 100).betas))
    betas = np.linspace(1e-4, 0.02, 50)
    sched = S.from_scheduler_config({"trained_betas": betas.tolist(), "num_train_timesteps": 50})
    np.testing.assert_allclose(np.asarray(sched.alphas_cumprod), np.cumprod(1 - betas), rtol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_add_noise_velocity_target_match_diffusers(prediction_type):
    sched = S.sd_schedule(prediction_type)
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        prediction_type=prediction_type)
    rs = np.random.RandomState(0)
    x0 = rs.randn(6, 5, 5, 4).astype(np.float32)
    noise = rs.randn(6, 5, 5, 4).astype(np.float32)
    t = np.array([0, 1, 250, 500, 998, 999])
    noisy = jax.jit(S.add_noise)(sched, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    assert np.abs(np.asarray(noisy) - want).max() <= 1e-6
    vel = S.get_velocity(sched, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    want_v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    assert np.abs(np.asarray(vel) - want_v).max() <= 1e-6
    target = S.training_target(sched, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    np.testing.assert_array_equal(np.asarray(target), np.asarray(vel if prediction_type == "v_prediction" else noise))


def test_conversions_are_consistent():
    sched = S.sd_schedule()
    rs = np.random.RandomState(1)
    x0 = jnp.asarray(rs.randn(4, 3, 3, 2).astype(np.float32))
    eps = jnp.asarray(rs.randn(4, 3, 3, 2).astype(np.float32))
    t = jnp.asarray([10, 300, 600, 900])
    x_t = S.add_noise(sched, x0, eps, t)
    v = S.get_velocity(sched, x0, eps, t)
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4, rtol=0)  # noqa: E731
    close(S.eps_to_x0(sched, x_t, eps, t), x0)
    close(S.x0_to_eps(sched, x_t, x0, t), eps)
    close(S.v_to_x0(sched, x_t, v, t), x0)
    close(S.v_to_eps(sched, x_t, v, t), eps)
    close(S.eps_to_v(sched, x_t, eps, t), v)
    for kind, out in (("epsilon", eps), ("v_prediction", v), ("sample", x0)):
        got_x0, got_eps = S.output_to_x0_eps(S.sd_schedule() if kind == "epsilon" else
                                             S.make_schedule(prediction_type=kind), x_t, out, t)
        close(got_x0, x0)
        close(got_eps, eps)
    abar = np.asarray(sched.alphas_cumprod)[[10, 300, 600, 900]]
    np.testing.assert_allclose(np.asarray(S.snr(sched, t)), abar / (1 - abar), rtol=1e-6)
    # a traced scalar t inside jit broadcasts over the batch
    one = jax.jit(lambda t: S.add_noise(sched, x0, eps, t))(jnp.int32(300))
    np.testing.assert_allclose(np.asarray(one[1]), np.asarray(x_t[1]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_match_the_diffusers_training_recipe(prediction_type):
    from diffusers.training_utils import compute_snr

    ref_sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)
    sched = S.make_schedule("squaredcos_cap_v2", prediction_type=prediction_type)
    t = np.array([0, 5, 100, 400, 700, 999])
    snr = compute_snr(ref_sched, torch.from_numpy(t))
    ref = torch.minimum(snr, torch.full_like(snr, 5.0))  # diffusers' train_text_to_image.py, --snr_gamma 5
    ref = {"epsilon": ref / snr, "v_prediction": ref / (snr + 1), "sample": ref}[prediction_type]
    np.testing.assert_allclose(np.asarray(S.min_snr_weight(sched, t, 5.0)), ref.numpy(), rtol=2e-5)
    with pytest.raises(ValueError, match="gamma must be > 0"):
        S.min_snr_weight(sched, t, 0.0)


@pytest.mark.parametrize("gamma", [0.0, 5.0])
def test_diffusion_loss_against_numpy(gamma):
    sched = S.make_schedule("squaredcos_cap_v2", prediction_type="v_prediction")
    rng = np.random.default_rng(1)
    x0, noise, pred = (rng.standard_normal((3, 4, 4, 3)).astype(np.float32) for _ in range(3))
    t = np.array([3, 480, 990])
    abar = np.asarray(sched.alphas_cumprod, np.float64)[t][:, None, None, None]
    v = np.sqrt(abar) * noise - np.sqrt(1 - abar) * x0
    per_example = ((pred - v) ** 2).mean(axis=(1, 2, 3))
    snr = abar[:, 0, 0, 0] / (1 - abar[:, 0, 0, 0])
    weight = np.minimum(snr, gamma) / (snr + 1) if gamma else np.ones(3)
    np.testing.assert_allclose(float(S.diffusion_loss(sched, pred, x0, noise, t, gamma)),
                               (per_example * weight).mean(), rtol=1e-5)


def test_training_timesteps_uniform_and_logit_normal():
    n, N = 20000, 1000
    uniform = S.training_timesteps(np.random.default_rng(0), n, N)
    # the uniform draw is DDPM's (and the same numbers as rng.integers, so old runs reproduce)
    np.testing.assert_array_equal(uniform, np.random.default_rng(0).integers(0, N, n))
    ln = S.training_timesteps(np.random.default_rng(0), n, N, "logit_normal", logit_mean=0.0, logit_std=1.0)
    assert ln.dtype == np.int32 and ln.min() >= 0 and ln.max() <= N - 1
    # median at sigmoid(0) * N; P(t in [N/4, 3N/4]) = P(|u| < log 3) = 0.728 for u ~ N(0, 1)
    assert abs(np.median(ln) - N / 2) < 10
    assert abs(((ln >= N // 4) & (ln < 3 * N // 4)).mean() - 0.7275) < 0.01
    shifted = S.training_timesteps(np.random.default_rng(0), n, N, "logit_normal", logit_mean=1.0)
    assert np.median(shifted) > 700  # sigmoid(1) = 0.73
    with pytest.raises(ValueError, match="timestep sampling"):
        S.training_timesteps(np.random.default_rng(0), 4, N, "beta")
    with pytest.raises(ValueError, match="logit_std > 0"):
        S.training_timesteps(np.random.default_rng(0), 4, N, "logit_normal", logit_std=0.0)


SD15_JSON = {  # SD 1.5's scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}


def test_from_scheduler_config_file_and_folder(tmp_path):
    (tmp_path / "scheduler_config.json").write_text(json.dumps(dict(SD15_JSON, prediction_type="v_prediction")))
    for src in (tmp_path, tmp_path / "scheduler_config.json", str(tmp_path)):
        sched = S.from_scheduler_config(src)
        assert (sched.prediction_type, sched.steps_offset, sched.set_alpha_to_one, sched.clip_sample) == (
            "v_prediction", 1, False, False)
        assert sched.timestep_spacing is None
    ref = S.sd_schedule("v_prediction")
    np.testing.assert_array_equal(np.asarray(sched.alphas_cumprod), np.asarray(ref.alphas_cumprod))
    # diffusers' defaults when keys are absent: linear 1e-4..0.02, clip_sample on, alpha_to_one on
    bare = S.from_scheduler_config({})
    ref = DDIMScheduler()
    np.testing.assert_array_equal(np.asarray(bare.alphas_cumprod), ref.alphas_cumprod.numpy())
    assert bare.clip_sample and bare.set_alpha_to_one and bare.prediction_type == "epsilon"


@pytest.mark.parametrize("key,value", [
    ("beta_schedule", "sigmoid"), ("thresholding", True), ("rescale_betas_zero_snr", True),
    ("use_karras_sigmas", True), ("variance_type", "learned_range"), ("timestep_spacing", "karras"),
    ("prediction_type", "flow"),
])
def test_from_scheduler_config_rejects_unsupported(tmp_path, key, value):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(dict(SD15_JSON, **{key: value})))
    with pytest.raises(ValueError) as err:
        S.from_scheduler_config(path)
    assert key in str(err.value) and str(path) in str(err.value)


def test_schedule_is_a_pytree_with_static_options():
    sched = S.sd_schedule()
    leaves, tree = jax.tree_util.tree_flatten(sched)
    assert len(leaves) == 2
    back = jax.tree_util.tree_unflatten(tree, leaves)
    assert back.steps_offset == 1 and back.prediction_type == "epsilon"
    with pytest.raises(ValueError, match="unknown beta schedule"):
        S.make_schedule("quadratic")
    with pytest.raises(ValueError, match="prediction_type"):
        S.make_schedule(prediction_type="eps")


REFERENCE = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "euler": EulerDiscreteScheduler,
             "lms": LMSDiscreteScheduler}


@pytest.mark.parametrize("method", sorted(REFERENCE))
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace", None])
def test_inference_timesteps_match_set_timesteps(method, spacing):
    config = dict(SD15_JSON)
    if spacing:
        config["timestep_spacing"] = spacing
    sched = S.from_scheduler_config(config)
    ref = REFERENCE[method].from_config(config)
    for steps in (1, 7, 50, 333):
        ref.set_timesteps(steps)
        got = inference_timesteps(sched, steps, method)
        np.testing.assert_array_equal(got, ref.timesteps.numpy())
        assert got.dtype == ref.timesteps.numpy().dtype
