"""LightFair task: fine-tune ONLY the CLIP text encoder so that neutral prompts
are equally close to every attribute centroid (METHODS.md §2).

The param tree is ``{"text_encoder": ...}`` (plus ``{"lora": ...}`` in LoRA
mode); the UNet is not part of it, so it cannot change. The text projection is
frozen (emb_T = projection of the pooled EOS state, in the centroids' space).
Each step draws ``train.batch_size`` concepts (a pure function of the step)
and computes ℓ_o + λ_q ℓ_q (+ λ_r keep-close on the contexts of
``keep_prompts``, what the UNet reads). At the end the debiased encoder
(LoRA merged) is exported as a transformers folder ``<workdir>/text_encoder``.
"""
from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from jharm.config import ConfigError
from jharm.fairness import attribute_prompt, check_attributes, load_centroids, neutral_prompt
from jharm.objectives.fairness import keep_close, lightfair_loss, target_offsets
from jharm.train.task import Task

LORA_TARGETS = r"(q_proj|k_proj|v_proj|out_proj|fc1|fc2)/kernel$"


def default_task_config() -> ml_collections.ConfigDict:
    """``config.task`` of a LightFair run (every field documented in docs/fairness.md)."""
    return ml_collections.ConfigDict(dict(
        name="lightfair",
        text_encoder="",          # transformers CLIPTextModel(WithProjection) folder
        tokenizer="",             # tokenizer folder; "shapesworld" or "openai" for the built-in ones
        projection="",            # CLIP folder with text_projection, if the encoder has none (SD)
        centroids="",             # from `jharm fair centroids`
        generator="",             # expected generator identity of the centroids ("" = do not check)
        image_encoder="",         # expected image-encoder identity of the centroids ("" = do not check)
        neutral_template="Photo portrait of a {concept}, a person",
        attribute_template="Photo portrait of a {attribute} {concept}, a person",
        target=(),                # π per attribute (empty = uniform)
        temperature=0.01,         # T of the target offsets γ = T log(A π)
        lambda_q=1.0,
        lambda_r=0.0,
        keep_prompts=(),          # non-attribute prompts whose contexts keep close to the original
        mode="full",              # "full" | "lora"
        lora_rank=4,
        lora_alpha=4.0,
        data_seed=0,
    ))


SD_ATTRIBUTES = {
    "gender": ("female", "male"),
    "race": ("asian", "black", "indian", "white"),
    "age": ("young", "middle-aged", "old"),
    # intersectional: a list of groups, combined as their product ("female asian", ...)
    "gender_race": (("female", "male"), ("asian", "black", "indian", "white")),
}
SD_NEUTRAL = "Photo portrait of a {occupation}, a person"
SD_ATTRIBUTE = "Photo portrait of a {attribute} {occupation}, a person"


def sd_config(resolution: int, attribute: str = "gender") -> ml_collections.ConfigDict:
    """A full SD LightFair config (train + ``fair`` section for `jharm fair centroids`); configs/fair/sd*.py."""
    from jharm.train.defaults import base_config

    if attribute not in SD_ATTRIBUTES:
        raise ValueError(f"unknown attribute set {attribute!r}; choose one of {', '.join(SD_ATTRIBUTES)}")
    c = base_config()
    c.train.update(steps=1000, batch_size=8, log_every=20, ckpt_every=200)
    c.optim.update(name="adam", lr=1e-5, warmup_steps=50, clip_norm=1.0)
    c.task = default_task_config()
    c.task.update(neutral_template=SD_NEUTRAL, attribute_template=SD_ATTRIBUTE, lambda_q=1.0, lambda_r=0.1,
                  keep_prompts=("a photo of a mountain landscape", "a bowl of fruit on a table",
                                "a red car parked on a street"))
    # `jharm fair centroids` reads this section; the train loop ignores it.
    c.fair = ml_collections.ConfigDict(dict(
        model="",              # local diffusers folder (set with --config.fair.model=...)
        clip="",                 # local CLIP folder (vision tower + projections), e.g. clip-vit-large-patch14
        concepts=(),             # or concepts_file: one occupation a line (user-supplied)
        concepts_file="",
        attributes=SD_ATTRIBUTES[attribute],
        num_images=32, seed=0, steps=50, guidance_scale=7.5, resolution=resolution, batch_size=4,
        tau=600,                 # two-stage sampling: original encoder for t >= tau, debiased below
    ))
    return c


def _tokenizer(spec: str, folder: str):
    from jharm.tokenizer import CLIPTokenizer

    if spec == "shapesworld":
        from jharm.shapesworld.vocab import shapesworld_tokenizer

        return shapesworld_tokenizer()
    if spec == "openai":
        return CLIPTokenizer.default()
    path = spec or os.path.join(os.path.dirname(os.path.normpath(folder)), "tokenizer")
    if not os.path.isdir(path):
        raise ConfigError(f"config.task.tokenizer: no tokenizer folder at {path}")
    return CLIPTokenizer.from_pretrained(path)


def lora_init(params, rank: int, rng) -> dict:
    """A (down: in x r, random) and B (up: r x out, zeros) per targeted kernel: LoRA starts as the identity edit."""
    flat = traverse_util.flatten_dict(params, sep="/")
    out = {}
    for i, (path, kernel) in enumerate(sorted((p, k) for p, k in flat.items() if re.search(LORA_TARGETS, p))):
        key = jax.random.fold_in(rng, i)
        out[path.replace("/", ".")] = {"down": jax.random.normal(key, (kernel.shape[0], rank)) / rank,
                                       "up": jnp.zeros((rank, kernel.shape[1]))}
    return out


