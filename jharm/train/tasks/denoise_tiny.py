"""Example task "denoise_tiny": DDPM epsilon training of a tiny model on
synthetic images, small enough to run on a laptop CPU.

``config.task.model`` picks the network: "tiny" (a conv + self-attention
model with diffusers-style names) or "unet" (jharm's SD
``UNet2DConditionModel`` at a tiny size, conditioned on a random context).
It exercises everything the engine offers (conv kernels, attention
projections, a schedule, per-step batches) and is what
``configs/train_tiny.py`` and the engine tests train. All randomness (images,
noise, timesteps) is drawn in ``make_batch`` from the step number, so the loss
is a deterministic function of (params, batch): gradient accumulation then
equals the full batch, and a resumed run sees the same numbers.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jharm.config import ConfigError
from jharm.diffusion.schedules import add_noise, diffusion_loss, make_schedule
from jharm.train.task import Task


def timestep_features(t: jax.Array, dim: int) -> jax.Array:
    """Sinusoidal features of integer timesteps, (B,) -> (B, dim)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class TimeEmbedding(nn.Module):
    dim: int

    @nn.compact
    def __call__(self, t):
        h = nn.Dense(self.dim, name="linear_1")(timestep_features(t, self.dim))
        return nn.Dense(self.dim, name="linear_2")(nn.silu(h))


class ResBlock(nn.Module):
    channels: int

    @nn.compact
    def __call__(self, x, temb):
        h = nn.Conv(self.channels, (3, 3), padding=1, name="conv1")(nn.silu(nn.GroupNorm(8, name="norm1")(x)))
        h = h + nn.Dense(self.channels, name="time_emb_proj")(nn.silu(temb))[:, None, None, :]
        h = nn.Conv(self.channels, (3, 3), padding=1, name="conv2")(nn.silu(nn.GroupNorm(8, name="norm2")(h)))
        return x + h


class SelfAttention(nn.Module):
    heads: int

    @nn.compact
    def __call__(self, x):
        b, hgt, wid, c = x.shape
        tokens = nn.GroupNorm(8, name="group_norm")(x).reshape(b, hgt * wid, c)
        split = lambda y: y.reshape(b, hgt * wid, self.heads, c // self.heads)  # noqa: E731
        q, k, v = (split(nn.Dense(c, use_bias=False, name=n)(tokens)) for n in ("to_q", "to_k", "to_v"))
        out = jax.nn.dot_product_attention(q, k, v).reshape(b, hgt * wid, c)
        return x + nn.Dense(c, name="to_out_0")(out).reshape(b, hgt, wid, c)


class TinyDenoiser(nn.Module):
    """conv_in -> ResBlock -> self-attention -> ResBlock -> conv_out, time-conditioned."""

    width: int = 32
    heads: int = 2
    out_channels: int = 3

    @nn.compact
    def __call__(self, x, t):
        temb = TimeEmbedding(self.width * 2, name="time_embedding")(t)
        h = nn.Conv(self.width, (3, 3), padding=1, name="conv_in")(x)
        h = ResBlock(self.width, name="resnets_0")(h, temb)
        h = SelfAttention(self.heads, name="attentions_0")(h)
        h = ResBlock(self.width, name="resnets_1")(h, temb)
        h = nn.silu(nn.GroupNorm(8, name="conv_norm_out")(h))
        return nn.Conv(self.out_channels, (3, 3), padding=1, name="conv_out")(h)


def synthetic_images(rng: np.random.Generator, n: int, size: int, channels: int) -> np.ndarray:
    """Smooth random images in [-1, 1]: a sum of two random plane waves per channel."""
    grid = np.linspace(0.0, 2 * np.pi, size, dtype=np.float32)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    freq = rng.uniform(0.5, 3.0, size=(n, 2, channels, 2)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=(n, 2, channels)).astype(np.float32)
    waves = np.sin(freq[..., 0, None, None] * yy + freq[..., 1, None, None] * xx + phase[..., None, None])
    return (0.5 * waves.sum(axis=1)).transpose(0, 2, 3, 1).astype(np.float32)


def default_task_config() -> ml_collections.ConfigDict:
    """``config.task`` for this task."""
    return ml_collections.ConfigDict(dict(name="denoise_tiny", model="tiny", image_size=16, channels=3, width=32,
                                          heads=2, context_len=4, num_train_timesteps=1000, beta_schedule="linear",
                                          prediction_type="epsilon", data_seed=0))


def tiny_unet(channels: int, width: int, heads: int):
    """SD's UNet2DConditionModel with two levels (cross-attention in both) at ``width``/``2*width``."""
    from jharm.models.unet import UNet2DConditionModel, UNetConfig

    return UNet2DConditionModel(UNetConfig(
        sample_size=None, in_channels=channels, out_channels=channels, block_out_channels=(width, 2 * width),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1, norm_num_groups=8, cross_attention_dim=width, attention_head_dim=width // heads))


def make_task(config: ml_collections.ConfigDict) -> Task:
    """Factory registered as "denoise_tiny"."""
    tc = config.task
    if tc.model not in ("tiny", "unet"):
        raise ConfigError(f"config.task.model: {tc.model!r} is not 'tiny' or 'unet'")
    unet = tc.model == "unet"
    model = (tiny_unet(tc.channels, tc.width, tc.heads) if unet
             else TinyDenoiser(width=tc.width, heads=tc.heads, out_channels=tc.channels))

    def predict(params, x_t, t, context):
        return model.apply(params, x_t, t, context) if unet else model.apply(params, x_t, t)

    beta_start, beta_end = (0.0001, 0.02) if tc.beta_schedule == "linear" else (0.00085, 0.012)
    schedule = make_schedule(tc.beta_schedule, tc.num_train_timesteps, beta_start, beta_end,
                             prediction_type=tc.prediction_type)
    size, channels, batch_size = tc.image_size, tc.channels, config.train.batch_size

    def init_params(rng):
        x, t = jnp.zeros((1, size, size, channels), jnp.float32), jnp.zeros((1,), jnp.int32)
        return model.init(rng, x, t, jnp.zeros((1, tc.context_len, tc.width))) if unet else model.init(rng, x, t)

    def make_batch(step):
        rng = np.random.default_rng([tc.data_seed, step])
        return {"x0": synthetic_images(rng, batch_size, size, channels),
                "noise": rng.standard_normal((batch_size, size, size, channels)).astype(np.float32),
                "t": rng.integers(0, tc.num_train_timesteps, size=(batch_size,)).astype(np.int32),
                "context": rng.standard_normal((batch_size, tc.context_len, tc.width)).astype(np.float32)}

    def loss_fn(params, frozen, batch, rng):
        del frozen, rng  # the batch carries all randomness
        x_t = add_noise(schedule, batch["x0"], batch["noise"], batch["t"])
        pred = predict(params, x_t, batch["t"], batch["context"])
        loss = diffusion_loss(schedule, pred, batch["x0"], batch["noise"], batch["t"])
        return loss, {"mse": loss}

    return Task(name="denoise_tiny", init_params=init_params, loss_fn=loss_fn, make_batch=make_batch)
