"""Write the "docs" validation text: Python standard-library docstrings and the GPL-3 preamble.

    python benchmarks/docs_text.py /tmp/docs.txt

English technical prose that no calibration text of ours contains (about 2,060 SmolLM2
tokens), used beside the issue's paragraph and benchmarks/data/prose.txt to judge
quantization recipes on more than one text (docs/quantization.md). Built from what a Debian
or Ubuntu machine with Python has, so it is not shipped: every other paragraph is kept until
2,000 tokens of the source's tokenizer are reached.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import logging
import pathlib
import subprocess
import sys
import textwrap

GPL = pathlib.Path("/usr/share/common-licenses/GPL-3")


def docs_text(count_tokens, limit: int = 2000) -> str:
    parts = [inspect.getdoc(m) or "" for m in (subprocess, argparse, logging, pathlib)]
    parts += [inspect.getdoc(f) or "" for f in (
        subprocess.run, subprocess.Popen, argparse.ArgumentParser.add_argument, textwrap.wrap,
        textwrap.dedent, collections.namedtuple, collections.Counter, json.dumps, json.loads,
        logging.basicConfig)]
    gpl = GPL.read_text()
    start = gpl.index("Preamble")
    parts.append(gpl[start : start + 6000])
    kept, used = [], 0
    for paragraph in "\n\n".join(p for p in parts if p).split("\n\n")[::2]:
        n = count_tokens(paragraph)
        if used + n <= limit:
            kept.append(paragraph)
            used += n
    return "\n\n".join(kept)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=pathlib.Path)
    args = p.parse_args()
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    import checkpoints

    from mlx_llama.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(checkpoints.smollm2())
    args.out.write_text(docs_text(lambda t: len(tokenizer.encode(t))))


if __name__ == "__main__":
    main()
