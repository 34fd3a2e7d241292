"""ADM (guided-diffusion) UNet: parity with an independent PyTorch transcription, loader layouts, export."""
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference.adm_torch import TorchADM

from jharm.models.adm import ADMConfig, adm_apply_fn, param_shapes, tiny_config
from jharm.weights.adm import adm_key_fn, adm_state_dict, load_adm, save_adm
from jharm.weights.io import WeightsError, save_safetensors

_TORCH_ONLY = {"dropout", "use_checkpoint", "norm_groups"}  # the reference is GroupNorm(32) only


def torch_model(cfg: ADMConfig, seed: int = 0, device: str = "cpu") -> TorchADM:
    torch.manual_seed(seed)
    kwargs = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in _TORCH_ONLY}
    return TorchADM(**kwargs).to(device).eval()


@functools.lru_cache(maxsize=None)
def jitted(cfg: ADMConfig):
    """One compile per config (much cheaper than eager op-by-op dispatch), shared by tests."""
    return jax.jit(adm_apply_fn(cfg))


def _save_pt(model, path):
    torch.save(model.state_dict(), str(path))
    return str(path)


def inputs(cfg: ADMConfig, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    x1 = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g) if cfg.cond_x1 else None
    t = torch.linspace(0.1, 1000.0, batch)  # I2SB's noise levels span [0.1, 1000]
    return x, t, x1


def run_both(ref: TorchADM, cfg: ADMConfig, params, fn=None):
    x, t, x1 = inputs(cfg)
    with torch.no_grad():
        want = ref(x, t, x1).numpy().transpose(0, 2, 3, 1)
    nhwc = lambda a: None if a is None else jnp.asarray(a.numpy().transpose(0, 2, 3, 1))  # noqa: E731
    got = (fn or jitted(cfg))(params, nhwc(x), jnp.asarray(t.numpy()), nhwc(x1))
    return np.asarray(got), want


VARIANTS = {
    "i2sb_like": dict(),  # scale-shift, resblock up/down, legacy attention, heads by count
    "plain": dict(use_scale_shift_norm=False, resblock_updown=False),
    "cond_x1_new_order": dict(cond_x1=True, use_new_attention_order=True, num_head_channels=16, conv_resample=False),
    "no_attention_learn_sigma": dict(attention_resolutions=(), learn_sigma=True, channel_mult=(1, 1, 2),
                                     num_res_blocks=2, num_heads_upsample=1),
}


@pytest.mark.parametrize("name,suffix", [(name, ".pt") for name in sorted(VARIANTS)] + [("plain", ".safetensors")])
def test_parity_with_torch_reference(tmp_path, name, suffix):
    cfg = tiny_config(**VARIANTS[name])
    ref = torch_model(cfg)
    path = str(tmp_path / f"adm{suffix}")
    if suffix == ".pt":
        torch.save(ref.state_dict(), path)
    else:
        save_safetensors({k: v.numpy() for k, v in ref.state_dict().items()}, path)
    got, want = run_both(ref, cfg, load_adm(path, cfg))
    assert got.shape == want.shape == (2, 32, 32, cfg.output_channels)
    err = np.abs(got - want).max()
    assert err <= 1e-4, f"{name}: max abs error {err}"
    assert np.abs(want).max() > 0.1  # a real signal, not zeros


