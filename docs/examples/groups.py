"""Groups: one supervisor over two ranks of the same runner, restarted together (one_for_all).

Each rank adds its share of a sum; rank 1 sends its part to rank 0 over the
address the supervisor gave it, as a distributed engine's collective would.
Run it with ``python docs/examples/groups.py``.
"""

from __future__ import annotations

import os
import signal
import socket

import trio

import trio_runner


class Shard(trio_runner.Runner[int, str, int]):
    """Rank r sums the numbers below ``n`` that are r modulo the group's size; rank 0 adds them up."""

    def setup(self) -> None:
        group = self.group
        assert group is not None  # set before setup(), in every rank
        self.group_info = group
        if group.rank == 0:
            host, port = group.addresses[0].rsplit(":", 1)
            self.listener = socket.create_server((host, int(port)))

    def handle(self, n: int, ctx: trio_runner.TaskContext[str]) -> int:
        group = self.group_info
        part = sum(range(group.rank, n, group.size))
        ctx.emit(f"rank {group.rank} has {part}")  # only rank 0's events reach the caller
        if group.rank > 0:
            host, port = group.addresses[0].rsplit(":", 1)
            with socket.create_connection((host, int(port))) as conn:
                conn.sendall(str(part).encode())
            return part  # not sent back: the caller gets rank 0's result
        total = part
        for _ in range(group.size - 1):
            conn, _ = self.listener.accept()
            with conn:
                total += int(conn.recv(64))
        return total


async def main() -> None:
    policy = trio_runner.RestartPolicy(initial_delay=0.1)
    async with trio_runner.open_supervisor(Shard, ranks=2, policy=policy) as sup:
        async with sup.stream(100) as task:
            events = [event async for event in task]
        print(f"sum: {task.result}, events: {events}")
        await sup.wait_ready()
        first = sup.statistics()
        print(f"pids, one per rank: {len(first.pids)}")

        # Rank 1 dies: the whole group is stopped, reaped and started again.
        rank_1 = first.pids[1]
        assert rank_1 is not None
        os.kill(rank_1, signal.SIGKILL)
        async for change in sup.watch(replay=True):
            if isinstance(change, trio_runner.Ready) and change.incarnation == 2:
                break  # one Ready per rank, once every rank is ready: the group serves again
        after = sup.statistics()
        print(f"every rank replaced: {not set(first.pids) & set(after.pids)}")
        assert after.last_exit is not None
        print(f"last exit: {after.last_exit.describe()}")
        print(f"served again: {await sup.run(10)}")


if __name__ == "__main__":
    trio.run(main)
