"""ShapesWorld fairness scorecard (``jharm demo fair``).

Colour is the protected attribute; the shipped tiny T2I model is biased by
construction on neutral prompts ("a square": 85 % red / 15 % blue; "a circle":
80 % green / 20 % yellow). For each setting (binary red/blue, 4-way, and a
non-uniform 30/70 red/blue target) it builds attribute centroids with the
original model and the frozen tiny-CLIP image tower, trains LightFair through
the one train loop, and compares base / LightFair / UCE-debias / debias-VL /
Fair Diffusion (binary only) with the judge: Bias-O and the target gap of the
neutral prompts, colour-prompted accuracy, FD-judge to renders, CLIP-T, CLIP-I,
Bias-Q, plus a τ sweep of two-stage sampling. Writes PNG grids, per-prompt
JSONL and ``report.md``; the issue-7 gates are checked in the report.
"""
from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jharm import fairness
from jharm.eval import fairness as fm
from jharm.shapesworld import data, render

# CFG 3 at every step, not the T2I's configured guidance interval: it turns the neutral prompts' 85/15
# into 100/0, the worst case for the base (with CFG 3 below t = 600 on the 2026-11-29 assets: base
# Bias-O 0.78, LightFair -32 %; docs/fairness.md).
GUIDANCE_SCALE = 3.0
DEMO = dict(batch=48, n_eval=48, n_prompted=12, n_centroid=16, steps=20, train_steps=120, lr=3e-3, lambda_q=1.0,
            lambda_r=1.0, tau=1000, taus=(0, 250, 500, 750, 1000), uce_rounds=6, uce_n=24, uce_step=2.0,
            debias_vl_lambda=500.0)


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    concepts: tuple[str, ...]
    attributes: tuple[str, ...]
    target: tuple[float, ...] | None = None


SETTINGS = (
    Setting("binary", ("square",), ("red", "blue")),
    Setting("4-way", ("square", "circle"), ("red", "green", "blue", "yellow")),
    Setting("target-30-70", ("square",), ("red", "blue"), (0.3, 0.7)),
)
NEUTRAL, ATTRIBUTE = "a {concept}", "a {attribute} {concept}"


@dataclasses.dataclass
class Mini:
    """Everything the scorecard reads: the T2I model, the CLIP image tower, the judge."""

    model: fairness.TextToImage
    guidance: float
    image_embed: object      # images [0, 1] -> (N, D) CLIP image embeddings
    encoder_identity: str
    judge_params: object
    judge_config: object
    text_dir: str            # the text encoder as a transformers folder (LightFair's input)
    tokenizer_dir: str
    scenes: object = None    # the T2I's world config (renders for FD-judge); None = the default world


def load_mini(out_dir: str, folder: str | None = None) -> Mini:
    """The shipped ShapesWorld assets (verified by sha256) as a :class:`Mini`."""
    from jharm.models.clip import CLIPTextModel, CLIPVisionModel
    from jharm.models.unet import UNet2DConditionModel
    from jharm.shapesworld import assets
    from jharm.shapesworld.tasks import clip_image_input
    from jharm.weights.clip import export_clip_text_model

    clip, judge, t2i = assets.load_clip(folder), assets.load_judge(folder), assets.load_t2i(folder)
    manifest = assets.read_manifest(folder)
    files = manifest["files"]
    vision = CLIPVisionModel(clip.vision_config)
    size = clip.vision_config.image_size
    embed = jax.jit(lambda im: vision.apply({"params": clip.vision_params}, clip_image_input(im, size))["image_embeds"])
    model = fairness.TextToImage(
        CLIPTextModel(clip.text_config), jax.tree.map(jnp.asarray, clip.text_params), clip.tokenizer,
        UNet2DConditionModel(t2i.unet_config), {"params": jax.tree.map(jnp.asarray, t2i.unet_params)}, t2i.schedule,
        (t2i.unet_config.sample_size, t2i.unet_config.sample_size, 3),
        identity="shapesworld-t2i:" + files[manifest["models"]["t2i"]["file"]][:16])
    text_dir = export_clip_text_model(clip.text_config, clip.text_params, os.path.join(out_dir, "clip_text_encoder"))
    tok_dir = os.path.join(folder or assets.DEFAULT_DIR, "tokenizer")
    return Mini(model, GUIDANCE_SCALE, lambda im: np.asarray(embed(jnp.asarray(im))),
                "shapesworld-clip:" + files[manifest["models"]["clip"]["file"]][:16], judge.params, judge.config,
                text_dir, tok_dir, t2i.config.world)


