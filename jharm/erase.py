"""Generation and evaluation for concept erasure on local SD folders.

* :func:`read_prompt_csv` — an I2P/COCO-style prompt CSV (``prompt``,
  ``evaluation_seed``, any other columns kept) with row-numbered errors.
* :func:`make_generator` — a jitted "contexts + seeds -> images" sampler:
  CFG, SLD (a preset), or Co-Erasing+SLD (SLD's safety row also attends to the
  refined image tokens of the concept images through the IP-Adapter branch).
* :func:`evaluate` — ``jharm eval``: generate one image per CSV row, run the
  NudeNet detector, write ``images/``, ``results.jsonl`` and ``summary.md``.
  Everything is validated before the first image; the two result files are
  written atomically at the end, so an interrupted run leaves no complete-looking
  output.
* :func:`generate_concept_images` — the seeded "a photo of {c}" images that
  feed Co-Erasing.
"""
from __future__ import annotations

import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jharm.config import ConfigError

# diffusers' SLD default safety concept.
SLD_SAFETY_CONCEPT = ("hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity, "
                      "bodily fluids, blood, obscene gestures, illegal activity, drug use, theft, vandalism, "
                      "weapons, child abuse, brutality, cruelty")


def read_prompt_csv(path: str) -> list[dict]:
    """Rows of a prompt CSV; ``evaluation_seed`` parsed to a non-negative int. Errors name file, row, column."""
    if not os.path.isfile(path):
        raise ConfigError(f"prompt CSV not found: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("prompt", "evaluation_seed") if c not in (reader.fieldnames or [])]
        if missing:
            raise ConfigError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
        rows = []
        for line, row in enumerate(reader, start=2):
            seed = (row["evaluation_seed"] or "").strip()
            try:
                value = int(float(seed)) if seed and float(seed).is_integer() else None
            except ValueError:
                value = None
            if value is None or value < 0 or value >= 2 ** 31:
                raise ConfigError(f"{path}:{line}: evaluation_seed must be an integer in [0, 2^31), found {seed!r}")
            if row["prompt"] is None:
                raise ConfigError(f"{path}:{line}: the row has no prompt")
            rows.append({**row, "evaluation_seed": value})
    if not rows:
        raise ConfigError(f"{path}: no prompt rows")
    return rows


def _encode(pipe, prompts) -> jax.Array:
    from jharm.train.tasks.erasure import encode_prompts

    return jnp.asarray(encode_prompts(pipe.tokenizer, pipe.text_encoder, pipe.text_encoder_params, prompts))


def make_generator(pipe, *, steps: int = 50, guidance_scale: float = 7.5, sld: str = "", resolution: int = 512):
    """``(unet_params, contexts, seeds) -> uint8 images``, jitted once per batch shape.

    ``contexts`` is ``{"ctx": (R, B, L, D)}`` (rows: ∅, prompt[, safety]) plus,
    for Co-Erasing+SLD, ``"ip"`` (R, B, N, D) and ``"scale"`` (R, B).
    """
    from jharm.diffusion.guidance import CFG, sld_preset
    from jharm.diffusion.samplers import make_plan, sample
    from jharm.diffusion.schedules import from_scheduler_config

    plan = make_plan(from_scheduler_config(pipe.scheduler_config), "ddim", steps)
    guidance = sld_preset(sld, guidance_scale) if sld else CFG(guidance_scale)
    down = 2 ** (len(pipe.vae_config.block_out_channels) - 1)
    shape = (resolution // down, resolution // down, pipe.unet_config.in_channels)
    unet, vae, scaling = pipe.unet, pipe.vae, pipe.vae_scaling_factor

    def model_fn(params):
        def call(x, t, c):
            if "ip" in c:
                return unet.apply(params, x, t, c["ctx"], ip_tokens=c["ip"], ip_scale=c["scale"])
            return unet.apply(params, x, t, c["ctx"])
        return call

    @jax.jit
    def generate(unet_params, vae_params, contexts, seeds):
        x_T = jax.vmap(lambda s: jax.random.normal(jax.random.key(s), shape))(seeds)
        latents = sample(model_fn(unet_params), plan, x_T, contexts, guidance=guidance)
        images = vae.apply(vae_params, latents / scaling, method=vae.decode)
        return jnp.round(jnp.clip(images / 2 + 0.5, 0, 1) * 255).astype(jnp.uint8)

    return lambda unet_params, contexts, seeds: np.asarray(generate(unet_params, pipe.vae_params, contexts,
                                                                    jnp.asarray(seeds, jnp.uint32)))


def concept_image_tokens(pipe, image_folder: str, concept: str, limit: int = 200) -> jax.Array:
    """Refined IP tokens (n, N, D) of the images in ``image_folder``, refined with E_T(``concept``)."""
    from jharm.objectives.erasure import refine_image_tokens
    from jharm.train.tasks.erasure import image_embeddings, load_images

    if pipe.ip_adapter is None or pipe.image_encoder is None:
        raise ConfigError("Co-Erasing tokens need an IP-Adapter file and a CLIP image encoder")
    images = load_images(image_folder, limit, pipe.image_encoder_config.image_size)
    raw = pipe.ip_adapter.image_tokens(image_embeddings(pipe.image_encoder, pipe.image_encoder_params, images))
    text = _encode(pipe, [concept])
    return refine_image_tokens(raw, jnp.broadcast_to(text, (raw.shape[0],) + text.shape[1:]))


def build_contexts(pipe, prompts, *, safety_concept: str = "", image_tokens=None) -> dict:
    """Stacked condition rows for a batch of prompts: [∅, prompt] or [∅, prompt, safety]."""
    b = len(prompts)
    ctx = _encode(pipe, ["", *prompts] + ([safety_concept] if safety_concept else []))
    rows = [jnp.broadcast_to(ctx[:1], (b,) + ctx.shape[1:]), ctx[1:b + 1]]
    if safety_concept:
        rows.append(jnp.broadcast_to(ctx[-1:], (b,) + ctx.shape[1:]))
    out = {"ctx": jnp.stack(rows)}
    if image_tokens is not None:
        if not safety_concept:
            raise ConfigError("image tokens (Co-Erasing+SLD) extend SLD's safety row: set an SLD preset")
        tokens = image_tokens[jnp.arange(b) % image_tokens.shape[0]]  # cycle the concept images over rows
        out["ip"] = jnp.broadcast_to(tokens[None], (3,) + tokens.shape)
        out["scale"] = jnp.asarray([[0.0] * b, [0.0] * b, [1.0] * b], jnp.float32)  # only the safety row
    return out


def evaluate(model_path: str, prompt_csv: str, out_dir: str, *, unet: str = "", steps: int = 50,
             guidance_scale: float = 7.5, sld: str = "", safety_concept: str = SLD_SAFETY_CONCEPT,
             ip_adapter: str = "", concept_images: str = "", concept: str = "nudity", resolution: int = 512,
             batch_size: int = 4, detector: str = "nudenet") -> dict:
    """``jharm eval``: one image per CSV row, NudeNet per image, JSONL + summary table. Returns the summary."""
    from PIL import Image

    from jharm.pipeline import load_pipeline
    from jharm.weights.io import atomic_write_bytes

    rows = read_prompt_csv(prompt_csv)
    if detector not in ("nudenet", "none"):
        raise ConfigError(f"detector {detector!r} is not 'nudenet' or 'none'")
    if concept_images and not sld:
        raise ConfigError("--concept-images (Co-Erasing+SLD) needs --sld PRESET")
    if ip_adapter and not os.path.isfile(ip_adapter):
        raise ConfigError(f"IP-Adapter file not found: {ip_adapter}")
    if concept_images and not ip_adapter:
        raise ConfigError("--concept-images needs --ip-adapter FILE")
    if os.path.exists(os.path.join(out_dir, "summary.md")):
        raise ConfigError(f"{out_dir} already holds a finished evaluation (summary.md); choose another --out")
    pipe = load_pipeline(model_path, ip_adapter=ip_adapter or None)
    unet_params = pipe.unet_params
    if unet:
        from jharm.train.tasks.erasure import merge_unet_weights

        unet_params = merge_unet_weights(unet_params, unet)
    for i, row in enumerate(rows):  # every prompt must tokenize before anything is generated
        if row["prompt"].strip() and not pipe.tokenizer.encode(row["prompt"]):
            raise ConfigError(f"{prompt_csv}:{i + 2}: prompt {row['prompt']!r} tokenizes to nothing")
    tokens = concept_image_tokens(pipe, concept_images, concept) if concept_images else None
    generate = make_generator(pipe, steps=steps, guidance_scale=guidance_scale, sld=sld, resolution=resolution)
    det = None
    if detector == "nudenet":
        from jharm.eval.nudenet import NudeNetDetector

        det = NudeNetDetector()
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    records, all_dets = [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        pad = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one compiled batch shape
        contexts = build_contexts(pipe, [r["prompt"] for r in pad], safety_concept=safety_concept if sld else "",
                                  image_tokens=tokens)
        images = generate(unet_params, contexts, [r["evaluation_seed"] for r in pad])[:len(chunk)]
        dets = det.detect(images) if det is not None else [[] for _ in chunk]
        for j, (row, image, d) in enumerate(zip(chunk, images, dets)):
            name = f"images/{start + j:05d}.png"
            Image.fromarray(image).save(os.path.join(out_dir, name))
            records.append({**row, "index": start + j, "image": name, "detections": d,
                            "nude": bool(det is not None and _is_nude(d))})
            all_dets.append(d)
    summary = {"num_images": len(records), "sld": sld or None, "co_erasing_sld": tokens is not None,
               "steps": steps, "guidance_scale": guidance_scale}
    if det is not None:
        from jharm.eval.nudenet import summarize

        summary.update(summarize(all_dets))
    lines = ["# jharm eval", "", f"model `{model_path}`" + (f", UNet `{unet}`" if unet else ""),
             f"prompts `{prompt_csv}` ({len(records)} rows)", "", "| field | value |", "| --- | --- |"]
    for key, value in summary.items():
        lines.append(f"| {key} | {json.dumps(value)} |")
    atomic_write_bytes(os.path.join(out_dir, "results.jsonl"),
                       "".join(json.dumps(r) + "\n" for r in records).encode("utf-8"))
    atomic_write_bytes(os.path.join(out_dir, "summary.md"), ("\n".join(lines) + "\n").encode("utf-8"))
    return summary


def _is_nude(detections) -> bool:
    from jharm.eval.nudenet import is_nude

    return is_nude(detections)


def generate_concept_images(model_path: str, concept: str, n: int, out_dir: str, *, seed: int = 0,
                            template: str = "a photo of {c}", steps: int = 50, guidance_scale: float = 7.5,
                            resolution: int = 512, batch_size: int = 4) -> str:
    """``n`` seeded images of ``template.format(c=concept)`` from the clean model, as PNGs in ``out_dir``."""
    from PIL import Image

    from jharm.pipeline import load_pipeline

    prompt = template.format(c=concept)
    pipe = load_pipeline(model_path)
    if not pipe.tokenizer.encode(concept):
        raise ConfigError(f"concept {concept!r} tokenizes to nothing")
    generate = make_generator(pipe, steps=steps, guidance_scale=guidance_scale, resolution=resolution)
    contexts = build_contexts(pipe, [prompt] * batch_size)
    os.makedirs(out_dir, exist_ok=True)
    for start in range(0, n, batch_size):
        images = generate(pipe.unet_params, contexts, [seed + start + j for j in range(batch_size)])
        for j, image in enumerate(images[:n - start]):
            Image.fromarray(image).save(os.path.join(out_dir, f"{start + j:05d}.png"))
    return out_dir
