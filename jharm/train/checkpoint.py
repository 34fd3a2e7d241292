"""Orbax checkpoints of the train state: async save, keep-last-K, exact resume.

A checkpoint holds the train state (step, trainable params, optimizer state,
base PRNG key) and the run's config as JSON. The data position needs no extra
entry: ``Task.make_batch`` is a pure function of the step, so the step *is*
the iterator state. Orbax writes each step into a temporary directory and
renames it when complete, so a process killed mid-save leaves the previous
checkpoint as the latest one.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

PyTree = Any


class Checkpointer:
    """A thin wrapper around ``ocp.CheckpointManager`` for ``<workdir>/checkpoints``."""

    def __init__(self, directory: str, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: PyTree, config_json: str) -> None:
        """Start saving ``state`` at ``step`` (returns while the write continues)."""
        self.manager.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave({"config": config_json})))

    def restore(self, step: int, abstract_state: PyTree) -> PyTree:
        """Restore the state at ``step`` straight into the shardings of ``abstract_state``
        (a tree of ``jax.ShapeDtypeStruct`` with ``sharding``)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
        return restored["state"]

    def restore_unsharded(self, step: int) -> PyTree:
        """The state at ``step`` as saved, without a target (for inspection and tests;
        optimizer-state namedtuples come back as plain containers)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        return restored["state"]

    def restore_config(self, step: int) -> str:
        """The config JSON saved with ``step``."""
        restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return restored["config"]["config"]

    def wait(self) -> None:
        """Block until pending async saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: PyTree, shardings: PyTree) -> PyTree:
    """ShapeDtypeStructs of ``tree`` carrying ``shardings`` (an orbax restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
