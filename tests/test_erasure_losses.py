"""ESD and Co-Erasing losses vs an independent PyTorch computation on diffusers UNets
(Co-Erasing through diffusers' own IP-Adapter attention processors), same z_t and t."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

from diffusers_utils import nchw, randomize_
from jharm.models.unet import UNet2DConditionModel
from jharm.models.ip_adapter import load_ip_adapter
from jharm.objectives.erasure import co_erasing_loss, esd_loss, refine_image_tokens
from jharm.train.tasks.erasure import _eps_fn, query_timestep
from jharm.weights.diffusers import load_unet
from test_ip_adapter import official_state_dict
from test_unet import MICRO, make_torch_unet

ETA = 0.7


class _Tokens(torch.nn.Module):
    """Stands in for diffusers' image projection: the refined tokens go straight to the IP branch."""

    def forward(self, tokens):
        return [tokens]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("erase")
    teacher = make_torch_unet(folder / "teacher", MICRO, seed=3)
    student = randomize_(copy.deepcopy(teacher), seed=11)
    student.save_pretrained(folder / "student")
    torch.save(official_state_dict(teacher, seed=0), folder / "ip_teacher.bin")
    torch.save(official_state_dict(teacher, seed=1), folder / "ip_student.bin")
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 4, 4, MICRO["in_channels"])).astype(np.float32)
    t = np.array([37, 640], np.int32)
    cond = rng.standard_normal((2, 7, MICRO["cross_attention_dim"])).astype(np.float32)
    uncond = rng.standard_normal((2, 7, MICRO["cross_attention_dim"])).astype(np.float32)
    image_tokens = rng.standard_normal((2, 4, MICRO["cross_attention_dim"])).astype(np.float32)
    return folder, teacher, student, (z, t, cond, uncond, image_tokens)


def torch_eps(unet, z, t, ctx, tokens=None, scale=1.0):
    kwargs = {}
    if tokens is not None:
        for proc in unet.attn_processors.values():
            if isinstance(proc, IPAdapterAttnProcessor2_0):
                proc.scale = [scale]
        kwargs["added_cond_kwargs"] = {"image_embeds": torch.from_numpy(tokens)}
    with torch.no_grad():
        return unet(nchw(z), torch.from_numpy(t.astype(np.int64)), torch.from_numpy(ctx), **kwargs).sample


def test_esd_loss_matches_torch(models):
    folder, teacher, student, (z, t, cond, uncond, _) = models
    e_u, e_c = torch_eps(teacher, z, t, uncond), torch_eps(teacher, z, t, cond)
    target = e_u - ETA * (e_c - e_u)
    expected = float(torch.mean((torch_eps(student, z, t, cond) - target) ** 2))

    unet, teacher_vars, _ = load_unet(str(folder / "teacher"))
    _, student_vars, _ = load_unet(str(folder / "student"))
    loss, _ = jax.jit(lambda s, f: esd_loss(s, f, _eps_fn(unet), z, t, cond, uncond, eta=ETA))(student_vars,
                                                                                                   teacher_vars)
    assert expected > 1e-3
    assert abs(float(loss) - expected) <= 1e-5 * max(1.0, expected), (float(loss), expected)


def test_co_erasing_loss_matches_torch_ip_adapter(models):
    folder, teacher, student, (z, t, cond, uncond, image_tokens) = models
    # Reference: refinement in torch, diffusers IP-Adapter processors on teacher and student.
    q, kv = torch.from_numpy(image_tokens), torch.from_numpy(cond)
    weights = torch.softmax(q @ kv.transpose(1, 2) / np.sqrt(q.shape[-1]), dim=-1)
    refined = (weights @ kv).numpy()
    refs = {}
    for name, model in (("teacher", teacher), ("student", student)):
        ref = copy.deepcopy(model)
        ref._load_ip_adapter_weights([torch.load(folder / f"ip_{name}.bin", weights_only=True)])
        ref.encoder_hid_proj = _Tokens()
        refs[name] = ref
    e_u = torch_eps(refs["teacher"], z, t, uncond, refined, scale=0.0)  # text-only ∅ branch
    e_c = torch_eps(refs["teacher"], z, t, cond, refined, scale=1.0)
    target = e_u - ETA * (e_c - e_u)
    expected = float(torch.mean((torch_eps(refs["student"], z, t, cond, refined, scale=1.0) - target) ** 2))

    variables = {}
    for name in ("teacher", "student"):
        _, v, config = load_unet(str(folder / name))
        ip_config, variables[name] = load_ip_adapter(str(folder / f"ip_{name}.bin"), config).merge(config, v)
    unet = UNet2DConditionModel(ip_config)
    tokens = refine_image_tokens(jnp.asarray(image_tokens), jnp.asarray(cond))
    assert np.abs(np.asarray(tokens) - refined).max() <= 1e-6
    loss_fn = jax.jit(lambda s, f, tok: co_erasing_loss(s, f, _eps_fn(unet), z, t, cond, uncond, tok, eta=ETA))
    loss, _ = loss_fn(variables["student"], variables["teacher"], tokens)
    assert expected > 1e-3
    assert abs(float(loss) - expected) <= 1e-5 * max(1.0, expected), (float(loss), expected)
    # The image branch matters: other tokens give another loss.
    other, _ = loss_fn(variables["student"], variables["teacher"], tokens * 3.0)
    assert abs(float(other) - float(loss)) > 1e-4


def test_query_timestep_follows_official_esd():
    k = np.array([0, 0, 10, 49, 49])
    u = np.array([0.0, 0.999, 0.5, 0.0, 0.999])
    np.testing.assert_array_equal(query_timestep(k, u, 50), [0, 19, 210, 980, 999])
    t = query_timestep(np.full(1000, 7), np.random.default_rng(0).random(1000), 50)
    assert t.min() == 140 and t.max() == 159
