"""The ``trio-runner`` command line: argument parsing, logging, signals and exit codes.

The console script imports this module at the top of the main script, and the
spawn start method re-runs that script in every runner process it starts. So
nothing here imports trio at module level: the commands import it when they run.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import NoReturn

from . import __version__

PROG = "trio-runner"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

Command = Callable[[argparse.Namespace], Awaitable[None]]


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr, then exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _say(line: str) -> None:
    print(line, flush=True)


async def _demo(args: argparse.Namespace) -> None:
    from ._demo import run_demo

    await run_demo(_say)


def build_parser() -> argparse.ArgumentParser:
    """The parser; each subcommand stores its coroutine function as ``command``."""
    verbosity = _Parser(add_help=False)
    verbosity.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="log more: -v for INFO (the supervisor's lifecycle), -vv for DEBUG",
    )
    parser = _Parser(
        prog=PROG,
        description="Supervise a crash-prone child process from trio.",
        parents=[verbosity],
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(title="commands", dest="command_name", metavar="COMMAND", required=True)
    demo = commands.add_parser(
        "demo",
        parents=[verbosity],
        help="watch a runner get SIGKILLed mid-stream and come back",
        description=(
            "Run a small built-in runner under supervision, stream a request with retry=True, "
            "SIGKILL the runner partway through, and report the crash, the backoff, the restart "
            "and the retried result, with measured timings."
        ),
    )
    demo.set_defaults(command=_demo)
    return parser


def _configure_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


async def _run(command: Command, args: argparse.Namespace) -> int:
    """Run ``command`` until it returns or a signal asks for a graceful shutdown."""
    import trio

    received: list[int] = []

    async def listen(signals: AsyncIterator[int], work: trio.CancelScope) -> None:
        async for signum in signals:
            if not received:
                received.append(signum)
                print(
                    f"{PROG}: {signal.Signals(signum).name} received, shutting down gracefully",
                    file=sys.stderr,
                    flush=True,
                )
                work.cancel()

    with trio.open_signal_receiver(*_SIGNALS) as signals:
        async with trio.open_nursery() as nursery:
            work = trio.CancelScope()
            nursery.start_soon(listen, signals, work)
            with work:
                await command(args)
            nursery.cancel_scope.cancel()
    if received:
        return 128 + received[0]
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """The ``trio-runner`` entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    _configure_logging(getattr(args, "verbose", 0))
    import trio

    from ._errors import TrioRunnerError

    expected = (TrioRunnerError, trio.TooSlowError)
    try:
        return trio.run(_run, args.command, args)
    except KeyboardInterrupt:
        # A SIGINT outside the signal receiver (while trio starts or stops).
        print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
        return 128 + signal.SIGINT
    except expected as exc:
        _report(exc)
        return EXIT_FAILED
    except BaseExceptionGroup as group:
        # Only failures the command expects are reported in a line; anything else is a bug.
        matched, rest = group.split(expected)
        if matched is None or rest is not None:
            raise
        for exc in _leaves(matched):
            _report(exc)
        return EXIT_FAILED


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            leaves.extend(_leaves(exc))  # pyright: ignore[reportUnknownArgumentType]
        else:
            leaves.append(exc)
    return leaves


def _report(exc: BaseException) -> None:
    first_line = (str(exc).splitlines() or [""])[0]
    print(f"{PROG}: error: {type(exc).__name__}: {first_line}", file=sys.stderr, flush=True)
