"""The generation engine end to end on a tiny model with its real tokenizer."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_llama.cache import PromptCache
from mlx_llama.errors import MlxLlamaError
from mlx_llama.generate import decode, generate, stream_generate
from mlx_llama.loading import load
from mlx_llama.sampling import LogitsProcessor, SamplingParams, make_sampler


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints):
    return load(tiny_checkpoints["gqa"])


PROMPT = "Llamas are social animals"


def test_max_tokens_and_finish_reason(tiny):
    model, tok = tiny
    steps = list(stream_generate(model, tok, PROMPT, 12, logit_bias={2: -1e9}))
    assert steps[-1].finish_reason == "length"
    assert steps[-1].generation_tokens == 12 and len(steps) == 12
    assert all(s.finish_reason is None for s in steps[:-1])
    assert steps[-1].prompt_tokens == len(tok.encode(PROMPT))
    assert steps[-1].peak_memory_gb > 0 and steps[-1].generation_tps > 0


def test_max_tokens_minus_one_runs_to_the_end_token_or_the_context(tiny):
    """mlx-lm's "no limit"."""
    model, tok = tiny
    limit = model.config.max_position_embeddings
    ids = tok.encode(PROMPT)
    prompt = (ids * limit)[: limit - 5]
    steps = list(stream_generate(model, tok, prompt, -1, logit_bias={2: -1e9}))
    assert len(steps) == 5 and steps[-1].finish_reason == "length"
    ended = list(stream_generate(model, tok, PROMPT, -1, logit_bias={2: 1e9}))
    assert len(ended) == 1 and ended[-1].finish_reason == "stop"
    assert ended[-1].peak_memory == ended[-1].peak_memory_gb > 0  # mlx-lm's field name too


def test_end_token_stops_and_is_not_printed(tiny):
    model, tok = tiny
    steps = list(stream_generate(model, tok, PROMPT, 20, logit_bias={2: 1e9}))
    assert len(steps) == 1 and steps[0].finish_reason == "stop"
    assert steps[0].token == 2 and steps[0].text == ""


def test_seed_reproducible(tiny):
    model, tok = tiny
    kw = dict(temperature=1.0, top_p=0.95, logit_bias={2: -1e9})
    a = generate(model, tok, PROMPT, 24, seed=11, **kw)
    b = generate(model, tok, PROMPT, 24, seed=11, **kw)
    c = generate(model, tok, PROMPT, 24, seed=12, **kw)
    assert a == b and a != c


def test_repetition_penalty_covers_the_token_just_generated():
    """Decode builds step n+1 before token n reaches the host; the penalty must still see
    token n (a window lagging by one let every token repeat once under any penalty)."""
    vocab = 16
    favourite = np.linspace(0.1, 1.6, vocab, dtype=np.float32)  # token 15 best, then 14, ...

    def constant_model(tokens, cache):  # the same positive logits whatever came before
        return mx.array(favourite)[None, None]

    def run(context):
        params = SamplingParams(repetition_penalty=100.0, repetition_context_size=context)
        processor = LogitsProcessor(params, vocab, prompt=[0])
        steps = decode(constant_model, mx.array(favourite)[None], [], make_sampler(params),
                       processor)
        return [next(steps)[0] for _ in range(8)]

    assert run(1) == [15, 14, 15, 14, 15, 14, 15, 14]  # never the previous token
    assert run(3) == [15, 14, 13, 12, 15, 14, 13, 12]  # none of the last three again


def test_stop_string_cuts_output(tiny):
    model, tok = tiny
    full = generate(model, tok, PROMPT, 30, logit_bias={2: -1e9})
    assert len(full) > 12
    stop = full[6:10]
    out = list(stream_generate(model, tok, PROMPT, 30, stop=[stop], logit_bias={2: -1e9}))
    text = "".join(s.text for s in out)
    assert text == full[: full.index(stop)] and out[-1].finish_reason == "stop"


def test_chunked_prefill_gives_same_text(tiny):
    model, tok = tiny
    long_prompt = " ".join([PROMPT] * 8)
    assert generate(model, tok, long_prompt, 16, prefill_chunk=7) == generate(
        model, tok, long_prompt, 16
    )


def test_prompt_cache_prefills_only_new_tokens(tiny):
    model, tok = tiny
    cache = PromptCache(model.make_cache)
    first = list(stream_generate(model, tok, PROMPT, 8, cache=cache))
    held = first[-1].prompt_tokens + first[-1].generation_tokens
    assert len(cache.tokens) == held == cache.layers[0].offset
    follow_up = cache.tokens + tok.encode(" and they carry packs", add_special_tokens=False)
    second = list(stream_generate(model, tok, follow_up, 8, cache=cache))
    assert second[-1].cached_tokens == held
    fresh = generate(model, tok, follow_up, 8)
    assert "".join(s.text for s in second) == fresh


