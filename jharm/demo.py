"""``jharm demo``: the main jobs on the embedded defaults.

Each entry of ``DEMOS`` is ``name -> "module:function"``; the function takes
``(out_dir, seed)`` and returns the path of what it wrote (a Markdown report).
``jharm demo`` with no name runs ``DEFAULT`` in order.
"""
from __future__ import annotations

import importlib
import os
import time

import numpy as np

DEMOS: dict[str, str] = {
    "clip": "jharm.demo:clip_round_trip",
    "erase": "jharm.erase_demo:erase_scorecard",
    "fair": "jharm.fair_demo:fair_scorecard",
    "backdoor": "jharm.backdoor_demo:backdoor_scorecard",
}
# `make demo`: the offline load/convert/export round trip, then the erasure scorecard on the
# shipped ShapesWorld models (11 min 45 s with the round trip on 2 cores, 2026-12-07). `fair` (12 min on one core) and
# `backdoor` (up to 30 min) run by name.
DEFAULT: tuple[str, ...] = ("clip", "erase")


def run(names, out_dir: str, seed: int = 0) -> list[str]:
    reports = []
    for name in names:
        if name not in DEMOS:
            raise ValueError(f"unknown demo {name!r}; choose from {', '.join(DEMOS)}")
        module, _, fn = DEMOS[name].partition(":")
        start = time.time()
        path = getattr(importlib.import_module(module), fn)(os.path.join(out_dir, name), seed)
        print(f"[demo {name}] wrote {path} in {time.time() - start:.1f}s")
        reports.append(path)
    return reports


def clip_round_trip(out_dir: str, seed: int = 0) -> str:
    """A tiny random CLIP built with jharm's modules, exported as a transformers
    folder, converted back through the public loader, and used to score prompts
    against images: the library's load/convert/export path end to end, offline."""
    import jax
    import jax.numpy as jnp

    from jharm.models.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel, clip_logits
    from jharm.tokenizer import CLIPTokenizer
    from jharm.weights import clip as clip_weights
    from jharm.weights.flax_checkpoint import convert_folder

    text_cfg = CLIPTextConfig(hidden_size=64, intermediate_size=128, projection_dim=32, num_hidden_layers=2,
                              num_attention_heads=4, with_projection=True)
    vision_cfg = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128,
                                  projection_dim=32, num_hidden_layers=2, num_attention_heads=4, with_projection=True)
    k_text, k_vision = jax.random.split(jax.random.key(seed))
    text_params = CLIPTextModel(text_cfg).init_params(k_text)
    vision_params = CLIPVisionModel(vision_cfg).init_params(k_vision)
    hf_dir = clip_weights.export_clip_model(text_cfg, text_params, vision_cfg, vision_params, jnp.log(100.0),
                                            os.path.join(out_dir, "tiny_clip_hf"))
    flax_dir, num_params = convert_folder("clip", hf_dir, os.path.join(out_dir, "tiny_clip_flax"))
    tm, tp, vm, vp, scale = clip_weights.load_clip_model(hf_dir)
    prompts = ["a red square", "a blue circle", "a photo of a star", ""]
    ids = jnp.asarray(CLIPTokenizer.default()(prompts))
    images = jax.random.uniform(jax.random.key(seed + 1), (3, 32, 32, 3))
    text = tm.apply({"params": tp}, ids)["text_embeds"]
    image = vm.apply({"params": vp}, images)["image_embeds"]
    logits = np.asarray(clip_logits(text, image, scale))
    direct = np.asarray(CLIPTextModel(text_cfg).apply({"params": text_params}, ids)["text_embeds"])
    parity = float(np.abs(direct - np.asarray(text)).max())
    lines = ["# jharm demo: CLIP round trip", "",
             f"Tiny CLIP ({num_params:,} params) exported to `{hf_dir}` (transformers format) and converted "
             f"to `{flax_dir}` (Flax params).", "",
             f"Max abs difference of text embeddings before/after the round trip: {parity:.2e}", "",
             "| prompt | " + " | ".join(f"image {i}" for i in range(logits.shape[1])) + " |",
             "| --- |" + " --- |" * logits.shape[1]]
    lines += [f"| {p!r} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for p, row in zip(prompts, logits)]
    if parity > 1e-5:
        raise RuntimeError(f"CLIP round trip changed the outputs by {parity:.2e}")
    report = os.path.join(out_dir, "report.md")
    from jharm.weights.io import atomic_write_bytes

    atomic_write_bytes(report, ("\n".join(lines) + "\n").encode("utf-8"))
    print("\n".join(lines))
    return report
