"""LightFair in ShapesWorld: colour is the protected attribute. ``:binary`` (red/blue on "a square"),
``:4way`` (red/green/blue/yellow on "a square" and "a circle"), ``:target`` (binary with a 30/70 target).

``jharm demo fair`` runs all three end to end (centroids, training, baselines, report); this config
is the training half for use with ``jharm train`` once centroids exist
(``--config.task.centroids=runs/demo/fair/binary/centroids.safetensors``, text encoder exported by the demo).
"""
from jharm.fair_demo import keep_prompts
from jharm.train.defaults import base_config
from jharm.train.tasks.fairness import default_task_config

SETTINGS = {
    "binary": dict(target=(), concepts=("square",)),
    "4way": dict(target=(), concepts=("square", "circle")),
    "target": dict(target=(0.3, 0.7), concepts=("square",)),
}


def get_config(setting: str = "binary"):
    if setting not in SETTINGS:
        raise ValueError(f"unknown ShapesWorld fairness setting {setting!r}; choose one of {', '.join(SETTINGS)}")
    c = base_config()
    c.train.update(steps=120, batch_size=1 if setting != "4way" else 2, log_every=20, ckpt_every=1000,
                   async_checkpoint=False)
    c.optim.update(name="adam", lr=3e-3, clip_norm=0.0)
    c.task = default_task_config()
    c.task.update(tokenizer="shapesworld", neutral_template="a {concept}", attribute_template="a {attribute} {concept}",
                  lambda_q=1.0, lambda_r=1.0, target=SETTINGS[setting]["target"],
                  keep_prompts=keep_prompts(SETTINGS[setting]["concepts"]))
    return c
