"""ESD / Co-Erasing tasks through the one train loop on a tiny random UNet."""
import jax
import numpy as np
import pytest
from flax import traverse_util

from jharm.config import ConfigError
from jharm.diffusion.schedules import make_schedule
from jharm.models.unet import UNet2DConditionModel, UNetConfig
from jharm.train import optim
from jharm.train.defaults import base_config
from jharm.train.loop import train
from jharm.train.tasks.erasure import PARAM_SETS, ErasureModel, build_task, default_task_config

# One level keeps the compile of the (sampler + teacher + student + grad) step short on 2 cores.
TINY = dict(sample_size=4, in_channels=3, out_channels=3, block_out_channels=(8,), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
            attention_head_dim=2, cross_attention_dim=8, norm_num_groups=4, ip_adapter_tokens=2)


@pytest.fixture(scope="module")
def model():
    unet = UNet2DConditionModel(UNetConfig(**TINY))
    params = unet.init_params(jax.random.key(0), context_len=5)
    rng = np.random.default_rng(1)
    return ErasureModel(unet, params, make_schedule("scaled_linear", 1000, 0.00085, 0.012), (4, 4, 3),
                        rng.standard_normal((1, 5, 8)).astype(np.float32),
                        rng.standard_normal((1, 5, 8)).astype(np.float32),
                        rng.standard_normal((3, 2, 8)).astype(np.float32))


def config_for(method, param_set):
    c = base_config()
    c.train.update(steps=2, batch_size=2, log_every=1, ckpt_every=100, async_checkpoint=False, progress=False,
                   export=False)
    c.optim.update(name="adam", lr=1e-3, clip_norm=0.0)
    c.task = default_task_config(method)
    c.task.update(param_set=param_set, sample_steps=2, sample_guidance=3.0)
    return c


def test_param_sets_select_by_path(model):
    names = {"/".join(p) for p in traverse_util.flatten_dict(model.params)}
    pick = {s: optim.trainable_paths(model.params, PARAM_SETS[s]) for s in PARAM_SETS}
    assert pick["esd-x"] == {n for n in names if "/attn2/" in n}
    assert pick["selfattn"] == {n for n in names if "/attn1/" in n}
    assert pick["full"] == names
    assert pick["esd-u"] == {n for n in names if "/attn2/" not in n and "/time_embedding/" not in n}
    assert any("time_emb_proj" in n for n in pick["esd-u"])  # resnets' projections do train
    assert not any("conv_out" in n.split("/")[1] for n in pick["noxattn"]) and pick["noxattn"] < pick["esd-u"]
    assert pick["notime"] == {n for n in names if n.split("/")[1] not in ("time_embedding", "conv_norm_out",
                                                                        "conv_out")}


@pytest.mark.parametrize("method,param_set", [("esd", "esd-x"), ("co_erasing", "esd-u")])
def test_task_trains_only_its_param_set(model, tmp_path, method, param_set):
    config = config_for(method, param_set)
    task = build_task(config, model)
    batch = task.make_batch(3)
    assert np.array_equal(batch["x_T"], task.make_batch(3)["x_T"])  # a pure function of the step
    k = batch["k"][0]
    assert np.all(batch["k"] == k) and np.all((batch["t"] >= round(500 * k)) & (batch["t"] < round(500 * (k + 1))))
    result = train(config, task, str(tmp_path / method))
    assert len(result.losses) == 2 and all(np.isfinite(result.losses)) and result.losses[0] > 0
    before = traverse_util.flatten_dict(model.params, sep="/")
    after = traverse_util.flatten_dict(jax.device_get(result.params), sep="/")
    chosen = optim.trainable_paths(model.params, PARAM_SETS[param_set])
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and changed <= chosen
    assert len(changed) >= 0.5 * len(chosen)


def test_task_config_errors(model):
    with pytest.raises(ConfigError, match="param_set"):
        build_task(config_for("esd", "attn3"), model)
    with pytest.raises(ConfigError, match="method"):
        build_task(config_for("uce", "esd-x"), model)
    no_images = ErasureModel(model.unet, model.params, model.schedule, model.latent_shape, model.cond_context,
                             model.uncond_context)
    with pytest.raises(ConfigError, match="concept images"):
        build_task(config_for("co_erasing", "esd-u"), no_images)
