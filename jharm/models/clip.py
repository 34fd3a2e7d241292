"""CLIP text and vision towers (transformers' CLIP), Flax linen.

Names follow transformers (``text_model/encoder/layers_0/self_attn/q_proj``,
``vision_model/pre_layrnorm``, ``text_projection``, ...) so the weights map
mechanically. Images are NHWC. The text tower is causal; its pooled output is
the hidden state at the EOS token (first ``eos_token_id`` position, or the
argmax id for legacy configs with ``eos_token_id == 2``, as transformers does).

Outputs are dicts: ``last_hidden_state``, ``hidden_states`` (embeddings + every
layer, so ``hidden_states[-2]`` is the penultimate layer SD 2.x reads),
``pooler_output`` and, with a projection, ``text_embeds``/``image_embeds``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp


def _activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    raise ValueError(f"unsupported CLIP hidden_act {name!r} (quick_gelu, gelu, gelu_new)")


class _HFConfig:
    """transformers config.json <-> dataclass; ``with_projection`` and ``dtype`` are jharm's own."""

    _SECTION = ""  # a CLIPModel config nests this tower's fields under this key
    _MODEL_TYPE = ""

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], **overrides):
        """From a tower's ``config.json`` or a CLIPModel's (its ``text_config``/``vision_config``)."""
        config = dict(config.get(cls._SECTION, config))
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in config.items() if k in fields}
        values.update(overrides)
        return cls(**values)

    def to_hf(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("with_projection", "dtype")}
        return dict(out, model_type=self._MODEL_TYPE)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(_HFConfig):
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    with_projection: bool = False
    dtype: str = "float32"
    _SECTION = "text_config"
    _MODEL_TYPE = "clip_text_model"


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(_HFConfig):
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    with_projection: bool = False
    dtype: str = "float32"
    _SECTION = "vision_config"
    _MODEL_TYPE = "clip_vision_model"


class CLIPAttention(nn.Module):
    hidden_size: int
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        head_dim = self.hidden_size // self.num_heads
        dense = lambda name: nn.Dense(self.hidden_size, dtype=self.dtype, name=name)  # noqa: E731
        split = lambda t: t.reshape(t.shape[:2] + (self.num_heads, head_dim))  # noqa: E731
        q, k, v = split(dense("q_proj")(x)), split(dense("k_proj")(x)), split(dense("v_proj")(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * head_dim**-0.5
        if mask is not None:
            scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(x.shape[:2] + (self.hidden_size,))
        return dense("out_proj")(out)


class CLIPMLP(nn.Module):
    hidden_size: int
    intermediate_size: int
    hidden_act: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = _activation(self.hidden_act)(nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x))
        return nn.Dense(self.hidden_size, dtype=self.dtype, name="fc2")(x)


class CLIPEncoderLayer(nn.Module):
    hidden_size: int
    intermediate_size: int
    num_heads: int
    hidden_act: str
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        norm = lambda name: nn.LayerNorm(self.eps, dtype=self.dtype, name=name)  # noqa: E731
        x = x + CLIPAttention(self.hidden_size, self.num_heads, self.dtype, name="self_attn")(norm("layer_norm1")(x), mask)
        mlp = CLIPMLP(self.hidden_size, self.intermediate_size, self.hidden_act, self.dtype, name="mlp")
        return x + mlp(norm("layer_norm2")(x))


class CLIPEncoder(nn.Module):
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_layers: int
    hidden_act: str
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        states = [x]
        for i in range(self.num_layers):
            x = CLIPEncoderLayer(self.hidden_size, self.intermediate_size, self.num_heads, self.hidden_act,
                                 self.eps, self.dtype, name=f"layers_{i}")(x, mask)
            states.append(x)
        return x, tuple(states)


class _TextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Any

    @nn.compact
    def __call__(self, input_ids=None, inputs_embeds=None):
        cfg = self.config
        token = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, name="token_embedding")
        if inputs_embeds is None:
            inputs_embeds = token(input_ids)
        elif self.is_initializing():
            token(jnp.zeros((1, 1), jnp.int32))  # the table must exist even if unused at init
        position = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype, name="position_embedding")
        return inputs_embeds + position(jnp.arange(inputs_embeds.shape[1])[None])


