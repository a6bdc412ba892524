"""`convert(src, out)`: a Hugging Face folder, hub repo or GGUF file -> an MLX model folder.

The steps, each in its own module:
1. open the source lazily (safetensors_source / gguf / mlx_llama.hub for repo ids);
2. map and check names and shapes against the config (mapping);
3. decide per tensor: cast, quantize, or pass through (quantize);
4. stream the tensors to shards in a temporary folder, load the result back with the runtime's
   own loader, run one token through it, and only then move it into place (writer).

Default dtype: the one the source declares in config.json (`torch_dtype`, or `dtype` in newer
transformers), as mlx-lm does; a float32 checkpoint stays float32 unless `dtype` says
otherwise (bfloat16 halves it). With no declaration each tensor keeps its stored dtype.
"""

from __future__ import annotations

import errno
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from mlx_llama.config import ModelConfig
from mlx_llama.errors import MlxLlamaError, Terminated

from .mapping import map_weights, natural_key
from .quantize import (VALID_BITS, VALID_GROUP_SIZES, QuantRecipe, QuantSpec, plan_tensor,
                       quantization_block, requested_spec, spec_from_block)
from .safetensors_source import COPIED_FILES, COPIED_PATTERNS, INDEX_FILE, read_folder
from .source import SourceModel
from .writer import (check_destination, staged_folder, write_extra_files, write_json,
                     write_weights)

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
DEFAULT_SHARD_SIZE = 5 * 10**9
# What a conversion downloads from a hub repo: never pickles, GGUF files or images.
HUB_PATTERNS = ["config.json", "*.safetensors", INDEX_FILE, *COPIED_FILES, *COPIED_PATTERNS]


@dataclass
class Plan:
    """The output tensors (lazy) in write order, and what was decided for them."""

    tensors: list = field(default_factory=list)
    specs: dict[str, QuantSpec] = field(default_factory=dict)
    params: int = 0
    # Matrices the recipe asked to quantize, kept in float because their rows are not whole
    # groups (quantize.plan_tensor); the summary says so.
    ungrouped: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t[1].nbytes for t in self.tensors if t is not None)


