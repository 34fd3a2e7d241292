"""Erasure objectives: pieces without a UNet (refinement, blur, target)."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jharm.objectives import erasure


def test_refinement_is_convex_mix_of_prompt_tokens():
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(2, 4, 8)), rng.normal(size=(2, 77, 8))
    got = np.asarray(erasure.refine_image_tokens(jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32)))
    logits = np.einsum("bnd,bld->bnl", img, txt) / np.sqrt(8)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    np.testing.assert_allclose(got, np.einsum("bnl,bld->bnd", w, txt), atol=1e-5)


@pytest.mark.parametrize("k", [3, 5])
def test_blur_matches_torch_reflect_conv(k):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 9, 7, 4)).astype(np.float32)
    sigma = 0.3 * ((k - 1) / 2 - 1) + 0.8
    g = np.exp(-0.5 * ((np.arange(k) - k // 2) / sigma) ** 2)
    g /= g.sum()
    w = torch.tensor(np.outer(g, g), dtype=torch.float32)[None, None].repeat(4, 1, 1, 1)
    xt = F.pad(torch.tensor(x).permute(0, 3, 1, 2), (k // 2,) * 4, mode="reflect")
    ref = F.conv2d(xt, w, groups=4).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(erasure.gaussian_blur(jnp.asarray(x), k)), ref, atol=1e-5)
    with pytest.raises(ValueError, match="odd"):
        erasure.gaussian_blur(jnp.asarray(x), 4)


def test_negative_guidance_target():
    u, c = jnp.array([1.0, 2.0]), jnp.array([3.0, 1.0])
    np.testing.assert_allclose(erasure.negative_guidance_target(u, c, 1.0), [-1.0, 3.0])
    np.testing.assert_allclose(erasure.negative_guidance_target(u, c, 0.0), u)
