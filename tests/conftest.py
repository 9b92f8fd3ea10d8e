"""Shared fixtures: every test must leave no process of ours alive."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

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
