"""KV cache kinds: quantized (attention on quantized K/V), rotating (bounded memory), the
options that choose them, and memory discipline (prefill peak, wired limit, fit warning)."""

from __future__ import annotations

import argparse

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_llama import memory
from mlx_llama.cache import KVCache, PromptCache, QuantizedKVCache, RotatingKVCache
from mlx_llama.cache_options import add_cache_arguments, cache_factory, cache_spec
from mlx_llama.config import ModelConfig
from mlx_llama.errors import MlxLlamaError
from mlx_llama.generate import decode, prefill
from mlx_llama.model import Llama
from mlx_llama.attention import attention, quantized_attention
from mlx_llama.sampling import greedy

VOCAB = 256


def random_llama(seed: int = 0, **overrides) -> Llama:
    """A small random Llama with GQA and a 64-wide head (quantizable with groups of 32/64)."""
    cfg = dict(model_type="llama", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=64, intermediate_size=256, vocab_size=VOCAB,
               max_position_embeddings=4096, rms_norm_eps=1e-5)
    cfg.update(overrides)
    mx.random.seed(seed)
    model = Llama(ModelConfig.from_dict(cfg))
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def model() -> Llama:
    return random_llama()


def tokens(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, VOCAB, n).tolist()


def run_chunks(model, ids: list[int], cache: list, chunk: int) -> mx.array:
    """Logits of every position, feeding `ids` through `cache` `chunk` tokens at a time."""
    out = [model(mx.array([ids[s : s + chunk]]), cache) for s in range(0, len(ids), chunk)]
    return mx.concatenate(out, axis=1)


def log_softmax(x: mx.array) -> np.ndarray:
    return np.array(x - mx.logsumexp(x, axis=-1, keepdims=True))


def greedy_tokens(model, prompt: list[int], cache: list, n: int, chunk: int = 512) -> list[int]:
    steps = decode(model, prefill(model, prompt, cache, chunk), cache, greedy)
    return [next(steps)[0] for _ in range(n)]


# ------------------------------------------------------------------------------------------
# Quantized attention and the quantized cache
# ------------------------------------------------------------------------------------------


def dequantized(keys, values, group_size: int, bits: int) -> tuple[mx.array, mx.array]:
    """What a quantized cache's (keys, values) stand for, in full precision."""
    packed, scales, biases, tail = keys
    grouped = mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits)
    k = mx.concatenate([grouped.swapaxes(2, 3), tail], axis=2)
    return k, mx.dequantize(*values, group_size=group_size, bits=bits)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("queries", [1, 7])
def test_quantized_attention_equals_attention_on_dequantized_kv(bits, queries):
    """Same maths as the fused kernel on the dequantized cache: only storage is approximate.
    40 keys in groups of 32 tokens: one quantized group and a tail of 8 exact keys."""
    rng = np.random.default_rng(bits + queries)
    q = mx.array(rng.standard_normal((1, 6, queries, 64)), dtype=mx.float32)
    k = mx.array(rng.standard_normal((1, 2, 40, 64)), dtype=mx.float32)
    v = mx.array(rng.standard_normal((1, 2, 40, 64)), dtype=mx.float32)
    qk, qv = QuantizedKVCache(bits, 32).update_and_fetch(k, v)
    assert qk[0].shape == (1, 2, 64, 32 * bits // 32) and qk[3].shape == (1, 2, 8, 64)
    dk, dv = dequantized(qk, qv, 32, bits)
    np.testing.assert_array_equal(np.array(dk[:, :, 32:]), np.array(k[:, :, 32:]))
    mask = "causal" if queries > 1 else None
    expected = mx.fast.scaled_dot_product_attention(q, dk, dv, scale=0.125, mask=mask)
    got = quantized_attention(q, qk, qv, 0.125, mask, group_size=32, bits=bits)
    assert got.shape == expected.shape
    assert float(mx.abs(got - expected).max()) < 1e-4
    # A boolean mask (what the rotating cache hands over) is honoured too.
    window = mx.array(rng.random((queries, 40)) < 0.7)
    window[:, 0] = True
    expected = mx.fast.scaled_dot_product_attention(q, dk, dv, scale=0.125, mask=window)
    got = quantized_attention(q, qk, qv, 0.125, window, group_size=32, bits=bits)
    assert float(mx.abs(got - expected).max()) < 1e-4


def test_keys_quantized_per_channel_survive_outlier_channels():
    """Rotary keys have a few huge channels. Grouped per token, they would share a scale
    with the small channels and crush them; grouped per channel along tokens they do not."""
    rng = np.random.default_rng(11)
    q = mx.array(rng.standard_normal((1, 4, 8, 64)), dtype=mx.float32)
    k = rng.standard_normal((1, 2, 128, 64))
    k[..., [3, 35]] *= 25  # outlier channels
    k = mx.array(k, dtype=mx.float32)
    v = mx.array(rng.standard_normal((1, 2, 128, 64)), dtype=mx.float32)
    exact = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask="causal")
    qk, qv = QuantizedKVCache(4, 64).update_and_fetch(k, v)
    per_channel = quantized_attention(q, qk, qv, 0.125, "causal", 64, 4)
    per_token_k = mx.dequantize(*mx.quantize(k, group_size=64, bits=4), group_size=64, bits=4)
    _, dv = dequantized(qk, qv, 64, 4)
    per_token = mx.fast.scaled_dot_product_attention(q, per_token_k, dv, scale=0.125,
                                                     mask="causal")
    error = {name: float(mx.abs(out - exact).mean())
             for name, out in (("channel", per_channel), ("token", per_token))}
    assert error["channel"] < error["token"] / 2, error


