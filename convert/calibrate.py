"""Calibration: what the full-precision model does on a little text, for the quantizer to use.

One forward and backward pass over a few hundred to a few thousand tokens gives, for every
weight matrix W (y = W x) of the model:
- `inputs[module]`: the mean square of each input channel, E[x_j^2]. The output error that a
  weight error dW causes is dW x, so E[(dW x)^2] over the text is (to first order, ignoring
  correlations between channels) sum_j dW_j^2 E[x_j^2]: channels that carry large activations
  need their weights represented more finely. The scale search weights its error by this.
- `outputs[module]`: the mean square of the loss gradient with respect to each output
  channel, E[(dL/dy_i)^2]. Together with `inputs` this is the Kronecker-factored diagonal of
  the Fisher information, so sum_ij E[g_i^2] E[x_j^2] dW_ij^2 estimates how much quantizing a
  matrix raises the loss. It is what makes "keep the sensitive tensors at more bits" a
  measurement (sensitivity.py) instead of a guess.
The gradients are taken with respect to zero "probes" added to each layer's output, never with
respect to the weights, so no weight-sized gradient is ever materialized.

The embedding plays two roles: as a lookup table (its rows are the first hidden states) and,
when tied, as the output head. `inputs["model.embed_tokens"]` is then the head's input (the
final norm's output) and `lookup` holds the mean squared gradient of the loss with respect to
the looked-up rows, per hidden channel.

The default text (`builtin`) is convert/data/calibration.txt, written for this project: varied
English prose, instructions, a conversation, code, JSON and numbers (about 2,000 tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_llama.errors import MlxLlamaError

BUILTIN = Path(__file__).parent / "data" / "calibration.txt"
LINEAR_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Linears that read the same input as another one: their input covariance is that one's.
SHARED_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
DEFAULT_WINDOW = 256
DEFAULT_MAX_TOKENS = 512
# GPTQ: the output head's input rows come from this many tokens, the ones past max_tokens run
# forward only. The head's covariance is the noisiest (two halves of 512 tokens priced its
# error 3x apart) and the cheapest to widen: no gradient, no logits, 576-2048 floats a token.
DEFAULT_HEAD_TOKENS = 2048


@dataclass
class Calibration:
    """Per-module channel statistics (float32 vectors), averaged over `tokens` tokens."""

    inputs: dict[str, mx.array] = field(default_factory=dict)
    outputs: dict[str, mx.array] = field(default_factory=dict)
    lookup: mx.array | None = None  # (hidden,) mean squared gradient at the embedding output
    tokens: int = 0
    nll: float = 0.0  # mean NLL of the full-precision model on the text (nats per token)
    # With covariance=True: the input rows x of each distinct linear input and of the head
    # (float32, (tokens, in)), keyed by the module that owns it (see SHARED_INPUT), the
    # even-numbered windows' rows and the odd ones' apart: two disjoint halves of the text, so
    # that GPTQ can be fitted on one and judged on the other. Rows, not E[x x^T]: calibration
    # reads 512 tokens (the head 2048), about as many as a layer has inputs or fewer, so the
    # rows take no more memory than the (in, in) covariances (a 1B model's down_proj: 16 MB
    # against 268 MB), and each covariance is formed only while its layer is quantized.
    rows: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def owner(self, module: str) -> str:
        """The module whose input `module` reads (itself unless SHARED_INPUT says otherwise)."""
        parent, _, leaf = module.rpartition(".")
        return f"{parent}.{SHARED_INPUT[leaf]}" if leaf in SHARED_INPUT else module

    def has_covariance(self, module: str) -> bool:
        return self.owner(module) in self.rows

    def covariance(self, module: str) -> np.ndarray | None:
        """E[x x^T] of `module`'s input (float32, (in, in)), or None when it was not recorded."""
        if not self.has_covariance(module):
            return None
        even, odd = self.rows[self.owner(module)]
        return (even.T @ even + odd.T @ odd) / (len(even) + len(odd))

    def covariance_halves(self, module: str) -> tuple[np.ndarray, np.ndarray] | None:
        """E[x x^T] of `module`'s input on each half of the text (even windows, odd windows)."""
        if not self.has_covariance(module):
            return None
        return tuple(x.T @ x / len(x) for x in self.rows[self.owner(module)])


def read_calibration_text(spec: str | Path) -> str:
    """`builtin` -> the shipped text; anything else is a path to a UTF-8 text file."""
    if str(spec) == "builtin":
        return BUILTIN.read_text(encoding="utf-8")
    from mlx_llama.perplexity import read_text

    try:  # one reader, so --eval and --calibrate say the same about the same file
        text = read_text(str(Path(spec).expanduser()))
    except MlxLlamaError as e:
        raise MlxLlamaError(f"--calibrate: {e}, or 'builtin'") from None
    if len(text.split()) < 50:
        raise MlxLlamaError(
            f"calibration text {spec} is too short ({len(text.split())} words): give a few "
            "hundred words or more, or 'builtin'"
        )
    return text


class _Probe(nn.Module):
    """Wraps a Linear: records E[x^2] of its input and adds a zero probe to its output."""

    def __init__(self, inner: nn.Module, name: str, ctx: dict):
        super().__init__()
        self.inner = inner
        self._name = name
        self._ctx = ctx

    def __call__(self, x: mx.array) -> mx.array:
        xs = mx.stop_gradient(x).astype(mx.float32)
        self._ctx["sq_inputs"][self._name] = (xs * xs).sum(axis=(0, 1))
        if self._ctx.get("covariance") and self._name.rsplit(".", 1)[-1] not in SHARED_INPUT:
            flat = xs.reshape(-1, xs.shape[-1])
            self._ctx["cov_inputs"][self._name] = flat
        return self.inner(x) + self._ctx["probes"][self._name]


