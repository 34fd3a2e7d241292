"""``jharm shapesworld build``: retrain every ShapesWorld model from scratch and write the assets.

Stages, each through the one train loop (``jharm.train.loop.train``) with its
``configs/shapesworld_*.py`` config: judge -> tiny CLIP (+ tokenizer) -> tiny
T2I UNet (frozen CLIP) -> tiny IP-Adapter (frozen T2I + CLIP). After every
stage the weights and the manifest entry (task config, train settings, seed,
sha256) are written to the output folder, which the next stage loads from;
then the report measures the gates and stores the metrics in the manifest.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

from jharm.shapesworld import assets

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
STAGES = ("judge", "clip", "t2i", "ip_adapter")
_CONFIG_FILES = {"judge": "shapesworld_judge.py", "clip": "shapesworld_clip.py", "t2i": "shapesworld_t2i.py",
                 "ip_adapter": "shapesworld_ip.py"}


def default_host_devices() -> int:
    """XLA host devices for a CPU build: 2 where there are 2 or more cores, else 1 (measured on 2
    cores, ``jharm.runtime.set_host_devices``: the T2I stage 1556 s instead of about 1800 s)."""
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def stage_config(stage: str, seed: int, steps: int | None = None, overrides=()):
    """The train config of a stage: its configs/ file, the build seed, optional step count."""
    from jharm import config as config_lib

    config = config_lib.get(os.path.join(CONFIG_DIR, _CONFIG_FILES[stage]), list(overrides))
    config.train.seed = seed
    config.task.data_seed = config.task.data_seed + 10 * seed  # each stage keeps its own data stream
    if steps is not None:
        config.train.steps = steps
        config.train.ckpt_every = min(config.train.ckpt_every, steps)
    config.train.export = False
    return config


def _entry(config, file: str, seconds: float, **extra) -> dict:
    return {"file": file, "task": json.loads(config.task.to_json_best_effort()),
            "train": json.loads(config.train.to_json_best_effort()),
            "optim": json.loads(config.optim.to_json_best_effort()), "train_seconds": round(seconds, 1), **extra}


class BuildStopped(RuntimeError):
    """A stage's training was stopped (SIGTERM) before its last step; nothing of it was written."""


def _train(config, workdir: str):
    from jharm.train.loop import gather_to_host, train
    from jharm.train.tasks import make_task

    start = time.time()
    result = train(config, make_task(config), workdir)
    # With train.ema_decay > 0 the EMA weights are the asset (what diffusion models ship).
    params = result.params if result.ema_params is None else result.ema_params
    return gather_to_host(params), time.time() - start, result


def build(out_dir: str | None = None, *, seed: int = 0, workdir: str = "runs/shapesworld_build",
          stages=STAGES, steps: dict | None = None, report: bool = True) -> dict:
    """Train ``stages`` in order into ``out_dir`` (default: the package's assets folder).

    ``steps`` optionally overrides the step count per stage (quick smoke builds).
    Returns the manifest. A workdir already holding checkpoints resumes them, so
    use a fresh ``workdir`` for a from-scratch build.
    """
    out_dir = out_dir or assets.DEFAULT_DIR
    os.makedirs(out_dir, exist_ok=True)
    steps = steps or {}
    begin = time.time()
    for stage in stages:
        if stage not in STAGES:
            raise ValueError(f"unknown ShapesWorld build stage {stage!r}; known: {STAGES}")
        config = stage_config(stage, seed, steps.get(stage), _stage_overrides(stage, out_dir))
        params, seconds, result = _train(config, os.path.join(workdir, stage))
        if result.preempted:  # the checkpoint is saved; half-trained weights must not become assets
            raise BuildStopped(f"stage {stage} stopped by SIGTERM at step {result.step} of {config.train.steps} "
                               f"(checkpoint in {os.path.join(workdir, stage)}); nothing of it was written to "
                               f"{out_dir}; rerun the same command to resume")
        final_loss = float(result.metrics.get("loss", float("nan")))
        if stage == "ip_adapter":
            _save_ip(config, params, out_dir)
            files = ["ip_adapter.safetensors"]
        else:
            assets.save_params(out_dir, f"{stage}.safetensors", params)
            files = [f"{stage}.safetensors"]
        extra = {"final_loss": final_loss, "weights": "ema" if result.ema_params is not None else "final"}
        if stage == "clip":
            from jharm.shapesworld.vocab import shapesworld_tokenizer

            shapesworld_tokenizer().save_pretrained(os.path.join(out_dir, "tokenizer"))
            files += list(assets.TOKENIZER_FILES)
        if stage == "t2i":
            clip = assets.load_clip(out_dir)
            extra.update(cross_attention_dim=clip.text_config.hidden_size,
                         guidance_scale=float(config.task.guidance_scale),
                         guidance_interval=assets.interval_of(config.task.get("guidance_interval")))
        assets.record(out_dir, stage, files, _entry(config, files[0], seconds, **extra), seed=seed)
        print(f"jharm shapesworld build: {stage} done in {seconds:.0f} s, final loss {final_loss:.4g}", flush=True)
    manifest = assets.record(out_dir, "_build", [], _build_entry(out_dir, list(stages), time.time() - begin))
    if report:
        from jharm.shapesworld.report import report as run_report

        run_report(out_dir, write=True)
        manifest = assets.read_manifest(out_dir)
    return manifest


def _build_entry(out_dir: str, stages: list[str], seconds: float) -> dict:
    """The manifest's ``_build`` record: one invocation per ``build`` call. A build of every stage
    starts the history afresh; a stage-by-stage build appends, so the time of each stage the
    assets came from stays on record (the build-time gate is read off these)."""
    import datetime
    import platform

    import jax

    invocation = {"date": datetime.date.today().isoformat(), "seconds": round(seconds, 1), "stages": stages,
                  "machine": f"{platform.machine()}, {os.cpu_count()} CPUs visible",
                  "devices": f"{jax.device_count()} x {jax.devices()[0].platform}"}
    previous = {}
    if set(stages) != set(STAGES) and os.path.isfile(os.path.join(out_dir, "manifest.json")):
        previous = assets.read_manifest(out_dir).get("models", {}).get("_build", {})
    earlier = previous.get("invocations")
    if earlier is None and "seconds" in previous:  # a single-invocation record
        earlier = [{"seconds": previous["seconds"], "stages": previous.get("stages", [])}]
    entry = {k: v for k, v in previous.items() if k not in ("seconds", "stages", "invocations")}
    entry["invocations"] = list(earlier or []) + [invocation]
    return entry


def _stage_overrides(stage: str, out_dir: str) -> list[str]:
    if stage == "t2i":
        return [f"--config.task.clip_dir={out_dir}"]
    if stage == "ip_adapter":
        return [f"--config.task.clip_dir={out_dir}", f"--config.task.t2i_dir={out_dir}"]
    return []


def _save_ip(config, params, out_dir: str) -> None:
    from jharm.models.ip_adapter import ImageProjModel, IPAdapter

    t2i = assets.load_t2i(out_dir)
    ucfg = dataclasses.replace(t2i.unet_config, ip_adapter_tokens=int(config.task.num_tokens))
    proj = ImageProjModel(ucfg.cross_attention_dim, int(config.task.num_tokens))
    IPAdapter.from_unet(ucfg, params["unet"], proj, {"params": params["image_proj"]}).save(
        os.path.join(out_dir, "ip_adapter.safetensors"))
