"""ESD and Co-Erasing as train-loop tasks (METHODS.md §1).

Every step: draw a DDIM index k ~ U{0..S-1}, sample with the *student* (no
gradient) from pure noise down to index k (DDIM eta 0, CFG with the concept
prompt, descending timesteps), then query the UNet at a DDPM timestep
t ~ U[round(1000k/S), round(1000(k+1)/S)) as the official ESD code does (it
mirrors the noise level of x_t; we keep that to match published models).
Co-Erasing then blurs the latent and conditions the concept branch on
[text; refined image tokens]. All randomness (k, t, noise, image index) is
drawn in ``make_batch`` from the step, so a resumed run repeats the same
numbers.

A model is given as an :class:`ErasureModel` (UNet module + params, schedule,
prompt embeddings, refined image tokens): ``sd_model`` builds one from a local
diffusers SD folder, the ShapesWorld demo builds one from the shipped assets,
tests build one from random tiny weights.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from jharm.config import ConfigError
from jharm.diffusion.samplers import make_plan, sample
from jharm.diffusion.schedules import NoiseSchedule
from jharm.objectives.erasure import co_erasing_loss, esd_loss, gaussian_blur, refine_image_tokens
from jharm.train.task import Task

# ESD parameter sets as regexes over "a/b/c" paths (diffusers names).
# esd-u follows METHODS ("everything except attn2 and the time embedding");
# noxattn/notime follow the official ESD code, which also freezes the output
# layer ("out." in LDM = conv_norm_out/conv_out here).
PARAM_SETS: dict[str, tuple[str, ...]] = {
    "esd-x": (r"(^|/)attn2/",),
    "esd-u": (r"^(?!(.*/)?attn2/)(?!(params/)?time_embedding/).*$",),
    "full": (r".*",),
    "selfattn": (r"(^|/)attn1/",),
    "notime": (r"^(?!(params/)?(time_embedding|conv_norm_out|conv_out)/).*$",),
    "noxattn": (r"^(?!(.*/)?attn2/)(?!(params/)?(time_embedding|conv_norm_out|conv_out)/).*$",),
}
METHODS = ("esd", "co_erasing")


@dataclasses.dataclass
class ErasureModel:
    """Everything the erasure losses need from a text-to-image model.

    Attributes:
      unet: a ``UNet2DConditionModel`` (with IP-Adapter layers for Co-Erasing).
      params: its variables ``{"params": ...}``: the student's start and the frozen teacher.
      schedule: the training noise schedule (prediction type included).
      latent_shape: (H, W, C) of the UNet input.
      cond_context: (1, L, D) text embeddings of the concept prompt.
      uncond_context: (1, L, D) text embeddings of "".
      image_tokens: (n, N, D) refined image tokens of the concept images (Co-Erasing), else None.
      export: optional ``(params, workdir) -> path`` (e.g. a diffusers UNet folder).
    """

    unet: Any
    params: Any
    schedule: NoiseSchedule
    latent_shape: tuple[int, int, int]
    cond_context: np.ndarray
    uncond_context: np.ndarray
    image_tokens: np.ndarray | None = None
    export: Any = None


def default_task_config(method: str = "esd") -> ml_collections.ConfigDict:
    """``config.task`` for ``erasure`` (see docs/erasure.md for every field)."""
    return ml_collections.ConfigDict(dict(
        name="erasure", method=method, source="sd", model_path="", stage1_unet="", ip_adapter="",
        image_encoder="", concept_images="", num_concept_images=200, concept="nudity", prompt="",
        param_set="esd-u" if method == "co_erasing" else "esd-x", eta=1.0, sample_steps=50,
        sample_guidance=3.0, resolution=512, blur_kernel=3, ip_scale=1.0, data_seed=0))


def query_timestep(k: np.ndarray, u: np.ndarray, num_steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """ESD's DDPM timestep for DDIM index k: ``U[round(T k/S), round(T (k+1)/S))`` from uniforms ``u``."""
    lo = np.round(num_train_timesteps * k / num_steps).astype(np.int64)
    hi = np.round(num_train_timesteps * (k + 1) / num_steps).astype(np.int64)
    return np.minimum(lo + np.floor(u * (hi - lo)).astype(np.int64), num_train_timesteps - 1).astype(np.int32)


def _eps_fn(unet):
    def eps(params, z, t, context, ip_tokens=None, ip_scale=None):
        if ip_tokens is None:
            return unet.apply(params, z, t, context)
        return unet.apply(params, z, t, context, ip_tokens=ip_tokens, ip_scale=ip_scale)
    return eps


