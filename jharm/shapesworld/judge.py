"""The ShapesWorld judge: a small CNN that names shape, colour and background.

Its penultimate features are the embedding of the "FD-judge" Fréchet distance
(``judge_features`` + ``frechet_distance``), the ShapesWorld analogue of FID.
``judge_task`` trains it through the one train loop (``jharm/train/loop.py``).
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jharm.shapesworld import data, render
from jharm.shapesworld.world import world_config
from jharm.train.task import Task

HEADS = {"shape": render.SHAPES, "colour": render.COLOUR_NAMES, "background": render.BACKGROUNDS}


class JudgeNet(nn.Module):
    """Conv stages (two 3x3 convs + GroupNorm + SiLU each, 2x average pooling
    between stages), then the flattened last feature map -> a ``features``-wide
    SiLU layer (the embedding) -> one linear head per label. Input: NHWC images
    in [0, 1]. (Flattening rather than global pooling: the shape head learns
    several times faster.)"""

    channels: Sequence[int] = (8, 16, 32)
    features: int = 128
    groups: int = 8

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        x = images * 2.0 - 1.0
        for i, ch in enumerate(self.channels):
            if i:
                x = nn.avg_pool(x, (2, 2), strides=(2, 2))
            for j in range(2):
                x = nn.Conv(ch, (3, 3), name=f"stages_{i}_conv_{j}")(x)
                x = nn.silu(nn.GroupNorm(num_groups=min(self.groups, ch), name=f"stages_{i}_norm_{j}")(x))
        features = nn.silu(nn.Dense(self.features, name="embed")(x.reshape(x.shape[0], -1)))
        out = {"features": features}
        for head, names in HEADS.items():
            out[head] = nn.Dense(len(names), name=f"{head}_head")(features)
        return out


def _module(config=None) -> JudgeNet:
    config = judge_task_config() if config is None else config
    return JudgeNet(channels=tuple(config.channels), features=config.features)


def judge_task_config() -> ml_collections.ConfigDict:
    """The ``config.task`` section of a judge training run (see ``configs/shapesworld_judge.py``)."""
    c = ml_collections.ConfigDict()
    c.name = "shapesworld_judge"  # registered in jharm.train.tasks
    c.channels = (8, 16, 32)
    c.features = 128
    c.data_seed = 0
    c.world = world_config()
    return c


def judge_apply(params, images, config=None) -> dict[str, jax.Array]:
    """Logits per head (``shape``, ``colour``, ``background``) and ``features``."""
    return _module(config).apply({"params": params}, jnp.asarray(images, jnp.float32))


@functools.lru_cache(maxsize=8)
def _jitted_apply(channels: tuple[int, ...], features: int):
    module = JudgeNet(channels=channels, features=features)
    return jax.jit(lambda params, images: module.apply({"params": params}, images))


def _at_resolution(images: np.ndarray, resolution: int) -> np.ndarray:
    """Images at the judge's resolution: an integer multiple is box-downsampled
    (what the renderer's supersampling does), anything else is an error."""
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"expected a non-empty NHWC batch of images, found shape {images.shape}")
    h, w = images.shape[1:3]
    if h != w or h % resolution:
        raise ValueError(f"the judge reads {resolution}x{resolution} images (or square multiples), "
                         f"found {h}x{w}")
    return images if h == resolution else data.downsample(images, h // resolution)


def _batched(params, images, config, batch_size: int, key: str | None) -> dict[str, np.ndarray]:
    """Apply in fixed-size chunks (the last one padded) so that one compile serves all."""
    config = judge_task_config() if config is None else config
    apply = _jitted_apply(tuple(config.channels), int(config.features))
    images = _at_resolution(np.asarray(images, np.float32), int(config.world.resolution))
    outs = []
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        pad = batch_size - len(chunk) if len(images) > batch_size else 0
        out = apply(params, np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)]))
        outs.append({k: np.asarray(v)[:len(chunk)] for k, v in out.items() if key in (None, k)})
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def judge_features(params, images: np.ndarray, config=None, batch_size: int = 256) -> np.ndarray:
    """Penultimate features (N, features) of images in [0, 1]: the FD-judge embedding."""
    return _batched(params, images, config, batch_size, "features")["features"]