def convert(
    src: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    quantize: bool = False,
    bits: int = 4,
    group_size: int = 64,
    embedding_bits: int | None = 8,
    shard_size: int = DEFAULT_SHARD_SIZE,
    revision: str | None = None,
    force: bool = False,
    progress: bool = True,
    verify: bool = True,
    method: str = "auto",
    bpw: float | None = None,
    calibrate: str | None = None,
    eval_text: str | None = None,
) -> Path:
    """Convert `src` (HF folder, hub repo id, or .gguf file) into the MLX folder `out`.

    dtype: float16 | bfloat16 | float32 for unquantized tensors (default: the source's).
    quantize/bits/group_size: MLX affine quantization of Linear and Embedding weights.
    embedding_bits: bits for the embedding and output head when quantizing (None: keep them
      unquantized at `dtype`).
    shard_size: maximum bytes per output safetensors file.
    force: replace an existing `out` (atomically).
    progress: progress bars on a terminal, and a summary line on stdout.
    verify: load the result with the runtime and run one token before moving it into place.
    method: "auto" | "search" (error-minimizing scales) | "minmax" (mx.quantize, as mlx-lm).
    bpw: a bits-per-weight budget; formats are chosen per tensor by measured sensitivity
      (implies quantize). calibrate: "builtin" or a text file whose activation statistics
      weight the scale search. eval_text: print the perplexity of source and result on it.
    See convert/quantize.py and docs/quantization.md.
    Returns the output folder. User errors raise MlxLlamaError with one line.
    """
    out = Path(out).expanduser()
    quantize = quantize or bpw is not None
    recipe = (QuantRecipe(bits, group_size, embedding_bits, method, bpw, calibrate)
              if quantize else None)
    if dtype is not None and dtype not in DTYPES:
        raise MlxLlamaError(f"--dtype {dtype} is not supported: choose float16, bfloat16 or float32")
    if shard_size <= 0:
        raise MlxLlamaError("--shard-size must be positive")
    _refuse_overwriting_source(src, out)
    check_destination(out, force)  # fail before a long download, not after
    if eval_text is not None or calibrate is not None:
        from .measure import check_texts

        check_texts(eval_text, calibrate)

    source = open_source(src, revision, progress)
    if not {"tokenizer.json", "tokenizer.model"} & set(source.files):
        raise MlxLlamaError(
            f"{src} has no tokenizer (tokenizer.json or tokenizer.model), so the converted model "
            "could not run: copy the tokenizer files from the original model into it"
        )
    if eval_text is not None and (source.quantization is not None
                                  or any(k.endswith(".scales") for k in source.weights)):
        raise MlxLlamaError(
            f"--eval compares the result with the full-precision source, and {src} is already "
            "quantized: convert from the original checkpoint to measure, or drop --eval")
    if eval_text is not None:
        from .measure import count_eval_tokens

        if count_eval_tokens(source.files, eval_text) < 2:
            raise MlxLlamaError(f"the --eval text {eval_text} has fewer than 2 tokens under "
                                f"{src}'s tokenizer: give a longer text to score")
    _refuse_other_quantization_modes(src, source.quantization)
    cfg = ModelConfig.from_dict(source.config)
    target = dtype or declared_dtype(source.config)
    weights = map_weights(source.weights, cfg)
    reopen = lambda: map_weights(open_source(src, revision, False).weights, cfg)  # noqa: E731
    if recipe is not None and recipe.measures and source.quantization is None:
        from .measure import prepare_recipe  # (and numba, through the search it measures with)

        prepare_recipe(recipe, reopen, cfg, source.files, DTYPES.get(target), progress)
    plan = plan_tensors(weights, DTYPES.get(target), recipe, source.quantization)
    config = output_config(source.config, target, plan, recipe, source.quantization)
    total_bytes = plan.nbytes
    try:
        with staged_folder(out, force) as tmp:
            with _bar(total_bytes, "Converting", progress) as bar:
                write_weights(tmp, plan.tensors, shard_size, lambda _n, b: bar.update(b))
            write_extra_files(tmp, source.files)
            write_json(tmp / "config.json", config)
            summary = describe(plan, recipe, config, total_bytes)
            name = Path(os.path.realpath(out)).name  # (`-o .` or a symlink: the real name)
            (tmp / "README.md").write_text(model_card(name, source, summary))
            if verify:
                verify_folder(tmp)
    except OSError as e:
        raise MlxLlamaError(_write_error(e, out, total_bytes)) from None
    if progress:
        print(f"Converted {source.source} -> {out}: {summary}")
    if eval_text is not None:
        from .measure import evaluate, format_evaluation

        try:  # the folder is in place now: a failure here must not claim it was not written
            result = evaluate(out, reopen, cfg, eval_text, progress=progress)
            print(format_evaluation(result, eval_text), flush=True)
        except KeyboardInterrupt as e:
            if isinstance(e, Terminated):
                raise
            raise MlxLlamaError(f"evaluation interrupted; {out} was written") from None
        except Exception as e:  # noqa: BLE001 - one line, with what did happen
            first = next(iter(str(e).splitlines()), type(e).__name__)
            raise MlxLlamaError(f"{out} was written, but evaluating it on {eval_text} failed: "
                                f"{first}") from e
    return out


