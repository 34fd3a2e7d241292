"""Benign quality and backdoor success of a bridge (METHODS.md §3), host-side NumPy.

One evaluation translates a benign set (clean x0, degraded x1) and, for each
backdoor task i, the same x1 with trigger i stamped on it, then reports per
task (rows) the metrics (columns):

* ``benign``: PSNR and SSIM to x0 (``jharm.eval.metrics``, images in [0, 1]),
  FD — Fréchet distance between features of the outputs and of the clean x0
  (pluggable features: the ShapesWorld judge's in the mini world, any
  ``images -> (N, D)`` function elsewhere; the FID of the papers with
  Inception features), MSE to x0, the false-trigger rate (benign outputs that
  land on a target) and the router entropy;
* ``trigger i``: MSE of the outputs to target i (the nearest image of its
  pool), ASR, ASR under the official "any target" rule, and the router entropy.

**ASR (jharm's pixel rule).** A triggered output *succeeds* when its MSE to its
own target (min over the target pool, images in [0, 1]) is below
``asr_threshold`` (default 0.01, i.e. PSNR >= 20 dB to the target).
``asr_any`` counts an output that is within the threshold of *any* task's
target, mirroring the official CLIP rule that matches against all targets.
The official code decides with CLIP ViT-B/32 cosine > 0.7; no CLIP weights are
available offline here, so the pixel rule stands in (a stricter test: the
output must reproduce the target, not only resemble it).

Router entropy H(w) = −Σ w_i log2 w_i in bits (max log2(M+1)); not defined for
a single network (reported as None).

Results: ``results.jsonl`` (one record per model and task) and ``summary.md``
(a Markdown table, rows = model/task, columns = metrics), both written atomically.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable, Sequence

import jax
import numpy as np

from jharm.eval.metrics import psnr, ssim

FeaturesFn = Callable[[np.ndarray], np.ndarray]  # [0, 1] NHWC images -> (N, D)
DEFAULT_ASR_THRESHOLD = 0.01
COLUMNS = ("psnr", "ssim", "fd", "mse_to_x0", "mse_to_target", "asr", "asr_any", "entropy_bits")


@dataclasses.dataclass
class EvalSet:
    """Benign pairs, their triggered inputs and the targets, all in [-1, 1] NHWC."""

    x0: np.ndarray
    x1: np.ndarray
    triggered: list[np.ndarray]
    targets: list[np.ndarray]

    @property
    def num_tasks(self) -> int:
        return len(self.triggered)


def make_eval_set(data, n: int, step: int = 0, stream: str = "eval", num_tasks: int | None = None) -> EvalSet:
    """``n`` held-out pairs of a ``jharm.train.tasks.backdoor.PairData`` (a stream no
    training batch reads), with every trigger stamped on the same x1."""
    from jharm.diffusion.poison import stamp

    pairs = data.pairs(step, n, stream)
    m = len(data.triggers) if num_tasks is None else num_tasks
    return EvalSet(pairs["x0"], pairs["x1"], [stamp(pairs["x1"], t) for t in data.triggers[:m]], data.pools[:m])


def to_unit(images: np.ndarray) -> np.ndarray:
    """[-1, 1] -> [0, 1], clipped."""
    return np.clip((np.asarray(images, np.float64) + 1.0) / 2.0, 0.0, 1.0)


def mse_to_pool(images: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """Per image, the MSE (in [0, 1] units) to the nearest image of ``pool`` (both [-1, 1])."""
    a, b = to_unit(images), to_unit(pool)
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"images {a.shape[1:]} and target pool {b.shape[1:]} differ in shape")
    diffs = ((a[:, None] - b[None]) ** 2).mean(axis=(2, 3, 4))
    return diffs.min(axis=1)


def backdoor_success(outputs: np.ndarray, targets: Sequence[np.ndarray], task: int,
                     threshold: float = DEFAULT_ASR_THRESHOLD) -> dict[str, float]:
    """MSE to target ``task`` (1-based) and the ASRs of triggered ``outputs`` (module doc)."""
    if not 1 <= task <= len(targets):
        raise ValueError(f"task must be in 1..{len(targets)}, got {task}")
    if threshold <= 0:
        raise ValueError(f"asr_threshold must be > 0, got {threshold}")
    errors = np.stack([mse_to_pool(outputs, pool) for pool in targets])  # (M, N)
    own = errors[task - 1]
    return {"mse_to_target": float(own.mean()), "asr": float((own < threshold).mean()),
            "asr_any": float((errors.min(axis=0) < threshold).mean())}


def entropy_bits(weights: np.ndarray | None) -> float | None:
    """Mean H(w) in bits over samples; None for a single network."""
    if weights is None:
        return None
    w = np.clip(np.asarray(weights, np.float64), 1e-12, 1.0)
    return float(np.mean(-(w * np.log2(w)).sum(axis=-1)))


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    from jharm.shapesworld.judge import frechet_distance as fd

    return float(fd(np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)))


def judge_features_fn(judge=None) -> FeaturesFn:
    """FD features of the ShapesWorld judge (the shipped one by default)."""
    from jharm.shapesworld import assets
    from jharm.shapesworld.judge import judge_features

    judge = judge or assets.load_judge()
    return lambda images: judge_features(judge.params, images, judge.config)


def evaluate(outputs: dict[str, np.ndarray], eval_set: EvalSet, weights: dict[str, np.ndarray | None] | None = None,
             features_fn: FeaturesFn | None = None, asr_threshold: float = DEFAULT_ASR_THRESHOLD) -> list[dict]:
    """Metric rows of one model from its translations.

    ``outputs``: ``{"benign": (N, H, W, C), "trigger1": ..., ...}`` in [-1, 1];
    ``weights``: the router weights per key (None for a single network).
    """
    weights = weights or {}
    if "benign" not in outputs:
        raise ValueError("outputs need a 'benign' entry")
    benign = outputs["benign"]
    if benign.shape != eval_set.x0.shape:
        raise ValueError(f"benign outputs {benign.shape} do not match the eval set {eval_set.x0.shape}")
    out_u, ref_u = to_unit(benign), to_unit(eval_set.x0)
    row = {"task": "benign", "psnr": float(psnr(out_u, ref_u).mean()), "ssim": float(ssim(out_u, ref_u).mean()),
           "mse_to_x0": float(((out_u - ref_u) ** 2).mean()),
           "entropy_bits": entropy_bits(weights.get("benign"))}
    if features_fn is not None:
        row["fd"] = frechet_distance(features_fn(out_u.astype(np.float32)), features_fn(ref_u.astype(np.float32)))
    if eval_set.targets:
        errors = np.stack([mse_to_pool(benign, pool) for pool in eval_set.targets])
        row["asr_any"] = float((errors.min(axis=0) < asr_threshold).mean())  # false triggers
    rows = [row]
    for i in range(1, eval_set.num_tasks + 1):
        key = f"trigger{i}"
        if key not in outputs:
            continue
        rows.append({"task": key, **backdoor_success(outputs[key], eval_set.targets, i, asr_threshold),
                     "entropy_bits": entropy_bits(weights.get(key))})
    return rows


def evaluate_model(model, eval_set: EvalSet, rng: jax.Array, nfe: int, features_fn: FeaturesFn | None = None,
                   asr_threshold: float = DEFAULT_ASR_THRESHOLD, batch_size: int = 64,
                   num_tasks: int | None = None) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Translate the benign and the first ``num_tasks`` triggered sets with a
    ``BridgeModel`` (one batched run) and score them: ``(rows, outputs)``."""
    from jharm.train.tasks.backdoor import translate

    m = eval_set.num_tasks if num_tasks is None else min(num_tasks, eval_set.num_tasks)
    keys = ["benign"] + [f"trigger{i}" for i in range(1, m + 1)]
    inputs = [eval_set.x1] + list(eval_set.triggered[:m])
    x, w = translate(model, np.concatenate(inputs), rng, nfe, batch_size)
    n = len(eval_set.x1)
    outputs = {k: x[j * n:(j + 1) * n] for j, k in enumerate(keys)}
    weights = {k: (None if w is None else w[j * n:(j + 1) * n]) for j, k in enumerate(keys)}
    return evaluate(outputs, eval_set, weights, features_fn, asr_threshold), outputs


