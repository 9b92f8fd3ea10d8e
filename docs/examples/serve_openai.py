"""Serve the demo model over the OpenAI API in this process, then use it with curl and the openai client.

Needs the mlx and serve extras, plus ``openai``. The server listens on an
ephemeral 127.0.0.1 port, so this runs beside anything else.
"""

import functools
import json
import os
import shutil
import signal

import openai
import trio

from trio_runner import RestartPolicy
from trio_runner.mlx import open_mlx_supervisor
from trio_runner.serve import DEMO_MODEL_ID, run_server


async def curl(*args: str) -> str:
    result = await trio.run_process(["curl", "-s", *args], capture_stdout=True)
    return result.stdout.decode()


async def main() -> None:
    policy = RestartPolicy(initial_delay=0.1)
    # raise_on_give_up=False: if the runner keeps crashing, the server stays up and answers 503.
    async with open_mlx_supervisor(policy=policy, raise_on_give_up=False) as sup:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(functools.partial(run_server, sup, model_id=DEMO_MODEL_ID, port=0))
            await sup.wait_ready()

            if shutil.which("curl"):
                body = json.dumps({"prompt": "Once upon a time", "max_tokens": 16, "seed": 1})
                reply = json.loads(await curl(f"{server.url}/v1/completions", "-d", body))
                print(f"curl /v1/completions: {reply['usage']['completion_tokens']} tokens")
                health = json.loads(await curl(f"{server.url}/health"))
                print(f"curl /health: state {health['state']}, restarts {health['restarts']}")
            else:
                print("curl /v1/completions: skipped (curl is not installed)")
                print("curl /health: skipped (curl is not installed)")

            client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
            async with client:
                models = await client.models.list()
                print("models:", [model.id for model in models.data])
                messages = [{"role": "user", "content": "Hello!"}]
                chat = await client.chat.completions.create(
                    model=DEMO_MODEL_ID, messages=messages, max_tokens=8, seed=3
                )
                # Token counts depend on the model; that they add up does not.
                usage = chat.usage
                adds_up = (
                    usage is not None and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
                )
                print(f"chat: finish_reason={chat.choices[0].finish_reason}, usage adds up: {adds_up}")

                # Kill the runner mid-stream, once a token has come (before that, the request
                # may not have started in the runner, and it would be served by the next one):
                # the stream ends with an error event naming the exit.
                stream = await client.chat.completions.create(
                    model=DEMO_MODEL_ID, messages=messages, max_tokens=1500, stream=True
                )
                pid = sup.statistics().pid
                try:
                    async with stream:
                        async for chunk in stream:
                            if pid is not None and chunk.choices and chunk.choices[0].delta.content:
                                os.kill(pid, signal.SIGKILL)
                                pid = None
                except openai.APIError as exc:
                    print("stream ended with an error:", exc.message.split(":")[0], "-", exc.code)

                # Requests that arrive while it restarts wait for it (up to ready_wait, 5 s by default).
                again = await client.completions.create(model=DEMO_MODEL_ID, prompt="Hi", max_tokens=4)
                print(f"served after the restart: {again.usage and again.usage.completion_tokens} tokens")
            print("restarts:", sup.statistics().restarts)
            server.shutdown()  # graceful: stop accepting, let requests in flight finish


if __name__ == "__main__":
    trio.run(main)
