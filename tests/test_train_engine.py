"""The train engine on one device: sharding rules, masks, accumulation, schedule,
validation, NaN stop, logging and export (the 8-device and multi-process checks
are in test_sharding.py and test_distributed.py)."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import AbstractMesh, PartitionSpec as P

from jharm import config as config_lib
from jharm.config import ConfigError
from jharm.train import optim
from jharm.train.checkpoint import Checkpointer
from jharm.train.logging import read_metrics
from jharm.train.loop import NonFiniteError, make_train_step, train
from jharm.train.mesh import make_mesh, put_batch
from jharm.train.sharding import logical_axes, partition_spec, path_names
from jharm.train.tasks import make_task
from jharm.weights.io import load_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["train.batch_size=8", "task.image_size=8", "task.width=16", "train.progress=False"]


def tiny_config(*overrides):
    return config_lib.get(os.path.join(ROOT, "configs/train_tiny.py"), TINY + list(overrides))


def flat(tree):
    return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def test_logical_axes_from_names_and_rank():
    assert logical_axes(("conv_in", "kernel"), (3, 3, 4, 32)) == (None, None, "conv_in", "conv_out")
    assert logical_axes(("attn2", "to_k", "kernel"), (768, 320)) == ("embed", "heads")
    assert logical_axes(("attn1", "to_out_0", "kernel"), (320, 320)) == ("heads", "embed")
    assert logical_axes(("ff", "net_2", "kernel"), (1280, 320)) == ("mlp", "embed")
    assert logical_axes(("ff", "net_0", "proj", "kernel"), (320, 2560)) == ("embed", "mlp")
    assert logical_axes(("token_embedding", "embedding"), (49408, 512)) == ("vocab", "embed")
    assert logical_axes(("to_out_0", "bias"), (320,)) == (None,)
    assert logical_axes(("norm1", "scale"), (320,)) == (None,)
    # Optimizer moments sit under the param's path and get the same axes.
    assert logical_axes(("opt_state", "1", "mu", "conv_in", "kernel"), (3, 3, 4, 32)) == (
        None, None, "conv_in", "conv_out")


def test_partition_spec_rules_and_divisibility():
    mesh = AbstractMesh((2, 4, 2), ("data", "fsdp", "tensor"))
    conv = (None, None, "conv_in", "conv_out")
    assert partition_spec(conv, (3, 3, 32, 64), mesh, "dp") == P(None, None, None, None)
    # FSDP: largest dim divisible by 4.
    assert partition_spec(conv, (3, 3, 32, 64), mesh, "fsdp") == P(None, None, None, "fsdp")
    assert partition_spec(("embed", "heads"), (64, 32), mesh, "fsdp") == P("fsdp", None)
    # FSDP+tensor: output channels / heads on "tensor", FSDP on the largest remaining dim.
    assert partition_spec(conv, (3, 3, 32, 64), mesh, "fsdp_tp") == P(None, None, "fsdp", "tensor")
    assert partition_spec(("heads", "embed"), (32, 64), mesh, "fsdp_tp") == P("tensor", "fsdp")
    # Never split a dim the axis size does not divide: 3 input channels, 6 = not a multiple of 4.
    assert partition_spec(conv, (3, 3, 3, 6), mesh, "fsdp_tp") == P(None, None, None, "tensor")
    assert partition_spec(conv, (3, 3, 3, 5), mesh, "fsdp_tp") == P(None, None, None, None)
    assert partition_spec((None,), (64,), mesh, "fsdp") == P(None)  # biases stay replicated
    with pytest.raises(ConfigError, match="unknown preset"):
        partition_spec(conv, (3, 3, 32, 64), mesh, "zero3")


def test_schedule_warmup_and_cosine():
    config = tiny_config("optim.lr=0.01", "optim.warmup_steps=10", "optim.final_lr_ratio=0.1",
                         "train.steps=110")
    schedule = optim.make_schedule(config.optim, config.train.steps)
    np.testing.assert_allclose([schedule(0), schedule(5), schedule(10)], [0.0, 0.005, 0.01], rtol=1e-6)
    np.testing.assert_allclose(schedule(60), 0.001 + 0.009 * 0.5, rtol=1e-5)  # half-way down the cosine
    np.testing.assert_allclose(schedule(110), 0.001, rtol=1e-5)
    constant = tiny_config("optim.schedule=constant", "optim.lr=0.01", "optim.warmup_steps=4")
    schedule = optim.make_schedule(constant.optim, 100)
    np.testing.assert_allclose([schedule(2), schedule(4), schedule(99)], [0.005, 0.01, 0.01], rtol=1e-6)


def test_trainable_mask_metrics_checkpoints_and_export(tmp_path):
    config = tiny_config("train.steps=6", "train.log_every=2", "train.ckpt_every=4",
                         "train.trainable=('attentions_0/to_[qk]',)")
    task = make_task(config)
    init = flat(jax.jit(task.init_params)(jax.random.split(jax.random.key(0))[0]))
    result = train(config, task, str(tmp_path))
    # Mask: exactly the matched params moved; the rest are bit-identical to init.
    final = flat(result.params)
    assert final.keys() == init.keys()
    changed = {k for k in init if not np.array_equal(init[k], final[k])}
    assert changed == {"params/attentions_0/to_q/kernel", "params/attentions_0/to_k/kernel"}
    # Checkpoints at 4 and the end; optimizer state only holds the trainable leaves.
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), 3)
    assert ckpt.all_steps() == [4, 6]
    state = ckpt.restore_unsharded(6)
    assert int(state["step"]) == 6
    opt_paths = {"/".join(path_names(p)) for p, _ in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]}
    opt_paths = {p for p in opt_paths if "kernel" in p}
    assert opt_paths and all("attentions_0/to_q" in p or "attentions_0/to_k" in p for p in opt_paths)
    # Metrics: JSONL every log_every steps, the same losses as returned; TensorBoard events.
    records = read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == [2, 4, 6]
    assert {"loss", "grad_norm", "lr", "mse"} <= records[-1].keys()
    np.testing.assert_allclose([r["loss"] for r in records], [result.losses[i] for i in (1, 3, 5)], rtol=1e-6)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tensorboard"))
    # Export: the full params (trainable + fixed) through jharm.weights.io.
    exported = load_state_dict(result.export_path)
    assert exported.keys() == final.keys()
    assert all(np.array_equal(exported[k], final[k]) for k in final)
    with pytest.raises(ConfigError, match="match no param"):
        train(tiny_config("train.trainable=('attn2',)"), task, str(tmp_path / "none"))


def test_grad_accumulation_equals_large_batch():
    # The engine's step function itself, jitted with and without a 4-way micro-batch scan.
    config = tiny_config("optim.lr=0.01", "optim.warmup_steps=0")
    task = make_task(config)
    optimizer, schedule = optim.make_optimizer(config.optim, 10), optim.make_schedule(config.optim, 10)
    mesh = make_mesh(config.mesh)
    params = jax.jit(task.init_params)(jax.random.key(0))
    results = {}
    for accum in (1, 4):
        step_fn = jax.jit(make_train_step(task, optimizer, schedule, accum, mesh))
        state = dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                     rng=jax.random.key_data(jax.random.key(1)))
        losses = []
        for step in range(3):
            state, metrics = step_fn(state, {}, None, put_batch(task.make_batch(step), mesh))
            losses.append(float(metrics["loss"]))
        results[accum] = losses, flat(state["params"])
    (full_losses, full), (accum_losses, accum) = results[1], results[4]
    np.testing.assert_allclose(accum_losses, full_losses, rtol=1e-5)
    assert full_losses[2] < full_losses[0]  # it trained
    worst = max(float(np.max(np.abs(full[k] - accum[k]))) for k in full)
    assert worst < 1e-5, worst


@pytest.mark.parametrize("override, message", [
    ("train.grad_accum=3", "not divisible by train.grad_accum"),
    ("optim.name=sgd", "optim.name"),
    ("mesh.fsdp=3", "mesh: 1 devices are not divisible"),
    ("mesh.rules=zero3", "unknown preset"),
])
def test_config_errors_before_any_compile(tmp_path, override, message):
    config = tiny_config(override)
    task = dataclasses.replace(make_task(config), init_params=_must_not_run)
    with pytest.raises(ConfigError, match=message):
        train(config, task, str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")


def _must_not_run(rng):
    raise AssertionError("init_params ran although the config is invalid")


def test_planted_nan_stops_with_step_and_keeps_last_checkpoint(tmp_path):
    config = tiny_config("train.steps=20", "train.ckpt_every=5", "train.log_every=2")
    task = make_task(config)
    good_batch = task.make_batch

    def make_batch(step):
        batch = good_batch(step)
        if step == 7:
            batch["x0"][0, 0, 0, 0] = np.nan
        return batch

    with pytest.raises(NonFiniteError, match=r"at step 7: loss=nan.*Last good checkpoint: step 5"):
        train(config, dataclasses.replace(task, make_batch=make_batch), str(tmp_path))
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), 3)
    assert ckpt.all_steps() == [5]
    state = ckpt.restore_unsharded(5)
    assert int(state["step"]) == 5
    assert all(np.all(np.isfinite(v)) for v in traverse_util.flatten_dict(state["params"]).values())
