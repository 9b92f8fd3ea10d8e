"""One MLX model over two supervised processes: the Qwen2 demo model split into pipeline stages."""

import trio

from trio_runner.mlx import Generate, open_mlx_supervisor


async def main() -> None:
    request = Generate(prompt="Beautiful is", max_tokens=30)  # greedy
    # Two ranks; each loads half the layers (rank 1 the first, rank 0 the last).
    async with open_mlx_supervisor("demo-qwen2", parallel="pipeline", ranks=2) as sup:
        tokens = []
        async with sup.stream(request) as task:
            async for token in task:  # rank 0's tokens
                tokens.append(token.text)
        sharded = task.result
        print(f"pids, one per rank: {len(sup.statistics().pids)}")
        print(f"streamed {len(tokens)} tokens: {''.join(tokens) == sharded.text}")
    async with open_mlx_supervisor("demo-qwen2") as sup:
        alone = await sup.run(request)
    print(f"same text as one process: {sharded.text == alone.text}")


if __name__ == "__main__":
    trio.run(main)
