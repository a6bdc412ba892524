"""Measure the full-precision source before quantizing it, and judge the result after.

`prepare_recipe` runs before any tensor is written, when the recipe asks for calibration
(`--calibrate`) or a bits-per-weight budget (`--bpw`):
1. the source model runs forward and backward over the calibration text (calibrate.py);
2. each matrix gets error weights for its scale search: the mean square of its input
   channels (the embedding: a rank-2 mix of its head and lookup roles);
3. with a budget, each matrix's cost in every candidate format is measured and one format per
   matrix is chosen to minimize the total under the budget (sensitivity.py).
The model used for this is built from a fresh, lazily read copy of the source weights, so the
tensors the writer later streams are not held in memory by it; it costs the model's size in
float32 while it runs, and is freed before writing starts.

`evaluate` scores the source and the written folder on a text (`--eval FILE`): perplexity,
with the same tokenizer and the same windows for both.
"""

from __future__ import annotations

import math
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_llama.config import ModelConfig
from mlx_llama.errors import MlxLlamaError

from .calibrate import DEFAULT_MAX_TOKENS, Calibration, calibrate, read_calibration_text
from .quantize import (HIGH_PRECISION_MODULES, QUANTIZABLE_LEAVES, QuantRecipe, QuantSpec,
                       most_common)
from .affine import bits_per_weight
from .sensitivity import FORMATS, Importance, allocate, format_cost, lookup_frequencies

# Added to every channel's weight, relative to the mean: a channel the calibration text never
# excites still gets some weight, so its groups are not left to chance.
IMPORTANCE_FLOOR = 0.01


def source_model(weights: dict[str, mx.array], cfg: ModelConfig):
    """A float32 `Llama` from (lazy) source weights, named as mapping.map_weights names them.

    On the CPU backend its matmuls are split over the cores (cpu_streams): MLX's CPU matmul is
    one thread, and calibration's forward and backward passes are most of a `--bpw`
    conversion's time.
    """
    from mlx_llama.cpu_streams import use_cpu_streams
    from mlx_llama.fused import lean_graph
    from mlx_llama.model import Llama

    model = Llama(cfg)
    model.load_weights([(k, v.astype(mx.float32)) for k, v in weights.items()], strict=True)
    mx.eval(model.parameters())
    if lean_graph():
        use_cpu_streams(model, dense=True)
    model.eval()
    return model


def source_tokenizer(files: dict[str, str | bytes]):
    """The source's tokenizer, loaded from its files (written to a temporary folder)."""
    from mlx_llama.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        for name, content in files.items():
            data = content.encode() if isinstance(content, str) else content
            (Path(tmp) / name).write_bytes(data)
        return load_tokenizer(Path(tmp))


def prepare_recipe(
    recipe: QuantRecipe,
    open_weights: Callable[[], dict[str, mx.array]],
    cfg: ModelConfig,
    files: dict[str, str | bytes],
    dtype: mx.Dtype | None,
    progress: bool = False,
) -> Calibration | None:
    """Fill `recipe.importance` (and, with a budget, `recipe.overrides`) from measurements."""
    gptq = recipe.method == "gptq"
    if not recipe.measures:
        return None
    text = read_calibration_text(recipe.calibration or "builtin")
    tokens = source_tokenizer(files).encode(text)
    model = source_model(open_weights(), cfg)  # the lazy source arrays die with the call
    if progress:
        print(f"Calibrating on {min(len(tokens), DEFAULT_MAX_TOKENS)} tokens of "
              f"{recipe.calibration or 'builtin'} text...", flush=True)
    cal = calibrate(model, tokens, covariance=gptq)
    seen = mx.array(tokens[:DEFAULT_MAX_TOKENS])
    counts = mx.zeros((cfg.vocab_size,), mx.float32).at[seen].add(1.0)
    recipe.importance = channel_importance(cal, cfg, counts)
    if gptq:
        recipe.gptq_inputs = cal
    if recipe.bpw is not None:
        params = dict(tree_flatten(model.parameters()))
        del model
        choose_formats(recipe, params, cal, counts, dtype, progress)
    return cal


