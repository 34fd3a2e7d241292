"""Process-level XLA:CPU setting of jharm's programs: YNNPACK fusions off.

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
    if environ is None and _cpu_backend_started():
        warnings.warn(f"jharm.runtime.configure_xla_cpu: JAX's backends already started, so {YNN_FLAG}= "
                      "would not take effect; call it before the first JAX computation", stacklevel=2)
        return False
    env["XLA_FLAGS"] = f"{flags} {YNN_FLAG}=".strip()
    return True
