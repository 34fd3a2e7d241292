"""Every experiment file under configs/ loads (with each of its documented settings) and names a
task the registry resolves: a renamed field or task breaks here, not in a user's launch."""
import glob
import os

import pytest

from jharm.config import load_config_file
from jharm.train import tasks

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
FILES = sorted(f for f in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True)
               if not os.path.basename(f).startswith("_"))
# Settings (the ``:arg`` of a config spec) that the docs name, per file.
SETTINGS = {"fair/shapesworld.py": ("binary", "4way", "target")}


def _specs():
    for f in FILES:
        rel = os.path.relpath(f, ROOT)
        yield from ([f"{f}:{s}" for s in SETTINGS[rel]] if rel in SETTINGS else [f])


@pytest.mark.parametrize("spec", list(_specs()), ids=lambda s: os.path.relpath(s, ROOT))
def test_config_loads_and_names_a_task(spec):
    config = load_config_file(spec)
    for section in ("train", "optim", "task"):
        assert section in config, f"{spec}: no config.{section}"
    assert config.train.steps > 0 and config.optim.lr > 0
    assert callable(tasks.get_factory(config.task.name))


def test_fair_shapesworld_keeps_the_neutral_prompts_close():
    for setting, concepts in (("binary", ("square",)), ("4way", ("square", "circle"))):
        config = load_config_file(os.path.join(ROOT, "fair", "shapesworld.py") + f":{setting}")
        assert config.task.lambda_r > 0
        assert {f"a {c}" for c in concepts} <= set(config.task.keep_prompts)
