"""Time whole conversions: the scale search against plain min/max, on a 1B Llama.

    python benchmarks/convert_speed.py [--rounds 2] [--model llama_1b|tinyllama|PATH]

Converts the same bfloat16 Hugging Face checkpoint (default: random weights in
Llama-3.2-1B's shapes, built once by checkpoints.py) with `mlx-llama convert -q` and
`--method minmax`, then `--method search`, alternately for `rounds` rounds (a busy machine
slows both alike), each in a fresh process, and prints the wall time of each run and the
ratio of the best search to the best min/max. No calibration: the search is unweighted, as a
plain `--method search` conversion runs it. Embeddings and head at 8 bits, the default.
The first search on a machine also compiles the search's kernels (numba caches them on
disk); an untimed search conversion is run first so that no round pays for it (and the
source's files are in the page cache for both methods).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkpoints  # noqa: E402

METHODS = ("minmax", "search")


def convert(source: Path, out: Path, method: str) -> float:
    """Seconds for one `mlx-llama convert` in a fresh process; the output is removed after."""
    cmd = [sys.executable, "-m", "mlx_llama.cli", "convert", str(source), "-o", str(out), "-q",
           "--method", method, "--force"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return seconds


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--model", default="llama_1b", help="llama_1b, tinyllama or a folder")
    args = p.parse_args(argv)
    source = Path(args.model) if Path(args.model).is_dir() else getattr(checkpoints, args.model)()
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "out"
        convert(source, out, "search")  # warm-up: compile (or load) the kernels
        times: dict[str, list[float]] = {m: [] for m in METHODS}
        for r in range(args.rounds):
            for method in METHODS:
                times[method].append(convert(source, out, method))
                print(f"round {r + 1}: {method:6s} {times[method][-1]:6.1f} s", flush=True)
    best = {m: min(t) for m, t in times.items()}
    print(f"{source.name}: min/max {best['minmax']:.1f} s, search {best['search']:.1f} s "
          f"({best['search'] / best['minmax']:.2f}x)")
    return times


if __name__ == "__main__":
    main()
