"""Fairness for text-to-image models (METHODS.md §2): prompts, attribute
centroids with provenance, two-stage (LightFair) sampling, and the baselines'
glue (UCE-debias α iteration, debias-VL, Fair Diffusion).

A :class:`TextToImage` bundles what these need: a CLIP text encoder (+ its
tokenizer), a denoiser with the SD UNet's call signature, a schedule and an
optional latent decoder. Every sampling entry point computes the text contexts
ONCE per prompt and runs the scanned sampler of ``jharm.diffusion.samplers``.

Two-stage sampling (LightFair): steps whose model timestep is ``t >= tau``
use the ORIGINAL encoder's context, steps with ``t < tau`` the DEBIASED one.
So ``tau = 0`` is the original model and ``tau = T`` (1000) the debiased one.
(Issue 7's sentence "τ = 0 equals the debiased encoder, τ = T the original"
has these endpoints swapped relative to METHODS.md; jharm follows METHODS.md.)
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import os
import string
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jharm.diffusion import samplers
from jharm.diffusion.guidance import CFG

PyTree = Any
CENTROID_FORMAT = "jharm-fairness-centroids-v1"


class FairnessError(ValueError):
    """Bad fairness input: attributes, templates, centroid files; the message says which."""


# --- prompts and attributes -----------------------------------------------------

def check_attributes(attributes: Sequence[str], what: str = "attributes") -> tuple[str, ...]:
    """At least two distinct, non-empty attribute names (a one-element list cannot be balanced)."""
    if isinstance(attributes, str):
        raise FairnessError(f"{what} must be a list of names, found the string {attributes!r}")
    attrs = tuple(str(a).strip() for a in attributes)
    if len(attrs) < 2:
        raise FairnessError(f"{what} needs at least two attributes to balance, found {list(attrs)}")
    if any(not a for a in attrs) or len(set(attrs)) != len(attrs):
        raise FairnessError(f"{what} must be distinct non-empty names, found {list(attrs)}")
    return attrs


def combine_attributes(groups: Sequence[Sequence[str]]) -> tuple[str, ...]:
    """Intersectional attributes (gender x race): the product of groups, words joined by a space."""
    groups = [check_attributes(g, f"attribute group {i}") for i, g in enumerate(groups)]
    return tuple(" ".join(p) for p in itertools.product(*groups))


def fill_template(template: str, required: Sequence[str], **values: str) -> str:
    """``template.format(**values)`` after checking it has every ``required`` placeholder."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise FairnessError(f"malformed prompt template {template!r}: {err}") from None
    missing = [f for f in required if f not in fields]
    if missing:
        raise FairnessError(f"prompt template {template!r} has no placeholder "
                            + ", ".join("{" + m + "}" for m in missing))
    unknown = fields - set(values)
    if unknown:
        raise FairnessError(f"prompt template {template!r}: no value for " + ", ".join("{" + u + "}" for u in sorted(unknown)))
    return template.format(**values)


def concept_field(template: str) -> str:
    """The template's concept placeholder: its one field other than {attribute} ({concept}, {occupation}, ...)."""
    try:
        fields = [n for _, n, _, _ in string.Formatter().parse(template) if n is not None and n != "attribute"]
    except ValueError as err:
        raise FairnessError(f"malformed prompt template {template!r}: {err}") from None
    if len(set(fields)) != 1:
        raise FairnessError(f"prompt template {template!r} needs exactly one concept placeholder such as "
                            f"{{concept}} or {{occupation}}, found {sorted(set(fields)) or 'none'}")
    return fields[0]


def neutral_prompt(template: str, concept: str, field: str | None = None) -> str:
    """"Photo portrait of a {occupation}, a person" -> the concept's neutral prompt."""
    field = field or concept_field(template)
    return fill_template(template, (field,), **{field: concept})


def attribute_prompt(template: str, concept: str, attribute: str, field: str | None = None) -> str:
    """"Photo portrait of a {attribute} {occupation}, a person" -> the prompt naming the attribute."""
    field = field or concept_field(template)
    return fill_template(template, (field, "attribute"), **{field: concept, "attribute": attribute})


def read_list(path: str) -> tuple[str, ...]:
    """A user-supplied list (occupations, ...): one item a line, '#' comments and blank lines skipped."""
    if not os.path.isfile(path):
        raise FairnessError(f"list file not found: {path}")
    with open(path, encoding="utf-8") as f:
        items = tuple(line.split("#", 1)[0].strip() for line in f)
    items = tuple(i for i in items if i)
    if not items:
        raise FairnessError(f"{path} lists no items")
    return items


