"""Backdoor evaluation metrics (jharm.eval.backdoor) vs hand values, the eval set, and the
atomic JSONL + Markdown writing."""
import json
import os

import numpy as np
import pytest

from jharm.backdoor_demo import TINY, demo_config
from jharm.diffusion.poison import CORNERS
from jharm.eval import backdoor as ev
from jharm.train.tasks.backdoor import PairData


def test_mse_to_pool_asr_and_false_triggers_by_hand():
    target_a = np.full((1, 4, 4, 3), 1.0, np.float32)   # white in [-1, 1]
    target_b = np.full((1, 4, 4, 3), -1.0, np.float32)  # black
    outputs = np.stack([np.full((4, 4, 3), v, np.float32) for v in (1.0, 0.9, 0.0, -1.0)])
    # [0, 1] units: white = 1; outputs 1, 0.95, 0.5, 0 -> MSE to white 0, 0.0025, 0.25, 1.
    np.testing.assert_allclose(ev.mse_to_pool(outputs, target_a), [0, 0.0025, 0.25, 1], atol=1e-7)
    pool = np.concatenate([target_a, target_b])  # nearest of the pool
    np.testing.assert_allclose(ev.mse_to_pool(outputs, pool), [0, 0.0025, 0.25, 0], atol=1e-7)
    got = ev.backdoor_success(outputs, [target_a, target_b], task=1, threshold=0.01)
    assert got == pytest.approx({"mse_to_target": (0 + 0.0025 + 0.25 + 1) / 4, "asr": 0.5, "asr_any": 0.75})
    got = ev.backdoor_success(outputs, [target_a, target_b], task=2, threshold=0.01)
    assert got["asr"] == 0.25 and got["asr_any"] == 0.75
    with pytest.raises(ValueError, match="task must be in 1..2"):
        ev.backdoor_success(outputs, [target_a, target_b], task=3)
    with pytest.raises(ValueError, match="asr_threshold must be > 0"):
        ev.backdoor_success(outputs, [target_a], task=1, threshold=0)
    with pytest.raises(ValueError, match="differ in shape"):
        ev.mse_to_pool(outputs, np.zeros((1, 8, 8, 3)))


def test_entropy_in_bits():
    assert ev.entropy_bits(None) is None
    assert ev.entropy_bits(np.full((3, 4), 0.25)) == pytest.approx(2.0)
    assert ev.entropy_bits(np.array([[1.0, 0.0], [0.5, 0.5]])) == pytest.approx(0.5)


def test_evaluate_rows_and_the_atomic_table(tmp_path):
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, (6, 16, 16, 3)).astype(np.float32)
    targets = [np.full((1, 16, 16, 3), 0.5, np.float32), np.full((2, 16, 16, 3), -0.5, np.float32)]
    eval_set = ev.EvalSet(x0=x0, x1=x0, triggered=[x0, x0], targets=targets)
    outputs = {"benign": x0, "trigger1": np.repeat(targets[0], 6, 0), "trigger2": np.repeat(targets[0], 6, 0)}
    weights = {"benign": np.full((6, 3), 1 / 3), "trigger1": np.eye(3)[[1] * 6], "trigger2": np.eye(3)[[2] * 6]}
    features = lambda images: images.reshape(len(images), -1)[:, :8]  # noqa: E731  (pluggable features)
    rows = ev.evaluate(outputs, eval_set, weights, features, asr_threshold=0.01)
    benign, t1, t2 = rows
    assert benign["task"] == "benign" and benign["psnr"] > 100 and benign["ssim"] == pytest.approx(1.0)
    assert benign["fd"] == pytest.approx(0.0, abs=1e-6) and benign["mse_to_x0"] == 0
    assert benign["entropy_bits"] == pytest.approx(np.log2(3)) and benign["asr_any"] == 0
    assert t1["asr"] == 1 and t1["mse_to_target"] == 0 and t1["entropy_bits"] == pytest.approx(0, abs=1e-9)
    assert t2["asr"] == 0 and t2["asr_any"] == 1  # it produced the other task's target
    with pytest.raises(ValueError, match="do not match the eval set"):
        ev.evaluate({"benign": x0[:2]}, eval_set)
    records = [dict(r, model="m") for r in rows]
    jsonl, summary = ev.write_results(str(tmp_path / "out"), records, "T", notes=["a note"])
    with open(jsonl) as f:
        assert [json.loads(line) for line in f] == json.loads(json.dumps(records))
    text = open(summary).read()
    assert text.startswith("# T\n") and "a note" in text
    header = text.splitlines()[2]
    assert header.split(" | ")[:3] == ["| model", "task", "psnr"] and "entropy_bits" in header
    assert "| m | trigger2 | — |" in text  # metrics a task lacks print as a dash
    assert not [n for n in os.listdir(tmp_path / "out") if n.startswith(".tmp")]  # nothing half-written
    with pytest.raises(ValueError, match="no records"):
        ev.write_results(str(tmp_path / "none"), [])


def test_eval_set_stamps_every_trigger_on_the_same_inputs():
    config = demo_config(dict(TINY, image_size=32, trigger_size=6), "mixbridge", "merge", 1, 3)
    data = PairData(config.task)
    eval_set = ev.make_eval_set(data, 4)
    again = ev.make_eval_set(data, 4)
    np.testing.assert_array_equal(eval_set.x1, again.x1)  # a pure function of (seed, stream)
    assert eval_set.num_tasks == 3 and eval_set.x0.shape == (4, 32, 32, 3)
    for i, corner in enumerate(CORNERS[:3]):
        changed = np.any(eval_set.triggered[i] != eval_set.x1, axis=(0, 3))
        rows, cols = np.nonzero(changed)
        assert rows.max() - rows.min() < 6 and cols.max() - cols.min() < 6  # only the 6x6 corner box
        assert (rows.min() == 0) == corner.startswith("top") and (cols.min() == 0) == corner.endswith("left")
        box = eval_set.triggered[i][:, rows.min():rows.min() + 6, cols.min():cols.min() + 6]
        np.testing.assert_array_equal(box, 0.0)  # the official gray (0 in [-1, 1])
    train_x1 = data.pairs(0, 4, "train")["x1"]
    assert not np.array_equal(train_x1, eval_set.x1)  # held out from the training stream
    assert len(eval_set.targets) == 3 and eval_set.targets[0].shape == (1, 32, 32, 3)
