"""Optimizer, learning-rate schedule, and the trainable/fixed split of params.

Which params train is a list of regexes over ``"a/b/c"`` paths
(``Task.trainable``): ESD-x is ``("attn2",)``, full fine-tuning ``(".*",)``,
text-encoder-only ``("^text_encoder/",)``, LoRA-only ``("lora",)``. Instead of
masking updates, the param tree is *split*: gradients and optimizer state
exist only for the trainable part, and the fixed part is an ordinary jit
argument, so a frozen param gets exactly zero update and costs no Adam moments.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import optax
from flax import traverse_util

from jharm.config import ConfigError

PyTree = Any
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "cosine")


def make_schedule(optim, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to ``optim.lr`` over ``optim.warmup_steps``, then
    constant or cosine decay to ``optim.lr * optim.final_lr_ratio`` at ``total_steps``."""
    lr, warmup = float(optim.lr), int(optim.warmup_steps)
    if optim.schedule == "constant":
        if warmup == 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)],
                                    [warmup])
    if optim.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1),
                                                  end_value=lr * float(optim.final_lr_ratio))
    raise ConfigError(f"optim.schedule: unknown {optim.schedule!r}; choose one of {SCHEDULES}")


def make_optimizer(optim, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping (``clip_norm`` > 0) then Adam/AdamW on the schedule."""
    schedule = make_schedule(optim, total_steps)
    if optim.name == "adam":
        opt = optax.adam(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps)
    elif optim.name == "adamw":
        opt = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay)
    else:
        raise ConfigError(f"optim.name: unknown {optim.name!r}; choose one of {OPTIMIZERS}")
    if optim.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optim.clip_norm), opt)
    return opt


def trainable_paths(params: PyTree, patterns: Sequence[str]) -> set[str]:
    """The ``"a/b/c"`` paths of ``params`` matched (``re.search``) by any pattern."""
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as err:
        raise ConfigError(f"trainable: bad regex in {tuple(patterns)}: {err}") from None
    paths = traverse_util.flatten_dict(params, sep="/").keys()
    chosen = {p for p in paths if any(c.search(p) for c in compiled)}
    if not chosen:
        raise ConfigError(f"trainable patterns {tuple(patterns)} match no param; "
                          f"some paths: {sorted(paths)[:8]}")
    return chosen


def split_params(params: PyTree, trainable: set[str]) -> tuple[PyTree, PyTree]:
    """``params -> (trainable part, fixed part)``, both nested dicts with the original paths."""
    flat = traverse_util.flatten_dict(params, sep="/")
    train = {k: v for k, v in flat.items() if k in trainable}
    fixed = {k: v for k, v in flat.items() if k not in trainable}
    return traverse_util.unflatten_dict(train, sep="/"), traverse_util.unflatten_dict(fixed, sep="/")


def merge_params(trainable: PyTree, fixed: PyTree) -> PyTree:
    """Inverse of :func:`split_params`."""
    flat = traverse_util.flatten_dict(fixed, sep="/")
    flat.update(traverse_util.flatten_dict(trainable, sep="/"))
    return traverse_util.unflatten_dict(flat, sep="/")
