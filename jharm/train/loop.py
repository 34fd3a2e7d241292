"""The one train loop every method uses: ``train(config, task, workdir)``.

Reads top to bottom: validate the config, build the mesh, derive shardings
from the param shapes, initialise (or restore) the state directly into its
shardings, then run the jitted, state-donating step, logging and
checkpointing as it goes. See ``jharm/train/task.py`` for what a method
supplies and ``jharm/train/defaults.py`` for the config.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import threading
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from jharm.train import checkpoint as ckpt_lib
from jharm.train import distributed, optim
from jharm.train.defaults import validate
from jharm.train.logging import MetricWriter
from jharm.train.mesh import BATCH_AXES, batch_sharding, make_mesh, put_batch
from jharm.train.sharding import tree_shardings
from jharm.train.task import Task

PyTree = Any


class NonFiniteError(FloatingPointError):
    """The loss or gradient norm became NaN/Inf; the message names the step."""


@dataclasses.dataclass
class TrainResult:
    """What ``train`` returns.

    Attributes:
      params: the full param tree (trainable and fixed), sharded jax arrays.
      step: the number of steps done (the step a resume would start from).
      start_step: the step this call started from (> 0 after a resume).
      losses: the loss of each step run by this call, steps start_step..step-1.
      metrics: the last step's metrics as floats.
      preempted: True if SIGTERM stopped the run early (after a final checkpoint).
      export_path: file written by the export at the end, if any.
      ema_params: with ``config.train.ema_decay`` > 0, the full param tree with the
        trainable part replaced by its exponential moving average (what the export
        writes); None when EMA is off.
    """

    params: PyTree
    step: int
    start_step: int
    losses: list[float]
    metrics: dict[str, float]
    preempted: bool = False
    export_path: str | None = None
    ema_params: PyTree = None


def make_train_step(task: Task, optimizer: optax.GradientTransformation, schedule, grad_accum: int, mesh,
                    ema_decay: float = 0.0):
    """``(state, fixed, frozen, batch) -> (state, metrics)``, not yet jitted.

    With ``ema_decay`` > 0 the state also carries ``ema``, the exponential
    moving average of the trainable params after each update:
    ``ema <- decay * ema + (1 - decay) * params`` (it starts at the initial params).

    With ``grad_accum`` > 1 the batch is cut into micro-batches (rows
    ``i, i + k, i + 2k, ...``, so every device keeps its own rows) and the
    gradients are averaged in a ``lax.scan``: the same result as the full
    batch whenever the loss is a batch mean and ``loss_fn`` draws no random
    numbers (put the noise in ``make_batch`` to keep that exact).
    """
    def loss_of(params, fixed, frozen, batch, rng):
        return task.loss_fn(optim.merge_params(params, fixed), frozen, batch, rng)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def step_fn(state, fixed, frozen, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        params = state["params"]
        if grad_accum == 1:
            (loss, metrics), grads = grad_fn(params, fixed, frozen, batch, rng)
        else:
            def split(x):
                x = x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)
                spec = PartitionSpec(None, BATCH_AXES, *([None] * (x.ndim - 2)))
                return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

            def body(carry, inputs):
                index, micro = inputs
                (loss, metrics), grads = grad_fn(params, fixed, frozen, micro, jax.random.fold_in(rng, index))
                return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

            micro_batches = jax.tree.map(split, batch)
            first = jax.tree.map(lambda x: x[0], micro_batches)
            shapes = jax.eval_shape(grad_fn, params, fixed, frozen, first, rng)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[0][0], shapes[0][1], shapes[1]))
            total, _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum), micro_batches))
            loss, metrics, grads = jax.tree.map(lambda x: x / grad_accum, total)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        new_state = dict(state, step=state["step"] + 1, params=new_params, opt_state=opt_state)
        if ema_decay:
            new_state["ema"] = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
                                            state["ema"], new_params)
        metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads), lr=schedule(state["step"]))
        return new_state, metrics

    return step_fn


class _StopFlag:
    """Pre-emption: SIGTERM makes the loop checkpoint and return.

    On one process a SIGTERM handler sets the flag. With several processes,
    JAX's coordination service owns SIGTERM and agrees on one step at which
    every process stops (``reached_preemption_sync_point``), so that all of
    them take part in the same final save.
    """

    def __init__(self):
        self.set = False
        self._previous = None
        self._multi = jax.process_count() > 1

    def __enter__(self):
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def should_stop(self, step: int) -> bool:
        if self._multi:
            from jax.experimental import multihost_utils
            self.set = self.set or multihost_utils.reached_preemption_sync_point(step)
        return self.set

    def _handle(self, signum, frame):
        self.set = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _check_finite(records: list[tuple[int, dict]], ckpt: ckpt_lib.Checkpointer) -> None:
    for step, metrics in records:
        if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
            ckpt.wait()  # the last good checkpoint must be complete before we stop
            raise NonFiniteError(
                f"non-finite training values at step {step}: loss={metrics['loss']}, "
                f"grad_norm={metrics['grad_norm']}; the run stopped. Last good checkpoint: "
                f"step {ckpt.latest_step()} in {ckpt.directory}")


def make_init_fn(task: Task, optimizer: optax.GradientTransformation, trainable, ema_decay: float = 0.0):
    """``(init_key, step_key) -> (state, fixed)``: the train state at step 0 and the
    params that do not train (``trainable``: from ``optim.trainable_paths``)."""

    def init(init_key, step_key):
        train_params, fixed = optim.split_params(task.init_params(init_key), trainable)
        state = dict(step=jnp.zeros((), jnp.int32), params=train_params,
                     opt_state=optimizer.init(train_params), rng=jax.random.key_data(step_key))
        if ema_decay:  # its own buffers (the state is donated), sharded like the params
            state["ema"] = jax.tree.map(jnp.copy, train_params)
        return state, fixed

    return init


def gather_to_host(tree: PyTree) -> PyTree:
    """Numpy copies of (possibly multi-host sharded) arrays, on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def train(config: ml_collections.ConfigDict, task: Task, workdir: str) -> TrainResult:
    """Train ``task`` under ``config`` in ``workdir``; resume from its latest checkpoint if any."""
    distributed.initialize(config.distributed)
    validate(config, jax.device_count())  # before any trace or compile
    tc = config.train
    mesh = make_mesh(config.mesh)
    rules = config.mesh.rules
    schedule = optim.make_schedule(config.optim, tc.steps)
    optimizer = optim.make_optimizer(config.optim, tc.steps)
    axes_fn = task.logical_axes
    main = distributed.is_main_process()
    ema_decay = float(tc.ema_decay)

    # Shapes first: which params train, and every leaf's sharding, without allocating.
    init_key, step_key = jax.random.split(jax.random.key(tc.seed))
    param_shapes = jax.eval_shape(task.init_params, init_key)
    trainable = optim.trainable_paths(param_shapes, tuple(tc.trainable) or task.trainable)

    init = make_init_fn(task, optimizer, trainable, ema_decay)
    state_shapes, fixed_shapes = jax.eval_shape(init, init_key, step_key)
    state_shardings = tree_shardings(state_shapes, mesh, rules, axes_fn)
    fixed_shardings = tree_shardings(fixed_shapes, mesh, rules, axes_fn)
    frozen_shardings = tree_shardings(task.frozen, mesh, rules, axes_fn)
    frozen = jax.device_put(task.frozen, frozen_shardings)  # once, never per step

    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), tc.keep_checkpoints,
                                 tc.async_checkpoint)
    latest = ckpt.latest_step()
    if latest is None:
        state, fixed = jax.jit(init, out_shardings=(state_shardings, fixed_shardings))(init_key, step_key)
    else:
        # Only the fixed part is recomputed; XLA drops the unused state outputs.
        fixed = jax.jit(lambda a, b: init(a, b)[1], out_shardings=fixed_shardings)(init_key, step_key)
        state = ckpt.restore(latest, ckpt_lib.abstract_like(state_shapes, state_shardings))
    start = int(jax.device_get(state["step"]))

    first = task.make_batch(start) if start < tc.steps else None
    batch_shardings = {k: batch_sharding(mesh, np.ndim(v)) for k, v in (first or {}).items()}
    replicated = NamedSharding(mesh, PartitionSpec())
    step_fn = jax.jit(make_train_step(task, optimizer, schedule, tc.grad_accum, mesh, ema_decay),
                      in_shardings=(state_shardings, fixed_shardings, frozen_shardings, batch_shardings),
                      out_shardings=(state_shardings, replicated), donate_argnums=(0,))

    writer = MetricWriter(workdir, tc.steps, start, enabled=main, progress=tc.progress)
    if main and latest is not None:
        writer.message(f"resumed from step {latest} ({ckpt.directory})")
    config_json = config.to_json_best_effort()
    losses, pending, last = [], [], {}

    def flush(window):
        """Fetch a window of step metrics, record losses, stop on NaN/Inf, log the newest."""
        records = [(s, {k: float(v) for k, v in m.items()}) for s, m in jax.device_get(window)]
        losses.extend(m["loss"] for _, m in records)
        _check_finite(records, ckpt)
        return writer.write(records[-1][0] + 1, records[-1][1])

    step, saved, preempted = start, latest, False
    try:
        with _StopFlag() as stop:
            while step < tc.steps:
                if stop.should_stop(step):
                    preempted = True
                    break
                batch = put_batch(first if step == start else task.make_batch(step), mesh)
                state, metrics = step_fn(state, fixed, frozen, batch)
                step += 1
                pending.append((step - 1, metrics))
                if step % tc.log_every == 0 or step % tc.ckpt_every == 0 or step == tc.steps:
                    last = flush(pending)  # also the NaN check, before anything of this window is saved
                    pending = []
                if step % tc.ckpt_every == 0:
                    ckpt.save(step, state, config_json)
                    saved = step
            if pending:  # stopped between log points
                last = flush(pending)
            if saved != step:
                ckpt.save(step, state, config_json)
            ckpt.wait()
            if preempted:
                writer.message(f"SIGTERM: saved step {step} to {ckpt.directory}; stopping")
    finally:
        writer.close()
        ckpt.close()

    params = optim.merge_params(state["params"], fixed)
    ema_params = optim.merge_params(state["ema"], fixed) if ema_decay else None
    export_path = None
    if tc.export and not preempted:
        export_path = _export(task, params if ema_params is None else ema_params, workdir, main)
    return TrainResult(params=params, step=step, start_step=start, losses=losses, metrics=last,
                       preempted=preempted, export_path=export_path, ema_params=ema_params)


def _export(task: Task, params: PyTree, workdir: str, main: bool) -> str | None:
    """Write the final params: ``task.export`` if given, else ``params.safetensors``
    with ``a/b/c`` keys (``jharm.weights.io``). Only process 0 writes."""
    host = gather_to_host(params)
    if not main:
        return None
    if task.export is not None:
        return task.export(host, workdir)
    from jharm.weights.io import save_safetensors

    path = os.path.join(workdir, "params.safetensors")
    save_safetensors({k: np.asarray(v) for k, v in traverse_util.flatten_dict(host, sep="/").items()}, path)
    return path
