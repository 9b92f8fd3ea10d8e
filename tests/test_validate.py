"""The shared argument checks (``trio_runner._validate``), and both sides raising alike through them.

The rule every check follows: the wrong type raises TypeError, the wrong value
ValueError, and the message names the argument and says what to pass. The
unit tests start no process; the last ones check that the child, which
checks the runner instance, raises what the parent raises for its class.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from collections.abc import Callable

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from trio_runner import RunnerCrashed, open_supervisor
from trio_runner import _validate as check
from trio_runner._errors import ExitReason

from .runners import BadConcurrencyRunner, EchoRunner


@pytest.mark.parametrize("value", [1.0, "3", None, True, False])
def test_integer_of_the_wrong_type_raises_type_error_naming_the_argument(value: object) -> None:
    with pytest.raises(TypeError, match=r"^window=.* must be an int, not"):
        check.integer("window", value, minimum=2)


@pytest.mark.parametrize("value", [1, 0, -5])
def test_integer_below_its_minimum_raises_value_error_saying_the_minimum(value: int) -> None:
    with pytest.raises(ValueError, match=rf"^window={value} must be an int >= 2"):
        check.integer("window", value, minimum=2)


def test_integer_in_range_is_returned() -> None:
    assert check.integer("window", 2, minimum=2) == 2


@pytest.mark.parametrize("value", [0, 17])
def test_integer_outside_both_bounds_raises_value_error_saying_the_range(value: int) -> None:
    assert check.integer("n", 16, minimum=1, maximum=16) == 16
    with pytest.raises(ValueError, match=rf"^n={value} must be an int from 1 to 16; send more requests$"):
        check.integer("n", value, minimum=1, maximum=16, fix="send more requests")


@pytest.mark.parametrize("value", ["1", None, True, [1.0]])
def test_number_of_the_wrong_type_raises_type_error(value: object) -> None:
    with pytest.raises(TypeError, match=r"^Timeouts\.kill=.* must be a number of seconds, not"):
        check.seconds("Timeouts.kill", value)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_number_that_is_not_finite_raises_value_error(value: float) -> None:
    with pytest.raises(ValueError, match=r"^Timeouts\.kill=.* must be finite: pass a number of seconds"):
        check.seconds("Timeouts.kill", value)


def test_seconds_above_zero_refuses_zero_and_allows_a_tiny_positive() -> None:
    with pytest.raises(ValueError, match=r"is out of range: pass a number of seconds > 0"):
        check.seconds("Timeouts.kill", 0, above_zero=True)
    assert check.seconds("Timeouts.kill", 1e-9, above_zero=True) == 1e-9


def test_seconds_allows_zero_by_default_and_bounds_the_maximum() -> None:
    assert check.seconds("linger", 0) == 0
    assert check.seconds("linger", 1, maximum=1) == 1
    with pytest.raises(
        ValueError, match=r"^linger=1\.5 is out of range: pass a number of seconds from 0 to 1$"
    ):
        check.seconds("linger", 1.5, maximum=1)


def test_number_with_no_lower_bound_takes_any_finite_value_and_still_refuses_nan() -> None:
    assert check.number("bias", -1e300, minimum=None) == -1e300
    with pytest.raises(ValueError, match=r"^bias=nan must be finite: pass a number$"):
        check.number("bias", math.nan, minimum=None)
    with pytest.raises(ValueError, match=r"^bias=3 is out of range: pass a number <= 2$"):
        check.number("bias", 3, minimum=None, maximum=2)


def test_optional_seconds_passes_none_through() -> None:
    assert check.optional_seconds("Timeouts.stall", None) is None
    with pytest.raises(ValueError, match="stall"):
        check.optional_seconds("Timeouts.stall", -1.0)


def test_one_of_refuses_an_unknown_choice_with_value_error_and_a_non_string_with_type_error() -> None:
    assert check.one_of("mode", "b", ("a", "b")) == "b"
    with pytest.raises(ValueError, match=r"^mode='c' must be one of 'a', 'b'"):
        check.one_of("mode", "c", ("a", "b"))
    with pytest.raises(TypeError, match=r"^mode=1 must be one of 'a', 'b', not int"):
        check.one_of("mode", 1, ("a", "b"))


def test_instance_of_says_which_class_to_pass() -> None:
    from trio_runner import Timeouts

    with pytest.raises(TypeError, match=r"^timeouts must be a trio_runner\.Timeouts, not dict"):
        check.instance_of("timeouts", {"startup": 1}, Timeouts)


def test_text_refuses_an_empty_string_with_value_error_and_a_non_string_with_type_error() -> None:
    assert check.text("name", "x") == "x"
    with pytest.raises(ValueError, match=r"^name=.. must be a non-empty string"):
        check.text("name", "")
    with pytest.raises(TypeError, match=r"^name=3 must be a string"):
        check.text("name", 3)


def test_text_may_allow_the_empty_string_but_still_refuses_a_non_string() -> None:
    assert check.text("prompt", "", empty=True) == ""
    with pytest.raises(TypeError, match=r"^prompt=b'' must be a string, not bytes"):
        check.text("prompt", b"", empty=True)


def test_names_takes_any_sequence_of_strings_but_not_a_single_string() -> None:
    assert check.names("preload", ["json", "math"]) == ("json", "math")
    with pytest.raises(TypeError, match=r"^preload='json' must be a sequence of strings"):
        check.names("preload", "json")
    with pytest.raises(TypeError, match=r"^preload\[1\]=3 must be a string"):
        check.names("preload", ["json", 3])
    with pytest.raises(TypeError, match=r"for example stop=\['END'\]$"):
        check.names("stop", 5, example="['END']")


@pytest.mark.parametrize("value", [math.nan, 65536.0, True, "65536", None])
def test_frame_size_must_be_an_int(value: object) -> None:
    with pytest.raises(TypeError, match=r"^max_frame_size=.* must be an int number of bytes"):
        check.frame_size(value, minimum=65536, maximum=2**32 - 1, default=2**26)


@pytest.mark.parametrize("value", [65535, 2**32])
def test_frame_size_must_be_within_its_bounds(value: int) -> None:
    with pytest.raises(ValueError, match=r"must be between 65536 bytes .* and 4294967295"):
        check.frame_size(value, minimum=65536, maximum=2**32 - 1, default=2**26)


ANYTHING = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=5),
    st.lists(st.one_of(st.text(max_size=3), st.integers()), max_size=3),
)


@given(ANYTHING)
def test_each_check_passes_a_value_through_or_raises_type_or_value_error_naming_it(
    value: object,
) -> None:
    checks: list[Callable[[object], object]] = [
        lambda v: check.integer("arg", v, minimum=1),
        lambda v: check.integer("arg", v, minimum=-2, maximum=2),
        lambda v: check.number("arg", v, minimum=-1, maximum=1),
        lambda v: check.number("arg", v, minimum=None),
        lambda v: check.seconds("arg", v, above_zero=True),
        lambda v: check.optional_seconds("arg", v),
        lambda v: check.one_of("arg", v, ("a", "b")),
        lambda v: check.boolean("arg", v),
        lambda v: check.text("arg", v),
        lambda v: check.text("arg", v, empty=True),
        lambda v: check.frame_size(v, minimum=65536, maximum=2**32 - 1, default=2**26),
    ]
    for run in checks:
        try:
            result = run(value)
        except (TypeError, ValueError) as exc:
            assert re.match(r"^(arg|max_frame_size)=", str(exc)), str(exc)
        else:
            assert result is value


def test_the_validators_module_does_not_import_trio() -> None:
    # The child imports it on every spawn; trio would add ~130 ms to each.
    code = "import sys, trio_runner._validate; sys.exit('trio' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# -- both sides raise alike ----------------------------------------------------------


class ConcurrencySetInInitRunner(EchoRunner):
    """Passes the parent's check of the class; the child checks the instance."""

    def __init__(self) -> None:
        self.concurrency = 0


def test_the_parent_refuses_a_zero_concurrency_with_value_error() -> None:
    with pytest.raises(ValueError, match=r"BadConcurrencyRunner\.concurrency=0 must be an int"):
        open_supervisor(BadConcurrencyRunner)


async def test_the_child_refuses_a_zero_concurrency_with_the_same_value_error_as_the_parent() -> None:
    with trio.fail_after(60), pytest.raises(RunnerCrashed) as info:
        async with open_supervisor(ConcurrencySetInInitRunner):
            await trio.sleep_forever()  # a runner that can never start cancels the body
    assert info.value.reason is ExitReason.STARTUP_FAILED
    assert "ValueError: " in (info.value.remote_traceback or "")
    assert "ConcurrencySetInInitRunner.concurrency=0 must be an int" in (info.value.remote_traceback or "")