@pytest.mark.parametrize("bits,worst,mean,agree", [(8, 0.05, 0.01, 0.95), (4, 0.6, 0.1, 0.75)])
def test_quantized_cache_logits_close_to_default(model, bits, worst, mean, agree):
    ids = tokens(96)
    exact = log_softmax(run_chunks(model, ids, model.make_cache(), 32))
    cache = model.make_cache("quantized", bits=bits, group_size=64)
    approx = log_softmax(run_chunks(model, ids, cache, 32))
    error = np.abs(approx - exact)
    assert error.max() < worst and error.mean() < mean
    assert (approx.argmax(-1) == exact.argmax(-1)).mean() >= agree
    # Token by token (keys wait in the exact tail until a group of 64 fills): as close.
    stepwise = model.make_cache("quantized", bits=bits, group_size=64)
    error = np.abs(log_softmax(run_chunks(model, ids, stepwise, 1)) - exact)
    assert error.max() < worst and error.mean() < mean


def test_quantized_cache_never_repeats_kv_heads(model):
    cache = model.make_cache("quantized", bits=4, group_size=32)
    run_chunks(model, tokens(50), cache, 50)
    k_packed, k_scales, k_biases, tail, v_packed, v_scales, v_biases = cache[0].state
    # Keys: 32 tokens per channel group (transposed), the other 18 exact in the tail.
    assert k_packed.shape == (1, 2, 64, 32 * 4 // 32) and k_packed.dtype == mx.uint32
    assert k_scales.shape == k_biases.shape == (1, 2, 64, 1)
    assert tail.shape == (1, 2, 18, 64)
    # Values: every token, in groups of 32 along the head dimension.
    assert v_packed.shape == (1, 2, 50, 64 * 4 // 32)
    assert v_scales.shape == v_biases.shape == (1, 2, 50, 64 // 32)


def test_quantized_cache_trims_into_its_groups(model):
    ids = tokens(100, seed=6)
    cache = model.make_cache("quantized", bits=8, group_size=32)
    run_chunks(model, ids, cache, 25)
    assert cache[0].grouped == 96 and cache[0].key_tail.shape[2] == 4
    assert all(c.trim(30) == 30 for c in cache)  # 70 left: 64 grouped, 6 back in the tail
    assert cache[0].offset == 70 and cache[0].grouped == 64 and cache[0].key_tail.shape[2] == 6
    resumed = log_softmax(run_chunks(model, ids[70:], cache, 30))
    fresh = log_softmax(run_chunks(model, ids, model.make_cache("quantized", bits=8,
                                                                group_size=32), 25))
    assert np.abs(resumed - fresh[:, 70:]).max() < 0.02
    assert cache[0].offset == 100


@pytest.mark.parametrize("dtype", [mx.float16, mx.float32])
def test_quantized_memory_per_token(dtype):
    """8-bit <= 55% and 4-bit <= 35% of the default cache's bytes per token."""
    rng = np.random.default_rng(0)
    k = mx.array(rng.standard_normal((1, 3, 512, 64))).astype(dtype)
    per_token = {}
    for name, cache in [("default", KVCache()), ("q8", QuantizedKVCache(8, 64)),
                        ("q4", QuantizedKVCache(4, 64))]:
        cache.update_and_fetch(k, k)
        per_token[name] = cache.nbytes / cache.offset
    assert per_token["q8"] / per_token["default"] <= 0.55
    assert per_token["q4"] / per_token["default"] <= 0.35


def test_quantized_start_keeps_the_first_tokens_exact(model):
    ids = tokens(48, seed=3)
    exact = log_softmax(run_chunks(model, ids, model.make_cache(), 16))
    cache = model.make_cache("quantized", bits=4, start=20)
    first = log_softmax(run_chunks(model, ids[:32], cache, 16))  # offsets 0 and 16 < 20: plain
    assert not cache[0].quantized and len(cache[0].state) == 2
    np.testing.assert_allclose(first, exact[:, :32], atol=1e-5)
    rest = log_softmax(run_chunks(model, ids[32:], cache, 16))  # offset 32 >= 20: quantize all
    assert cache[0].quantized and len(cache[0].state) == 7 and cache[0].offset == 48
    assert 0 < np.abs(rest - exact[:, 32:]).max() < 0.5


# ------------------------------------------------------------------------------------------
# Rotating cache
# ------------------------------------------------------------------------------------------


def test_rotating_equals_default_while_it_fits(model):
    prompt = tokens(40, seed=1)
    default = greedy_tokens(model, prompt, model.make_cache(), 20, chunk=16)
    rotating = greedy_tokens(model, prompt, model.make_cache("rotating", max_size=64), 20, chunk=16)
    assert rotating == default
    ids = tokens(60, seed=2)
    exact = np.array(run_chunks(model, ids, model.make_cache(), 16))
    same = np.array(run_chunks(model, ids, model.make_cache("rotating", max_size=60), 16))
    np.testing.assert_array_equal(same, exact)


def test_rotating_keeps_generating_in_flat_memory(model):
    cache = model.make_cache("rotating", max_size=32, keep=4)
    steps = decode(model, prefill(model, tokens(20), cache, 8), cache, greedy)
    sizes = []
    for _ in range(100):
        next(steps)
        sizes.append((cache[0].nbytes, cache[0].keys.nbytes))
    assert cache[0].offset > 100  # positions keep counting (rotary stays correct)
    full = sizes[20:]  # past max_size: the ring is full
    assert len(set(full)) == 1
    assert cache[0].keys.shape[2] == 32
    positions = cache[0].held_positions().tolist()
    assert positions[:4] == [0, 1, 2, 3] and positions[-1] == cache[0].offset - 1
    assert len(positions) == 32


@pytest.mark.parametrize("chunk", [5, 16, 70])
def test_rotating_chunks_equal_token_by_token(model, chunk):
    """Past its size, a chunk gets an explicit window mask: same result as the ring."""
    ids = tokens(70, seed=4)
    stepwise = np.array(run_chunks(model, ids, model.make_cache("rotating", max_size=24), 1))
    chunked = np.array(run_chunks(model, ids, model.make_cache("rotating", max_size=24), chunk))
    np.testing.assert_allclose(chunked, stepwise, atol=1e-4)
    # ...and it really is windowed: it differs from unbounded attention once past the size.
    exact = np.array(run_chunks(model, ids, model.make_cache(), 70))
    np.testing.assert_allclose(chunked[:, :24], exact[:, :24], atol=1e-4)
    assert np.abs(chunked[:, 40:] - exact[:, 40:]).max() > 1e-3


def test_rotating_window_semantics_match_a_masked_reference():
    """Held keys at each step: the first `keep` positions and the most recent ones."""
    cache = RotatingKVCache(max_size=8, keep=2)
    for t in range(20):
        x = mx.full((1, 1, 1, 4), float(t))
        k, _ = cache.update_and_fetch(x, x)
        held = sorted(np.array(k[0, 0, :, 0]).astype(int).tolist())
        expected = sorted(set(range(min(2, t + 1))) | set(range(max(0, t - 5), t + 1)))
        assert held == expected
    assert sorted(cache.held_positions().tolist()) == expected


def test_prompt_cache_reuse_with_each_kind(model):
    ids = tokens(40, seed=5)
    for make in (lambda: model.make_cache("quantized", bits=8),
                 lambda: model.make_cache("rotating", max_size=64)):
        pc = PromptCache(make)
        prefill(model, ids, pc.layers, 16)
        pc.tokens = list(ids)
        assert pc.reuse(ids[:30] + tokens(5, seed=9)) == 30
        assert pc.layers[0].offset == 30
    small = PromptCache(lambda: model.make_cache("rotating", max_size=16))
    prefill(model, ids, small.layers, 16)
    small.tokens = list(ids)
    assert not small.layers[0].is_trimmable
    assert small.reuse(ids[:30] + [1, 2]) == 0  # tokens were dropped: start afresh
    assert small.layers[0].offset == 0


# ------------------------------------------------------------------------------------------
# Options (API and CLI flags)
# ------------------------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_cache_arguments(p)
    return p.parse_args(argv)


def test_cli_flags_choose_the_kind(model):
    assert cache_spec(parse([])) == ("default", {})
    assert cache_spec(parse(["--kv-bits", "4", "--kv-group-size", "32", "--quantized-kv-start",
                             "100"])) == ("quantized", {"bits": 4, "group_size": 32, "start": 100})
    assert cache_spec(parse(["--max-kv-size", "512"])) == ("rotating", {"max_size": 512})
    layers = cache_factory(parse(["--kv-bits", "8"]), model)()
    assert isinstance(layers[0], QuantizedKVCache) and layers[0].bits == 8
    assert isinstance(cache_factory(parse(["--max-kv-size", "99"]), model)()[0], RotatingKVCache)
    with pytest.raises(SystemExit):
        parse(["--kv-bits", "3"])


@pytest.mark.parametrize("kind,options,message", [
    ("quantized", {"bits": 3}, "--kv-bits must be 4 or 8"),
    ("quantized", {"bits": 8, "group_size": 128}, "use --kv-group-size 32 or 64"),
    ("quantized", {"bits": 8, "start": -1}, "--quantized-kv-start"),
    ("rotating", {"max_size": 4}, "--max-kv-size 4 must be larger"),
    ("paged", {}, "unknown cache kind 'paged'"),
    ("rotating", {"max_size": 10, "colour": 1}, "bad option for the rotating cache"),
])
def test_bad_options_are_refused_with_the_fix(model, kind, options, message):
    with pytest.raises(MlxLlamaError, match=message):
        model.make_cache(kind, **options)


def test_quantized_and_rotating_flags_do_not_combine():
    with pytest.raises(MlxLlamaError, match="cannot be combined"):
        cache_spec(parse(["--kv-bits", "8", "--max-kv-size", "64"]))


# ------------------------------------------------------------------------------------------
# Memory discipline
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["default", "quantized"])
def test_prefill_peak_memory_follows_the_chunk_not_the_prompt(kind):
    """Prefilling 4 chunks peaks within 1.5x of prefilling one.

    Two readings, both asserted: the process's peak (weights included, what a user sees),
    and the transient peak, above everything still held afterwards (weights and the cache,
    which must grow with the tokens it holds): activations and attention scores, which
    chunked prefill and attention.py's query blocks keep to one chunk's worth.
    """
    model = random_llama(num_hidden_layers=2, hidden_size=256, intermediate_size=768,
                         num_attention_heads=8, num_key_value_heads=2, vocab_size=4096)
    chunk = 256
    ids = np.random.default_rng(0).integers(0, 4096, 4 * chunk).tolist()

    def peaks(n: int) -> tuple[int, int]:
        cache = model.make_cache(kind)
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(prefill(model, ids[:n], cache, chunk))
        held = mx.get_active_memory() - base
        return mx.get_peak_memory(), mx.get_peak_memory() - base - held

    (total_one, transient_one), (total_four, transient_four) = peaks(chunk), peaks(4 * chunk)
    assert total_four <= 1.5 * total_one, (total_four / 1e6, total_one / 1e6)
    assert transient_four <= 1.5 * transient_one, (transient_four / 1e6, transient_one / 1e6)


@pytest.mark.parametrize("quantized", [False, True])
def test_attention_in_query_blocks_equals_one_pass(quantized, monkeypatch):
    import mlx_llama.attention as attention_module

    rng = np.random.default_rng(7)
    q = mx.array(rng.standard_normal((1, 4, 150, 64)), dtype=mx.float32)
    k = mx.array(rng.standard_normal((1, 2, 600, 64)), dtype=mx.float32)
    v = mx.array(rng.standard_normal((1, 2, 600, 64)), dtype=mx.float32)
    cache = QuantizedKVCache(8, 64) if quantized else None
    if quantized:
        k, v = cache.update_and_fetch(k, v)
    # Any mask a cache hands over hides the keys after each query (here also a random half).
    causal = np.arange(600)[None, :] <= np.arange(450, 600)[:, None]
    window = mx.array((rng.random((150, 600)) < 0.5) & causal)
    window[:, 0] = True
    assert attention_module.query_block(150, 600) < 150
    monkeypatch.setattr(attention_module, "fused_kernel", lambda: False)
    blocked = [attention(q, k, v, 0.125, m, cache) for m in ("causal", window)]
    monkeypatch.setattr(attention_module, "MIN_QUERY_BLOCK", 10**6)
    whole = [attention(q, k, v, 0.125, m, cache) for m in ("causal", window)]
    for b, w in zip(blocked, whole):
        assert float(mx.abs(b - w).max()) < 1e-5


def test_wired_limit_is_a_no_op_without_metal(model, monkeypatch):
    monkeypatch.setattr(memory, "metal_available", lambda: False)

    def refuse(limit):
        raise AssertionError("set_wired_limit called without Metal")

    monkeypatch.setattr(mx, "set_wired_limit", refuse)
    with memory.wired_limit(model):
        pass


def test_wired_limit_raised_for_the_model_and_restored(model, monkeypatch):
    size = memory.model_nbytes(model)
    calls = []
    current = {"limit": 1000}

    def set_wired_limit(limit):
        calls.append(limit)
        previous, current["limit"] = current["limit"], limit
        return previous

    monkeypatch.setattr(memory, "metal_available", lambda: True)
    monkeypatch.setattr(memory, "device_info",
                        lambda: {"max_recommended_working_set_size": 10 * size})
    monkeypatch.setattr(mx, "set_wired_limit", set_wired_limit)
    monkeypatch.setattr(mx, "synchronize", lambda *a: None)
    with memory.wired_limit(model):
        assert current["limit"] == size
    assert current["limit"] == 1000 and calls == [size, 1000]


def test_model_that_cannot_fit_gets_a_warning(model, monkeypatch):
    size = memory.model_nbytes(model)
    assert size == sum(w.nbytes for _, w in nn.utils.tree_flatten(model.parameters()))
    monkeypatch.setattr(memory, "available_memory", lambda: size // 2)
    message = memory.fit_warning(model)
    assert message and f"{size / 1e9:.2f} GB" in message and f"{size // 2 / 1e9:.2f} GB" in message
    monkeypatch.setattr(memory, "available_memory", lambda: size * 2)
    assert memory.fit_warning(model) is None


def logits_after(model, cache: PromptCache, prompt: list[int]) -> np.ndarray:
    """Reuse what `cache` holds of `prompt`, prefill the rest; the last position's logits."""
    done = cache.reuse(prompt)
    logits = prefill(model, prompt[done:], cache.layers, 8)
    cache.tokens = list(prompt)
    return np.array(logits)


def test_a_quantized_cache_is_not_cut_below_its_start(model):
    """Once quantized, a prompt cache cut back below --quantized-kv-start kept its quantized
    tokens where a fresh cache holds them in full precision: another reply than a fresh run."""
    make = lambda: model.make_cache("quantized", bits=4, group_size=32, start=40)  # noqa: E731
    first, second = tokens(60), tokens(30, seed=1)
    second = first[:30] + second[:5]
    cache = PromptCache(make)
    logits_after(model, cache, first)
    assert cache.layers[0].quantized
    assert not cache.layers[0].can_trim_to(30) and cache.layers[0].can_trim_to(45)
    reused = logits_after(model, cache, second)
    assert cache.layers[0].offset == len(second) and not cache.layers[0].quantized
    fresh = logits_after(model, PromptCache(make), second)
    assert np.array_equal(reused, fresh)


@pytest.mark.parametrize("kind, options", [("default", {}), ("quantized", {"bits": 8})])
def test_an_interrupted_prefill_keeps_the_chunks_it_finished(model, kind, options):
    """A prefill stopped between chunks (Ctrl-C, a cancelled request) left the cache holding
    them but recording none, so a retry prefilled everything again."""
    from mlx_llama.generate import stream_generate

    class Tok:  # what stream_generate needs for token ids
        eos_token_ids: list[int] = []

        def detokenizer(self, after=()):
            from mlx_llama.tokenizer import StreamingDetokenizer

            return StreamingDetokenizer(lambda ids: "".join(chr(65 + i % 26) for i in ids), set())

    class Stop(Exception):
        pass

    def stop_after_two(done: int, total: int) -> None:
        if done >= 16:
            raise Stop

    prompt = tokens(70)
    cache = PromptCache(lambda: model.make_cache(kind, **options))
    with pytest.raises(Stop):
        list(stream_generate(model, Tok(), prompt, 4, cache=cache, prefill_chunk=8,
                             prefill_progress=stop_after_two))
    assert cache.tokens == prompt[:16] and {c.offset for c in cache.layers} == {16}
    retry = list(stream_generate(model, Tok(), prompt, 4, cache=cache, prefill_chunk=8))
    fresh = list(stream_generate(model, Tok(), prompt, 4, prefill_chunk=8,
                                 cache=PromptCache(lambda: model.make_cache(kind, **options))))
    assert retry[0].cached_tokens == 16 and [r.token for r in retry] == [r.token for r in fresh]