def open_source(src: str | Path, revision: str | None, progress: bool) -> SourceModel:
    """Dispatch on what `src` is: a .gguf file, a local folder, or a hub repo id."""
    from mlx_llama.hub import download, looks_like_repo_id, snapshot_revision, with_local_hint

    path = Path(src).expanduser()
    if path.exists() and revision is not None:
        raise MlxLlamaError(f"--revision is for hub repo ids; {path} is a local path")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise MlxLlamaError(
                f"{path} is a file: give a Hugging Face model folder, a hub repo id or a .gguf file"
            )
        return read_gguf_file(path)
    if path.is_dir():
        return read_folder(path)
    if isinstance(src, str) and looks_like_repo_id(src):
        try:
            folder = download(src, revision, HUB_PATTERNS, progress=progress)
        except MlxLlamaError as e:
            raise with_local_hint(src, e) from None
        commit = snapshot_revision(folder)
        label = f"{src}@{commit}" if commit else src
        try:
            return read_folder(folder, label=label)
        except MlxLlamaError as e:
            if "only PyTorch" in str(e) or "no weights" in str(e):
                raise MlxLlamaError(
                    f"{src} has no .safetensors weights (mlx-llama never downloads pickled .bin "
                    "files): pick a revision or repo that has safetensors, e.g. --revision refs/pr/1"
                ) from None
            raise
    raise MlxLlamaError(
        f"{src} does not exist: give a Hugging Face model folder, a hub repo id (org/name) or a "
        ".gguf file"
    )


def _refuse_other_quantization_modes(src: str | Path, block: dict | None) -> None:
    """mxfp4/nvfp4/mxfp8 folders (mlx-lm `--q-mode`) pack without biases: the converter's
    checks and its config block are affine-only, but the runtime reads them as they are."""
    if block is None:
        return
    modes = {block.get("mode") or "affine"} | {
        v.get("mode") or "affine" for v in block.values() if isinstance(v, dict)}
    other = sorted(modes - {"affine"})
    if other:
        raise MlxLlamaError(
            f"{src} is quantized in mode '{other[0]}', and the converter re-writes only affine "
            f"quantization: run the folder as it is (`mlx-llama generate -m {src}`), or convert "
            "the original float model")


def _refuse_overwriting_source(src: str | Path, out: Path) -> None:
    """`--force` onto the source folder (or a folder holding it) would delete the source."""
    source = Path(src).expanduser()
    if not source.exists():
        return
    source, target = source.resolve(), out.resolve()
    if source == target or target in source.parents:
        raise MlxLlamaError(
            f"the output folder {out} would replace the source {src}: choose another output path"
        )


def read_gguf_file(path: Path) -> SourceModel:
    try:
        from .gguf import read_gguf
    except ImportError:
        raise MlxLlamaError("GGUF import is not available in this installation") from None
    return read_gguf(path)


def declared_dtype(config: dict) -> str | None:
    """The dtype config.json declares (transformers 4: torch_dtype, 5: dtype), if it is one we use."""
    for key in ("torch_dtype", "dtype"):
        value = config.get(key)
        if value in DTYPES:
            return value
    return None


def plan_tensors(
    weights: dict[str, mx.array],
    dtype: mx.Dtype | None,
    recipe: QuantRecipe | None,
    source_quantization: dict | None,
) -> Plan:
    """Decide every output tensor, lazily. `weights` is emptied (see writer.write_weights)."""
    plan = Plan()
    prequantized = {n[: -len(".scales")] for n in weights if n.endswith(".scales")}
    if prequantized and source_quantization is None:
        raise MlxLlamaError(
            "the source has quantized tensors (.scales) but no quantization settings in its "
            "config: it cannot be read; convert the original float model"
        )
    if prequantized and recipe is not None:
        raise MlxLlamaError(
            "the source is already quantized: quantizing it again would stack two rounding "
            "errors; drop -q (and --bpw) to keep its quantization, or convert the original float model"
        )
    for module in sorted(prequantized, key=natural_key):
        check_packed(module, weights, spec_from_block(module, source_quantization))
    for name in list(weights):
        array = weights.pop(name)
        module = name.rsplit(".", 1)[0]
        if module in prequantized:  # arrives quantized (GGUF, MLX folder): passed through as is
            if name.endswith(".weight"):
                spec = spec_from_block(module, source_quantization)
                plan.specs[module] = spec
                plan.params += array.shape[0] * array.shape[1] * 32 // spec.bits
            plan.tensors.append((name, array))
            continue
        if dtype is not None and mx.issubdtype(array.dtype, mx.floating) and array.dtype != dtype:
            array = array.astype(dtype)
        plan.params += array.size
        spec = plan_tensor(name, tuple(array.shape), recipe) if recipe else None
        if spec is None:
            if recipe and requested_spec(name, tuple(array.shape), recipe) is not None:
                plan.ungrouped.append(module)
            plan.tensors.append((name, array))
            continue
        wq, scales, biases = recipe.quantize(module, array, spec)
        plan.specs[module] = spec
        plan.tensors += [(f"{module}.weight", wq), (f"{module}.scales", scales),
                         (f"{module}.biases", biases)]
    return plan


