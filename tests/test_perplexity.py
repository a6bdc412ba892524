"""Sliding-window perplexity: the window definition, agreement with transformers (tiny models
token by token, SmolLM2 within 0.5%), cache kinds judged by it, and the CLI."""

from __future__ import annotations

import json
import math
import shutil

import mlx.core as mx
import numpy as np
import pytest

from mlx_llama.cli import main
from mlx_llama.errors import MlxLlamaError
from mlx_llama.loading import load, load_model
from mlx_llama.perplexity import Window, perplexity, summarize, token_nlls, windows


def hf_guide_targets(n: int, context: int, stride: int) -> list[tuple[int, int, list[int]]]:
    """Hugging Face's sliding-window loop, written out: (begin, end, scored token indices).

    The guide masks all but the last `end - prev_end` labels of each window with -100, and
    the model shifts labels by one, so the window's first token is never a target.
    """
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        trg_len = end - prev_end
        labels = list(range(begin, end))
        scored = [t for i, t in enumerate(labels) if i >= len(labels) - trg_len and i > 0]
        out.append((begin, end, scored))
        prev_end = end
        if end == n:
            break
    return out


@pytest.mark.parametrize("n,context,stride", [
    (10, 4, 4), (10, 4, 2), (10, 4, 1), (11, 4, 3), (5, 8, 8), (64, 16, 5), (2, 2, 1),
    (9, 4, 4), (1025, 512, 512),  # a last window of one token: the guide's has no targets
])
def test_windows_follow_the_hf_guide_and_score_each_token_at_most_once(n, context, stride):
    spans = windows(n, context, stride)
    guide = [g for g in hf_guide_targets(n, context, stride) if g[2]]  # (its loss: NaN)
    assert [(w.start, w.end, list(range(w.first_target, w.end))) for w in spans] == guide
    scored = [t for w in spans for t in range(w.first_target, w.end)]
    unscored = [] if stride < context else list(range(context, n, stride))  # no context for them
    assert scored == [t for t in range(1, n) if t not in unscored]
    for w in spans:
        assert w.end - w.start <= context and w.first_target > w.start


def test_window_examples():
    assert windows(10, 4) == [Window(0, 4, 1), Window(4, 8, 5), Window(8, 10, 9)]
    assert windows(10, 4, 2) == [Window(0, 4, 1), Window(2, 6, 4), Window(4, 8, 6),
                                 Window(6, 10, 8)]


@pytest.mark.parametrize("extra", [{}, {"chunk": 3}])
def test_a_text_one_token_past_the_windows_is_scored(tiny_checkpoints, extra):
    """2 x context + 1 tokens crashed ('[logsumexp] Received empty array' / 'need at least
    one array to concatenate'): its last window had no target."""
    from mlx_llama.perplexity import perplexity

    model, _ = load_model(tiny_checkpoints["gqa"], compute_dtype=mx.float32)
    tokens = np.random.default_rng(1).integers(3, model.config.vocab_size, 17).tolist()
    if extra:
        extra = {**extra, "make_cache": model.make_cache}
    result = perplexity(model, tokens, 8, **extra)
    assert result.n_tokens == 14 and math.isfinite(result.ppl)  # 7 + 7: window starts unscored


@pytest.mark.parametrize("n,context,stride,message", [
    (10, 1, None, "--context must be at least 2"),
    (10, 4, 5, "--stride must be between 1 and the context"),
    (10, 4, 0, "--stride must be between 1 and the context"),
    (1, 4, 4, "at least 2"),
])
def test_bad_windows_are_refused(n, context, stride, message):
    with pytest.raises(MlxLlamaError, match=message):
        windows(n, context, stride)


def test_summary_statistics():
    nll = np.array([1.0, 2.0, 3.0, 2.0])
    r = summarize(nll)
    assert r.n_tokens == 4 and r.nll_mean == 2.0 and r.ppl == pytest.approx(math.exp(2.0))
    assert r.stderr == pytest.approx(math.exp(2.0) * nll.std(ddof=1) / 2)