def channel_importance(cal: Calibration, cfg: ModelConfig,
                       counts: mx.array) -> dict[str, Importance]:
    """Per-module error weights for the scale search."""

    def floor(v: mx.array) -> mx.array:
        return v + IMPORTANCE_FLOOR * v.mean() + 1e-12

    out: dict[str, Importance] = {}
    for module, h in cal.inputs.items():
        if module != "model.embed_tokens":
            out[module] = Importance(floor(h))
    lookup_rows = lookup_frequencies(counts)
    if cfg.tie_word_embeddings:
        head_rows = cal.outputs["model.embed_tokens"]
        rows = mx.stack([head_rows / head_rows.mean(), lookup_rows / lookup_rows.mean()], axis=1)
        cols = mx.stack([cal.inputs["model.embed_tokens"] * head_rows.mean(),
                         cal.lookup * lookup_rows.mean()], axis=0)
        out["model.embed_tokens"] = Importance(floor(cols), rows)
    else:
        out["model.embed_tokens"] = Importance(floor(cal.lookup)[None], lookup_rows[:, None])
    return out


def cost_factors(module: str, cal: Calibration, counts: mx.array, tied: bool):
    """(rows (out, r), cols (r, in)) with rows @ cols = F_i h_j for `module`."""
    rows, cols = [], []
    if module != "model.embed_tokens" or tied:
        rows.append(cal.outputs[module])
        cols.append(cal.inputs[module])
    if module == "model.embed_tokens":
        rows.append(lookup_frequencies(counts))
        cols.append(cal.lookup)
    return mx.stack(rows, axis=1), mx.stack(cols, axis=0)


def choose_formats(recipe: QuantRecipe, params: dict[str, mx.array], cal: Calibration,
                   counts: mx.array, dtype: mx.Dtype | None, progress: bool) -> None:
    """Measure every matrix in every format and pick formats under the bits budget."""
    tied = "lm_head.weight" not in params
    costs: dict[str, dict[tuple[int, int], float]] = {}
    sizes: dict[str, int] = {}
    total_params = 0
    other_bits = 0.0
    scale_bits = 16
    # GPTQ prices each format on half covariances and their inverse factors (gptq_halves):
    # held for one input at a time, the modules that share it taken one after another.
    gptq = recipe.method == "gptq"
    halves = None  # (owner, gptq_halves(owner))
    order = sorted(params, key=lambda n: cal.owner(n.rpartition(".")[0]) if gptq else "")
    for name in order:
        w = params[name]
        stored = dtype or w.dtype
        total_params += w.size
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        formats = []
        if module is not None and w.ndim == 2 and module.rsplit(".", 1)[-1] in QUANTIZABLE_LEAVES:
            formats = [f for f in FORMATS if w.shape[1] % f[1] == 0]
        if not formats:
            other_bits += w.size * 8 * stored.size
            continue
        scale_bits = 8 * stored.size
        wq = w.astype(stored)
        factors = cost_factors(module, cal, counts, tied)
        importance = recipe.importance.get(module)
        pair = None
        if gptq and recipe.gptq_covers(module):
            if halves is None or halves[0] != cal.owner(module):
                halves = (cal.owner(module), gptq_halves(cal, module))
            pair = halves[1]
        costs[module] = {f: format_cost(wq, f[0], f[1], factors, importance, halves=pair)
                         for f in formats}
        sizes[module] = w.size
    check_budget(recipe.bpw, costs, sizes, total_params, other_bits, scale_bits)
    budget = recipe.bpw * total_params - other_bits
    choice = allocate(costs, sizes, budget, scale_bits)
    recipe.overrides = {m: QuantSpec(*f) for m, f in choice.items()}
    default = most_common(recipe.overrides, recipe.default)
    recipe.bits, recipe.group_size = default.bits, default.group_size
    if progress:
        print(describe_choice(recipe.overrides), flush=True)


def check_budget(bpw: float, costs: dict, sizes: dict[str, int], total_params: int,
                 other_bits: float, scale_bits: int) -> None:
    """Refuse a --bpw no choice can meet, naming the smallest that can: the tensors that
    cannot be quantized (widths that are no whole number of groups) are paid in full."""
    if not costs:
        raise MlxLlamaError(
            "--bpw has nothing to spend its budget on: no matrix of this model has a width "
            "that is a whole number of 32-column groups, so none can be quantized; drop --bpw "
            "(the model then converts unquantized)")
    cheapest = sum(sizes[t] * min(bits_per_weight(*f, scale_bits) for f in c)
                   for t, c in costs.items())
    smallest = (cheapest + other_bits) / max(total_params, 1)
    if smallest > bpw:
        raise MlxLlamaError(
            f"--bpw {bpw:g} is too low for this model: its smallest formats, with the tensors "
            f"that stay in float, need {smallest:.2f} bits per weight; give --bpw "
            f"{math.ceil(smallest * 100) / 100:g} or more")


