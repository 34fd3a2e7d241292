"""UCE closed form vs the paper's formula, and its guarantees on edited/preserved tokens."""
import numpy as np
import pytest

from jharm.edits import uce


def _tree(rng, dim=16, out=12, layers=3):
    tree = {}
    for i in range(layers):
        block = {"attn2": {k: {"kernel": rng.normal(size=(dim, out)).astype(np.float32)} for k in ("to_k", "to_v", "to_q")},
                 "attn1": {"to_k": {"kernel": rng.normal(size=(out, out)).astype(np.float32)}}}
        tree[f"down_blocks_{i}"] = {"transformer_blocks_0": block}
    return tree


def test_matches_paper_formula_in_torch_orientation():
    rng = np.random.default_rng(0)
    params = _tree(rng)
    edit, guide, keep = rng.normal(size=(2, 16)), rng.normal(size=(2, 16)), rng.normal(size=(5, 16))
    new = uce.apply_uce(params, edit, guide, keep, lam=0.5, erase_scale=1.0, preserve_scale=1.0)
    w0 = params["down_blocks_1"]["transformer_blocks_0"]["attn2"]["to_v"]["kernel"].T.astype(np.float64)
    left = 0.5 * w0 + sum(np.outer(w0 @ g, c) for c, g in zip(edit, guide)) + sum(np.outer(w0 @ c, c) for c in keep)
    right = 0.5 * np.eye(16) + sum(np.outer(c, c) for c in edit) + sum(np.outer(c, c) for c in keep)
    expected = left @ np.linalg.inv(right)
    got = new["down_blocks_1"]["transformer_blocks_0"]["attn2"]["to_v"]["kernel"].T
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # Only attn2 to_k / to_v change.
    np.testing.assert_array_equal(new["down_blocks_0"]["transformer_blocks_0"]["attn2"]["to_q"]["kernel"],
                                  params["down_blocks_0"]["transformer_blocks_0"]["attn2"]["to_q"]["kernel"])
    np.testing.assert_array_equal(new["down_blocks_0"]["transformer_blocks_0"]["attn1"]["to_k"]["kernel"],
                                  params["down_blocks_0"]["transformer_blocks_0"]["attn1"]["to_k"]["kernel"])


def test_edited_tokens_take_guide_values_and_preserved_tokens_keep_theirs():
    # With fewer constraints than dims the edit is exact up to the λ-regulariser:
    # the residual scales like λ/σ_min(C)^2, so a small λ makes it exact.
    rng = np.random.default_rng(1)
    dim = 64
    params = _tree(rng, dim=dim, out=32)
    edit, guide = 30 * rng.normal(size=(3, dim)) / 8, 30 * rng.normal(size=(3, dim)) / 8
    keep = 30 * rng.normal(size=(20, dim)) / 8
    new = uce.apply_uce(params, edit, guide, keep, lam=1e-4)
    for i in range(3):
        for proj in ("to_k", "to_v"):
            k0 = params[f"down_blocks_{i}"]["transformer_blocks_0"]["attn2"][proj]["kernel"].astype(np.float64)
            k1 = new[f"down_blocks_{i}"]["transformer_blocks_0"]["attn2"][proj]["kernel"].astype(np.float64)
            np.testing.assert_allclose(edit @ k1, guide @ k0, atol=1e-4)
            np.testing.assert_allclose(keep @ k1, keep @ k0, atol=1e-3)


def test_bad_inputs_are_named():
    rng = np.random.default_rng(0)
    params = _tree(rng)
    with pytest.raises(ValueError, match="at least one token"):
        uce.apply_uce(params, np.zeros((0, 16)), np.zeros((0, 16)))
    with pytest.raises(ValueError, match=r"attn2/to_k/kernel has kernel shape \(16, 12\); expected \(8, out\)"):
        uce.apply_uce(params, rng.normal(size=(1, 8)), rng.normal(size=(1, 8)))
    with pytest.raises(ValueError, match="no parameter matches"):
        uce.apply_uce(params, rng.normal(size=(1, 16)), rng.normal(size=(1, 16)), targets=("nothing",))
