"""jharm.runtime: the XLA:CPU settings jharm's programs start with (YNNPACK fusions off; host devices)."""
import importlib.metadata
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from jharm import runtime

KNOWN = runtime._jaxlib_knows_flag()


@pytest.mark.skipif(not KNOWN, reason="the installed jaxlib predates the YNN flag")
def test_adds_the_flag_once_and_keeps_other_flags():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert runtime.configure_xla_cpu(env)
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {runtime.YNN_FLAG}="
    assert not runtime.configure_xla_cpu(env)  # idempotent
    assert env["XLA_FLAGS"].count(runtime.YNN_FLAG) == 1
    empty = {}
    assert runtime.configure_xla_cpu(empty) and empty["XLA_FLAGS"] == f"{runtime.YNN_FLAG}="


def test_the_users_choice_wins():
    mine = {"XLA_FLAGS": f"{runtime.YNN_FLAG}=dot"}
    assert not runtime.configure_xla_cpu(mine) and mine["XLA_FLAGS"] == f"{runtime.YNN_FLAG}=dot"
    opted_out = {runtime.OPT_OUT_ENV: "0"}
    assert not runtime.configure_xla_cpu(opted_out) and "XLA_FLAGS" not in opted_out


def test_an_older_jaxlib_gets_no_flag_it_would_abort_on(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.8.0")
    env = {}
    assert not runtime.configure_xla_cpu(env) and env == {}
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.8.1")
    assert runtime.configure_xla_cpu(env)


def test_too_late_warns_and_changes_nothing(monkeypatch):
    jnp.ones(2).block_until_ready()  # this process's backends have started
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
    monkeypatch.delenv(runtime.OPT_OUT_ENV, raising=False)
    if KNOWN:
        with pytest.warns(UserWarning, match="already started"):
            assert not runtime.configure_xla_cpu()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_multi_thread_eigen=false"


@pytest.mark.skipif(not KNOWN, reason="the installed jaxlib predates the YNN flag")
def test_the_installed_xla_accepts_the_flag_and_the_cli_sets_it():
    """XLA aborts on an unknown flag: a fresh process computes with it. The CLI's ``main``
    sets it before any handler runs (here ``jharm --help``, which starts no JAX)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", runtime.OPT_OUT_ENV)}
    code = ("import os, contextlib, jax.numpy as jnp; from jharm import cli\n"
            "with contextlib.suppress(SystemExit): cli.main(['--help'])\n"
            "print(float(jnp.arange(4.0).sum()), os.environ['XLA_FLAGS'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith(f"6.0 {runtime.YNN_FLAG}=")


def test_host_devices_flag_is_added_once_and_the_users_choice_wins():
    env = {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"}
    assert runtime.set_host_devices(2, env)
    assert env["XLA_FLAGS"] == f"--xla_cpu_multi_thread_eigen=false {runtime.HOST_DEVICES_FLAG}=2"
    assert not runtime.set_host_devices(4, env) and env["XLA_FLAGS"].endswith("=2")
    one = {}
    assert not runtime.set_host_devices(1, one) and one == {}
    with pytest.raises(ValueError, match="host devices must be >= 1, got 0"):
        runtime.set_host_devices(0, {})


def test_host_devices_too_late_warns_and_changes_nothing(monkeypatch):
    jnp.ones(2).block_until_ready()
    monkeypatch.setenv("XLA_FLAGS", "")
    with pytest.warns(UserWarning, match="already started"):
        assert not runtime.set_host_devices(2)
    assert os.environ["XLA_FLAGS"] == ""


def test_a_fresh_process_gets_the_host_devices():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    code = "from jharm import runtime; runtime.set_host_devices(3); import jax; print(jax.device_count())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "3"


def test_the_build_command_splits_the_cpu_before_it_trains(monkeypatch, tmp_path, capsys):
    """``jharm shapesworld build --host-devices N`` sets the flag before the build's first JAX
    computation (here the build is replaced by a recorder; this process's JAX already runs)."""
    from jharm import cli
    from jharm.shapesworld import build

    seen = {}
    monkeypatch.setattr(runtime, "_cpu_backend_started", lambda: False)
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setattr(build, "build", lambda *a, **k: seen.setdefault("flags", os.environ["XLA_FLAGS"]))
    assert cli.main(["shapesworld", "build", "--host-devices", "3", "--out", str(tmp_path), "--no-report"]) == 0
    assert f"{runtime.HOST_DEVICES_FLAG}=3" in seen["flags"]
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setattr(build, "default_host_devices", lambda: 2)
    seen.clear()
    assert cli.main(["shapesworld", "build", "--out", str(tmp_path), "--no-report"]) == 0
    assert f"{runtime.HOST_DEVICES_FLAG}=2" in seen["flags"]
    seen.clear()
    assert cli.main(["shapesworld", "build", "--host-devices", "0", "--out", str(tmp_path)]) == 1
    assert not seen and "host devices must be >= 1, got 0" in capsys.readouterr().err
