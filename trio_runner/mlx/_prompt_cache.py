"""The runner's prompt cache: KV states of earlier token sequences, reused for a shared prefix.

A request whose prompt begins like an earlier sequence (a repeated system
prompt, the previous turns of a chat) starts from a copy of that sequence's
KV state, cut back to the common prefix, and processes only the rest. The
entries are bounded by a byte budget and evicted least recently used first.
Only the thread that decodes touches it, so it takes no lock.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

DEFAULT_PROMPT_CACHE_BYTES = 512 * 1024 * 1024
"""The default byte budget of :class:`PromptCache` (512 MiB)."""
MAX_ENTRIES = 64
"""At most this many sequences are kept, whatever their size: each lookup scans them all."""
_CHUNK = 64


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    limit = min(len(a), len(b))
    done = 0
    # Compare whole chunks first: a slice comparison runs in C.
    while done + _CHUNK <= limit and a[done : done + _CHUNK] == b[done : done + _CHUNK]:
        done += _CHUNK
    while done < limit and a[done] == b[done]:
        done += 1
    return done


class PromptCache:
    """Least-recently-used KV states keyed by the tokens they hold, within ``max_bytes``.

    Args:
        max_bytes: the budget for the stored KV states (their ``nbytes``); 0
            disables the cache. A state larger than the budget is not kept.
    """

    def __init__(self, max_bytes: int = DEFAULT_PROMPT_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[tuple[int, ...], tuple[list[Any], int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def fetch(self, tokens: Sequence[int]) -> tuple[list[Any] | None, int]:
        """A private copy of the KV state of the longest cached prefix of ``tokens``, and its length.

        At least the last token is always left to process (the model must see
        it to give the first new token). ``(None, 0)`` when nothing useful is cached.
        """
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        best_key: tuple[int, ...] | None = None
        best = 0
        for key in self._entries:
            shared = min(common_prefix(key, tokens), len(tokens) - 1)
            if shared > best and (shared == len(key) or can_trim_prompt_cache(self._entries[key][0])):
                best_key, best = key, shared
        if best_key is None:
            return None, 0
        self._entries.move_to_end(best_key)
        state = copy.deepcopy(self._entries[best_key][0])
        if len(best_key) > best:
            trim_prompt_cache(state, len(best_key) - best)
        return state, best

    def insert(self, tokens: Sequence[int], state: list[Any]) -> None:
        """Keep ``state``, the KV state of exactly ``tokens``; evict the least recently used to fit."""
        from mlx_lm.models.cache import can_trim_prompt_cache

        size = sum(int(c.nbytes) for c in state)
        key = tuple(tokens)
        if not key or size > self.max_bytes:
            return
        self._drop(key)
        if can_trim_prompt_cache(state):
            # A trimmable state serves every prefix of its tokens: shorter entries are redundant.
            for other in [k for k in self._entries if len(k) < len(key) and key[: len(k)] == k]:
                self._drop(other)
        self._entries[key] = (state, size)
        self.nbytes += size
        while self.nbytes > self.max_bytes or len(self._entries) > MAX_ENTRIES:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: tuple[int, ...]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.nbytes -= entry[1]
