"""ESD and Co-Erasing training-step cost vs a plain UNet training step (one run, one machine).

Every step is the engine's own (``jharm.train.loop.make_train_step``, jitted as ``train`` jits
it), on the same UNet, the same batch of ``--batch`` latents, the same optimizer (AdamW +
global-norm clipping) and the same trainable parameter set (``--param-set``, default all):

  plain       epsilon-MSE: one student forward/backward.
  ESD         the frozen teacher's two forwards [∅, c] batched into one UNet call on 2B rows
              + one student forward/backward (``jharm.objectives.erasure.esd_loss``), z_t given.
  Co-Erasing  the same on the IP-Adapter UNet: the concept rows (and the student) also attend to
              N = 4 image tokens through ``to_k_ip``/``to_v_ip``; plus the Gaussian blur of z_t
              (``co_erasing_loss``), z_t given.

A real ESD / Co-Erasing step (``jharm.train.tasks.erasure.build_task``) first samples z_t with
the student from pure noise down to a DDIM index k ~ U{0..S-1} (S = ``--sample-steps``, 50;
CFG, so every sampling step is one UNet forward on 2B rows, no gradient). That part is timed
separately: the real task's step at k = 0 and at k = S-1; their difference / (S-1) is one
sampling step, and the expected real step is ``step(k=0) + (S-1)/2 x sampling step``.

Runs take turns call by call after a warm-up; printed are medians over rounds of wall-clock ms and
of this process's CPU ms per step (with ``--threads 1`` the CPU ms leave out the time other jobs
of a shared machine held the core; on an accelerator read the wall column), each with its ratio
to the plain step.

    python bench/erasure_step.py --threads 1                    # CPU, size small
    python bench/erasure_step.py --size sd --batch 4            # SD 1.5 shapes: accelerators only
"""
from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from _common import TEXT_LEN, UNET_SIZES, engine_step, interleaved_median_ms, jharm_unet, pin_threads

