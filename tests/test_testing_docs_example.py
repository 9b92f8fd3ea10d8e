"""The fault-injection guide's example is a pytest module: it must pass as a user would run it."""

from __future__ import annotations

import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "docs" / "examples"
PLUGIN = "trio_runner.testing.pytest_plugin"


def plugin_args() -> list[str]:
    """Load the plugin by name until the pytest11 entry point is installed; then it loads itself."""
    installed = any(ep.value.startswith(PLUGIN) for ep in entry_points(group="pytest11"))
    return [] if installed else ["-p", PLUGIN]


async def test_the_fault_injection_guide_example_passes_under_pytest() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(EXAMPLES), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *plugin_args()]
    with trio.fail_after(240):
        result = await trio.run_process(
            [*command, str(EXAMPLES / "fault_injection_test.py")],
            capture_stdout=True,
            capture_stderr=True,
            cwd=ROOT,
            env=env,
            check=False,
        )
    output = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    assert result.returncode == 0, output
    assert "2 passed" in output, output