def _wrap(model: nn.Module, ctx: dict) -> list[tuple[nn.Module, str, _Probe]]:
    """Replace every Linear of the decoder layers with a probe; returns (parent, leaf, probe)
    for each, which is how to undo it."""
    wrapped = []
    for i, layer in enumerate(model.model.layers):
        for parent_name, parent in (("self_attn", layer.self_attn), ("mlp", layer.mlp)):
            for leaf in LINEAR_LEAVES:
                inner = getattr(parent, leaf, None)
                if inner is None:
                    continue
                name = f"model.layers.{i}.{parent_name}.{leaf}"
                probe = _Probe(inner, name, ctx)
                setattr(parent, leaf, probe)
                wrapped.append((parent, leaf, probe))
    return wrapped


def calibrate(model, tokens: list[int], window: int = DEFAULT_WINDOW,
              max_tokens: int = DEFAULT_MAX_TOKENS, covariance: bool = False,
              head_tokens: int = DEFAULT_HEAD_TOKENS) -> Calibration:
    """Run `model` (an mlx_llama Llama, float) over `tokens` and collect the statistics.

    covariance: also keep the input rows of every distinct linear input of the decoder layers
    and of the output head (what GPTQ's covariances are made of, `Calibration.rows`), those of
    the even-numbered windows apart (the text is cut into two windows at least, so that both
    halves exist); the head's rows also from the text past `max_tokens`, up to `head_tokens`.
    """
    extra = list(tokens)[max_tokens:head_tokens]  # the head's rows only, forward only
    tokens = list(tokens)[:max_tokens]
    if len(tokens) < 16:
        raise MlxLlamaError("the calibration text has fewer than 16 tokens: give a longer text")
    window = min(window, model.config.max_position_embeddings)
    if covariance:
        window = min(window, len(tokens) // 2)
    cfg = model.config
    head = "model.embed_tokens" if cfg.tie_word_embeddings else "lm_head"
    ctx: dict = {"probes": {}, "sq_inputs": {}, "covariance": covariance, "cov_inputs": {}}
    wrapped = _wrap(model, ctx)
    sums_in: dict[str, mx.array] = {}
    rows: dict[str, tuple[list, list]] = {}  # owner -> (even windows' rows, odd windows')
    sums_out: dict[str, mx.array] = {}
    lookup = mx.zeros((cfg.hidden_size,), mx.float32)
    total_nll = 0.0
    counted = 0
    try:
        for index, start in enumerate(range(0, len(tokens) - 1, window)):
            ids = mx.array(tokens[start : start + window + 1], dtype=mx.int32)[None]
            inp, tgt = ids[:, :-1], ids[:, 1:]
            length = inp.shape[1]
            if length < 2:
                break
            probes = _zero_probes(wrapped, cfg, length, head)
            ctx["sq_inputs"] = {}
            ctx["cov_inputs"] = {}

            def loss_fn(probes):
                ctx["probes"] = probes
                h = model.model.embed_tokens(inp) + probes["lookup"]
                for layer in model.model.layers:
                    h = layer(h)
                h = model.model.norm(h)
                hs = mx.stop_gradient(h).astype(mx.float32)
                ctx["sq_inputs"][head] = (hs * hs).sum(axis=(0, 1))
                if covariance:
                    flat = hs.reshape(-1, hs.shape[-1])
                    ctx["cov_inputs"][head] = flat
                logits = model.project(h).astype(mx.float32) + probes[head]
                return nn.losses.cross_entropy(logits, tgt, reduction="sum")

            loss, grads = mx.value_and_grad(loss_fn)(probes)
            for name, g in grads.items():
                sq = (g.astype(mx.float32) ** 2).sum(axis=(0, 1))
                if name == "lookup":
                    lookup = lookup + sq
                else:
                    sums_out[name] = sums_out.get(name, 0) + sq
            for name, sq in ctx["sq_inputs"].items():
                sums_in[name] = sums_in.get(name, 0) + sq
            mx.eval(loss, lookup, sums_in, sums_out, ctx["cov_inputs"])
            for name, x in ctx["cov_inputs"].items():
                rows.setdefault(name, ([], []))[index % 2].append(np.array(x))
            total_nll += loss.item()
            counted += length
    finally:
        for parent, leaf, probe in wrapped:
            setattr(parent, leaf, probe.inner)
    if covariance:
        for offset in range(0, len(extra) - 1, window):
            index += 1  # the windows' even / odd alternation goes on
            ids = mx.array(extra[offset : offset + window], dtype=mx.int32)[None]
            rows[head][index % 2].append(np.array(model.model(ids).astype(mx.float32)[0]))
    # Inputs are counted per position fed; outputs and NLL per position with a target (same).
    return Calibration(
        inputs={k: v / counted for k, v in sums_in.items()},
        outputs={k: v / counted for k, v in sums_out.items()},
        lookup=lookup / counted,
        tokens=counted,
        nll=total_nll / counted,
        rows={k: tuple(np.concatenate(part) for part in v) for k, v in rows.items()},
    )


def _zero_probes(wrapped, cfg, length: int, head: str) -> dict[str, mx.array]:
    probes = {"lookup": mx.zeros((1, length, cfg.hidden_size), mx.float32),
              head: mx.zeros((1, length, cfg.vocab_size), mx.float32)}
    for _, _, probe in wrapped:
        out = probe.inner.weight.shape[0]
        probes[probe._name] = mx.zeros((1, length, out), mx.float32)
    return probes