def reference_nlls(hf_model, tokens: list[int], context: int, stride: int) -> np.ndarray:
    """Per-target NLLs from transformers over the same windows (float64 log-softmax)."""
    import torch

    out = []
    for begin, end, scored in hf_guide_targets(len(tokens), context, stride):
        with torch.no_grad():
            logits = hf_model(torch.tensor([tokens[begin:end]])).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        out += [-float(logp[t - 1 - begin, tokens[t]]) for t in scored]
    return np.array(out)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints):
    model, _ = load_model(tiny_checkpoints["gqa"], compute_dtype=mx.float32)
    return model


def test_tiny_model_token_nlls_equal_transformers(tiny, tiny_checkpoints):
    import torch
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(tiny_checkpoints["gqa"], dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(3, 512, 100).tolist()
    ours = token_nlls(tiny, tokens, context=32, stride=12)
    np.testing.assert_allclose(ours, reference_nlls(hf, tokens, 32, 12), atol=1e-4)


def test_cache_path_equals_one_pass(tiny):
    tokens = np.random.default_rng(1).integers(3, 512, 90).tolist()
    plain = token_nlls(tiny, tokens, context=40, stride=15)
    chunked = token_nlls(tiny, tokens, context=40, stride=15, make_cache=tiny.make_cache, chunk=7)
    rotating = token_nlls(tiny, tokens, 40, 15, chunk=9,
                          make_cache=lambda: tiny.make_cache("rotating", max_size=40))
    np.testing.assert_allclose(chunked, plain, atol=1e-4)
    np.testing.assert_allclose(rotating, plain, atol=1e-4)
    # A window longer than the rotating cache really is windowed: different numbers.
    small = token_nlls(tiny, tokens, 40, 15, chunk=9,
                       make_cache=lambda: tiny.make_cache("rotating", max_size=12))
    assert np.abs(small - plain).max() > 1e-3


def test_context_longer_than_the_model_is_refused(tiny):
    with pytest.raises(MlxLlamaError, match="longer than the model's 512 positions"):
        perplexity(tiny, list(range(3, 100)), context=1024)


def test_a_model_that_scores_nan_is_an_error_not_a_result(tiny_checkpoints, tmp_path):
    """One NaN weight made every score NaN, and `perplexity: nan` was printed with exit 0."""
    folder = tmp_path / "nan"
    shutil.copytree(tiny_checkpoints["gqa"], folder)
    weights = mx.load(str(folder / "model.safetensors"))
    name = next(k for k in weights if k.endswith("down_proj.weight"))
    broken = np.array(weights[name])
    broken.flat[0] = np.nan
    weights[name] = mx.array(broken)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    model, _ = load_model(folder, compute_dtype=mx.float32)
    with pytest.raises(MlxLlamaError, match="token scores are not finite"):
        perplexity(model, list(range(3, 60)), context=32)


# ------------------------------------------------------------------------------------------
# SmolLM2 (the bundled model): agreement with transformers, and the quantized caches
# ------------------------------------------------------------------------------------------

# Small on purpose (the CPU backend is slow): 64 tokens in windows of 48 every 16, fed to
# the caches 16 at a time, with key groups of 32 tokens so most keys read are quantized
# even in so short a text. The long-text figures come from benchmarks/long_context.py.
SMOL_TOKENS, SMOL_CONTEXT, SMOL_STRIDE, SMOL_CHUNK, SMOL_GROUP = 64, 48, 16, 16, 32


@pytest.fixture(scope="module")
def smol(smollm2_mlx, paragraph):
    model, tokenizer = load(smollm2_mlx)
    tokens = tokenizer.encode(paragraph)[:SMOL_TOKENS]
    assert len(tokens) == SMOL_TOKENS
    return model, tokens


@pytest.fixture(scope="module")
def smol_default(smol):
    model, tokens = smol
    return perplexity(model, tokens, SMOL_CONTEXT, SMOL_STRIDE)


def test_smollm2_perplexity_agrees_with_transformers(smol, smol_default, smollm2_reference):
    _, tokens = smol
    ref = reference_nlls(smollm2_reference, tokens, SMOL_CONTEXT, SMOL_STRIDE)
    assert smol_default.n_tokens == len(ref) == SMOL_TOKENS - 1
    assert abs(smol_default.ppl / math.exp(ref.mean()) - 1) < 0.005


@pytest.mark.parametrize("bits,tolerance", [(8, 0.005), (4, 0.03)])
def test_smollm2_quantized_cache_perplexity(smol, smol_default, bits, tolerance):
    """Each window goes through the quantized cache in chunks: attention reads packed K/V."""
    model, tokens = smol
    quantized = perplexity(model, tokens, SMOL_CONTEXT, SMOL_STRIDE, chunk=SMOL_CHUNK,
                           make_cache=lambda: model.make_cache("quantized", bits=bits,
                                                               group_size=SMOL_GROUP))
    assert quantized.n_tokens == smol_default.n_tokens
    assert abs(quantized.ppl / smol_default.ppl - 1) < tolerance


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------


def test_cli_prints_perplexity_tokens_and_stderr(tiny_checkpoints, tmp_path, capsys, paragraph):
    text = tmp_path / "text.txt"
    text.write_text(paragraph)
    folder = tiny_checkpoints["gqa"]
    assert main(["perplexity", "-m", str(folder), "--text", str(text), "--context", "64",
                 "--stride", "32"]) == 0
    out = capsys.readouterr().out
    model, tok = load(folder)
    expected = perplexity(model, tok.encode(paragraph), 64, 32)
    assert f"perplexity: {expected.ppl:.4f} ± {expected.stderr:.4f}" in out
    assert f"over {expected.n_tokens} scored tokens" in out
    assert main(["perplexity", "-m", str(folder), "--text", str(text), "--context", "64",
                 "--kv-bits", "8", "--kv-group-size", "32", "--chunk", "16"]) == 1
    assert "does not divide the model's head size 16" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--text", "missing.txt"], "text file missing.txt does not exist"),
    (["--text", "TEXT", "--stride", "600"], "--stride must be between 1 and the context"),
    (["--text", "TEXT", "--kv-bits", "8", "--max-kv-size", "64"], "cannot be combined"),
    (["--text", "."], ". is a folder"),
    (["--text", "TEXT", "--kv-bits", "8", "--quantized-kv-start", "8"],
     "--quantized-kv-start needs --chunk N"),
    (["--text", "TEXT", "--kv-group-size", "32"], "--kv-group-size only with --kv-bits"),
    (["--text", "TEXT", "--chunk", "-1"], "--chunk must be at least 1, got -1"),
    (["--text", "TEXT", "--max-text-tokens", "0"], "--max-text-tokens must be at least 2, got 0"),
    (["--text", "TEXT", "--max-text-tokens", "-3"], "--max-text-tokens must be at least 2"),
])
def test_cli_errors_are_one_line(tiny_checkpoints, tmp_path, capsys, argv, message):
    text = tmp_path / "t.txt"
    text.write_text("Llamas are social animals.")
    argv = [str(text) if a == "TEXT" else a for a in argv]
    assert main(["perplexity", "-m", str(tiny_checkpoints["gqa"]), *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_default_context_is_clamped_to_the_model(tiny_checkpoints, tmp_path, capsys):
    folder = tmp_path / "m"
    shutil.copytree(tiny_checkpoints["gqa"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 64}))
    text = tmp_path / "t.txt"
    text.write_text("Llamas are social animals and live with others as a herd. " * 20)
    assert main(["perplexity", "-m", str(folder), "--text", str(text)]) == 0
    captured = capsys.readouterr()
    assert "context 64, stride 64" in captured.out and "\r" not in captured.err


def test_an_unreadable_text_is_one_line(tmp_path, monkeypatch):
    """A permission error reading --text / --eval / --calibrate was a traceback."""
    from pathlib import Path

    from mlx_llama.perplexity import read_text

    path = tmp_path / "locked.txt"
    path.write_text("hello")

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(MlxLlamaError, match="cannot be read \\(Permission denied\\)"):
        read_text(str(path))
