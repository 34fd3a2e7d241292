"""Shared pieces of the benchmark scripts: UNet sizes, CPU-thread pinning, and the engine's
jitted train step built the way ``jharm.train.loop.train`` builds it (trainable/fixed split,
NamedShardings on a ``dp`` mesh, donated state, frozen pytree placed once).

Scripts run as ``python bench/<name>.py``, so ``import _common`` finds this file.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from jharm.runtime import configure_xla_cpu

configure_xla_cpu()  # the XLA:CPU setting jharm's programs run with (jharm/runtime.py)

# diffusers UNet2DConditionModel configs (in/out channels 4).
UNET_SIZES = {
    # Two levels, cross-attention in the first: the SD block structure at CPU scale.
    "small": dict(block_out_channels=[32, 64], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=1,
                  cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32, sample_size=16),
    # SD 1.5's UNet (860M params): for accelerators.
    "sd": dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=768,
               attention_head_dim=8, norm_num_groups=32, sample_size=64,
               down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
               up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3),
}
TEXT_LEN = 77
LR, CLIP = 1e-4, 1.0


def pin_threads(threads: int) -> None:
    """With ``threads == 1``, single-threaded XLA CPU; call before JAX starts its CPU backend."""
    if threads == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")


def jharm_unet(size: str, **overrides):
    """jharm's ``UNet2DConditionModel`` for ``UNET_SIZES[size]`` (``overrides``: e.g. ``ip_adapter_tokens``)."""
    from jharm.models.unet import UNet2DConditionModel, UNetConfig

    return UNet2DConditionModel(UNetConfig.from_diffusers_config(dict(UNET_SIZES[size], in_channels=4,
                                                                      out_channels=4), **overrides))


def optim_config() -> ml_collections.ConfigDict:
    """AdamW (lr 1e-4, no weight decay), global-norm clipping 1.0, constant lr: every bench step uses it."""
    return ml_collections.ConfigDict(dict(name="adamw", lr=LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                                          warmup_steps=0, schedule="constant", final_lr_ratio=0.0,
                                          clip_norm=CLIP))


@dataclasses.dataclass
class EngineStep:
    """A jitted ``make_train_step`` of a task with its state, ready to run on device batches."""

    step_fn: Callable
    state: Any
    fixed: Any
    frozen: Any
    mesh: Any
    compiled: Any = None

    def put(self, batch):
        from jharm.train.mesh import put_batch

        return put_batch(batch, self.mesh)

    def __call__(self, device_batch):
        run = self.compiled or self.step_fn
        self.state, metrics = run(self.state, self.fixed, self.frozen, device_batch)
        return metrics

    def flops(self, device_batch) -> float | None:
        """Compile the step for ``device_batch``'s shapes (later calls run this executable) and return
        its FLOPs from XLA's cost analysis (None if the backend gives none; a ``while`` loop's body is
        counted once, not once per iteration)."""
        self.compiled = self.step_fn.lower(self.state, self.fixed, self.frozen, device_batch).compile()
        cost = self.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"]) if cost and "flops" in cost else None

    def n_params(self, trainable_only: bool = False) -> int:
        trees = (self.state["params"],) if trainable_only else (self.state["params"], self.fixed)
        return sum(int(np.prod(x.shape)) for t in trees for x in jax.tree.leaves(t))


def engine_step(task, total_steps: int, optim_cfg: ml_collections.ConfigDict | None = None) -> EngineStep:
    """``task``'s train step exactly as ``jharm.train.loop.train`` jits it (``grad_accum`` 1, ``dp`` rules)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from jharm.train import optim
    from jharm.train.loop import make_init_fn, make_train_step
    from jharm.train.mesh import make_mesh
    from jharm.train.sharding import tree_shardings

    optim_cfg = optim_cfg or optim_config()
    optimizer, schedule = optim.make_optimizer(optim_cfg, total_steps), optim.make_schedule(optim_cfg, total_steps)
    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    init_key = jax.random.key(0)
    trainable = optim.trainable_paths(jax.eval_shape(task.init_params, init_key), task.trainable)

    init = make_init_fn(task, optimizer, trainable)
    step_key = jax.random.key(1)
    state_shardings, fixed_shardings = tree_shardings(jax.eval_shape(init, init_key, step_key), mesh, "dp")
    state, fixed = jax.jit(init, out_shardings=(state_shardings, fixed_shardings))(init_key, step_key)
    frozen = None
    if task.frozen is not None:
        frozen = jax.device_put(task.frozen, tree_shardings(task.frozen, mesh, "dp"))
    step_fn = jax.jit(make_train_step(task, optimizer, schedule, 1, mesh),
                      out_shardings=(state_shardings, NamedSharding(mesh, PartitionSpec())), donate_argnums=(0,))
    return EngineStep(step_fn, state, fixed, frozen, mesh)


def interleaved_median_ms(runs: dict[str, Callable[[], Any]], steps: int, repeats: int
                          ) -> dict[str, tuple[float, float]]:
    """``{name: (wall ms, CPU ms)}`` per call of each run: the medians over ``repeats`` rounds of the
    mean of ``steps`` calls.

    Every run is called once first (compile + warm-up). In a round the runs take turns call by call
    (each call blocked on), so drifts of a shared machine's load hit all of them alike. CPU ms is this
    process's CPU time (``time.process_time``): with one XLA thread it is the step's own compute and
    does not count the time other jobs held the core, so it is the steadier number on a loaded
    machine. A run returns what to block on.
    """
    for fn in runs.values():
        jax.block_until_ready(fn())
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        round_wall, round_cpu = dict.fromkeys(runs, 0.0), dict.fromkeys(runs, 0.0)
        for _ in range(steps):
            for name, fn in runs.items():
                w, c = time.perf_counter(), time.process_time()
                jax.block_until_ready(fn())
                round_wall[name] += time.perf_counter() - w
                round_cpu[name] += time.process_time() - c
        for name in runs:
            wall[name].append(round_wall[name] / steps * 1e3)
            cpu[name].append(round_cpu[name] / steps * 1e3)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in runs}
