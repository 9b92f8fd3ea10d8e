"""The trio-runner pytest plugin: fixtures that fail a test leaving a process alive or stalling the loop.

Registered through the ``pytest11`` entry point, so installing trio-runner makes
the fixtures available; none is autouse. Request them by name, or for a whole
module with ``pytestmark = pytest.mark.usefixtures("no_descendants")``.

- ``no_descendants``: fails the test if, at teardown, a process started during
  the test (child, grandchild, or an unreaped zombie) is still alive after a
  grace period (ini option ``trio_runner_process_grace``, default 5 s); those
  processes are SIGKILLed so the next test starts clean.
- ``loop_lateness``: a :class:`~trio_runner.testing.LatenessMonitor` running for
  the whole (pytest-trio) test; fails it if the loop was ever late by more than
  the bound: ``@pytest.mark.lateness_bound(seconds)``, else the ini option
  ``trio_runner_lateness_bound`` (default 0.5 s: a blocking call on the trio
  thread shows up far above it, a loaded machine does not).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from ._invariants import LatenessMonitor, descendants

_DEFAULT_LATENESS = 0.5
_DEFAULT_GRACE = 5.0


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "trio_runner_lateness_bound",
        "loop_lateness fixture: the worst lateness (seconds) a test may show",
        default=str(_DEFAULT_LATENESS),
    )
    parser.addini(
        "trio_runner_process_grace",
        "no_descendants fixture: seconds to wait for processes to go before failing",
        default=str(_DEFAULT_GRACE),
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "lateness_bound(seconds): the loop_lateness fixture's bound for this test"
    )


@pytest.fixture
def no_descendants(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if it leaves a descendant process alive (zombies included)."""
    grace = float(request.config.getini("trio_runner_process_grace"))
    before = set(descendants())
    yield
    deadline = time.monotonic() + grace
    while True:
        left = {pid: cmd for pid, cmd in descendants().items() if pid not in before}
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if left:
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        pytest.fail(f"the test left {len(left)} process(es) alive after {grace} s: {left}", pytrace=False)


@pytest.fixture
async def loop_lateness(request: pytest.FixtureRequest) -> AsyncIterator[LatenessMonitor]:
    """Measure the trio loop's lateness during the test; fail it past the bound."""
    import trio

    marker = request.node.get_closest_marker("lateness_bound")
    if marker is not None:
        bound = float(marker.args[0])
    else:
        bound = float(request.config.getini("trio_runner_lateness_bound"))
    monitor = LatenessMonitor()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(monitor.run)
        yield monitor
        nursery.cancel_scope.cancel()
    if monitor.worst > bound:
        pytest.fail(
            f"the event loop was blocked: a wake-up came {monitor.worst:.3f} s late, over the "
            f"bound of {bound} s (something blocking ran on the trio thread)",
            pytrace=False,
        )
