"""Shared fixtures: every test must leave no process of ours alive."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest


def _descendants() -> list[psutil.Process]:
    me = psutil.Process()
    found: list[psutil.Process] = []
    for proc in me.children(recursive=True):
        try:
            # The forkserver and multiprocessing's resource tracker are shared
            # helpers that outlive a supervisor by design.
            cmdline = " ".join(proc.cmdline())
            if "forkserver" in cmdline or "resource_tracker" in cmdline:
                continue
            found.append(proc)  # zombies included: an unreaped child is a leak too
        except psutil.NoSuchProcess:
            continue
    return found


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Fail any test that leaves a child, grandchild or zombie behind."""
    before = {proc.pid for proc in _descendants()}
    yield
    deadline = time.monotonic() + 5.0
    leftover: list[psutil.Process] = []
    while time.monotonic() < deadline:
        leftover = [proc for proc in _descendants() if proc.pid not in before]
        if not leftover:
            return
        time.sleep(0.05)
    for proc in leftover:
        with contextlib.suppress(OSError):
            os.kill(proc.pid, 9)
    pytest.fail(f"the test left processes behind: {[(p.pid, p.name()) for p in leftover]}")


BOUND = 60


def process_gone(pid: int) -> bool:
    """True once no process has ``pid`` (reaped, or never ours to reap)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# Building trains the model: seconds on a quiet machine, a minute on a very busy one.
BUILD_BOUND = 300


def build_demo_model(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # In a subprocess: building evaluates MLX, which the test process never does.
    code = "from trio_runner.mlx import demo_model; print(demo_model())"
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_BOUND,
        check=False,
    )


@pytest.fixture(scope="session")
def demo_dir() -> Iterator[Path]:
    """The demo model where the CLI keeps it (the user's cache, or ``$TRIO_RUNNER_DEMO_MODEL``).

    Built at most once per session, and not at all when the cache already
    holds it: training takes seconds. Its location is exported for child
    processes. Tests copy it before changing it.
    """
    pytest.importorskip("mlx_lm", reason="the mlx extra is not installed")
    from trio_runner.mlx._model import DEMO_MODEL_ENV, demo_model_location, verify_demo_model

    path = demo_model_location()
    saved = os.environ.get(DEMO_MODEL_ENV)
    os.environ[DEMO_MODEL_ENV] = str(path)
    if verify_demo_model(path) is not None:
        result = build_demo_model(dict(os.environ))
        assert result.returncode == 0, result.stderr
        assert Path(result.stdout.strip()) == path
    yield path
    if saved is None:
        os.environ.pop(DEMO_MODEL_ENV, None)
    else:
        os.environ[DEMO_MODEL_ENV] = saved
