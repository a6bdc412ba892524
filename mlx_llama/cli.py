"""`mlx-llama`: argument parsing only; every subcommand calls the library.

The CLI is the front door over both packages: `convert` and the bundled default model are
served by the `convert` package (imported only when those are used), everything else by
the runtime. A user error prints one line and exits 1; Ctrl-C exits 130 without a traceback,
and SIGTERM / SIGHUP unwind the same way (exit 143 / 129), so a conversion cleans up after them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from pathlib import Path

from .errors import MlxLlamaError, Terminated

DEFAULT_PROMPT = "Write a short poem about llamas running on a laptop."

# Subcommands that live in their own modules: module -> attribute names of (add_arguments, run).
EXTERNAL = {
    "convert": ("convert.cli", "add_convert_parser", "run_convert"),
    "serve": ("mlx_llama.server.cli", "add_arguments", "run"),
    "bench": ("mlx_llama.bench", "add_arguments", "run"),
    "perplexity": ("mlx_llama.perplexity", "add_arguments", "run"),
    "cache-prompt": ("mlx_llama.prompt_cache", "add_arguments", "run"),
}


def resolve_model(spec: str | None) -> Path:
    """The folder for `-m`: a path or hub repo id, or the bundled SmolLM2 when none is given."""
    if spec is None:
        try:
            bundled = importlib.import_module("convert.bundled")
        except ImportError:
            raise MlxLlamaError(
                "no model given and the converter is not installed: pass -m MODEL_FOLDER"
            ) from None
        return bundled.default_model_dir()
    from .hub import resolve_model_folder

    return resolve_model_folder(spec)


def add_model_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None,
                   help="model folder or hub repo id (default: bundled SmolLM2-135M-Instruct)")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256,
                   help="most tokens to generate (default 256; -1: until an end token or the "
                        "context)")
    g.add_argument("--temp", "--temperature", dest="temperature", type=float, default=0.0,
                   help="0 is greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_params(args: argparse.Namespace):
    from .sampling import SamplingParams

    return SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
        presence_penalty=args.presence_penalty, seed=args.seed,
    )


def print_stats(last) -> None:
    print(
        f"\nprompt: {last.prompt_tokens} tokens ({last.cached_tokens} cached), "
        f"{last.prompt_tps:.1f} tok/s | generation: {last.generation_tokens} tokens, "
        f"{last.generation_tps:.1f} tok/s | peak memory: {last.peak_memory_gb:.3f} GB",
        file=sys.stderr,
    )


def load_checked(folder: Path):
    """`load(folder)` for a subcommand that runs the model, with one line on stderr when the
    model does not fit the memory available (any backend)."""
    from .loading import load

    model, tokenizer = load(folder, lazy=True)
    warn_if_too_big_then_read(model)
    return model, tokenizer


def warn_if_too_big_then_read(model) -> None:
    """The fit warning comes from the model's sizes alone, so it is printed before the weights
    are read (reading a model that does not fit is what makes the machine swap)."""
    from .loading import read_weights_now
    from .memory import fit_warning

    message = fit_warning(model)
    if message:
        print(f"warning: {message}", file=sys.stderr, flush=True)
    read_weights_now(model)


def prefill_progress(done: int, total: int) -> None:
    """Shown only on a terminal and only for prompts longer than one chunk."""
    from .generate import PREFILL_CHUNK

    if sys.stderr.isatty() and total > PREFILL_CHUNK:
        end = "\n" if done == total else ""
        print(f"\rprefill: {done}/{total} tokens", end=end, file=sys.stderr, flush=True)


def tolerant_stdin() -> None:
    """Read standard input like argv: a byte that is not UTF-8 becomes a lone surrogate, which
    `Tokenizer.encode` names in one line (check_utf8), instead of a decode error that would
    also lose the buffered lines around it."""
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(encoding="utf-8", errors="surrogateescape")


def read_prompt(prompt: str) -> str:
    """`-p` as given, or standard input for `-p -`."""
    if prompt != "-":
        return prompt
    tolerant_stdin()
    return sys.stdin.read()


def cmd_generate(args: argparse.Namespace) -> int:
    from .cache_options import continue_prompt, open_prompt_cache
    from .generate import stream_generate

    model, tokenizer = load_checked(resolve_model(args.model))
    prompt = read_prompt(args.prompt)
    if args.system and not args.no_chat_template:
        prompt = [{"role": "system", "content": args.system}, {"role": "user", "content": prompt}]
    cache = open_prompt_cache(args, model)  # --prompt-cache FILE, or a fresh cache of the kind asked
    prompt, chat = continue_prompt(cache, prompt, False if args.no_chat_template else None)
    last = None
    for last in stream_generate(
        model, tokenizer, prompt, args.max_tokens, sampling=sampling_params(args),
        stop=args.stop, chat=chat, cache=cache,
        prefill_progress=prefill_progress,
    ):
        print(last.text, end="", flush=True)
    print()
    if last is not None:
        print_stats(last)
        if last.finish_reason == "length" and (args.max_tokens == -1
                                               or last.generation_tokens < args.max_tokens):
            flag = ("a prompt cache made with --max-kv-size" if cache.saved_prompt is not None
                    else "--max-kv-size")
            print(f"note: stopped after {last.generation_tokens} tokens, at the end of the "
                  f"model's context ({flag} lets a rotating cache go on)", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat_repl import run_repl

    return run_repl(args)


def terminate_like_interrupt() -> None:
    """Install `Terminated` for SIGTERM and SIGHUP where they still have the default action
    (a server that installs its own graceful shutdown later replaces these)."""
    def interrupt(signum, _frame):
        raise Terminated(signum)

    for name in ("SIGTERM", "SIGHUP"):
        number = getattr(signal, name, None)  # (no SIGHUP on Windows)
        try:
            if number is not None and signal.getsignal(number) is signal.SIG_DFL:
                signal.signal(number, interrupt)
        except ValueError:  # not the main thread (main() called from a library's thread)
            return


def reopen_closed_standard_streams() -> None:
    """Run with file descriptor 0, 1 or 2 closed (`mlx-llama ... <&-`, some launchers), the
    next file opened takes its number: MLX would read the weights through "standard input" and
    fail as if they were corrupt. Holding the numbers with /dev/null keeps files off them."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDONLY if fd == 0 else os.O_WRONLY)  # takes the lowest: fd
    if sys.stdin is None:  # Python found fd 0 closed: now it reads as an empty file, as </dev/null
        sys.stdin = open(0, closefd=False)


