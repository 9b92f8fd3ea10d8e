"""The pytest plugin's fixtures fail a test that leaves a process alive or blocks the loop, and only then."""

from __future__ import annotations

import pytest

from .test_testing_docs_example import plugin_args

pytest_plugins = ["pytester"]

INI = "[pytest]\ntrio_mode = true\ntrio_runner_process_grace = 0.5\n"

TESTS = """
import subprocess, sys, time
import pytest, trio

def test_leaves_a_process(no_descendants):
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])

def test_cleans_up(no_descendants):
    subprocess.run([sys.executable, "-c", "pass"], check=True)

async def test_blocks_the_loop(loop_lateness):
    await trio.sleep(0.01)
    time.sleep(1.5)
    await trio.sleep(0.01)

@pytest.mark.lateness_bound(2.0)
async def test_blocks_within_its_own_bound(loop_lateness):
    await trio.sleep(0.01)
    time.sleep(0.5)
    await trio.sleep(0.01)

async def test_only_awaits(loop_lateness):
    await trio.sleep(0.1)
    assert loop_lateness.samples > 5
"""


def test_plugin_fixtures_fail_exactly_the_offending_tests(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(test_plugin_use=TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *plugin_args())
    # pytest-trio reports a failing async fixture teardown as the test's failure.
    result.assert_outcomes(passed=4, failed=1, errors=1)
    result.stdout.fnmatch_lines(["*FAILED*test_blocks_the_loop*", "*ERROR*test_leaves_a_process*"])
    assert "process(es) alive after 0.5 s" in result.stdout.str()
