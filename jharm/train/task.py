"""The contract between a method and the one train loop.

A method (ESD, Co-Erasing, LightFair, MixBridge, ShapesWorld pre-training, ...)
is a config + a ``Task`` + a loss in ``jharm/objectives``. The loop in
``jharm/train/loop.py`` owns everything else: mesh, shardings, optimizer,
checkpoints, logging, resume.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

PyTree = Any
Batch = dict[str, np.ndarray]
# (params, frozen, batch, rng) -> (scalar loss, {metric name: scalar})
LossFn = Callable[[PyTree, PyTree, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass
class Task:
    """What a method supplies to the train loop.

    Attributes:
      name: short name used in logs.
      init_params: ``rng -> params``; the full param tree the loss receives
        (trainable and fixed parts together), e.g. ``module.init`` or loaded
        weights. Called under ``jax.jit`` with output shardings, so it must be
        traceable (load weights outside and close over them if needed).
      loss_fn: pure, jittable ``(params, frozen, batch, rng) -> (loss, metrics)``.
      make_batch: ``step -> global batch`` of host numpy arrays. A pure function
        of the step (and the task's seed), so a resumed run sees exactly the
        batches an uninterrupted one would.
      trainable: regexes over ``"a/b/c"`` param paths; params matching none of
        them receive no updates (ESD-x = ``("attn2",)``; ``(".*",)`` = all).
      frozen: a pytree the loss reads but never trains (teacher params,
        centroids); held once on device and sharded like the params.
      export: optional ``(params, workdir) -> path`` run at the end of training.
      logical_axes: optional ``(path names, shape) -> logical axes or None``
        overriding ``jharm.train.sharding.logical_axes`` for some leaves (e.g.
        an "expert" axis); None from it means "use the default rule".
    """

    name: str
    init_params: Callable[[jax.Array], PyTree]
    loss_fn: LossFn
    make_batch: Callable[[int], Batch]
    trainable: tuple[str, ...] = (".*",)
    frozen: PyTree = None
    export: Callable[[PyTree, str], str] | None = None
    logical_axes: Callable[[tuple[str, ...], tuple[int, ...]], tuple[str | None, ...] | None] | None = None
