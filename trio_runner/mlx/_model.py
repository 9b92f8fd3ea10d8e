"""The offline demo model: a tiny random-weight Llama with a byte-level BPE tokenizer, built once and cached.

The build writes into a temporary directory beside the cache and renames it
into place, and a manifest of file hashes is its last file: a directory
without a matching manifest is partial or corrupt, and is rebuilt. Two
processes building at once both succeed; one rename wins and the other
process uses the winner's copy.

Building imports mlx and mlx-lm (about 1.2 s) and evaluates MLX. Do not call
:func:`demo_model` on a trio thread, nor in a process that will later fork:
from trio, run it with ``trio_parallel.run_sync(demo_model, kill_on_cancel=True)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Generator
from pathlib import Path
from typing import Any

logger = logging.getLogger("trio_runner.mlx")

#: Environment variable naming the directory of the demo model (built there if missing).
DEMO_MODEL_ENV = "TRIO_RUNNER_DEMO_MODEL"
_RECIPE = 1
_DIR_NAME = f"demo-model-v{_RECIPE}"
_MANIFEST = "trio-runner-demo.json"
VOCAB_SIZE = 512
CONTEXT_LENGTH = 2048
_SPECIAL_TOKENS = ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# Text that ships with every Python: docstrings and comments of a few stdlib modules.
_CORPUS_MODULES = ("textwrap", "argparse", "difflib", "calendar", "fractions", "string", "shlex")
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


def demo_model_location() -> Path:
    """Where :func:`demo_model` keeps the model: ``$TRIO_RUNNER_DEMO_MODEL``, or the user cache dir.

    The default is ``~/.cache/trio-runner/demo-model-v1`` on Linux (honouring
    ``XDG_CACHE_HOME``) and ``~/Library/Caches/trio-runner/demo-model-v1`` on
    macOS. Nothing is built or checked.
    """
    override = os.environ.get(DEMO_MODEL_ENV)
    if override:
        return Path(override).expanduser().absolute()
    return _cache_root() / _DIR_NAME


def demo_model() -> Path:
    """The directory of the offline demo model, built on first use. Returns at once when cached.

    The model is a 2-layer Llama with hidden size 64 and random weights, and a
    512-token byte-level BPE tokenizer trained on text that ships with Python,
    with a chat template. It is about 460 KB, needs no network, and
    ``mlx_lm.load`` loads it in about 16 ms. It generates gibberish, fast.

    A partial or corrupt cache is detected (a manifest of file hashes is written
    last) and rebuilt, with a warning on the ``trio_runner.mlx`` logger.

    **Blocking:** the first call takes one to two seconds, mostly ``import
    mlx_lm``. From trio, use ``await trio_parallel.run_sync(demo_model,
    kill_on_cancel=True)``.

    Raises:
        OSError: the location cannot be written.
    """
    target = demo_model_location()
    problem = verify_demo_model(target)
    if problem is None:
        return target
    if target.exists():
        logger.warning("the demo model at %s is unusable (%s); rebuilding it", target, problem)
        _move_aside(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        _build(staging)
        try:
            os.rename(staging, target)
        except OSError:
            # Another process renamed its build into place first; use theirs if it is sound.
            if verify_demo_model(target) is not None:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def verify_demo_model(path: Path) -> str | None:
    """None if ``path`` holds a complete demo model, else what is wrong with it."""
    try:
        manifest = json.loads((path / _MANIFEST).read_text())
        files: dict[str, str] = manifest["files"]
        if manifest.get("recipe") != _RECIPE or not files:
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


def _corpus() -> list[str]:
    texts: list[str] = []
    for name in _CORPUS_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            with contextlib.suppress(OSError):
                texts.append(Path(spec.origin).read_text(encoding="utf-8"))
    if not texts:
        raise RuntimeError("no standard-library source found to train the demo tokenizer on")
    return texts


def _build(out: Path) -> None:
    """Write the demo model into the empty directory ``out``; the manifest goes last."""
    with _hub_offline():
        _build_tokenizer(out)
        _build_weights(out)
    files = {p.name: _sha256(p) for p in sorted(out.iterdir()) if p.is_file()}
    manifest = {"recipe": _RECIPE, "files": files}
    (out / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    # The directory's mode comes from mkdtemp (0700); give it the usual one.
    os.chmod(out, 0o755)


def _build_tokenizer(out: Path) -> None:
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
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
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


def _build_weights(out: Path) -> None:
    import mlx.core as mx
    from mlx_lm.models import llama
    from mlx_lm.utils import save_config, save_model  # pyright: ignore[reportUnknownVariableType]

    mx.random.seed(0)  # the same weights on every machine
    model = llama.Model(llama.ModelArgs.from_dict(dict(_MODEL_CONFIG)))  # pyright: ignore[reportUnknownMemberType]
    save_model(out, model)  # pyright: ignore[reportUnknownArgumentType]
    save_config(dict(_MODEL_CONFIG), out / "config.json")
