"""Unit tests of the restart policy: ``RestartPolicy`` and ``RestartTracker``, pure and synchronous.

No trio here: the tracker takes ``now`` as an argument, so every number is exact.
"""

from __future__ import annotations

import random

import pytest

from trio_runner import RestartPolicy
from trio_runner._errors import ExitReason
from trio_runner._policy import RestartTracker

DEFAULT_SCHEDULE = [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0, 60.0, 60.0]
FAILURES = [reason for reason in ExitReason if reason is not ExitReason.REQUESTED]


def crash_loop(tracker: RestartTracker, count: int, reason: ExitReason = ExitReason.SIGNALED) -> list[object]:
    """``count`` exits in a row, each right after READY; the decisions, as (action, delay) pairs."""
    now = 0.0
    decisions: list[object] = []
    for _ in range(count):
        tracker.on_ready(now)
        decision = tracker.on_exit(reason, now)
        decisions.append((decision.action, decision.delay))
        now += decision.delay
    return decisions


# -- the default schedule --------------------------------------------------------------


def test_the_default_schedule_is_2_4_8_16_32_then_60_for_ten_restarts() -> None:
    tracker = RestartTracker(RestartPolicy())
    decisions = crash_loop(tracker, 10)
    assert decisions == [("restart", delay) for delay in DEFAULT_SCHEDULE]


def test_the_eleventh_consecutive_failure_gives_up() -> None:
    tracker = RestartTracker(RestartPolicy())
    crash_loop(tracker, 10)
    decision = tracker.on_exit(ExitReason.SIGNALED, 1000.0)
    assert decision.action == "give_up"
    assert decision.restarts == 10
    assert tracker.total_restarts == 10


def test_each_decision_counts_the_restarts_made_in_a_row_before_it() -> None:
    tracker = RestartTracker(RestartPolicy())
    restarts = [tracker.on_exit(ExitReason.SIGNALED, 0.0).restarts for _ in range(11)]
    assert restarts == list(range(11))


def test_a_failure_that_never_became_ready_counts_toward_the_limit() -> None:
    tracker = RestartTracker(RestartPolicy(max_restarts=3))
    actions = [tracker.on_exit(ExitReason.STARTUP_FAILED, float(i)).action for i in range(4)]
    assert actions == ["restart", "restart", "restart", "give_up"]


def test_max_restarts_zero_gives_up_on_the_first_failure() -> None:
    tracker = RestartTracker(RestartPolicy(max_restarts=0))
    assert tracker.on_exit(ExitReason.SIGNALED, 0.0).action == "give_up"


def test_give_up_is_sticky_until_a_healthy_period() -> None:
    tracker = RestartTracker(RestartPolicy(max_restarts=1))
    assert tracker.on_exit(ExitReason.SIGNALED, 0.0).action == "restart"
    assert tracker.on_exit(ExitReason.SIGNALED, 1.0).action == "give_up"
    assert tracker.on_exit(ExitReason.SIGNALED, 2.0).action == "give_up"


# -- delay() ----------------------------------------------------------------------------


def test_delay_is_initial_times_factor_to_the_n_capped_at_max_delay() -> None:
    policy = RestartPolicy()
    assert [policy.delay(n) for n in range(1, 11)] == DEFAULT_SCHEDULE
    assert policy.delay(50) == 60.0


def test_delay_follows_custom_initial_delay_factor_and_cap() -> None:
    policy = RestartPolicy(initial_delay=0.5, factor=3.0, max_delay=10.0)
    assert [policy.delay(n) for n in range(1, 6)] == [0.5, 1.5, 4.5, 10.0, 10.0]


def test_factor_one_gives_a_constant_delay() -> None:
    policy = RestartPolicy(initial_delay=5.0, factor=1.0)
    assert {policy.delay(n) for n in range(1, 20)} == {5.0}


def test_zero_initial_delay_restarts_at_once() -> None:
    policy = RestartPolicy(initial_delay=0.0, max_delay=0.0)
    assert policy.delay(1) == policy.delay(10) == 0.0


def test_delay_stays_at_max_delay_after_thousands_of_failures() -> None:
    # A policy that "restarts forever" (a huge max_restarts) must keep returning max_delay.
    policy = RestartPolicy(max_restarts=1_000_000)
    assert policy.delay(1_100) == 60.0
    tracker = RestartTracker(policy)
    decisions = crash_loop(tracker, 1_100)
    assert decisions[-1] == ("restart", 60.0)


# -- reset_after ----------------------------------------------------------------------------


def test_a_runner_ready_for_reset_after_starts_the_count_and_the_delay_over() -> None:
    tracker = RestartTracker(RestartPolicy())
    crash_loop(tracker, 5)  # the next delay would be 60
    tracker.on_ready(1000.0)
    decision = tracker.on_exit(ExitReason.SIGNALED, 1060.0)  # READY exactly reset_after
    assert (decision.action, decision.delay, decision.restarts) == ("restart", 2.0, 0)
    assert tracker.failures == 1


def test_a_runner_ready_just_short_of_reset_after_keeps_the_count() -> None:
    tracker = RestartTracker(RestartPolicy())
    crash_loop(tracker, 2)
    tracker.on_ready(100.0)
    decision = tracker.on_exit(ExitReason.SIGNALED, 159.999)
    assert (decision.action, decision.delay, decision.restarts) == ("restart", 8.0, 2)


