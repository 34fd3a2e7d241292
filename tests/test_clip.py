"""Flax CLIP towers vs transformers on the same random weights, through the public loaders."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jharm.models.clip import clip_logits
from jharm.weights import clip as clip_weights

TEXT = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, projection_dim=24, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=77, eos_token_id=999, bos_token_id=998, pad_token_id=1)
VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, projection_dim=24,
              num_hidden_layers=3, num_attention_heads=4)


def _ids(eos=999, pad=None, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 990, size=(batch, 77))
    pad = eos if pad is None else pad
    for row, length in enumerate([5, 40][:batch]):
        ids[row, 0] = 998
        ids[row, length] = eos
        ids[row, length + 1:] = pad
    return ids


def _perturb(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b.detach().numpy())))


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("pad", [None, 0])
def test_text_with_projection_matches_transformers(tmp_path, act, pad):
    ref = _perturb(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(hidden_act=act, **TEXT)))
    ref.save_pretrained(tmp_path)
    module, params, cfg = clip_weights.load_clip_text_model(str(tmp_path))
    assert cfg.with_projection and cfg.hidden_act == act
    ids = _ids(pad=pad)
    ours = module.apply({"params": params}, jnp.asarray(ids))
    with torch.no_grad():
        theirs = ref(torch.tensor(ids), output_hidden_states=True)
    assert _max_err(ours["last_hidden_state"], theirs.last_hidden_state) < 1e-4
    assert _max_err(ours["hidden_states"][-2], theirs.hidden_states[-2]) < 1e-4  # penultimate (SD 2.x)
    assert _max_err(ours["text_embeds"], theirs.text_embeds) < 1e-4
    assert len(ours["hidden_states"]) == len(theirs.hidden_states)


def test_text_model_pooled_and_attention_mask(tmp_path):
    ref = _perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT)))
    ref.save_pretrained(tmp_path, safe_serialization=False)  # pytorch_model.bin through weights_only
    module, params, cfg = clip_weights.load_clip_text_model(str(tmp_path))
    assert not cfg.with_projection
    ids = _ids()
    mask = (np.arange(77)[None] <= np.array([5, 40])[:, None]).astype(np.int32)
    ours = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    with torch.no_grad():
        theirs = ref(torch.tensor(ids), attention_mask=torch.tensor(mask))
    # Padding positions are masked out of every query; compare the valid ones and the pooled output.
    for row, n in enumerate([6, 41]):
        assert _max_err(ours["last_hidden_state"][row, :n], theirs.last_hidden_state[row, :n]) < 1e-4
    assert _max_err(ours["pooler_output"], theirs.pooler_output) < 1e-4


def test_inputs_embeds_equal_ids(tmp_path):
    ref = _perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT)))
    ref.save_pretrained(tmp_path)
    module, params, _ = clip_weights.load_clip_text_model(str(tmp_path))
    ids = jnp.asarray(_ids())
    table = params["text_model"]["embeddings"]["token_embedding"]["embedding"]
    a = module.apply({"params": params}, ids)["pooler_output"]
    b = module.apply({"params": params}, ids, inputs_embeds=table[ids])["pooler_output"]
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_vision_with_projection_matches_transformers(tmp_path, act):
    ref = _perturb(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(hidden_act=act, **VISION)))
    ref.save_pretrained(tmp_path)
    module, params, cfg = clip_weights.load_clip_vision_model(str(tmp_path))
    pixels = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
    ours = module.apply({"params": params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    with torch.no_grad():
        theirs = ref(torch.tensor(pixels), output_hidden_states=True)
    assert _max_err(ours["last_hidden_state"], theirs.last_hidden_state) < 1e-4
    assert _max_err(ours["hidden_states"][-2], theirs.hidden_states[-2]) < 1e-4
    assert _max_err(ours["image_embeds"], theirs.image_embeds) < 1e-4


def test_clip_model_folder_and_round_trip(tmp_path):
    config = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=24)
    ref = _perturb(transformers.CLIPModel(config))
    ref.save_pretrained(tmp_path / "ref")
    tm, tp, vm, vp, scale = clip_weights.load_clip_model(str(tmp_path / "ref"))
    ids = _ids()
    pixels = np.random.default_rng(2).normal(size=(2, 3, 32, 32)).astype(np.float32)
    t = tm.apply({"params": tp}, jnp.asarray(ids))["text_embeds"]
    v = vm.apply({"params": vp}, jnp.asarray(pixels.transpose(0, 2, 3, 1)))["image_embeds"]
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels))
    assert _max_err(clip_logits(t, v, scale), theirs.logits_per_text) < 1e-4

    # Flax -> export -> transformers reload -> same outputs.
    clip_weights.export_clip_model(tm.config, tp, vm.config, vp, scale, str(tmp_path / "export"))
    reloaded = transformers.CLIPModel.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        again = reloaded(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels))
    assert float((again.logits_per_text - theirs.logits_per_text).abs().max()) < 1e-5
    clip_weights.export_clip_text_model(tm.config, tp, str(tmp_path / "text"))
    text_only = transformers.CLIPTextModelWithProjection.from_pretrained(tmp_path / "text").eval()
    with torch.no_grad():
        embeds = text_only(torch.tensor(ids)).text_embeds
        embeds = embeds / embeds.norm(dim=-1, keepdim=True)  # CLIPModel returns normalised embeds
        assert float((embeds - theirs.text_embeds).abs().max()) < 1e-5


def test_wrong_checkpoint_names_key_and_shapes(tmp_path):
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT))
    ref.save_pretrained(tmp_path)
    import json

    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 48
    with pytest.raises(clip_weights.WeightsError, match=r"mlp\.fc1\.weight: expected \(32, 48\).*found \(32, 64\)"):
        clip_weights.load_clip_text_model(str(tmp_path), config=cfg)
    with pytest.raises(clip_weights.WeightsError, match="not found"):
        clip_weights.load_clip_text_model(str(tmp_path.parent / "nope"))


# SD-sized towers (random weights): the shapes users load.
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768)
SD21_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                 num_attention_heads=16, hidden_act="gelu", projection_dim=1024)
VIT_H = dict(image_size=224, patch_size=14, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
             num_attention_heads=16, hidden_act="gelu", projection_dim=1024)


@pytest.mark.slow
@pytest.mark.big_model
@pytest.mark.parametrize("name, cfg", [("sd15", SD15_TEXT), ("sd21", SD21_TEXT)])
def test_sd_text_encoders(tmp_path, name, cfg):
    ref = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**cfg)).eval()
    ref.save_pretrained(tmp_path)
    module, params, _ = clip_weights.load_clip_text_model(str(tmp_path))
    ids = _ids(eos=49407, batch=1)
    ids[ids >= 49406] = 49407
    ids[0, 0] = 49406
    ours = module.apply({"params": params}, jnp.asarray(ids))
    with torch.no_grad():
        theirs = ref(torch.tensor(ids), output_hidden_states=True)
    assert _max_err(ours["last_hidden_state"], theirs.last_hidden_state) < 1e-4
    assert _max_err(ours["hidden_states"][-2], theirs.hidden_states[-2]) < 1e-4
    assert _max_err(ours["text_embeds"], theirs.text_embeds) < 1e-4


@pytest.mark.slow
@pytest.mark.big_model
def test_vit_h14_image_encoder(tmp_path):
    ref = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**VIT_H)).eval()
    ref.save_pretrained(tmp_path)
    module, params, _ = clip_weights.load_clip_vision_model(str(tmp_path))
    pixels = np.random.default_rng(3).normal(size=(1, 3, 224, 224)).astype(np.float32)
    ours = module.apply({"params": params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    with torch.no_grad():
        theirs = ref(torch.tensor(pixels))
    assert _max_err(ours["last_hidden_state"], theirs.last_hidden_state) < 1e-4
    assert _max_err(ours["image_embeds"], theirs.image_embeds) < 1e-4