def keep_prompts(concepts) -> tuple[str, ...]:
    """LightFair's keep-close prompts in ShapesWorld: other shapes' colour prompts and the neutral
    prompts themselves (non-attribute prompts, METHODS §2); without the latter the encoder meets ℓ_o
    along directions the UNet ignores (docs/fairness.md, "Where the LightFair edit lands")."""
    others = [f"a {col} {s}" for s in ("triangle", "star", "heart") for col in ("red", "green", "blue", "yellow")]
    return tuple(others + [fairness.neutral_prompt(NEUTRAL, c) for c in concepts])


def lightfair_config(mini: Mini, setting: Setting, centroids: str, d: dict):
    from jharm.train.defaults import base_config
    from jharm.train.tasks.fairness import default_task_config

    c = base_config()
    c.train.update(steps=d["train_steps"], batch_size=len(setting.concepts), log_every=20,
                   ckpt_every=10 * d["train_steps"], async_checkpoint=False, progress=False)
    c.optim.update(name="adam", lr=d["lr"], clip_norm=0.0)
    c.task = default_task_config()
    keep = keep_prompts(setting.concepts)
    c.task.update(text_encoder=mini.text_dir, tokenizer=mini.tokenizer_dir, centroids=centroids,
                  generator=mini.model.identity, image_encoder=mini.encoder_identity, neutral_template=NEUTRAL,
                  attribute_template=ATTRIBUTE, target=tuple(setting.target or ()), lambda_q=d["lambda_q"],
                  lambda_r=d["lambda_r"], keep_prompts=keep)
    return c


def _judge(mini: Mini, images):
    from jharm.shapesworld.judge import judge_features, judge_predict

    pred = judge_predict(mini.judge_params, images, mini.judge_config)
    return pred, judge_features(mini.judge_params, images, mini.judge_config)


