"""The ``jharm`` command line.

Each subcommand is one ``_cmd_<name>(subparsers)`` function below that adds
its parser and sets ``handler``; handlers import their module lazily so that
``jharm --help`` stays fast. Config-driven commands take
``--config=configs/x.py[:arg]`` and any number of ``--config.key=value``.
"""
from __future__ import annotations

import argparse
import sys

from jharm.config import ConfigError


def _split_config_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate ``--config.key=value`` overrides from the other arguments."""
    overrides, rest = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            if "=" not in arg and i + 1 < len(argv):  # --config.key value
                arg = f"{arg}={argv[i + 1]}"
                i += 1
            overrides.append(arg)
        else:
            rest.append(arg)
        i += 1
    return overrides, rest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jharm",
        description="Harmless generation in JAX/Flax: concept erasure, fairness and bridge-backdoor analysis.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, value in sorted(globals().items()):
        if name.startswith("_cmd_"):
            value(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, rest = _split_config_overrides(argv)
    parser = build_parser()
    args = parser.parse_args(rest)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    args.config_overrides = overrides
    if overrides and not hasattr(args, "config"):
        parser.error(f"'jharm {args.command}' takes no --config overrides (got {overrides[0]})")
    try:
        return int(args.handler(args) or 0)
    except ConfigError as err:
        print(f"jharm {args.command}: config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
