"""The offline demo models: a tiny Llama trained for seconds on the Zen of Python, and its Qwen2 twin.

Its tokenizer and weights are both trained on the Zen of Python, as the
standard library's ``this`` module keeps it, so greedy generation streams
real words, token by token, on every machine. Training is seeded and runs on
MLX's CPU device, so every build gives the same weights.

The build writes into a temporary directory beside the cache and renames it
into place, and a manifest of file hashes is its last file: a directory
without a matching manifest is partial or corrupt, and is rebuilt. Two
processes building at once both succeed; one rename wins and the other
process uses the winner's copy.

The Qwen2 twin (``demo_model("qwen2")``) holds the Llama's trained weights
in Qwen2's architecture, which mlx-lm can split into pipeline stages
(``model.model.pipeline``): it is built from the Llama in seconds, and
generates the same text.

Building imports mlx and mlx-lm (about 1.2 s) and evaluates MLX. Do not call
:func:`demo_model` on a trio thread, nor in a process that will later fork:
from trio, run it with ``trio_parallel.run_sync(demo_model, kill_on_cancel=True)``.
"""

from __future__ import annotations

import ast
import codecs
import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

logger = logging.getLogger("trio_runner.mlx")

#: Environment variable naming the directory of the demo model (built there if missing).
DEMO_MODEL_ENV = "TRIO_RUNNER_DEMO_MODEL"
#: Environment variable naming the directory of the Qwen2 demo model (built there if missing).
DEMO_QWEN2_MODEL_ENV = "TRIO_RUNNER_DEMO_QWEN2_MODEL"
# Recipe 1 was an untrained model; a cache of another recipe is rebuilt.
_RECIPE = 2
# The Qwen2 twin is converted from the Llama: a new Llama recipe is a new twin.
_QWEN2_RECIPE = f"qwen2-1-from-llama-{_RECIPE}"
#: The demo models' architectures, each with its model name (``--model demo-qwen2``).
DEMO_MODEL_NAMES = {"demo": "llama", "demo-qwen2": "qwen2"}
_ARCHITECTURES = {
    "llama": (DEMO_MODEL_ENV, f"demo-model-v{_RECIPE}", _RECIPE),
    "qwen2": (DEMO_QWEN2_MODEL_ENV, "demo-qwen2-v1", _QWEN2_RECIPE),
}
_MANIFEST = "trio-runner-demo.json"
VOCAB_SIZE = 512
CONTEXT_LENGTH = 2048
_SPECIAL_TOKENS = ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# Training: enough seeded Adam steps on short windows for greedy text to be
# mostly the Zen's own words (the tests check 60%), in seconds on two CPU cores.
_TRAINING_STEPS = 300
_BATCH = 4
_WINDOW = 32
_LEARNING_RATE = 3e-3
# Some probability left on every token, so sampled generations still differ by seed.
_LABEL_SMOOTHING = 0.1
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_MODEL_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": CONTEXT_LENGTH,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "eos_token_id": 0,  # <|endoftext|>, the first special token
}


def _cache_root() -> Path:
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "trio-runner"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "trio-runner"


def _architecture(architecture: str) -> tuple[str, str, int | str]:
    try:
        return _ARCHITECTURES[architecture]
    except (KeyError, TypeError):
        raise ValueError(f"architecture={architecture!r} must be 'llama' or 'qwen2'") from None


def demo_model_location(architecture: str = "llama") -> Path:
    """Where :func:`demo_model` keeps the model: ``$TRIO_RUNNER_DEMO_MODEL``, or the user cache dir.

    The default is ``~/.cache/trio-runner/demo-model-v2`` on Linux (honouring
    ``XDG_CACHE_HOME``) and ``~/Library/Caches/trio-runner/demo-model-v2`` on
    macOS. The Qwen2 twin (``architecture="qwen2"``) lives in ``demo-qwen2-v1``
    beside it, or at ``$TRIO_RUNNER_DEMO_QWEN2_MODEL``. Nothing is built or checked.
    """
    env, name, _ = _architecture(architecture)
    override = os.environ.get(env)
    if override:
        return Path(override).expanduser().absolute()
    return _cache_root() / name


