"""Multi-host start-up: ``jax.distributed.initialize`` when the config asks for it.

TPU pods need no arguments (the TPU runtime knows the topology). GPU and CPU
clusters take the coordinator address, process count and process id from the
config (``config.distributed``) or, when those are unset, from the environment
variables ``JHARM_COORDINATOR``, ``JHARM_NUM_PROCESSES``, ``JHARM_PROCESS_ID``.
Must run before anything touches a JAX device.
"""
from __future__ import annotations

import os

import jax

from jharm.config import ConfigError

_initialized = False


def _setting(value, env: str, cast):
    """Config value if set (non-empty / >= 0), else the environment variable, else None."""
    if value not in ("", None, -1):
        return cast(value)
    raw = os.environ.get(env, "")
    if raw == "":
        return None
    try:
        return cast(raw)
    except ValueError:
        raise ConfigError(f"environment variable {env}={raw!r} is not a valid {cast.__name__}") from None


def initialize(dist) -> bool:
    """Call ``jax.distributed.initialize`` if ``dist.enabled``; return whether it ran.

    ``dist`` has fields ``enabled``, ``coordinator_address``, ``num_processes``,
    ``process_id`` and ``cpu_collectives`` ("gloo" lets CPU processes run
    cross-process collectives, e.g. the localhost smoke test).
    """
    global _initialized
    if not dist.enabled or _initialized:
        return False
    coordinator = _setting(dist.coordinator_address, "JHARM_COORDINATOR", str)
    num_processes = _setting(dist.num_processes, "JHARM_NUM_PROCESSES", int)
    process_id = _setting(dist.process_id, "JHARM_PROCESS_ID", int)
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise ConfigError("distributed: set all of coordinator_address, num_processes and process_id "
                          "(or JHARM_COORDINATOR/JHARM_NUM_PROCESSES/JHARM_PROCESS_ID), or none of them (TPU)")
    if dist.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives)
    if all(given):
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    else:
        jax.distributed.initialize()
    _initialized = True
    return True


def is_main_process() -> bool:
    """Only process 0 writes logs, metrics and exports."""
    return jax.process_index() == 0
