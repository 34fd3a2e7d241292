"""Two real processes on localhost (``jax.distributed.initialize`` with a loopback
coordinator, gloo CPU collectives) train the same tiny model to the same losses
as one process, through the ``jharm train`` command."""
import dataclasses
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from jharm import config as config_lib
from jharm.train.logging import read_metrics
from jharm.train.loop import train
from jharm.train.tasks import make_task
from jharm.train.tasks.denoise_tiny import make_task as make_denoise_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs/train_tiny.py")
BASE = ["train.batch_size=8", "task.image_size=8", "task.width=16", "train.progress=False",
        "train.steps=10", "train.log_every=1", "train.ckpt_every=5", "optim.lr=0.003"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(workdir, *extra, pythonpath=ROOT):
    """Start the same ``jharm train`` command as processes 0 and 1 of a localhost job."""
    port = free_port()
    args = [sys.executable, "-m", "jharm.cli", "train", f"--config={CONFIG}", f"--workdir={workdir}"]
    args += [f"--config.{o}" for o in BASE + ["distributed.enabled=True", "distributed.cpu_collectives=gloo"]
             + list(extra)]
    procs = []
    for pid in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=pythonpath, JAX_DEFAULT_MATMUL_PRECISION="highest",
                   JHARM_COORDINATOR=f"127.0.0.1:{port}", JHARM_NUM_PROCESSES="2", JHARM_PROCESS_ID=str(pid))
        env.pop("XLA_FLAGS", None)  # one CPU device per process
        procs.append(subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
    return [out for out, _ in outputs]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    workdir = tmp_path / "two"
    outputs = launch_two(workdir)
    assert "finished at step 10" in outputs[0]
    assert "finished at step 10" not in outputs[1]  # only process 0 reports and writes
    assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "5"]
    two = [r["loss"] for r in read_metrics(str(workdir))]

    config = config_lib.get(CONFIG, BASE)
    one = train(config, make_task(config), str(tmp_path / "one")).losses
    assert len(two) == len(one) == 10 and one[-1] < one[0]
    np.testing.assert_allclose(two, one, rtol=1e-5)


def sigterm_process_1(config):
    """denoise_tiny, but process 1 (only) receives SIGTERM while preparing step 3."""
    task = make_denoise_task(config)
    make_batch = task.make_batch

    def preempted_make_batch(step):
        if step == 3 and os.environ.get("JHARM_PROCESS_ID") == "1":
            os.kill(os.getpid(), signal.SIGTERM)
        return make_batch(step)

    return dataclasses.replace(task, make_batch=preempted_make_batch)


@pytest.mark.slow
def test_sigterm_on_one_process_stops_both_at_one_step_with_a_checkpoint(tmp_path):
    workdir = tmp_path / "two"
    outputs = launch_two(workdir, "task.name=test_distributed:sigterm_process_1", "train.ckpt_every=1000",
                         "train.steps=150", "train.log_every=50",
                         pythonpath=os.pathsep.join([ROOT, os.path.dirname(__file__)]))
    assert "stopped by SIGTERM at step" in outputs[0], outputs
    stopped = int(outputs[0].split("stopped by SIGTERM at step ")[1].split(";")[0])
    # The coordination service agrees on a step asynchronously, a few dozen steps later here.
    assert 3 < stopped < 150
    assert os.listdir(workdir / "checkpoints") == [str(stopped)]
