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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._batch import BatchEngine
    from ._sharded import RankSync

from .. import _validate as check
from .._runner import Runner, TaskContext
from ._batch_text import ChoiceText
from ._model import DEMO_MODEL_NAMES
from ._prompt_cache import DEFAULT_PROMPT_CACHE_BYTES, PromptCache
from ._sharded import check_parallel, check_sharded_concurrency
from ._types import Completion, Generate, Token

__all__ = ["MlxLmRunner", "check_model_argument", "start_options", "warm_up_once"]

_PRELOAD_MODULE = "trio_runner.mlx._preload"
_START_METHODS = ("auto", "forkserver", "spawn")
# What a Hugging Face repo id looks like; anything else that does not exist is a missing path.
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_WARMUP_PROMPT = "Warm up"
DEFAULT_BATCH_SIZE = 32
"""The default :attr:`MlxLmRunner.concurrency`: sequences decoded together (as ``mlx_lm.server``)."""
DEFAULT_PREFILL_STEP_SIZE = 512
"""Prompt tokens processed per batch step by default: the longest a new prompt holds up the others."""


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
    check.one_of("start_method", start_method, _START_METHODS)
    if start_method == "auto":
        start_method = "forkserver" if sys.platform == "linux" else "spawn"
    if start_method == "forkserver":
        return {"start_method": "forkserver", "preload": (_PRELOAD_MODULE,)}
    return {"start_method": "spawn"}


def warm_up_once(model: str) -> None:
    """Load ``model`` and run the runner's warm-up in this process (for a throwaway one).

    Leaves MLX's compiled CPU kernels in its disk cache for every later runner.
    """
    runner = MlxLmRunner(model)
    runner.setup()
    # No teardown: ending the decoding thread before the process exits aborts it in MLX's C++ exit.
    runner.wait_warm()


