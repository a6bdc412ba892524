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
from .errors import MlxLlamaError, Terminated
from .generate import (attends_within_context, check_max_tokens, context_length,
                       stream_generate)

HELP = "commands: /reset clears the conversation, /quit leaves, /help shows this"


def run_repl(args: argparse.Namespace) -> int:
    from .cache_options import cache_factory
    from .cli import load_checked, resolve_model, sampling_params

    params = sampling_params(args).validate()  # a bad flag fails now, not at every turn
    check_max_tokens(args.max_tokens)
    model, tokenizer = load_checked(resolve_model(args.model))
    chat = Conversation(model, tokenizer, args.system, make_layers=cache_factory(args, model))
    check_system_fits(chat, model, args.max_tokens)
    try:  # the banner is inside: a Ctrl-C that lands just after it is still "at the prompt"
        print(f"chatting with {args.model or 'the bundled SmolLM2'}; {HELP}", file=sys.stderr)
        converse(chat, model, tokenizer, params, args)
    except Terminated:
        raise  # main() reports it and exits 128 + the signal
    except (EOFError, KeyboardInterrupt):  # Ctrl-D / Ctrl-C at the prompt: leave quietly
        print(file=sys.stderr)
    return 0


def reply_reserve(max_tokens: int, limit: int) -> int:
    """Tokens kept free for the reply when old turns are dropped: the reply's own limit, but
    never more than a quarter of the context (-1, no limit, also gets the quarter)."""
    return limit // 4 if max_tokens == -1 else min(max_tokens, limit // 4)


def check_system_fits(chat: Conversation, model, max_tokens: int) -> None:
    """A system message that leaves no room for a user message and a reply would fail every
    turn (the system message is never dropped): say so once, before the chat starts."""
    limit = context_length(model)
    if not chat.system or attends_within_context(chat.cache, limit):
        return
    budget = limit - reply_reserve(max_tokens, limit)
    used = len(chat.tokenizer.apply_chat_template(chat.messages + [{"role": "user", "content": ""}],
                                                  add_generation_prompt=True, tokenize=True))
    if used >= budget:
        raise MlxLlamaError(
            f"the system message takes {used} of the {budget} tokens a prompt may have (the "
            f"model's context is {limit}, {limit - budget} kept for the reply): shorten it"
        )


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
                prompt, dropped = chat.fit(prompt, limit - reply_reserve(args.max_tokens, limit))
                if dropped:
                    print(f"[the conversation outgrew the context: the {dropped} earliest "
                          "messages were dropped]", file=err)
            for last in stream_generate(model, tokenizer, prompt, args.max_tokens,
                                        sampling=params, stop=args.stop, cache=chat.cache):
                reply.append(last.text)
                out.write(last.text)
                out.flush()
        except KeyboardInterrupt as e:
            if isinstance(e, Terminated):  # SIGTERM/SIGHUP end the chat, not just the reply
                raise
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
