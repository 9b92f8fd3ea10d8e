"""The documentation's examples are tests: each one runs as a script and must print what the docs promise.

Every ``docs/examples/*.py`` with a main guard runs in a subprocess from the
repository root, with ``docs/examples`` on the path (as when you run the script
yourself, its own directory comes first). Its stdout must match the expected
lines below, and every ``--8<--`` snippet include in ``docs/*.md`` must point
at a file that exists.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import trio

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples"
MAIN_GUARD = re.compile(r"^if __name__ == [\"']__main__[\"']:", re.MULTILINE)
SNIPPET = re.compile(r"""^\s*(?:;)?--8<--\s+["']([^"']+)["']""", re.MULTILINE)

# Each script's stdout, line by line, as regular expressions (fullmatch).
EXPECTED: dict[str, list[str]] = {
    "quickstart.py": [
        r"run: 5",
        r"event: STREAM",
        r"event: THESE",
        r"event: WORDS",
        r"stream result: 3",
        r"timed out and cancelled: True",
        r"task.cancel\(\): TaskCancelled after \d+ events",
        r"incarnation 1, restarts 0, done 4",
    ],
    "crash_and_restart.py": [
        r"RunnerCrashed: signaled \(SIGKILL\)",
        r"restarted in a new process: True",
        r"retry=True task finished in a third process: True",
        r"restarts: 2",
        r"lifecycle: Spawned Ready Exited\(signaled\) BackingOff\(0.1s\) Spawned Ready "
        r"Exited\(signaled\) BackingOff\(0.2s\) Spawned Ready Exited\(requested\) Stopped",
    ],
    "mlx_generate.py": [
        r"streamed (\d+) tokens; generation_tokens=\1",
        r"the tokens join into the text: True",
        r"same seed, same text: True",
        r"chat prompt, through the chat template: \d+ tokens",
        r"stop string: finish_reason='stop', text ends before it: True",
        r"rejected at the call: max_tokens=0 must be an int >= 1",
        r"cancelled mid-generation",
    ],
    "serve_openai.py": [
        r"curl /v1/completions: (\d+ tokens|skipped \(curl is not installed\))",
        r"curl /health: (state ready, restarts 0|skipped \(curl is not installed\))",
        r"models: \['trio-runner-demo'\]",
        r"chat: finish_reason=(stop|length), usage=\d+ tokens",
        r"stream ended with an error: the runner crashed during this request - signaled",
        r"served after the restart: \d+ tokens",
        r"restarts: 1",
    ],
}


def _scripts() -> list[Path]:
    return sorted(path for path in EXAMPLES.glob("*.py") if MAIN_GUARD.search(path.read_text()))


def test_every_example_script_has_expected_output() -> None:
    assert {path.name for path in _scripts()} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
async def test_example_script_runs_and_prints_the_documented_output(name: str) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(EXAMPLES), env.get("PYTHONPATH")]))
    with trio.fail_after(60):
        result = await trio.run_process(
            [sys.executable, str(EXAMPLES / name)],
            capture_stdout=True,
            capture_stderr=True,
            cwd=ROOT,
            env=env,
            check=False,
        )
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    lines = result.stdout.decode().splitlines()
    assert len(lines) == len(EXPECTED[name]), lines
    for line, pattern in zip(lines, EXPECTED[name], strict=True):
        assert re.fullmatch(pattern, line), f"{line!r} does not match {pattern!r}"


def test_every_snippet_include_in_the_docs_points_at_an_existing_file() -> None:
    includes = [
        (page.name, target)
        for page in sorted(DOCS.glob("*.md"))
        for target in SNIPPET.findall(page.read_text())
    ]
    assert includes, "the docs include no examples at all"
    missing = [(page, target) for page, target in includes if not (ROOT / target).is_file()]
    assert not missing, f"snippet includes pointing at nothing: {missing}"


def test_every_example_is_included_in_the_docs() -> None:
    included = {target for page in DOCS.glob("*.md") for target in SNIPPET.findall(page.read_text())}
    examples = {path.relative_to(ROOT).as_posix() for path in EXAMPLES.glob("*.py")}
    assert examples <= included, f"examples no page shows: {sorted(examples - included)}"