def check_model_argument(model: str | os.PathLike[str] | None) -> str | None:
    """The model argument as the child will see it, or a ValueError that says what is wrong.

    A path that exists is made absolute (the child may run elsewhere). A string
    shaped like a Hugging Face repo id (``org/name``) is kept for
    ``mlx_lm.load`` to resolve, and so is the name of a demo model
    (``"demo"``, ``"demo-qwen2"``) that no directory of that name shadows.
    Anything else is a missing local path.
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
    if text in DEMO_MODEL_NAMES:
        return text
    if isinstance(model, str) and _REPO_ID.fullmatch(text) and not text.startswith("."):
        return text
    raise ValueError(f"model path {text!r} does not exist; give a model directory or a Hugging Face repo id")


class MlxLmRunner(Runner[Generate, Token, Completion]):
    """Runs an mlx-lm model in the child: ``setup`` loads and warms it up, ``handle`` generates.

    Args:
        model: a local model directory or a Hugging Face repo id, for
            ``mlx_lm.load``. ``None`` (the default) is the offline demo model,
            :func:`~trio_runner.mlx.demo_model`, built in the child if needed;
            ``"demo-qwen2"`` its Qwen2 twin (``demo_model("qwen2")``).
        warmup: generate a couple of tokens, greedy and sampled, in ``setup``,
            so the first request does not pay for loading and for compiling
            MLX's CPU kernels (cached on disk, under ``$TMPDIR/mlx``); the
            batch's own warm-up runs after ``setup``, while the runner is idle.
        preloaded: the runner is started by a forkserver that should have
            preloaded mlx-lm; if it did not (preload errors are silent), say so
            on stderr, which the supervisor logs.
        concurrency: the batch size: how many requests (counting each of a
            request's ``n`` choices as one sequence, up to this many
            sequences) decode together. Default 32. 1 serves one request at a
            time on the single-stream path (``mlx_lm.stream_generate``).
        prompt_cache_bytes: the byte budget of the prompt cache, the KV states
            of finished sequences that later requests with the same prefix
            start from (least recently used evicted first; 0 disables it).
            Default 512 MiB.
        prefill_step_size: prompt tokens processed per batch step. A new
            request's prompt is processed in chunks of this size between
            decoding steps, so it holds up the others at most one chunk at a
            time. Default 512.
        parallel: ``"tensor"`` or ``"pipeline"`` to shard the model over the
            ranks of a group (``ranks=N`` on the supervisor); None (the
            default) for a runner on its own. Each rank joins MLX's ``ring``
            group at the addresses of :attr:`~trio_runner.Runner.group` and
            loads its shard with ``mlx_lm.utils.sharded_load``. Tensor
            sharding needs a model with ``shard`` (Llama, Qwen2, ...),
            pipelining one with ``model.model.pipeline`` (Qwen2 and some 16
            other families, not Llama). A group serves one request at a time
            on the single-stream path, without the prompt cache: every rank
            must run the same steps in the same order, and a batch's makeup
            (or a cache hit) would depend on when each rank's requests
            arrive. So ``concurrency`` must be 1 or unset.

    Each request is a :class:`Generate`; each event a :class:`Token`; the
    result a :class:`Completion`. The cancel flag is checked at every token
    (at every step, for every request in the batch). Every child seeds MLX's
    random state from ``os.urandom``: forked children would otherwise share
    one state. A request's ``seed`` gives each of its choices its own random
    key, so the same seeded request gives the same text whatever else is in
    the batch.

    **Batching:** with ``concurrency > 1``, one decoding thread owns mlx-lm's
    ``BatchGenerator``; a request joins the batch at its next step and leaves
    it the step after it ends or is cancelled. A request alone in the runner
    is decoded outside the batch, without its per-step overhead, and moves
    into it when a second request arrives, with the same tokens either way.
    A slow consumer stalls only its own request's stream: the batch keeps
    decoding it, and its tokens wait in the runner until its consumer
    catches up.

    Tokens that come less than 50 ms apart (``linger``) are sent to the parent
    in batches at most 50 ms apart (20 a second, which reads as smooth
    streaming); a model slower than 20 tokens/s streams every token the moment
    it is generated. Set ``linger`` on a subclass to change it (0: every token
    at once, which costs a fast model about 10% of its speed on two cores; 20
    ms costs the demo model about 2% more than 50 ms).
    """

    linger = 0.05
    concurrency = DEFAULT_BATCH_SIZE

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        warmup: bool = True,
        preloaded: bool = False,
        concurrency: int | None = None,
        prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES,
        prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
        parallel: str | None = None,
    ) -> None:
        self.model_arg = None if model is None else os.fspath(model)
        self.warmup = warmup
        self._missing_preload = preloaded and _PRELOAD_MODULE not in sys.modules
        self.parallel = check_parallel(parallel)
        if concurrency is not None:
            self.concurrency = check.integer("concurrency", concurrency, minimum=1, fix="the batch size")
        check_sharded_concurrency(self.parallel, concurrency)
        if self.parallel is not None:
            self.concurrency = 1
        self.prefill_step_size = check.integer("prefill_step_size", prefill_step_size, minimum=1)
        self.prompt_cache = PromptCache(
            check.integer("prompt_cache_bytes", prompt_cache_bytes, minimum=0, what="an int number of bytes")
        )
        self.model: Any = None
        self.tokenizer: Any = None
        self.context_length: int | None = None
        self.vocab_size: int | None = None
        self.load_seconds = 0.0
        self._engine: BatchEngine | None = None
        self._sync: RankSync | None = None
        self._pieces: dict[int, str] = {}
        self.stream_options: dict[str, Any] = {}

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

        path = self._model_path()
        seed = int.from_bytes(os.urandom(8), "little")
        if self.parallel is None:
            from ._sharded import check_group

            check_group(None, self.group)
            loaded: Any = mlx_lm.load(path, return_config=True)  # pyright: ignore[reportUnknownMemberType]
        else:
            loaded, seed = self._load_shard(path)
        self.model, self.tokenizer, config = loaded
        context = config.get("max_position_embeddings")
        self.context_length = context if isinstance(context, int) and context > 0 else None
        vocab = config.get("vocab_size")
        self.vocab_size = vocab if isinstance(vocab, int) and vocab > 0 else None
        if self.warmup:
            self._warm_up()
        mx.random.seed(seed)
        if self.concurrency > 1:
            from ._batch import HANDOFF_INTERVAL, BatchEngine

            self._engine = BatchEngine(
                self.model,
                self.tokenizer,
                batch_size=self.concurrency,
                prefill_step_size=self.prefill_step_size,
                prompt_cache=self.prompt_cache,
                step=self.batch_step,
                handoff=min(HANDOFF_INTERVAL, self.linger),
                warmup_prompt=self.encode(Generate(prompt=_WARMUP_PROMPT)) if self.warmup else None,
            )
            self._engine.start()
        self.load_seconds = time.perf_counter() - began

    def _model_path(self) -> str:
        """The model directory to load: the demo models by name (built if needed), else the argument."""
        name = "demo" if self.model_arg is None else self.model_arg
        if name in DEMO_MODEL_NAMES and not Path(name).exists():
            from ._model import demo_model

            return str(demo_model(DEMO_MODEL_NAMES[name]))
        return check_model_argument(name) or name

    def _load_shard(self, path: str) -> tuple[Any, int]:
        """Join the group's ring and load this rank's shard; returns what ``load`` would, and the shared seed.

        Sampling must pick the same token on every rank, so rank 0 draws the
        random seed and shares it; the prompt cache is off (see ``parallel``).
        """
        from ._sharded import RankSync, check_group, join_group, load_sharded, shared_seed

        assert self.parallel is not None
        group = check_group(self.parallel, self.group)
        assert group is not None
        world = join_group(group)
        loaded = load_sharded(path, self.parallel, world)
        self.prompt_cache = PromptCache(0)
        self._sync = RankSync(group.rank, group.size)
        return loaded, shared_seed(group.rank)

    def teardown(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def _warm_up(self) -> None:
        from mlx_lm.sample_utils import make_sampler

        ids = self.encode(Generate(prompt=_WARMUP_PROMPT))
        # Greedy and sampled generation compile different kernels.
        for temperature in (0.0, 1.0):
            for _ in self.responses(ids, 2, make_sampler(temp=temperature)):
                pass

    def wait_warm(self) -> None:
        """Block until the batch warm-up is done (the decoding thread runs it once idle, after ``setup``)."""
        if self._engine is not None:
            self._engine.warm.wait()

    def piece(self, token_id: int) -> str:
        """One token decoded on its own, as the top alternatives of ``logprobs`` show it."""
        text = self._pieces.get(token_id)
        if text is None:
            text = self._pieces[token_id] = self.tokenizer.decode([token_id])
        return text

    def batch_step(self, generator: Any) -> Any:
        """``generator.next()``: one step of the batch, or of a request decoded alone.

        A seam for tests that need a slower model.
        """
        return generator.next()

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
        """``mlx_lm.stream_generate``'s responses; a seam for tests that need a slower model.

        The logits processors and the prompt cache state of the request being
        served on the single-stream path come from ``self.stream_options``.
        """
        import mlx_lm

        return mlx_lm.stream_generate(  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
            self.model,
            self.tokenizer,
            list(prompt),
            max_tokens=max_tokens,
            sampler=sampler,
            **self.stream_options,
        )

    def handle(self, request: Generate, ctx: TaskContext[Token]) -> Completion:
        began = time.perf_counter()
        if not isinstance(request, Generate):  # pyright: ignore[reportUnnecessaryIsInstance]
            kind = type(request).__name__
            raise TypeError(f"MlxLmRunner serves trio_runner.mlx.Generate requests, not {kind}")
        if self._sync is not None and not self._sync.agreed(ctx):
            return self._sync.serve(ctx, lambda agreed: self.handle(request, agreed))
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
        vocab = self.vocab_size
        if request.logit_bias and vocab is not None:
            outside = sorted(key for key in request.logit_bias if key >= vocab)
            if outside:
                raise ValueError(
                    f"logit_bias token ids {outside[:5]} are outside the model's vocabulary of "
                    f"{vocab} tokens (ids 0 to {vocab - 1}): remove them"
                )
        if self._engine is not None:
            from ._batch import Job

            return self._engine.serve(Job(request, ctx, ids, max_tokens, began, self.piece))
        return self._handle_single(request, ctx, ids, max_tokens, began)

    def _handle_single(
        self, request: Generate, ctx: TaskContext[Token], ids: list[int], max_tokens: int, began: float
    ) -> Completion:
        """The single-stream path (``concurrency=1``): each choice in turn, with ``stream_generate``."""
        from mlx_lm.models.cache import make_prompt_cache

        from ._batch import make_processors, make_samplers

        samplers = make_samplers(request, self.vocab_size or sys.maxsize)
        processors = make_processors(request)
        eos: set[int] = set(self.tokenizer.eos_token_ids)
        choices: list[ChoiceText] = []
        first_at: float | None = None
        last: Any = None
        cached_tokens = 0
        # stream_generate shows the penalties only the tokens it is given: with a
        # cached prefix their window would miss its end, so penalised requests
        # process the whole prompt (the batch gives them the whole prompt anyway).
        penalised = bool(request.repetition_penalty or request.presence_penalty or request.frequency_penalty)
        for index, sampler in enumerate(samplers):
            state, cached = (None, 0) if penalised else self.prompt_cache.fetch(ids)
            if index == 0:
                cached_tokens = cached  # later choices find choice 0's own state: not the request's reuse
            if state is None:
                state = make_prompt_cache(self.model)
            choice = ChoiceText(index, request.stop, request.logprobs, self.piece)
            choices.append(choice)
            generated: list[int] = []
            self.stream_options = {"logits_processors": processors, "prompt_cache": state}
            try:
                for response in self.responses(ids[cached:], max_tokens, sampler):
                    ctx.raise_if_cancelled()
                    if first_at is None:
                        first_at = time.perf_counter()
                    last = response
                    text: str = response.text
                    token_id: int = response.token
                    generated.append(token_id)
                    if response.finish_reason == "stop" and token_id in eos:
                        choice.finish = "stop"
                        if not text:
                            break  # the end-of-sequence token itself adds no text
                    ready, cut = choice.push(text, token_id, response.logprobs)
                    ctx.emit_many(ready)
                    if cut:
                        break
            finally:
                self.stream_options = {}
            if not choice.ended:
                ctx.emit_many(choice.flush())
            self._keep_state(ids + generated, state)
        done = [choice.choice() for choice in choices]
        return Completion(
            text=done[0].text,
            finish_reason=done[0].finish_reason,
            prompt_tokens=len(ids),
            generation_tokens=done[0].generation_tokens,
            prompt_tps=0.0 if last is None else float(last.prompt_tps),
            generation_tps=0.0 if last is None else float(last.generation_tps),
            time_to_first_token=(time.perf_counter() if first_at is None else first_at) - began,
            cached_tokens=cached_tokens,
            choices=tuple(done),
        )

    def _keep_state(self, tokens: list[int], state: list[Any]) -> None:
        """Leave a finished generation's KV state in the prompt cache, under the tokens it holds."""
        held = getattr(state[0], "offset", None) if state else None
        if isinstance(held, int) and 0 < held <= len(tokens):
            self.prompt_cache.insert(tokens[:held], state)