def evaluate(mini: Mini, setting: Setting, name: str, gen: dict, seed: int, d: dict, base_images=None, images=None):
    """Per-prompt records and the images of one method on one setting; ``images`` (what an
    earlier call returned for the same method, concepts and attributes) skips the sampling."""
    model, attrs, k = mini.model, setting.attributes, len(setting.attributes)
    colour_ids = np.asarray([render.COLOUR_NAMES.index(a) for a in attrs])
    kw = dict(num_steps=d["steps"], guidance_scale=mini.guidance, batch_size=d["batch"], **gen)
    samples, records, images = images, [], {}
    feats = []
    for ci, concept in enumerate(setting.concepts):
        prompt = fairness.neutral_prompt(NEUTRAL, concept)
        ims = (samples[concept] if samples else
               fairness.generate(model, [prompt] * d["n_eval"], seed=seed + 100 * ci, **kw))
        pred, f = _judge(mini, ims)
        feats.append(f)
        in_set = np.isin(pred["colour"], colour_ids)
        lookup = {int(c): i for i, c in enumerate(colour_ids)}
        labels = np.asarray([lookup[int(c)] for c in pred["colour"][in_set]], np.int32)
        freqs = fm.attribute_frequencies(labels, k) if labels.size else np.zeros(k)
        target = setting.target or (1.0 / k,) * k
        emb = np.asarray(fairness.encode(model, [prompt])["embeds"])[0]
        img_emb = mini.image_embed(ims)
        rec = dict(method=name, setting=setting.name, prompt=prompt, frequencies=freqs.tolist(),
                   off_attribute=float(1 - in_set.mean()), bias_o=fm.bias_o(freqs),
                   target_gap=fm.target_gap(freqs, target), clip_t=float(fm.clip_t(img_emb, emb).mean()),
                   shape_acc=float(np.mean(pred["shape"] == render.SHAPES.index(concept))))
        if base_images is not None:
            rec["clip_i"] = float(fm.clip_i(img_emb, mini.image_embed(base_images[concept])).mean())
        images[concept] = ims
        # Colour-prompted accuracy and Bias-Q on "a {attribute} {concept}".
        prompts = [fairness.attribute_prompt(ATTRIBUTE, concept, a) for a in attrs for _ in range(d["n_prompted"])]
        pims = (samples[concept + "_prompted"] if samples else
                fairness.generate(model, prompts, seed=seed + 100 * ci + 50, **kw))
        ppred, pf = _judge(mini, pims)
        feats.append(pf)
        want = np.repeat(colour_ids, d["n_prompted"])
        rec["colour_acc"] = float(np.mean((ppred["colour"] == want) & (ppred["shape"] == render.SHAPES.index(concept))))
        a_emb = np.asarray(fairness.encode(model, [fairness.attribute_prompt(ATTRIBUTE, concept, a) for a in attrs])["embeds"])
        scores = fm.clip_t(mini.image_embed(pims), np.repeat(a_emb, d["n_prompted"], axis=0)).reshape(k, -1).mean(1)
        rec["bias_q"] = fm.bias_q(scores[None])
        images[concept + "_prompted"] = pims
        records.append(rec)
    real = data.world_renders(seed + 7, sum(len(f) for f in feats), mini.scenes,
                              [render.SHAPES.index(c) for c in setting.concepts
                               for _ in range(d["n_eval"] + k * d["n_prompted"])],
                              resolution=mini.model.sample_shape[0])
    fd = fm.fid(np.concatenate(feats), _judge(mini, real)[1])
    for rec in records:
        rec["fd_judge"] = fd
    return records, images


def _measure(mini: Mini, setting: Setting, seed: int, d: dict):
    """UCE-debias's measurement: judge attribute frequencies (C, A) of the edited UNet."""
    colour_ids = [render.COLOUR_NAMES.index(a) for a in setting.attributes]

    def measure(unet_params):
        model = dataclasses.replace(mini.model, unet_params=unet_params)
        out = []
        for ci, concept in enumerate(setting.concepts):
            ims = fairness.generate(model, [fairness.neutral_prompt(NEUTRAL, concept)] * d["uce_n"], seed=seed + 9 + ci,
                                    num_steps=d["steps"], guidance_scale=mini.guidance, batch_size=d["batch"])
            pred = _judge(mini, ims)[0]["colour"]
            counts = np.asarray([np.sum(pred == c) for c in colour_ids], np.float64)
            out.append(counts / max(counts.sum(), 1.0))
        return np.asarray(out)
    return measure


def methods_for(mini: Mini, setting: Setting, debiased, seed: int, d: dict, log) -> dict:
    """generate() keyword sets of every method of the table."""
    from jharm.diffusion.guidance import FairDiffusion
    from jharm.edits.debias_vl import apply_projection

    model = mini.model
    methods = {"base": {}, f"LightFair (τ={d['tau']})": dict(late_text_params=debiased, tau=d["tau"])}
    concept_emb = fairness.word_embedding(model, [fairness.neutral_prompt(NEUTRAL, c) for c in setting.concepts])
    attr_emb = fairness.word_embedding(model, [f"a {a}" for a in setting.attributes])
    params, alphas, hist = fairness.uce_debias(model.unet_params, concept_emb, attr_emb, _measure(mini, setting, seed, d),
                                               setting.target, rounds=d["uce_rounds"], step=d["uce_step"])
    log(f"  UCE-debias: {len(hist)} rounds, gaps {[round(h['gap'], 3) for h in hist]}")
    methods["UCE-debias"] = dict(unet_params_override=params)
    proj = fairness.debias_vl_projection(model, setting.concepts, setting.attributes, ATTRIBUTE, d["debias_vl_lambda"])
    methods["debias-VL"] = dict(context_fn=lambda ctx: apply_projection(ctx, proj))
    if len(setting.attributes) == 2 and len(setting.concepts) == 1 and setting.target is None:
        from jharm.diffusion.guidance import balanced_directions

        dirs = balanced_directions(jax.random.key(seed), d["n_eval"] + 2 * d["n_prompted"])
        methods["Fair Diffusion"] = dict(guidance=FairDiffusion(dirs, guidance_scale=mini.guidance, edit_scale=2.0,
                                                               warmup_steps=2),
                                         extra_prompts=tuple(setting.attributes))
    return methods