def partial_sample(unet, params, plan, x_T, cond, uncond, k, guidance_scale: float):
    """The latent at DDIM index ``k`` (traced is fine) sampled with ``params`` and CFG, no gradient."""
    params = jax.lax.stop_gradient(params)
    b = x_T.shape[0]
    contexts = jnp.stack([jnp.broadcast_to(uncond, (b,) + uncond.shape[1:]),
                          jnp.broadcast_to(cond, (b,) + cond.shape[1:])])
    x = sample(lambda x, t, c: unet.apply(params, x, t, c), plan, x_T, contexts,
               guidance_scale=guidance_scale, stop_index=k)
    return jax.lax.stop_gradient(x)


def build_task(config: ml_collections.ConfigDict, model: ErasureModel) -> Task:
    """The ESD / Co-Erasing task for ``model`` (``config.task.method`` picks the loss)."""
    tc = config.task
    if tc.method not in METHODS:
        raise ConfigError(f"config.task.method: {tc.method!r} is not one of {METHODS}")
    if tc.param_set not in PARAM_SETS:
        raise ConfigError(f"config.task.param_set: {tc.param_set!r} is not one of {sorted(PARAM_SETS)}")
    co = tc.method == "co_erasing"
    if co and model.image_tokens is None:
        raise ConfigError("config.task.method=co_erasing needs concept images (config.task.concept_images)")
    if not 1 <= tc.sample_steps:
        raise ConfigError(f"config.task.sample_steps must be >= 1, found {tc.sample_steps}")
    plan = make_plan(model.schedule, "ddim", tc.sample_steps, eta=0.0)
    unet, eps_fn = model.unet, _eps_fn(model.unet)
    batch_size, shape = config.train.batch_size, tuple(model.latent_shape)
    n_images = 0 if model.image_tokens is None else len(model.image_tokens)
    frozen = {"teacher": model.params, "cond": jnp.asarray(model.cond_context),
              "uncond": jnp.asarray(model.uncond_context)}
    if co:
        frozen["image_tokens"] = jnp.asarray(model.image_tokens)
    start = jax.tree.map(jnp.asarray, model.params)

    def make_batch(step):
        rng = np.random.default_rng([tc.data_seed, step])
        k = int(rng.integers(0, tc.sample_steps))  # one index per step, shared by the rows
        batch = {"x_T": rng.standard_normal((batch_size,) + shape).astype(np.float32),
                 "k": np.full((batch_size,), k, np.int32),
                 "t": query_timestep(np.full((batch_size,), k), rng.random(batch_size), tc.sample_steps,
                                     model.schedule.num_train_timesteps)}
        if co:
            batch["image_index"] = rng.integers(0, n_images, size=(batch_size,)).astype(np.int32)
        return batch

    def loss_fn(params, frozen, batch, rng):
        del rng  # the batch carries all randomness
        b = batch["x_T"].shape[0]
        cond = jnp.broadcast_to(frozen["cond"], (b,) + frozen["cond"].shape[1:])
        uncond = jnp.broadcast_to(frozen["uncond"], (b,) + frozen["uncond"].shape[1:])
        z = partial_sample(unet, params, plan, batch["x_T"], frozen["cond"], frozen["uncond"], batch["k"][0],
                           tc.sample_guidance)
        if not co:
            return esd_loss(params, frozen["teacher"], eps_fn, z, batch["t"], cond, uncond, eta=tc.eta)
        z = gaussian_blur(z, tc.blur_kernel)
        tokens = frozen["image_tokens"][batch["image_index"]]
        return co_erasing_loss(params, frozen["teacher"], eps_fn, z, batch["t"], cond, uncond, tokens,
                               eta=tc.eta, ip_scale=tc.ip_scale)

    return Task(name=f"erasure_{tc.method}", init_params=lambda rng: start, loss_fn=loss_fn,
                make_batch=make_batch, trainable=PARAM_SETS[tc.param_set], frozen=frozen, export=model.export)


def concept_prompt(tc) -> str:
    """The erased prompt: ``config.task.prompt`` or the concept itself."""
    return tc.prompt or tc.concept


def encode_prompts(tokenizer, text_encoder, text_params, prompts) -> np.ndarray:
    """(len(prompts), L, D) last hidden states; an error if a non-empty prompt tokenizes to nothing."""
    for p in prompts:
        if p.strip() and not tokenizer.encode(p):
            raise ConfigError(f"prompt {p!r} tokenizes to nothing (no known tokens)")
    ids = jnp.asarray(tokenizer(list(prompts)))
    return np.asarray(text_encoder.apply(text_params, ids)["last_hidden_state"], np.float32)


