"""Experiment configs: ml_collections files with ``get_config()``, plus overrides.

A config file is a Python file defining ``get_config(arg=None) -> ConfigDict``
(big_vision style: ``configs/x.py:arg`` passes ``arg``). Overrides are
``--config.a.b=value`` strings; the value is parsed to the type of the existing
field, and an unknown key or a value of the wrong type is an error that names
the key -- before anything is compiled.
"""
from __future__ import annotations

import ast
import importlib.util
import os
from typing import Iterable, Sequence

import ml_collections


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the file or key."""


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Load ``path.py`` or ``path.py:arg`` and return ``get_config([arg])``."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    name = "jharm_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config()")
    config = module.get_config(arg) if arg else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, not a ConfigDict")
    return config


def _parse_value(key: str, text: str, current):
    """Parse ``text`` into the type of ``current`` (the field's existing value)."""
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key}: expected a bool, found {text!r}")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"--config.{key}: expected an int, found {text!r}") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--config.{key}: expected a float, found {text!r}") from None
    if isinstance(current, str):
        return text
    if current is None:
        # Fields declared None take a Python literal, else the string itself.
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    if isinstance(current, (tuple, list)):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = tuple(part for part in text.split(",") if part)
        if not isinstance(value, (tuple, list)):
            value = (value,)
        return type(current)(value)
    raise ConfigError(f"--config.{key}: cannot override a field of type {type(current).__name__}")


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """Apply ``a.b=value`` (or ``--config.a.b=value``) overrides in place."""
    for item in overrides:
        text = item[len("--config."):] if item.startswith("--config.") else item
        key, sep, raw = text.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form --config.key=value")
        node = config
        parts = key.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise ConfigError(f"unknown config key: {'.'.join(parts[:depth + 1])!r} (in override {item!r})")
            if depth < len(parts) - 1:
                node = node[part]
        leaf = parts[-1]
        current = node[leaf]
        if isinstance(current, ml_collections.ConfigDict):
            raise ConfigError(f"--config.{key} is a group of fields; set its fields one by one")
        value = _parse_value(key, raw, current)
        try:
            node[leaf] = value
        except (TypeError, ValueError) as err:
            raise ConfigError(f"--config.{key}: {err}") from None
    return config


def get(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Load a config file and apply overrides; the config is locked afterwards."""
    config = load_config_file(spec)
    apply_overrides(config, overrides)
    config.lock()
    return config
