"""UNet2DConditionModel: parity with diffusers on random weights, hooks, export."""
import json
import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import traverse_util

from diffusers_utils import max_abs, nchw, nhwc, randomize_
from jharm.models.unet import UNet2DConditionModel, UNetConfig, ip_layer_paths
from jharm.weights.diffusers import export_unet, load_unet
from jharm.weights.io import WeightsError

TINY_A = dict(  # int head count, conv projections, cross/plain block mix
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=4, cross_attention_dim=24, norm_num_groups=8,
)
TINY_B = dict(  # per-block heads, linear projections, upcast, 2 transformer layers, odd sizes, SD2-style time
    sample_size=10, in_channels=3, out_channels=5, block_out_channels=(16, 32, 32), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 2, 2), cross_attention_dim=12,
    norm_num_groups=4, use_linear_projection=True, upcast_attention=True, flip_sin_to_cos=False, freq_shift=1,
)


def make_torch_unet(path, cfg, seed=0):
    torch.manual_seed(seed)
    model = randomize_(TorchUNet(**cfg), seed)
    model.save_pretrained(path)
    return model


def inputs(cfg, batch=2, length=7, seed=0, size=None):
    rng = np.random.default_rng(seed)
    size = size or cfg["sample_size"]
    x = rng.standard_normal((batch, size, size, cfg["in_channels"])).astype(np.float32)
    t = np.array([3, 917][:batch], np.int64)
    ctx = rng.standard_normal((batch, length, cfg["cross_attention_dim"])).astype(np.float32)
    return x, t, ctx


def torch_eps(model, x, t, ctx, **kw):
    with torch.no_grad():
        return nhwc(model(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), **kw).sample)


MICRO = dict(sample_size=4, in_channels=2, out_channels=2, block_out_channels=(8,), layers_per_block=1,
             down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
             attention_head_dim=2, cross_attention_dim=4, norm_num_groups=2)


@pytest.fixture(scope="module")
def tiny_b(tmp_path_factory):
    """TINY_B in diffusers (saved, reloaded by jharm) and its jitted apply (compiled once)."""
    path = tmp_path_factory.mktemp("tiny_b") / "unet"
    ref = make_torch_unet(path, TINY_B)
    module, variables, config = load_unet(str(path))
    apply = jax.jit(lambda v, *a: module.apply(v, *a, return_attention_probs=True))
    return ref, module, variables, config, apply


def test_parity_with_diffusers_int_heads_conv_projection(tmp_path):
    ref = make_torch_unet(tmp_path / "unet", TINY_A)
    module, variables, config = load_unet(str(tmp_path / "unet"))
    assert config == UNetConfig(**TINY_A)
    x, t, ctx = inputs(TINY_A)
    out = jax.jit(module.apply)(variables, x, t, ctx)
    expected = torch_eps(ref, x, t, ctx)
    assert np.abs(expected).max() > 0.1  # random weights give a non-trivial output
    assert max_abs(out, expected) <= 1e-4


def test_parity_with_diffusers_only_cross_attention(tmp_path):
    """Per-block only_cross_attention: block 0's attn1 (down and up) reads the text; the mid
    block keeps self-attention, as diffusers' UNetMidBlock2DCrossAttn does."""
    cfg = dict(TINY_A, only_cross_attention=(True, False))
    ref = make_torch_unet(tmp_path / "unet", cfg)
    module, variables, config = load_unet(str(tmp_path / "unet"))
    assert config == UNetConfig(**cfg)
    kernel = variables["params"]["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_k"]["kernel"]
    assert kernel.shape == (TINY_A["cross_attention_dim"], 32)
    x, t, ctx = inputs(TINY_A)
    assert max_abs(jax.jit(module.apply)(variables, x, t, ctx), torch_eps(ref, x, t, ctx)) <= 1e-4
    assert UNetConfig.from_diffusers_config(config.to_diffusers_config()) == config


class _RecordProbs:
    """A diffusers attention processor that also stores the attention probabilities."""

    def __init__(self, store, name):
        self.store, self.name = store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **_):
        from diffusers.models.attention_processor import AttnProcessor

        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        probs = attn.get_attention_scores(q, k, None)
        self.store[self.name] = probs.reshape(-1, attn.heads, *probs.shape[1:]).detach().numpy()
        return AttnProcessor()(attn, hidden_states, encoder_hidden_states, attention_mask)


