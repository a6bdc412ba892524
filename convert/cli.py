"""Convert a Hugging Face model, hub repo or GGUF file into an MLX model folder.

This is `mlx-llama convert`, the command line over `convert.api.convert`. `add_convert_parser`
fills in the sub-command's parser and `run_convert` runs it; neither imports anything heavy,
so building the main parser stays fast. `main` runs the same thing stand-alone
(`python -m convert.cli SRC -o OUT`).

Every failure the user can cause — Ctrl-C included — ends as one `MlxLlamaError` line; the
caller prints it and exits 1. Set MLX_LLAMA_DEBUG=1 to see the traceback of an unexpected one.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from mlx_llama.cli import OneLineParser

DESCRIPTION = (
    "Convert a Hugging Face Llama model (local folder or hub repo id) or a .gguf file into an "
    "MLX model folder, optionally quantized."
)
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
         "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '512MiB' -> 536_870_912, '1000' -> 1000 bytes."""
    match = SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size (examples: 5GB, 500MB, 2GiB)")
    number, unit = match.groups()
    unit = (unit or "").upper().rstrip("B")
    try:
        value = int(float(number) * UNITS[unit])
    except OverflowError:  # 1e400 is infinity as a float
        raise argparse.ArgumentTypeError(f"'{text}' is far too large a size") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("the shard size must be positive")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("src", help="Hugging Face model folder, hub repo id (org/name) or .gguf file")
    parser.add_argument("-o", "--out", required=True, help="output folder (must not exist or be empty; see --force)")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"),
                        help="dtype of unquantized tensors (default: the source's)")
    parser.add_argument("-q", "--quantize", action="store_true",
                        help="quantize Linear and Embedding weights (MLX affine)")
    parser.add_argument("--bits", type=int, default=None, choices=(2, 3, 4, 5, 6, 8),
                        help="bits per quantized weight (default 4)")
    parser.add_argument("--group-size", type=int, default=None, choices=(32, 64, 128),
                        help="weights sharing one scale and bias (default 64)")
    parser.add_argument("--embeddings-bits", type=int, default=None, choices=(2, 3, 4, 5, 6, 8),
                        help="bits for the embedding and output head when quantizing (default 8)")
    parser.add_argument("--no-quantize-embeddings", action="store_true",
                        help="keep the embedding and output head unquantized")
    parser.add_argument("--method", choices=("auto", "search", "minmax", "gptq"),
                        default=None,
                        help="how each group's scale and bias are chosen: 'search' minimizes the "
                        "error, 'minmax' is plain min/max as mlx-lm does, 'gptq' adds GPTQ "
                        "error compensation from calibration (implies --calibrate builtin), "
                        "'auto' (default) searches where --calibrate/--bpw measured activations")
    parser.add_argument("--bpw", type=float, default=None,
                        help="bits-per-weight budget for the whole model (e.g. 4.5): each tensor "
                        "gets the format its measured sensitivity earns (implies -q)")
    parser.add_argument("--calibrate", metavar="FILE|builtin", default=None,
                        help="weight the quantization error by activation statistics measured "
                        "on this text ('builtin': text shipped with mlx-llama)")
    parser.add_argument("--eval", dest="eval_text", metavar="FILE", default=None,
                        help="after converting, print the perplexity of the source and of the "
                        "result on this text")
    parser.add_argument("--shard-size", type=parse_size, default="5GB",
                        help="maximum size of one output weight file (default 5GB)")
    parser.add_argument("--revision", help="hub branch, tag or commit (hub repo ids only)")
    parser.add_argument("--force", action="store_true", help="replace an existing model folder (one with a config.json)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or summary")
    return parser


def add_convert_parser(parent) -> argparse.ArgumentParser:
    """Add the `convert` arguments.

    `parent` is either the `convert` sub-parser itself (what mlx_llama.cli passes) or the main
    parser's sub-parsers object, on which a `convert` sub-parser is created. Returns the parser.
    """
    if isinstance(parent, argparse.ArgumentParser):
        parent.description = parent.description or DESCRIPTION
        return configure_parser(parent)
    parser = parent.add_parser("convert", help="convert a model to an MLX folder",
                               description=DESCRIPTION)
    return configure_parser(parser)


def check_quantization_flags(args: argparse.Namespace) -> None:
    """Refuse quantization flags that would be silently ignored: without -q/--bpw nothing is
    quantized, and --bpw chooses every tensor's bits and group size itself."""
    from mlx_llama.errors import MlxLlamaError

    given = {"--bits": args.bits, "--group-size": args.group_size,
             "--embeddings-bits": args.embeddings_bits,
             "--no-quantize-embeddings": args.no_quantize_embeddings or None}
    if args.bpw is not None:
        clash = [flag for flag, value in given.items() if value is not None]
        if clash:
            raise MlxLlamaError(f"--bpw chooses each tensor's format itself, so {', '.join(clash)} "
                                "would be ignored: drop it, or use -q without --bpw")
    elif not args.quantize:
        given |= {"--method": args.method, "--calibrate": args.calibrate}
        unused = [flag for flag, value in given.items() if value is not None]
        if unused:
            verb = "applies" if len(unused) == 1 else "apply"
            raise MlxLlamaError(f"{', '.join(unused)} only {verb} when quantizing: add -q "
                                "(or --bpw)")


def run_convert(args: argparse.Namespace) -> int:
    """Run a parsed `convert` command and return 0.

    User errors, Ctrl-C and unexpected failures all raise a one-line MlxLlamaError (the
    output folder is left as it was), which the caller prints before exiting 1.
    """
    from mlx_llama.errors import MlxLlamaError, Terminated

    from .api import convert

    check_quantization_flags(args)
    # Flags left out keep convert()'s own defaults (they are None here only to tell "given").
    given = {"bits": args.bits, "group_size": args.group_size, "method": args.method,
             "embedding_bits": args.embeddings_bits}
    options = {name: value for name, value in given.items() if value is not None}
    if args.no_quantize_embeddings:
        options["embedding_bits"] = None
    try:
        convert(
            args.src,
            args.out,
            dtype=args.dtype,
            quantize=args.quantize,
            shard_size=args.shard_size,
            revision=args.revision,
            force=args.force,
            progress=not args.no_progress,
            bpw=args.bpw,
            calibrate=args.calibrate,
            eval_text=args.eval_text,
            **options,
        )
        return 0
    except MlxLlamaError:
        raise
    except Terminated:  # (kill, timeout: exit 128 + the signal, after the same clean-up)
        print(f"conversion stopped: {args.out} was not written or changed", file=sys.stderr)
        raise
    except KeyboardInterrupt:
        raise MlxLlamaError(f"conversion interrupted: {args.out} was not written or changed") from None
    except Exception as e:
        if os.environ.get("MLX_LLAMA_DEBUG"):
            raise
        first = next(iter(str(e).splitlines()), "")
        raise MlxLlamaError(
            f"conversion failed ({type(e).__name__}: {first}); {args.out} was not written or "
            "changed (MLX_LLAMA_DEBUG=1 shows the traceback)"
        ) from e


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: returns the exit status (0, or 1 after one error line)."""
    from mlx_llama.cli import terminate_like_interrupt
    from mlx_llama.errors import MlxLlamaError, Terminated

    terminate_like_interrupt()  # `kill`/`timeout` clean up the temporary folder as Ctrl-C does
    parser = configure_parser(OneLineParser(prog="mlx-llama convert", description=DESCRIPTION))
    args = parser.parse_args(argv)
    try:
        run_convert(args)
    except MlxLlamaError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 1
    except Terminated as e:
        return 128 + e.signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