@pytest.mark.parametrize(
    "prompt, kwargs, needle",
    [("", {}, "empty"), ("word " * 600, {}, "context"), (PROMPT, {"top_p": 3.0}, "top_p"),
     (PROMPT, {"max_tokens": 0}, "max_tokens"), (PROMPT, {"max_tokens": -2}, "-1: no limit"),
     # Token ids past the vocabulary crashed the process (an embedding gather out of range).
     ([10**7], {}, "prompt token id 10000000 is outside the vocabulary"),
     ([5, -5], {}, "prompt token id -5"), ([True, False], {}, "prompt token id True"),
     # Values of the wrong type, as a web form or JSON hands them over.
     (PROMPT, {"temperature": "0.7"}, "temperature must be a number, got '0.7'"),
     (PROMPT, {"seed": 1.5}, "seed must be an integer"), (PROMPT, {"top_k": 2.5}, "top_k"),
     (PROMPT, {"max_tokens": "8"}, "max_tokens must be an integer"),
     (PROMPT, {"max_tokens": 2.5}, "max_tokens must be an integer"),
     (PROMPT, {"stop": 5}, "stop must be a string or a list of strings"),
     (PROMPT, {"stop": [5]}, "stop must be"),
     (PROMPT, {"logit_bias": {"hello": 1.0}}, "logit_bias must map token ids")],
)
def test_bad_input_is_one_line_error(tiny, prompt, kwargs, needle):
    model, tok = tiny
    max_tokens = kwargs.pop("max_tokens", 5)
    with pytest.raises(MlxLlamaError) as e:
        generate(model, tok, prompt, max_tokens, **kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_misspelt_option_names_itself_and_the_real_ones(tiny):
    model, tok = tiny
    with pytest.raises(TypeError, match="unexpected keyword argument 'temprature'; sampling "
                                        "options are temperature, top_p"):
        generate(model, tok, PROMPT, 4, temprature=0.5)


def test_token_ids_may_come_as_a_tuple_or_an_array(tiny):
    import numpy as np

    model, tok = tiny
    ids = tok.encode(PROMPT)
    expected = generate(model, tok, ids, 6)
    assert generate(model, tok, tuple(ids), 6) == generate(model, tok, np.array(ids), 6) == expected


def test_generation_runs_inside_the_wired_limit(tiny, monkeypatch):
    """On Metal the wired limit covers the model while tokens are made and is restored when
    the stream ends (faked here: the CPU backend has no wired memory)."""
    import mlx.core as mx

    from mlx_llama import memory

    model, tok = tiny
    limit = {"now": 7}
    during = []

    def set_wired_limit(value):
        previous, limit["now"] = limit["now"], value
        return previous

    monkeypatch.setattr(memory, "metal_available", lambda: True)
    monkeypatch.setattr(memory, "device_info",
                        lambda: {"max_recommended_working_set_size": 1 << 40})
    monkeypatch.setattr(mx, "set_wired_limit", set_wired_limit, raising=False)
    for _ in stream_generate(model, tok, PROMPT, 3):
        during.append(limit["now"])
    assert during == [memory.model_nbytes(model)] * 3
    assert limit["now"] == 7


def test_a_run_cut_inside_a_character_does_not_end_in_a_replacement_char(tiny):
    """Forced to emit the first byte of a 4-byte character and stopped there, the text holds
    nothing of it, not U+FFFD (the detokenizer itself still ends in U+FFFD: test_tokenizer)."""
    model, tok = tiny
    first = tok.token_to_id(f"<0x{'🦙'.encode()[0]:02X}>")
    assert first is not None
    cut = list(stream_generate(model, tok, PROMPT, 1, logit_bias={first: 100.0}))
    assert cut[-1].token == first and cut[-1].finish_reason == "length"
    assert "".join(r.text for r in cut) == ""


def test_numpy_values_are_accepted_and_a_written_replacement_char_is_kept(tiny):
    import numpy as np

    model, tok = tiny
    ids = tok.encode(PROMPT)
    expected = generate(model, tok, ids, 6, temperature=0.7, top_k=5, seed=3)
    assert generate(model, tok, [np.int64(i) for i in ids], np.int64(6),
                    temperature=np.float32(0.7), top_k=np.int64(5), seed=np.int64(3),
                    logit_bias={np.int64(7): np.float32(0.0)}) == expected
    from mlx_llama.generate import whole_characters

    written = tok.encode("x \ufffd", add_special_tokens=False)
    assert whole_characters("\ufffd", tok, written) == "\ufffd"  # the model wrote it whole
    cut = [tok.token_to_id("<0xF0>")]
    assert whole_characters("\ufffd", tok, cut) == ""
