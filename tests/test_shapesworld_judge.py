"""ShapesWorld judge: network, loss/gradients, Fréchet distance, training through the loop."""
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from jharm.config import get
from jharm.shapesworld import data, judge, render
from jharm.shapesworld.world import geometry

CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "shapesworld_judge.py")
TC = get(CONFIG).task  # the shipped judge's task config (its world sets the resolution)

# --- Fréchet distance -----------------------------------------------------------


def reference_fd(mu1, s1, mu2, s2):
    """The textbook formula with scipy's general matrix square root."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def random_spd(rng, d, scale=1.0):
    a = rng.standard_normal((d, d)) * scale
    return a @ a.T / d + 0.1 * np.eye(d)


def test_fd_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    v1, v2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    # Commuting covariances: FD = |mu1 - mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2.
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    got = judge.frechet_distance_from_stats(mu1, np.diag(v1), mu2, np.diag(v2))
    assert abs(got - want) < 1e-10 * max(1.0, want)
    # Rotating both covariances by the same orthogonal matrix changes nothing.
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    got_rot = judge.frechet_distance_from_stats(q @ mu1, q @ np.diag(v1) @ q.T, q @ mu2, q @ np.diag(v2) @ q.T)
    assert abs(got_rot - want) < 1e-9 * max(1.0, want)


def test_fd_matches_scipy_for_general_covariances():
    rng = np.random.default_rng(1)
    for d in (2, 8, 64):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = random_spd(rng, d), random_spd(rng, d, 2.0)
        want = reference_fd(mu1, s1, mu2, s2)
        got = judge.frechet_distance_from_stats(mu1, s1, mu2, s2)
        assert abs(got - want) < 1e-8 * max(1.0, abs(want)), (d, got, want)
        assert abs(judge.frechet_distance_from_stats(mu2, s2, mu1, s1) - got) < 1e-8 * max(1.0, got)
        assert abs(judge.frechet_distance_from_stats(mu1, s1, mu1, s1)) < 1e-8


def test_fd_of_samples_converges_to_the_population_value():
    rng = np.random.default_rng(2)
    d, n = 4, 200_000
    mu1, mu2 = np.zeros(d), np.array([1.0, 0.0, -0.5, 0.0])
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    a = rng.multivariate_normal(mu1, s1, n)
    b = rng.multivariate_normal(mu2, s2, n)
    want = reference_fd(mu1, s1, mu2, s2)
    assert abs(judge.frechet_distance(a, b) - want) < 0.02 * want + 0.01
    # On the samples themselves the function is the formula applied to mean/cov (ddof=1).
    stats = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert abs(judge.frechet_distance(a, b) - reference_fd(*stats)) < 1e-8


def test_fd_rank_deficient_features_stay_finite():
    # Fewer samples than dimensions: singular covariances, where sqrtm of the
    # product is ill-conditioned; the result must be finite and close to scipy's.
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((20, 64)), rng.standard_normal((20, 64)) + 0.5
    got = judge.frechet_distance(a, b)
    assert np.isfinite(got) and got > 0
    want = reference_fd(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert abs(got - want) < 1e-3 * want
    assert abs(judge.frechet_distance(a, a)) < 1e-6


def test_fd_bad_inputs():
    with pytest.raises(ValueError, match=r"\(10, 3\) and \(10, 4\)"):
        judge.frechet_distance(np.zeros((10, 3)), np.zeros((10, 4)))
    with pytest.raises(ValueError, match="N >= 2"):
        judge.frechet_distance(np.zeros((1, 3)), np.zeros((10, 3)))
    with pytest.raises(ValueError, match="mismatched statistics"):
        judge.frechet_distance_from_stats(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# --- network and loss ------------------------------------------------------------------

@pytest.fixture(scope="module")
def task():
    from jharm.train.tasks import make_task

    return make_task(get(CONFIG, ["--config.train.batch_size=8"]))


@pytest.fixture(scope="module")
def params(task):
    # One init compile for the whole module (XLA takes seconds for it on CPU).
    return jax.jit(task.init_params)(jax.random.key(1))


apply = jax.jit(judge.judge_apply)


def test_outputs_and_predictions(params):
    images = data.judge_batch(0, 0, 10, TC.world)["image"]
    out = apply(params, images)
    assert out["features"].shape == (10, 128)
    assert {k: v.shape for k, v in out.items() if k != "features"} == {
        "shape": (10, len(render.SHAPES)), "colour": (10, len(render.COLOUR_NAMES)),
        "background": (10, len(render.BACKGROUNDS))}
    feats = judge.judge_features(params, images, TC, batch_size=4)  # uneven last chunk
    np.testing.assert_allclose(feats, np.asarray(out["features"]), atol=1e-5)
    pred = judge.judge_predict(params, images, TC, batch_size=3)
    for head in judge.HEADS:
        np.testing.assert_array_equal(pred[head], np.asarray(out[head]).argmax(-1))


def test_images_at_a_multiple_of_the_judges_resolution_are_box_downsampled(params):
    images = data.judge_batch(0, 0, 6, TC.world)["image"]
    res = images.shape[1]
    big = np.repeat(np.repeat(images, 2, axis=1), 2, axis=2)  # each pixel a 2x2 block
    np.testing.assert_allclose(judge.judge_features(params, big, TC), judge.judge_features(params, images, TC), atol=1e-5)
    with pytest.raises(ValueError, match=rf"the judge reads {res}x{res} images .* found {res + 3}x{res + 3}"):
        judge.judge_predict(params, np.zeros((2, res + 3, res + 3, 3), np.float32), TC)


def test_loss_is_the_sum_of_cross_entropies(params):
    batch = data.judge_batch(0, 1, 16, TC.world)
    loss, metrics = jax.jit(judge.judge_loss)(params, batch)
    out = apply(params, batch["image"])
    total = 0.0
    for head in judge.HEADS:
        logits = np.asarray(out[head], np.float64)
        logp = logits - logits.max(1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(1, keepdims=True))
        ce = -logp[np.arange(16), batch[head]].mean()
        assert abs(float(metrics[f"{head}_loss"]) - ce) < 1e-5
        assert float(metrics[f"{head}_acc"]) == pytest.approx((logits.argmax(1) == batch[head]).mean())
        total += ce
    assert abs(float(loss) - total) < 1e-5


def test_gradients_reach_every_parameter_and_descend(params):
    batch = data.judge_batch(0, 2, 32, TC.world)
    grad_fn = jax.jit(jax.value_and_grad(lambda p: judge.judge_loss(p, batch)[0]))
    loss0, grads = grad_fn(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0, path
    # A few plain gradient steps on this batch lower its loss.
    p = params
    for _ in range(5):
        loss, grads = grad_fn(p)
        p = jax.tree.map(lambda a, g: a - 0.05 * g, p, grads)
    assert float(grad_fn(p)[0]) < 0.8 * float(loss0)


def test_judge_task_contract(task, params):
    assert task.name == "shapesworld_judge"
    res = TC.world.resolution
    assert jax.tree.structure(params) == jax.tree.structure(
        jax.eval_shape(judge._module().init, jax.random.key(0), jnp.zeros((1, res, res, 3)))["params"])
    batch = task.make_batch(3)
    assert batch["image"].shape == (8, res, res, 3)
    for key, value in task.make_batch(3).items():
        np.testing.assert_array_equal(value, batch[key])
    loss, metrics = jax.jit(task.loss_fn)(params, None, batch, jax.random.key(0))
    want, _ = jax.jit(judge.judge_loss)(params, batch)
    assert abs(float(loss) - float(want)) < 1e-6
    assert set(metrics) >= {"shape_acc", "colour_acc", "background_acc"}


# --- training through the one train loop ------------------------------------------------

@pytest.mark.slow
def test_judge_trains_through_the_loop_to_99_percent(tmp_path):
    from jharm.train.loop import train
    from jharm.train.tasks import make_task

    config = get(CONFIG, ["--config.train.progress=False"])
    start = time.perf_counter()
    result = train(config, make_task(config), str(tmp_path))
    seconds = time.perf_counter() - start
    params = jax.device_get(result.params)
    world = config.task.world  # fresh renders of the world the judge is trained in
    fresh = data.judge_batch(seed=424242, step=0, batch_size=3000, config=world)  # a seed training never used
    pred = judge.judge_predict(params, fresh["image"], config.task)
    acc = {head: float((pred[head] == fresh[head]).mean()) for head in judge.HEADS}
    print(f"judge: {config.train.steps} steps x {config.train.batch_size} in {seconds:.0f}s, accuracy {acc}")
    assert acc["shape"] >= 0.99 and acc["colour"] >= 0.99 and acc["background"] >= 0.99, acc
    # FD-judge: two independent real sets are close; a set of one shape and colour is far.
    feats = lambda images: judge.judge_features(params, images, config.task)  # noqa: E731
    real_a = feats(data.judge_batch(1, 0, 1000, world)["image"])
    real_b = feats(data.judge_batch(2, 0, 1000, world)["image"])
    skewed = feats(render.render_batch(3, 1000, shape="square", colour="red", resolution=world.resolution,
                                       **geometry(world))[0])
    near, far = judge.frechet_distance(real_a, real_b), judge.frechet_distance(real_a, skewed)
    assert far > 10 * near, (near, far)