def load_images(folder: str, limit: int, size: int) -> np.ndarray:
    """Up to ``limit`` PNG/JPEG images of ``folder`` (sorted), RGB in [0, 1], resized to ``size``."""
    from PIL import Image

    if not os.path.isdir(folder):
        raise ConfigError(f"concept image folder not found: {folder}")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith((".png", ".jpg", ".jpeg")))[:limit]
    if not names:
        raise ConfigError(f"no .png/.jpg concept images in {folder}")
    out = []
    for name in names:
        with Image.open(os.path.join(folder, name)) as im:
            out.append(np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), np.float32) / 255.0)
    return np.stack(out)


CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def image_embeddings(vision, vision_params, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """CLIP image embeddings (projected) of [0, 1] NHWC images, CLIP-normalised."""
    apply = jax.jit(lambda p, x: vision.apply(p, x)["image_embeds"])
    pixels = (images - CLIP_MEAN) / CLIP_STD
    return np.concatenate([np.asarray(apply(vision_params, pixels[i:i + batch_size]))
                           for i in range(0, len(pixels), batch_size)])


def merge_unet_weights(variables, unet_folder: str):
    """``variables`` with every weight of the diffusers UNet folder ``unet_folder``
    (e.g. an ESD export) put in; extra leaves (merged IP-Adapter layers) are kept."""
    from jharm.weights.diffusers import load_unet

    _, other, _ = load_unet(unet_folder)
    flat = traverse_util.flatten_dict(variables)
    new = traverse_util.flatten_dict(other)
    for key, value in new.items():
        if key in flat and flat[key].shape != value.shape:
            raise ConfigError(f"{unet_folder}: {'/'.join(key)} has shape {value.shape}, expected {flat[key].shape}")
    flat.update(new)
    return traverse_util.unflatten_dict(flat)


def sd_model(config: ml_collections.ConfigDict) -> ErasureModel:
    """An :class:`ErasureModel` from the local diffusers SD folder ``config.task.model_path``.

    Co-Erasing also reads the stage-1 (ESD) UNet folder ``stage1_unet`` (student
    start and frozen teacher), the IP-Adapter file and the concept images.
    """
    from jharm.diffusion.schedules import from_scheduler_config
    from jharm.pipeline import load_pipeline
    from jharm.weights.diffusers import export_unet

    tc = config.task
    co = tc.method == "co_erasing"
    if not tc.model_path:
        raise ConfigError("config.task.model_path: set it to a local diffusers SD folder")
    if co and not tc.ip_adapter:
        raise ConfigError("config.task.ip_adapter: Co-Erasing needs an IP-Adapter file")
    if co and not os.path.isfile(tc.ip_adapter):
        raise ConfigError(f"config.task.ip_adapter: file not found: {tc.ip_adapter}")
    pipe = load_pipeline(tc.model_path, ip_adapter=tc.ip_adapter or None, image_encoder=tc.image_encoder or None)
    params = pipe.unet_params
    if tc.stage1_unet:
        params = merge_unet_weights(params, tc.stage1_unet)
    prompts = encode_prompts(pipe.tokenizer, pipe.text_encoder, pipe.text_encoder_params, [concept_prompt(tc), ""])
    tokens = None
    if co:
        if pipe.image_encoder is None:
            raise ConfigError("Co-Erasing needs a CLIP image encoder: config.task.image_encoder or "
                              f"{tc.model_path}/image_encoder")
        images = load_images(tc.concept_images, tc.num_concept_images, pipe.image_encoder_config.image_size)
        embeds = image_embeddings(pipe.image_encoder, pipe.image_encoder_params, images)
        raw = np.asarray(pipe.ip_adapter.image_tokens(embeds))
        tokens = np.asarray(refine_image_tokens(jnp.asarray(raw), jnp.broadcast_to(prompts[:1], (len(raw),)
                                                                                   + prompts.shape[1:])))
    down = 2 ** (len(pipe.vae_config.block_out_channels) - 1)
    shape = (tc.resolution // down, tc.resolution // down, pipe.unet_config.in_channels)
    unet_config = pipe.unet_config
    return ErasureModel(pipe.unet, params, from_scheduler_config(pipe.scheduler_config), shape, prompts[:1],
                        prompts[1:], tokens,
                        export=lambda p, workdir: export_unet(unet_config, p, os.path.join(workdir, "unet")))


def make_task(config: ml_collections.ConfigDict) -> Task:
    """Factory registered as "erasure": ``config.task.source`` is "sd" or "shapesworld"."""
    tc = config.task
    if tc.source == "sd":
        return build_task(config, sd_model(config))
    if tc.source == "shapesworld":
        from jharm.erase_demo import shapesworld_model

        return build_task(config, shapesworld_model(config))
    raise ConfigError(f"config.task.source: {tc.source!r} is not 'sd' or 'shapesworld'")
