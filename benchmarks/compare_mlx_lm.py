"""mlx-llama against mlx-lm on the same Hugging Face checkpoint, in one run.

    python benchmarks/compare_mlx_lm.py --model smollm2 --dtype bfloat16 [-p 128 -g 32 -n 3]
    python benchmarks/compare_mlx_lm.py --model tinyllama --layers 2 --dtype float32
    python benchmarks/compare_mlx_lm.py --model /path/to/hf_folder

1. The source is a Hugging Face folder: `smollm2` (SmolLM2-135M-Instruct exported from the
   bundled GGUF to bfloat16 or float32, as users would have it), `tinyllama` (random weights
   in TinyLlama-1.1B's shapes with `--layers` layers), `tiny` (a toy shape, for CI) or a path.
2. It is converted twice, each project with its *default* quantized conversion
   (`mlx-llama convert -q` and `mlx_lm.convert(quantize=True)`), into `--work`.
3. Each project's generator runs in its own worker process (so peak memory is its own), and
   the parent alternates them, A B A B ..., one trial each, after one warm-up each: drift of a
   noisy machine lands on both sides. Both are timed by the same clock
   (`mlx_llama.bench.time_trial`) on the same fixed prompt, greedy, exactly `-g` tokens.
4. Printed: median [min .. max] of each figure per project, the ratio mlx-llama / mlx-lm of
   the medians, and the MLX operations in one decode step of each (`mlx_llama.opcount`).

mlx-lm is needed only here (the `bench` extra): the runtime never imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PROJECTS = ("mlx-llama", "mlx-lm")
# Optional third worker: this project's runtime on mlx-lm's folder (the very same bytes), which
# separates what the runtime does from what the default conversions decide.
SAME_WEIGHTS = "mlx-llama/mlx-lm-folder"
MARK = "@@bench "  # worker replies are the lines that start with this


# ----------------------------------------------------------------------------- workers


def _load(project: str, folder: Path, dense_prefill: bool = False):
    """(model, tokens(prompt, cache) -> iterator of ints, make_cache, step graph outputs)."""
    import mlx.core as mx

    if project in ("mlx-llama", SAME_WEIGHTS):
        from mlx_llama.bench import engine_tokens
        from mlx_llama.generate import decode_step
        from mlx_llama.loading import load_model
        from mlx_llama.sampling import SamplingParams, make_sampler

        model, _ = load_model(folder)
        if dense_prefill:
            from mlx_llama.fused import use_dense_prefill

            use_dense_prefill(model)
        sampler = make_sampler(SamplingParams())

        def step(token, cache):
            return decode_step(model, token, cache, sampler)

        def tokens(prompt, cache):
            return engine_tokens(model, prompt, cache)

        return model, tokens, model.make_cache, step

    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model as mlx_lm_load_model

    model, _ = mlx_lm_load_model(folder)

    def tokens(prompt, cache):
        # mlx-lm's engine with its defaults (greedy sampler, prefill_step_size 2048).
        for token, _ in generate_step(mx.array(prompt), model, max_tokens=-1, prompt_cache=cache):
            yield token

    def step(token, cache):
        # What one iteration of generate_step builds (its `_step`): model, last position,
        # log-softmax, greedy sampler.
        logits = model(token.reshape(1, 1), cache=cache)[:, -1, :]
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        return mx.argmax(logprobs, axis=-1), logprobs.squeeze(0)

    return model, tokens, lambda: make_prompt_cache(model), step


def _ops(tokens_fn, make_cache, step, vocab: int):
    """Operation count of one decode step after a short prompt."""
    import mlx.core as mx

    from mlx_llama.bench import fixed_prompt
    from mlx_llama.opcount import graph_ops

    cache = make_cache()
    stream = tokens_fn(fixed_prompt(16, vocab, seed=1), cache)
    first = next(stream)
    stream.close()
    mx.synchronize()
    outputs = step(mx.array([first]), cache)
    return graph_ops(*outputs)


def worker(project: str, folder: Path, prompt_tokens: int, generation_tokens: int,
           dense_prefill: bool = False) -> None:
    """Serve trials over stdin/stdout: 'trial' runs one timed generation, 'info' static data."""
    from mlx_llama.bench import decode_bytes_per_token, fixed_prompt, parameter_bytes, time_trial

    model, tokens_fn, make_cache, step = _load(project, folder, dense_prefill)
    vocab = (getattr(model, "config", None) or model.args).vocab_size
    prompt = fixed_prompt(prompt_tokens, vocab)
    holder: list = []

    def start():
        holder[:] = [make_cache()]
        return tokens_fn(prompt, holder[0])

    def reply(obj) -> None:
        sys.stdout.write(MARK + json.dumps(obj) + "\n")
        sys.stdout.flush()

    time_trial(start, prompt_tokens, generation_tokens)  # warm-up
    info = {
        "model_bytes": parameter_bytes(model),
        "bytes_per_token": decode_bytes_per_token(model, holder[0], prompt_tokens,
                                                  generation_tokens),
        "ops": dict(_ops(tokens_fn, make_cache, step, vocab)),
    }
    reply({"ready": True})
    for line in sys.stdin:
        command = line.strip()
        if command == "info":
            reply(info)
        elif command == "trial":
            t = time_trial(start, prompt_tokens, generation_tokens)
            reply({"ttft_s": t.ttft_s, "decode_s": t.decode_s,
                   "peak_memory_bytes": t.peak_memory_bytes})
        elif command == "quit":
            return


class Worker:
    def __init__(self, project: str, folder: Path, p: int, g: int, dense_prefill: bool = False):
        self.project = project
        command = [sys.executable, __file__, "--worker", project, str(folder), "-p", str(p),
                   "-g", str(g)] + (["--dense-prefill"] if dense_prefill else [])
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        raise RuntimeError(f"{self.project} worker exited with status {self.proc.wait()}")

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass
        self.proc.wait(timeout=60)


# ----------------------------------------------------------------------------- conversion


def source_folder(model: str, dtype: str, layers: int) -> Path:
    import checkpoints

    if model == "smollm2":
        return checkpoints.smollm2(dtype)
    if model == "tinyllama":
        return checkpoints.tinyllama(dtype, layers)
    if model == "tiny":
        return checkpoints.tiny(dtype, layers)
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise SystemExit(f"{model}: not smollm2, tinyllama, tiny or a Hugging Face folder")
    return path


def convert_both(src: Path, work: Path, reconvert: bool) -> dict[str, Path]:
    """Each project's default quantized conversion of `src` (reused when already there)."""
    out = {"mlx-llama": work / f"{src.name}-mlx-llama", "mlx-lm": work / f"{src.name}-mlx-lm"}
    if reconvert or not (out["mlx-llama"] / "config.json").is_file():
        from convert.api import convert

        convert(src, out["mlx-llama"], quantize=True, force=True, progress=False)
    if reconvert or not (out["mlx-lm"] / "config.json").is_file():
        import io
        from contextlib import redirect_stdout

        from mlx_lm import convert as mlx_lm_convert

        shutil.rmtree(out["mlx-lm"], ignore_errors=True)
        with redirect_stdout(io.StringIO()):
            mlx_lm_convert(str(src), str(out["mlx-lm"]), quantize=True)
    return out


