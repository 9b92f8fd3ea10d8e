"""Pure-Python ranks for the group tests (``ranks=N``); a module, so the child can import them.

Each rank serves its place over TCP on its own address (``self.group.addresses[rank]``),
so rank 0 can ask every rank where it is and which tasks it ran: that tests the
addresses as a distributed engine would use them, without one.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
import threading
import time
from typing import Any

from trio_runner import GroupInfo, Runner, TaskContext


def _ask(address: str) -> dict[str, Any]:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    reply: dict[str, Any] = pickle.loads(data)
    return reply


class GroupRunner(Runner[Any, Any, Any]):
    """A rank driven by the request ``(command, *args)``.

    Args:
        fail_setup_rank: this rank's ``setup()`` raises.
        hang_setup_rank: this rank's ``setup()`` never returns.
    """

    def __init__(self, fail_setup_rank: int | None = None, hang_setup_rank: int | None = None) -> None:
        self.fail_setup_rank = fail_setup_rank
        self.hang_setup_rank = hang_setup_rank
        self.handled: list[int] = []
        self.place_in_init = self.group

    def setup(self) -> None:
        group = self.group
        assert isinstance(group, GroupInfo)
        print(f"rank {group.rank} of {group.size} in setup", file=sys.stderr, flush=True)
        if group.rank == self.fail_setup_rank:
            raise RuntimeError(f"rank {group.rank} failed its setup on purpose")
        if group.rank == self.hang_setup_rank:
            threading.Event().wait()
        host, port = group.addresses[group.rank].rsplit(":", 1)
        self.server = socket.create_server((host, int(port)))
        threading.Thread(target=self._serve_place, daemon=True).start()

    def _place(self) -> dict[str, Any]:
        group = self.group
        assert group is not None
        return {
            "rank": group.rank,
            "size": group.size,
            "generation": group.generation,
            "addresses": group.addresses,
            "pid": os.getpid(),
            "handled": list(self.handled),
            "place_in_init": self.place_in_init,
        }

    def _serve_place(self) -> None:
        while True:
            conn, _ = self.server.accept()
            with conn:
                conn.sendall(pickle.dumps(self._place()))

    def handle(self, request: Any, ctx: TaskContext[Any]) -> Any:
        group = self.group
        assert group is not None
        self.handled.append(ctx.task_id)
        command, *args = request
        if command == "places":
            # Every rank's answer, asked over the addresses the supervisor gave.
            return [
                self._place() if rank == group.rank else _ask(address)
                for rank, address in enumerate(group.addresses)
            ]
        if command == "count":
            (n,) = args
            for i in range(n):
                ctx.emit((group.rank, i))
            return ("rank", group.rank, n)
        if command == "slow_count":
            # Every rank emits ``n`` events ``interval`` apart: a long task that keeps making progress.
            n, interval = args
            for i in range(n):
                time.sleep(interval)
                ctx.emit((group.rank, i))
            return n
        if command == "wait_in_generation_1":
            # Waits for a cancel (or a kill) in the first generation; returns at once in later ones.
            ctx.emit(group.rank)
            while group.generation == 1 and not ctx.cancelled:
                time.sleep(0.005)
            ctx.raise_if_cancelled()
            return group.generation
        if command == "fail_on":
            (rank,) = args
            if group.rank == rank:
                raise ValueError(f"rank {rank} failed on purpose")
            return group.rank
        if command == "wait":
            # Every rank emits once, then waits for a cancel (or a kill).
            ctx.emit(group.rank)
            while not ctx.cancelled:
                time.sleep(0.005)
            ctx.raise_if_cancelled()
        if command == "hold_gil_on":
            # One rank holds the GIL in C for minutes; the others wait.
            (rank,) = args
            ctx.emit(group.rank)
            if group.rank == rank:
                return sum(range(10**11))
            while not ctx.cancelled:
                time.sleep(0.005)
            ctx.raise_if_cancelled()
        raise ValueError(f"unknown command {command!r}")
