"""Sharded MlxLmRunner (``parallel=``): two real rank processes, no supervisor, against one process.

Each rank is a plain subprocess (tests/scripts/mlx_rank.py) that builds an
``MlxLmRunner`` with its ``group`` set by hand, joins MLX's ring group on
loopback ports, loads its shard and generates. ``import mlx_lm`` in two ranks
at once takes 12-19 s on two cores, so one module-scoped run serves every
test: the ranks and the single process run every scenario once, in order.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trio_runner import GroupInfo
from trio_runner.mlx import MlxLmRunner, open_mlx_supervisor
from trio_runner.mlx._sharded import LOST_GROUP_EXIT, check_group, check_parallel

from .conftest import BUILD_BOUND

pytest.importorskip("mlx_lm", reason="the mlx extra is not installed")

SCRIPT = Path(__file__).parent / "scripts" / "mlx_rank.py"
RANKS = 2
# Generous: two ranks importing mlx_lm on a loaded 2-core machine; only a hang breaks it.
BOUND = 240
# How long rank 0 may take to notice that its peer died, once every other process has ended.
SURVIVOR_BOUND = 30
Outputs = dict[str, list[dict[str, Any]]]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _lines(stdout: str) -> Outputs:
    by_scenario: Outputs = {}
    for line in stdout.splitlines():
        record = json.loads(line)
        by_scenario.setdefault(record["scenario"], []).append(record)
    return by_scenario


@pytest.fixture(scope="module")
def processes(demo_dir: Path) -> Iterator[list[tuple[int, str, str]]]:
    """Each rank's exit status, stdout and stderr, then the single process's."""
    # Build the Qwen2 twin once here, not in three processes at once.
    code = "from trio_runner.mlx import demo_model; print(demo_model('qwen2'))"
    built = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=BUILD_BOUND)
    assert built.returncode == 0, built.stderr
    addresses = json.dumps([f"127.0.0.1:{_free_port()}" for _ in range(RANKS)])
    commands = [[sys.executable, str(SCRIPT), str(rank), addresses] for rank in range(RANKS)]
    commands.append([sys.executable, str(SCRIPT), "single"])
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for command in commands
    ]
    try:
        results = {index: processes[index].communicate(timeout=BOUND) for index in range(1, RANKS + 1)}
        try:
            results[0] = processes[0].communicate(timeout=SURVIVOR_BOUND)
        except subprocess.TimeoutExpired:
            # Rank 0 hung in a collective its dead peer never joined (see the test): stop it.
            processes[0].kill()
            results[0] = processes[0].communicate()
    finally:
        for process in processes:
            with process:  # closes its pipes
                process.kill()
    yield [(process.returncode, *results[index]) for index, process in enumerate(processes)]


@pytest.fixture(scope="module")
def runs(processes: list[tuple[int, str, str]]) -> tuple[list[Outputs], Outputs]:
    """Each rank's outputs (by scenario) and the single process's; the ranks end as their group breaks."""
    code, _, stderr = processes[RANKS]
    assert code == 0, stderr
    outputs = [_lines(stdout) for _, stdout, _ in processes]
    return outputs[:RANKS], outputs[RANKS]


@pytest.mark.parametrize("scenario", ["tensor", "pipeline"], ids=["tensor-sharded llama", "pipelined qwen2"])
def test_two_ranks_generate_the_single_process_tokens(
    runs: tuple[list[Outputs], Outputs], scenario: str
) -> None:
    ranks, single = runs
    (expected,) = single[scenario]
    assert expected["outcome"] == "completed" and len(expected["tokens"]) == 40
    (rank0,) = ranks[0][scenario]
    assert rank0["tokens"] == expected["tokens"]


def test_every_rank_generates_the_same_tokens(runs: tuple[list[Outputs], Outputs]) -> None:
    ranks, _ = runs
    for scenario in ("tensor", "pipeline"):
        (rank0,) = ranks[0][scenario]
        (rank1,) = ranks[1][scenario]
        assert rank1["outcome"] == "completed"
        assert rank1["tokens"] == rank0["tokens"]


def test_a_cancel_seen_by_one_rank_stops_every_rank_at_the_same_token(
    runs: tuple[list[Outputs], Outputs],
) -> None:
    ranks, _ = runs
    (rank0,) = ranks[0]["cancel"]
    (rank1,) = ranks[1]["cancel"]
    # Only the last rank's context says cancelled, at its sixth check.
    assert rank0["outcome"] == rank1["outcome"] == "cancelled"
    assert rank0["generated"] == rank1["generated"] == 6
    assert len(rank0["tokens"]) == len(rank1["tokens"]) == 5


def test_a_task_another_rank_skipped_is_dropped_and_the_next_task_runs_on_every_rank(
    runs: tuple[list[Outputs], Outputs],
) -> None:
    ranks, single = runs
    dropped, served = ranks[0]["skipped"]
    assert dropped["outcome"] == "cancelled" and dropped["tokens"] == []
    assert served["outcome"] == "completed"
    assert served["tokens"] == single["pipeline"][0]["tokens"]
    (other,) = ranks[1]["skipped"]
    assert other["outcome"] == "completed" and other["generated"] == 40


def test_a_request_every_rank_refuses_before_generating_fails_alike_and_the_ranks_go_on(
    runs: tuple[list[Outputs], Outputs],
) -> None:
    ranks, _ = runs
    assert [rank["refused"][0]["outcome"] for rank in ranks] == ["error", "error"]
    assert [rank["refused"][0]["generated"] for rank in ranks] == [0, 0]


def test_a_rank_that_fails_alone_mid_generation_exits_rather_than_leave_the_others_waiting(
    processes: list[tuple[int, str, str]], runs: tuple[list[Outputs], Outputs]
) -> None:
    code, _, stderr = processes[RANKS - 1]
    assert code == LOST_GROUP_EXIT, stderr
    assert "trio_runner.mlx: rank 1 failed mid-generation (OSError: this rank alone fails)" in stderr
    assert "lost" not in runs[0][RANKS - 1]


def test_a_rank_whose_peer_died_mid_generation_never_carries_on(
    processes: list[tuple[int, str, str]], runs: tuple[list[Outputs], Outputs]
) -> None:
    # MLX's ring raises in the survivor ("[ring] connection to a peer was lost")
    # most times, and the rank then exits rather than fail every later task; but
    # with a step of the model still in flight it can also hang (about 1 run in
    # 8 here), which the supervisor's one_for_all ends by killing it.
    code, _, stderr = processes[0]
    assert code in (LOST_GROUP_EXIT, -signal.SIGKILL), stderr
    if code == LOST_GROUP_EXIT:
        assert "trio_runner.mlx: rank 0 lost its group ([ring]" in stderr
    assert "lost" not in runs[0][0]


def test_the_qwen2_demo_model_generates_what_the_llama_demo_model_generates(
    runs: tuple[list[Outputs], Outputs],
) -> None:
    _, single = runs
    assert single["pipeline"][0]["tokens"] == single["tensor"][0]["tokens"]


def test_the_qwen2_demo_tokenizer_round_trips_any_text(runs: tuple[list[Outputs], Outputs]) -> None:
    _, single = runs
    (round_trip,) = single["round-trip"]
    assert round_trip["text"] == "Beautiful is better than ugly: ünïcode ✓, tabs\tand\nnewlines"


def test_pipeline_parallel_on_a_llama_model_is_refused_with_what_to_use_instead(
    runs: tuple[list[Outputs], Outputs],
) -> None:
    _, single = runs
    (refused,) = single["refused"]
    assert "parallel='pipeline': mlx-lm cannot split a llama model that way" in refused["error"]
    assert "try parallel='tensor'" in refused["error"]


# -- arguments are checked where they are written --------------------------------------


def test_parallel_must_be_tensor_or_pipeline() -> None:
    with pytest.raises(ValueError, match=r"parallel='data' must be one of 'tensor', 'pipeline'"):
        MlxLmRunner(parallel="data")
    with pytest.raises(TypeError, match=r"parallel=2 must be one of"):
        check_parallel(2)


def test_a_sharded_runner_serves_one_request_at_a_time() -> None:
    assert MlxLmRunner(parallel="tensor").concurrency == 1
    assert MlxLmRunner(parallel="tensor", concurrency=1).concurrency == 1
    with pytest.raises(ValueError, match=r"concurrency=4 with parallel='tensor'.*pass concurrency=1"):
        MlxLmRunner(parallel="tensor", concurrency=4)


def test_parallel_without_a_group_is_refused_with_how_to_get_one() -> None:
    with pytest.raises(
        ValueError, match=r"parallel='tensor' shards the model over the ranks of a group.*ranks=2"
    ):
        check_group("tensor", None)


def test_a_group_without_parallel_is_refused_with_what_to_pass() -> None:
    group = GroupInfo(rank=1, size=2, generation=1, addresses=("127.0.0.1:1", "127.0.0.1:2"))
    with pytest.raises(ValueError, match=r"rank 1 of a group of 2, but parallel is None.*parallel='tensor'"):
        check_group(None, group)
    assert check_group("pipeline", group) is group


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        (
            {"parallel": "tensor"},
            r"parallel='tensor' shards the model .*: pass ranks=2 or more \(not ranks=1\)",
        ),
        ({"parallel": "pipeline", "ranks": 1}, r"pass ranks=2 or more \(not ranks=1\)"),
        (
            {"ranks": 2},
            r"ranks=2 runs the model in 2 processes: pass parallel='tensor' or parallel='pipeline'",
        ),
        (
            {"parallel": "tensor", "ranks": 2, "concurrency": 4},
            r"concurrency=4 with parallel='tensor': a sharded model serves one request at a time",
        ),
    ],
)
async def test_open_mlx_supervisor_refuses_parallel_and_ranks_apart_before_starting_anything(
    options: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(ValueError, match=complaint):
        async with open_mlx_supervisor("/no/such/model", **options):
            pass  # pragma: no cover - never reached
