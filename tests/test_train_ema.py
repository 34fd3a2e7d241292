"""EMA in the train engine (``config.train.ema_decay``): the recurrence, checkpointing,
exact resume, export of the EMA params, and validation."""
import dataclasses
import os
import signal

import jax
import numpy as np
import pytest
from flax import traverse_util

from jharm import config as config_lib
from jharm.config import ConfigError
from jharm.train.checkpoint import Checkpointer
from jharm.train.loop import train
from jharm.train.tasks import make_task
from jharm.weights.io import load_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["train.batch_size=4", "task.image_size=8", "task.width=16", "train.progress=False",
        "optim.schedule=constant", "optim.warmup_steps=0", "optim.lr=0.01", "train.async_checkpoint=False"]
DECAY = 0.7


def tiny_config(*overrides):
    return config_lib.get(os.path.join(ROOT, "configs/train_tiny.py"), TINY + list(overrides))


def flat(tree):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(tree), sep="/").items()}


def test_ema_follows_the_numpy_recurrence_is_exported_and_resumes_bit_identically(tmp_path):
    steps = 4
    config = tiny_config(f"train.steps={steps}", "train.ckpt_every=1", "train.keep_checkpoints=10",
                         "train.log_every=1", f"train.ema_decay={DECAY}")
    task = make_task(config)
    reference = train(config, task, str(tmp_path / "reference"))
    # Params after each step from the per-step checkpoints; p0 = the initial params.
    init_key = jax.random.split(jax.random.key(config.train.seed))[0]
    ema = flat(task.init_params(init_key))
    first = dict(ema)
    ckpt = Checkpointer(str(tmp_path / "reference/checkpoints"), 10)
    assert ckpt.all_steps() == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        saved = ckpt.restore_unsharded(step)
        params = flat(saved["params"])
        ema = {k: np.float32(DECAY) * ema[k] + np.float32(1 - DECAY) * params[k] for k in ema}
        got = flat(saved["ema"])
        for key in ema:
            np.testing.assert_allclose(got[key], ema[key], rtol=2e-6, atol=1e-7, err_msg=f"step {step} {key}")
    ckpt.close()
    final, raw = flat(reference.ema_params), flat(reference.params)
    assert final.keys() == ema.keys()
    for key in ema:
        np.testing.assert_allclose(final[key], ema[key], rtol=2e-6, atol=1e-7, err_msg=key)
    assert any(not np.allclose(raw[k], first[k]) for k in ema)  # it trained
    assert any(not np.allclose(final[k], raw[k]) for k in ema)  # and the EMA is not the raw params
    exported = load_state_dict(reference.export_path)  # the export writes the EMA params
    for key in ema:
        np.testing.assert_array_equal(exported[key], final[key], err_msg=key)

    # Pre-empted after step 2, then resumed: params and EMA bit-identical to the uninterrupted run.
    make_batch = task.make_batch

    def preempting(step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return make_batch(step)

    stopped = train(config, dataclasses.replace(task, make_batch=preempting), str(tmp_path / "run"))
    assert stopped.preempted and stopped.step == 2
    resumed = train(config, make_task(config), str(tmp_path / "run"))
    assert resumed.start_step == 2 and resumed.step == steps
    for a, b in ((reference.params, resumed.params), (reference.ema_params, resumed.ema_params)):
        a, b = flat(a), flat(b)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_ema_is_off_by_default_and_validated(tmp_path):
    assert tiny_config().train.ema_decay == 0.0
    for bad in ("1.0", "-0.1"):
        config = tiny_config(f"train.ema_decay={bad}")
        with pytest.raises(ConfigError, match="train.ema_decay"):
            train(config, make_task(config), str(tmp_path / "bad"))