def judge_predict(params, images: np.ndarray, config=None, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Predicted ids per head: ``{"shape": (N,), "colour": (N,), "background": (N,)}``."""
    out = _batched(params, images, config, batch_size, None)
    return {head: out[head].argmax(axis=-1).astype(np.int32) for head in HEADS}


def judge_loss(params, batch, config=None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Sum of the heads' softmax cross-entropies; metrics: per-head loss and accuracy."""
    out = judge_apply(params, batch["image"], config)
    total, metrics = 0.0, {}
    for head in HEADS:
        labels = batch[head]
        ce = optax.softmax_cross_entropy_with_integer_labels(out[head], labels).mean()
        total = total + ce
        metrics[f"{head}_loss"] = ce
        metrics[f"{head}_acc"] = (out[head].argmax(-1) == labels).mean()
    return total, metrics


def judge_task(config: ml_collections.ConfigDict) -> Task:
    """The judge as a train-loop Task: batches are ``data.judge_batch(data_seed, step, ...)``.

    Reads ``config.task`` (see ``judge_task_config``) and ``config.train.batch_size``.
    """
    tc = config.task
    module = _module(tc)
    world, seed, batch_size = tc.world, int(tc.data_seed), int(config.train.batch_size)

    def init_params(rng):
        return module.init(rng, jnp.zeros((1, world.resolution, world.resolution, 3), jnp.float32))["params"]

    def loss_fn(params, frozen, batch, rng):
        del frozen, rng  # deterministic given the batch; nothing frozen
        return judge_loss(params, batch, tc)

    def make_batch(step):
        return data.judge_batch(seed, step, batch_size, world)

    return Task(name="shapesworld_judge", init_params=init_params, loss_fn=loss_fn, make_batch=make_batch)


# --- Fréchet distance ----------------------------------------------------------

def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (ddof=1, as FID implementations use) of (N, D) features."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), found shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance_from_stats(mu_a, sigma_a, mu_b, sigma_b) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), the FID formula.

    tr((S_a S_b)^(1/2)) is computed as the sum of square roots of the
    eigenvalues of the symmetric PSD matrix S_a^(1/2) S_b S_a^(1/2) (which has
    the same eigenvalues as S_a S_b): real by construction, no complex
    ``sqrtm`` round-off to discard, and stable for singular covariances.
    """
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    sigma_a, sigma_b = np.atleast_2d(sigma_a).astype(np.float64), np.atleast_2d(sigma_b).astype(np.float64)
    if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape or sigma_a.shape != mu_a.shape * 2:
        raise ValueError(f"mismatched statistics: means {mu_a.shape} vs {mu_b.shape}, "
                         f"covariances {sigma_a.shape} vs {sigma_b.shape}")
    w, v = np.linalg.eigh((sigma_a + sigma_a.T) / 2)
    root_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = root_a @ sigma_b @ root_a
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    # Eigenvalues within round-off of zero (singular covariances, N < D) are
    # zero: their square roots would add noise of order sqrt(eps).
    eig[eig < eig.max(initial=0.0) * len(eig) * np.finfo(np.float64).eps] = 0.0
    tr_cross = np.sqrt(eig).sum()
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * tr_cross)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets."""
    feats_a, feats_b = np.asarray(feats_a), np.asarray(feats_b)
    if feats_a.ndim != 2 or feats_b.ndim != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with the same D, found {feats_a.shape} and {feats_b.shape}")
    return frechet_distance_from_stats(*gaussian_stats(feats_a), *gaussian_stats(feats_b))
