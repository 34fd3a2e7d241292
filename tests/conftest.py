"""Shared test set-up: float32 everywhere, CPU with jharm's XLA:CPU setting, and the ``slow`` marker."""
import fcntl
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from jharm.runtime import configure_xla_cpu  # noqa: E402

configure_xla_cpu()  # what jharm's programs run with (jharm/runtime.py), before JAX starts

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: SD-sized parity checks (run in CI too)")
    config.addinivalue_line("markers", "big_model: SD-sized; at most one such test runs at a time")


@pytest.fixture(autouse=True)
def _one_big_model_at_a_time(request, tmp_path_factory):
    """`make test` runs two pytest-xdist workers; an SD-sized parity test holds a
    file lock (in the workers' shared temp folder) so that two of them never
    hold their models in memory at once."""
    if request.node.get_closest_marker("big_model") is None:
        yield
        return
    with open(tmp_path_factory.getbasetemp().parent / "big_model.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
