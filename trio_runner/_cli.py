"""The ``trio-runner`` command line: argument parsing, logging, signals and exit codes.

The console script imports this module at the top of the main script, and the
spawn start method re-runs that script in every runner process it starts. So
nothing here imports trio at module level: the commands import it when they run.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, NoReturn

from . import __version__
from ._errors import ExitRecord, RestartLimitExceeded, RunnerCrashed, TrioRunnerError
from ._exits import install_command, modules_of_extra
from .mlx._runner import DEFAULT_BATCH_SIZE

PROG = "trio-runner"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

Command = Callable[[argparse.Namespace], Awaitable[None]]

#: The extras each command needs; checked before the command starts anything.
_EXTRAS_OF_COMMAND: dict[str, tuple[str, ...]] = {
    "demo": ("mlx",),
    "generate": ("mlx",),
    "serve": ("serve", "mlx"),
}


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr, then exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class CommandError(TrioRunnerError):
    """A command failed in a way the user can fix; its message is the whole report."""


def _cause(exit: ExitRecord) -> str:
    """The most telling line of why a runner exited: its exception, else how it exited."""
    lines = (exit.remote_traceback or "").strip().splitlines()
    return lines[-1] if lines else exit.describe()


def _missing_extras(command: str) -> str | None:
    """None if ``command``'s extras are installed, else the one-line error that says how to install them.

    The modules are found, not imported (``import mlx_lm`` takes a second), so
    this answers at once, before anything starts.
    """
    extras = _EXTRAS_OF_COMMAND.get(command, ())
    for extra in extras:
        for module in modules_of_extra(extra):
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):  # a finder that refuses it; a half-imported module
                found = False
            if not found:
                needs = " and ".join(extras) + (" extras" if len(extras) > 1 else " extra")
                return f"{command} needs the {needs} ({module} is not installed): {install_command(*extras)}"
    return None


def _say(line: str) -> None:
    print(line, flush=True)


def _note(line: str) -> None:
    print(f"{PROG}: {line.strip()}", file=sys.stderr, flush=True)


async def _demo(args: argparse.Namespace) -> None:
    from ._demo import run_demo

    await run_demo(_say, start_method=args.start_method)


async def _generate(args: argparse.Namespace) -> None:
    import trio

    from ._demo import escaped, show_progress, visible
    from ._policy import RestartPolicy
    from ._state import Exited, Ready
    from .mlx import Generate, demo_model_location, open_mlx_supervisor, prepare_demo_model
    from .mlx._model import DEMO_MODEL_NAMES, verify_demo_model
    from .mlx._supervise import kernel_cache_cold, warm_kernel_cache

    request = Generate(
        prompt=args.prompt, max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed
    )
    began = trio.current_time()
    model: str = "demo" if args.model is None else args.model
    architecture = DEMO_MODEL_NAMES.get(model)
    if architecture is not None:
        location = demo_model_location(architecture)
        if await trio.to_thread.run_sync(verify_demo_model, location, architecture) is None:
            model = str(location)
        else:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(show_progress, _note, "building the demo model (first run only)")
                model = str(await prepare_demo_model(architecture, progress=True))
                nursery.cancel_scope.cancel()
    if await trio.to_thread.run_sync(kernel_cache_cold):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(show_progress, _note, "compiling MLX's CPU kernels (first run only)")
            await warm_kernel_cache(model)
            nursery.cancel_scope.cancel()
    # One request: a crash is reported, not retried.
    policy = RestartPolicy(mode="temporary")
    async with open_mlx_supervisor(
        model,
        start_method=args.start_method,
        policy=policy,
        name="generate",
        parallel=args.parallel,
        **_group_options(args),
    ) as sup:
        changes = sup.watch(replay=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(show_progress, _note, "loading the model")
            async for change in changes:
                if isinstance(change, Ready):
                    break
                if isinstance(change, Exited):
                    raise CommandError(f"the runner could not load {model}: {_cause(change.exit)}")
            nursery.cancel_scope.cancel()
        startup = trio.current_time() - began
        # On a terminal control characters show as U+FFFD; to a pipe or a file, as escapes.
        shown = escaped if not sys.stdout.isatty() else functools.partial(visible, one_line=False)
        submitted = trio.current_time()
        first: float | None = None
        async with sup.stream(request) as task:
            async for token in task:
                if first is None:
                    first = trio.current_time() - submitted
                # Each token as it arrives: a pipe is block-buffered otherwise.
                sys.stdout.write(shown(token.text))
                sys.stdout.flush()
            completion = task.result
    sys.stdout.write("\n")
    sys.stdout.flush()
    c = completion
    first_ms = "n/a" if first is None else f"{first * 1000:.1f} ms"
    print(
        f"[{c.prompt_tokens} prompt tokens, {c.generation_tokens} generated ({c.finish_reason}); "
        f"prompt {c.prompt_tps:.0f} tokens/s, generation {c.generation_tps:.0f} tokens/s; first token "
        f"{c.time_to_first_token * 1000:.1f} ms in the runner, {first_ms} here; ready in {startup:.2f} s]",
        file=sys.stderr,
        flush=True,
    )


# serve's API key, from the environment: a key given with --api-key shows in ps.
API_KEY_ENV = "TRIO_RUNNER_API_KEY"


async def _serve(args: argparse.Namespace) -> None:
    import os

    import trio

    try:
        from .serve import serve_mlx
    except ImportError as exc:  # found by _missing_extras, yet it does not import (a broken install)
        fix = install_command(*_EXTRAS_OF_COMMAND["serve"])
        raise CommandError(f"serve needs the serve extra ({exc.name} is missing): {fix}") from None
    from ._policy import RestartPolicy

    stop: trio.Event = args.stop
    if args.max_backoff < args.backoff:
        raise CommandError(f"--max-backoff {args.max_backoff:g} must be at least --backoff {args.backoff:g}")
    policy = RestartPolicy(
        initial_delay=args.backoff, max_delay=args.max_backoff, max_restarts=args.max_restarts
    )
    api_key: str | None = args.api_key or os.environ.get(API_KEY_ENV) or None
    try:
        await serve_mlx(
            args.model,
            served_model_names=args.served_model_name,
            api_key=api_key,
            allow_origins=args.allow_origin,
            host=args.host,
            port=args.port,
            start_method=args.start_method,
            concurrency=args.batch_size,
            policy=policy,
            ready_wait=args.ready_wait,
            grace=args.grace,
            stop=stop,
            say=_say,
            parallel=args.parallel,
            ranks=args.ranks,
        )
    except OSError as exc:
        # A bare OSError comes from before anything runs: the address cannot be bound, say.
        raise CommandError(exc.strerror or str(exc)) from None


_MODEL_HELP = (
    "a model directory or a Hugging Face repo id "
    "(default: the offline demo model; demo-qwen2: its Qwen2 twin)"
)


def _group_options(args: argparse.Namespace) -> dict[str, Any]:
    """The supervisor's ``ranks`` option, when the command runs a group."""
    return {"ranks": args.ranks} if args.ranks > 1 else {}


