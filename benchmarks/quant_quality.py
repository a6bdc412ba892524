"""Perplexity and bits per weight of 4-bit conversions: ours against mlx-lm, same text, same run.

    python benchmarks/quant_quality.py --src SMOLLM2_BF16_FOLDER --text tests/data/paragraph.txt
    python benchmarks/docs_text.py /tmp/docs.txt && python benchmarks/quant_quality.py \
        --src SMOLLM2_BF16_FOLDER --text tests/data/paragraph.txt benchmarks/data/prose.txt /tmp/docs.txt

Rows: the float source; mlx-lm's `convert(quantize=True)` at group 64 and 32 (its default
recipe: min/max 4-bit everywhere); our converter with min/max (the same recipe plus 8-bit
embeddings); ours with calibration only (4-bit everywhere, activation-weighted scale search);
ours under `--bpw` budgets (formats by measured sensitivity), with and without GPTQ. Perplexity is
mlx_llama.perplexity over the whole text (windows of 512 tokens), bits per weight counts
everything stored (codes, scales, biases, norms) per parameter of the source. Several
`--text` files give one column each: one short text ranks recipes by its own quirks
(docs/quantization.md, "One paragraph cannot decide").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx


def stored_bpw(folder: Path, source: Path) -> float:
    stored = sum(a.nbytes for f in folder.glob("*.safetensors") for a in mx.load(str(f)).values())
    params = sum(a.size for f in source.glob("*.safetensors") for a in mx.load(str(f)).values())
    return stored * 8 / params


def ppl(folder: Path, tokens: list[int]) -> float:
    """Perplexity of `tokens` (encoded once, by the source's tokenizer, for every row: a
    converter may rewrite tokenizer files, and a different encoding is a different test)."""
    from mlx_llama.loading import load_model
    from mlx_llama.perplexity import perplexity

    model, _ = load_model(folder)
    return perplexity(model, tokens, 512).ppl


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--src", type=Path, required=True)
    p.add_argument("--text", type=Path, nargs="+", required=True)
    p.add_argument("--work", type=Path, default=Path("/tmp/quant_quality"))
    p.add_argument("--only", nargs="+", default=None,
                   help="row names (as printed; some contain commas), one argument each")
    p.add_argument("--source-ppl", type=float, nargs="+", default=None,
                   help="the source's perplexity on each --text, when already measured "
                   "(skips that run)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    from convert.api import convert

    from mlx_llama.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.src)
    texts = {path.name: tokenizer.encode(path.read_text()) for path in args.text}
    if args.source_ppl is not None and len(args.source_ppl) != len(texts):
        p.error("give one --source-ppl per --text")
    args.work.mkdir(parents=True, exist_ok=True)
    rows = {
        "mlx-lm 4-bit g64": lambda o: _mlx_lm(args.src, o, 64),
        "mlx-lm 4-bit g32": lambda o: _mlx_lm(args.src, o, 32),
        "ours min/max 4-bit g64, 4-bit embeddings": lambda o: convert(
            args.src, o, quantize=True, method="minmax", embedding_bits=4, force=True),
        "ours calibrated 4-bit g64, 4-bit embeddings": lambda o: convert(
            args.src, o, quantize=True, calibrate="builtin", embedding_bits=4, force=True),
        "ours --bpw 4.5": lambda o: convert(args.src, o, bpw=4.5, force=True),
        "ours --bpw 5.0": lambda o: convert(args.src, o, bpw=5.0, force=True),
        "ours --bpw 4.5 --method gptq": lambda o: convert(args.src, o, bpw=4.5, method="gptq",
                                                          force=True),
        "ours --bpw 5.0 --method gptq": lambda o: convert(args.src, o, bpw=5.0, method="gptq",
                                                          force=True),
    }
    wanted = args.only or list(rows)
    unknown = set(wanted) - set(rows)
    if unknown:
        p.error(f"unknown rows {sorted(unknown)}: choose from {list(rows)}")
    full = (dict(zip(texts, args.source_ppl)) if args.source_ppl
            else {name: ppl(args.src, ids) for name, ids in texts.items()})
    results = [{"name": "source (float)", "ppl": full, "bpw": 16.0, "seconds": 0.0}]
    print(f"{'source (float)':45s} " + "  ".join(f"{t} {v:.3f}" for t, v in full.items()),
          flush=True)
    for i, (name, make) in enumerate(rows.items()):
        if name not in wanted:
            continue
        out = args.work / f"row{i}"
        start = time.perf_counter()
        make(out)
        seconds = time.perf_counter() - start
        values = {t: ppl(out, ids) for t, ids in texts.items()}
        bpw = stored_bpw(out, args.src)
        results.append({"name": name, "ppl": values, "bpw": bpw, "seconds": seconds})
        scores = "  ".join(f"{t} {v:.3f} ({100 * (v / full[t] - 1):+.1f}%)"
                           for t, v in values.items())
        print(f"{name:45s} {scores}  {bpw:.3f} bpw  {seconds:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def _mlx_lm(src: Path, out: Path, group: int) -> None:
    import shutil

    from mlx_lm import convert as mlx_lm_convert

    shutil.rmtree(out, ignore_errors=True)
    mlx_lm_convert(str(src), str(out), quantize=True, q_group_size=group, q_bits=4)


if __name__ == "__main__":
    main()
