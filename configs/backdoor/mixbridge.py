"""MixBridge at 256x256 on local image folders: ``dataset,phase,M``.

``dataset``: imagenet | celebahq; ``phase``: divide | router | merge | merge_nowrs | single;
``M``: 1..3 backdoor tasks (default 3). Triggers: official gray 32-pixel corner squares
(bottom-right, top-right, top-left); targets: one image folder per task
(``task.backdoor.target_dirs``, the pool is each folder's first ``target_pool`` images)::

    # divide: M+1 experts, each from the trained clean I2SB (its bridge.safetensors)
    jharm train --config=configs/backdoor/mixbridge.py:imagenet,divide,3 --workdir=runs/mb/divide \\
      --config.task.data.folder=/data/imagenet/train --config.task.init_path=runs/i2sb_in256/bridge.safetensors \\
      --config.task.backdoor.target_dirs="('/data/targets/face','/data/targets/t2','/data/targets/t3')"
    # router: classifier of {clean, trigger 1..M} on x1
    jharm train --config=configs/backdoor/mixbridge.py:imagenet,router,3 --workdir=runs/mb/router \\
      --config.task.data.folder=/data/imagenet/train --config.task.backdoor.target_dirs="(...)"
    # merge: experts + router jointly, WRS weight 1 (merge_nowrs: 0)
    jharm train --config=configs/backdoor/mixbridge.py:imagenet,merge,3 --workdir=runs/mb/merge \\
      --config.task.data.folder=/data/imagenet/train --config.task.backdoor.target_dirs="(...)" \\
      --config.task.experts_path=runs/mb/divide/bridge.safetensors \\
      --config.task.router_path=runs/mb/router/bridge.safetensors
    # the single-model baseline
    jharm train --config=configs/backdoor/mixbridge.py:imagenet,single,3 --workdir=runs/mb/single \\
      --config.task.data.folder=/data/imagenet/train --config.task.backdoor.target_dirs="(...)" \\
      --config.task.init_path=runs/i2sb_in256/bridge.safetensors

The experts are stacked on a leading axis, vmapped, and sharded over the mesh
"tensor" axis by the ``ep`` rules (4 experts of ~553M params: use e.g.
``--config.mesh.tensor=4``), or ``fsdp_tp`` for experts on "tensor" + FSDP.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bridge_common import image256_config  # noqa: E402

PHASES = ("divide", "router", "merge", "merge_nowrs", "single")


def get_config(arg: str = "imagenet,merge,3"):
    parts = arg.split(",")
    dataset, phase = parts[0], parts[1] if len(parts) > 1 else "merge"
    num_tasks = int(parts[2]) if len(parts) > 2 else 3
    if phase not in PHASES:
        raise ValueError(f"phase {phase!r} is not one of {PHASES}")
    c = image256_config("mixbridge", "merge" if phase == "merge_nowrs" else phase, dataset)
    t = c.task
    t.backdoor.update(num_tasks=num_tasks, trigger_size=32, trigger_value=0.0, targets=(), target_dirs=(),
                      target_pool=10, rates=())
    t.wrs_weight = 0.0 if phase == "merge_nowrs" else 1.0
    t.experts_mode = "vmap"
    # The official router is an ImageNet ResNet-50; here a configurable residual CNN (GroupNorm).
    t.router.update(widths=(64, 128, 256, 512), blocks_per_stage=2, norm_groups=32, pool="mean")
    t.init_from_adm = False  # divide/single start from the trained clean I2SB export
    c.mesh.update(data=-1, fsdp=1, tensor=1, rules="ep")
    if phase in ("divide", "merge", "merge_nowrs"):
        c.train.update(batch_size=64, steps=20_000)
    if phase == "router":
        c.train.update(batch_size=64, steps=5_000, ema_decay=0.0)
        c.optim.lr = 1e-4
    return c
