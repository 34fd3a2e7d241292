"""ShapesWorld bridge backdoors (8x8 -> 32x32 SR; CPU-sized; the `jharm demo backdoor` settings).

Arg ``stage[,M]``: stage = i2sb | divide | router | merge | merge_nowrs | single, M = 1..3
backdoor tasks (default 3): gray corner triggers (6 px) -> fixed targets (yellow star on
dark, blue heart on light, green cross on gradient)::

    jharm train --config=configs/backdoor/shapesworld.py:i2sb --workdir=runs/bd/i2sb
    jharm train --config=configs/backdoor/shapesworld.py:divide,3 --workdir=runs/bd/divide \\
      --config.task.init_path=runs/bd/i2sb/bridge.safetensors
    jharm train --config=configs/backdoor/shapesworld.py:router,3 --workdir=runs/bd/router3
    jharm train --config=configs/backdoor/shapesworld.py:merge,3 --workdir=runs/bd/merge3 \\
      --config.task.experts_path=runs/bd/divide/bridge.safetensors \\
      --config.task.router_path=runs/bd/router3/bridge.safetensors
    jharm train --config=configs/backdoor/shapesworld.py:merge_nowrs,3 --workdir=runs/bd/merge3_nowrs \\
      --config.task.experts_path=runs/bd/divide/bridge.safetensors \\
      --config.task.router_path=runs/bd/router3/bridge.safetensors
    jharm train --config=configs/backdoor/shapesworld.py:single,3 --workdir=runs/bd/single \\
      --config.task.init_path=runs/bd/i2sb/bridge.safetensors

(``jharm demo backdoor`` runs all of these for M = 1, 2, 3 and scores them.)
"""
from jharm.backdoor_demo import DEMO, demo_config

STAGES = {"i2sb": ("i2sb", "merge", "i2sb_steps"), "divide": ("mixbridge", "divide", "divide_steps"),
          "router": ("mixbridge", "router", "router_steps"), "merge": ("mixbridge", "merge", "merge_steps"),
          "merge_nowrs": ("mixbridge", "merge", "merge_steps"), "single": ("mixbridge", "single", "single_steps")}


def get_config(arg: str = "i2sb"):
    stage, _, m = arg.partition(",")
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} is not one of {sorted(STAGES)}")
    name, phase, steps = STAGES[stage]
    num_tasks = 0 if stage == "i2sb" else int(m or 3)
    ema = DEMO["ema_decay"] if stage in ("i2sb", "single") else 0.0
    lr = {"divide": DEMO["divide_lr"], "merge": DEMO["finetune_lr"], "merge_nowrs": DEMO["finetune_lr"],
          "single": DEMO["finetune_lr"]}.get(stage, DEMO["lr"])
    c = demo_config(DEMO, name, phase, DEMO[steps], num_tasks, ema, lr)
    if stage == "merge_nowrs":
        c.task.wrs_weight = 0.0
    return c