def check_group_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A usage error unless ``--parallel`` and ``--ranks`` (2 or more) come together."""
    ranks: int | None = getattr(args, "ranks", None)
    if ranks is None:
        return
    parallel: str | None = args.parallel
    if parallel is not None and ranks < 2:
        parser.error(f"--parallel {parallel} shards the model over a group: add --ranks 2 (or more)")
    if parallel is None and ranks >= 2:
        parser.error(
            f"--ranks {ranks} needs --parallel tensor or --parallel pipeline (how the ranks share the model)"
        )
    batch_size: int | None = getattr(args, "batch_size", None)
    if ranks >= 2 and batch_size not in (None, 1):
        parser.error(
            f"--batch-size {batch_size} with --ranks {ranks}: a sharded model serves one request at a "
            "time; leave --batch-size out"
        )


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} must be a port number, 0 to 65535 (0 picks a free one)")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of seconds >= 0")
    return value


def _integer(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} must be {minimum} or more")
        return value

    return parse


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0 (0 is greedy)")
    return value


def _model(text: str) -> str:
    from .mlx._runner import check_model_argument

    try:
        checked = check_model_argument(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    assert checked is not None
    return checked


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
    start = _Parser(add_help=False)
    start.add_argument(
        "--start-method",
        choices=("auto", "forkserver", "spawn"),
        default="auto",
        help="how runner processes start: forkserver with mlx-lm preloaded (auto on Linux) or spawn",
    )
    group = _Parser(add_help=False)
    group.add_argument(
        "--ranks",
        type=_integer(1),
        default=1,
        metavar="N",
        help="run the model sharded over N processes, one supervised group (default 1; needs --parallel)",
    )
    group.add_argument(
        "--parallel",
        choices=("tensor", "pipeline"),
        default=None,
        help="how the ranks share the model: tensor (Llama, Qwen2, ...) or pipeline (Qwen2 and others, "
        "not Llama; try --model demo-qwen2)",
    )
    demo = commands.add_parser(
        "demo",
        parents=[verbosity, start],
        help="watch an MLX runner get SIGKILLed mid-generation and come back",
        description=(
            "Run the offline MLX demo model under supervision, stream a seeded generation with "
            "retry=True, SIGKILL the runner partway through, and report the crash, the backoff, the "
            "restart and the retried result, with measured timings."
        ),
    )
    demo.set_defaults(command=_demo)
    generate = commands.add_parser(
        "generate",
        parents=[verbosity, start, group],
        help="generate text with an MLX model in a supervised runner",
        description=(
            "Load a model in a supervised runner process and stream the generated text to stdout; "
            "a one-line summary (token counts, speeds, time to first token) goes to stderr."
        ),
    )
    generate.add_argument("prompt", metavar="PROMPT", help="the text to continue")
    generate.add_argument(
        "--model",
        type=_model,
        default=None,
        metavar="M",
        help=_MODEL_HELP,
    )
    generate.add_argument(
        "--max-tokens", type=_integer(1), default=100, metavar="N", help="tokens to generate (default 100)"
    )
    generate.add_argument(
        "--temperature", type=_temperature, default=0.0, metavar="T", help="0 is greedy (default 0)"
    )
    generate.add_argument("--seed", type=_integer(0), default=None, metavar="S", help="seed for sampling")
    generate.set_defaults(command=_generate)
    serve = commands.add_parser(
        "serve",
        parents=[verbosity, start, group],
        help="serve an MLX model over an OpenAI-compatible HTTP API that stays up while the runner crashes",
        description=(
            "Serve an MLX model in a supervised runner over an OpenAI-compatible API "
            "(/v1/chat/completions, /v1/completions, /v1/models), with /health and Prometheus /metrics. "
            "SIGTERM or SIGINT shuts down gracefully and exits 0."
        ),
    )
    serve.add_argument(
        "--model",
        type=_model,
        default=None,
        metavar="M",
        help=_MODEL_HELP,
    )
    serve.add_argument(
        "--served-model-name",
        action="append",
        default=[],
        metavar="NAME",
        help="another name the model answers to (repeatable); it also answers to its own name and to "
        "default_model",
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="the address to listen on (default 127.0.0.1; elsewhere, set an API key)",
    )
    serve.add_argument("--port", type=_port, default=8000, help="the port (default 8000; 0 picks a free one)")
    serve.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help=f"require 'Authorization: Bearer KEY' on every route but /health (default: ${API_KEY_ENV}, "
        "else no auth; the variable keeps the key out of ps)",
    )
    serve.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let browser pages from ORIGIN call the API, CORS (repeatable; '*' for any; default none)",
    )
    serve.add_argument(
        "--batch-size",
        type=_integer(1),
        default=None,
        metavar="N",
        help=f"sequences decoded together in one batch (default {DEFAULT_BATCH_SIZE}, and 1 with --ranks; a "
        "request with n choices counts n); 1 serves one request at a time, single-stream",
    )
    serve.add_argument(
        "--ready-wait",
        type=_seconds,
        default=5.0,
        metavar="S",
        help="how long a request waits for a restarting runner before a 503 (default 5)",
    )
    serve.add_argument(
        "--grace",
        type=_seconds,
        default=5.0,
        metavar="S",
        help="on SIGTERM/SIGINT, how long requests in flight may finish (default 5)",
    )
    serve.add_argument(
        "--backoff",
        type=_seconds,
        default=2.0,
        metavar="S",
        help="the first restart delay; it doubles per crash in a row, up to --max-backoff (default 2)",
    )
    serve.add_argument(
        "--max-backoff",
        type=_seconds,
        default=60.0,
        metavar="S",
        help="the longest restart delay (default 60)",
    )
    serve.add_argument(
        "--max-restarts",
        type=_integer(0),
        default=10,
        metavar="N",
        help="restarts in a row before giving up; then every request gets 503 (default 10)",
    )
    serve.set_defaults(command=_serve, graceful=True)
    return parser


def _configure_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if verbose <= 0:
        # The runner's own stderr (a traceback, say) is summed up in the error line; -v shows it all.
        logging.getLogger("trio_runner.runner").setLevel(logging.ERROR)


async def _run(command: Command, args: argparse.Namespace) -> int:
    """Run ``command`` until it returns or a signal asks for a graceful shutdown.

    A command with ``graceful`` set (``serve``) gets a ``trio.Event`` as
    ``args.stop``: the first signal sets it and the command winds down by
    itself, exiting 0; a second signal cancels it. Any other command is
    cancelled at the first signal and exits 128 + the signal number.
    """
    import trio

    received: list[int] = []
    graceful: bool = getattr(args, "graceful", False)
    stop = trio.Event()
    args.stop = stop

    async def listen(signals: AsyncIterator[int], work: trio.CancelScope) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if not received:
                received.append(signum)
                print(f"{PROG}: {name} received, shutting down gracefully", file=sys.stderr, flush=True)
                if graceful:
                    stop.set()
                    continue
            elif graceful:
                print(f"{PROG}: {name} received again, stopping now", file=sys.stderr, flush=True)
            work.cancel()

    with trio.open_signal_receiver(*_SIGNALS) as signals:
        async with trio.open_nursery() as nursery:
            work = trio.CancelScope()
            nursery.start_soon(listen, signals, work)
            with work:
                await command(args)
            nursery.cancel_scope.cancel()
    if received and not (graceful and not work.cancelled_caught):
        return 128 + received[0]
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """The ``trio-runner`` entry point; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_group_arguments(parser, args)
    missing = _missing_extras(args.command_name)
    if missing is not None:
        _report(CommandError(missing))
        return EXIT_FAILED
    _configure_logging(getattr(args, "verbose", 0))
    import trio

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
        leaves = _leaves(matched)
        # The supervisor's own failure (a runner that can never start, a policy
        # that gave up) is the cause; the body's errors beside it are its echoes.
        causes = [exc for exc in leaves if isinstance(exc, RunnerCrashed | RestartLimitExceeded)]
        for exc in causes or leaves:
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
    if isinstance(exc, CommandError):
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return
    first_line = (str(exc).splitlines() or [""])[0]
    print(f"{PROG}: error: {type(exc).__name__}: {first_line}", file=sys.stderr, flush=True)
