"""Tiny random text-to-image models for the fairness tests (jharm modules, random weights)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jharm.diffusion.schedules import make_schedule
from jharm.fairness import TextToImage, fingerprint
from jharm.models.clip import CLIPTextConfig, CLIPTextModel
from jharm.shapesworld.vocab import shapesworld_tokenizer
from jharm.train.tasks.denoise_tiny import tiny_unet

WIDTH = 16


def tiny_t2i(seed: int = 0, size: int = 8) -> TextToImage:
    tok = shapesworld_tokenizer(max_length=8)
    cfg = CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=WIDTH, intermediate_size=32, projection_dim=8,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=8,
                         eos_token_id=tok.eos_token_id, with_projection=True)
    k_text, k_unet = jax.random.split(jax.random.key(seed))
    text = CLIPTextModel(cfg)
    text_params = text.init_params(k_text)
    unet = tiny_unet(3, WIDTH, 2)
    unet_params = unet.init(k_unet, jnp.zeros((1, size, size, 3)), jnp.zeros((1,)), jnp.zeros((1, 8, WIDTH)))
    schedule = make_schedule("scaled_linear", 1000, 0.00085, 0.012)
    return TextToImage(text, text_params, tok, unet, unet_params, schedule, (size, size, 3), fingerprint(unet_params))


def perturbed(params, seed: int = 1, scale: float = 0.5):
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