# --- models -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class TextToImage:
    """A text-to-image model as the fairness code sees it.

    ``text_model``: jharm CLIPTextModel (context = ``last_hidden_state``; with a
    projection its ``text_embeds`` are emb_T). ``unet``: a module applied as
    ``unet.apply(unet_params, x, t, context)``. ``decode``: latents -> images in
    [0, 1] (None: pixel space, images = (x + 1) / 2). ``identity``: provenance
    string (folder path or a params fingerprint) checked against centroid files.
    """

    text_model: Any
    text_params: PyTree
    tokenizer: Any
    unet: Any
    unet_params: PyTree
    schedule: Any
    sample_shape: tuple[int, int, int]
    identity: str
    decode: Callable[[jax.Array], jax.Array] | None = None


def fingerprint(params: PyTree) -> str:
    """A short sha256 over a param tree's names, shapes, dtypes and values (provenance identity)."""
    h = hashlib.sha256()
    for name, leaf in sorted(traverse_util.flatten_dict(jax.device_get(params), sep="/").items()):
        arr = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{name}:{arr.shape}:{arr.dtype};".encode())
        h.update(arr.tobytes())
    return "sha256:" + h.hexdigest()[:16]


@functools.lru_cache(maxsize=16)
def _jitted_text(text_model):
    return jax.jit(lambda params, ids: text_model.apply({"params": params}, ids))


def encode(model: TextToImage, prompts: Sequence[str], text_params: PyTree = None) -> dict[str, np.ndarray]:
    """Text-encoder outputs for prompts: ``context`` (N, L, D), ``pooled`` (N, D), ``embeds`` (N, P) if projected."""
    ids = jnp.asarray(model.tokenizer(list(prompts)))
    out = _jitted_text(model.text_model)(model.text_params if text_params is None else text_params, ids)
    res = {"context": out["last_hidden_state"], "pooled": out["pooler_output"], "ids": ids}
    if "text_embeds" in out:
        res["embeds"] = out["text_embeds"]
    return res


@functools.partial(jax.jit, static_argnums=(0,))
def _run_sampler(unet, unet_params, plan, x_T, contexts, late_contexts, tau, guidance, interval):
    def model_fn(x, t, ctx):
        return unet.apply(unet_params, x, t, ctx)

    kwargs = {} if late_contexts is None else dict(late_contexts=late_contexts, switch_t=tau)
    return samplers.sample(model_fn, plan, x_T, contexts, guidance=guidance, guidance_interval=interval, **kwargs)


def initial_noise(model: TextToImage, seed: int, n: int) -> jax.Array:
    """The x_T of images 0..n-1 of a seed: image i's noise depends only on (seed, i)."""
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(n))
    return jax.vmap(lambda k: jax.random.normal(k, model.sample_shape, jnp.float32))(keys)


