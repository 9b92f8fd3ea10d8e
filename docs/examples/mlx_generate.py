"""Generate with the offline MLX demo model in a supervised runner: stream, seed, chat, stop, cancel."""

import trio

from trio_runner import TaskCancelled
from trio_runner.mlx import Generate, open_mlx_supervisor


async def main() -> None:
    # No model given: the offline demo model, built on first use (off the event loop).
    async with open_mlx_supervisor() as sup:
        request = Generate(prompt="Once upon a time", max_tokens=20, temperature=0.8, seed=42)
        tokens = []
        async with sup.stream(request) as task:
            async for token in task:  # Token(text, token_id), as they are generated
                tokens.append(token)
        completion = task.result
        print(f"streamed {len(tokens)} tokens; generation_tokens={completion.generation_tokens}")
        print(f"the tokens join into the text: {''.join(t.text for t in tokens) == completion.text}")

        again = await sup.run(request)
        print(f"same seed, same text: {again.text == completion.text}")

        chat = await sup.run(Generate(messages=[{"role": "user", "content": "Hi!"}], max_tokens=8))
        print(f"chat prompt, through the chat template: {chat.prompt_tokens} tokens")

        stop = completion.text[3:5]
        stopped = await sup.run(
            Generate(prompt="Once upon a time", max_tokens=20, temperature=0.8, seed=42, stop=[stop])
        )
        print(
            f"stop string: finish_reason={stopped.finish_reason!r}, "
            f"text ends before it: {completion.text.startswith(stopped.text + stop)}"
        )

        try:
            Generate(prompt="Hi", max_tokens=0)
        except ValueError as exc:
            print(f"rejected at the call: {exc}")

        with trio.move_on_after(10):
            try:
                async with sup.stream(Generate(prompt="Go on", max_tokens=2000)) as task:
                    async for _ in task:
                        await task.cancel()  # checked by the runner at every token
            except TaskCancelled:
                print("cancelled mid-generation")


if __name__ == "__main__":
    trio.run(main)
