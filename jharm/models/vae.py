"""Stable Diffusion's VAE (diffusers AutoencoderKL) in Flax linen, NHWC.

``encode(x) -> (mean, logvar)`` (the diagonal Gaussian posterior, logvar
clipped to [-30, 20] as diffusers does) and ``decode(z)``; latents for the UNet
are ``scaling_factor * sample`` (``config.scaling_factor``). Param names follow
diffusers (``encoder/down_blocks_0/resnets_0/conv1``,
``encoder/mid_block/attentions_0/to_q``, ``quant_conv``, ...).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jharm.models.layers import Downsample2D, ResnetBlock2D, Upsample2D, conv, dot_product_attention, group_norm
from jharm.weights.convert import default_key_fn

KEY_FN = default_key_fn(("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers", "to_out"))

_NEUTRAL = {"act_fn": ("silu",), "shift_factor": (None,), "latents_mean": (None,), "latents_std": (None,),
            "mid_block_add_attention": (True,)}
_IGNORED = {"force_upcast"}  # a float16 hint for diffusers; jharm's compute dtype is configured explicitly


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL architecture; field names are diffusers' config.json ones."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        n = len(self.block_out_channels)
        problems = []
        if any(t != "DownEncoderBlock2D" for t in self.down_block_types) or len(self.down_block_types) != n:
            problems.append(f"down_block_types must be {n} x DownEncoderBlock2D (got {list(self.down_block_types)})")
        if any(t != "UpDecoderBlock2D" for t in self.up_block_types) or len(self.up_block_types) != n:
            problems.append(f"up_block_types must be {n} x UpDecoderBlock2D (got {list(self.up_block_types)})")
        if problems:
            raise ValueError("VAEConfig: " + "; ".join(problems))

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any], **overrides) -> "VAEConfig":
        """Build from a diffusers AutoencoderKL ``config.json`` dict; unsupported options raise."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs, unsupported, unknown = {}, [], []
        for key, value in config.items():
            if key.startswith("_") or key in _IGNORED:
                continue
            if key in _NEUTRAL:
                if value not in _NEUTRAL[key]:
                    unsupported.append(f"{key}={value!r} (supported: {list(_NEUTRAL[key])})")
            elif key in fields:
                kwargs[key] = value
            else:
                unknown.append(key)
        if unsupported:
            raise ValueError("AutoencoderKL config uses options jharm does not implement: " + ", ".join(unsupported))
        if unknown:
            warnings.warn(f"AutoencoderKL config: ignoring unknown keys {unknown}", stacklevel=2)
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_diffusers_config(self) -> dict:
        out = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0", "act_fn": "silu"}
        for f in dataclasses.fields(self):
            if f.name != "dtype":
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


class SpatialSelfAttention(nn.Module):
    """The VAE mid-block attention: GroupNorm, one head over all pixels, residual."""

    groups: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        t = group_norm(self.groups, 1e-6, self.dtype, "group_norm")(x).reshape(b, h * w, c)
        dense = lambda name: nn.Dense(c, dtype=self.dtype, name=name)  # noqa: E731
        out = dot_product_attention(dense("to_q")(t), dense("to_k")(t), dense("to_v")(t), heads=1)
        return dense("to_out_0")(out).reshape(b, h, w, c) + x


class MidBlock2D(nn.Module):
    """resnet -> attention -> resnet (no time embedding)."""

    channels: int
    groups: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        x = ResnetBlock2D(self.channels, self.groups, 1e-6, dtype=self.dtype, name="resnets_0")(x)
        x = SpatialSelfAttention(self.groups, self.dtype, name="attentions_0")(x)
        return ResnetBlock2D(self.channels, self.groups, 1e-6, dtype=self.dtype, name="resnets_1")(x)


class Encoder(nn.Module):
    config: VAEConfig

    @nn.compact
    def __call__(self, x):
        c, dtype = self.config, jnp.dtype(self.config.dtype)
        h = conv(c.block_out_channels[0], 3, dtype, name="conv_in")(x)
        for i, ch in enumerate(c.block_out_channels):
            block = _Block(ch, c.layers_per_block, c.norm_num_groups, i < len(c.block_out_channels) - 1, dtype,
                           name=f"down_blocks_{i}")
            h = block(h, down=True)
        h = MidBlock2D(c.block_out_channels[-1], c.norm_num_groups, dtype, name="mid_block")(h)
        h = nn.silu(group_norm(c.norm_num_groups, 1e-6, dtype, "conv_norm_out")(h))
        return conv(2 * c.latent_channels, 3, dtype, name="conv_out")(h)


class Decoder(nn.Module):
    config: VAEConfig

    @nn.compact
    def __call__(self, z):
        c, dtype = self.config, jnp.dtype(self.config.dtype)
        channels = tuple(reversed(c.block_out_channels))
        h = conv(channels[0], 3, dtype, name="conv_in")(z)
        h = MidBlock2D(channels[0], c.norm_num_groups, dtype, name="mid_block")(h)
        for i, ch in enumerate(channels):
            block = _Block(ch, c.layers_per_block + 1, c.norm_num_groups, i < len(channels) - 1, dtype,
                           name=f"up_blocks_{i}")
            h = block(h, down=False)
        h = nn.silu(group_norm(c.norm_num_groups, 1e-6, dtype, "conv_norm_out")(h))
        return conv(c.out_channels, 3, dtype, name="conv_out")(h)


class _Block(nn.Module):
    """DownEncoderBlock2D / UpDecoderBlock2D: resnets, then a resampler unless final."""

    channels: int
    num_layers: int
    groups: int
    resample: bool
    dtype: Any

    @nn.compact
    def __call__(self, h, down: bool):
        for j in range(self.num_layers):
            h = ResnetBlock2D(self.channels, self.groups, 1e-6, dtype=self.dtype, name=f"resnets_{j}")(h)
        if self.resample and down:
            h = Downsample2D(self.channels, padding=0, dtype=self.dtype, name="downsamplers_0")(h)
        elif self.resample:
            h = Upsample2D(self.channels, self.dtype, name="upsamplers_0")(h)
        return h


class AutoencoderKL(nn.Module):
    """SD VAE. ``apply(params, x, method=AutoencoderKL.encode)`` -> (mean, logvar);
    ``apply(params, z, method=AutoencoderKL.decode)`` -> image; ``__call__`` is
    encode + decode of the posterior mean (or a sample given ``rng``)."""

    config: VAEConfig

    def setup(self):
        c, dtype = self.config, jnp.dtype(self.config.dtype)
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quant_conv = conv(2 * c.latent_channels, 1, dtype) if c.use_quant_conv else None
        self.post_quant_conv = conv(c.latent_channels, 1, dtype) if c.use_post_quant_conv else None

    def encode(self, x):
        """(B, H, W, in_channels) images in [-1, 1] -> (mean, logvar) of the latent posterior."""
        moments = self.encoder(x.astype(jnp.dtype(self.config.dtype)))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z):
        """(B, h, w, latent_channels) unscaled latents -> (B, H, W, out_channels) images."""
        z = z.astype(jnp.dtype(self.config.dtype))
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x, rng=None):
        mean, logvar = self.encode(x)
        z = mean if rng is None else sample_posterior(rng, mean, logvar)
        return self.decode(z)


def sample_posterior(rng, mean, logvar):
    """z = mean + exp(logvar / 2) · ε, ε ~ N(0, I) from ``rng``."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
