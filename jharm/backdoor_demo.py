"""ShapesWorld backdoor scorecard (``jharm demo backdoor``): 4x super-resolution
(8x8 -> 32x32) bridges, with M = 1, 2, 3 backdoor tasks (gray corner triggers
on x1 -> fixed ShapesWorld targets), all trained through the one train loop:

* clean I2SB (``i2sb``; EMA);
* MixBridge ``divide`` (M_max + 1 experts, each starting from the clean I2SB:
  expert 0 on clean pairs, expert i on task i), then per M a ``router``
  classifier and a ``merge`` of the first M+1 experts with WRS; for M_max also
  a merge without WRS;
* the single poisoned model (``mixbridge`` phase ``single``: one ADM from the
  clean I2SB on clean + all poisoned pairs).

Every model translates the same held-out set: benign x1 and x1 with each
trigger. Metrics (``jharm.eval.backdoor``): PSNR/SSIM/FD-judge/MSE (benign),
MSE to target and ASR per trigger, router entropy. Writes ``results.jsonl``,
``summary.md``, one PNG grid per model (rows: clean x0, benign input, output,
then per trigger: triggered input, output, target) and ``report.md`` with the
issue's gates checked on the measured numbers.

Measured: 27 min 14 s on the shared 2-core CPU container (docs/backdoor.md has the
numbers; the MixBridge-with-WRS gates are not met at this budget).

XLA's persistent compilation cache is switched on for the run (in
``<out>/xla_cache``, restored afterwards): the merges with and without WRS
compile to one program, and a second run reuses every compiled step.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import time

import jax
import numpy as np

DEMO = dict(
    image_size=32, trigger_size=6, num_tasks=(1, 2, 3), batch_size=8,
    # Adam restarted at 2e-3 on a trained bridge wrecks it in a few steps (measured: benign PSNR 26 -> 12-19 dB),
    # so the stages that start from trained weights use smaller rates.
    lr=2e-3, divide_lr=1e-3, finetune_lr=5e-4,
    i2sb_steps=600, divide_steps=120, router_steps=120, merge_steps=120, single_steps=300,
    ema_decay=0.99, eval_n=32, nfe=10, asr_threshold=0.01, experts_mode="loop", grid_n=8, seed=0,
    adm=dict(model_channels=16, channel_mult=(1, 2, 2), norm_groups=8, num_res_blocks=1),
    router=dict(widths=(16, 32, 64), norm_groups=8),
)
# Plumbing-sized settings (tests): a 16x16 world, one backdoor, a few steps.
TINY = dict(DEMO, image_size=16, trigger_size=3, num_tasks=(1,), batch_size=4, i2sb_steps=4, divide_steps=3,
            router_steps=3, merge_steps=3, single_steps=3, ema_decay=0.5, eval_n=4, nfe=2, experts_mode="vmap",
            grid_n=4, adm=dict(model_channels=8, channel_mult=(1,), norm_groups=4, num_res_blocks=1),
            router=dict(widths=(4, 8), norm_groups=4))


@contextlib.contextmanager
def xla_cache(path: str | None):
    """Use XLA's persistent compilation cache in ``path`` inside the block (None: leave as is)."""
    if not path:
        yield
        return
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    previous = {n: getattr(jax.config, n) for n in names}
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    cc.reset_cache()
    try:
        yield
    finally:
        for name, value in previous.items():
            jax.config.update(name, value)
        cc.reset_cache()