IP_TOKENS, N_IMAGES = 4, 8


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(UNET_SIZES), default="small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed round (loss-only steps)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds; the median is reported")
    parser.add_argument("--param-set", default="full", help="trainable set of every step (jharm PARAM_SETS)")
    parser.add_argument("--sample-steps", type=int, default=50, help="DDIM steps S of the z_t sampling")
    parser.add_argument("--sample-repeats", type=int, default=3,
                        help="timed rounds of the real steps (one call each; k = S-1 is S-1 UNet forwards long)")
    parser.add_argument("--skip-sampling", action="store_true", help="do not time the real (sampling) steps")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads (0 = all cores; 1 = single-threaded XLA, fair on a shared machine)")
    args = parser.parse_args()
    pin_threads(args.threads)  # before JAX starts its CPU backend

    from jharm.diffusion.schedules import make_schedule
    from jharm.objectives.erasure import co_erasing_loss, esd_loss, gaussian_blur
    from jharm.train.defaults import base_config
    from jharm.train.task import Task
    from jharm.train.tasks.erasure import (PARAM_SETS, ErasureModel, _eps_fn, build_task, default_task_config,
                                           query_timestep)

    b, size, S = args.batch, UNET_SIZES[args.size]["sample_size"], args.sample_steps
    trainable = PARAM_SETS[args.param_set]
    unet, ip_unet = jharm_unet(args.size), jharm_unet(args.size, ip_adapter_tokens=IP_TOKENS)
    k_plain, k_ip = jax.random.split(jax.random.key(0))
    params = unet.init_params(k_plain, context_len=TEXT_LEN)
    ip_params = ip_unet.init_params(k_ip, context_len=TEXT_LEN)
    dim = ip_unet.config.cross_attention_dim
    rng = np.random.default_rng(0)
    normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
    cond, uncond, tokens = normal(1, TEXT_LEN, dim), normal(1, TEXT_LEN, dim), normal(N_IMAGES, IP_TOKENS, dim)
    k_mid = S // 2
    batch = {"z_t": normal(b, size, size, 4), "noise": normal(b, size, size, 4),
             "t": query_timestep(np.full((b,), k_mid), rng.random(b), S),
             "image_index": rng.integers(0, N_IMAGES, size=(b,)).astype(np.int32)}

    def task(name, loss_fn, start, frozen):
        return Task(name=name, init_params=lambda rng: start, loss_fn=loss_fn, make_batch=lambda step: batch,
                    trainable=trainable, frozen=frozen)

    def plain_loss(p, frozen, bt, rng):
        context = jnp.broadcast_to(frozen["cond"], (bt["z_t"].shape[0],) + frozen["cond"].shape[1:])
        loss = jnp.mean((unet.apply(p, bt["z_t"], bt["t"], context) - bt["noise"]) ** 2)
        return loss, {}

    def contexts(frozen, n):
        return tuple(jnp.broadcast_to(frozen[k], (n,) + frozen[k].shape[1:]) for k in ("cond", "uncond"))

    def esd_given_z(p, frozen, bt, rng):
        c, u = contexts(frozen, bt["z_t"].shape[0])
        return esd_loss(p, frozen["teacher"], _eps_fn(unet), bt["z_t"], bt["t"], c, u)

    def co_given_z(p, frozen, bt, rng):
        c, u = contexts(frozen, bt["z_t"].shape[0])
        z = gaussian_blur(bt["z_t"], 3)
        return co_erasing_loss(p, frozen["teacher"], _eps_fn(ip_unet), z, bt["t"], c, u,
                               frozen["image_tokens"][bt["image_index"]])

    text = {"cond": jnp.asarray(cond), "uncond": jnp.asarray(uncond)}
    steps = {
        "plain": task("plain", plain_loss, params, text),
        "esd": task("esd", esd_given_z, params, dict(text, teacher=params)),
        "co_erasing": task("co_erasing", co_given_z, ip_params,
                           dict(text, teacher=ip_params, image_tokens=jnp.asarray(tokens))),
    }
    print(f"UNet '{args.size}', batch {b}, param set {args.param_set!r}, {args.threads or os.cpu_count()} "
          f"CPU thread(s), devices: {jax.devices()}")
    steps = {name: engine_step(t, 1000) for name, t in steps.items()}
    device_batch = steps["plain"].put(batch)
    runs = {}
    for name, step in steps.items():
        flops = step.flops(device_batch)
        print(f"{name:<11} {step.n_params():>13,} params ({step.n_params(True):,} trained)"
              + (f", {flops / 1e9:.2f} GFLOP/step (XLA cost analysis)" if flops else ""))
        runs[name] = (lambda s: lambda: s(device_batch))(step)
    # Not a train step: the ESD teacher's batched call alone, to show what a UNet forward costs here.
    teacher = jax.jit(lambda p, z, t, f: _eps_fn(unet)(p, jnp.concatenate([z, z]), jnp.concatenate([t, t]),
                                                       jnp.concatenate(contexts(f, z.shape[0])[::-1])))
    runs["teacher"] = lambda: teacher(steps["esd"].frozen["teacher"], device_batch["z_t"], device_batch["t"], text)
    ms = interleaved_median_ms(runs, args.steps, args.repeats)
    # Free their states (and teachers) before the real steps: SD size on one chip.
    runs.clear()
    steps.clear()

    real = {}
    if not args.skip_sampling:
        schedule = make_schedule("scaled_linear", 1000, 0.00085, 0.012)
        config = base_config()
        config.train.batch_size = b
        for method, unet_, params_ in (("esd", unet, params), ("co_erasing", ip_unet, ip_params)):
            config.task = default_task_config(method)
            config.task.update(param_set=args.param_set, sample_steps=S)
            model = ErasureModel(unet_, params_, schedule, (size, size, 4), cond, uncond,
                                 tokens if method == "co_erasing" else None)
            t = build_task(config, model)
            step = engine_step(t, 1000)
            for k in (0, S - 1):
                kb = dict(t.make_batch(0), k=np.full((b,), k, np.int32),
                          t=query_timestep(np.full((b,), k), rng.random(b), S))
                real[(method, k)] = (lambda s, d: lambda: s(d))(step, step.put(kb))
        # The real steps are long: one call per round.
        ms.update(interleaved_median_ms(real, 1, args.sample_repeats))

    rows = [("plain epsilon-MSE", ms["plain"]), ("ESD, z_t given (teacher 2B + student)", ms["esd"]),
            ("Co-Erasing, z_t given (+ IP branch, blur)", ms["co_erasing"]),
            ("  (teacher call alone: UNet fwd on 2B rows)", ms["teacher"])]
    for method in ("esd", "co_erasing") if real else ():
        lo, hi = ms[(method, 0)], ms[(method, S - 1)]
        per = tuple((h - l) / (S - 1) for h, l in zip(hi, lo))
        mean = tuple(l + p * (S - 1) / 2 for l, p in zip(lo, per))
        rows += [(f"{method} real step, k = 0 (no sampling step)", lo), (f"{method} real step, k = {S - 1}", hi),
                 ("  one sampling step (CFG, 2B rows, no grad)", per),
                 (f"{method} real step, mean over k ~ U(0..{S - 1})", mean)]
    (base_wall, base_cpu) = ms["plain"]
    print(f"\n{'step':<46} {'wall ms':>9} {'x plain':>8} {'CPU ms':>9} {'x plain':>8}")
    for label, (wall, cpu) in rows:
        print(f"{label:<46} {wall:9.1f} {wall / base_wall:7.2f}x {cpu:9.1f} {cpu / base_cpu:7.2f}x")


if __name__ == "__main__":
    main()
