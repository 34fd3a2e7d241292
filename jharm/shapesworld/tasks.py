"""Train-loop Tasks for the ShapesWorld models: tiny CLIP, tiny text-to-image, tiny IP-Adapter.

Each factory reads ``config.task`` (defaults in the ``*_task_config`` functions,
used by ``configs/shapesworld_*.py``) and returns a ``jharm.train.task.Task``
for the one train loop. All randomness (scenes, caption dropout, noise,
timesteps) is drawn in ``make_batch`` from (data_seed, step), so a run is
reproducible and resumable. Frozen models (the CLIP under the T2I model, the
T2I UNet under the IP-Adapter) are read from an asset folder written by the
previous stage (``config.task.clip_dir`` / ``config.task.t2i_dir``).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from jharm.diffusion.schedules import add_noise, diffusion_loss, make_schedule, training_timesteps
from jharm.models.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel, clip_logits
from jharm.models.ip_adapter import ImageProjModel
from jharm.models.unet import UNet2DConditionModel, UNetConfig
from jharm.shapesworld import data
from jharm.shapesworld.vocab import shapesworld_tokenizer
from jharm.shapesworld.world import world_config
from jharm.train.task import Task

# --- configs -------------------------------------------------------------------


def clip_task_config() -> ml_collections.ConfigDict:
    """``config.task`` of the tiny CLIP (contrastive on captioned renders)."""
    c = ml_collections.ConfigDict()
    c.name = "shapesworld_clip"
    c.text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  projection_dim=64)
    c.vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    patch_size=4, projection_dim=64)
    c.init_logit_scale = 2.6592  # log(1/0.07), CLIP's initial temperature
    c.data_seed = 1
    c.world = world_config()
    return c


def t2i_task_config() -> ml_collections.ConfigDict:
    """``config.task`` of the tiny pixel-space text-to-image UNet."""
    c = ml_collections.ConfigDict()
    c.name = "shapesworld_t2i"
    c.clip_dir = ""  # folder holding clip.safetensors + manifest.json (the build fills it)
    # Cross-attention at every resolution, as SD places it: with text reaching only the 8x8 level,
    # shape accuracy stayed at chance (0.15-0.19) after 1500-4000 steps of every recipe tried; with
    # it, 0.31 after 1000-1500 (docs/shapesworld.md). One head at 16x16: XLA:CPU's attention cost there
    # grows with heads x 256² (4 heads: 2.0 s per step on one core, 1 head: 1.2 s). Self-attention is
    # kept (not only_cross_attention, equally cheap) so that text enters only through attn2, as in SD:
    # ESD-x, UCE and the IP-Adapter edit attn2.
    c.unet = dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8, attention_head_dim=(1, 4, 4),
                  down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3)
    # v-prediction: with epsilon targets the tiny UNet's high-noise predictions stayed worse than the
    # mean image (x0 MSE 1.1 at t=900 vs 0.45 variance; eps MSE 0.0027 looks small there) and the text
    # made no difference (cond/uncond losses equal to 1 %), so samples were colour blobs (shape accuracy
    # at chance after 2000 steps). v targets weigh the high-noise, text-decided regime in x0 terms.
    # Cosine betas: a little better than linear ones (shape 0.21 vs 0.15 at 3000 steps).
    # No x0 clipping in the sampler (diffusers' DDIM clips by default): clipping the guided x0
    # estimate while keeping the unclipped noise estimate (what diffusers does) pulled colours off
    # (red -> orange) and broke shapes; the same weights at DDIM 50, CFG 3, 4 samples per prompt:
    # shape and colour right 0.25 with clipping, 0.95 without (docs/shapesworld.md).
    c.schedule = dict(kind="squaredcos_cap_v2", num_train_timesteps=1000, prediction_type="v_prediction",
                      clip_sample=False)
    # Loss weighting and timestep density: 0 / "uniform" is plain DDPM training (the shipped recipe).
    # At 1000 steps (one core, 4 samples per prompt) min-SNR-5 gave shape accuracy 0.26 and
    # logit-normal(0, 1) 0.25 against 0.21 for plain training: within noise of each other, far from the
    # gates (docs/shapesworld.md), so the shipped recipe keeps plain training.
    c.min_snr_gamma = 0.0  # > 0: min-SNR-gamma weights (schedules.min_snr_weight)
    c.timestep_sampling = "uniform"  # or "logit_normal" (schedules.training_timesteps)
    c.logit_mean = 0.0
    c.logit_std = 1.0
    c.p_uncond = 0.1  # caption dropout, for classifier-free guidance
    # How the report samples: CFG `guidance_scale` at the steps with guidance_interval[0] <= t <
    # guidance_interval[1], the prompt's output unguided above (Kynkaenniemi et al. 2024). A sample's colour
    # is settled in the high-noise steps, and CFG there turned the neutral prompts' 85/15 and 80/20 into
    # 100/0; below t = 600 it sharpens shapes without that (2026-12-07 assets, report at 64 per prompt:
    # CFG 3 everywhere weakest prompt 0.75 / max bias error 0.20; CFG 6 below 600: 0.95 / 0.106;
    # docs/shapesworld.md). None: guidance at every step.
    c.guidance_scale = 6.0
    c.guidance_interval = (0.0, 600.0)
    c.data_seed = 2
    c.world = world_config()
    return c


def ip_task_config() -> ml_collections.ConfigDict:
    """``config.task`` of the tiny IP-Adapter on the frozen T2I UNet."""
    c = ml_collections.ConfigDict()
    c.name = "shapesworld_ip"
    c.clip_dir = ""
    c.t2i_dir = ""
    c.num_tokens = 4
    c.p_text = 0.2      # keep the caption on this fraction of rows; the rest train with empty text
    c.p_drop_image = 0.05
    c.data_seed = 3
    c.world = world_config()
    return c


# --- model builders (shared with assets.py) ---------------------------------------


def clip_configs(tc, tokenizer=None) -> tuple[CLIPTextConfig, CLIPVisionConfig]:
    """The text and vision tower configs of a CLIP task config."""
    tok = shapesworld_tokenizer() if tokenizer is None else tokenizer
    text = CLIPTextConfig(vocab_size=tok.vocab_size, max_position_embeddings=tok.max_length,
                          eos_token_id=tok.eos_token_id, with_projection=True, **dict(tc.text))
    vision = CLIPVisionConfig(image_size=int(tc.world.resolution), with_projection=True, **dict(tc.vision))
    return text, vision


def unet_config(tc, cross_attention_dim: int, ip_tokens: int = 0) -> UNetConfig:
    """The pixel-space UNet config of a T2I task config."""
    u = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in dict(tc.unet).items()}
    return UNetConfig(sample_size=int(tc.world.resolution), in_channels=3, out_channels=3,
                      cross_attention_dim=cross_attention_dim, ip_adapter_tokens=ip_tokens, **u)


def schedule_of(tc):
    s = dict(tc.schedule)
    return make_schedule(s.pop("kind"), **s)


def clip_image_input(images, image_size: int):
    """[0, 1] NHWC images -> the tiny CLIP's pixel values ([-1, 1]) at ``image_size``.

    Images of another size are resized (bilinear, antialiased), as CLIP's image
    processor resizes every input to the tower's resolution: a 16x16 T2I's
    samples go through a 32x32 CLIP vision tower.
    """
    images = jnp.asarray(images)
    if images.shape[1:3] != (image_size, image_size):
        images = jax.image.resize(images, (images.shape[0], image_size, image_size, images.shape[3]), "bilinear")
    return images * 2.0 - 1.0


def contrastive_loss(text_embeds, image_embeds, logit_scale, same_caption):
    """Symmetric InfoNCE; rows with identical captions are all positives (soft targets)."""
    logits = clip_logits(text_embeds, image_embeds, logit_scale)  # (T, I)
    targets = same_caption / same_caption.sum(-1, keepdims=True)
    loss = (optax.softmax_cross_entropy(logits, targets).mean()
            + optax.softmax_cross_entropy(logits.T, targets).mean()) / 2
    acc = (logits.argmax(-1) == jnp.arange(logits.shape[0])).mean()
    return loss, acc


# --- tasks ---------------------------------------------------------------------------


def clip_task(config) -> Task:
    """Tiny CLIP: params ``{"text": ..., "vision": ..., "logit_scale": ()}``."""
    tc = config.task
    tok = shapesworld_tokenizer()
    text_cfg, vision_cfg = clip_configs(tc, tok)
    text, vision = CLIPTextModel(text_cfg), CLIPVisionModel(vision_cfg)
    seed, batch_size, world = int(tc.data_seed), int(config.train.batch_size), tc.world

    def init_params(rng):
        k1, k2 = jax.random.split(rng)
        return {"text": text.init_params(k1), "vision": vision.init_params(k2),
                "logit_scale": jnp.asarray(tc.init_logit_scale, jnp.float32)}

    def loss_fn(params, frozen, batch, rng):
        del frozen, rng
        t = text.apply({"params": params["text"]}, batch["ids"])["text_embeds"]
        pixels = clip_image_input(batch["image"], vision_cfg.image_size)
        v = vision.apply({"params": params["vision"]}, pixels)["image_embeds"]
        scale = jnp.minimum(params["logit_scale"], np.log(100.0))  # CLIP's clamp
        loss, acc = contrastive_loss(t, v, scale, batch["same"])
        return loss, {"retrieval_acc": acc, "logit_scale": scale}

    def make_batch(step):
        b = data.caption_batch(seed, step, batch_size, world)
        ids = tok(list(b["caption"]))
        same = (ids[:, None, :] == ids[None, :, :]).all(-1).astype(np.float32)
        return {"image": b["image"], "ids": ids, "same": same}

    return Task(name="shapesworld_clip", init_params=init_params, loss_fn=loss_fn, make_batch=make_batch)


def _noised(rng: np.random.Generator, images: np.ndarray, num_train_timesteps: int,
            **sampling) -> dict[str, np.ndarray]:
    """x0 in [-1, 1], noise, timesteps (``sampling``: ``training_timesteps`` options; default uniform)."""
    x0 = (images * 2.0 - 1.0).astype(np.float32)
    noise = rng.standard_normal(images.shape).astype(np.float32)
    return {"x0": x0, "noise": noise, "t": training_timesteps(rng, len(images), num_train_timesteps, **sampling)}


def t2i_task(config) -> Task:
    """Tiny T2I: DDPM training (the schedule config's prediction type) of jharm's UNet in pixel space
    ([-1, 1] images), conditioned on the frozen tiny CLIP's last hidden state."""
    from jharm.shapesworld import assets

    tc = config.task
    assets.interval_of(tc.get("guidance_interval"), "config.task.guidance_interval")  # fail before training
    clip = assets.load_clip(tc.clip_dir)
    ucfg = unet_config(tc, clip.text_config.hidden_size)
    unet = UNet2DConditionModel(ucfg)
    schedule = schedule_of(tc)
    seed, batch_size, world = int(tc.data_seed), int(config.train.batch_size), tc.world
    text = CLIPTextModel(clip.text_config)
    min_snr_gamma = float(tc.min_snr_gamma)
    sampling = dict(sampling=tc.timestep_sampling, logit_mean=float(tc.logit_mean), logit_std=float(tc.logit_std))

    def init_params(rng):
        return unet.init_params(rng, context_len=clip.tokenizer.max_length)["params"]

    def loss_fn(params, frozen, batch, rng):
        del rng
        context = text.apply({"params": frozen}, batch["ids"])["last_hidden_state"]
        x_t = add_noise(schedule, batch["x0"], batch["noise"], batch["t"])
        pred = unet.apply({"params": params}, x_t, batch["t"], jax.lax.stop_gradient(context))
        return diffusion_loss(schedule, pred, batch["x0"], batch["noise"], batch["t"], min_snr_gamma), {}

    def make_batch(step):
        b = data.caption_batch(seed, step, batch_size, world)
        rng = data.batch_rng(seed, step, "t2i_noise")
        texts = [("" if drop else c) for c, drop in zip(b["caption"], rng.random(batch_size) < tc.p_uncond)]
        return {"ids": clip.tokenizer(texts), **_noised(rng, b["image"], schedule.num_train_timesteps, **sampling)}

    return Task(name="shapesworld_t2i", init_params=init_params, loss_fn=loss_fn, make_batch=make_batch,
                frozen=clip.text_params)


def ip_task(config) -> Task:
    """Tiny IP-Adapter: trains ``image_proj`` and every attn2's ``to_k_ip``/``to_v_ip``
    on the frozen T2I UNet; the image prompt is the tiny CLIP's image embedding of
    the target image itself (as IP-Adapter is trained), text mostly empty."""
    from jharm.shapesworld import assets

    tc = config.task
    clip = assets.load_clip(tc.clip_dir)
    t2i = assets.load_t2i(tc.t2i_dir)
    d = clip.text_config.hidden_size
    ucfg = dataclasses.replace(t2i.unet_config, ip_adapter_tokens=int(tc.num_tokens))
    unet = UNet2DConditionModel(ucfg)
    proj = ImageProjModel(d, int(tc.num_tokens))
    text, vision = CLIPTextModel(clip.text_config), CLIPVisionModel(clip.vision_config)
    schedule = t2i.schedule
    seed, batch_size, world = int(tc.data_seed), int(config.train.batch_size), tc.world
    base = traverse_util.flatten_dict(t2i.unet_params)

    def init_params(rng):
        k1, k2 = jax.random.split(rng)
        fresh = traverse_util.flatten_dict(unet.init_params(k1, context_len=clip.tokenizer.max_length)["params"])
        # The trained UNet's weights, fresh (random) ip projections.
        merged = {k: (jnp.asarray(base[k]) if k in base else v) for k, v in fresh.items()}
        return {"unet": traverse_util.unflatten_dict(merged),
                "image_proj": proj.init(k2, jnp.zeros((1, clip.vision_config.projection_dim)))["params"]}

    def loss_fn(params, frozen, batch, rng):
        del rng
        context = text.apply({"params": frozen["text"]}, batch["ids"])["last_hidden_state"]
        embeds = vision.apply({"params": frozen["vision"]},
                              clip_image_input(batch["image"], clip.vision_config.image_size))["image_embeds"]
        embeds = embeds * batch["keep_image"][:, None]  # image dropout: zero embedding, as at CFG time
        tokens = proj.apply({"params": params["image_proj"]}, embeds)
        x_t = add_noise(schedule, batch["x0"], batch["noise"], batch["t"])
        pred = unet.apply({"params": params["unet"]}, x_t, batch["t"], context, ip_tokens=tokens)
        return diffusion_loss(schedule, pred, batch["x0"], batch["noise"], batch["t"]), {}

    def make_batch(step):
        b = data.caption_batch(seed, step, batch_size, world)
        rng = data.batch_rng(seed, step, "ip_noise")
        texts = [(c if keep else "") for c, keep in zip(b["caption"], rng.random(batch_size) < tc.p_text)]
        keep_image = (rng.random(batch_size) >= tc.p_drop_image).astype(np.float32)
        return {"ids": clip.tokenizer(texts), "image": b["image"], "keep_image": keep_image,
                **_noised(rng, b["image"], schedule.num_train_timesteps)}

    return Task(name="shapesworld_ip", init_params=init_params, loss_fn=loss_fn, make_batch=make_batch,
                trainable=("image_proj", "to_k_ip", "to_v_ip"),
                frozen={"text": clip.text_params, "vision": clip.vision_params})