# ----------------------------------------------------------------------------- the run


def compare(folders: dict[str, Path], p: int, g: int, n: int, log=print,
            dense_prefill: bool = False) -> dict:
    """Alternate the projects' trials; return per-project reports, ratios and op counts.

    `folders` maps each worker name (PROJECTS, and optionally SAME_WEIGHTS) to its folder.
    """
    from mlx_llama.bench import Trial, summarize

    workers = {name: Worker(name, folder, p, g, dense_prefill)
               for name, folder in folders.items()}
    try:
        for w in workers.values():
            w.read()  # loaded and warmed up
        info = {name: w.ask("info") for name, w in workers.items()}
        trials: dict[str, list[Trial]] = {name: [] for name in workers}
        for i in range(n):
            for name, w in workers.items():
                r = w.ask("trial")
                trials[name].append(Trial(p, g, r["ttft_s"], r["decode_s"], r["peak_memory_bytes"]))
                t = trials[name][-1]
                log(f"  trial {i + 1}/{n} {name:24s} prompt {t.prompt_tps:8.1f} tok/s  "
                    f"decode {t.generation_tps:7.2f} tok/s  "
                    f"peak {t.peak_memory_bytes / 1e6:7.1f} MB")
    finally:
        for w in workers.values():
            w.close()
    reports = {
        name: summarize(str(folders[name]), trials[name], info[name]["model_bytes"],
                        info[name]["bytes_per_token"]).to_json()
        for name in workers
    }
    ops = {name: sum(info[name]["ops"].values()) for name in workers}
    result = {"reports": reports, "ops": ops,
              "op_breakdown": {name: info[name]["ops"] for name in workers}}
    result["ratios"] = ratios(reports["mlx-llama"], reports["mlx-lm"], ops["mlx-llama"],
                              ops["mlx-lm"])
    if SAME_WEIGHTS in reports:
        result["ratios_same_weights"] = ratios(reports[SAME_WEIGHTS], reports["mlx-lm"],
                                               ops[SAME_WEIGHTS], ops["mlx-lm"])
    return result


