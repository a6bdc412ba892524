"""Mixed precision by measured sensitivity: which tensors get more bits under a bit budget.

For each quantizable matrix and each candidate format (bits, group size), the loss increase
that quantizing it would cause is *estimated from measurements* (calibrate.py):

    cost(W, format) = sum_ij  F_i * h_j * (W - Q_format(W))_ij^2

with F_i = E[(dL/dy_i)^2] (the loss gradient at the matrix's output i) and h_j = E[x_j^2] (its
input j), the Kronecker-factored diagonal of the Fisher information; the second-order Taylor
expansion of the loss makes this (up to a constant factor) the expected loss increase, and
adding it over matrices is the usual independence approximation. The quantization error is
measured by actually quantizing (on a sample of rows, which is unbiased and enough to rank
formats), so the formats' real behaviour on this matrix — outliers, a weight grid it already
sits on — is in the number, not a rule of thumb.

The embedding has two roles: a lookup table (a row matters in proportion to how often its
token occurs, times the loss gradient at the looked-up vector) and, when tied, the output
head. Its cost adds both.

`allocate` then picks one format per tensor to minimize the total cost subject to the total
size (codes, scales and biases of every tensor, plus everything left in float) staying under
`bpw` bits per weight: a Lagrangian relaxation (each tensor takes the format minimizing
cost + lambda * bits; lambda is found by bisection) followed by a greedy pass that spends what
budget is left on the upgrades that buy the most cost per bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from mlx_llama.errors import MlxLlamaError

from .affine import bits_per_weight, quantize_search

# Candidate formats (bits, group size), cheapest first. 3 bits is offered only when the budget
# cannot be met with 4 or more: the second-order cost estimate holds for small errors, and on
# SmolLM2 it underestimated what 3-bit tensors cost (with them, --bpw 4.5 gave +18.6%
# perplexity; 4-bit g64 everywhere, +9.2%). 2 bits is never offered.
FORMATS = ((3, 64), (3, 32), (4, 128), (4, 64), (4, 32), (5, 64), (6, 64), (8, 64))
MIN_BITS = 4
SAMPLE_ROWS = 128  # rows quantized per matrix and format to estimate its cost


@dataclass(frozen=True)
class Importance:
    """Error weights for one matrix: h_ij = sum_r rows[i, r] * cols[r, j].

    A linear layer needs only its input channels' weights (`rows` None, `cols` (in,)): a
    per-row factor cannot change which scale is best for a group inside that row. The
    embedding's two roles make a rank-2 weight.
    """

    cols: mx.array  # (in,) or (r, in)
    rows: mx.array | None = None  # (out, r) or None

    @property
    def channels(self) -> mx.array | None:
        """The per-input-channel weights (what GPTQ's group search takes), or None if rank-2."""
        return self.cols if self.rows is None else None

    def block(self, start: int, stop: int) -> mx.array:
        """The weights for rows start..stop, broadcastable against those rows."""
        if self.rows is None:
            return self.cols
        return self.rows[start:stop] @ self.cols


def lookup_frequencies(counts: mx.array) -> mx.array:
    """How often each token is looked up: half its calibration frequency, half uniform.

    A few thousand calibration tokens leave most of a large vocabulary unseen, and those
    rows still matter at inference; the uniform half keeps them from counting as free.
    """
    counts = counts.astype(mx.float32)
    return 0.5 * counts / mx.maximum(counts.sum(), 1.0) + 0.5 / counts.shape[0]


def format_cost(w: mx.array, bits: int, group_size: int, factors, importance: Importance | None,
                sample_rows: int = SAMPLE_ROWS, halves=None) -> float:
    """Estimated loss increase from quantizing `w` with (bits, group_size).

    factors: (rows (out, r), cols (r, in)) whose product is F_i h_j (measure.cost_factors).

    halves (GPTQ): ((H_a, U_a), (H_b, U_b)), the input covariance E[x x^T] of the role given
    by `factors`' first column measured on two disjoint halves of the calibration text, each
    with its inverse factor (gptq.inverse_factor). The rows are quantized with GPTQ fitted on
    one half and the error is weighted by the *other* half's raw covariance,
    sum_i F_i (dW H dW^T)_ii, then the same the other way round; the mean is the cost.
    Priced on the covariance it was fitted to, GPTQ's error looks smaller than it will be on
    new text (it cancels errors along directions that text happens to lack), and by how much
    depends on the matrix and the format, which misranks them; the held-out half is
    independent of the fit, so its raw covariance prices the error without bias. GPTQ's
    group search takes its channel weights from the fitted half too (gptq_quantize's
    default, the same formula as measure.channel_importance).
    """
    rows = w.shape[0]
    stride = max(1, rows // sample_rows)
    idx = mx.arange(0, rows, stride)
    ws = w[idx]
    if halves is not None:
        import numpy as np

        from .gptq import gptq_quantize

        (ha, ua), (hb, ub) = halves
        r, c = (np.array(a) for a in factors)
        r = r[np.array(idx)]
        cost = 0.0
        for h_fit, u_fit, held in ((ha, ua, hb), (hb, ub, ha)):
            q = gptq_quantize(ws, bits, group_size, h_fit, factor=u_fit)
            d = np.array(ws.astype(mx.float32)) - np.array(
                mx.dequantize(*q, group_size=group_size, bits=bits).astype(mx.float32))
            # The first factor is the role that reads the covariance's input (a linear layer,
            # or the tied embedding's head role); any other (the lookup role) stays diagonal.
            per_row = np.sum((d @ held) * d, axis=1)
            cost += np.sum(r[:, 0] * per_row) + np.sum((r[:, 1:] @ c[1:]) * d * d)
        return float(cost / 2) * rows / idx.shape[0]
    imp = None
    if importance is not None:
        imp = importance.cols if importance.rows is None else importance.rows[idx] @ importance.cols
    q = quantize_search(ws, bits, group_size, imp)
    d = mx.dequantize(*q, group_size=group_size, bits=bits).astype(mx.float32)
    err = (ws.astype(mx.float32) - d) ** 2
    r, c = factors
    cost = ((r[idx] @ c) * err).sum()
    return float(cost.item()) * rows / idx.shape[0]


def allocate(costs: dict[str, dict[tuple[int, int], float]], sizes: dict[str, int],
             budget_bits: float, scale_bits: int) -> dict[str, tuple[int, int]]:
    """One format per tensor minimizing the summed cost with sum(size * bpw) <= budget_bits."""

    def bits_of(fmt: tuple[int, int]) -> float:
        return bits_per_weight(*fmt, scale_bits)

    def choose(lam: float) -> dict[str, tuple[int, int]]:
        return {t: min(c, key=lambda f: c[f] + lam * sizes[t] * bits_of(f))
                for t, c in costs.items()}

    def total(choice) -> float:
        return sum(sizes[t] * bits_of(f) for t, f in choice.items())

    safe = {t: {f: v for f, v in c.items() if f[0] >= MIN_BITS} for t, c in costs.items()}
    if all(safe.values()) and total({t: min(c, key=bits_of) for t, c in safe.items()}) \
            <= budget_bits:
        costs = safe
    cheapest = {t: min(c, key=bits_of) for t, c in costs.items()}
    if total(cheapest) > budget_bits:
        need = total(cheapest) / max(sum(sizes.values()), 1)
        raise MlxLlamaError(
            f"--bpw is too low: even the smallest formats need {need:.2f} bits per quantized "
            "weight here; raise --bpw"
        )
    scale = max((v for c in costs.values() for v in c.values()), default=1.0) or 1.0
    lo, hi = 0.0, scale  # lam = hi always fits once it dominates every cost difference
    while total(choose(hi)) > budget_bits:
        hi *= 4
    for _ in range(60):
        mid = (lo + hi) / 2
        if total(choose(mid)) > budget_bits:
            lo = mid
        else:
            hi = mid
    choice = choose(hi)
    # Spend what is left: best cost reduction per extra bit first.
    spare = budget_bits - total(choice)
    while True:
        best, best_gain = None, 0.0
        for t, c in costs.items():
            for f in c:
                extra = sizes[t] * (bits_of(f) - bits_of(choice[t]))
                gain = c[choice[t]] - c[f]
                if 0 < extra <= spare and gain > 0 and gain / extra > best_gain:
                    best, best_gain = (t, f, extra), gain / extra
        if best is None:
            return choice
        t, f, extra = best
        choice[t] = f
        spare -= extra
