"""The child side of the MLX runner: :class:`MlxLmRunner` loads a model and streams generations.

mlx and mlx-lm are imported in ``setup``, never at module import: the parent
imports this module to name the runner class, and must stay light. Nor is
trio imported here; the child loads this module.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .._runner import Runner, TaskContext
from ._types import Completion, FinishReason, Generate, Token

_PRELOAD_MODULE = "trio_runner.mlx._preload"
# What a Hugging Face repo id looks like; anything else that does not exist is a missing path.
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_WARMUP_PROMPT = "Warm up"


def start_options(start_method: str = "auto") -> dict[str, Any]:
    """The ``start_method`` and ``preload`` arguments for supervising :class:`MlxLmRunner`.

    Args:
        start_method: ``"auto"`` (forkserver on Linux, spawn elsewhere),
            ``"forkserver"`` (``mlx_lm`` preloaded, so a restart skips its
            roughly 1 s import) or ``"spawn"``.

    Returns:
        keyword arguments for :func:`trio_runner.open_supervisor` or
        :func:`trio_runner.run_supervisor`.

    **Why only Linux by default:** forking a process that has imported (never
    evaluated) MLX is measured safe on the Linux CPU backend. On macOS, Metal
    has not been measured, so ``"auto"`` keeps to spawn there.
    """
    if start_method == "auto":
        start_method = "forkserver" if sys.platform == "linux" else "spawn"
    if start_method == "forkserver":
        return {"start_method": "forkserver", "preload": (_PRELOAD_MODULE,)}
    if start_method == "spawn":
        return {"start_method": "spawn"}
    raise ValueError(f"start_method={start_method!r} must be 'auto', 'forkserver' or 'spawn'")


def warm_up_once(model: str) -> None:
    """Load ``model`` and run the runner's warm-up in this process (for a throwaway one).

    Leaves MLX's compiled CPU kernels in its disk cache for every later runner.
    """
    MlxLmRunner(model).setup()


def check_model_argument(model: str | os.PathLike[str] | None) -> str | None:
    """The model argument as the child will see it, or a ValueError that says what is wrong.

    A path that exists is made absolute (the child may run elsewhere). A string
    shaped like a Hugging Face repo id (``org/name``) is kept for
    ``mlx_lm.load`` to resolve. Anything else is a missing local path.
    """
    if model is None:
        return None
    if not isinstance(model, str | os.PathLike):  # pyright: ignore[reportUnnecessaryIsInstance]
        raise TypeError(f"model must be a path, a Hugging Face repo id or None, not {type(model).__name__}")
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"model path {text!r} is not a directory; give the model's directory")
        return str(path.absolute())
    if isinstance(model, str) and _REPO_ID.fullmatch(text) and not text.startswith("."):
        return text
    raise ValueError(f"model path {text!r} does not exist; give a model directory or a Hugging Face repo id")


class MlxLmRunner(Runner[Generate, Token, Completion]):
    """Runs an mlx-lm model in the child: ``setup`` loads and warms it up, ``handle`` generates.

    Args:
        model: a local model directory or a Hugging Face repo id, for
            ``mlx_lm.load``. ``None`` (the default) is the offline demo model,
            :func:`~trio_runner.mlx.demo_model`, built in the child if needed.
        warmup: generate a couple of tokens, greedy and sampled, in ``setup``,
            so the first request does not pay for loading and for compiling
            MLX's CPU kernels (cached on disk, under ``$TMPDIR/mlx``).
        preloaded: the runner is started by a forkserver that should have
            preloaded mlx-lm; if it did not (preload errors are silent), say so
            on stderr, which the supervisor logs.

    Each request is a :class:`Generate`; each event a :class:`Token`; the
    result a :class:`Completion`. The cancel flag is checked at every token.
    Every child seeds MLX's random state from ``os.urandom``: forked children
    would otherwise share one state. A request's ``seed`` reseeds it.

    Tokens that come less than 50 ms apart (``linger``) are sent to the parent
    in batches at most 50 ms apart (20 a second, which reads as smooth
    streaming); a model slower than 20 tokens/s streams every token the moment
    it is generated. Set ``linger`` on a subclass to change it (0: every token
    at once, which costs a fast model about 10% of its speed on two cores; 20
    ms costs the demo model about 2% more than 50 ms).
    """

    linger = 0.05

    def __init__(
        self, model: str | os.PathLike[str] | None = None, *, warmup: bool = True, preloaded: bool = False
    ) -> None:
        self.model_arg = None if model is None else os.fspath(model)
        self.warmup = warmup
        self._missing_preload = preloaded and _PRELOAD_MODULE not in sys.modules
        self.model: Any = None
        self.tokenizer: Any = None
        self.context_length: int | None = None
        self.load_seconds = 0.0

    def setup(self) -> None:
        began = time.perf_counter()
        if self._missing_preload:
            print(
                f"trio_runner.mlx: the forkserver did not preload {_PRELOAD_MODULE}; every restart "
                "imports mlx_lm again (about 1 s). Was the forkserver already running with other preloads?",
                file=sys.stderr,
            )
        import mlx.core as mx
        import mlx_lm

        if self.model_arg is None:
            from ._model import demo_model

            path = str(demo_model())
        else:
            path = check_model_argument(self.model_arg) or self.model_arg
        loaded: Any = mlx_lm.load(path, return_config=True)  # pyright: ignore[reportUnknownMemberType]
        self.model, self.tokenizer, config = loaded
        context = config.get("max_position_embeddings")
        self.context_length = context if isinstance(context, int) and context > 0 else None
        if self.warmup:
            self._warm_up()
        mx.random.seed(int.from_bytes(os.urandom(8), "little"))
        self.load_seconds = time.perf_counter() - began

    def _warm_up(self) -> None:
        from mlx_lm.sample_utils import make_sampler

        ids = self.encode(Generate(prompt=_WARMUP_PROMPT))
        # Greedy and sampled generation compile different kernels.
        for temperature in (0.0, 1.0):
            for _ in self.responses(ids, 2, make_sampler(temp=temperature)):
                pass

    def encode(self, request: Generate) -> list[int]:
        """The prompt's token ids; chat messages go through the tokenizer's chat template."""
        tokenizer = self.tokenizer
        if request.messages is not None:
            text: str = tokenizer.apply_chat_template(
                [dict(m) for m in request.messages], add_generation_prompt=True, tokenize=False
            )
            return list(tokenizer.encode(text, add_special_tokens=False))
        prompt = request.prompt or ""
        bos = tokenizer.bos_token
        return list(tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos)))

    def responses(self, prompt: Sequence[int], max_tokens: int, sampler: Any) -> Iterator[Any]:
        """``mlx_lm.stream_generate``'s responses; a seam for tests that need a slower model."""
        import mlx_lm

        return mlx_lm.stream_generate(  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
            self.model, self.tokenizer, list(prompt), max_tokens=max_tokens, sampler=sampler
        )

    def handle(self, request: Generate, ctx: TaskContext[Token]) -> Completion:
        began = time.perf_counter()
        if not isinstance(request, Generate):  # pyright: ignore[reportUnnecessaryIsInstance]
            kind = type(request).__name__
            raise TypeError(f"MlxLmRunner serves trio_runner.mlx.Generate requests, not {kind}")
        import mlx.core as mx
        from mlx_lm.sample_utils import make_sampler

        ids = self.encode(request)
        max_tokens = request.max_tokens
        context = self.context_length
        if context is not None:
            if len(ids) >= context:
                raise ValueError(
                    f"the prompt is {len(ids)} tokens, but the model's context is {context} tokens: "
                    "shorten the prompt"
                )
            max_tokens = min(max_tokens, context - len(ids))
        if request.seed is not None:
            mx.random.seed(request.seed)
        sampler = make_sampler(temp=request.temperature, top_p=request.top_p if request.top_p < 1 else 0.0)
        eos: set[int] = set(self.tokenizer.eos_token_ids)

        scanner = _StopScanner(request.stop)
        pieces: list[str] = []
        first_at: float | None = None
        finish: FinishReason = "length"
        last: Any = None
        cut = False
        for response in self.responses(ids, max_tokens, sampler):
            ctx.raise_if_cancelled()
            if first_at is None:
                first_at = time.perf_counter()
            last = response
            text: str = response.text
            token_id: int = response.token
            if response.finish_reason == "stop" and token_id in eos:
                finish = "stop"
                if not text:
                    break  # the end-of-sequence token itself adds no text
            ready, cut = scanner.push(text, token_id)
            for token in ready:
                pieces.append(token.text)
                ctx.emit(token)
            if cut:
                finish = "stop"
                break
        if not cut:
            for token in scanner.flush():
                pieces.append(token.text)
                ctx.emit(token)
        return Completion(
            text="".join(pieces),
            finish_reason=finish,
            prompt_tokens=len(ids),
            generation_tokens=len(pieces),
            prompt_tps=0.0 if last is None else float(last.prompt_tps),
            generation_tps=0.0 if last is None else float(last.generation_tps),
            time_to_first_token=(time.perf_counter() if first_at is None else first_at) - began,
        )


