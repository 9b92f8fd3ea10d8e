"""How a supervisor is configured and made: its options (``trio_runner._options``) and its factory.

Each option has one default and is checked at the call.

No process starts here: a bad option raises at ``open_supervisor(...)``,
before the block is entered or anything is spawned.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from trio_runner import RestartPolicy, Timeouts, open_supervisor, run_supervisor
from trio_runner._options import DEFAULT, ForwardedOptions, Options, SupervisorOptions

from .runners import EchoRunner

API_DOC = Path(__file__).parent.parent / "docs" / "api.md"


def test_no_options_means_the_defaults() -> None:
    assert Options.from_keywords("open_supervisor", {}) == DEFAULT


def test_policy_and_timeouts_of_none_mean_the_defaults() -> None:
    options = Options.from_keywords("open_supervisor", {"policy": None, "timeouts": None})
    assert options.policy == RestartPolicy()
    assert options.timeouts == Timeouts()


def test_none_for_an_option_that_has_no_none_raises_type_error() -> None:
    with pytest.raises(TypeError, match=r"^window=None must be an int"):
        open_supervisor(EchoRunner, window=None)  # type: ignore[arg-type]


def test_an_unknown_option_raises_type_error_naming_it_and_the_function() -> None:
    with pytest.raises(TypeError, match=r"^open_supervisor\(\) got unexpected keyword argument\(s\) 'windw'"):
        open_supervisor(EchoRunner, windw=16)  # type: ignore[call-arg]


async def test_run_supervisor_checks_its_options_before_it_starts_anything() -> None:
    with pytest.raises(TypeError, match=r"^run_supervisor\(\) got unexpected keyword argument\(s\) 'windw'"):
        await run_supervisor(EchoRunner, windw=16)  # type: ignore[call-arg]


@pytest.mark.parametrize(("value", "error"), [(2.0, TypeError), (True, TypeError), (1, ValueError)])
def test_window_must_be_an_int_of_at_least_2(value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match=r"^window="):
        open_supervisor(EchoRunner, window=value)  # type: ignore[arg-type]


def test_policy_of_the_wrong_type_raises_type_error_saying_what_to_pass() -> None:
    with pytest.raises(TypeError, match=r"^policy must be a trio_runner\.RestartPolicy, not dict"):
        open_supervisor(EchoRunner, policy={"mode": "temporary"})  # type: ignore[arg-type]


def test_timeouts_of_the_wrong_type_raise_type_error_saying_what_to_pass() -> None:
    with pytest.raises(TypeError, match=r"^timeouts must be a trio_runner\.Timeouts, not float"):
        open_supervisor(EchoRunner, timeouts=5.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(("value", "error"), [("", ValueError), (3, TypeError)])
def test_name_must_be_a_non_empty_string(value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match=r"^name="):
        open_supervisor(EchoRunner, name=value)  # type: ignore[arg-type]


def test_start_method_of_the_wrong_type_raises_type_error() -> None:
    with pytest.raises(TypeError, match=r"^start_method=None must be one of 'spawn', 'forkserver'"):
        open_supervisor(EchoRunner, start_method=None)  # type: ignore[arg-type]


def test_preload_takes_a_sequence_of_module_names_not_one_string() -> None:
    with pytest.raises(TypeError, match=r"^preload='json' must be a sequence of strings"):
        open_supervisor(EchoRunner, start_method="forkserver", preload="json")


def test_preload_is_kept_as_a_tuple_whatever_sequence_was_given() -> None:
    options = Options.from_keywords("open_supervisor", {"start_method": "forkserver", "preload": ["json"]})
    assert options.preload == ("json",)


def test_raise_on_give_up_must_be_a_bool_not_merely_truthy() -> None:
    with pytest.raises(TypeError, match=r"^raise_on_give_up=0 must be True or False"):
        open_supervisor(EchoRunner, raise_on_give_up=0)  # type: ignore[arg-type]


def test_options_are_frozen() -> None:
    with pytest.raises(AttributeError):
        DEFAULT.window = 2  # type: ignore[misc]


def test_the_forwarded_options_are_the_supervisor_options_but_start_method_name_and_preload() -> None:
    # open_mlx_supervisor decides these three itself; the rest pass through.
    forwarded = ForwardedOptions.__optional_keys__
    assert SupervisorOptions.__optional_keys__ - forwarded == {"name", "start_method", "preload"}


def _documented_defaults() -> dict[str, str]:
    """The option table of docs/api.md: {option: its default, as written}."""
    rows = re.findall(r"^\| `(\w+)` \| .* \| `([^`]+)` \|", API_DOC.read_text(), flags=re.MULTILINE)
    return dict(rows)


def test_the_documented_option_defaults_are_the_defaults() -> None:
    documented = _documented_defaults()
    assert set(documented) == set(SupervisorOptions.__optional_keys__)
    namespace: dict[str, Any] = {"RestartPolicy": RestartPolicy, "Timeouts": Timeouts}
    for option, written in documented.items():
        assert eval(written, namespace) == getattr(DEFAULT, option), option


def test_supervisor_has_no_public_constructor_and_says_where_to_get_one() -> None:
    from trio_runner import Supervisor

    with pytest.raises(
        TypeError, match=r"^trio_runner\.Supervisor has no public constructor; .*open_supervisor"
    ):
        Supervisor(EchoRunner)  # type: ignore[call-arg]


def test_a_supervisor_from_the_private_factory_is_a_supervisor() -> None:
    from trio_runner import Supervisor
    from trio_runner._supervisor import create_supervisor

    sup = create_supervisor(EchoRunner, (), None, DEFAULT)
    assert isinstance(sup, Supervisor)
    assert sup.name == "EchoRunner"
