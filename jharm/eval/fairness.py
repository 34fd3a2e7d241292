"""Fairness metrics (METHODS.md §2, jharm definitions), NumPy on the host.

Attribute frequencies come from a classifier: CLIP zero-shot
(:func:`zero_shot_labels`) for real models, the ShapesWorld judge in the mini
world. Bias-O (``jharm.eval.metrics.bias_o``) compares them with uniform;
:func:`target_gap` with a non-uniform target. Bias-Q is the spread of the CLIP
score across attributes; CLIP-T / CLIP-I are x100 cosine scores; FID reuses the
project's one Fréchet distance. Per-prompt records go to JSONL, the summary is
mean ± std over prompts (and seeds).
"""
from __future__ import annotations

import json
from typing import Iterable, Mapping, Sequence

import numpy as np

from jharm.eval.metrics import attribute_frequencies, bias_o
from jharm.shapesworld.judge import frechet_distance
from jharm.weights.io import atomic_write_bytes

__all__ = ["attribute_frequencies", "bias_o", "bias_q", "clip_t", "clip_i", "zero_shot_labels", "target_gap",
           "fid", "inception_score", "summarize", "write_jsonl", "summary_table"]


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def zero_shot_labels(image_emb: np.ndarray, attribute_text_emb: np.ndarray) -> np.ndarray:
    """Attribute id per image: argmax cosine between (N, D) image and (A, D) attribute-prompt embeddings."""
    image_emb, attribute_text_emb = np.asarray(image_emb), np.asarray(attribute_text_emb)
    if image_emb.ndim != 2 or attribute_text_emb.ndim != 2 or image_emb.shape[1] != attribute_text_emb.shape[1]:
        raise ValueError(f"expected (N, D) image and (A, D) text embeddings, found {image_emb.shape} and "
                         f"{attribute_text_emb.shape}")
    return np.argmax(_unit(image_emb) @ _unit(attribute_text_emb).T, axis=-1).astype(np.int32)


def clip_t(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """Per-image CLIP score 100·max(cos(image, its prompt), 0); text_emb (N, D) or one (D,) prompt."""
    return 100.0 * np.maximum(np.sum(_unit(image_emb) * _unit(text_emb), axis=-1), 0.0)


def clip_i(emb_a: np.ndarray, emb_b: np.ndarray) -> np.ndarray:
    """Per-pair 100·cos between images from the same noise (debiased vs original model)."""
    if np.shape(emb_a) != np.shape(emb_b):
        raise ValueError(f"CLIP-I pairs images from the same noise: shapes differ, {np.shape(emb_a)} vs {np.shape(emb_b)}")
    return 100.0 * np.sum(_unit(emb_a) * _unit(emb_b), axis=-1)


def bias_q(scores: np.ndarray) -> float:
    """Bias-Q: std over attributes of the CLIP score of "prompt with a_i" images, mean over prompts.

    ``scores``: (P, A) mean CLIP-T (x100) per prompt and attribute.
    """
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"Bias-Q needs (prompts, attributes >= 2) scores, found shape {scores.shape}")
    return float(scores.std(axis=1).mean())


def target_gap(frequencies: np.ndarray, target: Sequence[float]) -> float:
    """Largest |f_i − π_i| in points (x100): how far a prompt lands from a (non-uniform) target."""
    f, t = np.asarray(frequencies, np.float64), np.asarray(target, np.float64)
    if f.shape[-1] != t.shape[-1]:
        raise ValueError(f"{f.shape[-1]} frequencies vs a target over {t.shape[-1]} attributes")
    return float(100.0 * np.abs(f - t).max())


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance of two (N, D) feature sets (Inception features for FID, judge features for FD-judge)."""
    return frechet_distance(features_a, features_b)


def inception_score(probs: np.ndarray) -> float:
    """exp(E_x KL(p(y|x) || p(y))) of (N, classes) classifier probabilities."""
    p = np.clip(np.asarray(probs, np.float64), 1e-12, 1.0)
    if p.ndim != 2:
        raise ValueError(f"expected (N, classes) probabilities, found shape {p.shape}")
    marginal = p.mean(axis=0, keepdims=True)
    return float(np.exp(np.mean(np.sum(p * (np.log(p) - np.log(marginal)), axis=1))))


def summarize(records: Iterable[Mapping], keys: Sequence[str]) -> dict[str, dict[str, float]]:
    """{key: {"mean", "std", "n"}} over the records that have the key (population std)."""
    records = list(records)
    out = {}
    for key in keys:
        values = np.asarray([float(r[key]) for r in records if key in r and r[key] is not None], np.float64)
        if values.size:
            out[key] = {"mean": float(values.mean()), "std": float(values.std()), "n": int(values.size)}
    return out


def summary_table(rows: Mapping[str, Mapping[str, Mapping[str, float]]], keys: Sequence[str]) -> str:
    """Markdown table, one row per method: ``mean ± std`` of each key."""
    lines = ["| method | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]
    for name, summary in rows.items():
        cells = [f"{summary[k]['mean']:.3f} ± {summary[k]['std']:.3f}" if k in summary else "—" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_jsonl(path: str, records: Iterable[Mapping]) -> str:
    """One JSON object per line, written atomically."""
    text = "".join(json.dumps(dict(r), sort_keys=True, default=_jsonable) + "\n" for r in records)
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
