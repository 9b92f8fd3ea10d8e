"""Unwrapping the ExceptionGroup level that our own nurseries add."""

from __future__ import annotations

from typing import NoReturn


def reraise_unwrapped(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    """Strip the one level of ExceptionGroup our own nursery added, if it holds one exception.

    Only that level: a group the caller's body raised itself comes out unchanged.
    """
    if len(group.exceptions) != 1:
        raise group
    single = group.exceptions[0]
    context = single.__context__
    try:
        raise single
    finally:
        # Raising inside ``except`` would chain the group as context; keep the original.
        single.__context__ = context
