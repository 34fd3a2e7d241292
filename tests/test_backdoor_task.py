"""I2SB / MixBridge through the one train loop, the ShapesWorld demo plumbing, and the
backdoor task's bad-input errors.

One module-scoped run of the backdoor demo at plumbing size (16x16 world, one
backdoor, 12 steps per stage, XLA's compilation cache on) trains every phase
-- i2sb, divide, router, merge with and without WRS, single -- and scores it;
the tests below read what it wrote. Compiling the bridge steps dominates.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from jharm.backdoor_demo import TINY, backdoor_scorecard, demo_config
from jharm.config import ConfigError
from jharm.train.tasks import make_task
from jharm.train.tasks import backdoor as bd
from jharm.weights.io import save_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = dict(TINY, i2sb_steps=12, divide_steps=12, router_steps=12, merge_steps=12, single_steps=12)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("backdoor_demo"))
    report = backdoor_scorecard(out, 0, SETTINGS)
    return out, report


def _losses(out):
    with open(os.path.join(out, "train_losses.json")) as f:
        return json.load(f)


def test_every_phase_trains_through_the_loop(demo_run):
    out, _ = demo_run
    losses = _losses(out)
    assert set(losses) == {"i2sb", "divide", "router_m1", "merge_m1", "merge_m1_nowrs", "single"}
    for tag, values in losses.items():
        values = np.asarray(values)
        assert len(values) == 12 and np.all(np.isfinite(values)), (tag, values)
    # Only the from-scratch bridge has a trend that 12 noisy steps show (its loss starts
    # at the label's scale); the phases that start from trained weights are checked by
    # their params moving (test below) and by the objectives' own tests.
    i2sb = np.asarray(losses["i2sb"])
    assert i2sb[-4:].mean() < 0.8 * i2sb[:4].mean(), i2sb
    # With and without WRS differ only by the WRS term (same data, same start).
    assert not np.allclose(losses["merge_m1"], losses["merge_m1_nowrs"])


def test_divide_export_feeds_the_merge_and_the_clean_bridge_feeds_divide(demo_run):
    out, _ = demo_run
    clean = bd.load_bridge_model(os.path.join(out, "i2sb"))
    assert not clean.is_mixture
    divide = bd.load_mixbridge_params(os.path.join(out, "divide", bd.EXPORT_NAME), "experts")
    merged = bd.load_bridge_model(os.path.join(out, "merge_m1"))
    assert merged.is_mixture and merged.router.num_experts == 2
    flat_div = traverse_util.flatten_dict(divide, sep="/")
    flat_clean = traverse_util.flatten_dict(jax.device_get(clean.params), sep="/")
    flat_merge = traverse_util.flatten_dict(jax.device_get(merged.params["experts"]), sep="/")
    assert flat_div.keys() == flat_merge.keys() == flat_clean.keys()
    key = "out_2/kernel"
    assert flat_div[key].shape == (2,) + flat_clean[key].shape
    # divide started every expert from the clean bridge and trained them apart; merge moved them again.
    assert not np.allclose(flat_div[key][0], flat_div[key][1])
    assert not np.allclose(flat_merge[key], flat_div[key])
    with pytest.raises(ConfigError, match="MixBridge .divide. export; translate with a merge export"):
        bd.load_bridge_model(os.path.join(out, "divide"))


def test_merge_takes_the_first_experts_and_checks_shapes(tmp_path):
    """Wiring without training: a 3-expert divide export feeds a M=1 merge (experts 0 and 1)."""
    config = demo_config(TINY, "mixbridge", "merge", 1, 1)
    adm = bd.adm_config(config.task)
    shapes = bd.adm_shapes(adm)
    rng = np.random.default_rng(0)
    stacked = jax.tree.map(lambda s: rng.standard_normal((3,) + s.shape).astype(np.float32), shapes)
    meta = bd._meta(config.task, "mixbridge", adm, phase="divide", num_experts=3)
    path = bd._export_fn(meta)({"experts": stacked}, str(tmp_path / "divide"))
    router = bd.Router(bd.router_config(config.task, 2))
    router_shapes = jax.eval_shape(lambda: router.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32)))
    router_params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), router_shapes["params"])
    meta = bd._meta(config.task, "mixbridge", adm, phase="router", num_experts=2)
    config.task.router_path = bd._export_fn(meta)({"router": router_params}, str(tmp_path / "router"))
    config.task.experts_path = path
    params = make_task(config).init_params(jax.random.key(1))  # loaded arrays only: nothing to compile
    for name, want in (("experts", jax.tree.map(lambda a: a[:2], stacked)), ("router", router_params)):
        got = traverse_util.flatten_dict(params[name], sep="/")
        want = traverse_util.flatten_dict(want, sep="/")
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name}/{key}")
    three = demo_config(TINY, "mixbridge", "merge", 1, 2, experts_path=path)  # a 3-expert router for M=1
    three.task.router_path = config.task.router_path
    with pytest.raises(ConfigError, match="router vs config.task.router"):
        make_task(three)
    too_many = demo_config(TINY, "mixbridge", "merge", 1, 3, experts_path=path)
    with pytest.raises(ConfigError, match="holds 3 experts; this run needs 4"):
        make_task(too_many)
    wider = demo_config(TINY, "mixbridge", "merge", 1, 1, experts_path=path)
    wider.task.adm.model_channels = 12
    with pytest.raises(ConfigError, match="expected shape"):
        make_task(wider)
    # An ADM (i2sb) file is not a MixBridge export.
    flat = {k: np.zeros(v.shape, np.float32) for k, v in traverse_util.flatten_dict(shapes, sep="/").items()}
    save_safetensors(flat, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ConfigError, match="not a MixBridge export"):
        make_task(demo_config(TINY, "mixbridge", "merge", 1, 1, experts_path=str(tmp_path / "plain.safetensors")))


def test_scorecard_writes_table_grids_and_report(demo_run):
    out, report = demo_run
    assert report == os.path.join(out, "report.md") and os.path.isfile(report)
    with open(os.path.join(out, "results.jsonl")) as f:
        records = [json.loads(line) for line in f]
    models = {r["model"] for r in records}
    assert models == {"clean I2SB", "MixBridge M=1", "MixBridge M=1 w/o WRS", "single model M=1"}
    for r in records:
        assert r["task"] in ("benign", "trigger1")
        if r["task"] == "benign":
            assert 0 < r["psnr"] < 60 and -1 <= r["ssim"] <= 1
        else:
            assert 0 <= r["asr"] <= 1 and r["mse_to_target"] > 0
        if r["model"].startswith("MixBridge"):
            assert 0 <= r["entropy_bits"] <= 1.0 + 1e-6
        else:
            assert r["entropy_bits"] is None
    text = open(report).read()
    assert "| MixBridge M=1 w/o WRS | trigger1 |" in text and "Gates (issue 8)" in text
    grids = sorted(n for n in os.listdir(out) if n.startswith("grid_"))
    assert len(grids) == 4
    from PIL import Image

    with Image.open(os.path.join(out, grids[0])) as im:  # rows: x0, input, output, trigger input, output, target
        assert im.size[1] == 6 * (16 + 2)


def test_config_errors_name_the_key(tmp_path):
    def task(m=1, **overrides):
        config = demo_config(TINY, "mixbridge", "merge", 1, m, experts_path="x")
        for key, value in overrides.items():
            section, _, field = key.rpartition(".")
            (config.task[section] if section else config.task)[field] = value
        return make_task(config)

    with pytest.raises(ConfigError, match="trigger_size: a 17-pixel trigger is larger than the 16x16 image"):
        task(**{"backdoor.trigger_size": 17})
    with pytest.raises(ConfigError, match=r"rates: poison rates sum to 1.3 > 1"):
        task(2, **{"backdoor.rates": (0.7, 0.6)})
    with pytest.raises(ConfigError, match=r"rates: 1 rates for num_tasks=2"):
        task(2, **{"backdoor.rates": (0.5,)})
    with pytest.raises(ConfigError, match="unknown corruption 'sr3x'"):
        task(**{"data.corruption": "sr3x"})
    with pytest.raises(ConfigError, match="phase: 'mix'"):
        task(phase="mix")
    with pytest.raises(ConfigError, match="experts_mode"):
        task(experts_mode="pmap")
    with pytest.raises(ConfigError, match="router: router pool must be 'mean' or 'max'"):
        task(**{"router.pool": "sum"})
    with pytest.raises(ConfigError, match="adm: unknown keys"):
        task(**{"adm.channels": 3})
    with pytest.raises(ConfigError, match="experts_path: the merge phase starts from a divide export"):
        task(experts_path="")
    with pytest.raises(ConfigError, match="MixBridge experts file not found: x"):
        task()
    with pytest.raises(ConfigError, match="targets: 'star/yellow' is not"):
        task(**{"backdoor.targets": ("star/yellow",)})
    from PIL import Image

    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ConfigError, match="target_dirs: give one target image folder"):
        task(**{"data.source": "folder", "data.folder": str(tmp_path)})
    with pytest.raises(ConfigError, match="target folder of backdoor task 1 not found"):
        task(**{"data.source": "folder", "data.folder": str(tmp_path), "backdoor.target_dirs": ("nowhere",)})


def test_image_folder_loader_and_its_errors(tmp_path):
    from PIL import Image

    with pytest.raises(ConfigError, match="image folder not found"):
        bd.ImageFolder(str(tmp_path / "missing"), 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no images"):
        bd.ImageFolder(str(tmp_path / "empty"), 16)
    sub = tmp_path / "imgs" / "n01"
    sub.mkdir(parents=True)
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, 15:25] = 255  # a white centre band
    Image.fromarray(pixels).save(sub / "a.png")
    (sub / "b.jpg").write_bytes(b"not a jpeg")
    folder = bd.ImageFolder(str(tmp_path / "imgs"), 16)
    assert len(folder) == 2
    image = folder.load(0)
    assert image.shape == (16, 16, 3) and image.min() >= -1 and image.max() <= 1
    # 40x20 -> 32x16 (bicubic), centre crop 16x16: the band lands on columns 4..11.
    assert image[:, 5:11].mean() > 0.9 and image[:, 0].max() < -0.9 and image[:, 15].max() < -0.9
    with pytest.raises(ConfigError, match="cannot read image .*b.jpg"):
        folder.load(1)


def test_translate_rejects_wrong_inputs(demo_run):
    out, _ = demo_run
    model = bd.load_bridge_model(os.path.join(out, "i2sb"))
    with pytest.raises(ValueError, match=r"x1 must be \(N, 16, 16, 3\)"):
        bd.translate(model, np.zeros((2, 32, 32, 3), np.float32), jax.random.key(0), nfe=2)


def test_stacked_experts_get_an_experts_axis_that_the_rules_shard():
    from jax.sharding import AbstractMesh, PartitionSpec as P

    from jharm.train.sharding import partition_spec

    names = ("opt_state", "0", "mu", "experts", "input_blocks_1_0", "in_layers_2", "kernel")  # Adam moment
    axes = bd._expert_axes(names, (4, 3, 3, 16, 32))
    assert axes == ("experts", None, None, "conv_in", "conv_out")
    assert bd._expert_axes(("router", "fc", "kernel"), (8, 4)) is None  # the default rule
    mesh = AbstractMesh((1, 2, 2), ("data", "fsdp", "tensor"))
    assert partition_spec(axes, (4, 3, 3, 16, 32), mesh, "ep") == P("tensor", None, None, None, None)
    assert partition_spec(axes, (4, 3, 3, 16, 32), mesh, "fsdp_tp") == P("tensor", None, None, None, "fsdp")
    assert partition_spec(axes, (4, 3, 3, 16, 32), mesh, "dp") == P(None, None, None, None, None)
    assert partition_spec(axes, (3, 3, 3, 16, 32), mesh, "ep") == P(None, None, None, None, None)  # 3 % 2


def two_device_merge(out_dir: str, result: str) -> None:
    """Subprocess body (2 CPU devices): the demo's M=1 merge with the experts sharded
    over "tensor" (rules ``ep``); record the losses and where the experts sit."""
    from jharm.train.loop import train

    assert jax.device_count() == 2
    config = demo_config(SETTINGS, "mixbridge", "merge", SETTINGS["merge_steps"], 1,
                         lr=SETTINGS["finetune_lr"], experts_path=os.path.join(out_dir, "divide", bd.EXPORT_NAME),
                         router_path=os.path.join(out_dir, "router_m1", bd.EXPORT_NAME), wrs_weight=1.0)
    config.mesh.update(data=1, fsdp=1, tensor=2, rules="ep")
    config.train.progress = False
    run = train(config, make_task(config), os.path.join(result + ".work"))
    leaf = run.params["experts"]["out_2"]["kernel"]
    with open(result, "w") as f:
        json.dump({"losses": run.losses, "spec": [str(a) for a in leaf.sharding.spec],
                   "shard": list(leaf.addressable_shards[0].data.shape), "shape": list(leaf.shape)}, f)


@pytest.mark.slow
def test_two_devices_shard_the_experts_and_match_one_device(demo_run, tmp_path):
    out, _ = demo_run
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.dirname(__file__)]))
    result = str(tmp_path / "two.json")
    proc = subprocess.run([sys.executable, __file__, out, result], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(result) as f:
        two = json.load(f)
    assert two["spec"][0] == "tensor" and two["shard"][0] == 1 and two["shape"][0] == 2
    np.testing.assert_allclose(two["losses"], _losses(out)["merge_m1"], rtol=1e-4)


if __name__ == "__main__":
    import conftest  # noqa: F401  (float32 matmuls, CPU)

    two_device_merge(sys.argv[1], sys.argv[2])
