"""Each sampling option, tested on its own for its effect."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_llama.errors import MlxLlamaError
from mlx_llama.generate import StopStrings
from mlx_llama.sampling import LogitsProcessor, SamplingParams, make_sampler

VOCAB = 50


def logprobs_of(logits) -> mx.array:
    logits = mx.array(np.asarray(logits, dtype=np.float32))[None]
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def draws(params: SamplingParams, logits, n: int = 400) -> list[int]:
    mx.random.seed(0)
    sampler = make_sampler(params)
    lp = logprobs_of(logits)
    return [sampler(lp).item() for _ in range(n)]


@pytest.fixture
def flat_logits() -> np.ndarray:
    return np.random.default_rng(0).normal(size=VOCAB).astype(np.float32)


def test_greedy_is_argmax(flat_logits):
    assert set(draws(SamplingParams(), flat_logits, 5)) == {int(flat_logits.argmax())}


def test_top_k_one_equals_greedy(flat_logits):
    got = draws(SamplingParams(temperature=1.5, top_k=1), flat_logits, 50)
    assert set(got) == {int(flat_logits.argmax())}


def test_top_k_keeps_only_k_best(flat_logits):
    top3 = set(np.argsort(-flat_logits)[:3].tolist())
    got = draws(SamplingParams(temperature=5.0, top_k=3), flat_logits)
    assert set(got) == top3  # all three appear at such a high temperature, nothing else


def test_top_p_keeps_the_nucleus():
    probs = np.array([0.5, 0.3, 0.15] + [0.05 / (VOCAB - 3)] * (VOCAB - 3))
    got = draws(SamplingParams(temperature=1.0, top_p=0.7), np.log(probs))
    assert set(got) == {0, 1}  # 0.5 < 0.7 so the second token is needed; the third is not


def test_top_p_zero_keeps_only_the_best(flat_logits):
    got = draws(SamplingParams(temperature=1.5, top_p=0.0), flat_logits, 50)
    assert set(got) == {int(flat_logits.argmax())}


def test_min_p_drops_unlikely_tokens():
    probs = np.array([0.4, 0.3, 0.1] + [0.2 / (VOCAB - 3)] * (VOCAB - 3))
    got = draws(SamplingParams(temperature=1.0, min_p=0.5), np.log(probs))
    assert set(got) == {0, 1}  # threshold 0.2: 0.4 and 0.3 pass, 0.1 does not


def test_temperature_spreads_the_distribution(flat_logits):
    cold = draws(SamplingParams(temperature=0.2), flat_logits)
    hot = draws(SamplingParams(temperature=3.0), flat_logits)
    assert len(set(hot)) > 2 * len(set(cold))


def test_same_seed_same_draws_different_seed_different(flat_logits):
    params = SamplingParams(temperature=1.0)
    sampler = make_sampler(params)
    lp = logprobs_of(flat_logits)

    def run(seed):
        mx.random.seed(seed)
        return [sampler(lp).item() for _ in range(30)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def apply(params: SamplingParams, logits, prompt=(), generated=()):
    proc = LogitsProcessor(params, VOCAB, list(prompt))
    for t in generated:
        proc.observe(mx.array([t]))
    return np.array(proc(mx.array(np.asarray(logits, np.float32))[None]))[0]


def test_repetition_penalty_lowers_seen_tokens():
    logits = np.full(VOCAB, 1.0)
    logits[4] = -1.0
    out = apply(SamplingParams(repetition_penalty=2.0), logits, prompt=[3, 4])
    assert out[3] == pytest.approx(0.5) and out[4] == pytest.approx(-2.0)
    assert out[5] == pytest.approx(1.0)


def test_frequency_and_presence_penalties_count_generated_tokens():
    logits = np.zeros(VOCAB)
    freq = apply(SamplingParams(frequency_penalty=0.5), logits, generated=[7, 7, 9])
    assert freq[7] == pytest.approx(-1.0) and freq[9] == pytest.approx(-0.5) and freq[0] == 0
    pres = apply(SamplingParams(presence_penalty=0.5), logits, generated=[7, 7, 9])
    assert pres[7] == pytest.approx(-0.5) and pres[9] == pytest.approx(-0.5) and pres[0] == 0


def test_a_temperature_too_small_for_float32_is_greedy(flat_logits):
    """1/1e-39 overflows float32: sampling turned uniform (a different token per seed)."""
    assert set(draws(SamplingParams(temperature=1e-39), flat_logits, 50)) == {
        int(flat_logits.argmax())}


def test_logit_bias_bans_and_forces(flat_logits):
    best = int(flat_logits.argmax())
    banned = SamplingParams(temperature=1.0, logit_bias={best: -math.inf})
    assert best not in draws(banned, apply(banned, flat_logits))
    forced = SamplingParams(temperature=1.0, logit_bias={3: 100.0})
    assert set(draws(forced, apply(forced, flat_logits), 50)) == {3}


@pytest.mark.parametrize(
    "kwargs",
    [dict(temperature=-1), dict(top_p=-0.1), dict(top_p=1.5), dict(seed=-1), dict(seed=2**64), dict(top_k=-2), dict(min_p=2),
     dict(repetition_penalty=0), dict(frequency_penalty=3), dict(temperature=float("nan")),
     # float32 makes these 0 and inf: the penalised logits became inf/NaN (a 500 in the server)
     dict(repetition_penalty=1e-300), dict(repetition_penalty=1e300),
     dict(logit_bias={VOCAB + 5: 1.0})],
)
def test_invalid_values_are_one_line_errors(kwargs):
    with pytest.raises(MlxLlamaError) as e:
        SamplingParams(**kwargs).validate(VOCAB)
    assert "\n" not in str(e.value)


def test_stop_string_spanning_pieces_is_never_emitted():
    stops = StopStrings(["</end>"])
    emitted = ""
    for piece in ["Hello wor", "ld <", "/e", "nd> more"]:
        text, hit = stops.feed(piece)
        emitted += text
        if hit:
            break
    assert hit and emitted == "Hello world "


def test_stop_prefix_that_does_not_complete_is_released():
    stops = StopStrings(["STOP"])
    a, _ = stops.feed("go ST")
    b, _ = stops.feed("ay")
    assert a + b + stops.flush() == "go STay" and a == "go "


def test_the_message_states_the_range_that_is_checked():
    """--temp 150 was refused as "must be >= 0"; the allowed range is [0, 100]."""
    with pytest.raises(MlxLlamaError, match=r"invalid temperature 150: must be in \[0, 100\]"):
        SamplingParams(temperature=150).validate(VOCAB)
