"""load_pipeline on a tiny local SD folder; one denoising step inside the user's own jit."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from diffusers import AutoencoderKL as TorchVAE

import jharm
from diffusers_utils import max_abs, nchw, nhwc, randomize_
from jharm.models import AutoencoderKL, IPAdapter, UNet2DConditionModel
from jharm.tokenizer import CLIPTokenizer
from jharm.weights.io import WeightsError
from test_ip_adapter import EMBED_DIM, official_state_dict
from test_unet import TINY_A, make_torch_unet
from test_vae import TINY as TINY_VAE


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    unet = make_torch_unet(root / "unet", TINY_A)
    torch.manual_seed(0)
    randomize_(TorchVAE(**TINY_VAE)).save_pretrained(root / "vae")
    text = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=TINY_A["cross_attention_dim"],
                                       intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                       max_position_embeddings=77, eos_token_id=49407)
    text_encoder = transformers.CLIPTextModel(text).eval()
    text_encoder.save_pretrained(root / "text_encoder")
    vision = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=8, patch_size=4, projection_dim=EMBED_DIM)
    transformers.CLIPVisionModelWithProjection(vision).save_pretrained(root / "image_encoder")
    CLIPTokenizer.default(pad="eos").save_pretrained(str(root / "tokenizer"))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}))
    torch.save(official_state_dict(unet), root / "ip.bin")
    return root, unet, text_encoder


def test_load_pipeline_and_user_jitted_step(sd_folder):
    root, torch_unet, torch_text = sd_folder
    pipe = jharm.load_pipeline(str(root))
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert pipe.scheduler_config["beta_schedule"] == "scaled_linear"
    assert pipe.vae_scaling_factor == TINY_VAE["scaling_factor"]
    assert pipe.image_encoder is not None and pipe.ip_adapter is None

    # The README example: someone else's jitted DDIM step (eta 0) calling jharm's modules.
    unet, text_encoder = pipe.unet, pipe.text_encoder

    @jax.jit
    def ddim_step(unet_params, text_params, latents, ids, t, alpha_t, alpha_prev):
        context = text_encoder.apply(text_params, ids)["last_hidden_state"]
        eps = unet.apply(unet_params, latents, t, context)
        x0 = (latents - jnp.sqrt(1 - alpha_t) * eps) / jnp.sqrt(alpha_t)
        return jnp.sqrt(alpha_prev) * x0 + jnp.sqrt(1 - alpha_prev) * eps

    ids = pipe.tokenizer(["a photo of a cat", ""])
    latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    t, alpha_t, alpha_prev = np.array([501, 501]), 0.3, 0.5
    out = ddim_step(pipe.unet_params, pipe.text_encoder_params, latents, ids, t, alpha_t, alpha_prev)

    with torch.no_grad():
        context = torch_text(torch.from_numpy(ids).long()).last_hidden_state
        eps = nhwc(torch_unet(nchw(latents), torch.from_numpy(t), context).sample)
    x0 = (latents - np.sqrt(1 - alpha_t) * eps) / np.sqrt(alpha_t)
    expected = np.sqrt(alpha_prev) * x0 + np.sqrt(1 - alpha_prev) * eps
    assert max_abs(out, expected) <= 1e-4


def test_load_pipeline_with_ip_adapter_and_errors(sd_folder, tmp_path):
    root, _, _ = sd_folder
    pipe = jharm.load_pipeline(str(root), ip_adapter=str(root / "ip.bin"))
    assert isinstance(pipe.ip_adapter, IPAdapter)
    assert pipe.unet_config.ip_adapter_tokens == 4 and pipe.unet.config == pipe.unet_config
    attn2 = pipe.unet_params["params"]["mid_block"]["attentions_0"]["transformer_blocks_0"]["attn2"]
    assert set(attn2) >= {"to_k_ip", "to_v_ip"}

    (tmp_path / "unet").mkdir()
    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(WeightsError, match=r"missing sub-folders: vae/, text_encoder/, scheduler/"):
        jharm.load_pipeline(str(tmp_path))


def test_convert_pipeline_kind(sd_folder, tmp_path):
    """`jharm convert --kind pipeline` writes every component's params in one file."""
    from jharm.weights.diffusers import read_flax_params
    from jharm.weights.flax_checkpoint import convert_folder

    root, torch_unet, _ = sd_folder
    out, count = convert_folder("pipeline", str(root), str(tmp_path / "flax"))
    params = read_flax_params(f"{out}/params.safetensors")
    assert set(params) == {"unet", "vae", "text_encoder", "image_encoder"} and count > 0
    expected = torch_unet.state_dict()["conv_in.weight"].numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(params["unet"]["conv_in"]["kernel"], expected)
