"""The MLX runner's prompt cache as a unit: lookup, trimming, the byte budget and LRU eviction.

Collaboration tests with fake KV states (a token count and a size per
layer): the cache uses a state only through ``nbytes``, ``is_trimmable()``
and ``trim(n)``, and the test process never evaluates MLX. That a reused
state gives the same text as a fresh one is checked on real runners in
``test_mlx_batch.py``.
"""

from __future__ import annotations

from trio_runner.mlx._prompt_cache import PromptCache, common_prefix


class FakeLayer:
    def __init__(self, tokens: int, trimmable: bool = True) -> None:
        self.tokens = tokens
        self.trimmable = trimmable

    @property
    def nbytes(self) -> int:
        return 10 * self.tokens

    def is_trimmable(self) -> bool:
        return self.trimmable

    def trim(self, n: int) -> int:
        self.tokens -= n
        return n


def state(tokens: int, trimmable: bool = True) -> list[FakeLayer]:
    return [FakeLayer(tokens, trimmable), FakeLayer(tokens, trimmable)]


def test_common_prefix_counts_the_shared_leading_tokens_across_chunk_boundaries() -> None:
    a = list(range(200))
    assert common_prefix(a, a) == 200
    assert common_prefix(a, [*a[:130], -1, *a[131:]]) == 130
    assert common_prefix(a, a[:7]) == 7
    assert common_prefix([], a) == 0


def test_a_shared_prefix_comes_back_as_a_private_copy_trimmed_to_it() -> None:
    cache = PromptCache(max_bytes=10_000)
    stored = state(10)
    cache.insert(list(range(10)), stored)
    copy, cached = cache.fetch([0, 1, 2, 3, 4, 5, 99, 100])
    assert cached == 6
    assert copy is not None and [layer.tokens for layer in copy] == [6, 6]
    assert [layer.tokens for layer in stored] == [10, 10]  # the stored state is untouched


def test_at_least_the_last_prompt_token_is_left_to_process() -> None:
    cache = PromptCache(max_bytes=10_000)
    cache.insert([1, 2, 3], state(3))
    copy, cached = cache.fetch([1, 2, 3])
    assert cached == 2 and copy is not None and copy[0].tokens == 2


def test_nothing_shared_or_an_untrimmable_longer_state_is_a_miss() -> None:
    cache = PromptCache(max_bytes=10_000)
    cache.insert([1, 2, 3, 4], state(4, trimmable=False))
    assert cache.fetch([9, 9]) == (None, 0)
    assert cache.fetch([1, 2, 7]) == (None, 0)  # would need trimming
    copy, cached = cache.fetch([1, 2, 3, 4, 5])  # the whole entry is a prefix: no trim needed
    assert cached == 4 and copy is not None


def test_the_byte_budget_evicts_the_least_recently_used_first() -> None:
    cache = PromptCache(max_bytes=2 * 2 * 10 * 5)  # room for two 5-token states
    cache.insert([1] * 5, state(5))
    cache.insert([2] * 5, state(5))
    assert cache.fetch([1] * 5 + [0])[1] == 5  # touch the first: the second is now least recent
    cache.insert([3] * 5, state(5))
    assert len(cache) == 2 and cache.nbytes <= cache.max_bytes
    assert cache.fetch([2] * 5 + [0]) == (None, 0)
    assert cache.fetch([1] * 5 + [0])[1] == 5
    assert cache.fetch([3] * 5 + [0])[1] == 5


def test_a_state_larger_than_the_budget_or_a_zero_budget_keeps_nothing() -> None:
    small = PromptCache(max_bytes=50)
    small.insert([1] * 5, state(5))
    off = PromptCache(max_bytes=0)
    off.insert([1], state(1))
    assert len(small) == len(off) == 0 and small.nbytes == off.nbytes == 0


def test_a_longer_trimmable_state_replaces_the_entries_it_extends() -> None:
    cache = PromptCache(max_bytes=10_000)
    cache.insert([1, 2], state(2))
    cache.insert([1, 2, 3, 4], state(4))
    cache.insert([1, 2, 3, 4], state(4))  # the same tokens again: replaced, not counted twice
    assert len(cache) == 1 and cache.nbytes == 2 * 10 * 4
