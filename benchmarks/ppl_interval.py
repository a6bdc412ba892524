"""How far one text can be trusted: per-token NLL differences between a quantized model and its
float source, with a 95% interval of the perplexity ratio and the share of the top tokens.

    python benchmarks/ppl_interval.py --src FLOAT_FOLDER --quant QUANT_FOLDER --text A.txt B.txt

A recipe's "+2.0%" on a 246-token paragraph is the mean of 245 per-token differences, a few of
which carry much of it; the interval says which differences between recipes that text can rank
(docs/quantization.md). The interval is mlx_llama.perplexity's own standard error (the delta
method, `summarize`) applied to the paired differences, so it is as narrow as pairing makes it.
Tokens are encoded once, by the source's tokenizer, as in quant_quality.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def interval(delta: np.ndarray) -> tuple[float, float, float]:
    """(change, low, high): the perplexity change exp(mean delta) - 1 and its 95% interval."""
    from mlx_llama.perplexity import summarize

    ratio = summarize(delta)  # ppl of the differences = the ratio of the two perplexities
    return ratio.ppl - 1, ratio.ppl - 1 - 1.96 * ratio.stderr, ratio.ppl - 1 + 1.96 * ratio.stderr


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float, float]]:
    """Prints a line per text; returns {text name: (change, interval low, interval high)}."""
    p = argparse.ArgumentParser()
    p.add_argument("--src", type=Path, required=True)
    p.add_argument("--quant", type=Path, required=True)
    p.add_argument("--text", type=Path, nargs="+", required=True)
    args = p.parse_args(argv)
    from mlx_llama.loading import load_model
    from mlx_llama.perplexity import token_nlls
    from mlx_llama.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.src)
    source, _ = load_model(args.src)
    quant, _ = load_model(args.quant)
    results = {}
    for path in args.text:
        ids = tokenizer.encode(path.read_text())
        delta = token_nlls(quant, ids, 512) - token_nlls(source, ids, 512)
        change, lo, hi = interval(delta)
        top = np.sort(delta)[::-1][:3]
        print(f"{path.name}: {len(delta)} tokens, {100 * change:+.2f}% "
              f"(95% interval {100 * lo:+.2f}% to {100 * hi:+.2f}%), top 3 tokens carry "
              f"{100 * top.sum() / delta.sum():.0f}% of the loss", flush=True)
        results[path.name] = (change, lo, hi)
    return results


if __name__ == "__main__":
    main()
