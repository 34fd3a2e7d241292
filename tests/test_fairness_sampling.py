"""Two-stage (LightFair) sampling: t >= tau reads the original encoder, t < tau the debiased one."""
import numpy as np
import pytest

from jharm import fairness
from tests.fairness_utils import perturbed, tiny_t2i

PROMPTS = ["a square", "a circle", "a square"]


@pytest.fixture(scope="module")
def runs():
    model = tiny_t2i()
    debiased = perturbed(model.text_params)
    kw = dict(seed=3, num_steps=4, guidance_scale=3.0)
    return {
        "original": fairness.generate(model, PROMPTS, **kw),
        "debiased": fairness.generate(model, PROMPTS, text_params=debiased, **kw),
        "tau0": fairness.generate(model, PROMPTS, late_text_params=debiased, tau=0, **kw),
        "tauT": fairness.generate(model, PROMPTS, late_text_params=debiased, tau=1000, **kw),
        "tau_mid": fairness.generate(model, PROMPTS, late_text_params=debiased, tau=500, **kw),
    }


def test_tau_endpoints_bit_for_bit(runs):
    # METHODS.md: original context for t >= tau. tau = 0: every step original; tau = T: every step debiased.
    assert np.array_equal(runs["tau0"], runs["original"])
    assert np.array_equal(runs["tauT"], runs["debiased"])
    assert not np.allclose(runs["original"], runs["debiased"], atol=1e-3)  # the encoders do differ


def test_tau_between_mixes(runs):
    mid = runs["tau_mid"]
    assert not np.allclose(mid, runs["original"], atol=1e-4)
    assert not np.allclose(mid, runs["debiased"], atol=1e-4)


def test_same_noise_per_image_index(runs):
    # Images 0 and 2 share the prompt but not the noise; noise depends on (seed, index) only.
    assert not np.allclose(runs["original"][0], runs["original"][2])
    model = tiny_t2i()
    first = fairness.generate(model, PROMPTS[:1], seed=3, num_steps=4, guidance_scale=3.0)
    np.testing.assert_allclose(first[0], runs["original"][0], atol=1e-5)  # batch size changes XLA reductions


def test_two_stage_needs_tau():
    model = tiny_t2i()
    with pytest.raises(fairness.FairnessError, match="tau"):
        fairness.generate(model, ["a square"], seed=0, num_steps=2, late_text_params=model.text_params)


def test_guidance_interval_passes_through(runs):
    model = tiny_t2i()
    kw = dict(seed=3, num_steps=4, guidance_scale=3.0)
    everywhere = fairness.generate(model, PROMPTS, guidance_interval=(0, 2000), **kw)
    np.testing.assert_allclose(everywhere, runs["original"], atol=1e-6)
    unguided = fairness.generate(model, PROMPTS, guidance_interval=(0, 0), **kw)
    np.testing.assert_allclose(unguided, fairness.generate(model, PROMPTS, seed=3, num_steps=4, guidance_scale=1.0),
                               atol=1e-5)
    assert not np.allclose(unguided, runs["original"], atol=1e-3)
