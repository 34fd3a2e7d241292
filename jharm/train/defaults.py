"""The engine's config sections and their validation (run before anything compiles).

A training config is ``base_config()`` plus a method-specific ``config.task``
(opaque to the engine, read by the task factory)::

    train:        steps, batch_size (global), grad_accum, seed, log_every,
                  ckpt_every, keep_checkpoints, async_checkpoint, trainable
                  (regexes; empty = the task's own), progress, export,
                  ema_decay (0 = no EMA; else the state keeps an EMA of the
                  trainable params, which the export writes)
    optim:        name (adam|adamw), lr, b1, b2, eps, weight_decay,
                  warmup_steps, schedule (constant|cosine), final_lr_ratio,
                  clip_norm (0 = no clipping)
    mesh:         data, fsdp, tensor (one may be -1 = the remaining devices),
                  rules (dp|fsdp|fsdp_tp|ep)
    distributed:  enabled, coordinator_address, num_processes, process_id,
                  cpu_collectives ("" or "gloo")
"""
from __future__ import annotations

import ml_collections

from jharm.config import ConfigError
from jharm.train.mesh import mesh_shape
from jharm.train.optim import OPTIMIZERS, SCHEDULES
from jharm.train.sharding import check_presets


def base_config() -> ml_collections.ConfigDict:
    """Defaults for every engine section; ``config.task`` is left for the method."""
    c = ml_collections.ConfigDict()
    c.train = dict(steps=100, batch_size=8, grad_accum=1, seed=0, log_every=10, ckpt_every=50,
                   keep_checkpoints=3, async_checkpoint=True, trainable=(), progress=True, export=True,
                   ema_decay=0.0)
    c.optim = dict(name="adamw", lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=0,
                   schedule="constant", final_lr_ratio=0.0, clip_norm=1.0)
    c.mesh = dict(data=-1, fsdp=1, tensor=1, rules="dp")
    c.distributed = dict(enabled=False, coordinator_address="", num_processes=-1, process_id=-1,
                         cpu_collectives="")
    c.task = dict(name="")
    return c


def _need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config.{key}: {msg}")


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Check every engine field; raise a ConfigError naming the key. No compile happens here."""
    for section in ("train", "optim", "mesh", "distributed", "task"):
        _need(section in config, section, "missing section (start from jharm.train.defaults.base_config())")
    base = base_config()
    for section in ("train", "optim", "mesh", "distributed"):
        for key in base[section]:
            _need(key in config[section], f"{section}.{key}", "missing")
        for key in config[section]:
            _need(key in base[section], f"{section}.{key}", "unknown key")
    t, o, m = config.train, config.optim, config.mesh
    for key in ("steps", "batch_size", "grad_accum", "log_every", "ckpt_every", "keep_checkpoints"):
        _need(isinstance(t[key], int) and t[key] >= 1, f"train.{key}", f"must be an int >= 1, found {t[key]!r}")
    _need(isinstance(t.ema_decay, (int, float)) and not isinstance(t.ema_decay, bool) and 0 <= t.ema_decay < 1,
          "train.ema_decay", f"must be a float in [0, 1) (0 = off), found {t.ema_decay!r}")
    _need(t.batch_size % t.grad_accum == 0, "train.batch_size",
          f"{t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
    _need(o.name in OPTIMIZERS, "optim.name", f"{o.name!r} is not one of {OPTIMIZERS}")
    _need(o.schedule in SCHEDULES, "optim.schedule", f"{o.schedule!r} is not one of {SCHEDULES}")
    _need(o.lr > 0, "optim.lr", f"must be > 0, found {o.lr}")
    _need(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, found {o.warmup_steps}")
    _need(o.clip_norm >= 0, "optim.clip_norm", f"must be >= 0, found {o.clip_norm}")
    _need(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "optim.b1/b2", f"must be in [0, 1), found {o.b1}, {o.b2}")
    check_presets(m.rules)
    data, fsdp, _ = mesh_shape(m, num_devices)
    micro = t.batch_size // t.grad_accum
    _need(micro % (data * fsdp) == 0, "train.batch_size",
          f"micro-batch {micro} (batch_size / grad_accum) is not divisible by mesh data x fsdp = {data * fsdp}")
    _need(config.distributed.cpu_collectives in ("", "gloo", "mpi"), "distributed.cpu_collectives",
          f"{config.distributed.cpu_collectives!r} is not one of '', 'gloo', 'mpi'")
    _need(bool(config.task.get("name")), "task.name", "must name a registered task")
