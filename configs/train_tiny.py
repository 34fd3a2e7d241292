"""Tiny end-to-end training run (CPU-sized): ``jharm train --config=configs/train_tiny.py --workdir=runs/tiny``.

Options after ``:`` pick the sharding: "dp" (default; all devices data-parallel),
"fsdp" (all devices on the "fsdp" axis), "fsdp_tp" (2-way tensor parallel, the
rest FSDP; needs an even device count).
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
    if rules in ("fsdp", "fsdp_tp"):
        config.mesh.data, config.mesh.fsdp = 1, -1
    if rules == "fsdp_tp":
        config.mesh.tensor = 2
    config.task = default_task_config()
    return config