def test_parity_with_diffusers_head_list_linear_upcast_and_probs(tiny_b):
    """Per-block heads, linear projections, upcast, odd sizes (10 -> 5 -> 3 -> 5 -> 10),
    and every attn2's probabilities against diffusers' own attention scores."""
    ref, module, variables, config, apply = tiny_b
    x, t, ctx = inputs(TINY_B)
    expected = torch_eps(ref, x, t, ctx)
    out, probs = apply(variables, x, t, ctx)
    assert np.abs(expected).max() > 0.1
    assert max_abs(out, expected) <= 1e-4
    store, processors, original = {}, {}, dict(ref.attn_processors)
    for name, proc in original.items():
        path = name[: -len(".processor")].replace(".", "/")
        for list_name in ("down_blocks", "up_blocks", "attentions", "transformer_blocks"):
            path = path.replace(f"{list_name}/", f"{list_name}_")  # down_blocks.1 -> down_blocks_1
        processors[name] = _RecordProbs(store, path) if name.endswith("attn2.processor") else proc
    ref.set_attn_processor(processors)
    try:
        assert max_abs(torch_eps(ref, x, t, ctx), expected) <= 1e-5
    finally:
        ref.set_attn_processor(original)
    assert sorted(probs) == sorted(store) == sorted(ip_layer_paths(config))
    assert len(probs) == 2 * 2 * 2 + 2 * 3 * 2 + 2  # down: 2 blocks x 2 attentions x 2 layers; up: 2 x 3 x 2; mid: 2
    for name, p in probs.items():
        assert max_abs(p, store[name]) <= 1e-5, name


def test_remat_and_bf16_policy(tmp_path):
    make_torch_unet(tmp_path / "unet", MICRO)
    module, variables, _ = load_unet(str(tmp_path / "unet"))
    remat_module, _, _ = load_unet(str(tmp_path / "unet"), remat=True)
    x, t, ctx = inputs(MICRO)
    both = jax.jit(lambda v: (module.apply(v, x, t, ctx), remat_module.apply(v, x, t, ctx)))
    out, out_remat = both(variables)
    assert max_abs(out, out_remat) <= 1e-6
    # remat must really checkpoint each block in the backward pass (jax.checkpoint
    # guarantees equal gradients; compiling two grads would cost ~30 s here).
    grad_jaxpr = str(jax.make_jaxpr(jax.grad(lambda v: jnp.sum(remat_module.apply(v, x, t, ctx))))(variables))
    assert grad_jaxpr.count("checkpoint") + grad_jaxpr.count("remat") >= 3
    bf16 = UNet2DConditionModel(UNetConfig(**{**MICRO, "dtype": "bfloat16"}))
    out16 = jax.jit(bf16.apply)(variables, x, t, ctx)
    assert out16.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
    assert max_abs(out16, out) <= 0.05 * float(jnp.abs(out).max())


def test_param_paths_select_esd_sets(tmp_path):
    module = UNet2DConditionModel(UNetConfig(**TINY_A))
    flat = traverse_util.flatten_dict(jax.eval_shape(module.init_params, jax.random.key(0))["params"])
    names = ["/".join(p) for p in flat]
    assert "down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k/kernel" in names
    assert "time_embedding/linear_1/kernel" in names
    assert "down_blocks_0/attentions_0/transformer_blocks_0/ff/net_0/proj/kernel" in names
    assert not any("_ip" in n for n in names)  # plain SD tree unless IP-Adapter is configured
    ip = UNet2DConditionModel(UNetConfig(**TINY_A, ip_adapter_tokens=4))
    ip_tree = jax.eval_shape(ip.init_params, jax.random.key(0))["params"]
    ip_names = {"/".join(p) for p in traverse_util.flatten_dict(ip_tree)}
    assert sorted(ip_names - set(names)) == sorted(
        f"{layer}/{proj}/kernel" for layer in ip_layer_paths(ip.config) for proj in ("to_k_ip", "to_v_ip"))