def test_i2sb_layouts_ema_and_export(tmp_path):
    cfg = tiny_config(**VARIANTS["cond_x1_new_order"])
    net, ema = torch_model(cfg, seed=0), torch_model(cfg, seed=1)
    net_sd = {"diffusion_model." + k: v for k, v in net.state_dict().items()}
    # An I2SB training checkpoint: net (prefixed), torch_ema state, optimizer and scheduler state.
    ckpt = {
        "net": net_sd,
        "ema": {"decay": 0.99, "num_updates": 3, "shadow_params": [p.detach().clone() for p in ema.parameters()],
                "collected_params": None},
        "optimizer": torch.optim.AdamW(net.parameters(), lr=1e-4).state_dict(),
        "sched": None,
    }
    path = str(tmp_path / "latest.pt")
    torch.save(ckpt, path)
    got, want = run_both(net, cfg, load_adm(path, cfg))
    assert np.abs(got - want).max() <= 1e-4
    got, want = run_both(ema, cfg, load_adm(path, cfg, ema=True))
    assert np.abs(got - want).max() <= 1e-4
    # Prefixed bare state dict (Image256Net.state_dict()).
    torch.save(net_sd, str(tmp_path / "net.pt"))
    params = load_adm(str(tmp_path / "net.pt"), cfg)
    # Export: the exact state dict back, with and without the I2SB prefix; reload is identical.
    exported = adm_state_dict(params, prefix="diffusion_model.")
    assert exported.keys() == net_sd.keys()
    for key, value in net_sd.items():
        np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)
    save_adm(params, str(tmp_path / "out.safetensors"))
    again = load_adm(str(tmp_path / "out.safetensors"), cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, again)
    with pytest.raises(WeightsError, match="ema=True needs"):
        load_adm(str(tmp_path / "net.pt"), cfg, ema=True)


def test_from_original_adm_checkpoint(tmp_path):
    """ImageNet ADM (learned sigma, 3 input channels) -> I2SB's conditional network."""
    adm_cfg = dataclasses.replace(tiny_config(**VARIANTS["cond_x1_new_order"]), learn_sigma=True, cond_x1=False)
    ref = torch_model(adm_cfg)
    path = str(tmp_path / "256x256_diffusion_uncond.pt")
    torch.save(ref.state_dict(), path)
    cfg = tiny_config(**VARIANTS["cond_x1_new_order"])
    with pytest.raises(WeightsError, match="needs rng"):
        load_adm(path, cfg, from_adm=True)
    params = load_adm(path, cfg, from_adm=True, rng=jax.random.key(0))
    sd = ref.state_dict()
    np.testing.assert_array_equal(adm_state_dict(params)["out.2.weight"], sd["out.2.weight"][:3].numpy())
    first = adm_state_dict(params)["input_blocks.0.0.weight"]
    np.testing.assert_array_equal(first[:, :3], sd["input_blocks.0.0.weight"].numpy())
    bound = 1 / np.sqrt(6 * 9)
    assert 0.5 * bound < np.abs(first[:, 3:]).max() <= bound  # PyTorch's default conv init range
    # With x1 = 0 the new channels are inert: the conditional net equals the ADM's first 3 outputs.
    x, t, _ = inputs(adm_cfg)
    with torch.no_grad():
        want = ref(x, t).numpy().transpose(0, 2, 3, 1)[..., :3]
    xj = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    got = jitted(cfg)(params, xj, jnp.asarray(t.numpy()), jnp.zeros_like(xj))
    assert np.abs(np.asarray(got) - want).max() <= 1e-4


def test_mismatch_errors_name_key_and_shapes(tmp_path):
    cfg = tiny_config()
    sd = {k: v.numpy() for k, v in torch_model(cfg).state_dict().items()}
    sd["middle_block.1.qkv.weight"] = sd["middle_block.1.qkv.weight"][:, :-1]
    del sd["out.2.bias"]
    sd["label_emb.weight"] = np.zeros((10, 128), np.float32)
    path = str(tmp_path / "bad.safetensors")
    save_safetensors(sd, path)
    with pytest.raises(WeightsError) as err:
        load_adm(path, cfg)
    msg = str(err.value)
    assert "bad.safetensors" in msg and "out.2.bias" in msg and "label_emb.weight" in msg
    assert "middle_block.1.qkv.weight: expected (1, 64, 192)" in msg and "found (1, 63, 192)" in msg
    with pytest.raises(ValueError, match="cond_x1 model needs x1"):
        adm_apply_fn(tiny_config(cond_x1=True))({}, jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,)))  # checked first
    with pytest.raises(ValueError, match="does not divide"):
        ADMConfig(image_size=64, attention_resolutions=(24,))


