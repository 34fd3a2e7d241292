"""Stable Diffusion's UNet2DConditionModel (SD 1.x / 2.x) in Flax linen, NHWC.

Parameter paths follow diffusers (``down_blocks_0/attentions_0/
transformer_blocks_0/attn2/to_k/kernel`` is ``down_blocks.0.attentions.0.
transformer_blocks.0.attn2.to_k.weight``), so ESD's parameter sets select by
path (``attn2``, ``time_embedding``) and :data:`KEY_FN` maps to PyTorch keys.

Beyond diffusers, every cross-attention (attn2) can take IP-Adapter image
tokens through decoupled ``to_k_ip``/``to_v_ip`` params (present only when
``ip_adapter_tokens > 0``) and can return its attention probabilities.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from jharm.models.layers import (
    Attention,
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Upsample2D,
    conv,
    group_norm,
    layer_norm,
    timestep_embedding,
)
from jharm.weights.convert import default_key_fn

LIST_NAMES = ("down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks", "downsamplers",
              "upsamplers", "net", "to_out")
KEY_FN = default_key_fn(LIST_NAMES)

DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# diffusers config keys that only some other model families use: accepted
# only with the value that leaves SD's architecture unchanged.
_NEUTRAL = {
    "mid_block_type": ("UNetMidBlock2DCrossAttn",), "dropout": (0, 0.0), "act_fn": ("silu",),
    "reverse_transformer_layers_per_block": (None,), "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,), "dual_cross_attention": (False,), "class_embed_type": (None,),
    "addition_embed_type": (None,), "addition_time_embed_dim": (None,), "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default",), "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1, 1.0),
    "time_embedding_type": ("positional",), "time_embedding_dim": (None,), "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,), "time_cond_proj_dim": (None,), "conv_in_kernel": (3,), "conv_out_kernel": (3,),
    "projection_class_embeddings_input_dim": (None,), "attention_type": ("default",),
    "class_embeddings_concat": (False,), "cross_attention_norm": (None,),
}
# Unused by this architecture: the first unless addition_embed_type is set; the second because
# diffusers' UNetMidBlock2DCrossAttn does not take it (its attn1 is always self-attention).
_IGNORED = {"addition_embed_type_num_heads", "mid_block_only_cross_attention"}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The UNet's architecture; field names and meanings are diffusers' config.json ones.

    Note diffusers' naming quirk kept for compatibility: ``attention_head_dim``
    is the NUMBER of heads per block (SD 1.5: 8 heads; SD 2.x: (5, 10, 20, 20)),
    the head size is then channels // heads. ``ip_adapter_tokens`` > 0 adds the
    IP-Adapter ``to_k_ip``/``to_v_ip`` params to every attn2 (N image tokens);
    ``only_cross_attention`` (one bool or one per block) makes a block's attn1
    attend to the text as well instead of to the image (no self-attention: at
    high resolution that saves the (H·W)² attention maps);
    ``remat`` wraps each block in ``nn.remat``; ``dtype`` is the compute dtype
    (params are always float32).
    """

    sample_size: int | None = 64
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    use_linear_projection: bool = False
    upcast_attention: bool = False
    only_cross_attention: bool | tuple[bool, ...] = False
    ip_adapter_tokens: int = 0
    remat: bool = False
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("down_block_types", "up_block_types", "block_out_channels", "transformer_layers_per_block",
                     "attention_head_dim", "only_cross_attention"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        n = len(self.block_out_channels)
        problems = []
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            problems.append(f"down_block_types ({len(self.down_block_types)}), up_block_types "
                            f"({len(self.up_block_types)}) and block_out_channels ({n}) must have the same length")
        for name, allowed in (("down_block_types", DOWN_TYPES), ("up_block_types", UP_TYPES)):
            bad = [t for t in getattr(self, name) if t not in allowed]
            if bad:
                problems.append(f"{name}: unsupported {bad} (supported: {list(allowed)})")
        for name in ("transformer_layers_per_block", "attention_head_dim", "only_cross_attention"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != n:
                problems.append(f"{name} has {len(value)} entries, block_out_channels has {n}")
        if not isinstance(self.layers_per_block, int):
            problems.append(f"layers_per_block must be one int (got {self.layers_per_block!r})")
        if not isinstance(self.cross_attention_dim, int):
            problems.append(f"cross_attention_dim must be one int (got {self.cross_attention_dim!r})")
        if self.downsample_padding not in (0, 1):
            problems.append(f"downsample_padding must be 0 or 1 (got {self.downsample_padding})")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            problems.append(f"dtype must be float32, bfloat16 or float16 (got {self.dtype!r})")
        if problems:
            raise ValueError("UNetConfig: " + "; ".join(problems))

    def per_block(self, name: str) -> tuple:
        value = getattr(self, name)
        return value if isinstance(value, tuple) else (value,) * len(self.block_out_channels)

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any], **overrides) -> "UNetConfig":
        """Build from a diffusers ``config.json`` dict; unsupported options raise ValueError.

        ``overrides`` set jharm-only fields (``remat``, ``dtype``, ``ip_adapter_tokens``).
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs, unsupported, unknown = {}, [], []
        for key, value in config.items():
            if key.startswith("_") or key in _IGNORED:
                continue
            if key in _NEUTRAL and key not in fields:
                if value not in _NEUTRAL[key]:
                    unsupported.append(f"{key}={value!r} (supported: {list(_NEUTRAL[key])})")
            elif key in fields:
                kwargs[key] = value
            else:
                unknown.append(key)
        if unsupported:
            raise ValueError("UNet2DConditionModel config uses options jharm does not implement: "
                             + ", ".join(unsupported))
        if unknown:
            warnings.warn(f"UNet2DConditionModel config: ignoring unknown keys {unknown}", stacklevel=2)
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_diffusers_config(self) -> dict:
        """The diffusers ``config.json`` dict (jharm-only fields dropped)."""
        out = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.30.0"}
        for f in dataclasses.fields(self):
            if f.name in ("ip_adapter_tokens", "remat", "dtype"):
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        out.update({"act_fn": "silu", "mid_block_type": "UNetMidBlock2DCrossAttn"})
        return out


class FeedForward(nn.Module):
    """GEGLU feed-forward: net_0/proj (dim -> 2·4dim), h·gelu(gate), net_2 (4dim -> dim)."""

    dim: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        h = _Geglu(4 * self.dim, self.dtype, name="net_0")(x)
        return nn.Dense(self.dim, dtype=self.dtype, name="net_2")(h)


class _Geglu(nn.Module):
    inner: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        hidden, gate = jnp.split(nn.Dense(2 * self.inner, dtype=self.dtype, name="proj")(x), 2, axis=-1)
        return hidden * nn.gelu(gate, approximate=False)


class BasicTransformerBlock(nn.Module):
    """LayerNorm -> self-attn (attn1; cross-attn with ``only_cross``) -> cross-attn (attn2) -> GEGLU FF,
    each residual."""

    dim: int
    heads: int
    dim_head: int
    upcast: bool
    ip_adapter: bool
    dtype: Any
    only_cross: bool = False

    @nn.compact
    def __call__(self, x, context, ip_tokens, ip_scale, want_probs):
        attn = lambda name, ip: Attention(self.dim, self.heads, self.dim_head, self.upcast,  # noqa: E731
                                          ip_adapter=ip, dtype=self.dtype, name=name)
        h = layer_norm(1e-5, self.dtype, "norm1")(x)
        x = x + attn("attn1", False)(h, context if self.only_cross else None)[0]
        h, probs = attn("attn2", self.ip_adapter)(layer_norm(1e-5, self.dtype, "norm2")(x), context,
                                                  ip_tokens, ip_scale, want_probs)
        x = x + h
        x = x + FeedForward(self.dim, self.dtype, name="ff")(layer_norm(1e-5, self.dtype, "norm3")(x))
        return x, probs


class Transformer2DModel(nn.Module):
    """GroupNorm -> proj_in (1x1 conv or linear) -> transformer blocks -> proj_out, residual."""

    heads: int
    dim_head: int
    num_layers: int
    groups: int
    use_linear_projection: bool
    upcast: bool
    ip_adapter: bool
    dtype: Any
    only_cross: bool = False

    @nn.compact
    def __call__(self, x, context, ip_tokens, ip_scale, want_probs):
        b, hgt, wid, c = x.shape
        inner = self.heads * self.dim_head
        h = group_norm(self.groups, 1e-6, self.dtype, "norm")(x)
        if self.use_linear_projection:
            h = nn.Dense(inner, dtype=self.dtype, name="proj_in")(h.reshape(b, hgt * wid, c))
        else:
            h = conv(inner, 1, self.dtype, name="proj_in")(h).reshape(b, hgt * wid, inner)
        probs = {}
        for i in range(self.num_layers):
            h, p = BasicTransformerBlock(inner, self.heads, self.dim_head, self.upcast, self.ip_adapter,
                                         self.dtype, self.only_cross, name=f"transformer_blocks_{i}")(
                h, context, ip_tokens, ip_scale, want_probs)
            if want_probs:
                probs[f"transformer_blocks_{i}/attn2"] = p
        if self.use_linear_projection:
            h = nn.Dense(c, dtype=self.dtype, name="proj_out")(h).reshape(b, hgt, wid, c)
        else:
            h = conv(c, 1, self.dtype, name="proj_out")(h.reshape(b, hgt, wid, inner))
        return h + x, probs


def _prefixed(prefix: str, probs: dict) -> dict:
    return {f"{prefix}/{k}": v for k, v in probs.items()}


class _BlockSettings(nn.Module):
    """Fields shared by the down, mid and up blocks."""

    config: UNetConfig
    index: int

    @property
    def compute_dtype(self):
        return jnp.dtype(self.config.dtype)

    def resnet(self, out_channels: int, name: str, scale: float = 1.0):
        c = self.config
        return ResnetBlock2D(out_channels, c.norm_num_groups, c.norm_eps, scale, self.compute_dtype, name=name)

    def transformer(self, channels: int, block: int, name: str, only_cross: bool | None = None):
        """The Transformer2DModel of down block ``block`` (up blocks pass their matching down block)."""
        c = self.config
        heads = c.per_block("attention_head_dim")[block]
        only_cross = c.per_block("only_cross_attention")[block] if only_cross is None else only_cross
        return Transformer2DModel(heads, channels // heads, c.per_block("transformer_layers_per_block")[block],
                                  c.norm_num_groups, c.use_linear_projection, c.upcast_attention,
                                  c.ip_adapter_tokens > 0, self.compute_dtype, bool(only_cross), name=name)


class DownBlock2D(_BlockSettings):
    """``down_blocks_<index>``: CrossAttnDownBlock2D or DownBlock2D (by config)."""

    @nn.compact
    def __call__(self, h, temb, context, ip_tokens, ip_scale, want_probs):
        c, i = self.config, self.index
        out = c.block_out_channels[i]
        cross = c.down_block_types[i] == "CrossAttnDownBlock2D"
        skips, probs = [], {}
        for j in range(c.layers_per_block):
            h = self.resnet(out, f"resnets_{j}")(h, temb)
            if cross:
                h, p = self.transformer(out, i, f"attentions_{j}")(h, context, ip_tokens, ip_scale, want_probs)
                probs.update(_prefixed(f"attentions_{j}", p))
            skips.append(h)
        if i < len(c.block_out_channels) - 1:
            h = Downsample2D(out, c.downsample_padding, self.compute_dtype, name="downsamplers_0")(h)
            skips.append(h)
        return h, tuple(skips), probs


class MidBlock2DCrossAttn(_BlockSettings):
    """``mid_block``: resnet -> transformer -> resnet at the lowest resolution."""

    @nn.compact
    def __call__(self, h, temb, context, ip_tokens, ip_scale, want_probs):
        c = self.config
        ch = c.block_out_channels[-1]
        h = self.resnet(ch, "resnets_0", c.mid_block_scale_factor)(h, temb)
        h, p = self.transformer(ch, len(c.block_out_channels) - 1, "attentions_0", only_cross=False)(
            h, context, ip_tokens, ip_scale, want_probs)
        h = self.resnet(ch, "resnets_1", c.mid_block_scale_factor)(h, temb)
        return h, _prefixed("attentions_0", p)


class UpBlock2D(_BlockSettings):
    """``up_blocks_<index>``: CrossAttnUpBlock2D or UpBlock2D; consumes skip connections."""

    @nn.compact
    def __call__(self, h, skips, temb, context, ip_tokens, ip_scale, want_probs, up_size):
        c, i = self.config, self.index
        rev = len(c.block_out_channels) - 1 - i  # index of the matching down block
        out = c.block_out_channels[rev]
        cross = c.up_block_types[i] == "CrossAttnUpBlock2D"
        probs = {}
        for j in range(c.layers_per_block + 1):
            h = jnp.concatenate([h, skips[-1 - j]], axis=-1)
            h = self.resnet(out, f"resnets_{j}")(h, temb)
            if cross:
                h, p = self.transformer(out, rev, f"attentions_{j}")(h, context, ip_tokens, ip_scale, want_probs)
                probs.update(_prefixed(f"attentions_{j}", p))
        if up_size is not None:
            h = Upsample2D(out, self.compute_dtype, name="upsamplers_0")(h, up_size)
        return h, probs


class UNet2DConditionModel(nn.Module):
    """SD UNet: ``apply(params, sample, timesteps, encoder_hidden_states, ...)``.

    Args (of ``__call__``):
      sample: (B, H, W, in_channels) noisy latents, NHWC.
      timesteps: scalar or (B,) DDPM timesteps.
      encoder_hidden_states: (B, L, cross_attention_dim) text context.
      ip_tokens: optional (B, N, cross_attention_dim) IP-Adapter image tokens
        (needs ``config.ip_adapter_tokens > 0``); None = plain SD attention.
      ip_scale: scalar or (B,) weight s of the image branch.
      return_attention_probs: also return ``{layer path: (B, heads, H·W, L)}``
        cross-attention probabilities of every attn2, keyed like
        ``down_blocks_0/attentions_0/transformer_blocks_0/attn2``.
    Returns:
      The (B, H, W, out_channels) prediction in the compute dtype, or
      ``(prediction, probs)`` with ``return_attention_probs``.
    """

    config: UNetConfig

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, *, ip_tokens=None, ip_scale=1.0,
                 return_attention_probs: bool = False):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        want = bool(return_attention_probs)
        batch = sample.shape[0]
        sample = sample.astype(dtype)
        if c.center_input_sample:
            sample = 2 * sample - 1.0
        context = encoder_hidden_states.astype(dtype)
        if ip_tokens is not None:
            ip_tokens = ip_tokens.astype(dtype)
        t = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (batch,))
        t_emb = timestep_embedding(t, c.block_out_channels[0], flip_sin_to_cos=c.flip_sin_to_cos,
                                   freq_shift=c.freq_shift).astype(dtype)
        temb = TimestepEmbedding(4 * c.block_out_channels[0], dtype, name="time_embedding")(t_emb)

        wrap = (lambda cls, static: nn.remat(cls, static_argnums=static)) if c.remat else (lambda cls, static: cls)
        down_cls, mid_cls, up_cls = wrap(DownBlock2D, (6,)), wrap(MidBlock2DCrossAttn, (6,)), wrap(UpBlock2D, (7, 8))

        h = conv(c.block_out_channels[0], 3, dtype, name="conv_in")(sample)
        skips = [h]
        probs = {}
        for i in range(len(c.block_out_channels)):
            h, block_skips, p = down_cls(c, i, name=f"down_blocks_{i}")(h, temb, context, ip_tokens, ip_scale, want)
            skips.extend(block_skips)
            probs.update(_prefixed(f"down_blocks_{i}", p))
        h, p = mid_cls(c, 0, name="mid_block")(h, temb, context, ip_tokens, ip_scale, want)
        probs.update(_prefixed("mid_block", p))
        n_up = c.layers_per_block + 1
        for i in range(len(c.block_out_channels)):
            block_skips, skips = tuple(skips[-n_up:]), skips[:-n_up]
            # Upsample to the next skip's size (equal to 2x unless H, W are odd there).
            up_size = tuple(skips[-1].shape[1:3]) if i < len(c.block_out_channels) - 1 else None
            h, p = up_cls(c, i, name=f"up_blocks_{i}")(h, block_skips, temb, context, ip_tokens, ip_scale, want,
                                                      up_size)
            probs.update(_prefixed(f"up_blocks_{i}", p))
        h = nn.silu(group_norm(c.norm_num_groups, c.norm_eps, dtype, "conv_norm_out")(h))
        out = conv(c.out_channels, 3, dtype, name="conv_out")(h)
        return (out, probs) if want else out

    def init_params(self, rng, batch: int = 1, context_len: int = 77):
        """Random float32 params for this config (one tiny forward pass)."""
        c = self.config
        size = c.sample_size or 8
        sample = jnp.zeros((batch, size, size, c.in_channels), jnp.float32)
        context = jnp.zeros((batch, context_len, c.cross_attention_dim), jnp.float32)
        return self.init(rng, sample, jnp.zeros((batch,), jnp.int32), context)


def ip_layer_paths(config: UNetConfig) -> list[str]:
    """Paths of every attn2 in diffusers' ``attn_processors`` order.

    That order (down blocks, up blocks, then the mid block — registration order
    in diffusers' __init__) is the one the official IP-Adapter checkpoints index:
    attn2 number k is ``ip_adapter.{2k+1}``.
    """
    n = len(config.block_out_channels)
    layers = config.per_block("transformer_layers_per_block")
    paths = []
    for i in range(n):
        if config.down_block_types[i] == "CrossAttnDownBlock2D":
            for j in range(config.layers_per_block):
                paths += [f"down_blocks_{i}/attentions_{j}/transformer_blocks_{k}/attn2" for k in range(layers[i])]
    for i in range(n):
        if config.up_block_types[i] == "CrossAttnUpBlock2D":
            for j in range(config.layers_per_block + 1):
                paths += [f"up_blocks_{i}/attentions_{j}/transformer_blocks_{k}/attn2"
                          for k in range(layers[n - 1 - i])]
    paths += [f"mid_block/attentions_0/transformer_blocks_{k}/attn2" for k in range(layers[-1])]
    return paths
