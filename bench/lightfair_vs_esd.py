"""LightFair training-step cost vs an ESD step on the same text-to-image model (one run, one machine).

LightFair differentiates only the CLIP text encoder (neutral + attribute prompts of a batch of
concepts); ESD differentiates the UNet (a frozen teacher pass on [∅, c] plus the student pass).
Both are jitted value-and-grad + Adam updates; the ESD step here EXCLUDES the partial DDIM sampling
that produces z_t (so the ratio is a lower bound on ESD's real cost). Sizes: ``small`` (CPU scale),
``sd`` (SD 1.5's UNet and CLIP ViT-L text encoder, 64x64 latents: accelerators).

    python bench/lightfair_vs_esd.py --size small
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax

from jharm.models.clip import CLIPTextConfig, CLIPTextModel
from jharm.models.unet import UNet2DConditionModel, UNetConfig
from jharm.objectives.erasure import esd_loss
from jharm.objectives.fairness import lightfair_loss
from jharm.runtime import configure_xla_cpu

configure_xla_cpu()  # the XLA:CPU setting jharm's programs run with (jharm/runtime.py)

SIZES = {
    "small": dict(unet=UNetConfig(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                                  attention_head_dim=4),
                  text=CLIPTextConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                                      projection_dim=64, with_projection=True), latent=16),
    "sd": dict(unet=UNetConfig(), text=CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                      num_attention_heads=12, projection_dim=768, with_projection=True),
               latent=64),
}


def timed(fn, state, iters):
    state = fn(*state)
    jax.block_until_ready(state)  # compile + warm-up
    start = time.perf_counter()
    for _ in range(iters):
        state = fn(*state)
    jax.block_until_ready(state)
    return (time.perf_counter() - start) / iters


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=SIZES, default="small")
    ap.add_argument("--batch", type=int, default=4, help="ESD latents per step = LightFair concepts per step")
    ap.add_argument("--attributes", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    s = SIZES[args.size]
    unet, text = UNet2DConditionModel(s["unet"]), CLIPTextModel(s["text"])
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    length = s["text"].max_position_embeddings
    unet_params = unet.init_params(k1, context_len=length)
    text_params = text.init_params(k2)
    opt = optax.adam(1e-5)
    b, a, lat = args.batch, args.attributes, s["latent"]
    ids = jax.random.randint(k3, (b * (1 + a), length), 0, s["text"].vocab_size)
    centroids = jax.random.normal(k3, (b, a, s["text"].projection_dim))
    z = jax.random.normal(k3, (b, lat, lat, s["unet"].in_channels))
    t = jnp.full((b,), 500, jnp.int32)
    ctx = jax.random.normal(k3, (b, length, s["unet"].cross_attention_dim))

    @jax.jit
    def lightfair_step(params, opt_state):
        def loss(p):
            emb = text.apply({"params": p}, ids)["text_embeds"]
            return lightfair_loss(emb[:b], emb[b:].reshape(b, a, -1), centroids)[0]
        grads = jax.grad(loss)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    eps_fn = lambda p, x, tt, c: unet.apply(p, x, tt, c)  # noqa: E731

    @jax.jit
    def esd_step(params, opt_state):
        grads = jax.grad(lambda p: esd_loss(p, unet_params, eps_fn, z, t, ctx, jnp.zeros_like(ctx))[0])(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    lf = timed(lightfair_step, (text_params, opt.init(text_params)), args.iters)
    esd = timed(esd_step, (unet_params, opt.init(unet_params)), args.iters)
    count = lambda p: sum(x.size for x in jax.tree.leaves(p))  # noqa: E731
    print(f"device {jax.devices()[0].device_kind}; size {args.size}; batch {b}; attributes {a}")
    print(f"LightFair step (text encoder, {count(text_params):,} params): {lf * 1e3:.1f} ms")
    print(f"ESD step (UNet, {count(unet_params):,} params; z_t sampling excluded): {esd * 1e3:.1f} ms")
    print(f"ratio ESD / LightFair: {esd / lf:.1f}x")


if __name__ == "__main__":
    main()
