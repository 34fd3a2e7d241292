"""LightFair through the one train loop: only the text encoder trains, loss decreases,
the export loads in transformers; centroid provenance; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jharm import fairness
from jharm.models.clip import CLIPVisionConfig, CLIPVisionModel
from jharm.train.defaults import base_config
from jharm.train.loop import train
from jharm.train.tasks import make_task
from jharm.train.tasks.fairness import default_task_config
from jharm.weights.clip import export_clip_text_model
from tests.fairness_utils import tiny_t2i

CONCEPTS = ("square", "circle")
ATTRS = ("red", "blue")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lightfair")
    model = tiny_t2i()
    text_dir = export_clip_text_model(model.text_model.config, model.text_params, str(root / "text_encoder"))
    vcfg = CLIPVisionConfig(image_size=8, patch_size=4, hidden_size=16, intermediate_size=32, projection_dim=8,
                            num_hidden_layers=1, num_attention_heads=2, with_projection=True)
    vision = CLIPVisionModel(vcfg)
    vparams = vision.init_params(jax.random.key(5))
    embed = jax.jit(lambda im: vision.apply({"params": vparams}, im)["image_embeds"])
    cents = fairness.compute_centroids(model, lambda im: np.asarray(embed(jnp.asarray(im))), CONCEPTS, ATTRS,
                                       "a {attribute} {concept}", num_images=4, seed=0, num_steps=2,
                                       encoder_identity=fairness.fingerprint(vparams), progress=False)
    path = fairness.save_centroids(str(root / "centroids.safetensors"), cents)
    return dict(root=root, model=model, text_dir=text_dir, centroids=path, cents=cents,
                encoder=fairness.fingerprint(vparams))


def _config(setup, mode="full", steps=25):
    config = base_config()
    config.train.update(steps=steps, batch_size=2, log_every=5, ckpt_every=1000, progress=False,
                        async_checkpoint=False)
    config.optim.update(name="adam", lr=3e-3 if mode == "full" else 1e-2, clip_norm=0.0)
    config.task = default_task_config()
    config.task.update(text_encoder=setup["text_dir"], tokenizer="shapesworld", centroids=setup["centroids"],
                       generator=setup["model"].identity, image_encoder=setup["encoder"],
                       neutral_template="a {concept}", attribute_template="a {attribute} {concept}", mode=mode,
                       lambda_r=0.1, keep_prompts=("a green triangle",))
    return config


def test_centroid_file_round_trip_and_provenance(setup):
    loaded = fairness.load_centroids(setup["centroids"], generator=setup["model"].identity, encoder=setup["encoder"])
    np.testing.assert_array_equal(loaded.values, setup["cents"].values)
    assert loaded.concepts == CONCEPTS and loaded.attributes == ATTRS
    np.testing.assert_allclose(np.linalg.norm(loaded.values, axis=-1) <= 1 + 1e-6, True)
    with pytest.raises(fairness.FairnessError, match="generator"):
        fairness.load_centroids(setup["centroids"], generator="sha256:another-model")
    with pytest.raises(fairness.FairnessError, match="image_encoder"):
        fairness.load_centroids(setup["centroids"], encoder="openai/clip-vit-large-patch14")


def test_lightfair_full_trains_only_the_text_encoder(setup, tmp_path):
    config = _config(setup)
    result = train(config, make_task(config), str(tmp_path))
    losses = np.asarray(result.losses)
    assert losses[-5:].mean() < 0.8 * losses[:3].mean(), losses
    before = traverse_util.flatten_dict({"text_encoder": setup["model"].text_params}, sep="/")
    after = traverse_util.flatten_dict(jax.device_get(result.params), sep="/")
    assert set(after) == set(before)  # no UNet (nor anything else) in the trained tree
    changed = {k for k in before if not np.array_equal(np.asarray(before[k]), np.asarray(after[k]))}
    assert changed and all(k.startswith("text_encoder/text_model/") for k in changed)
    assert "text_encoder/text_projection/kernel" not in changed  # the projection is frozen
    # The export is a transformers folder whose outputs match the trained Flax encoder.
    import torch
    from transformers import CLIPTextModelWithProjection

    hf = CLIPTextModelWithProjection.from_pretrained(result.export_path).eval()
    ids = setup["model"].tokenizer(["a square", "a red circle"])
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids.astype(np.int64))).text_embeds.numpy()
    ours = setup["model"].text_model.apply({"params": jax.device_get(result.params)["text_encoder"]}, jnp.asarray(ids))
    assert np.abs(np.asarray(ours["text_embeds"]) - ref).max() < 1e-4


@pytest.mark.slow  # a second run through the loop; the full-mode test covers the fast path
def test_lightfair_lora(setup, tmp_path):
    config = _config(setup, mode="lora", steps=10)
    result = train(config, make_task(config), str(tmp_path))
    after = jax.device_get(result.params)
    for path, leaf in traverse_util.flatten_dict(after["text_encoder"], sep="/").items():
        original = traverse_util.flatten_dict(setup["model"].text_params, sep="/")[path]
        assert np.array_equal(np.asarray(leaf), np.asarray(original)), path
    assert result.losses[-1] < result.losses[0]
    from jharm.weights.clip import load_clip_text_model

    _, exported, _ = load_clip_text_model(result.export_path)
    q = "text_model/encoder/layers_0/self_attn/q_proj/kernel"
    lora = after["lora"][q.replace("/", ".")]
    want = np.asarray(after["text_encoder"]["text_model"]["encoder"]["layers_0"]["self_attn"]["q_proj"]["kernel"]) \
        + (4.0 / 4) * np.asarray(lora["down"]) @ np.asarray(lora["up"])
    got = np.asarray(exported["text_model"]["encoder"]["layers_0"]["self_attn"]["q_proj"]["kernel"])
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_task_refuses_centroids_of_another_model(setup):
    config = _config(setup)
    config.task.generator = "sha256:0123456789abcdef"
    with pytest.raises(fairness.FairnessError, match="made for generator"):
        make_task(config)


def test_bad_attributes_and_templates(tmp_path):
    with pytest.raises(fairness.FairnessError, match="at least two"):
        fairness.check_attributes(["female"])
    with pytest.raises(fairness.FairnessError, match="distinct"):
        fairness.check_attributes(["male", "male"])
    with pytest.raises(fairness.FairnessError, match="list of names"):
        fairness.check_attributes("female")
    with pytest.raises(fairness.FairnessError, match="needs exactly one concept placeholder"):
        fairness.neutral_prompt("Photo portrait of a person", "doctor")
    with pytest.raises(fairness.FairnessError, match=r"no placeholder \{occupation\}"):
        fairness.fill_template("Photo portrait of a person", ("occupation",))
    assert fairness.neutral_prompt("Photo portrait of a {occupation}, a person", "nurse") == \
        "Photo portrait of a nurse, a person"
    with pytest.raises(fairness.FairnessError, match=r"\{attribute\}"):
        fairness.attribute_prompt("Photo portrait of a {concept}", "doctor", "female")
    assert fairness.attribute_prompt("Photo portrait of a {attribute} {concept}, a person", "doctor", "female") \
        == "Photo portrait of a female doctor, a person"
    assert fairness.combine_attributes([("female", "male"), ("asian", "black")]) == (
        "female asian", "female black", "male asian", "male black")
    lst = tmp_path / "occupations.txt"
    lst.write_text("# occupations\ndoctor\n\nnurse  # care\n")
    assert fairness.read_list(str(lst)) == ("doctor", "nurse")
    bad = tmp_path / "bad.safetensors"
    from jharm.weights.io import save_safetensors

    save_safetensors({"x": np.zeros(2, np.float32)}, str(bad))
    with pytest.raises(fairness.FairnessError, match="not a jharm centroid file"):
        fairness.load_centroids(str(bad))


def test_cli_centroids_bad_input(tmp_path, capsys):
    from jharm.cli import main

    out = str(tmp_path / "c.safetensors")
    assert main(["fair", "centroids", "--config", "configs/fair/sd15.py:gender", "--out", out]) == 2
    assert "concepts" in capsys.readouterr().err
    assert main(["fair", "centroids", "--config", "configs/fair/sd15.py:gender", "--out", out,
                 "--config.fair.concepts=('doctor',)", "--config.fair.attributes=('female',)"]) == 2
    assert "at least two attributes" in capsys.readouterr().err
    occ = tmp_path / "occ.txt"
    occ.write_text("doctor\n")
    assert main(["fair", "centroids", "--config", "configs/fair/sd15.py:gender", "--out", out,
                 f"--config.fair.concepts_file={occ}", f"--config.fair.model={tmp_path / 'missing'}"]) == 2
    assert "missing" in capsys.readouterr().err