def check_packed(module: str, weights: dict[str, mx.array], spec: QuantSpec) -> None:
    """The config's bits and group size must be the ones the packed tensors were made with.

    Packed codes hold 32/bits columns per uint32 and scales one value per group, so both give
    the input width; a config that disagrees would load into garbage (or a broken shape).
    """
    packed, scales = weights[f"{module}.weight"], weights[f"{module}.scales"]
    if spec.bits not in VALID_BITS or spec.group_size not in VALID_GROUP_SIZES:
        raise MlxLlamaError(
            f"the source's quantization block gives {module} {spec.bits}-bit, group size "
            f"{spec.group_size}, which MLX cannot read: the config is damaged; convert the "
            "original float model")
    width = packed.shape[-1] * 32 // spec.bits
    if packed.ndim != 2 or scales.ndim != 2 or width != scales.shape[-1] * spec.group_size:
        raise MlxLlamaError(
            f"{module} is packed as {tuple(packed.shape)} with scales {tuple(scales.shape)}, "
            f"which does not fit the {spec.bits}-bit, group size {spec.group_size} its config "
            "declares: the config and the weights do not belong together")


def output_config(
    config: dict,
    dtype: str | None,
    plan: Plan,
    recipe: QuantRecipe | None,
    source_quantization: dict | None,
) -> dict:
    """The source config, plus mlx-lm's quantization block (mirrored as quantization_config)."""
    out = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    if dtype is not None:
        keys = [k for k in ("torch_dtype", "dtype") if k in out] or ["torch_dtype"]
        out.update({k: dtype for k in keys})
    if plan.specs:
        if recipe is not None:
            default = recipe.default
        else:
            default = spec_from_block("", source_quantization or {})
        block = quantization_block(plan.specs, default)
        out["quantization"] = block
        out["quantization_config"] = dict(block)
    return out


def describe(plan: Plan, recipe: QuantRecipe | None, config: dict, nbytes: int) -> str:
    """One line: size, bits per weight (scales and biases counted) and what was quantized."""
    bpw = nbytes * 8 / max(plan.params, 1)
    if plan.specs:
        block = config["quantization"]
        what = f"{block['bits']}-bit affine, group size {block['group_size']}"
        overrides = {k: v for k, v in block.items() if isinstance(v, dict)}
        if overrides:
            kinds = sorted({f"{v['bits']}-bit" for v in overrides.values()})
            what += f" ({len(overrides)} layer{'s' if len(overrides) > 1 else ''} at {'/'.join(kinds)})"
        if recipe is not None and recipe.embedding_bits is None:
            what += ", embeddings unquantized"
    else:
        what = f"unquantized ({config.get('torch_dtype') or config.get('dtype') or 'source dtype'})"
    if plan.ungrouped:  # only filled under a recipe
        n = len(plan.ungrouped)
        what += (f"; {n} matri{'ces' if n > 1 else 'x'} kept in float: rows not whole groups of "
                 f"{recipe.group_size} (choose a --group-size that divides them)")
    return f"{nbytes / 1e6:.1f} MB, {bpw:.2f} bits per weight, {what}"


def model_card(name: str, source: SourceModel, summary: str) -> str:
    base = source.source.split("@", 1)[0]
    front = ["---", "library_name: mlx", "pipeline_tag: text-generation", "tags:", "- mlx",
             "- mlx-llama"]
    if "/" in base and not Path(base).exists():
        front.append(f"base_model: {base}")
    front.append("---")
    lines = [
        *front,
        f"# {name}",
        "",
        f"Converted to MLX with mlx-llama from `{source.source}`.",
        "",
        f"- Weights: {summary}",
        "",
        "```sh",
        f'mlx-llama generate -m {name} -p "Hello"',
        "```",
        "",
    ]
    return "\n".join(lines)


