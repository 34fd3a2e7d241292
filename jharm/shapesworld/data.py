"""Deterministic ShapesWorld batches: pure functions of (seed, step).

These are what a ``Task.make_batch(step)`` closes over (see
``jharm/train/task.py``): the same (seed, step, stream) always gives the same
arrays, so a resumed run sees the batches an uninterrupted one would. Each kind
of batch draws from its own stream, so judge and caption batches of the same
seed are independent. Images are float32 NHWC in [0, 1].
"""
from __future__ import annotations

import zlib

import numpy as np

from jharm.diffusion.corruptions import pool_downsample as downsample  # noqa: F401 (re-export)
from jharm.diffusion.corruptions import upsample_nearest
from jharm.shapesworld import captions, render
from jharm.shapesworld.world import geometry, world_config


def batch_rng(seed: int, step: int, stream: str) -> np.random.Generator:
    """The generator for one batch: a function of (seed, step, stream name) only."""
    if int(step) < 0 or int(seed) < 0:
        raise ValueError(f"seed and step must be >= 0, found seed={seed}, step={step}")
    return np.random.default_rng([int(seed), int(step), zlib.crc32(stream.encode())])


def _render(scenes: render.Scenes, config) -> np.ndarray:
    return render.render(scenes, config.resolution, config.supersample)


def _labels(scenes: render.Scenes) -> dict[str, np.ndarray]:
    return {k: v.astype(np.int32) for k, v in scenes.labels().items()}


def judge_batch(seed: int, step: int, batch_size: int, config=None) -> dict[str, np.ndarray]:
    """Uniformly drawn scenes: ``image`` (B, H, W, 3) and ``shape``/``colour``/``background`` ids."""
    config = world_config() if config is None else config
    scenes = render.sample_scenes(batch_rng(seed, step, "judge"), batch_size, **geometry(config))
    return {"image": _render(scenes, config), **_labels(scenes)}


def caption_batch(seed: int, step: int, batch_size: int, config=None) -> dict[str, np.ndarray]:
    """Captioned scenes (with the colour bias): ``image``, ``caption`` (str array), labels.

    ``colour_named`` says whether the caption names the colour (else it
    followed the bias). Captions are strings: a task tokenizes them before the
    batch reaches the device.
    """
    config = world_config() if config is None else config
    scenes, texts = captions.sample_captioned(batch_rng(seed, step, "caption"), batch_size, config)
    named = np.array([any(w in text.split() for w in _colour_words()) for text in texts], bool)
    return {"image": _render(scenes, config), "caption": np.array(texts, dtype=np.str_),
            "colour_named": named, **_labels(scenes)}


def _colour_words() -> frozenset[str]:
    return frozenset(w for forms in captions.COLOUR_FORMS.values() for w in forms)


def world_renders(seed: int, n: int, config=None, shape=None, resolution: int | None = None) -> np.ndarray:
    """N renders drawn from ``seed`` with a world config's geometry (``shape``: as
    ``render.sample_scenes`` takes it), at the world's resolution unless given."""
    config = world_config() if config is None else config
    images, _ = render.render_batch(seed, n, shape=shape, resolution=int(resolution or config.resolution),
                                    supersample=int(config.supersample), **geometry(config))
    return images


def pair_batch(seed: int, step: int, batch_size: int, config=None, factor: int = 4) -> dict[str, np.ndarray]:
    """Low-/high-resolution pairs for the image-to-image bridge.

    ``x0``: the clean (B, H, W, 3) image; ``lowres``: its factor x factor
    average pooling (B, H/f, W/f, 3); ``x1``: ``lowres`` upsampled back to
    (B, H, W, 3) by nearest neighbour, the degraded input a bridge starts from.
    Plus the scene labels.
    """
    config = world_config() if config is None else config
    scenes = render.sample_scenes(batch_rng(seed, step, "pair"), batch_size, **geometry(config))
    x0 = _render(scenes, config)
    lowres = downsample(x0, factor).astype(np.float32)
    return {"x0": x0, "x1": upsample_nearest(lowres, factor), "lowres": lowres, **_labels(scenes)}