def demo_config(d: dict, name: str, phase: str, steps: int, num_tasks: int, ema: float = 0.0,
                lr: float | None = None, **task):
    """An engine config for one demo stage (ShapesWorld, ``d``'s sizes; ``lr`` default ``d["lr"]``)."""
    from jharm.train.defaults import base_config
    from jharm.train.tasks.backdoor import default_task_config

    c = base_config()
    c.train.update(steps=steps, batch_size=d["batch_size"], log_every=max(1, steps // 10), ckpt_every=10 * steps,
                   async_checkpoint=False, ema_decay=ema, seed=d["seed"])
    c.optim.update(name="adam", lr=d["lr"] if lr is None else lr, clip_norm=0.0)
    c.task = default_task_config(name, phase)
    t = c.task
    t.data.update(image_size=d["image_size"], data_seed=d["seed"])
    t.world.resolution = d["image_size"]
    t.adm.update(d["adm"])
    t.router.update(d["router"])
    t.backdoor.update(num_tasks=num_tasks, trigger_size=d["trigger_size"])
    t.sample.nfe = d["nfe"]
    t.experts_mode = d["experts_mode"]
    t.update(task)
    return c


def grid(rows: list[np.ndarray], n: int) -> np.ndarray:
    """Rows of [-1, 1] images (each (N, H, W, C)) -> one uint8 image, ``n`` columns, 2 px gaps
    (short rows end in blank cells): the erase demo's tiling, one row per list entry."""
    from jharm.erase_demo import grid as tile

    h, w, c = rows[0].shape[1:]
    cells = [np.concatenate([np.clip((r[:n] + 1) / 2, 0, 1), np.ones((n - len(r[:n]), h, w, c), np.float32)])
             for r in rows]
    return tile(np.concatenate(cells), cols=n)


def _nearest_target(outputs: np.ndarray, pool: np.ndarray) -> np.ndarray:
    from jharm.diffusion.poison import nearest_targets

    return pool[nearest_targets(outputs, pool)]


def backdoor_scorecard(out_dir: str, seed: int = 0, settings: dict | None = None) -> str:
    """``jharm demo backdoor``: train and score the six model kinds; returns the report path."""
    d = dict(DEMO if settings is None else settings, seed=seed)
    os.makedirs(out_dir, exist_ok=True)
    with xla_cache(os.path.join(out_dir, "xla_cache")):
        return _scorecard(out_dir, d)


def _scorecard(out_dir: str, d: dict) -> str:
    from PIL import Image

    from jharm.eval import backdoor as ev
    from jharm.shapesworld import assets
    from jharm.train.loop import train
    from jharm.train.tasks import make_task
    from jharm.train.tasks.backdoor import EXPORT_NAME, PairData, model_from_params
    from jharm.weights.io import atomic_write_bytes

    start = time.time()
    timings, losses = {}, {}
    m_max = max(d["num_tasks"])

    def run(tag, config):
        t0 = time.time()
        result = train(config, make_task(config), os.path.join(out_dir, tag))
        timings[tag] = time.time() - t0
        losses[tag] = result.losses
        params = result.ema_params if result.ema_params is not None else result.params
        return jax.device_get(params), os.path.join(out_dir, tag, EXPORT_NAME)

    models = {}
    clean_params, clean_file = run("i2sb", demo_config(d, "i2sb", "merge", d["i2sb_steps"], 0, d["ema_decay"]))
    clean_cfg = demo_config(d, "i2sb", "merge", 1, 0)
    models["clean I2SB"] = (model_from_params(clean_cfg.task, clean_params, "clean"), m_max, clean_cfg)
    _, divide_file = run("divide", demo_config(d, "mixbridge", "divide", d["divide_steps"], m_max, lr=d["divide_lr"],
                                               init_path=clean_file))
    for m in d["num_tasks"]:
        _, router_file = run(f"router_m{m}", demo_config(d, "mixbridge", "router", d["router_steps"], m))
        variants = [("", 1.0)] + ([(" w/o WRS", 0.0)] if m == m_max else [])
        for suffix, wrs in variants:
            tag = f"merge_m{m}" + ("_nowrs" if not wrs else "")
            cfg = demo_config(d, "mixbridge", "merge", d["merge_steps"], m, lr=d["finetune_lr"],
                              experts_path=divide_file, router_path=router_file, wrs_weight=wrs)
            params, _ = run(tag, cfg)
            models[f"MixBridge M={m}{suffix}"] = (model_from_params(cfg.task, params, tag), m, cfg)
    single_cfg = demo_config(d, "mixbridge", "single", d["single_steps"], m_max, d["ema_decay"], lr=d["finetune_lr"],
                             init_path=clean_file)
    single_params, _ = run("single", single_cfg)
    models[f"single model M={m_max}"] = (model_from_params(single_cfg.task, single_params, "single"), m_max,
                                         single_cfg)

    # Evaluation on one held-out set (its own stream) with every trigger.
    data = PairData(demo_config(d, "mixbridge", "merge", 1, m_max).task)
    eval_set = ev.make_eval_set(data, d["eval_n"], step=0, stream="eval")
    judge = assets.load_judge()  # it reads multiples of its own resolution (box-downsampled)
    features = ev.judge_features_fn(judge) if d["image_size"] % judge.config.world.resolution == 0 else None
    records, rng = [], jax.random.key(d["seed"] + 1)
    for name, (model, m, _) in models.items():
        t0 = time.time()
        rows, outputs = ev.evaluate_model(model, eval_set, rng, d["nfe"], features, d["asr_threshold"],
                                          num_tasks=m)
        timings[f"eval {name}"] = time.time() - t0
        records += [dict(r, model=name) for r in rows]
        n = d["grid_n"]
        rows_img = [eval_set.x0, eval_set.x1, outputs["benign"]]
        for i in range(1, m + 1):
            rows_img += [eval_set.triggered[i - 1], outputs[f"trigger{i}"],
                         _nearest_target(outputs[f"trigger{i}"], eval_set.targets[i - 1])]
        path = os.path.join(out_dir, "grid_" + name.replace(" ", "_").replace("/", "").replace("=", "") + ".png")
        buffer = io.BytesIO()
        Image.fromarray(grid(rows_img, n)).save(buffer, format="PNG")
        atomic_write_bytes(path, buffer.getvalue())
    timings["total"] = time.time() - start
    return _report(out_dir, d, records, timings, losses, m_max)


def _get(records, model, task, key):
    for r in records:
        if r["model"] == model and r["task"] == task:
            return r.get(key)
    return None


def _report(out_dir, d, records, timings, losses, m_max) -> str:
    from jharm.eval import backdoor as ev
    from jharm.weights.io import atomic_write_bytes, atomic_write_json

    clean_psnr = _get(records, "clean I2SB", "benign", "psnr")
    lines = ["## Gates (issue 8), on the measured numbers", ""]
    ok = clean_psnr >= 25.0
    lines.append(f"- clean I2SB PSNR >= 25 dB on 4x SR: {clean_psnr:.2f} dB — {'PASS' if ok else 'FAIL'}")
    for m in d["num_tasks"]:
        name = f"MixBridge M={m}"
        asrs = [_get(records, name, f"trigger{i}", "asr") for i in range(1, m + 1)]
        psnr = _get(records, name, "benign", "psnr")
        ents = [_get(records, name, f"trigger{i}", "entropy_bits") for i in range(1, m + 1)]
        bound = 0.9 * math.log2(m + 1)
        lines.append(f"- {name}: ASR per trigger {', '.join(f'{a:.2f}' for a in asrs)} (>= 0.90: "
                     f"{'PASS' if min(asrs) >= 0.9 else 'FAIL'}); benign PSNR {psnr:.2f} dB vs clean "
                     f"{clean_psnr:.2f} (within 1 dB: {'PASS' if psnr >= clean_psnr - 1.0 else 'FAIL'}); "
                     f"triggered-input router entropy {', '.join(f'{e:.3f}' for e in ents)} bits "
                     f"(>= 0.9·log2(M+1) = {bound:.3f}: {'PASS' if min(ents) >= bound else 'FAIL'})")
    with_wrs = [_get(records, f"MixBridge M={m_max}", f"trigger{i}", "entropy_bits") for i in range(1, m_max + 1)]
    without = [_get(records, f"MixBridge M={m_max} w/o WRS", f"trigger{i}", "entropy_bits")
               for i in range(1, m_max + 1)]
    lower = max(without) < 0.5 * min(with_wrs)
    lines.append(f"- WRS vs w/o WRS (M={m_max}) triggered-input entropy: {np.mean(with_wrs):.3f} vs "
                 f"{np.mean(without):.3f} bits (w/o WRS below half of WRS on every trigger: "
                 f"{'PASS' if lower else 'FAIL'})")
    mix, single = f"MixBridge M={m_max}", f"single model M={m_max}"
    mix_asr = np.mean([_get(records, mix, f"trigger{i}", "asr") for i in range(1, m_max + 1)])
    single_asr = np.mean([_get(records, single, f"trigger{i}", "asr") for i in range(1, m_max + 1)])
    line = (f"- MixBridge vs single model (M={m_max}): mean ASR {mix_asr:.2f} vs {single_asr:.2f} "
            f"({'MixBridge higher' if mix_asr > single_asr else 'MixBridge NOT higher'})")
    mix_fd, single_fd = _get(records, mix, "benign", "fd"), _get(records, single, "benign", "fd")
    if mix_fd is not None and single_fd is not None:
        line += (f"; benign FD-judge {mix_fd:.2f} vs {single_fd:.2f} "
                 f"({'MixBridge lower (better)' if mix_fd < single_fd else 'MixBridge NOT lower'})")
    lines.append(line + ".")
    notes = lines + [
        "", "## Settings and time", "",
        f"Settings: `{ {k: v for k, v in d.items()} }`", "",
        "Wall time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), "",
        "ASR: a triggered output succeeds when its MSE to its own target (images in [0, 1]) is below "
        f"{d['asr_threshold']} (PSNR >= {-10 * math.log10(d['asr_threshold']):.0f} dB to the target); "
        "`asr_any` accepts any task's target (the official rule's analogue); on the benign row it is the "
        "false-trigger rate. Entropy in bits (max log2(M+1)). FD: Fréchet distance of ShapesWorld judge "
        "features of the outputs vs the clean x0.",
        "", "Grids: `grid_<model>.png`, rows: clean x0, benign input, output, then per trigger: triggered input, "
        "output, the target.",
    ]
    _, summary = ev.write_results(out_dir, records, "ShapesWorld backdoor scorecard (4x SR, 8x8 -> 32x32)"
                                  if d["image_size"] == 32 else "Backdoor scorecard (plumbing size)", notes)
    atomic_write_json(os.path.join(out_dir, "train_losses.json"), losses)
    with open(summary, encoding="utf-8") as f:
        text = f.read()
    report = os.path.join(out_dir, "report.md")
    atomic_write_bytes(report, text.encode("utf-8"))
    print(text)
    return report
