"""Training-step throughput: jharm's engine step vs diffusers/PyTorch, same UNet config.

Both sides train a small SD-architecture UNet2DConditionModel (the same
diffusers config, the same parameter count) on the same batch shape with
AdamW + global-norm clipping and the epsilon-MSE loss, with the same number of
CPU threads (``--threads``).
Prints steps/s of each, the jharm/PyTorch ratio, and the FLOPs of jharm's
compiled step from XLA's cost analysis, so that on an accelerator

    MFU = flops_per_step * steps_per_s / peak_flops

(pass ``--peak-tflops`` to print it). Not a test: numbers depend on the machine.

    python bench/train_step.py [--size small|sd] [--batch 4] [--steps 10] [--peak-tflops 989]
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from _common import CLIP, LR, TEXT_LEN, UNET_SIZES, engine_step, jharm_unet, pin_threads

SIZES = UNET_SIZES


def make_batch(cfg: dict, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    s = cfg["sample_size"]
    return {"x_t": rng.standard_normal((batch, s, s, 4), dtype=np.float32),
            "noise": rng.standard_normal((batch, s, s, 4), dtype=np.float32),
            "t": rng.integers(0, 1000, size=(batch,)).astype(np.int32),
            "context": rng.standard_normal((batch, TEXT_LEN, cfg["cross_attention_dim"]), dtype=np.float32)}


def bench_torch(cfg: dict, batch: dict, steps: int, threads: int) -> tuple[float, int]:
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = UNet2DConditionModel(in_channels=4, out_channels=4, **cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    x, noise = nchw(batch["x_t"]), nchw(batch["noise"])
    t, ctx = torch.from_numpy(batch["t"]).long(), torch.from_numpy(batch["context"])

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.mean((model(x, t, ctx).sample - noise) ** 2)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        return loss

    step()  # warm-up (allocator, kernels)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start), sum(p.numel() for p in model.parameters())


def bench_jax(cfg: dict, batch: dict, steps: int, size: str) -> tuple[float, int, float | None]:
    from jharm.train.task import Task

    model = jharm_unet(size)

    def init_params(rng):
        b = {k: jnp.asarray(v[:1]) for k, v in batch.items()}
        return model.init(rng, b["x_t"], b["t"], b["context"])

    def loss_fn(params, frozen, b, rng):
        loss = jnp.mean((model.apply(params, b["x_t"], b["t"], b["context"]) - b["noise"]) ** 2)
        return loss, {}

    task = Task(name="bench", init_params=init_params, loss_fn=loss_fn, make_batch=lambda step: batch)
    step = engine_step(task, steps)
    device_batch = step.put(batch)
    flops = step.flops(device_batch)

    jax.block_until_ready(step(device_batch))  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        metrics = step(device_batch)
    jax.block_until_ready((step.state, metrics))
    return steps / (time.perf_counter() - start), step.n_params(), flops


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="accelerator peak TFLOP/s for the compute dtype (e.g. 989 for H100 bf16 dense)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for both sides (0 = all cores; 1 = single-threaded XLA and "
                             "PyTorch, the fair choice on a machine shared with other jobs)")
    parser.add_argument("--skip-torch", action="store_true", help="only time jharm (e.g. on a TPU host)")
    args = parser.parse_args()
    threads = args.threads or os.cpu_count()
    pin_threads(args.threads)  # before JAX starts its CPU backend

    cfg = SIZES[args.size]
    batch = make_batch(cfg, args.batch)
    print(f"UNet '{args.size}', batch {args.batch}, {args.steps} timed steps, {threads} CPU thread(s), "
          f"devices: {jax.devices()}")
    jax_rate, jax_params, flops = bench_jax(cfg, batch, args.steps, args.size)
    print(f"jharm   : {jax_rate:8.3f} steps/s  ({jax_params:,} params)")
    if not args.skip_torch:
        torch_rate, torch_params = bench_torch(cfg, batch, args.steps, threads)
        print(f"PyTorch : {torch_rate:8.3f} steps/s  ({torch_params:,} params)")
        if torch_params != jax_params:
            print(f"warning: parameter counts differ ({jax_params} vs {torch_params})")
        print(f"ratio jharm/PyTorch: {jax_rate / torch_rate:.2f}x")
    if flops is not None:
        print(f"compiled step: {flops / 1e9:.3f} GFLOP (XLA cost analysis); "
              f"achieved {flops * jax_rate / 1e12:.4f} TFLOP/s")
        if args.peak_tflops > 0:
            print(f"MFU: {100 * flops * jax_rate / (args.peak_tflops * 1e12):.2f} % of {args.peak_tflops} TFLOP/s")


if __name__ == "__main__":
    main()
