"""Tiny end-to-end training run (CPU-sized): ``jharm train --config=configs/train_tiny.py --workdir=runs/tiny``.

Options after ``:``: "dp" (default), "fsdp", "fsdp_tp" pick the sharding rules,
e.g. ``configs/train_tiny.py:fsdp`` with ``--config.mesh.fsdp=-1``.
"""
from jharm.train.defaults import base_config
from jharm.train.tasks.denoise_tiny import default_task_config


def get_config(rules: str = "dp"):
    config = base_config()
    config.train.steps = 200
    config.train.batch_size = 8
    config.train.log_every = 10
    config.train.ckpt_every = 50
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 10
    config.optim.schedule = "cosine"
    config.mesh.rules = rules
    config.task = default_task_config()
    return config
