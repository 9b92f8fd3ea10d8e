"""The documentation's examples are tests: each one runs as a script and must print what the docs promise.

Every ``docs/examples/*.py`` with a main guard runs in a subprocess from the
repository root, with ``docs/examples`` on the path (as when you run the script
yourself, its own directory comes first). Its stdout must match the expected
lines below. The pages show each example inline (readable as plain Markdown),
after an ``<!-- example: PATH -->`` marker; the code shown must be the file,
verbatim (``python tools/sync_doc_examples.py`` copies it in).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest
import trio

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples"
SYNC = ROOT / "tools" / "sync_doc_examples.py"
MAIN_GUARD = re.compile(r"^if __name__ == [\"']__main__[\"']:", re.MULTILINE)

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
    "groups.py": [
        r"sum: 4950, events: \['rank 0 has 2450'\]",
        r"pids, one per rank: 2",
        r"every rank replaced: True",
        r"last exit: rank 1 signaled \(SIGKILL\)",
        r"served again: 45",
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
    "mlx_group.py": [
        r"pids, one per rank: 2",
        r"streamed 30 tokens: True",
        r"same text as one process: True",
    ],
    "mlx_batching.py": [
        r"greedy in the batch, same text as alone: True",
        r"seeded requests batch too, same seed same text: True",
        r"logprob -?\d+\.\d\d, alternatives \[.*\]",
        r"n=3: 3 choices, \[0, 1, 2\]",
        r"cached_tokens=0 of (\d+) prompt tokens",
        r"cached_tokens=([1-9]\d*) of \d+ prompt tokens",
    ],
    "serve_openai.py": [
        r"curl /v1/completions: (\d+ tokens|skipped \(curl is not installed\))",
        r"curl /health: (state ready, restarts 0|skipped \(curl is not installed\))",
        r"models: \['trio-runner-demo', 'default_model'\]",
        r"chat: finish_reason=(stop|length), usage adds up: True",
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


def _shown() -> list[tuple[str, str, str]]:
    """(page, example path, code shown) for every example block in the docs."""
    spec = importlib.util.spec_from_file_location("sync_doc_examples", SYNC)
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    shown_examples = tool.shown_examples
    return [
        (page.name, path, code)
        for page in sorted(DOCS.glob("*.md"))
        for path, code in shown_examples(page.read_text())
    ]


def test_every_example_shown_in_the_docs_is_the_file_verbatim() -> None:
    shown = _shown()
    assert shown, "the docs show no examples at all"
    missing = [(page, path) for page, path, _ in shown if not (ROOT / path).is_file()]
    assert not missing, f"example blocks naming no file: {missing}"
    stale = [(page, path) for page, path, code in shown if code != (ROOT / path).read_text()]
    assert not stale, f"run 'python tools/sync_doc_examples.py': blocks that differ from their files: {stale}"


def test_no_page_uses_snippet_includes_that_plain_markdown_cannot_show() -> None:
    pages = [page.name for page in sorted(DOCS.glob("*.md")) if "--8<--" in page.read_text()]
    assert not pages, f"show the code inline (tools/sync_doc_examples.py) instead of --8<-- in {pages}"


def test_every_example_is_shown_in_the_docs() -> None:
    shown = {path for _, path, _ in _shown()}
    examples = {path.relative_to(ROOT).as_posix() for path in EXAMPLES.glob("*.py")}
    assert examples <= shown, f"examples no page shows: {sorted(examples - shown)}"
