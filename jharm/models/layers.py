"""Blocks shared by the diffusion UNets and the VAE (NHWC, diffusers names).

Each module's parameter names are those of the diffusers module it mirrors, so
``default_key_fn`` maps them to PyTorch keys without special cases. Params are
float32; ``dtype`` is the compute dtype. Normalisation statistics are always
computed in float32 with the two-pass variance (the fast E[x²]−E[x]² form loses
the precision the 1e-4 parity checks need at SD scale).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def group_norm(groups: int, eps: float, dtype: Dtype, name: str | None = None) -> nn.GroupNorm:
    """torch.nn.GroupNorm(groups, C, eps) with affine params ``scale``/``bias``."""
    return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


def layer_norm(eps: float, dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
    """torch.nn.LayerNorm(C, eps)."""
    return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


def conv(features: int, kernel: int, dtype: Dtype, *, stride: int = 1, padding=None, name: str | None = None) -> nn.Conv:
    """torch.nn.Conv2d with symmetric ``kernel // 2`` padding unless given."""
    if padding is None:
        padding = ((kernel // 2, kernel // 2), (kernel // 2, kernel // 2))
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype, name=name)


class PointwiseConv(nn.Module):
    """A kernel-size-1, stride-1 ``nn.Conv`` over any number of spatial dims (the same ``kernel``
    (1, ..., 1, C, F) and ``bias`` params and init) computed as a matmul.

    Why: vmapped over experts whose stacked params are sharded on the expert axis (MixBridge,
    rules ``ep``), XLA:CPU (jax 0.10.2) partitioned the 1x1 convolutions of the ADM network
    wrongly (outputs off by ~1 where the unsharded run is exact; 3x3 convs were right); the
    matmul form partitions correctly (tests/test_adm.py checks the sharded vmap)."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (1,) * (x.ndim - 2) + (c, self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        y = jnp.einsum("...c,cf->...f", x.astype(self.dtype), kernel.reshape(c, self.features).astype(self.dtype))
        return y + bias.astype(self.dtype)


def timestep_embedding(timesteps: jnp.ndarray, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jnp.ndarray:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim), as diffusers' ``Timesteps``."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x)
        return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(nn.silu(x))


class ResnetBlock2D(nn.Module):
    """diffusers ResnetBlock2D ("default" time-embedding norm, SiLU, no up/down).

    ``temb`` None means the block has no ``time_emb_proj`` (VAE blocks).
    """

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
        h = conv(self.out_channels, 3, self.dtype, name="conv1")(h)
        if temb is not None:
            t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm2")(h))
        h = conv(self.out_channels, 3, self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, self.dtype, name="conv_shortcut")(x)
        out = x + h
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv; ``padding`` 1 (UNet) or 0 with a bottom/right pad (VAE)."""

    channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        pad = ((1, 1), (1, 1)) if self.padding == 1 else ((0, 1), (0, 1))
        return conv(self.channels, 3, self.dtype, stride=2, padding=pad, name="conv")(x)


def resize_nearest(x: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
    """Nearest-neighbour resize of NHWC ``x`` as torch ``F.interpolate(mode="nearest")``."""
    h, w = x.shape[1], x.shape[2]
    if size == (2 * h, 2 * w):  # the common case: an exact repeat
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = jnp.floor(jnp.arange(size[0]) * (h / size[0])).astype(jnp.int32)
    cols = jnp.floor(jnp.arange(size[1]) * (w / size[1])).astype(jnp.int32)
    return x[:, rows][:, :, cols]


class Upsample2D(nn.Module):
    """Nearest x2 (or to ``size``) then a 3x3 conv."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, size: tuple[int, int] | None = None):
        x = resize_nearest(x, size or (2 * x.shape[1], 2 * x.shape[2]))
        return conv(self.channels, 3, self.dtype, name="conv")(x)


def dot_product_attention(q, k, v, heads: int, *, upcast: bool = False, return_probs: bool = False):
    """Multi-head softmax(QKᵀ/√d)V on (B, L, H·d) inputs -> (B, Lq, H·d).

    Logits are computed in float32 when ``upcast`` (diffusers' upcast_attention);
    the softmax is always float32. With ``return_probs`` also returns the
    (B, H, Lq, Lk) probabilities (float32).
    """
    b, lq, inner = q.shape
    d = inner // heads
    # Heads-major (B, H, L, d) before the two matmuls: XLA:CPU ran the (B, L, H, d) einsums 2-3x
    # slower (a tiny UNet's forward 1.15-1.57 s -> 0.65-0.67 s, shared core); accelerators transpose anyway.
    q, k, v = (x.reshape(b, x.shape[1], heads, d).transpose(0, 2, 1, 3) for x in (q, k, v))
    if upcast:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k) * (d ** -0.5)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v).transpose(0, 2, 1, 3).reshape(b, lq, inner)
    return (out, probs) if return_probs else out


class Attention(nn.Module):
    """diffusers ``Attention`` as used in SD transformer blocks (bias-free q/k/v).

    With ``ip_adapter`` the module also owns the IP-Adapter's decoupled,
    bias-free ``to_k_ip``/``to_v_ip`` projections; when ``ip_tokens`` are given
    the output before ``to_out_0`` is
    softmax(QKᵀ/√d)V + s · softmax(QK'ᵀ/√d)V' (K', V' from the image tokens).
    ``ip_scale`` is a scalar or a per-example (B,) array; 0 is plain attention.
    """

    query_dim: int
    heads: int
    dim_head: int
    upcast: bool = False
    ip_adapter: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, ip_tokens=None, ip_scale=1.0, return_probs: bool = False):
        inner = self.heads * self.dim_head
        dense = lambda name, bias=False: nn.Dense(inner, use_bias=bias, dtype=self.dtype, name=name)  # noqa: E731
        context = x if context is None else context
        q = dense("to_q")(x)
        out = dot_product_attention(q, dense("to_k")(context), dense("to_v")(context), self.heads,
                                    upcast=self.upcast, return_probs=return_probs)
        out, probs = out if return_probs else (out, None)
        if self.ip_adapter:
            k_ip, v_ip = dense("to_k_ip"), dense("to_v_ip")
            if ip_tokens is not None:
                ip_out = dot_product_attention(q, k_ip(ip_tokens), v_ip(ip_tokens), self.heads, upcast=self.upcast)
                scale = jnp.asarray(ip_scale, out.dtype)
                scale = scale.reshape(-1, 1, 1) if scale.ndim == 1 else scale
                out = out + scale * ip_out
            elif self.is_initializing():
                # Create the ip params even when init is called text-only.
                k_ip(context), v_ip(context)
        elif ip_tokens is not None:
            raise ValueError("ip_tokens given but this model has no IP-Adapter params "
                             "(configure it with ip_adapter_tokens > 0 or merge an IPAdapter)")
        out = nn.Dense(self.query_dim, dtype=self.dtype, name="to_out_0")(out)
        return out, probs