def _gen_kwargs(mini: Mini, method: dict):
    method = dict(method)
    override = method.pop("unet_params_override", None)
    model = mini if override is None else dataclasses.replace(mini, model=dataclasses.replace(mini.model, unet_params=override))
    return model, method


def fair_scorecard(out_dir: str, seed: int = 0, mini: Mini | None = None, demo: dict | None = None,
                   settings=SETTINGS) -> str:
    """Run the scorecard; returns the path of ``report.md``."""
    from PIL import Image

    from jharm.erase_demo import grid
    from jharm.train.loop import train
    from jharm.train.tasks import make_task

    d = dict(DEMO, **(demo or {}))
    os.makedirs(out_dir, exist_ok=True)
    start = time.time()
    mini = load_mini(out_dir) if mini is None else mini
    log_lines = []

    def log(msg):
        print(msg, flush=True)
        log_lines.append(msg)

    all_records, summaries, sweep = [], {}, []
    # Settings with the same concepts and attributes (binary and the 30/70 target) share what does
    # not depend on the target: the centroids and the samples of the TARGET_FREE methods.
    centroid_files, target_free_samples = {}, {}
    for setting in settings:
        sdir = os.path.join(out_dir, setting.name)
        os.makedirs(sdir, exist_ok=True)
        group = (setting.concepts, setting.attributes)
        if group in centroid_files:
            cpath = centroid_files[group]
            log(f"[fair] {setting.name}: centroids {cpath}")
        else:
            log(f"[fair] {setting.name}: centroids")
            cents = fairness.compute_centroids(mini.model, mini.image_embed, setting.concepts, setting.attributes,
                                               ATTRIBUTE, num_images=d["n_centroid"], seed=seed + 1000,
                                               num_steps=d["steps"], guidance_scale=mini.guidance,
                                               encoder_identity=mini.encoder_identity, batch_size=d["batch"],
                                               progress=False)
            cpath = centroid_files[group] = fairness.save_centroids(os.path.join(sdir, "centroids.safetensors"), cents)
        log(f"[fair] {setting.name}: LightFair training ({d['train_steps']} steps)")
        config = lightfair_config(mini, setting, cpath, d)
        result = train(config, make_task(config), os.path.join(sdir, "lightfair"))
        log(f"  loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}; encoder at {result.export_path}")
        debiased = jax.device_get(result.params)["text_encoder"]
        base_records, base_images = evaluate(mini, setting, "base", {}, seed, d, images=target_free_samples.get(group + ("base",)))
        by_method = {}
        for name, method in methods_for(mini, setting, debiased, seed, d, log).items():
            m, kw = _gen_kwargs(mini, method)
            if name == "base":
                records, images = base_records, base_images
            else:
                records, images = evaluate(m, setting, name, kw, seed, d, base_images,
                                           images=target_free_samples.get(group + (name,)))
            if name in TARGET_FREE:
                target_free_samples[group + (name,)] = images
            by_method[name] = records
            all_records += records
            summaries[(setting.name, name)] = fm.summarize(records, KEYS)
            for key, ims in images.items():
                fname = f"{name.split(' ')[0]}_{key}.png".replace("/", "-")
                Image.fromarray(grid(ims[:32])).save(os.path.join(sdir, fname))
            log(f"  {name}: " + ", ".join(f"{k} {v['mean']:.3f}" for k, v in summaries[(setting.name, name)].items()))
        if setting.name == "binary":
            for tau in d["taus"]:
                # τ = 0 samples the base model and τ = d["tau"] the LightFair row, bit for bit
                # (tests/test_fairness_sampling.py): their records are reused.
                recs = {0: by_method["base"], d["tau"]: by_method[f"LightFair (τ={d['tau']})"]}.get(tau)
                if recs is None:
                    recs, _ = evaluate(mini, setting, f"tau={tau}", dict(late_text_params=debiased, tau=tau), seed, d)
                sweep.append((tau, fm.summarize(recs, KEYS)))
    fm.write_jsonl(os.path.join(out_dir, "per_prompt.jsonl"), all_records)
    report = _report(out_dir, summaries, sweep, d, time.time() - start, log_lines)
    return report


