"""Exact resume: SIGTERM (pre-emption) and kill -9 mid-run, then resume; the
final params must be bit-identical to an uninterrupted run."""
import dataclasses
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import traverse_util

from jharm import config as config_lib
from jharm.train.checkpoint import Checkpointer
from jharm.train.loop import train
from jharm.train.tasks import make_task
from jharm.train.tasks.denoise_tiny import make_task as make_denoise_task
from jharm.weights.io import load_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs/train_tiny.py")
TINY = ["train.batch_size=8", "task.image_size=8", "task.width=16", "train.progress=False",
        "train.steps=30", "train.ckpt_every=10", "train.log_every=5", "optim.warmup_steps=3"]


def flat(tree):
    return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def test_sigterm_saves_a_checkpoint_and_resume_is_bit_identical(tmp_path):
    config = config_lib.get(CONFIG, TINY)
    reference = train(config, make_task(config), str(tmp_path / "reference"))

    task = make_task(config)
    make_batch = task.make_batch

    def preempting_make_batch(step):  # the scheduler's SIGTERM arrives while step 17 is prepared
        if step == 17:
            os.kill(os.getpid(), signal.SIGTERM)
        return make_batch(step)

    stopped = train(config, dataclasses.replace(task, make_batch=preempting_make_batch), str(tmp_path / "run"))
    assert stopped.preempted and stopped.step == 18 and stopped.export_path is None
    assert Checkpointer(str(tmp_path / "run/checkpoints"), 3).all_steps() == [10, 18]

    resumed = train(config, make_task(config), str(tmp_path / "run"))
    assert resumed.start_step == 18 and resumed.step == 30 and not resumed.preempted
    np.testing.assert_array_equal(stopped.losses + resumed.losses, reference.losses)
    a, b = flat(reference.params), flat(resumed.params)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def kill_after_checkpoint(config):
    """A denoise_tiny task that SIGKILLs its own process at step 25, once the
    step-20 checkpoint is complete on disk (no timing race: the kill point is fixed)."""
    task = make_denoise_task(config)
    make_batch, directory = task.make_batch, os.environ["JHARM_TEST_CKPT_DIR"]

    def killing_make_batch(step):
        if step == 25:
            deadline = time.time() + 60
            while not os.path.isdir(os.path.join(directory, "20")) and time.time() < deadline:
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)
        return make_batch(step)

    return dataclasses.replace(task, make_batch=killing_make_batch)


def run_cli(workdir, *extra, env=None):
    args = [sys.executable, "-m", "jharm.cli", "train", f"--config={CONFIG}", f"--workdir={workdir}"]
    args += [f"--config.{o}" for o in TINY + list(extra)]
    environment = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([ROOT, os.path.dirname(__file__)]),
                       **(env or {}))
    return subprocess.run(args, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_kill9_mid_run_then_resume_is_bit_identical(tmp_path):
    reference = run_cli(tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]

    workdir = tmp_path / "run"
    killed = run_cli(workdir, "task.name=test_train_resume:kill_after_checkpoint",
                     env={"JHARM_TEST_CKPT_DIR": str(workdir / "checkpoints")})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert Checkpointer(str(workdir / "checkpoints"), 3).latest_step() == 20

    resumed = run_cli(workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 20" in resumed.stdout + resumed.stderr
    a = load_state_dict(str(tmp_path / "reference/params.safetensors"))
    b = load_state_dict(str(workdir / "params.safetensors"))
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
