"""Samplers and logits processors.

A sampler maps (1, vocab) log-probabilities to a (1,) token. Filters (top-k, top-p, min-p)
mask tokens to -inf and are fused with the categorical draw in one `mx.compile`d function per
setting, so a decode step adds a handful of kernels, not a Python loop over the vocabulary.
The random state is threaded through the compiled function, so `mx.random.seed(s)` before
generating gives the same text for the same seed.

Logits processors (repetition, frequency and presence penalties, logit bias) keep their state
(token counts) as MLX arrays updated inside the graph: no per-token host work.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Callable

import mlx.core as mx

from .errors import MlxLlamaError

Sampler = Callable[[mx.array], mx.array]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context_size: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None

    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        """Reject values no sampler can honour, with the allowed range in the message."""
        self._check_types()
        checks = [
            ("temperature", self.temperature, 0.0 <= self.temperature <= 100,
             "in [0, 100] (0 is greedy)"),
            ("top_p", self.top_p, 0.0 <= self.top_p <= 1.0, "in [0, 1] (0 keeps only the best)"),
            ("top_k", self.top_k, self.top_k >= 0, ">= 0 (0 disables it)"),
            ("min_p", self.min_p, 0.0 <= self.min_p <= 1.0, "in [0, 1]"),
            # (far outside it float32 turns the penalised logits into inf or 0: NaN samples)
            ("repetition_penalty", self.repetition_penalty,
             1e-6 <= self.repetition_penalty <= 1e6, "in [1e-6, 1e6] (1 is no penalty)"),
            ("repetition_context_size", self.repetition_context_size,
             self.repetition_context_size > 0, "> 0"),
            ("frequency_penalty", self.frequency_penalty, -2 <= self.frequency_penalty <= 2,
             "in [-2, 2]"),
            ("presence_penalty", self.presence_penalty, -2 <= self.presence_penalty <= 2,
             "in [-2, 2]"),
        ]
        for name, value, ok, allowed in checks:
            if not ok or (isinstance(value, float) and not math.isfinite(value)):
                raise MlxLlamaError(f"invalid {name} {value!r}: must be {allowed}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise MlxLlamaError(f"invalid seed {self.seed}: must be from 0 to 2**64 - 1")
        for token, bias in self.logit_bias.items():
            if vocab_size is not None and not 0 <= int(token) < vocab_size:
                raise MlxLlamaError(
                    f"logit_bias names token {token}, outside the vocabulary (0..{vocab_size - 1})"
                )
            if not math.isfinite(bias) and bias != -math.inf:
                raise MlxLlamaError(f"logit_bias for token {token} must be a number, got {bias}")
        return self


    def _check_types(self) -> None:
        """Numbers must be numbers (a "0.7" from a form field would otherwise fail deep in MLX)."""
        for f in fields(self):  # the annotations say which are integers (as strings here)
            kind = {"float": numbers.Real, "int": numbers.Integral,
                    "int | None": numbers.Integral}.get(f.type)
            value = getattr(self, f.name)
            if kind is None or (value is None and f.type.endswith("None")):
                continue
            if isinstance(value, bool) or not isinstance(value, kind):  # numpy scalars pass
                what = "a number" if kind is numbers.Real else "an integer"
                raise MlxLlamaError(f"{f.name} must be {what}, got {value!r}")
        if not isinstance(self.logit_bias, dict) or not all(
                isinstance(k, numbers.Integral) and not isinstance(k, bool)
                and isinstance(v, numbers.Real) for k, v in self.logit_bias.items()):
            raise MlxLlamaError("logit_bias must map token ids (int) to numbers, e.g. {50256: -100}")


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def _top_k(logprobs: mx.array, k: int) -> mx.array:
    if k >= logprobs.shape[-1]:
        return logprobs
    # The k-th largest value is the threshold; ties at the threshold are kept.
    kth = mx.sort(logprobs, axis=-1)[..., -k][..., None]
    return mx.where(logprobs >= kth, logprobs, -mx.inf)


def _top_p(logprobs: mx.array, p: float) -> mx.array:
    order = mx.argsort(-logprobs, axis=-1)
    sorted_lp = mx.take_along_axis(logprobs, order, axis=-1)
    probs = mx.exp(sorted_lp)
    # Keep a token if the mass strictly before it is below p: the smallest set reaching p.
    before = mx.cumsum(probs, axis=-1) - probs
    keep_sorted = before < p
    # Scatter the decision back to vocabulary order.
    keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
    return mx.where(keep, logprobs, -mx.inf)


def _min_p(logprobs: mx.array, min_p: float) -> mx.array:
    threshold = mx.max(logprobs, axis=-1, keepdims=True) + math.log(min_p)
    return mx.where(logprobs >= threshold, logprobs, -mx.inf)


def make_sampler(params: SamplingParams) -> Sampler:
    """A compiled sampler for these settings; greedy when temperature is 0, top_k is 1 or
    top_p is 0 (OpenAI's range includes 0, and clients send it to mean "the best token")."""
    # Below 1e-30, 1/temperature overflows float32 and sampling would turn uniform; that
    # close to 0 the limit, greedy, is what was asked for.
    if params.temperature < 1e-30 or params.top_k == 1 or params.top_p == 0:
        return mx.compile(greedy)
    temperature, top_p, top_k, min_p = params.temperature, params.top_p, params.top_k, params.min_p

    @partial(mx.compile, inputs=mx.random.state, outputs=mx.random.state)
    def sample(logprobs: mx.array) -> mx.array:
        if top_k > 0:
            logprobs = _top_k(logprobs, top_k)
        if top_p < 1.0:
            logprobs = _top_p(logprobs, top_p)
        if min_p > 0.0:
            logprobs = _min_p(logprobs, min_p)
        return mx.random.categorical(logprobs * (1.0 / temperature))

    return sample


class LogitsProcessor:
    """Penalties and biases applied to raw logits before sampling.

    `tokens_seen` counts the generated tokens (OpenAI's frequency/presence semantics);
    the repetition penalty (CTRL-style, as in transformers and llama.cpp) looks at the last
    `repetition_context_size` tokens of prompt and output.
    """

    def __init__(self, params: SamplingParams, vocab_size: int, prompt: list[int]):
        self.params = params
        self.vocab_size = vocab_size
        self.counts = mx.zeros((vocab_size,), mx.float32)
        # The last tokens of prompt and output, as an array updated inside the graph: decode
        # builds step n+1 before token n reaches the host, so a host-side list would always
        # leave out the token just sampled (the one a repetition penalty matters for most).
        self.recent = mx.array(list(prompt[-params.repetition_context_size :]), mx.int32)
        self.bias = None
        if params.logit_bias:
            bias = [0.0] * vocab_size
            for token, value in params.logit_bias.items():
                bias[int(token)] = float(value)
            self.bias = mx.array(bias)

    @property
    def active(self) -> bool:
        p = self.params
        return bool(
            p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty or p.logit_bias
        )

    def __call__(self, logits: mx.array) -> mx.array:
        p = self.params
        if p.repetition_penalty != 1.0 and self.recent.size:
            idx = self.recent
            picked = logits[..., idx]
            picked = mx.where(picked > 0, picked / p.repetition_penalty,
                              picked * p.repetition_penalty)
            logits[..., idx] = picked
        if p.frequency_penalty or p.presence_penalty:
            logits = logits - self.counts * p.frequency_penalty
            logits = logits - (self.counts > 0) * p.presence_penalty
        if self.bias is not None:
            logits = logits + self.bias
        return logits

    def observe(self, token: mx.array) -> None:
        """Record a sampled (1,) token, still lazy: the next step's penalties see it without a
        host sync."""
        p = self.params
        if p.frequency_penalty or p.presence_penalty:
            self.counts = self.counts.at[token].add(1.0)
        if p.repetition_penalty != 1.0:
            window = mx.concatenate([self.recent, token.reshape(-1).astype(mx.int32)])
            self.recent = window[-p.repetition_context_size :]
