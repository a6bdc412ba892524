"""Talk to `mlx-llama serve` with the official OpenAI Python client.

Start a server first (it binds to 127.0.0.1:8080 by default):

    mlx-llama serve -m mlx-community/SmolLM2-135M-Instruct-4bit
    python examples/openai_client.py

With `--api-key KEY` on the server (or MLX_LLAMA_API_KEY set), set OPENAI_API_KEY=KEY here.
A multi-turn conversation resends the whole history each turn, and the server reuses the
previous turn's cache: `usage.prompt_tokens_details.cached_tokens` shows how much of the
prompt it did not have to process again.
"""

from __future__ import annotations

import os
import sys

from openai import OpenAI

BASE_URL = os.environ.get("MLX_LLAMA_URL", "http://127.0.0.1:8080/v1")


def main() -> int:
    client = OpenAI(base_url=BASE_URL, api_key=os.environ.get("OPENAI_API_KEY", "not-needed"))
    model = client.models.list().data[0].id
    print(f"model: {model}\n")

    messages = [{"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": "Name three facts about llamas."}]

    # Streamed: print the answer as it arrives; the last chunk carries the token counts.
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=200, temperature=0.7, seed=42,
        stream=True, stream_options={"include_usage": True})
    answer = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            answer.append(chunk.choices[0].delta.content)
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.usage:
            print(f"\n[{chunk.usage.prompt_tokens} prompt tokens, "
                  f"{chunk.usage.completion_tokens} generated]\n")

    # Second turn, not streamed: the server prefills only the new messages.
    messages += [{"role": "assistant", "content": "".join(answer)},
                 {"role": "user", "content": "Now one more, in a single sentence."}]
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=80,
                                           temperature=0.7, seed=42, stop=["\n\n"])
    print(reply.choices[0].message.content)
    details = reply.usage.prompt_tokens_details
    print(f"[{reply.usage.prompt_tokens} prompt tokens, "
          f"{details.cached_tokens if details else 0} reused from the first turn; "
          f"finish_reason={reply.choices[0].finish_reason}]")

    # Plain text completion (no chat template).
    text = client.completions.create(model=model, prompt="The llama is", max_tokens=30,
                                     temperature=0)
    print(f"\nThe llama is{text.choices[0].text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
