"""Use mlx-llama from Python: load a model, generate, stream a chat reply.

    python examples/python_api.py                  # the bundled SmolLM2
    python examples/python_api.py path/to/mlx-model
"""

import sys

from mlx_llama import generate, load, stream_generate


def model_folder() -> str:
    if len(sys.argv) > 1:
        return sys.argv[1]
    from convert.bundled import default_model_dir  # imports the bundled GGUF once

    return str(default_model_dir())


def main() -> None:
    model, tokenizer = load(model_folder())

    # One string in, one string out (the chat template is applied for chat models).
    print(generate(model, tokenizer, "Name three uses of a llama.", max_tokens=48))

    # A conversation, streamed piece by piece with sampling and a seed.
    messages = [
        {"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "Why do people run language models locally?"},
    ]
    last = None
    for last in stream_generate(model, tokenizer, messages, max_tokens=64,
                                temperature=0.7, top_p=0.9, seed=0):
        print(last.text, end="", flush=True)
    print(f"\n[{last.finish_reason}: {last.generation_tokens} tokens, "
          f"{last.generation_tps:.1f} tok/s, peak {last.peak_memory_gb:.2f} GB]")


if __name__ == "__main__":
    main()
