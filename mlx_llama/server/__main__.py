"""`python -m mlx_llama.server ...`: the same as `mlx-llama serve ...`."""

from __future__ import annotations

import sys

from ..errors import MlxLlamaError
from ..cli import OneLineParser
from . import cli


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m mlx_llama.server",
                           description=(cli.__doc__ or "").splitlines()[0])
    cli.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cli.run(args)
    except MlxLlamaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