class _StopScanner:
    """Holds back tokens that might begin a stop string, and cuts the text where one appears.

    Without stop strings every token passes straight through. Linear in the
    length of the generation: it keeps only the end of the text a match can
    still use (the held tokens, and the ``longest - 1`` characters before the
    newest token, where a stop string that ends in it may begin).
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""  # the end of everything generated so far: see ``_trim``
        self.base = 0  # where ``text`` starts in the whole generation
        self.released = 0  # characters of the whole generation already released
        self.held: deque[Token] = deque()

    def push(self, text: str, token_id: int) -> tuple[list[Token], bool]:
        """The tokens now safe to emit, and whether a stop string ended generation."""
        if not self.stops:
            return [Token(text, token_id)], False
        # A new match must end in the new text, so it starts no earlier than this.
        start = max(0, self.base + len(self.text) - self.longest + 1)
        self.text += text
        self.held.append(Token(text, token_id))
        hits = [i for i in (self.text.find(stop, start - self.base) for stop in self.stops) if i >= 0]
        if hits:
            return self._release(self.base + min(hits), cut=True), True
        ready = self._release(self.base + len(self.text) - self._partial_match())
        self._trim()
        return ready, False

    def flush(self) -> list[Token]:
        return self._release(self.base + len(self.text))

    def _partial_match(self) -> int:
        """The length of the longest end of ``text`` that begins some stop string."""
        tail = self.text[-self.longest :]
        for size in range(min(len(tail), self.longest - 1), 0, -1):
            suffix = tail[-size:]
            if any(stop.startswith(suffix) for stop in self.stops):
                return size
        return 0

    def _trim(self) -> None:
        """Drop the text no later match or release needs, so each push costs what it keeps."""
        end = self.base + len(self.text)
        keep_from = min(self.released, end - self.longest + 1)
        if keep_from > self.base:
            self.text = self.text[keep_from - self.base :]
            self.base = keep_from

    def _release(self, end: int, cut: bool = False) -> list[Token]:
        out: list[Token] = []
        while self.held and self.released + len(self.held[0].text) <= end:
            token = self.held.popleft()
            self.released += len(token.text)
            out.append(token)
        if cut and self.held and self.released < end:
            # The token that runs into the stop string keeps only the text before it.
            token = self.held.popleft()
            out.append(Token(token.text[: end - self.released], token.token_id))
            self.released = end
        return out