def test_config_rejects_unsupported_options(tmp_path):
    base = dict(TorchUNet(**TINY_A).config)
    with pytest.raises(ValueError, match="class_embed_type"):
        UNetConfig.from_diffusers_config({**base, "class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="SimpleCrossAttnDownBlock2D"):
        UNetConfig.from_diffusers_config({**base, "down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]})
    assert UNetConfig.from_diffusers_config(base) == UNetConfig(**TINY_A)


def test_load_errors_name_key_and_shapes(tmp_path):
    make_torch_unet(tmp_path / "unet", TINY_A)
    cfg_path = tmp_path / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["cross_attention_dim"] = 20
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"attn2\.to_k\.weight: expected \(20, 32\).*found \(24, 32\)"):
        load_unet(str(tmp_path / "unet"))
    os.remove(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightsError, match="no weight file"):
        load_unet(str(tmp_path / "unet"))


def test_export_round_trip(tmp_path, tiny_b):
    _, module, variables, config, apply = tiny_b
    # A "fine-tuned" model: perturb the Flax params, export, reload in diffusers.
    rng = np.random.default_rng(1)  # numpy: per-shape jax.random calls would each compile
    tuned = jax.tree.map(lambda v: jnp.asarray(v + 0.01 * rng.standard_normal(v.shape, np.float32)), variables)
    out_dir = export_unet(config, tuned, str(tmp_path / "export"))
    export_unet(config, tuned, str(tmp_path / "export"))  # overwriting an export is atomic too
    assert sorted(os.listdir(tmp_path)) == ["export"]
    reloaded = TorchUNet.from_pretrained(out_dir).eval()
    x, t, ctx = inputs(TINY_B)
    assert max_abs(torch_eps(reloaded, x, t, ctx), apply(tuned, x, t, ctx)[0]) <= 1e-5
    _, again, _ = load_unet(out_dir)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(tuned)))


SD15 = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
SD21 = dict(sample_size=64, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True, upcast_attention=True)


@pytest.mark.slow
@pytest.mark.big_model
@pytest.mark.parametrize("cfg", [SD15, SD21], ids=["sd15", "sd21"])
def test_sd_sized_parity(tmp_path, cfg):
    torch.manual_seed(0)
    ref = randomize_(TorchUNet(**cfg), 0)
    ref.save_pretrained(tmp_path / "unet")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    module, variables, _ = load_unet(str(tmp_path / "unet"))
    convert_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 64, 64, 4)).astype(np.float32)
    ctx = rng.standard_normal((1, 77, cfg["cross_attention_dim"])).astype(np.float32)
    t = np.array([500])
    expected = torch_eps(ref, x, t, ctx)
    del ref
    out = jax.jit(module.apply)(variables, x, t, ctx)
    err = max_abs(out, expected)
    print(f"\n{cfg['cross_attention_dim']}-ctx UNet: max abs err {err:.2e}, convert {convert_s:.1f}s, "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB "
          f"(before loading {rss_before / 2**20:.2f} GiB)")
    assert err <= 1e-4


def test_cli_export_from_train_params_file(tmp_path, tiny_b):
    """`jharm export` takes the train loop's params.safetensors (a/b/c keys, with IP params) and a base folder."""
    from jharm.cli import main
    from jharm.weights.io import save_safetensors

    _, _, variables, config, _ = tiny_b
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(config.to_diffusers_config()))
    flat = traverse_util.flatten_dict(variables, sep="/")
    ip_key = "params/mid_block/attentions_0/transformer_blocks_0/attn2/to_k_ip/kernel"
    flat[ip_key] = np.zeros((TINY_B["cross_attention_dim"], 32), np.float32)  # trained IP params are dropped
    save_safetensors({k: np.asarray(v) for k, v in flat.items()}, str(tmp_path / "params.safetensors"))
    args = ["export", "--kind", "unet", "--params", str(tmp_path / "params.safetensors"), "--base", str(base),
            "--out", str(tmp_path / "out")]
    assert main(args) == 0
    _, again, _ = load_unet(str(tmp_path / "out"))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(variables)))
    del flat["params/conv_in/bias"]
    flat["params/conv_out/bias"] = np.zeros(3, np.float32)
    save_safetensors({k: np.asarray(v) for k, v in flat.items()}, str(tmp_path / "params.safetensors"))
    assert main(args) == 1