def generate(model: TextToImage, prompts: Sequence[str], *, seed: int, num_steps: int = 50,
             guidance_scale: float = 7.5, text_params: PyTree = None, late_text_params: PyTree = None,
             tau: float | None = None, context_fn: Callable[[np.ndarray], np.ndarray] | None = None,
             guidance: Any = None, extra_prompts: Sequence[str] = (), batch_size: int = 64,
             method: str = "ddim", guidance_interval: tuple[float, float] | None = None) -> np.ndarray:
    """Images (N, H, W, 3) in [0, 1], one per prompt (repeat a prompt for several images).

    Image i starts from :func:`initial_noise` ``(seed, i)``, so runs that differ
    only in the encoder or τ start from the same noise (CLIP-I pairs). Rows:
    [∅, prompt, *extra_prompts] (extra rows feed e.g. Fair Diffusion's edit
    concepts via ``guidance``). ``context_fn`` transforms the prompt row's
    context (debias-VL). Two-stage: with ``late_text_params``, steps with model
    timestep ``t >= tau`` read ``text_params`` (default: the model's original
    encoder), steps with ``t < tau`` read ``late_text_params``. The contexts
    are computed once per prompt, before the scan. ``guidance_interval``
    ``(t_lo, t_hi)``: guide only the steps with ``t_lo <= t < t_hi`` (see
    :func:`jharm.diffusion.samplers.sample`).
    """
    prompts = list(prompts)
    if late_text_params is not None and tau is None:
        raise FairnessError("two-stage sampling needs tau (steps with t >= tau use the original encoder)")
    plan = samplers.make_plan(model.schedule, method, num_steps)
    guidance = CFG(guidance_scale) if guidance is None else guidance

    def rows(params):
        unique = sorted(set(prompts))
        ctx = encode(model, ["", *unique, *extra_prompts], params)["context"]
        cond = ctx[1:1 + len(unique)]
        if context_fn is not None:
            cond = jnp.asarray(context_fn(np.asarray(cond)))
        index = jnp.asarray([unique.index(p) for p in prompts])
        per = [jnp.broadcast_to(ctx[0], (len(prompts),) + ctx.shape[1:]), cond[index]]
        per += [jnp.broadcast_to(ctx[1 + len(unique) + e], (len(prompts),) + ctx.shape[1:])
                for e in range(len(extra_prompts))]
        return jnp.stack(per)  # (rows, N, L, D)

    early = rows(text_params)
    late = None if late_text_params is None else rows(late_text_params)
    x_T = initial_noise(model, seed, len(prompts))
    tau_arr = jnp.asarray(0.0 if tau is None else tau, jnp.float32)
    out = []
    for s in range(0, len(prompts), batch_size):
        sl = slice(s, s + batch_size)
        pad = batch_size - len(prompts[sl])  # every chunk has one shape: one compile per run

        def chunk(a, axis):
            a = jax.lax.slice_in_dim(a, s, min(s + batch_size, a.shape[axis]), axis=axis)
            if pad:
                widths = [(0, 0)] * a.ndim
                widths[axis] = (0, pad)
                a = jnp.pad(a, widths)
            return a

        g = guidance
        if hasattr(g, "directions"):  # per-image Fair Diffusion signs follow the images
            if g.directions.shape[0] < len(prompts):
                raise FairnessError(f"guidance has directions for {g.directions.shape[0]} images, "
                                    f"{len(prompts)} requested")
            g = dataclasses.replace(g, directions=chunk(g.directions[:len(prompts)], 0))
        x = _run_sampler(model.unet, model.unet_params, plan, chunk(x_T, 0), chunk(early, 1),
                         None if late is None else chunk(late, 1), tau_arr, g,
                         None if guidance_interval is None else tuple(jnp.float32(b) for b in guidance_interval))
        imgs = model.decode(x) if model.decode is not None else jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)
        out.append(np.asarray(imgs)[:len(prompts[sl])])
    return np.concatenate(out)


# --- attribute centroids ---------------------------------------------------------------

@dataclasses.dataclass
class Centroids:
    """μ per (concept, attribute): ``values`` (C, A, D), L2-normalised image-embedding means."""

    values: np.ndarray
    concepts: tuple[str, ...]
    attributes: tuple[str, ...]
    provenance: dict

    def check(self, generator: str | None = None, encoder: str | None = None, source: str = "centroids") -> None:
        """Refuse centroids made for another generator or image encoder."""
        for key, want in (("generator", generator), ("image_encoder", encoder)):
            have = self.provenance.get(key)
            if want is not None and have != want:
                raise FairnessError(f"{source} were made for {key} {have!r}, not {want!r}: regenerate them with "
                                    f"`jharm fair centroids` for this model")


def compute_centroids(model: TextToImage, image_embed: Callable[[np.ndarray], np.ndarray], concepts: Sequence[str],
                      attributes: Sequence[str], attribute_template: str, *, num_images: int = 32, seed: int = 0,
                      encoder_identity: str, num_steps: int = 50, guidance_scale: float = 7.5,
                      concept_field: str | None = None, batch_size: int = 64, progress: bool = True) -> Centroids:
    """Generate ``num_images`` per (concept, attribute) with the original model, embed them
    with the frozen image tower (``image_embed``: images in [0, 1] -> (N, D)),
    L2-normalise and average. Seeded: image j of pair (c, a) uses seed
    ``seed + pair index``."""
    attributes = check_attributes(attributes)
    from tqdm import tqdm

    values = []
    pairs = [(c, a) for c in concepts for a in attributes]
    for k, (concept, attr) in enumerate(tqdm(pairs, desc="centroids", disable=not progress)):
        prompt = attribute_prompt(attribute_template, concept, attr, concept_field)
        images = generate(model, [prompt] * num_images, seed=seed + k, num_steps=num_steps,
                          guidance_scale=guidance_scale, batch_size=batch_size)
        emb = np.asarray(image_embed(images), np.float64)
        emb /= np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
        values.append(emb.mean(axis=0))
    values = np.asarray(values, np.float32).reshape(len(concepts), len(attributes), -1)
    provenance = dict(generator=model.identity, image_encoder=encoder_identity, num_images=num_images, seed=seed,
                      num_steps=num_steps, guidance_scale=guidance_scale, template=attribute_template)
    return Centroids(values, tuple(concepts), attributes, provenance)


