"""The argument checks every option, timeout and policy goes through: one wording, one rule.

The rule (DESIGN.md): the wrong type raises ``TypeError``, the wrong value
``ValueError``; the message is lowercase, names the argument as the caller
wrote it (``window``, ``Timeouts.startup``, ``MyRunner.concurrency``) and says
what to pass instead. Both sides use these, so the parent and the child agree
on the error type of the same bad value.

No trio here, nothing heavy: the child imports this module on every spawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def _and(fix: str) -> str:
    return f"; {fix}" if fix else ""


def integer(
    name: str,
    value: object,
    *,
    minimum: int,
    maximum: int | None = None,
    what: str = "an int",
    fix: str = "",
) -> int:
    """``value`` if it is an int (not a bool) from ``minimum`` to ``maximum``.

    Args:
        name: the argument as the caller spells it, e.g. ``"window"``.
        maximum: the largest value allowed, or None for no upper bound.
        what: what the argument is, e.g. ``"an int (events in flight per task)"``.
        fix: a hint appended to the message, e.g. ``"for example window=8192"``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r} must be {what}, not {type(value).__name__}{_and(fix)}")
    if maximum is not None and not minimum <= value <= maximum:
        raise ValueError(f"{name}={value!r} must be {what} from {minimum} to {maximum}{_and(fix)}")
    if value < minimum:
        raise ValueError(f"{name}={value!r} must be {what} >= {minimum}{_and(fix)}")
    return value


def number(
    name: str,
    value: object,
    *,
    minimum: float | None = 0.0,
    above: bool = False,
    maximum: float | None = None,
    what: str = "a number",
    fix: str = "",
) -> float:
    """``value`` if it is a finite real number (not a bool) within the bounds.

    Args:
        minimum: the least value allowed, or None for no lower bound; with
            ``above``, values must exceed it.
        maximum: the largest value allowed, or None for no upper bound.
        what: what the argument is, e.g. ``"a number of seconds"``.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name}={value!r} must be {what}, not {type(value).__name__}{_and(fix)}")
    too_low = minimum is not None and (value <= minimum if above else value < minimum)
    too_high = maximum is not None and value > maximum
    # NaN compares False with everything: it passes the bounds, so it is caught by name.
    finite = not (math.isnan(value) or math.isinf(value))
    if too_low or too_high or not finite:
        problem = "is out of range" if finite else "must be finite"
        raise ValueError(
            f"{name}={value!r} {problem}: pass {what}{_bounds(minimum, above, maximum)}{_and(fix)}"
        )
    return value


def _bounds(minimum: float | None, above: bool, maximum: float | None) -> str:
    """`` > 0``, `` from 0 to 1``, `` in (0, 1]``..., or nothing for a number with no bounds."""
    if minimum is None:
        return "" if maximum is None else f" <= {maximum:g}"
    if maximum is None:
        return f" > {minimum:g}" if above else f" >= {minimum:g}"
    return f" in ({minimum:g}, {maximum:g}]" if above else f" from {minimum:g} to {maximum:g}"


def seconds(name: str, value: object, *, above_zero: bool = False, maximum: float | None = None) -> float:
    """``value`` as a duration: a finite number of seconds, >= 0 (or > 0 with ``above_zero``)."""
    return number(name, value, above=above_zero, maximum=maximum, what="a number of seconds")


def optional_seconds(name: str, value: object, *, above_zero: bool = False) -> float | None:
    """:func:`seconds`, or None (which means "no such limit")."""
    return None if value is None else seconds(name, value, above_zero=above_zero)


def one_of(name: str, value: object, choices: Sequence[str], *, fix: str = "") -> str:
    """``value`` if it is one of the strings ``choices``."""
    listed = ", ".join(map(repr, choices))
    if not isinstance(value, str):
        raise TypeError(f"{name}={value!r} must be one of {listed}, not {type(value).__name__}{_and(fix)}")
    if value not in choices:
        raise ValueError(f"{name}={value!r} must be one of {listed}{_and(fix)}")
    return value


def instance_of(name: str, value: object, kind: type[T]) -> T:
    """``value`` if it is a ``kind`` (named as ``trio_runner.<Kind>`` in the message)."""
    if not isinstance(value, kind):
        raise TypeError(
            f"{name} must be a trio_runner.{kind.__name__}, not {type(value).__name__}; "
            f"pass {name}=trio_runner.{kind.__name__}(...)"
        )
    return value


def boolean(name: str, value: object) -> bool:
    """``value`` if it is True or False (not merely truthy)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r} must be True or False, not {type(value).__name__}")
    return value


def text(name: str, value: object, *, empty: bool = False) -> str:
    """``value`` if it is a string, and not an empty one unless ``empty``."""
    if not isinstance(value, str):
        raise TypeError(f"{name}={value!r} must be a string, not {type(value).__name__}")
    if not value and not empty:
        raise ValueError(f"{name}={value!r} must be a non-empty string")
    return value


def names(name: str, value: object, *, example: str = "['json']") -> tuple[str, ...]:
    """``value`` as a tuple of non-empty strings, from any sequence of them (but not from one string)."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(
            f"{name}={value!r} must be a sequence of strings, not {type(value).__name__}; "
            f"for example {name}={example}"
        )
    items: Sequence[object] = value  # pyright: ignore[reportUnknownVariableType]
    return tuple(text(f"{name}[{i}]", item) for i, item in enumerate(items))


def frame_size(value: object, *, minimum: int, maximum: int, default: int) -> int:
    """``value`` as a ``max_frame_size``: an int number of bytes within the frame format's bounds."""
    if isinstance(value, bool) or not isinstance(value, int):
        # A float would let NaN in, and NaN turns every size check off.
        raise TypeError(
            f"max_frame_size={value!r} must be an int number of bytes, not {type(value).__name__}; "
            f"for example max_frame_size={default} (the default, {default >> 20} MiB)"
        )
    if not minimum <= value <= maximum:
        raise ValueError(
            f"max_frame_size={value!r} must be between {minimum} bytes ({minimum >> 10} KiB: the "
            f"least in which a small result and an error report still fit) and {maximum} (the "
            "frame header's 32-bit limit)"
        )
    return value