class CLIPTextTransformer(nn.Module):
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, inputs_embeds=None):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        x = _TextEmbeddings(cfg, dtype, name="embeddings")(input_ids, inputs_embeds)
        length = x.shape[1]
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
        if attention_mask is not None:
            mask = jnp.logical_and(mask, attention_mask[:, None, None, :].astype(bool))
        last, states = CLIPEncoder(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                                   cfg.num_hidden_layers, cfg.hidden_act, cfg.layer_norm_eps, dtype,
                                   name="encoder")(x, mask)
        last = nn.LayerNorm(cfg.layer_norm_eps, dtype=dtype, name="final_layer_norm")(last)
        if cfg.eos_token_id == 2:  # legacy configs: EOS has the largest id
            eos = jnp.argmax(input_ids, axis=-1)
        else:
            eos = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(last, eos[:, None, None], axis=1)[:, 0]
        return {"last_hidden_state": last, "hidden_states": states, "pooler_output": pooled}


class CLIPTextModel(nn.Module):
    """transformers' CLIPTextModel, or CLIPTextModelWithProjection when
    ``config.with_projection`` (adds ``text_embeds``)."""

    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, inputs_embeds=None):
        out = CLIPTextTransformer(self.config, name="text_model")(input_ids, attention_mask, inputs_embeds)
        if self.config.with_projection:
            out["text_embeds"] = nn.Dense(self.config.projection_dim, use_bias=False, dtype=jnp.dtype(self.config.dtype),
                                          name="text_projection")(out["pooler_output"])
        return out

    def init_params(self, rng, length: int | None = None):
        ids = jnp.zeros((1, length or self.config.max_position_embeddings), jnp.int32)
        return self.init(rng, ids)["params"]


class CLIPVisionTransformer(nn.Module):
    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixel_values):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        x = _VisionEmbeddings(cfg, dtype, name="embeddings")(pixel_values)
        x = nn.LayerNorm(cfg.layer_norm_eps, dtype=dtype, name="pre_layrnorm")(x)
        last, states = CLIPEncoder(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                                   cfg.num_hidden_layers, cfg.hidden_act, cfg.layer_norm_eps, dtype,
                                   name="encoder")(x)
        pooled = nn.LayerNorm(cfg.layer_norm_eps, dtype=dtype, name="post_layernorm")(last[:, 0])
        return {"last_hidden_state": last, "hidden_states": states, "pooler_output": pooled}


class _VisionEmbeddings(nn.Module):
    config: CLIPVisionConfig
    dtype: Any

    @nn.compact
    def __call__(self, pixel_values):
        cfg = self.config
        p = cfg.patch_size
        if pixel_values.shape[1] != cfg.image_size or pixel_values.shape[2] != cfg.image_size:
            raise ValueError(f"CLIP vision expects {cfg.image_size}x{cfg.image_size} NHWC images, got {pixel_values.shape}")
        x = nn.Conv(cfg.hidden_size, (p, p), (p, p), padding="VALID", use_bias=False, dtype=self.dtype,
                    name="patch_embedding")(pixel_values.astype(self.dtype))
        x = x.reshape(x.shape[0], -1, cfg.hidden_size)
        cls = self.param("class_embedding", nn.initializers.normal(cfg.hidden_size**-0.5), (cfg.hidden_size,))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, cfg.hidden_size)), x], axis=1)
        num_positions = (cfg.image_size // p) ** 2 + 1
        position = nn.Embed(num_positions, cfg.hidden_size, dtype=self.dtype, name="position_embedding")
        return x + position(jnp.arange(num_positions)[None])


class CLIPVisionModel(nn.Module):
    """transformers' CLIPVisionModel, or CLIPVisionModelWithProjection when
    ``config.with_projection`` (adds ``image_embeds``). NHWC pixel values."""

    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixel_values):
        out = CLIPVisionTransformer(self.config, name="vision_model")(pixel_values)
        if self.config.with_projection:
            out["image_embeds"] = nn.Dense(self.config.projection_dim, use_bias=False, dtype=jnp.dtype(self.config.dtype),
                                           name="visual_projection")(out["pooler_output"])
        return out

    def init_params(self, rng):
        size = self.config.image_size
        return self.init(rng, jnp.zeros((1, size, size, self.config.num_channels)))["params"]


def normalize(x, eps: float = 1e-12):
    return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def clip_logits(text_embeds, image_embeds, logit_scale):
    """CLIPModel's logits_per_text: exp(logit_scale) · cos(text, image), (T, I)."""
    return jnp.exp(logit_scale) * normalize(text_embeds) @ normalize(image_embeds).T
