"""MixBridge merge step (M+1 stacked experts + router, one jitted engine step) vs a
Python loop over M+1 separate single-expert I2SB steps on the same batch.

Three runs of the engine's own jitted step (``bench/_common.engine_step``: Adam,
donated state, as ``jharm.train.loop`` builds it), timed interleaved (median of
rounds; CPU time is the steadier number on a shared machine):

* ``vmap``  — the merge task with ``experts_mode="vmap"`` (experts batched; the
  expert axis is what the ``ep``/``fsdp_tp`` rules shard);
* ``loop``  — the merge task with ``experts_mode="loop"`` (experts sliced and run
  one after another inside the same jitted step);
* ``python``— M+1 separate jitted steps of one ADM (the ``i2sb`` loss) per
  iteration: what training the experts as separate models costs.

Prints ms per step and the ratios to ``python``. Not a test.

    python bench/mixbridge_step.py [--size small|i2sb256] [--tasks 3] [--batch 8] [--steps 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

from _common import engine_step, interleaved_median_ms, pin_threads

SIZES = {
    # the ShapesWorld demo's bridge network (32x32)
    "small": dict(image_size=32, adm=dict(model_channels=16, channel_mult=(1, 2, 2), norm_groups=8,
                                          num_res_blocks=1, attention_resolutions=())),
    # I2SB's 256x256 ADM (accelerators only)
    "i2sb256": dict(image_size=256, adm=dict(model_channels=256, num_res_blocks=2, attention_resolutions=(32, 16, 8),
                                             channel_mult=(1, 1, 2, 2, 4, 4), num_heads=4, num_head_channels=64,
                                             norm_groups=32, use_checkpoint=True)),
}


def make_config(size: str, name: str, phase: str, tasks: int, batch: int, mode: str, **task):
    from jharm.backdoor_demo import DEMO, demo_config

    spec = SIZES[size]
    d = dict(DEMO, image_size=spec["image_size"], batch_size=batch, experts_mode=mode, adm=spec["adm"],
             trigger_size=max(1, spec["image_size"] // 8))
    return demo_config(d, name, phase, 100, tasks, **task)


def batched_step(config, seed: int = 0):
    """The engine's jitted step of ``config``'s task (``jharm.train.loop``'s own step) on one
    fixed device batch, as a no-argument callable returning what to block on."""
    from jharm.train.tasks import make_task

    task = make_task(config)
    step = engine_step(task, config.train.steps, config.optim)
    batch = step.put(task.make_batch(seed))
    return lambda: step(batch)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--tasks", type=int, default=3, help="backdoor tasks M (M+1 experts)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (the median is reported)")
    parser.add_argument("--threads", type=int, default=0, help="1 = single-threaded XLA:CPU; 0 = all cores")
    args = parser.parse_args()
    pin_threads(args.threads)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax
    import numpy as np

    from jharm.train.tasks import backdoor as bd

    experts = args.tasks + 1
    print(f"ADM '{args.size}', {experts} experts (M={args.tasks}), batch {args.batch}, devices: {jax.devices()}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    # Random stacked experts written as a divide export: the merge task loads them as it would trained ones.
    probe = make_config(args.size, "mixbridge", "merge", args.tasks, args.batch, "vmap")
    adm = bd.adm_config(probe.task)
    shapes = jax.eval_shape(lambda: bd.init_adm(adm, jax.random.key(0)))
    rng = np.random.default_rng(0)
    stacked = jax.tree.map(lambda s: (0.02 * rng.standard_normal((experts,) + s.shape)).astype(np.float32), shapes)
    path = bd._export_fn(bd._meta(probe.task, "mixbridge", adm, phase="divide", num_experts=experts))(
        {"experts": stacked}, tempfile.mkdtemp(prefix="mixbridge_bench_"))
    print(f"one expert: {sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)):,} params")

    runs = {mode: batched_step(make_config(args.size, "mixbridge", "merge", args.tasks, args.batch, mode,
                                           experts_path=path)) for mode in ("vmap", "loop")}
    singles = [batched_step(make_config(args.size, "i2sb", "merge", 0, args.batch, "vmap")) for _ in range(experts)]
    runs["python"] = lambda: [run() for run in singles]
    results = interleaved_median_ms(runs, args.steps, args.repeats)
    base_cpu = results["python"][1]
    for name, (wall_ms, cpu_ms) in results.items():
        ratio = "" if name == "python" else f"  {cpu_ms / base_cpu:5.2f}x the Python loop (CPU time)"
        print(f"{name:7s}: {wall_ms:9.1f} ms wall  {cpu_ms:9.1f} ms CPU per step{ratio}")


if __name__ == "__main__":
    main()
