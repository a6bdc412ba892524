"""Time the scale search against mx.quantize on the matrices of a 1B Llama, and extrapolate.

    python benchmarks/quantize_speed.py [--reps 3] [--cpu-time]

Shapes are Llama-3.2-1B's (hidden 2048, MLP 8192, 8 KV heads of 64, 16 layers, vocab 128256,
tied). Each matrix is random bfloat16 (the search's work does not depend on the values); the
embedding is timed on 8192 of its rows and scaled. Per shape, the best of `reps` runs of each
method, interleaved so that a busy machine slows both alike. The search is timed with
activation weights, as --calibrate and --bpw use it. --cpu-time times the process's CPU
time (all threads) instead of the wall clock: steadier on a machine shared with other jobs.
The first search of each shape is not timed (numba compiles or loads its kernels then).
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx

from convert.affine import quantize_search

SHAPES = {  # name: (rows, cols, count in the model)
    "q_proj/o_proj": (2048, 2048, 32),
    "k_proj/v_proj": (512, 2048, 32),
    "gate_proj/up_proj": (8192, 2048, 32),
    "down_proj": (2048, 8192, 16),
    "embed_tokens (8192 of 128256 rows)": (8192, 2048, 128256 / 8192),
}


CLOCK = time.perf_counter


def elapsed(fn) -> float:
    """Seconds (by CLOCK) to run and evaluate fn()."""
    start = CLOCK()
    mx.eval(fn())
    return CLOCK() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--cpu-time", action="store_true", help="CPU time instead of wall time")
    args = p.parse_args()
    global CLOCK
    if args.cpu_time:
        CLOCK = time.process_time
    total_plain = total_search = 0.0
    for name, (rows, cols, count) in SHAPES.items():
        w = mx.random.normal((rows, cols)).astype(mx.bfloat16)
        h = mx.random.uniform(shape=(cols,)) ** 4 + 1e-3
        mx.eval(w, h)
        mx.eval(quantize_search(w, args.bits, args.group_size, h))  # compile (or load) the kernels
        plain = search = float("inf")
        for _ in range(args.reps):  # interleaved
            plain = min(plain, elapsed(lambda: mx.quantize(w, args.group_size, args.bits)))
            search = min(search, elapsed(lambda: quantize_search(w, args.bits, args.group_size, h)))
        total_plain += plain * count
        total_search += search * count
        print(f"{name:36s} {rows}x{cols}: min/max {plain * 1e3:8.1f} ms, search "
              f"{search * 1e3:8.1f} ms ({search / plain:.1f}x)", flush=True)
    print(f"1B model, quantization only: min/max {total_plain:.1f} s, search {total_search:.1f} s "
          f"({total_search / total_plain:.1f}x)")


if __name__ == "__main__":
    main()