def save_centroids(path: str, centroids: Centroids) -> str:
    """One safetensors file; concepts, attributes and provenance in its metadata (atomic)."""
    from jharm.weights.io import save_safetensors

    meta = {"format": CENTROID_FORMAT, "concepts": json.dumps(list(centroids.concepts)),
            "attributes": json.dumps(list(centroids.attributes)), "provenance": json.dumps(centroids.provenance)}
    save_safetensors({"centroids": np.asarray(centroids.values, np.float32)}, path, metadata=meta)
    return path


def load_centroids(path: str, *, generator: str | None = None, encoder: str | None = None) -> Centroids:
    """Read a centroid file and (if given) refuse one made for another generator/encoder."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FairnessError(f"centroid file not found: {path}")
    with safe_open(path, framework="np") as f:
        meta = f.metadata() or {}
        if meta.get("format") != CENTROID_FORMAT or "centroids" not in f.keys():
            raise FairnessError(f"{path} is not a jharm centroid file (metadata format {meta.get('format')!r}, "
                                f"expected {CENTROID_FORMAT!r})")
        values = f.get_tensor("centroids")
    out = Centroids(values, tuple(json.loads(meta["concepts"])), tuple(json.loads(meta["attributes"])),
                    json.loads(meta["provenance"]))
    if values.shape[:2] != (len(out.concepts), len(out.attributes)):
        raise FairnessError(f"{path}: centroids have shape {values.shape}, expected "
                            f"({len(out.concepts)}, {len(out.attributes)}, D)")
    out.check(generator, encoder, f"centroids in {path}")
    return out


# --- baselines ----------------------------------------------------------------------------

def word_embedding(model: TextToImage, prompts: Sequence[str], text_params: PyTree = None) -> np.ndarray:
    """Encoder output at each prompt's last word token (the token before EOS): UCE's c and e_a."""
    out = encode(model, prompts, text_params)
    eos = np.asarray(model.tokenizer.eos_positions(np.asarray(out["ids"])))
    ctx = np.asarray(out["context"])
    return ctx[np.arange(len(prompts)), np.maximum(eos - 1, 1)]


def uce_debias(unet_params: PyTree, concept_emb: np.ndarray, attribute_emb: np.ndarray,
               measure: Callable[[PyTree], np.ndarray], target: Sequence[float] | None = None, *,
               rounds: int = 30, tol: float = 0.05, step: float = 1.0, preserve: np.ndarray | None = None,
               lam: float = 0.5, preserve_scale: float = 1.0):
    """UCE-debias with the α iteration (METHODS.md §2).

    Each round edits the ORIGINAL ``unet_params`` so that concept c reads like
    ``c + Σ_a α_{c,a} e_a`` (``jharm.edits.uce.apply_uce``), measures the
    attribute frequencies ``measure(params) -> (C, A)`` and moves
    ``α += step · (π − f)``, until ``max |f − π| <= tol`` or ``rounds`` rounds.

    Args:
      concept_emb: (C, D) concept token embeddings; attribute_emb: (A, D).
    Returns:
      (params, alphas (C, A), history: list of per-round dicts with alphas, frequencies, gap).
    """
    from jharm.edits.uce import apply_uce

    concept_emb, attribute_emb = np.asarray(concept_emb, np.float64), np.asarray(attribute_emb, np.float64)
    num_attr = attribute_emb.shape[0]
    if num_attr < 2:
        raise FairnessError(f"UCE-debias needs at least two attribute embeddings, found {num_attr}")
    target = np.full(num_attr, 1.0 / num_attr) if target is None else np.asarray(target, np.float64)
    alphas = np.zeros((concept_emb.shape[0], num_attr))
    history, params = [], unet_params
    for r in range(int(rounds)):
        guide = concept_emb + alphas @ attribute_emb
        params = unet_params if not alphas.any() else apply_uce(unet_params, concept_emb, guide, preserve, lam=lam,
                                                                preserve_scale=preserve_scale)
        freqs = np.asarray(measure(params), np.float64).reshape(concept_emb.shape[0], num_attr)
        gap = float(np.abs(freqs - target).max())
        history.append({"round": r, "alphas": alphas.tolist(), "frequencies": freqs.tolist(), "gap": gap})
        if gap <= tol:
            break
        alphas = alphas + step * (target - freqs)
    return params, alphas, history


def debias_vl_projection(model: TextToImage, concepts: Sequence[str], attributes: Sequence[str],
                         attribute_template: str, lam: float = 500.0, concept_field: str | None = None) -> np.ndarray:
    """debias-VL's P from pooled EOS embeddings of every pair of attribute prompts of every concept."""
    from jharm.edits.debias_vl import debias_projection

    attributes = check_attributes(attributes)
    a_prompts, b_prompts = [], []
    for concept in concepts:
        for i, j in itertools.combinations(range(len(attributes)), 2):
            a_prompts.append(attribute_prompt(attribute_template, concept, attributes[i], concept_field))
            b_prompts.append(attribute_prompt(attribute_template, concept, attributes[j], concept_field))
    pooled = np.asarray(encode(model, a_prompts + b_prompts)["pooled"])
    return debias_projection(pooled[:len(a_prompts)], pooled[len(a_prompts):], lam)


