"""The guided-diffusion (ADM) UNet as I2SB uses it (Dhariwal & Nichol 2021), NHWC.

Parameter names mirror the PyTorch state dict of guided-diffusion's
``UNetModel``: a ``TimestepEmbedSequential`` entry ``input_blocks[i][j]`` is
the Flax module ``input_blocks_<i>_<j>`` (likewise ``output_blocks``,
``middle_block_<j>``), and ``nn.Sequential`` children keep their index
(``in_layers_0`` is the GroupNorm, ``in_layers_2`` the conv). The converter in
``jharm.weights.adm`` maps them mechanically.

Porting details that matter for parity: GroupNorm(32, eps=1e-5) computed in
float32; the timestep embedding is concat[cos, sin]; the legacy attention
splits heads *after* the qkv projection (channel ``h·3d + {q,k,v}·d``) and
``use_new_attention_order`` splits q/k/v first; qkv/proj_out are 1x1 conv1d
(rank-3 kernels). The whole network is a pure function of
``(params, x, t[, x1])`` (see :func:`adm_apply_fn`), so MixBridge can stack
several experts' params and ``vmap`` it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jharm.models.layers import (PointwiseConv, conv, dot_product_attention, group_norm, resize_nearest,
                                 timestep_embedding)

Dtype = Any
_GROUPS, _EPS = 32, 1e-5


@dataclasses.dataclass(frozen=True)
class ADMConfig:
    """guided-diffusion ``create_model`` arguments; defaults = the 256² ImageNet ADM in I2SB.

    ``attention_resolutions`` are feature-map resolutions in pixels (as the
    ``"32,16,8"`` string of guided-diffusion's ``create_model``), not the
    downsample factors ``UNetModel`` takes; :attr:`attention_ds` gives those.
    ``cond_x1`` concatenates the degraded image x1 (``in_channels`` more
    channels) to the input, as I2SB's conditional network. ``learn_sigma``
    doubles the output channels (the original ADM checkpoint; I2SB drops them).
    """

    image_size: int = 256
    in_channels: int = 3
    model_channels: int = 256
    out_channels: int = 3
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    dropout: float = 0.0
    channel_mult: tuple[float, ...] = (1, 1, 2, 2, 4, 4)
    conv_resample: bool = True
    num_heads: int = 4
    num_head_channels: int = 64
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    use_new_attention_order: bool = False
    learn_sigma: bool = False
    cond_x1: bool = False
    use_checkpoint: bool = False  # jax.checkpoint (remat) on res/attention blocks
    norm_groups: int = 32  # GroupNorm groups (guided-diffusion: 32); CPU-sized configs may use fewer

    def __post_init__(self):
        object.__setattr__(self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions))
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        for res in self.attention_resolutions:
            if res <= 0 or self.image_size % res:
                raise ValueError(f"attention resolution {res} does not divide image_size {self.image_size}")
        if self.norm_groups < 1:
            raise ValueError(f"norm_groups must be >= 1, got {self.norm_groups}")
        if self.num_head_channels == -1 and self.num_heads < 1:
            raise ValueError("need num_heads >= 1 or num_head_channels > 0")

    @property
    def attention_ds(self) -> tuple[int, ...]:
        """Downsample factors at which attention blocks are placed."""
        return tuple(self.image_size // r for r in self.attention_resolutions)

    @property
    def input_channels(self) -> int:
        return self.in_channels * (2 if self.cond_x1 else 1)

    @property
    def output_channels(self) -> int:
        return self.out_channels * (2 if self.learn_sigma else 1)


def _norm(name: str, groups: int = _GROUPS):
    # Statistics in float32 (GroupNorm32); _normed casts back to the compute dtype.
    return group_norm(groups, _EPS, jnp.float32, name=name)


def _normed(module, x, dtype):
    return module(x.astype(jnp.float32)).astype(dtype)


def _downsample(x):
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


def _upsample(x):
    return resize_nearest(x, (2 * x.shape[1], 2 * x.shape[2]))


class ResBlock(nn.Module):
    """guided-diffusion ResBlock (optionally the up/down-sampling variant)."""

    out_channels: int
    use_scale_shift_norm: bool
    dropout: float = 0.0
    up: bool = False
    down: bool = False
    dtype: Dtype = jnp.float32
    groups: int = _GROUPS

    @nn.compact
    def __call__(self, x, emb, deterministic: bool = True):
        h = nn.silu(_normed(_norm("in_layers_0", self.groups), x, self.dtype))
        # up/down variant: resample between the activation and the conv, both paths.
        if self.up:
            h, x = _upsample(h), _upsample(x)
        elif self.down:
            h, x = _downsample(h), _downsample(x)
        h = conv(self.out_channels, 3, self.dtype, name="in_layers_2")(h)
        emb_width = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
        emb_out = nn.Dense(emb_width, dtype=self.dtype, name="emb_layers_1")(nn.silu(emb))[:, None, None, :]
        out_norm = _norm("out_layers_0", self.groups)
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = _normed(out_norm, h, self.dtype) * (1 + scale) + shift
        else:
            h = _normed(out_norm, h + emb_out, self.dtype)
        h = nn.Dropout(self.dropout)(nn.silu(h), deterministic=deterministic)
        h = conv(self.out_channels, 3, self.dtype, name="out_layers_3")(h)
        if x.shape[-1] != self.out_channels:
            x = PointwiseConv(self.out_channels, self.dtype, name="skip_connection")(x)
        return x + h


class AttentionBlock(nn.Module):
    """Self-attention over all positions; ``legacy`` splits heads before q/k/v."""

    num_heads: int
    legacy: bool = True
    dtype: Dtype = jnp.float32
    groups: int = _GROUPS

    @nn.compact
    def __call__(self, x):
        b, height, width, c = x.shape
        tokens = x.reshape(b, height * width, c)
        h = _normed(_norm("norm", self.groups), tokens, self.dtype)
        qkv = PointwiseConv(3 * c, dtype=self.dtype, name="qkv")(h)
        d = c // self.num_heads
        # legacy: channel = head·3d + part·d; new order: part·c + head·d.
        shape = (b, height * width, self.num_heads, 3, d) if self.legacy else (b, height * width, 3, self.num_heads, d)
        qkv = qkv.reshape(shape)
        parts = [qkv[:, :, :, i] if self.legacy else qkv[:, :, i] for i in range(3)]
        q, k, v = (p.reshape(b, height * width, c) for p in parts)
        # Scaling q and k each by d^-1/4 (as the reference) equals scaling the logits by d^-1/2.
        h = dot_product_attention(q, k, v, self.num_heads)
        h = PointwiseConv(c, dtype=self.dtype, name="proj_out")(h)
        return (tokens + h).reshape(b, height, width, c)


class Downsample(nn.Module):
    channels: int
    use_conv: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.use_conv:
            return conv(self.channels, 3, self.dtype, stride=2, padding=((1, 1), (1, 1)), name="op")(x)
        return _downsample(x)


class Upsample(nn.Module):
    channels: int
    use_conv: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = _upsample(x)
        return conv(self.channels, 3, self.dtype, name="conv")(x) if self.use_conv else x


def _heads(channels: int, num_heads: int, num_head_channels: int) -> int:
    if num_head_channels == -1:
        return num_heads
    if channels % num_head_channels:
        raise ValueError(f"attention channels {channels} not divisible by num_head_channels {num_head_channels}")
    return channels // num_head_channels


class ADMUNet(nn.Module):
    """guided-diffusion ``UNetModel`` (no class conditioning), NHWC.

    ``__call__(x, timesteps, x1=None)``: ``x`` (B, H, W, in_channels),
    ``timesteps`` (B,) float (I2SB passes ``noise_levels[n]``), ``x1`` the
    degraded image when ``config.cond_x1``. Returns (B, H, W, output_channels).
    """

    config: ADMConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, timesteps, x1=None, deterministic: bool = True):
        cfg = self.config
        if cfg.cond_x1:
            if x1 is None or x1.shape != x.shape:
                raise ValueError(f"cond_x1 model needs x1 shaped like x {x.shape}, got {None if x1 is None else x1.shape}")
            x = jnp.concatenate([x, x1], axis=-1)
        elif x1 is not None:
            raise ValueError("x1 given but the config has cond_x1=False")
        if x.shape[-1] != cfg.input_channels:
            raise ValueError(f"expected {cfg.input_channels} input channels, got {x.shape[-1]}")
        res_cls = nn.remat(ResBlock, static_argnums=(3,)) if cfg.use_checkpoint else ResBlock
        attn_cls = nn.remat(AttentionBlock) if cfg.use_checkpoint else AttentionBlock
        dt, g = self.dtype, cfg.norm_groups

        def res(name, out, **kw):
            return lambda h, e: res_cls(out, cfg.use_scale_shift_norm, cfg.dropout, dtype=dt, groups=g, name=name,
                                        **kw)(h, e, deterministic)

        def attn(name, ch, heads):
            return attn_cls(_heads(ch, heads, cfg.num_head_channels), not cfg.use_new_attention_order, dt, g, name=name)

        mc = cfg.model_channels
        emb = timestep_embedding(timesteps, mc, flip_sin_to_cos=True, freq_shift=0)
        emb = nn.Dense(4 * mc, dtype=dt, name="time_embed_0")(emb)
        emb = nn.Dense(4 * mc, dtype=dt, name="time_embed_2")(nn.silu(emb))

        ch = int(cfg.channel_mult[0] * mc)
        h = conv(ch, 3, dt, name="input_blocks_0_0")(x.astype(dt))
        skips, ds, index = [h], 1, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                ch = int(mult * mc)
                h = res(f"input_blocks_{index}_0", ch)(h, emb)
                if ds in cfg.attention_ds:
                    h = attn(f"input_blocks_{index}_1", ch, cfg.num_heads)(h)
                skips.append(h)
                index += 1
            if level != len(cfg.channel_mult) - 1:
                name = f"input_blocks_{index}_0"
                h = res(name, ch, down=True)(h, emb) if cfg.resblock_updown else \
                    Downsample(ch, cfg.conv_resample, dt, name=name)(h)
                skips.append(h)
                ds, index = ds * 2, index + 1

        h = res("middle_block_0", ch)(h, emb)
        h = attn("middle_block_1", ch, cfg.num_heads)(h)
        h = res("middle_block_2", ch)(h, emb)

        heads_up = cfg.num_heads if cfg.num_heads_upsample == -1 else cfg.num_heads_upsample
        index = 0
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                ch = int(mult * mc)
                h = res(f"output_blocks_{index}_0", ch)(h, emb)
                j = 1
                if ds in cfg.attention_ds:
                    h = attn(f"output_blocks_{index}_1", ch, heads_up)(h)
                    j = 2
                if level and i == cfg.num_res_blocks:
                    name = f"output_blocks_{index}_{j}"
                    h = res(name, ch, up=True)(h, emb) if cfg.resblock_updown else \
                        Upsample(ch, cfg.conv_resample, dt, name=name)(h)
                    ds //= 2
                index += 1

        h = nn.silu(_normed(_norm("out_0", g), h, dt))
        return conv(cfg.output_channels, 3, dt, name="out_2")(h)


def init_adm(config: ADMConfig, rng: jax.Array, batch: int = 1) -> dict:
    """Random params (Flax default init) for ``config`` at its image size."""
    x = jnp.zeros((batch, config.image_size, config.image_size, config.in_channels), jnp.float32)
    x1 = x if config.cond_x1 else None
    # jitted: eager init dispatches (and compiles) every op separately, minutes at 256².
    init = jax.jit(lambda key: ADMUNet(config).init(key, x, jnp.zeros((batch,), jnp.float32), x1)["params"])
    return init(rng)


def adm_apply_fn(config: ADMConfig, dtype: Dtype = jnp.float32):
    """``fn(params, x, t, x1=None) -> output``: the pure network function (vmappable over params)."""
    module = ADMUNet(config, dtype=dtype)

    def fn(params, x, t, x1=None):
        return module.apply({"params": params}, x, t, x1)

    return fn


def param_shapes(config: ADMConfig) -> dict:
    """The param tree as ``jax.ShapeDtypeStruct`` (no compute, no memory)."""
    return jax.eval_shape(lambda: init_adm(config, jax.random.key(0)))


def tiny_config(**overrides: Any) -> ADMConfig:
    """A CPU-sized config (tests, ShapesWorld): 32², 32 channels, two levels, attention at 16²."""
    base = dict(image_size=32, model_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(16,),
                num_heads=2, num_head_channels=-1)
    base.update(overrides)
    return ADMConfig(**base)


__all__: Sequence[str] = ("ADMConfig", "ADMUNet", "ResBlock", "AttentionBlock", "init_adm", "adm_apply_fn",
                          "param_shapes", "tiny_config")
