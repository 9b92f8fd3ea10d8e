"""Developer and CI tasks for trio-runner.

Run them through ``python3 dev.py SESSION`` (which sets up ``.venv/`` with nox
and uv first), or with a nox you installed yourself.

Sessions (``nox -l`` lists them; ``nox`` alone runs the first four):

- ``tests``: the pytest suite, with the package installed editable plus ``[test,mlx,serve]``.
- ``lint``: ``ruff check`` and ``ruff format --check`` over the source trees that exist.
- ``typing``: ``pyright`` in strict mode on ``trio_runner`` (configured in pyproject.toml).
- ``docs``: ``mkdocs build --strict`` into ``build/site``.
- ``demo``: the ``trio-runner demo`` command, end to end.
- ``faults``: the fault-injection suites at full size (5,000 property examples;
  about 30 minutes; not run by CI).
- ``soak``: 10,000 crash/restart cycles checking fds, threads and parent RSS
  (about 30 minutes; not run by CI).
- ``bench``: the timing benchmarks in ``benchmarks/run.py``; timing claims live
  here, never in the test suite.

Extra arguments after ``--`` go to pytest, the demo command or the benchmark
runner, e.g. ``nox -s tests -- -k restart -x``.
"""

from __future__ import annotations

import os

import nox

# uv installs in seconds what pip takes minutes for; plain venv + pip where uv is missing.
nox.options.default_venv_backend = "uv|venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests", "lint", "typing", "docs"]

# Directories that may not exist yet are skipped rather than failing ruff.
LINT_PATHS = ["trio_runner", "tests", "benchmarks", "noxfile.py", "dev.py", "docs", "tools"]


def _existing(paths: list[str]) -> list[str]:
    return [path for path in paths if os.path.exists(path)]


def _install_project(session: nox.Session, extras: str, *more: str) -> None:
    """The project, editable, with ``extras``. Compat mode puts a plain path entry on
    ``sys.path``, which type checkers and IDEs resolve (the default import hook they do not)."""
    if "mlx" in extras:
        session.log("installing MLX and mlx-lm with the project (the first run only; about a minute) ...")
    session.install("-e", f".[{extras}]", "--config-settings", "editable_mode=compat", *more)


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (the MLX tests run on the offline demo model, on the CPU)."""
    _install_project(session, "test,mlx,serve")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Check style and formatting with ruff."""
    session.install("ruff")
    paths = _existing(LINT_PATHS)
    session.run("ruff", "check", *paths)
    session.run("ruff", "format", "--check", *paths)


@nox.session
def typing(session: nox.Session) -> None:
    """Type-check the package with pyright (strict)."""
    _install_project(session, "test,mlx,serve", "pyright")
    session.run("pyright", *session.posargs)
    # The editable install must resolve for type checkers and IDEs outside this tree too.
    probe = os.path.join(session.create_tmp(), "uses_trio_runner.py")
    with open(probe, "w") as file:
        file.write("import trio_runner\nimport trio_runner.mlx\nimport trio_runner.testing\n")
    python = os.path.join(session.virtualenv.location, "bin", "python")
    session.run("pyright", "--pythonpath", python, probe)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation, failing on any warning."""
    _install_project(session, "docs")
    session.run("mkdocs", "build", "--strict", "--site-dir", "build/site")


@nox.session
def demo(session: nox.Session) -> None:
    """Run the ``trio-runner demo`` command."""
    _install_project(session, "mlx")
    session.run("trio-runner", "demo", *session.posargs)


@nox.session
def faults(session: nox.Session) -> None:
    """The fault-injection suites at full size (5,000 property examples)."""
    _install_project(session, "test")
    session.run(
        "pytest",
        "tests/test_property_faults.py",
        "tests/test_stateful_supervisor.py",
        "-p",
        "no:cacheprovider",
        *session.posargs,
        env={"TRIO_RUNNER_FAULT_EXAMPLES": "5000", "TRIO_RUNNER_STATEFUL_EXAMPLES": "500"},
    )


@nox.session
def soak(session: nox.Session) -> None:
    """10,000 crash/restart cycles: parent fds, threads and RSS must not grow."""
    _install_project(session, "test")
    session.run(
        "pytest", "tests/test_soak_restarts.py", "-s", *session.posargs, env={"TRIO_RUNNER_SOAK": "1"}
    )


@nox.session
def bench(session: nox.Session) -> None:
    """Run the timing benchmarks."""
    script = os.path.join("benchmarks", "run.py")
    if not os.path.exists(script):
        session.skip(f"{script} does not exist yet")
    _install_project(session, "test,mlx,serve", "matplotlib")
    session.run("python", script, *session.posargs)