def test_a_healthy_period_lets_a_runner_at_the_limit_restart_again() -> None:
    tracker = RestartTracker(RestartPolicy(max_restarts=2))
    crash_loop(tracker, 2)
    tracker.on_ready(500.0)
    assert tracker.on_exit(ExitReason.SIGNALED, 600.0).action == "restart"
    assert tracker.total_restarts == 3


def test_the_ready_time_is_forgotten_after_each_exit() -> None:
    # READY long ago in an earlier incarnation must not count for one that never became ready.
    tracker = RestartTracker(RestartPolicy())
    tracker.on_ready(0.0)
    tracker.on_exit(ExitReason.SIGNALED, 1.0)
    decision = tracker.on_exit(ExitReason.STARTUP_FAILED, 1000.0)
    assert (decision.delay, decision.restarts) == (4.0, 1)


def test_custom_reset_after() -> None:
    tracker = RestartTracker(RestartPolicy(reset_after=5.0))
    crash_loop(tracker, 3)
    tracker.on_ready(10.0)
    assert tracker.on_exit(ExitReason.ERROR_EXIT, 15.0).delay == 2.0


# -- modes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("reason", FAILURES)
def test_permanent_restarts_on_everything_but_requested(reason: ExitReason) -> None:
    policy = RestartPolicy(mode="permanent")
    assert policy.restarts_after(reason)
    assert RestartTracker(policy).on_exit(reason, 0.0).action == "restart"


@pytest.mark.parametrize("mode", ["permanent", "transient", "temporary"])
def test_no_mode_restarts_after_a_requested_exit(mode: str) -> None:
    policy = RestartPolicy(mode=mode)  # type: ignore[arg-type]
    assert not policy.restarts_after(ExitReason.REQUESTED)
    tracker = RestartTracker(policy)
    assert tracker.on_exit(ExitReason.REQUESTED, 0.0).action == "stop"
    assert tracker.failures == tracker.total_restarts == 0


@pytest.mark.parametrize("reason", FAILURES)
def test_transient_restarts_on_everything_but_requested_and_clean_exit(reason: ExitReason) -> None:
    policy = RestartPolicy(mode="transient")
    expected = reason is not ExitReason.CLEAN_EXIT
    assert policy.restarts_after(reason) is expected
    action = RestartTracker(policy).on_exit(reason, 0.0).action
    assert action == ("restart" if expected else "stop")


@pytest.mark.parametrize("reason", list(ExitReason))
def test_temporary_never_restarts(reason: ExitReason) -> None:
    policy = RestartPolicy(mode="temporary")
    assert not policy.restarts_after(reason)
    assert RestartTracker(policy).on_exit(reason, 0.0).action == "stop"


def test_a_stop_decision_does_not_count_as_a_restart() -> None:
    tracker = RestartTracker(RestartPolicy(mode="transient"))
    crash_loop(tracker, 2)
    decision = tracker.on_exit(ExitReason.CLEAN_EXIT, 100.0)
    assert (decision.action, decision.restarts) == ("stop", 2)
    assert tracker.total_restarts == 2


# -- jitter ---------------------------------------------------------------------------------


@pytest.mark.parametrize("jitter", [0.1, 0.5, 1.0])
def test_jitter_keeps_each_delay_within_its_band(jitter: float) -> None:
    policy = RestartPolicy(jitter=jitter, max_restarts=10_000)
    for seed in range(20):
        tracker = RestartTracker(policy, rng=random.Random(seed))
        for n in range(1, 13):
            delay = tracker.on_exit(ExitReason.SIGNALED, 0.0).delay
            base = policy.delay(n)
            assert (1 - jitter) * base <= delay <= (1 + jitter) * base


def test_jitter_varies_the_delay_and_a_seeded_rng_repeats_it() -> None:
    policy = RestartPolicy(jitter=0.5)

    def delays(seed: int) -> list[float]:
        tracker = RestartTracker(policy, rng=random.Random(seed))
        return [tracker.on_exit(ExitReason.SIGNALED, 0.0).delay for _ in range(10)]

    assert delays(7) == delays(7)
    assert delays(7) != delays(8)
    assert delays(7) != DEFAULT_SCHEDULE


def test_zero_jitter_draws_nothing_from_the_rng() -> None:
    rng = random.Random(3)
    state = rng.getstate()
    crash_loop(RestartTracker(RestartPolicy(), rng=rng), 10)
    assert rng.getstate() == state


# -- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"mode": "forever"}, ValueError),
        ({"initial_delay": -1.0}, ValueError),
        ({"factor": 0.5}, ValueError),
        ({"max_delay": 1.0}, ValueError),  # below initial_delay
        ({"reset_after": 0.0}, ValueError),
        ({"jitter": 1.5}, ValueError),
        ({"jitter": -0.1}, ValueError),
        ({"max_restarts": -1}, ValueError),
        ({"max_restarts": 2.5}, TypeError),
        ({"max_restarts": True}, TypeError),
        ({"initial_delay": "2"}, TypeError),
        ({"max_delay": float("inf")}, ValueError),
        ({"initial_delay": float("nan")}, ValueError),
    ],
)
def test_bad_policies_are_refused_at_construction(options: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error, match="RestartPolicy"):
        RestartPolicy(**options)  # type: ignore[arg-type]


def test_backoff_delay_does_not_overflow_in_a_long_crash_loop() -> None:
    tracker = RestartTracker(RestartPolicy(max_restarts=5000))
    decisions = [tracker.on_exit(ExitReason.SIGNALED, now=float(i)) for i in range(3000)]
    assert decisions[-1].delay == 60.0
