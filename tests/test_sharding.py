"""Sharding is real: on 8 simulated CPU devices, data-parallel (8), FSDP (2x4)
and FSDP+tensor (2x2x2) runs give the losses of a 1-device run, and the params
sit on the devices with the shardings the rules promise -- for the tiny
conv+attention model and for jharm's SD UNet (placement only: compiling SD
UNet train steps for four meshes does not fit the CPU test budget).

The 8-device runs happen in a subprocess (this file run as a script), because
``--xla_force_host_platform_device_count`` must be set before JAX starts and the
rest of the suite runs on one device.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs/train_tiny.py")
BASE = ["train.batch_size=8", "task.image_size=8", "task.width=16", "train.progress=False",
        "train.steps=20", "train.log_every=10", "train.ckpt_every=20", "optim.lr=0.003", "optim.warmup_steps=2"]
MESHES = {"dp": (8, 1, 1), "fsdp": (2, 4, 1), "fsdp_tp": (2, 2, 2)}
LEAVES = ["params/conv_in/kernel", "params/resnets_0/conv1/kernel", "params/conv_out/kernel",
          "params/attentions_0/to_q/kernel", "params/attentions_0/to_out_0/kernel", "params/conv_in/bias"]


def overrides(rules, mesh):
    data, fsdp, tensor = mesh
    return BASE + [f"mesh.rules={rules}", f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}"]


def run_on_8_devices(workdir: str, out: str) -> None:
    """Subprocess body: train under each mesh; record losses and actual shardings."""
    from flax import traverse_util

    from jharm import config as config_lib
    from jharm.train.loop import train
    from jharm.train.tasks import make_task

    assert jax.device_count() == 8, jax.devices()
    report = {}
    for rules, mesh in MESHES.items():
        config = config_lib.get(CONFIG, overrides(rules, mesh))
        result = train(config, make_task(config), os.path.join(workdir, rules))
        params = traverse_util.flatten_dict(result.params, sep="/")
        report[rules] = {"losses": result.losses, "leaves": {
            name: {"spec": [list(a) if isinstance(a, tuple) else a for a in params[name].sharding.spec],
                   "shard": list(params[name].addressable_shards[0].data.shape),
                   "devices": len(params[name].sharding.device_set)} for name in LEAVES}}
    with open(out, "w") as f:
        json.dump(report, f)


UNET_LEAVES = {  # SD UNet (width 16/32) params -> (spec, per-device shard) under fsdp_tp on 2x2x2
    "params/conv_in/kernel": ([None, None, None, "tensor"], [3, 3, 3, 8]),                        # 3x3x3x16
    "params/down_blocks_1/resnets_0/conv1/kernel": ([None, None, "fsdp", "tensor"], [3, 3, 8, 16]),  # 3x3x16x32
    "params/down_blocks_1/resnets_0/conv_shortcut/kernel": ([None, None, "fsdp", "tensor"], [1, 1, 8, 16]),
    "params/down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q/kernel": (["fsdp", "tensor"], [8, 8]),
    "params/down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k/kernel": (["fsdp", "tensor"], [8, 8]),
    "params/mid_block/attentions_0/transformer_blocks_0/attn2/to_v/kernel": (["fsdp", "tensor"], [8, 16]),
    "params/mid_block/attentions_0/transformer_blocks_0/attn1/to_out_0/kernel": (["tensor", "fsdp"], [16, 16]),
    "params/mid_block/attentions_0/transformer_blocks_0/ff/net_2/kernel": (["tensor", "fsdp"], [64, 16]),
    "params/mid_block/attentions_0/transformer_blocks_0/ff/net_0/proj/kernel": (["fsdp", "tensor"], [16, 128]),
    "params/mid_block/attentions_0/transformer_blocks_0/attn1/to_out_0/bias": ([None], [32]),
}


def place_unet_on_8_devices(out: str) -> None:
    """Subprocess body: initialise the tiny SD UNet straight into its fsdp_tp shardings
    (eval_shape -> shardings -> jit(init, out_shardings)) and record where each leaf landed."""
    from flax import traverse_util

    from jharm import config as config_lib
    from jharm.train.mesh import make_mesh
    from jharm.train.sharding import tree_shardings
    from jharm.train.tasks import make_task

    config = config_lib.get(CONFIG, overrides("fsdp_tp", MESHES["fsdp_tp"]) + ["task.model=unet"])
    task, mesh = make_task(config), make_mesh(config.mesh)
    key = jax.random.key(0)
    shardings = tree_shardings(jax.eval_shape(task.init_params, key), mesh, "fsdp_tp")
    params = traverse_util.flatten_dict(jax.jit(task.init_params, out_shardings=shardings)(key), sep="/")
    report = {name: {"spec": [list(a) if isinstance(a, tuple) else a for a in params[name].sharding.spec],
                     "shard": list(params[name].addressable_shards[0].data.shape),
                     "devices": len(params[name].sharding.device_set)} for name in UNET_LEAVES}
    with open(out, "w") as f:
        json.dump(report, f)


def run_script(mode: str, tmp_path, out) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, __file__, mode, str(tmp_path), str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.big_model
def test_sd_unet_params_land_on_their_fsdp_tp_shardings(tmp_path):
    report = run_script("unet", tmp_path, tmp_path / "unet.json")
    for name, (spec, shard) in UNET_LEAVES.items():
        got = report[name]
        assert got["devices"] == 8, (name, got)
        assert padded(got["spec"], len(spec)) == spec, (name, got)
        assert got["shard"] == shard, (name, got)


def padded(spec, rank):
    return list(spec) + [None] * (rank - len(spec))


@pytest.mark.slow
def test_dp_fsdp_tp_match_one_device_and_shard_for_real(tmp_path):
    from jharm import config as config_lib
    from jharm.train.loop import train
    from jharm.train.tasks import make_task

    report = run_script("train", tmp_path, tmp_path / "report.json")

    single = config_lib.get(CONFIG, overrides("dp", (1, 1, 1)))
    reference = train(single, make_task(single), str(tmp_path / "single")).losses
    assert len(reference) == 20 and reference[-1] < reference[0]
    for rules in MESHES:
        np.testing.assert_allclose(report[rules]["losses"], reference, rtol=1e-5, err_msg=rules)

    expected = {  # (spec, per-device shard shape); full shapes in the comments
        "dp": {name: (None, None) for name in LEAVES},
        "fsdp": {  # the largest dim divisible by 4 goes to "fsdp" (ties: the last dim)
            "params/conv_in/kernel": ([None, None, None, "fsdp"], [3, 3, 3, 4]),          # 3x3x3x16
            "params/resnets_0/conv1/kernel": ([None, None, None, "fsdp"], [3, 3, 16, 4]),  # 3x3x16x16
            "params/conv_out/kernel": ([None, None, "fsdp", None], [3, 3, 4, 3]),          # 3x3x16x3
            "params/attentions_0/to_q/kernel": ([None, "fsdp"], [16, 4]),
            "params/attentions_0/to_out_0/kernel": ([None, "fsdp"], [16, 4]),
            "params/conv_in/bias": ([None], [16]),
        },
        "fsdp_tp": {  # out channels / heads on "tensor", FSDP on the largest remaining dim
            "params/conv_in/kernel": ([None, None, None, "tensor"], [3, 3, 3, 8]),          # 3 in-ch: no fsdp
            "params/resnets_0/conv1/kernel": ([None, None, "fsdp", "tensor"], [3, 3, 8, 8]),
            "params/conv_out/kernel": ([None, None, "fsdp", None], [3, 3, 8, 3]),            # 3 out-ch: no tensor
            "params/attentions_0/to_q/kernel": (["fsdp", "tensor"], [8, 8]),                  # (embed, heads)
            "params/attentions_0/to_out_0/kernel": (["tensor", "fsdp"], [8, 8]),              # (heads, embed)
            "params/conv_in/bias": ([None], [16]),
        },
    }
    for rules, leaves in expected.items():
        for name, (spec, shard) in leaves.items():
            got = report[rules]["leaves"][name]
            assert got["devices"] == 8, (rules, name, got)
            if spec is None:  # data parallel: replicated, whole array on each device
                assert all(a is None for a in got["spec"]), (rules, name, got)
                continue
            assert padded(got["spec"], len(spec)) == spec, (rules, name, got)
            assert got["shard"] == shard, (rules, name, got)


if __name__ == "__main__":
    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py does
    if sys.argv[1] == "train":
        run_on_8_devices(sys.argv[2], sys.argv[3])
    else:
        place_unet_on_8_devices(sys.argv[3])
