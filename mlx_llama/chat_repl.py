"""`mlx-llama chat`: a terminal chat that keeps the conversation and its KV cache.

Each turn renders the whole conversation with the model's chat template, and the
`PromptCache` finds the prefix it already holds (every earlier turn, including the replies it
generated), so only the new user message is prefilled. Ctrl-C during a reply stops that reply
and keeps what was said; Ctrl-C or Ctrl-D at the prompt leaves.
"""

from __future__ import annotations

import argparse
import re
import sys

from .conversation import Conversation
from .errors import MlxLlamaError
from .generate import attends_within_context, context_length, stream_generate

HELP = "commands: /reset clears the conversation, /quit leaves, /help shows this"


def run_repl(args: argparse.Namespace) -> int:
    from .cache_options import cache_factory
    from .cli import load_checked, resolve_model, sampling_params

    model, tokenizer = load_checked(resolve_model(args.model))
    params = sampling_params(args)
    chat = Conversation(model, tokenizer, args.system, make_layers=cache_factory(args, model))
    try:  # the banner is inside: a Ctrl-C that lands just after it is still "at the prompt"
        print(f"chatting with {args.model or 'the bundled SmolLM2'}; {HELP}", file=sys.stderr)
        converse(chat, model, tokenizer, params, args)
    except (EOFError, KeyboardInterrupt):  # Ctrl-D / Ctrl-C at the prompt: leave quietly
        print(file=sys.stderr)
    return 0


def converse(chat: Conversation, model, tokenizer, params, args: argparse.Namespace) -> None:
    """Read, answer, repeat; returns on /quit. Ctrl-C during a reply only stops that reply."""
    from .cli import tolerant_stdin

    out, err = sys.stdout, sys.stderr
    tolerant_stdin()  # a bad byte spoils its own line only
    while True:
        text = input(">>> ").strip()
        if not text:
            continue
        command = text.split()[0] if re.match(r"/\w+(\s|$)", text) else None
        if command in ("/quit", "/exit", "/bye"):
            return
        if command == "/help":
            print(HELP, file=err)
            continue
        if command == "/reset":
            chat.reset()
            print("conversation cleared", file=err)
            continue
        if command is not None:
            print(f"unknown command {command}; {HELP}", file=err)
            continue
        reply, last, interrupted = [], None, False
        try:
            prompt = chat.add_user(text)
            limit = context_length(model)
            if not attends_within_context(chat.cache, limit):  # a window slides on its own
                prompt, dropped = chat.fit(prompt, limit - min(args.max_tokens, limit // 4))
                if dropped:
                    print(f"[the conversation outgrew the context: the {dropped} earliest "
                          "messages were dropped]", file=err)
            for last in stream_generate(model, tokenizer, prompt, args.max_tokens,
                                        sampling=params, stop=args.stop, cache=chat.cache):
                reply.append(last.text)
                out.write(last.text)
                out.flush()
        except KeyboardInterrupt:
            interrupted = True
            print("\n[reply interrupted]", file=err)
        except MlxLlamaError as e:  # e.g. over the context: this turn fails, the chat goes on
            chat.cancel_user()
            print(f"{chr(10) if reply else ''}error: {e} (or /reset to start over)", file=err)
            continue
        print(file=out)
        ended_on_stop_string = (last is not None and last.finish_reason == "stop"
                                and last.token not in tokenizer.eos_token_ids)
        chat.add_reply("".join(reply), last.token if last else None,
                       complete=not (interrupted or ended_on_stop_string or last is None))
        if last is not None:
            print(
                f"[prompt {last.prompt_tokens} tokens: {last.cached_tokens} cached, "
                f"{last.prompt_tokens - last.cached_tokens} prefilled | "
                f"{last.generation_tokens} generated, {last.generation_tps:.1f} tok/s]",
                file=err,
            )
