"""Many requests at once on one MLX runner: batching, sampling settings, logprobs, n, the prompt cache."""

import trio

from trio_runner.mlx import Completion, Generate, open_mlx_supervisor


async def main() -> None:
    async with open_mlx_supervisor() as sup:  # MlxLmRunner's concurrency: a batch of up to 32 sequences
        greedy = Generate(prompt="Once upon a time", max_tokens=24)
        alone = await sup.run(greedy)

        # Each request keeps its own settings in the shared batch.
        requests = [
            greedy,
            Generate(prompt="The quick brown fox", max_tokens=24, temperature=0.9, top_k=40, seed=1),
            Generate(prompt="The quick brown fox", max_tokens=24, temperature=0.9, top_k=40, seed=1),
            Generate(prompt="In the beginning", max_tokens=24, repetition_penalty=1.3, presence_penalty=0.5),
        ]
        results: dict[int, Completion] = {}

        async def run(i: int) -> None:
            results[i] = await sup.run(requests[i])

        async with trio.open_nursery() as nursery:
            for i in range(len(requests)):
                nursery.start_soon(run, i)
        print(f"greedy in the batch, same text as alone: {results[0].text == alone.text}")
        print(f"seeded requests batch too, same seed same text: {results[1].text == results[2].text}")

        # Log-probabilities: the chosen token's and the top alternatives, per token.
        async with sup.stream(Generate(prompt="Hello", max_tokens=4, logprobs=3)) as task:
            tokens = [token async for token in task]
        first = tokens[0]
        print(f"logprob {first.logprob:.2f}, alternatives {[text for _, text, _ in first.top_logprobs]!r}")

        # n choices run as n sequences of the batch.
        three = await sup.run(Generate(prompt="Once", max_tokens=12, temperature=1.0, n=3))
        print(f"n=3: {len(three.choices)} choices, {[c.index for c in three.choices]}")

        # A shared prefix (here a system prompt) is served from the prompt cache.
        system = {"role": "system", "content": "You answer in one short sentence. " * 6}
        for question in ("Hi!", "Who are you?"):
            chat = await sup.run(
                Generate(messages=[system, {"role": "user", "content": question}], max_tokens=8)
            )
            print(f"cached_tokens={chat.cached_tokens} of {chat.prompt_tokens} prompt tokens")


if __name__ == "__main__":
    trio.run(main)