def verify_folder(folder: Path) -> None:
    """Load the written folder with the runtime's loader and push one token through it.

    The pass goes layer by layer and drops each layer once it has run, so checking a large
    model needs about one layer's memory, not the whole model's. A quantized model computes in
    the runtime's default dtype for this backend (float32 on CPU, where half-precision
    quantized matmuls are an order of magnitude slower; only scales and norms get cast). An
    unquantized one keeps its stored dtype, so its big matrices are not copied to float32.
    """
    from mlx_llama.loading import load_model, read_config

    quantized = "quantization" in read_config(folder)
    try:
        model, _ = load_model(folder, compute_dtype="auto" if quantized else None, lazy=True)
        bos = model.config.bos_token_id
        token = bos if bos is not None and 0 <= bos < model.config.vocab_size else 0
        h = model.model.embed_tokens(mx.array([[token]]))  # (an id past the table would crash)
        mx.eval(h)
        if not model.config.tie_word_embeddings:
            model.model.embed_tokens = None  # the head is a separate matrix: free this one
        for i in range(len(model.model.layers)):
            h = model.model.layers[i](h)
            mx.eval(h)
            model.model.layers[i] = None  # frees the layer's weights
        h = model.model.norm(h)
        if model.config.tie_word_embeddings:
            logits = model.model.embed_tokens.as_linear(h)
        else:
            logits = model.lm_head(h)
        finite = bool(mx.all(mx.isfinite(logits)).item())
    except MlxLlamaError as e:
        raise MlxLlamaError(f"the converted model does not load back ({e}); please report this") from None
    from mlx_llama.tokenizer import load_tokenizer

    try:
        load_tokenizer(folder)
    except MlxLlamaError as e:  # name the file, not the temporary folder it was copied to
        what = str(e).split(":")[0].replace(f"{folder}{os.sep}", "").replace(str(folder), "")
        raise MlxLlamaError(
            f"the tokenizer does not load ({what.strip()}): give a source whose tokenizer "
            "files are the original model's"
        ) from None
    if not finite:
        raise MlxLlamaError(_non_finite_reason(folder))


def _non_finite_reason(folder: Path) -> str:
    """Why the logits are NaN/inf: a damaged source, a dtype too narrow, or the arithmetic."""
    for path in sorted(folder.glob("*.safetensors")):
        for name, array in mx.load(str(path)).items():  # lazy: one tensor read at a time
            if mx.issubdtype(array.dtype, mx.floating) and not mx.all(mx.isfinite(array)).item():
                if array.dtype == mx.float32:
                    return (f"the source's tensor {name} holds NaN or infinite values: the "
                            "checkpoint is damaged; download or export it again")
                dtype = str(array.dtype).rsplit(".", 1)[-1]  # "float16", not "mlx.core.float16"
                return (f"tensor {name} holds NaN or infinite values as {dtype}: the source's "
                        "values overflow that dtype (try --dtype float32), or the checkpoint "
                        "is damaged")
    return ("the converted model produces non-finite logits although its weights are finite: "
            "their values overflow the compute dtype (try --dtype float32)")


def _write_error(e: OSError, out: Path, nbytes: int) -> str:
    if e.errno == errno.ENOSPC:
        return (
            f"no space left on the device while writing {out} (it needs about "
            f"{nbytes / 1e9:.1f} GB): free some space and convert again; nothing was written"
        )
    where = f" ({e.filename})" if e.filename else ""
    return f"cannot write {out}: {e.strerror or e}{where}; nothing was written"


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc) -> None:
        pass


def _bar(total: int, desc: str, progress: bool):
    """A tqdm byte bar on stderr when it is a terminal, else a no-op with the same interface."""
    if not (progress and sys.stderr.isatty()):
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, leave=False)