def lora_merge(params, lora: dict, scale: float):
    """Kernels + scale · down @ up (the minimal LoRA: an extra tree merged into the kernels)."""
    if not lora:
        return params
    flat = traverse_util.flatten_dict(params, sep="/")
    for name, ab in lora.items():
        path = name.replace(".", "/")
        flat[path] = flat[path] + scale * ab["down"] @ ab["up"]
    return traverse_util.unflatten_dict(flat, sep="/")


def make_task(config: ml_collections.ConfigDict) -> Task:
    """Factory registered as "lightfair"."""
    from jharm.weights.clip import export_clip_text_model, load_clip_text_model

    tc = config.task
    if tc.mode not in ("full", "lora"):
        raise ConfigError(f"config.task.mode: {tc.mode!r} is not 'full' or 'lora'")
    if not tc.text_encoder or not tc.centroids:
        raise ConfigError("config.task.text_encoder and config.task.centroids must be set")
    module, te_params, te_cfg = load_clip_text_model(tc.text_encoder)
    tokenizer = _tokenizer(tc.tokenizer, tc.text_encoder)
    cents = load_centroids(tc.centroids, generator=tc.generator or None, encoder=tc.image_encoder or None)
    attrs = check_attributes(cents.attributes, f"attributes of {tc.centroids}")
    concepts = cents.concepts
    if te_cfg.with_projection:
        projection = None
    elif tc.projection:
        from jharm.weights.clip import load_clip_text_model as load_proj

        _, proj_params, proj_cfg = load_proj(tc.projection)
        if not proj_cfg.with_projection:
            raise ConfigError(f"config.task.projection: {tc.projection} has no text_projection")
        projection = np.asarray(proj_params["text_projection"]["kernel"])
    else:
        raise ConfigError(f"{tc.text_encoder} has no text_projection: set config.task.projection to a CLIP folder "
                          f"whose text_projection maps the encoder into the image centroids' space")
    dim = projection.shape[1] if projection is not None else te_cfg.projection_dim
    if cents.values.shape[-1] != dim:
        raise ConfigError(f"centroids in {tc.centroids} are {cents.values.shape[-1]}-dim, the text embeddings "
                          f"{dim}-dim: the centroids were made with another CLIP")
    offsets = target_offsets(np.asarray(tc.target) if len(tc.target) else None, len(attrs), tc.temperature)

    length = min(tokenizer.max_length, te_cfg.max_position_embeddings)
    neutral_ids = tokenizer([neutral_prompt(tc.neutral_template, c) for c in concepts], length)
    attr_ids = tokenizer([attribute_prompt(tc.attribute_template, c, a) for c in concepts for a in attrs], length)
    attr_ids = attr_ids.reshape(len(concepts), len(attrs), -1)
    keep_ids = tokenizer(list(tc.keep_prompts), length) if len(tc.keep_prompts) else None
    te_host = jax.device_get(te_params)
    frozen = {"centroids": np.asarray(cents.values, np.float32)}
    if keep_ids is not None:
        frozen["keep_context"] = np.asarray(module.apply({"params": te_host}, jnp.asarray(keep_ids))["last_hidden_state"])
    if projection is not None:
        frozen["projection"] = projection
    lora_scale = tc.lora_alpha / tc.lora_rank

    def text_params(params):
        return lora_merge(params["text_encoder"], params.get("lora", {}), lora_scale)

    def init_params(rng):
        params = {"text_encoder": te_host}
        if tc.mode == "lora":
            params["lora"] = lora_init(te_host, tc.lora_rank, rng)
        return params

    def embed(tp, ids, frozen):
        out = module.apply({"params": tp}, ids)
        emb = out["text_embeds"] if projection is None else out["pooler_output"] @ frozen["projection"]
        return emb, out["last_hidden_state"]

    def loss_fn(params, frozen, batch, rng):
        del rng  # deterministic given the batch
        tp = text_params(params)
        idx = batch["concept"]
        n = idx.shape[0]
        ids = jnp.concatenate([jnp.asarray(neutral_ids)[idx], jnp.asarray(attr_ids)[idx].reshape(-1, length)])
        emb, _ = embed(tp, ids, frozen)
        neutral, per_attr = emb[:n], emb[n:].reshape(n, len(attrs), -1)
        loss, metrics = lightfair_loss(neutral, per_attr, frozen["centroids"][idx], offsets=jnp.asarray(offsets),
                                       lambda_q=tc.lambda_q)
        if keep_ids is not None and tc.lambda_r:
            _, ctx = embed(tp, jnp.asarray(keep_ids), frozen)
            l_r = keep_close(ctx, frozen["keep_context"]) / ctx.shape[1]  # mean over tokens
            metrics["loss_keep"] = l_r
            loss = loss + tc.lambda_r * l_r
            metrics["loss"] = loss
        return loss, metrics

    def make_batch(step):
        rng = np.random.default_rng([tc.data_seed, step])
        b = config.train.batch_size
        idx = rng.permutation(len(concepts))[:b] if b <= len(concepts) else rng.integers(0, len(concepts), b)
        return {"concept": idx.astype(np.int32)}

    def export(params, workdir):
        tp = jax.device_get(text_params(params))
        return export_clip_text_model(te_cfg, tp, os.path.join(workdir, "text_encoder"))

    trainable = ("^lora/",) if tc.mode == "lora" else ("^text_encoder/text_model/",)
    return Task(name="lightfair", init_params=init_params, loss_fn=loss_fn, make_batch=make_batch,
                trainable=trainable, frozen=frozen, export=export)