def gptq_halves(cal: Calibration, module: str):
    """((H_a, U_a), (H_b, U_b)): `module`'s input covariance on each half of the calibration
    text, with its GPTQ inverse factor (what format_cost fits on one half, prices on the other)."""
    from .gptq import with_factor

    return tuple(with_factor(h) for h in cal.covariance_halves(module))


def describe_choice(overrides: dict[str, QuantSpec]) -> str:
    """One line: how many matrices got each format (the config lists them one by one)."""
    counts = Counter(overrides.values())
    parts = [f"{n} x {s.bits}-bit/g{s.group_size}" for s, n in
             sorted(counts.items(), key=lambda kv: (kv[0].bits, -kv[0].group_size))]
    special = [f"{m.rsplit('.', 1)[-1]} {overrides[m].bits}-bit" for m in HIGH_PRECISION_MODULES
               if m in overrides]
    extra = f" ({', '.join(special)})" if special else ""
    return "Formats by sensitivity: " + ", ".join(parts) + extra


def evaluate(out: Path, open_weights: Callable[[], dict[str, mx.array]], cfg: ModelConfig,
             text_path: str, context: int = 512, progress: bool = False) -> dict[str, float]:
    """Perplexity of the source (float32) and of the converted folder on a text file."""
    from mlx_llama.loading import load
    from mlx_llama.perplexity import perplexity, read_text

    text = read_text(text_path)
    converted, tokenizer = load(out)
    tokens = tokenizer.encode(text)
    if len(tokens) < 2:
        raise MlxLlamaError(f"{text_path} has fewer than 2 tokens: give a longer --eval text")
    context = min(context, cfg.max_position_embeddings)
    bar = _evaluation_progress(len(tokens), show=progress)
    quantized = perplexity(converted, tokens, context, progress=bar("converted")).ppl
    del converted
    reference = perplexity(source_model(open_weights(), cfg), tokens, context,
                           progress=bar("source")).ppl
    return {"source": reference, "converted": quantized, "tokens": len(tokens)}


def _evaluation_progress(n_tokens: int, show: bool) -> Callable[[str], Callable[[int, int], None] | None]:
    """Per-model window counters on stderr: scoring two models can take minutes on a CPU."""
    if not show:
        return lambda _name: None
    print(f"Evaluating on {n_tokens} tokens (the converted model, then the source)",
          file=sys.stderr, flush=True)

    def for_model(name: str) -> Callable[[int, int], None]:
        def report(done: int, total: int) -> None:  # redraws on a terminal; a log gets the last
            if sys.stderr.isatty():
                print(f"\r{name}: window {done}/{total}", end="\n" if done == total else "",
                      file=sys.stderr, flush=True)
            elif done == total:
                print(f"{name}: {total} windows", file=sys.stderr, flush=True)
        return report
    return for_model


def count_eval_tokens(files: dict[str, str | bytes], text_path: str) -> int:
    """Tokens in the --eval text under the source's tokenizer, before any conversion work."""
    from mlx_llama.perplexity import read_text
    from mlx_llama.tokenizer import load_tokenizer

    from .writer import write_extra_files

    with tempfile.TemporaryDirectory() as tmp:
        write_extra_files(Path(tmp), files)  # the tokenizer files, as the output will have them
        return len(load_tokenizer(tmp).encode(read_text(text_path)))


def format_evaluation(result: dict[str, float], text_path: str) -> str:
    change = 100 * (result["converted"] / result["source"] - 1)
    return (f"Perplexity on {text_path} ({int(result['tokens'])} tokens): "
            f"source {result['source']:.3f}, converted {result['converted']:.3f} ({change:+.2f}%)")


def check_texts(eval_text: str | None, calibration: str | None) -> None:
    """Refuse a missing --eval or --calibrate file before any work is done."""
    from mlx_llama.perplexity import read_text

    if eval_text is not None and not read_text(eval_text).strip():
        raise MlxLlamaError(f"the --eval text {eval_text} is empty: give a text to score")
    if calibration is not None:
        read_calibration_text(calibration)