def demo_model(architecture: str = "llama") -> Path:
    """The directory of the offline demo model, built on first use. Returns at once when cached.

    The model is a 2-layer Llama with hidden size 64 and a 512-token
    byte-level BPE tokenizer with a chat template, both trained on the Zen of
    Python (which ships with Python as the ``this`` module), so it writes
    Zen-like text, fast. It is about 460 KB, needs no network, and
    ``mlx_lm.load`` loads it in about 16 ms. Each build stage is logged at
    INFO on the ``trio_runner.mlx`` logger.

    A partial or corrupt cache is detected (a manifest of file hashes is written
    last) and rebuilt, with a warning on the ``trio_runner.mlx`` logger.

    ``architecture="qwen2"`` is the same model, weights and tokenizer, in
    mlx-lm's Qwen2 architecture (zero biases on the attention projections
    make it compute exactly what the Llama computes): Qwen2 models can be
    split into pipeline stages (``MlxLmRunner(parallel="pipeline")``), Llama
    models only sharded by tensor. It is built from the Llama (built first if
    needed) in about 3 s, mostly ``import mlx_lm``.

    **Blocking:** the first call takes 11-13 s of CPU time, mostly training,
    plus ``import mlx_lm``. From trio, use ``await trio_parallel.run_sync(demo_model,
    kill_on_cancel=True)``.

    Args:
        architecture: ``"llama"`` (the default) or ``"qwen2"``.

    Raises:
        OSError: the location cannot be written.
        ValueError: another architecture.
    """
    target = demo_model_location(architecture)
    problem = verify_demo_model(target, architecture)
    if problem is None:
        return target
    if target.exists():
        logger.warning("the demo model at %s is unusable (%s); rebuilding it", target, problem)
        _move_aside(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        if architecture == "qwen2":
            _build_qwen2(staging)
        else:
            _build(staging)
        try:
            os.rename(staging, target)
        except OSError:
            # Another process renamed its build into place first; use theirs if it is sound.
            if verify_demo_model(target, architecture) is not None:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def verify_demo_model(path: Path, architecture: str = "llama") -> str | None:
    """None if ``path`` holds a complete demo model of ``architecture``, else what is wrong with it."""
    recipe = _architecture(architecture)[2]
    try:
        manifest = json.loads((path / _MANIFEST).read_text())
        files: dict[str, str] = manifest["files"]
        if manifest.get("recipe") != recipe or not files:
            return "it was built by another version of trio-runner"
        for name, digest in files.items():
            if _sha256(path / name) != digest:
                return f"{name} does not match its recorded hash"
    except FileNotFoundError as exc:
        return f"{Path(exc.filename or '?').name} is missing"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"its manifest is unreadable ({type(exc).__name__}: {exc})"
    return None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _move_aside(target: Path) -> None:
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.corrupt-", dir=target.parent))
    with contextlib.suppress(FileNotFoundError):  # another process moved it first
        os.replace(target, aside / "model")
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def _hub_offline() -> Generator[None]:
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved


def training_text() -> str:
    """The text the demo model learns: the Zen of Python, twice, so it also learns to go round.

    Read from the source of the ``this`` module (ROT13 there), which is not
    imported: importing it prints the Zen.
    """
    spec = importlib.util.find_spec("this")
    if spec is None or not spec.origin:
        raise RuntimeError("the standard library's 'this' module, the demo model's training text, is missing")
    for node in ast.parse(Path(spec.origin).read_text(encoding="utf-8")).body:
        match node:
            case ast.Assign(targets=[ast.Name(id="s")], value=ast.Constant(value=str(encoded))):
                zen = codecs.decode(encoded, "rot13").strip()
                return f"{zen}\n\n{zen}\n\n"
            case _:
                pass
    raise RuntimeError(f"the Zen of Python was not found in {spec.origin}")


def _build(out: Path) -> None:
    """Write the demo model into the empty directory ``out``; the manifest goes last."""
    with _hub_offline():
        text = training_text()
        began = time.monotonic()
        ids = _build_tokenizer(out, text)
        logger.info(
            "demo model: tokenizer trained on the Zen of Python (%d tokens) in %.1f s",
            len(ids),
            time.monotonic() - began,
        )
        _build_weights(out, ids)
    _seal(out, _RECIPE)


def _seal(out: Path, recipe: int | str) -> None:
    """Write the manifest of ``out``'s files, last: a directory without it is incomplete."""
    files = {p.name: _sha256(p) for p in sorted(out.iterdir()) if p.is_file()}
    manifest = {"recipe": recipe, "files": files}
    (out / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    # The directory's mode comes from mkdtemp (0700); give it the usual one.
    os.chmod(out, 0o755)


def _build_qwen2(out: Path) -> None:
    """Write the Qwen2 twin of the Llama demo model into the empty directory ``out``.

    Qwen2's attention projections have biases where Llama's have none; with
    zero biases and the same rope settings, the two compute the same function.
    The byte-level BPE tokenizer is copied as it is: transformers 5 loads it as
    a ``Qwen2Tokenizer``, which round-trips any text (a WordLevel tokenizer
    would encode everything to no tokens at all).
    """
    source = demo_model()
    with _hub_offline():
        import mlx.core as mx
        from mlx_lm.models import qwen2
        from mlx_lm.utils import save_config, save_model  # pyright: ignore[reportUnknownVariableType]

        began = time.monotonic()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(source / name, out / name)
        config = {**_MODEL_CONFIG, "model_type": "qwen2"}
        saved: Any = mx.load(str(source / "model.safetensors"))
        weights: dict[str, Any] = dict(saved)
        for key, value in list(weights.items()):
            if key.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
                weights[key.removesuffix("weight") + "bias"] = mx.zeros((value.shape[0],), dtype=value.dtype)
        with mx.stream(mx.cpu):
            model = qwen2.Model(qwen2.ModelArgs.from_dict(dict(config)))  # pyright: ignore[reportUnknownMemberType]
            model.load_weights(list(weights.items()), strict=True)  # pyright: ignore[reportUnknownMemberType]
        save_model(out, model)  # pyright: ignore[reportUnknownArgumentType]
        save_config(config, out / "config.json")
        logger.info("demo model: Qwen2 twin of %s built in %.1f s", source, time.monotonic() - began)
    _seal(out, _QWEN2_RECIPE)


def _build_tokenizer(out: Path, text: str) -> list[int]:
    """Train and save the tokenizer; returns ``text`` as token ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # pyright: ignore[reportAttributeAccessIssue]
    tokenizer.decoder = decoders.ByteLevel()  # pyright: ignore[reportAttributeAccessIssue]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([text], trainer=trainer)
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": _SPECIAL_TOKENS[0],
        "pad_token": _SPECIAL_TOKENS[0],
        "model_max_length": CONTEXT_LENGTH,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    ids: list[int] = tokenizer.encode(text).ids
    return ids


def _build_weights(out: Path, ids: list[int]) -> None:
    """Train the model on ``ids`` (next-token prediction, seeded, on the CPU) and save it."""
    import mlx.core as mx
    import mlx.nn as nn  # pyright: ignore[reportMissingTypeStubs]
    import mlx.optimizers as optim  # pyright: ignore[reportMissingTypeStubs]
    from mlx_lm.models import llama
    from mlx_lm.utils import save_config, save_model  # pyright: ignore[reportUnknownVariableType]

    began = time.monotonic()
    # The CPU on every machine (Metal too on macOS), and one seed: the same weights everywhere.
    with mx.stream(mx.cpu):
        mx.random.seed(0)
        model = llama.Model(llama.ModelArgs.from_dict(dict(_MODEL_CONFIG)))  # pyright: ignore[reportUnknownMemberType]

        def loss_of(model: llama.Model, inputs: mx.array, targets: mx.array) -> mx.array:
            return nn.losses.cross_entropy(
                model(inputs), targets, label_smoothing=_LABEL_SMOOTHING, reduction="mean"
            )

        loss_and_grad: Any = nn.value_and_grad(model, loss_of)  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
        optimizer: Any = optim.Adam(learning_rate=_LEARNING_RATE)
        data = mx.array(ids)
        window = mx.arange(_WINDOW + 1)[None, :]
        loss: Any = None
        for _ in range(_TRAINING_STEPS):
            starts = mx.random.randint(0, len(ids) - _WINDOW - 1, (_BATCH, 1))
            batch = data[starts + window]
            loss, grads = loss_and_grad(model, batch[:, :-1], batch[:, 1:])
            optimizer.update(model, grads)
            mx.eval(model.parameters(), optimizer.state, loss)  # pyright: ignore[reportUnknownMemberType]
        final_loss = float(loss.item())
    logger.info(
        "demo model: trained for %d steps (loss %.2f) in %.1f s",
        _TRAINING_STEPS,
        final_loss,
        time.monotonic() - began,
    )
    save_model(out, model)  # pyright: ignore[reportUnknownArgumentType]
    save_config(dict(_MODEL_CONFIG), out / "config.json")


def demo_model_with_progress(architecture: str = "llama") -> Path:
    """:func:`demo_model`, writing each build stage as a line on stderr.

    For a throwaway worker process (see ``prepare_demo_model(progress=True)``):
    it attaches a stderr handler to the ``trio_runner.mlx`` logger.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("trio-runner: %(message)s"))
    saved = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        return demo_model(architecture)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)