def test_full_256_layout_matches_reference_shapes():
    """The 256² ImageNet ADM (I2SB's conditional net): every key and shape, without allocating 553M params."""
    cfg = ADMConfig(cond_x1=True)
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in torch_model(cfg, device="meta").state_dict().items()}
    flat = jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0]
    got = {}
    for path, leaf in flat:
        names = tuple(p.key for p in path)
        shape = leaf.shape
        if names[-1] == "kernel":  # Flax layout -> PyTorch layout, as the converter does
            shape = {4: lambda s: (s[3], s[2], s[0], s[1]), 3: lambda s: s[::-1], 2: lambda s: s[::-1]}[len(shape)](shape)
        got[adm_key_fn(names)] = tuple(shape)
    assert got == want
    # 552,807,171 parameters for the unconditional 3-output net; cond_x1 adds 3 input channels to the first conv.
    assert sum(int(np.prod(s)) for s in got.values()) == 552_807_171 + 3 * 256 * 9


def test_experts_vmap_over_stacked_params(tmp_path):
    cfg = tiny_config(image_size=8, channel_mult=(1,), attention_resolutions=(8,))  # one level: few ops to batch
    fn = adm_apply_fn(cfg)
    p0, p1 = (load_adm(_save_pt(torch_model(cfg, seed), tmp_path / f"{seed}.pt"), cfg) for seed in (0, 1))
    stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), p0, p1)
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
    t = jnp.array([1.0, 500.0])
    out = jax.jit(jax.vmap(fn, in_axes=(0, None, None)))(stacked, x, t)
    single = jax.jit(fn)
    np.testing.assert_allclose(out[0], single(p0, x, t), atol=1e-5)
    np.testing.assert_allclose(out[1], single(p1, x, t), atol=1e-5)
    assert np.abs(np.asarray(out[0] - out[1])).max() > 1e-3


_SHARDED_EXPERTS = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jharm.models.adm import adm_apply_fn, init_adm, tiny_config
jax.config.update("jax_default_matmul_precision", "float32")
cfg = tiny_config(image_size=16, model_channels=8, channel_mult=(1,), attention_resolutions=(), num_heads=1,
                  norm_groups=4, cond_x1=True)  # the demo's expert: 1x1 convs in attention and skips
stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), init_adm(cfg, jax.random.key(0)), init_adm(cfg, jax.random.key(1)))
x, x1 = jax.random.normal(jax.random.key(2), (2, 4, 16, 16, 3))
t = jnp.array([10.0, 300.0, 600.0, 900.0])
run = jax.jit(jax.vmap(adm_apply_fn(cfg), in_axes=(0, None, None, None)))
mesh = Mesh(np.array(jax.devices()), ("tensor",))
sharded = jax.device_put(stacked, NamedSharding(mesh, PartitionSpec("tensor")))
print(float(jnp.abs(run(stacked, x, t, x1) - run(sharded, x, t, x1)).max()))
"""


def test_experts_sharded_on_the_expert_axis_compute_the_same():
    """Expert parallelism (MixBridge rules ``ep``) must not change the numbers: with nn.Conv for
    the 1x1 convs XLA:CPU got them wrong here (error ~0.6); see layers.PointwiseConv."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run([sys.executable, "-c", _SHARDED_EXPERTS], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.split()[-1]) < 1e-5


@pytest.mark.slow
@pytest.mark.big_model
def test_parity_256_layout_at_64px(tmp_path):
    """The 256² ADM layout (6 levels, 2 res blocks, attention at ds 8/16/32, 64 ch/head,
    up/down res blocks, scale-shift) at 64x64 with half the channels (138M params) to fit CPU time."""
    cfg = ADMConfig(image_size=64, model_channels=128, attention_resolutions=(8, 4, 2))
    start = time.time()
    ref = torch_model(cfg)
    path = str(tmp_path / "adm.pt")
    torch.save(ref.state_dict(), path)
    params = load_adm(path, cfg)
    got, want = run_both(ref, cfg, params)
    err = np.abs(got - want).max()
    print(f"256-layout ADM (mc=128) at 64px: max abs error {err:.2e}, {time.time() - start:.0f} s")
    assert err <= 1e-4
