"""Count the MLX operations in one decode step.

On a CPU every operation costs a dispatch, a scheduling hop and usually an output allocation
whatever its size, so for small models the count of operations per token, not the arithmetic,
sets the decode speed. The count here is the number of primitive nodes in the lazy graph that
produces the next token from the previous one (`mx.export_to_dot`, nodes counted): weights and
the cache's existing contents are inputs, not nodes; a fused `mx.compile` kernel is one node.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections import Counter

import mlx.core as mx

_NODE = re.compile(r'\[label ="([^"]+)", shape=rectangle\]')


def graph_ops(*outputs: mx.array) -> Counter:
    """Primitive name -> how many times it occurs in the unevaluated graph of `outputs`."""
    fd, path = tempfile.mkstemp(suffix=".dot")
    os.close(fd)
    try:
        mx.export_to_dot(path, *outputs)
        with open(path) as f:
            return Counter(_NODE.findall(f.read()))
    finally:
        os.unlink(path)


def decode_step_ops(model, context: int = 16) -> Counter:
    """The operations of one greedy decode step of this project's engine after `context` tokens."""
    from .generate import decode_step, prefill
    from .sampling import SamplingParams, make_sampler

    cache = model.make_cache()
    sampler = make_sampler(SamplingParams())
    logits = prefill(model, list(range(3, 3 + context)), cache)
    token = sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    mx.eval(token, [c.state for c in cache])
    return graph_ops(*decode_step(model, token, cache, sampler))


def format_ops(ops: Counter, top: int = 8) -> str:
    common = ", ".join(f"{name} {n}" for name, n in ops.most_common(top))
    return f"{sum(ops.values())} ops ({common})"
