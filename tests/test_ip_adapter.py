"""IP-Adapter: official-layout checkpoints through diffusers' own IP-Adapter processors vs jharm."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from safetensors.torch import save_file

from diffusers_utils import max_abs, nchw, nhwc
from jharm.models.ip_adapter import IPAdapter, load_ip_adapter
from jharm.weights.diffusers import export_unet, load_unet
from jharm.weights.io import WeightsError
from test_unet import MICRO, inputs, make_torch_unet

N_TOKENS, EMBED_DIM = 4, 10


def official_state_dict(unet, seed=0):
    """A random IP-Adapter in the official nested layout, sized for ``unet``."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen) * 0.3  # noqa: E731
    d = unet.config.cross_attention_dim
    image_proj = {"proj.weight": rand(N_TOKENS * d, EMBED_DIM), "proj.bias": rand(N_TOKENS * d),
                  "norm.weight": 1 + rand(d), "norm.bias": rand(d)}
    ip_layers, k = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            attn = unet.get_submodule(name[: -len(".processor")])
            ip_layers[f"{k}.to_k_ip.weight"] = rand(attn.to_k.out_features, d)
            ip_layers[f"{k}.to_v_ip.weight"] = rand(attn.to_v.out_features, d)
            k += 2
    return {"image_proj": image_proj, "ip_adapter": ip_layers}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ip")
    ref = make_torch_unet(folder / "unet", MICRO, seed=3)
    state = official_state_dict(ref)
    torch.save(state, folder / "ip-adapter_sd15.bin")
    save_file({f"{group}.{k}": v for group, d in state.items() for k, v in d.items()},
              folder / "ip-adapter_sd15.safetensors")
    ref._load_ip_adapter_weights([state])  # diffusers' own loader and processors
    assert all(isinstance(p, IPAdapterAttnProcessor2_0)
               for n, p in ref.attn_processors.items() if n.endswith("attn2.processor"))
    module, variables, config = load_unet(str(folder / "unet"))
    return folder, ref, module, variables, config


def diffusers_eps(ref, x, t, ctx, image_embeds, scale):
    for name, proc in ref.attn_processors.items():
        if isinstance(proc, IPAdapterAttnProcessor2_0):
            proc.scale = [scale]
    with torch.no_grad():
        embeds = [torch.from_numpy(image_embeds)[:, None]]  # (B, num_images=1, E)
        out = ref(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), added_cond_kwargs={"image_embeds": embeds})
    return nhwc(out.sample)


def test_ip_adapter_parity_with_diffusers(setup):
    folder, ref, module, variables, config = setup
    adapter = load_ip_adapter(str(folder / "ip-adapter_sd15.bin"), config)
    assert adapter.num_tokens == N_TOKENS and len(adapter.layers) == 4
    ip_config, ip_variables = adapter.merge(config, variables)
    from jharm.models.unet import UNet2DConditionModel

    ip_unet = UNet2DConditionModel(ip_config)
    x, t, ctx = inputs(MICRO)
    embeds = np.random.default_rng(5).standard_normal((2, EMBED_DIM)).astype(np.float32)
    tokens = jax.jit(adapter.image_tokens)(embeds)

    @jax.jit
    def eps(v, tokens, scale):
        return ip_unet.apply(v, x, t, ctx, ip_tokens=tokens, ip_scale=scale)

    plain = jax.jit(module.apply)(variables, x, t, ctx)
    outs = {}
    for s in (1.0, 0.5, 0.0):
        outs[s] = eps(ip_variables, tokens, jnp.full((2,), s))
        expected = diffusers_eps(ref, x, t, ctx, embeds, s)
        assert max_abs(outs[s], expected) <= 1e-4, s
    assert max_abs(outs[1.0], outs[0.0]) > 1e-2  # the image branch matters
    np.testing.assert_array_equal(outs[0.0], plain)  # scale 0 is exactly the plain UNet
    # Per-example scales (as Co-Erasing's batched teacher uses): rows are independent.
    mixed = eps(ip_variables, tokens, jnp.array([1.0, 0.5]))
    assert max_abs(mixed[0], outs[1.0][0]) <= 1e-6 and max_abs(mixed[1], outs[0.5][1]) <= 1e-6

    # The safetensors file gives the same adapter; state_dict round-trips to the official keys.
    again = IPAdapter.load(str(folder / "ip-adapter_sd15.safetensors"), config)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again.layers), jax.tree.leaves(adapter.layers)))
    official = torch.load(folder / "ip-adapter_sd15.bin", weights_only=True)
    flat = adapter.state_dict()
    assert sorted(flat) == sorted(f"{g}.{k}" for g, d in official.items() for k in d)
    assert all(np.array_equal(flat[f"{g}.{k}"], v.numpy()) for g, d in official.items() for k, v in d.items())
    # Extracting from the merged UNet gives the same adapter; export drops it (plain SD UNet).
    extracted = IPAdapter.from_unet(ip_config, ip_variables, adapter.image_proj, adapter.image_proj_params)
    assert extracted.state_dict().keys() == flat.keys()
    out_dir = export_unet(ip_config, ip_variables, str(folder / "export"))
    _, exported, _ = load_unet(out_dir)
    assert jax.tree.structure(exported) == jax.tree.structure(variables)


def test_ip_adapter_errors(setup):
    folder, _, _, _, config = setup
    torch.save({"something": torch.zeros(2)}, folder / "bad.bin")
    with pytest.raises(WeightsError, match="image_proj.proj.weight"):
        load_ip_adapter(str(folder / "bad.bin"), config)
    state = torch.load(folder / "ip-adapter_sd15.bin", weights_only=True)
    del state["ip_adapter"]["3.to_v_ip.weight"]
    torch.save(state, folder / "partial.bin")
    with pytest.raises(WeightsError, match=r"missing keys \(1\): ip_adapter\.3\.to_v_ip\.weight"):
        load_ip_adapter(str(folder / "partial.bin"), config)