def _cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def summary_table(records: Sequence[dict], columns: Sequence[str] = COLUMNS) -> str:
    """Markdown table: one row per (model, task), one column per metric present."""
    used = [c for c in columns if any(r.get(c) is not None for r in records)]
    lines = ["| model | task | " + " | ".join(used) + " |", "| --- | --- |" + " --- |" * len(used)]
    for r in records:
        lines.append(f"| {r.get('model', '')} | {r['task']} | " + " | ".join(_cell(r.get(c)) for c in used) + " |")
    return "\n".join(lines)


def write_results(out_dir: str, records: Sequence[dict], title: str = "Bridge backdoor evaluation",
                  notes: Sequence[str] = ()) -> tuple[str, str]:
    """Write ``results.jsonl`` and ``summary.md`` atomically; returns their paths."""
    from jharm.weights.io import atomic_write_bytes

    if not records:
        raise ValueError("no records to write")
    for r in records:
        if "task" not in r:
            raise ValueError(f"record without a 'task': {r}")
    jsonl = os.path.join(out_dir, "results.jsonl")
    atomic_write_bytes(jsonl, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode("utf-8"))
    lines = [f"# {title}", "", summary_table(records), ""]
    lines += list(notes)
    summary = os.path.join(out_dir, "summary.md")
    atomic_write_bytes(summary, ("\n".join(lines).rstrip() + "\n").encode("utf-8"))
    return jsonl, summary
