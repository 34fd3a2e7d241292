"""Task registry: ``config.task.name -> factory(config) -> Task``.

Method modules register themselves here (one line each in ``_REGISTRY``,
imported lazily so that ``jharm train`` only imports the method it runs). A
name of the form ``package.module:function`` imports a factory from anywhere,
so research code can train its own task without editing jharm.
"""
from __future__ import annotations

import importlib
from typing import Callable

import ml_collections

from jharm.config import ConfigError
from jharm.train.task import Task

TaskFactory = Callable[[ml_collections.ConfigDict], Task]

# name -> "module:function"
_REGISTRY: dict[str, str] = {
    "denoise_tiny": "jharm.train.tasks.denoise_tiny:make_task",
    "erasure": "jharm.train.tasks.erasure:make_task",
    "lightfair": "jharm.train.tasks.fairness:make_task",
    "i2sb": "jharm.train.tasks.backdoor:i2sb_task",
    "mixbridge": "jharm.train.tasks.backdoor:mixbridge_task",
    "shapesworld_judge": "jharm.shapesworld.judge:judge_task",
    "shapesworld_clip": "jharm.shapesworld.tasks:clip_task",
    "shapesworld_t2i": "jharm.shapesworld.tasks:t2i_task",
    "shapesworld_ip": "jharm.shapesworld.tasks:ip_task",
}


def register(name: str, target: str) -> None:
    """Register ``"module:function"`` under ``name`` (an error if the name is taken)."""
    if name in _REGISTRY and _REGISTRY[name] != target:
        raise ValueError(f"task {name!r} is already registered as {_REGISTRY[name]}")
    _REGISTRY[name] = target


def names() -> list[str]:
    return sorted(_REGISTRY)


def get_factory(name: str) -> TaskFactory:
    """Resolve a registered name or a ``module:function`` path to its factory."""
    target = _REGISTRY.get(name, name)
    module_name, sep, attr = target.partition(":")
    if not sep:
        raise ConfigError(f"config.task.name: unknown task {name!r}; registered: {names()} "
                          f"(or give 'package.module:function')")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"config.task.name={name!r}: cannot import {module_name}: {err}") from None
    if not hasattr(module, attr):
        raise ConfigError(f"config.task.name={name!r}: {module_name} has no {attr}")
    return getattr(module, attr)


def make_task(config: ml_collections.ConfigDict) -> Task:
    """Build the Task named by ``config.task.name``."""
    return get_factory(config.task.name)(config)
