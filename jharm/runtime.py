"""Process-level XLA:CPU settings of jharm's programs: YNNPACK fusions off; host devices.

jaxlib >= 0.8.1 can hand XLA:CPU's dot, reduction and element-wise fusions to
YNNPACK (flag ``--xla_cpu_experimental_ynn_fusion_type``); jaxlib 0.10.2 does
by default. On jharm's CPU workloads without them (2 cores, jaxlib 0.10.2,
runs interleaved; bench/README.md "XLA:CPU setting"): the ShapesWorld T2I train
step took 0.69-0.86 s instead of 1.00-1.09 s, DDIM sampling 50-55 s instead of
94-97 s per 128 samples, the tiny CLIP step 0.11-0.15 s instead of 0.16-0.17 s;
the bench's small SD-like UNet step was within noise either way on 2 threads
but slower on one (3.37 against 4.39 steps/s: single-threaded training may
prefer ``JHARM_XLA_CPU_DEFAULTS=0``). So jharm's
programs (the ``jharm`` CLI, ``make demo``, the tests and the benchmarks) call
:func:`configure_xla_cpu` first. Accelerators are unaffected (the flag is
XLA:CPU's only). Only the order of float sums changes: the shipped ShapesWorld
metrics reproduce exactly with the fusions off, while a discrete choice made on
float noise can differ (the erasure demo's prefix attack, docs/erasure.md).

In your own program call it before the first JAX computation (XLA reads
``XLA_FLAGS`` once, when JAX starts its CPU backend). It leaves ``XLA_FLAGS``
alone when they already name the flag (your choice wins) or when
``JHARM_XLA_CPU_DEFAULTS=0``.
"""
from __future__ import annotations

import importlib.metadata
import os
import re
import sys
import warnings

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"
OPT_OUT_ENV = "JHARM_XLA_CPU_DEFAULTS"
_FIRST_JAXLIB_WITH_FLAG = (0, 8, 1)  # older XLA aborts on a flag it does not know


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def _jaxlib_knows_flag() -> bool:
    try:
        return _version_tuple(importlib.metadata.version("jaxlib")) >= _FIRST_JAXLIB_WITH_FLAG
    except importlib.metadata.PackageNotFoundError:
        return False


def _cpu_backend_started() -> bool:
    bridge = sys.modules.get("jax._src.xla_bridge")
    started = getattr(bridge, "backends_are_initialized", None)
    return bool(started and started())


def configure_xla_cpu(environ=None) -> bool:
    """Turn XLA:CPU's YNNPACK fusions off for this process; return whether ``XLA_FLAGS`` changed.

    ``environ``: the environment to edit (default ``os.environ``). Does nothing
    when the flags already name ``YNN_FLAG``, when ``JHARM_XLA_CPU_DEFAULTS=0``
    or when the installed jaxlib predates the flag. Warns, and changes nothing,
    if JAX's backends already started (the setting would not take effect).
    """
    env = os.environ if environ is None else environ
    flags = env.get("XLA_FLAGS", "")
    if env.get(OPT_OUT_ENV, "1") == "0" or YNN_FLAG in flags or not _jaxlib_knows_flag():
        return False
    return _append_flag(env, f"{YNN_FLAG}=", "configure_xla_cpu")


def set_host_devices(count: int, environ=None) -> bool:
    """Split the CPU into ``count`` XLA devices, so the one train loop runs data parallel on it.

    XLA:CPU runs one program's operations one after another, each on the
    intra-op thread pool, and the small convolutions and attention maps of the
    ShapesWorld models leave much of 2 cores idle. With two host devices the
    loop's ``data`` mesh axis splits every batch in halves that run at once.
    Measured on 2 cores (2026-12-07): the T2I's forward + gradient at batch 32
    took 0.54-0.58 s instead of 0.77 s, and its build stage 1556 s instead of
    about 1800 s (2000 steps); the tiny CLIP and the IP-Adapter stages ran at
    their one-device speed. Gradients are averaged over the halves, so the
    update is the same up to the order of float sums. Accelerators are
    unaffected: the flag sets the CPU platform's device count only. Returns
    whether ``XLA_FLAGS`` changed; does nothing when they already name the
    flag (your choice wins) or for one device.
    """
    if count < 1:
        raise ValueError(f"host devices must be >= 1, got {count}")
    env = os.environ if environ is None else environ
    if HOST_DEVICES_FLAG in env.get("XLA_FLAGS", "") or count == 1:
        return False
    return _append_flag(env, f"{HOST_DEVICES_FLAG}={count}", "set_host_devices")


def _append_flag(env, flag: str, caller: str) -> bool:
    """Append ``flag`` to ``env["XLA_FLAGS"]``; for this process's environment only while JAX has not started."""
    if env is os.environ and _cpu_backend_started():
        warnings.warn(f"jharm.runtime.{caller}: JAX's backends already started, so {flag} would not take "
                      "effect; call it before the first JAX computation", stacklevel=3)
        return False
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    return True
