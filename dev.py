"""Run the project's nox sessions from a project-local environment: ``python3 dev.py SESSION ...``.

The first run creates ``.venv/`` in this directory with nox and uv in it (the
system Python is never touched, so this works where ``python3`` is
"externally managed", as on Debian, Ubuntu and Homebrew); nox then builds one
virtual environment per session under ``.nox/``, installing with uv. Later
runs reuse both. Everything after the session names goes to nox, e.g.
``python3 dev.py tests -- -k restart``. ``python3 dev.py`` alone lists the
sessions.

Only the standard library is used here: this file runs before anything is
installed.
"""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(ROOT, ".venv")
TOOLS = ["nox>=2025.2.9", "uv>=0.5"]


def _venv_python() -> str:
    return os.path.join(VENV, "bin", "python")


def _say(message: str) -> None:
    print(f"dev.py: {message}", file=sys.stderr, flush=True)


def _fail(message: str) -> None:
    _say(f"error: {message}")
    raise SystemExit(2)


def _has_tools(python: str) -> bool:
    probe = "import nox, uv"
    return subprocess.run([python, "-c", probe], capture_output=True, check=False).returncode == 0


def _create_venv() -> None:
    """``.venv`` with pip in it; without ensurepip (Debian's python3 lacks it unless
    python3-venv is installed), an empty one that the system's pip installs into."""
    result = subprocess.run([sys.executable, "-m", "venv", VENV], capture_output=True, text=True, check=False)
    if result.returncode == 0:
        return
    if "ensurepip" not in result.stderr:
        _fail(f"could not create {VENV}: {result.stderr.strip()}")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--clear", VENV], check=True)


def _install_tools() -> None:
    python = _venv_python()
    has_pip = subprocess.run([python, "-m", "pip", "--version"], capture_output=True, check=False)
    if has_pip.returncode == 0:
        command = [python, "-m", "pip", "install", "--quiet", *TOOLS]
    else:
        # No pip in the venv: the system's pip (22.3 or later) can install into it.
        system_pip = subprocess.run(
            [sys.executable, "-m", "pip", "--version"], capture_output=True, check=False
        )
        if system_pip.returncode != 0:
            _fail(
                "this Python has neither ensurepip nor pip, so no virtual environment can be "
                "set up: install one of them (on Debian or Ubuntu: sudo apt install python3-venv), "
                "then run this again"
            )
        command = [sys.executable, "-m", "pip", "--python", python, "install", "--quiet", *TOOLS]
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        _fail(f"installing {' and '.join(TOOLS)} into {VENV} failed (see above)")


def main(argv: list[str]) -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 -- this file runs under any python3 first
        _fail(f"trio-runner needs Python 3.11 or later; this is {sys.version.split()[0]}")
    if os.name != "posix":
        _fail("trio-runner runs on Linux and macOS only")
    python = _venv_python()
    if not (os.path.exists(python) and _has_tools(python)):
        _say(f"first run: creating {os.path.relpath(VENV)}/ with nox and uv (about half a minute) ...")
        if not os.path.exists(python):
            _create_venv()
        _install_tools()
    if not argv:
        args = ["--list"]
    elif argv[0].startswith("-"):
        args = argv  # nox's own options
    else:
        # "tests lint -- -k x" -> "-s tests lint -- -k x"
        split = argv.index("--") if "--" in argv else len(argv)
        args = ["-s", *argv[:split], *argv[split:]]
    os.chdir(ROOT)
    os.execv(python, [python, "-m", "nox", *args])


if __name__ == "__main__":
    main(sys.argv[1:])