class OneLineParser(argparse.ArgumentParser):
    """A bad flag is one line naming it and where the usage is, not the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from .cache_options import add_cache_arguments

    parser = OneLineParser(
        prog="mlx-llama",
        description="Run Llama-family models locally with MLX: convert, generate, chat, serve.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt")
    add_model_argument(g)
    g.add_argument("-p", "--prompt", default=DEFAULT_PROMPT, help="prompt text, or - for stdin")
    g.add_argument("--system", default=None, help="system message (chat models)")
    g.add_argument("--no-chat-template", action="store_true",
                   help="send the prompt as raw text even if the model has a chat template")
    add_sampling_arguments(g)
    add_cache_arguments(g)  # --kv-bits, --kv-group-size, --quantized-kv-start, --max-kv-size, --prompt-cache
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat that keeps the conversation's cache")
    add_model_argument(c)
    c.add_argument("--system", default=None, help="system message")
    add_sampling_arguments(c)
    add_cache_arguments(c, prompt_cache=False)  # the conversation is its own prompt cache
    c.set_defaults(func=cmd_chat)

    for name, (module, add, run) in EXTERNAL.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue  # optional part not installed (e.g. the server extra)
        p = sub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0])
        getattr(mod, add)(p)
        p.set_defaults(func=getattr(mod, run))
    parser.commands = dict(sub.choices)  # for main(): a stray flag is named with its command
    return parser


def main(argv: list[str] | None = None) -> int:
    try:  # parsing is inside: building the parser imports every subcommand (a Ctrl-C lands there)
        reopen_closed_standard_streams()
        terminate_like_interrupt()
        parser = build_parser()
        args, stray = parser.parse_known_args(argv)
        if stray:  # argparse would point at `mlx-llama --help`, not at the command's own help
            parser.commands[args.command].error(f"unrecognized arguments: {' '.join(stray)}")
        return int(args.func(args) or 0)
    except MlxLlamaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Terminated as e:
        print(f"\nterminated ({signal.Signals(e.signum).name})", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
