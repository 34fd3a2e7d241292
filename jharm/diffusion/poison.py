"""Backdoor poisoning of bridge training pairs for M heterogeneous tasks (MixBridge), host-side NumPy.

A poisoned sample of task i (1..M) keeps its *corrupted* input x1 with
trigger i stamped on it (after the corruption, as the official code), and
replaces its clean x0 by target i: the image of target pool i nearest in pixel
L2 to the clean x0. Task 0 is the clean pair. Every sample independently is
task i with probability ``rates[i-1]`` and clean otherwise; draws come from
one seeded NumPy generator, so a batch is a pure function of (inputs, seed).

The official triggers are gray squares (value 0 in [-1, 1]) in one corner
per task, in the order bottom-right, top-right, top-left (then bottom-left).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jharm.diffusion.corruptions import corrupt

CORNERS = ("bottom-right", "top-right", "top-left", "bottom-left")


@dataclasses.dataclass(frozen=True)
class Trigger:
    """A trigger: ``pattern`` (h, w, C or 1) blended in where ``mask`` (h, w, 1) is 1.

    ``corner`` places it: one of :data:`CORNERS`, or a ``(top, left)`` offset in pixels.
    """

    pattern: np.ndarray
    mask: np.ndarray
    corner: str | tuple[int, int] = "bottom-right"

    def __post_init__(self):
        pattern, mask = np.asarray(self.pattern, np.float32), np.asarray(self.mask, np.float32)
        if pattern.ndim == 2:
            pattern = pattern[..., None]
        if mask.ndim == 2:
            mask = mask[..., None]
        if pattern.ndim != 3 or mask.shape != pattern.shape[:2] + (1,):
            raise ValueError(f"trigger pattern {pattern.shape} and mask {mask.shape} must be (h, w, C) and (h, w, 1)")
        if isinstance(self.corner, str) and self.corner not in CORNERS:
            raise ValueError(f"unknown trigger corner {self.corner!r}; expected one of {CORNERS} or (top, left)")
        object.__setattr__(self, "pattern", pattern)
        object.__setattr__(self, "mask", mask)

    def offset(self, height: int, width: int) -> tuple[int, int]:
        """(top, left) of the trigger in an image of this size; errors if it does not fit."""
        h, w = self.mask.shape[:2]
        if isinstance(self.corner, str):
            top = 0 if self.corner.startswith("top") else height - h
            left = 0 if self.corner.endswith("left") else width - w
        else:
            top, left = (int(v) for v in self.corner)
        if h > height or w > width or top < 0 or left < 0 or top + h > height or left + w > width:
            raise ValueError(f"trigger of {h}x{w} at (top, left) = ({top}, {left}) does not fit in a "
                             f"{height}x{width} image (trigger larger than the image or placed outside it)")
        return top, left


def gray_square(size: int, corner: str | tuple[int, int] = "bottom-right", value: float = 0.0) -> Trigger:
    """The official trigger: a ``size`` x ``size`` square of ``value`` (0 = mid-gray in [-1, 1])."""
    if size < 1:
        raise ValueError(f"trigger size must be >= 1, got {size}")
    return Trigger(np.full((size, size, 1), value, np.float32), np.ones((size, size, 1), np.float32), corner)


def corner_triggers(num_tasks: int, size: int, value: float = 0.0) -> list[Trigger]:
    """``num_tasks`` gray squares, one corner per task in the official order."""
    if not 1 <= num_tasks <= len(CORNERS):
        raise ValueError(f"corner triggers support 1..{len(CORNERS)} tasks, got {num_tasks}")
    return [gray_square(size, corner, value) for corner in CORNERS[:num_tasks]]


def stamp(x1: np.ndarray, trigger: Trigger) -> np.ndarray:
    """x1 (B, H, W, C) with the trigger blended in: x·(1 - m) + pattern·m inside its box."""
    x1 = np.array(x1, np.float32)  # a copy: the caller's batch is not modified
    top, left = trigger.offset(x1.shape[1], x1.shape[2])
    h, w = trigger.mask.shape[:2]
    if trigger.pattern.shape[-1] not in (1, x1.shape[-1]):
        raise ValueError(f"trigger has {trigger.pattern.shape[-1]} channels, images have {x1.shape[-1]}")
    box = x1[:, top:top + h, left:left + w]
    x1[:, top:top + h, left:left + w] = box * (1 - trigger.mask) + trigger.pattern * trigger.mask
    return x1


def nearest_targets(x0: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """Index into ``pool`` (P, H, W, C) of the image nearest in pixel L2 to each x0 (B, H, W, C)."""
    x0, pool = np.asarray(x0, np.float64), np.asarray(pool, np.float64)
    if pool.ndim != 4 or pool.shape[1:] != x0.shape[1:]:
        raise ValueError(f"target pool images {pool.shape[1:]} must match the images {x0.shape[1:]}")
    size = int(np.prod(x0.shape[1:]))
    a, b = x0.reshape(len(x0), size), pool.reshape(len(pool), size)
    dist = (a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :]
    return np.argmin(dist, axis=1)


def _check_rates(rates: Sequence[float]) -> np.ndarray:
    rates = np.asarray(rates, np.float64)
    if rates.ndim != 1 or np.any(rates < 0) or np.any(rates > 1):
        raise ValueError(f"poison rates must be a list of probabilities in [0, 1], got {rates.tolist()}")
    if rates.sum() > 1 + 1e-9:
        raise ValueError(f"poison rates sum to {rates.sum():.4g} > 1 (the clean rate is 1 - sum): {rates.tolist()}")
    return rates


def poison(x0: np.ndarray, x1: np.ndarray, triggers: Sequence[Trigger], target_pools: Sequence[np.ndarray],
           rates: Sequence[float], rng: np.random.Generator | int) -> dict[str, np.ndarray]:
    """Poison a batch of (x0 clean, x1 corrupted) pairs for M = len(triggers) backdoor tasks.

    Returns ``{"x0", "x1", "task"}``: ``task`` (B,) int32 with 0 = clean and
    i = backdoor task i (trigger ``triggers[i-1]``, target pool
    ``target_pools[i-1]``). ``rng``: a seed or a NumPy Generator.
    """
    x0, x1 = np.asarray(x0, np.float32), np.asarray(x1, np.float32)
    if x0.shape != x1.shape or x0.ndim != 4:
        raise ValueError(f"x0 {x0.shape} and x1 {x1.shape} must be NHWC batches of the same shape")
    if not len(triggers) == len(target_pools) == len(rates):
        raise ValueError(f"need one trigger, target pool and rate per task: got {len(triggers)} triggers, "
                         f"{len(target_pools)} pools, {len(rates)} rates")
    rates = _check_rates(rates)
    for trigger in triggers:  # check every trigger fits before drawing anything
        trigger.offset(x0.shape[1], x0.shape[2])
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    probs = np.concatenate([[max(0.0, 1 - rates.sum())], rates])
    task = rng.choice(len(probs), size=len(x0), p=probs / probs.sum()).astype(np.int32)
    x0_out, x1_out = x0.copy(), x1.copy()
    for i, (trigger, pool) in enumerate(zip(triggers, target_pools), start=1):
        pool = np.asarray(pool, np.float32)
        picks = np.flatnonzero(task == i)
        # validate the pool even when no sample drew this task, so errors do not depend on the seed
        nearest = nearest_targets(x0[picks], pool)
        x0_out[picks] = pool[nearest]
        x1_out[picks] = stamp(x1[picks], trigger)
    return {"x0": x0_out, "x1": x1_out, "task": task}


def poisoned_pairs(corruption: str, x0: np.ndarray, triggers: Sequence[Trigger], target_pools: Sequence[np.ndarray],
                   rates: Sequence[float], rng: np.random.Generator | int) -> dict[str, np.ndarray]:
    """Corrupt clean images by I2SB corruption ``corruption``, then :func:`poison` the pairs.

    Adds ``"mask"`` for inpainting corruptions. One generator drives both steps.
    """
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    x1, mask = corrupt(corruption, x0, rng)
    out = poison(x0, x1, triggers, target_pools, rates, rng)
    if mask is not None:
        out["mask"] = mask
    return out