def ratios(ours: dict, theirs: dict, our_ops: int, their_ops: int) -> dict[str, float]:
    """ours / theirs for every figure (medians)."""
    def median(report, key):
        return report[key]["median"]

    return {
        "prompt_tps": median(ours, "prompt_tps") / median(theirs, "prompt_tps"),
        "generation_tps": median(ours, "generation_tps") / median(theirs, "generation_tps"),
        "ttft_s": median(ours, "ttft_s") / median(theirs, "ttft_s"),
        "peak_memory_bytes": (median(ours, "peak_memory_bytes")
                              / median(theirs, "peak_memory_bytes")),
        "model_bytes": ours["model_bytes"] / theirs["model_bytes"],
        "ops_per_decode_step": our_ops / their_ops,
    }


def machine() -> str:
    import mlx.core as mx

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, MLX {mx.__version__} {mx.default_device()}"


def format_result(title: str, result: dict) -> str:
    """One column per worker, then the ratio columns (mlx-llama / mlx-lm)."""
    rows = [
        ("prompt tokens/s", "prompt_tps", 1, 1),
        ("decode tokens/s", "generation_tps", 1, 2),
        ("time to first token s", "ttft_s", 1, 2),
        ("peak memory MB", "peak_memory_bytes", 1e-6, 1),
    ]
    names = list(result["reports"])
    ratio_sets = [("ratio", result["ratios"])]
    if "ratios_same_weights" in result:
        ratio_sets.append(("same-w", result["ratios_same_weights"]))
    width = 26

    def cell(stat, scale, digits):
        return (f"{stat['median'] * scale:.{digits}f} [{stat['min'] * scale:.{digits}f}.."
                f"{stat['max'] * scale:.{digits}f}]")

    header = f"{'':22s}" + "".join(f"{n:>{width}s}" for n in names)
    header += "".join(f"{label:>8s}" for label, _ in ratio_sets)
    lines = [title, header]
    for label, key, scale, digits in rows:
        line = f"{label:22s}" + "".join(
            f"{cell(result['reports'][n][key], scale, digits):>{width}s}" for n in names)
        lines.append(line + "".join(f"{r[key]:8.2f}" for _, r in ratio_sets))
    line = f"{'model size MB':22s}" + "".join(
        f"{result['reports'][n]['model_bytes'] / 1e6:{width}.1f}" for n in names)
    lines.append(line + "".join(f"{r['model_bytes']:8.2f}" for _, r in ratio_sets))
    lines.append(f"{'implied GB/s':22s}" + "".join(
        f"{result['reports'][n]['bandwidth_gbs']['median']:{width}.2f}" for n in names))
    line = f"{'ops per decode step':22s}" + "".join(f"{result['ops'][n]:{width}d}" for n in names)
    lines.append(line + "".join(f"{r['ops_per_decode_step']:8.2f}" for _, r in ratio_sets))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2",
                        help="smollm2 | tinyllama | tiny | a Hugging Face folder")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="dtype of the generated source checkpoint (smollm2/tinyllama/tiny)")
    parser.add_argument("--layers", type=int, default=2, help="layers of tinyllama/tiny")
    parser.add_argument("-p", "--prompt-tokens", type=int, default=128)
    parser.add_argument("-g", "--generation-tokens", type=int, default=32)
    parser.add_argument("-n", "--trials", type=int, default=3)
    parser.add_argument("--work", type=Path,
                        default=Path.home() / ".cache" / "mlx-llama-bench" / "converted")
    parser.add_argument("--reconvert", action="store_true", help="convert again even if present")
    parser.add_argument("--same-weights", action="store_true",
                        help="also run mlx-llama on mlx-lm's folder (runtime-only comparison)")
    parser.add_argument("--dense-prefill", action="store_true",
                        help="mlx-llama multiplies prompt chunks at bfloat16 whatever the "
                             "checkpoint's dtype (by default only bfloat16 ones do)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--worker", nargs=2, metavar=("PROJECT", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        worker(args.worker[0], Path(args.worker[1]), args.prompt_tokens, args.generation_tokens,
               args.dense_prefill)
        return 0
    src = source_folder(args.model, args.dtype, args.layers)
    folders = convert_both(src, args.work, args.reconvert)
    if args.same_weights:
        folders[SAME_WEIGHTS] = folders["mlx-lm"]
    title = (f"{src.name}, 4-bit default conversions, prompt {args.prompt_tokens}, "
             f"generate {args.generation_tokens}, {args.trials} alternating trials\n{machine()}")
    print(title, flush=True)
    start = time.perf_counter()
    result = compare(folders, args.prompt_tokens, args.generation_tokens, args.trials,
                     log=lambda s: print(s, flush=True), dense_prefill=args.dense_prefill)
    result.update(source=str(src), machine=machine(), dense_prefill=args.dense_prefill,
                  prompt_tokens=args.prompt_tokens,
                  generation_tokens=args.generation_tokens, trials=args.trials,
                  seconds=time.perf_counter() - start)
    print(format_result("median [min..max]; ratio = mlx-llama / mlx-lm; same-w = mlx-llama on "
                        "mlx-lm's folder / mlx-lm", result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