# --- real models (SD folders, CLIP image towers) -------------------------------------------

def sd_text_to_image(path: str, resolution: int = 512, dtype: str = "float32") -> TextToImage:
    """A local diffusers SD folder as a :class:`TextToImage` (VAE decode jitted on its own)."""
    from jharm.diffusion.schedules import from_scheduler_config
    from jharm.pipeline import load_pipeline

    pipe = load_pipeline(path, dtype=dtype)
    down = 2 ** (len(pipe.vae_config.block_out_channels) - 1)
    vae, scale = pipe.vae, pipe.vae_scaling_factor
    decode_jit = jax.jit(lambda p, z: jnp.clip(vae.apply(p, z / scale, method=vae.decode) / 2 + 0.5, 0.0, 1.0))
    return TextToImage(pipe.text_encoder, pipe.text_encoder_params, pipe.tokenizer, pipe.unet, pipe.unet_params,
                       from_scheduler_config(pipe.scheduler_config),
                       (resolution // down, resolution // down, pipe.unet_config.in_channels),
                       identity=os.path.abspath(path), decode=lambda z: decode_jit(pipe.vae_params, z))


def clip_image_embedder(folder: str, batch_size: int = 16):
    """``(images [0, 1] -> (N, D) image_embeds, identity)`` of a local CLIP (vision tower + projection):
    bicubic resize to the tower's size and CLIP normalisation."""
    from jharm.train.tasks.erasure import CLIP_MEAN, CLIP_STD
    from jharm.weights.clip import load_clip_vision_model

    module, params, cfg = load_clip_vision_model(folder)
    if not cfg.with_projection:
        raise FairnessError(f"{folder} has no visual_projection: centroids live in CLIP's joint space")
    size = cfg.image_size

    @jax.jit
    def embed(x):
        x = jax.image.resize(x, (x.shape[0], size, size, x.shape[-1]), "bicubic")
        return module.apply({"params": params}, (x - CLIP_MEAN) / CLIP_STD)["image_embeds"]

    def run(images):
        images = np.asarray(images, np.float32)
        return np.concatenate([np.asarray(embed(jnp.asarray(images[i:i + batch_size])))
                               for i in range(0, len(images), batch_size)])
    return run, os.path.abspath(folder)


def centroids_from_config(config, out: str) -> str:
    """``jharm fair centroids``: generate, embed and save the centroids a config's ``fair`` section describes."""
    f = config.fair
    concepts = read_list(f.concepts_file) if f.concepts_file else tuple(f.concepts)
    if not concepts:
        raise FairnessError("config.fair: give concepts or concepts_file (e.g. an occupations list)")
    attributes = combine_attributes(f.attributes) if f.attributes and not isinstance(f.attributes[0], str) \
        else check_attributes(f.attributes)
    model = sd_text_to_image(f.model, f.resolution)
    embed, encoder = clip_image_embedder(f.clip)
    cents = compute_centroids(model, embed, concepts, attributes, config.task.attribute_template,
                              num_images=f.num_images, seed=f.seed, encoder_identity=encoder, num_steps=f.steps,
                              guidance_scale=f.guidance_scale, batch_size=f.batch_size)
    return save_centroids(out, cents)
