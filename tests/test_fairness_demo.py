"""The ShapesWorld fairness scorecard's plumbing on random tiny models (the real
numbers need the shipped assets: `jharm demo fair`)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jharm import fair_demo, fairness
from jharm.models.clip import CLIPVisionConfig, CLIPVisionModel
from jharm.shapesworld.judge import JudgeNet, judge_task_config
from jharm.weights.clip import export_clip_text_model
from tests.fairness_utils import tiny_t2i

SIZE = 16


def _mini(tmp_path):
    model = tiny_t2i(size=SIZE)
    vision = CLIPVisionModel(CLIPVisionConfig(image_size=SIZE, patch_size=8, hidden_size=16, intermediate_size=32,
                                              projection_dim=8, num_hidden_layers=1, num_attention_heads=2,
                                              with_projection=True))
    vparams = vision.init_params(jax.random.key(7))
    embed = jax.jit(lambda im: vision.apply({"params": vparams}, im)["image_embeds"])
    jcfg = judge_task_config()
    jcfg.channels, jcfg.features, jcfg.world.resolution = (4, 8), 16, SIZE
    judge = JudgeNet(channels=(4, 8), features=16).init(jax.random.key(8), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
    tok_dir = str(tmp_path / "tokenizer")
    model.tokenizer.save_pretrained(tok_dir)
    text_dir = export_clip_text_model(model.text_model.config, model.text_params, str(tmp_path / "text"))
    return fair_demo.Mini(model, 2.0, lambda im: np.asarray(embed(jnp.asarray(im))), fairness.fingerprint(vparams),
                          judge, jcfg, text_dir, tok_dir)


@pytest.mark.slow  # ~3 CPU-minutes: many small sampler compiles
def test_scorecard_runs_and_reports(tmp_path):
    mini = _mini(tmp_path)
    demo = dict(batch=4, n_eval=4, n_prompted=2, n_centroid=2, steps=2, train_steps=3, taus=(0, 1000), uce_rounds=2,
                uce_n=4)
    settings = (fair_demo.Setting("binary", ("square",), ("red", "blue")),
                fair_demo.Setting("target-30-70", ("square",), ("red", "blue"), (0.3, 0.7)))
    report = fair_demo.fair_scorecard(str(tmp_path / "out"), 0, mini=mini, demo=demo, settings=settings)
    text = open(report).read()
    # The 30/70 setting reuses the binary setting's centroids and its target-free samples.
    assert f"[fair] target-30-70: centroids {tmp_path / 'out' / 'binary' / 'centroids.safetensors'}" in text
    assert not os.path.exists(tmp_path / "out" / "target-30-70" / "centroids.safetensors")
    for name in ("base", "LightFair (τ=1000)", "UCE-debias", "debias-VL", "Fair Diffusion", "τ sweep", "Gates"):
        assert name in text, name
    records = [json.loads(line) for line in open(tmp_path / "out" / "per_prompt.jsonl")]
    assert {r["method"] for r in records} >= {"base", "UCE-debias", "debias-VL"}
    by = {(r["setting"], r["method"]): r for r in records}
    for method in fair_demo.TARGET_FREE[:2]:
        a, b = by[("binary", method)], by[("target-30-70", method)]
        assert a["frequencies"] == b["frequencies"] and a["fd_judge"] == b["fd_judge"]
        # Same samples, scored against each setting's own target.
        assert abs(b["target_gap"] - 100 * max(abs(a["frequencies"][0] - 0.3), abs(a["frequencies"][1] - 0.7))) < 1e-6
    for r in records:
        f = np.asarray(r["frequencies"])
        assert f.shape == (2,) and (f.sum() == 0 or abs(f.sum() - 1) < 1e-9)
        assert abs(r["bias_o"] - abs(f[0] - f[1])) < 1e-9
    assert os.path.isfile(tmp_path / "out" / "binary" / "base_square.png")
    # The LightFair encoder exported by the task loads back.
    assert os.path.isfile(tmp_path / "out" / "binary" / "lightfair" / "text_encoder" / "model.safetensors")
