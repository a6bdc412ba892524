"""How far one text can be trusted: per-token NLL differences between a quantized model and its
float source, with a bootstrap interval of the perplexity ratio and the share of the top tokens.

    python benchmarks/ppl_interval.py --src FLOAT_FOLDER --quant QUANT_FOLDER --text A.txt B.txt

A recipe's "+2.0%" on a 246-token paragraph is the mean of 245 per-token differences, a few of
which carry much of it; the interval says which differences between recipes that text can rank
(docs/quantization.md). Tokens are encoded once, by the source's tokenizer, as in
quant_quality.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def interval(delta: np.ndarray, rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval (over tokens) of exp(mean delta) - 1, the perplexity change."""
    rng = np.random.default_rng(seed)
    means = np.array([delta[rng.integers(0, len(delta), len(delta))].mean()
                      for _ in range(rounds)])
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(np.expm1(lo)), float(np.expm1(hi))


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
        lo, hi = interval(delta)
        top = np.sort(delta)[::-1][:3]
        print(f"{path.name}: {len(delta)} tokens, {100 * np.expm1(delta.mean()):+.2f}% "
              f"(95% interval {100 * lo:+.2f}% to {100 * hi:+.2f}%), top 3 tokens carry "
              f"{100 * top.sum() / delta.sum():.0f}% of the loss", flush=True)
        results[path.name] = (float(np.expm1(delta.mean())), lo, hi)
    return results


if __name__ == "__main__":
    main()