# Methods whose samples do not depend on the setting's target distribution.
TARGET_FREE = ("base", "debias-VL", "Fair Diffusion")
KEYS = ("bias_o", "target_gap", "colour_acc", "fd_judge", "clip_t", "clip_i", "bias_q", "off_attribute")


def gates(summaries: dict, tau_label: str) -> list[tuple[str, bool, str]]:
    """Issue 7's ShapesWorld gates, evaluated on the summaries."""
    out = []
    for setting in ("binary", "4-way"):
        base, lf = summaries.get((setting, "base")), summaries.get((setting, tau_label))
        if not base or not lf:
            continue
        b, l_ = base["bias_o"]["mean"], lf["bias_o"]["mean"]
        out.append((f"{setting}: LightFair Bias-O <= 50 % of base", l_ <= 0.5 * b, f"{l_:.3f} vs base {b:.3f}"))
        b, l_ = base["colour_acc"]["mean"], lf["colour_acc"]["mean"]
        out.append((f"{setting}: colour-prompted accuracy >= 90 % of base", l_ >= 0.9 * b, f"{l_:.3f} vs base {b:.3f}"))
        b, l_ = base["fd_judge"]["mean"], lf["fd_judge"]["mean"]
        out.append((f"{setting}: FD-judge within 20 % of base", abs(l_ - b) <= 0.2 * b, f"{l_:.2f} vs base {b:.2f}"))
    lf = summaries.get(("target-30-70", tau_label))
    if lf:
        gap = lf["target_gap"]["mean"]
        out.append(("30/70 target within ±10 points", gap <= 10.0, f"largest gap {gap:.1f} points"))
    return out


def _report(out_dir, summaries, sweep, d, seconds, log_lines) -> str:
    from jharm.weights.io import atomic_write_bytes

    tau_label = f"LightFair (τ={d['tau']})"
    lines = ["# jharm demo fair: ShapesWorld fairness scorecard", "",
             "Colour is the protected attribute. Neutral prompts are biased by construction "
             "(\"a square\" 85 % red / 15 % blue, \"a circle\" 80 % green / 20 % yellow). Frequencies are the judge's "
             "colour labels among the setting's attributes (`off_attribute` = fraction judged another colour). "
             "Two-stage sampling: original encoder for t >= τ, debiased for t < τ (τ = 1000: debiased throughout).", "",
             f"Settings: {d}. Runtime {seconds:.0f} s.", ""]
    for setting in dict.fromkeys(s for s, _ in summaries):
        lines += [f"## {setting}", "", fm.summary_table({m: v for (s, m), v in summaries.items() if s == setting}, KEYS), ""]
    if sweep:
        lines += ["## τ sweep (binary, LightFair encoder)", "",
                  fm.summary_table({f"τ={t}": s for t, s in sweep}, ("bias_o", "colour_acc", "fd_judge", "clip_t")), ""]
    lines += ["## Gates (issue 7)", "", "| gate | pass | measured |", "| --- | --- | --- |"]
    lines += [f"| {g} | {'yes' if ok else '**no**'} | {m} |" for g, ok, m in gates(summaries, tau_label)]
    lines += ["", "## Log", "", "```", *log_lines, "```", "",
              "Grids: `<setting>/<method>_<concept>[_prompted].png`; per-prompt records: `per_prompt.jsonl`."]
    path = os.path.join(out_dir, "report.md")
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return path
