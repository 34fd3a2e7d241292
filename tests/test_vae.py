"""AutoencoderKL: parity with diffusers on random weights, legacy names, export."""
import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from safetensors.torch import load_file, save_file

from diffusers_utils import max_abs, nchw, nhwc, randomize_
from jharm.models.vae import AutoencoderKL, VAEConfig, sample_posterior
from jharm.weights.diffusers import export_vae, load_vae

TINY = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
            norm_num_groups=4, sample_size=16, scaling_factor=0.3,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def build(path, cfg, seed=0):
    torch.manual_seed(seed)
    model = randomize_(TorchVAE(**cfg), seed)
    model.save_pretrained(path)
    return model


def reference(model, x):
    with torch.no_grad():
        posterior = model.encode(nchw(x)).latent_dist
        z = posterior.mean
        return nhwc(posterior.mean), nhwc(posterior.logvar), nhwc(model.decode(z).sample), nhwc(z)


def check_parity(model, module, variables, x):
    mean, logvar, image, z = reference(model, x)
    encode = jax.jit(lambda v, x: module.apply(v, x, method=AutoencoderKL.encode))
    decode = jax.jit(lambda v, z: module.apply(v, z, method=AutoencoderKL.decode))
    got_mean, got_logvar = encode(variables, x)
    errs = (max_abs(got_mean, mean), max_abs(got_logvar, logvar), max_abs(decode(variables, z), image))
    assert np.abs(image).max() > 0.1
    return errs, (got_mean, got_logvar)


def test_parity_with_diffusers(tmp_path):
    model = build(tmp_path / "vae", TINY)
    module, variables, config = load_vae(str(tmp_path / "vae"))
    assert config.scaling_factor == 0.3 and config == VAEConfig(**TINY)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    (mean_err, logvar_err, decode_err), (mean, logvar) = check_parity(model, module, variables, x)
    assert mean_err <= 1e-4 and logvar_err <= 1e-4 and decode_err <= 1e-4
    z = sample_posterior(jax.random.key(0), mean, logvar)
    assert z.shape == (2, 8, 8, 4) and 0 < max_abs(z, mean)

    # Export round trip: diffusers reloads the exported folder to the same outputs.
    out = export_vae(config, variables, str(tmp_path / "export"))
    reloaded = TorchVAE.from_pretrained(out).eval()
    for a, b in zip(reference(reloaded, x), reference(model, x)):
        assert max_abs(a, b) <= 1e-6


def test_legacy_attention_names(tmp_path):
    """Hub VAEs saved by old diffusers use query/key/value/proj_attn; both loaders accept them."""
    model = build(tmp_path / "vae", TINY)
    path = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    legacy = {}
    for key, value in load_file(path).items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if ".attentions.0." in key and f".{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
        legacy[key] = value
    assert any(".proj_attn." in k for k in legacy)
    save_file(legacy, path)
    module, variables, _ = load_vae(str(tmp_path / "vae"))
    x = np.random.default_rng(1).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    assert max(check_parity(model, module, variables, x)[0]) <= 1e-4


def test_config_rejects_unsupported(tmp_path):
    base = dict(TorchVAE(**TINY).config)
    with pytest.raises(ValueError, match="shift_factor"):
        VAEConfig.from_diffusers_config({**base, "shift_factor": 0.1})
    with pytest.raises(ValueError, match="DownEncoderBlock2D"):
        VAEConfig.from_diffusers_config({**base, "down_block_types": ["Foo", "DownEncoderBlock2D"]})


@pytest.mark.slow
@pytest.mark.big_model
def test_sd_vae_parity(tmp_path):
    cfg = dict(TINY, block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
               scaling_factor=0.18215, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
    model = build(tmp_path / "vae", cfg)
    module, variables, _ = load_vae(str(tmp_path / "vae"))
    x = np.random.default_rng(0).uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32)
    (mean_err, logvar_err, decode_err), _ = check_parity(model, module, variables, x)
    print(f"\nSD VAE 64x64: encode mean err {mean_err:.2e}, logvar {logvar_err:.2e}, decode {decode_err:.2e}")
    assert mean_err <= 1e-4 and decode_err <= 1e-4
