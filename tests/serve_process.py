"""A real ``trio-runner serve`` process on a loopback port, for tests that share one server.

No tests here. The command's stdout and stderr go to files, so a chatty server
never blocks on a full pipe and its output is there to show when it fails.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

BOUND = 60
COMMAND = [sys.executable, "-m", "trio_runner", "serve"]


class ServeProcess:
    """The running command: its base ``url``, its ``process`` and the files holding its output."""

    def __init__(self, process: subprocess.Popen[bytes], out: Path, err: Path) -> None:
        self.process = process
        self.out = out
        self.err = err
        self.url = ""

    def output(self) -> str:
        return self.out.read_text(errors="replace") + self.err.read_text(errors="replace")


@contextmanager
def serve_process(
    args: Sequence[str], tmp: Path, env: dict[str, str] | None = None
) -> Iterator[ServeProcess]:
    """Start ``trio-runner serve --port 0 ARGS``; yield once ``/health`` says the runner is ready.

    Leaving sends SIGTERM and waits for a graceful exit (SIGKILL past the bound).
    """
    out, err = tmp / "serve.out", tmp / "serve.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen([*COMMAND, "--port", "0", *args], stdout=stdout, stderr=stderr, env=env)
    server = ServeProcess(process, out, err)
    try:
        deadline = time.monotonic() + BOUND
        while not server.url:
            if found := re.search(r"at (http://[\d.]+:\d+)/v1", out.read_text(errors="replace")):
                server.url = found[1]
            elif process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"trio-runner serve did not start:\n{server.output()}")
            else:
                time.sleep(0.05)
        while httpx.get(f"{server.url}/health", timeout=BOUND).status_code != 200:
            if time.monotonic() > deadline:
                raise AssertionError(f"the runner did not become ready:\n{server.output()}")
            time.sleep(0.05)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=BOUND)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
