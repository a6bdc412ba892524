"""Quantization that keeps quality: scale search, sensitivity budget, calibration, reports.

The end-to-end checks use a tiny Llama trained here for a few seconds (benchmarks/tiny_llama.py,
torch) on a few kilobytes of the standard library's docstrings, until it predicts that text
well: its weights are off any quantization grid and, unlike a random model, its perplexity
moves when they are rounded.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from convert.affine import pack_codes, quantize_search, reconstruction_error
from convert.api import convert
from convert.gptq import gptq_quantize, output_error
from convert.quantize import QuantSpec
from convert.sensitivity import allocate
from mlx_llama.errors import MlxLlamaError
from mlx_llama.loading import load
from mlx_llama.perplexity import perplexity

ROOT = Path(__file__).resolve().parents[1]


def _tiny_llama_module():
    path = ROOT / "benchmarks" / "tiny_llama.py"
    spec = importlib.util.spec_from_file_location("tiny_llama", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("tiny_llama", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(HF folder of a trained 2-layer Llama, the text it was trained on)."""
    import torch

    tiny = _tiny_llama_module()
    root = tmp_path_factory.mktemp("trained")
    text = tiny.stdlib_docstrings(packages=("json",))[:4000]
    (root / "text.txt").write_text(text)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on two shared cores are slower than one
    try:
        folder = tiny.train_tiny_llama(
            root / "hf", text, vocab_size=384, hidden_size=64, intermediate_size=192,
            num_hidden_layers=2, max_steps=250, seq_len=64, batch_size=16, lr=1e-2,
            dtype="float32",
        )
    finally:
        torch.set_num_threads(threads)
    return folder, root / "text.txt"


def folder_ppl(folder: Path, text: str) -> float:
    model, tokenizer = load(folder)
    return perplexity(model, tokenizer.encode(text), 512).ppl


def bits_per_weight(folder: Path, source: Path) -> float:
    """Bits stored (codes, scales, biases, float tensors) per parameter of the source."""
    stored = sum(a.nbytes for f in folder.glob("*.safetensors") for a in mx.load(str(f)).values())
    params = sum(a.size for f in source.glob("*.safetensors") for a in mx.load(str(f)).values())
    return stored * 8 / params


# ---------------------------------------------------------------------------------------------
# The scale search
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_packed_codes_use_mlx_layout(bits):
    w = mx.random.normal((4, 128), key=mx.random.key(bits))
    wq, scales, biases = mx.quantize(w, group_size=32, bits=bits)
    deq = mx.dequantize(wq, scales, biases, group_size=32, bits=bits)
    codes = mx.round((deq.reshape(4, -1, 32) - biases[..., None]) / scales[..., None])
    assert np.array_equal(np.array(pack_codes(codes.reshape(4, 128), bits)), np.array(wq))


def test_search_beats_minmax_and_finds_a_grid_the_weights_sit_on():
    rng = np.random.default_rng(0)
    w = rng.standard_t(4, size=(64, 256)).astype(np.float32)  # heavy tails: outliers
    h = rng.gamma(0.5, size=256).astype(np.float32)  # uneven channel importance
    w, h = mx.array(w), mx.array(h)
    for bits in (3, 4):
        plain = reconstruction_error(w, *mx.quantize(w, 64, bits), bits, 64)
        ours = reconstruction_error(w, *quantize_search(w, bits, 64), bits, 64)
        assert ours < 0.9 * plain
        plain_h = reconstruction_error(w, *mx.quantize(w, 64, bits), bits, 64, h)
        ours_h = reconstruction_error(w, *quantize_search(w, bits, 64, h), bits, 64, h)
        assert ours_h < 0.9 * plain_h
    # Weights already on a 4-bit grid per 32, made as llama.cpp's Q4_1 makes it (the group's
    # minimum is code 0, its maximum code 15), like SmolLM2's: found again.
    steps = rng.uniform(0.01, 0.1, size=(64, 8, 1))
    lows = rng.uniform(-1, 0, size=(64, 8, 1))
    codes = rng.integers(0, 16, size=(64, 8, 32))
    codes[..., 0], codes[..., 1] = 0, 15
    on_grid = mx.array((lows + steps * codes).reshape(64, 256).astype(np.float32))
    plain = reconstruction_error(on_grid, *mx.quantize(on_grid, 32, 4), 4, 32)
    ours = reconstruction_error(on_grid, *quantize_search(on_grid, 4, 32), 4, 32)
    assert ours < 1e-3 * plain


def test_search_output_is_standard_mlx_affine():
    w = mx.random.normal((96, 128), key=mx.random.key(1)).astype(mx.bfloat16)
    wq, scales, biases = quantize_search(w, 4, 64)
    ref = mx.quantize(w, group_size=64, bits=4)
    assert [a.shape for a in (wq, scales, biases)] == [a.shape for a in ref]
    assert (wq.dtype, scales.dtype, biases.dtype) == (mx.uint32, mx.bfloat16, mx.bfloat16)
    x = mx.random.normal((3, 128), key=mx.random.key(2))
    scales, biases = scales.astype(mx.float32), biases.astype(mx.float32)
    fused = mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=64, bits=4)
    dense = x @ mx.dequantize(wq, scales, biases, group_size=64, bits=4).T
    assert mx.allclose(fused, dense, atol=1e-3).item()


def _correlated_layer(seed: int, rows: int = 48, cols: int = 256):
    """A random layer and the covariance of correlated, unevenly scaled inputs."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(cols, cols)) / np.sqrt(cols) + np.eye(cols)
    x = rng.normal(size=(4 * cols, cols)) @ mix * rng.gamma(1.0, size=cols)
    cov = (x.T @ x / len(x)).astype(np.float32)
    w = mx.array(rng.normal(size=(rows, cols)).astype(np.float32)).astype(mx.bfloat16)
    return w, cov


@pytest.mark.parametrize("bits,group_size", [(4, 64), (4, 128), (3, 64)])
def test_gptq_lowers_the_output_error_of_plain_rounding(bits, group_size):
    w, cov = _correlated_layer(bits * group_size)
    h = mx.array(np.diag(cov).copy())
    plain = quantize_search(w, bits, group_size, h)  # same group search, nearest rounding
    err_plain = output_error(w, mx.dequantize(*plain, group_size=group_size, bits=bits), cov)
    # Trusting this well-estimated covariance fully (shrink 0), and as the converter does.
    for shrink, most in ((0.0, 0.8), (None, 0.9)):
        kw = {} if shrink is None else {"shrink": shrink}
        ours = gptq_quantize(w, bits, group_size, cov, h, **kw)
        assert [(a.shape, a.dtype) for a in ours] == [(a.shape, a.dtype) for a in plain]
        err_ours = output_error(w, mx.dequantize(*ours, group_size=group_size, bits=bits), cov)
        assert err_ours < most * err_plain, (shrink, err_ours, err_plain)
    # With uncorrelated inputs there is nothing to compensate: plain rounding again.
    diag = np.diag(np.diag(cov))
    again = gptq_quantize(w, bits, group_size, diag, h)
    assert output_error(w, mx.dequantize(*again, group_size=group_size, bits=bits), diag) \
        <= 1.001 * output_error(w, mx.dequantize(*plain, group_size=group_size, bits=bits), diag)


def test_a_row_length_that_is_not_whole_groups_is_refused():
    """576 values (SmolLM2's hidden size) are not whole groups of 128: the search and GPTQ
    refuse, as mx.quantize does, instead of leaving the tail of every row out."""
    w = mx.random.normal((8, 576), key=mx.random.key(0))
    cov = mx.eye(576)
    for quantize in (lambda: quantize_search(w, 5, 128),
                     lambda: gptq_quantize(w, 5, 128, cov)):
        with pytest.raises(ValueError, match="not whole groups of 128"):
            quantize()
    assert gptq_quantize(w, 5, 64, cov)[1].shape == (8, 9)


def test_inverse_factor_is_the_upper_cholesky_factor_of_the_damped_inverse():
    from convert.gptq import DAMP, inverse_factor, shrunk

    rng = np.random.default_rng(11)
    for n in (96, 300):  # one block, and several levels of lower_inverse's halving
        x = rng.normal(size=(n // 2, n)) * rng.gamma(1.0, size=n)
        x[:, 7] = 0  # a channel that never carries a signal
        cov = (x.T @ x / len(x)).astype(np.float32)
        u = inverse_factor(cov)
        assert np.array_equal(u, np.triu(u)) and u.flags.c_contiguous
        h = shrunk(cov).astype(np.float64)
        h[7, :] = h[:, 7] = 0
        h[7, 7] = 1
        h[np.diag_indices(n)] += DAMP * np.mean(np.diag(h))
        np.testing.assert_allclose(u.T @ u @ h, np.eye(n), atol=1e-8)
        np.testing.assert_allclose(u, np.linalg.cholesky(np.linalg.inv(h)).T, rtol=1e-8,
                                   atol=1e-10)


def test_gptq_rows_are_independent():
    """Measuring a sample of rows (sensitivity.py) gives exactly those rows of the result."""
    w, cov = _correlated_layer(7)
    full = gptq_quantize(w, 4, 64, cov)
    idx = mx.array([0, 5, 17, 40])
    part = gptq_quantize(w[idx], 4, 64, cov)
    for a, b in zip(full, part):
        assert mx.array_equal(a[idx], b).item()


def test_recipe_forms_covariances_from_rows_on_demand_and_holds_two():
    """GPTQ's covariances are formed from calibration's input rows when a layer needs them
    and only the last HELD_INPUTS are kept, whatever the number of layers: the conversion's
    memory does not grow with one (in, in) matrix per input of the model."""
    from convert.calibrate import Calibration
    from convert.quantize import HELD_INPUTS, QuantRecipe

    rng = np.random.default_rng(5)
    cols = 128
    rows = {}
    for layer in range(3):
        for owner in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj"):
            x = rng.normal(size=(96, cols)) * rng.gamma(1.0, size=cols)
            rows[f"model.layers.{layer}.{owner}"] = (x[:40].astype(np.float32),
                                                     x[40:].astype(np.float32))
    cal = Calibration(tokens=96, rows=rows)
    recipe = QuantRecipe(method="gptq", gptq_inputs=cal)
    formed = []
    covariance = cal.covariance
    cal.covariance = lambda m: formed.append(cal.owner(m)) or covariance(m)
    w = mx.array(rng.normal(size=(16, cols)).astype(np.float32))
    order = ["mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
             "self_attn.q_proj", "self_attn.v_proj"]  # a checkpoint's (sorted) order
    for layer in range(3):
        for leaf in order:
            module = f"model.layers.{layer}.{leaf}"
            assert recipe.gptq_covers(module)
            got = recipe.quantize(module, w, QuantSpec(4, 64))
            assert len(recipe.held) <= HELD_INPUTS
            want = gptq_quantize(w, 4, 64, covariance(module))
            for a, b in zip(got, want):
                assert mx.array_equal(a, b).item(), module
    assert sorted(formed) == sorted(rows)  # each input formed once
    assert not recipe.gptq_covers("model.layers.0.mlp.down_proj")


def test_gptq_cost_is_priced_on_the_half_it_was_not_fitted_to():
    """format_cost fits GPTQ on one half of the inputs and prices it on the other: unbiased
    for new inputs, where pricing on the fitted half (what it did before) flatters GPTQ."""
    from convert.gptq import inverse_factor
    from convert.sensitivity import format_cost

    rng = np.random.default_rng(3)
    cols = 256
    mix = rng.normal(size=(cols, cols)) / np.sqrt(cols) + np.eye(cols)
    mix *= rng.gamma(1.0, size=cols)
    truth = mix.T @ mix  # the inputs' real covariance
    w = mx.array(rng.normal(size=(32, cols)).astype(np.float32)).astype(mx.bfloat16)

    def sampled(n):  # a covariance measured on n inputs: fewer than the layer has channels
        x = rng.normal(size=(n, cols)) @ mix
        return (x.T @ x / n).astype(np.float32)

    halves = [(h, inverse_factor(h).astype(np.float32)) for h in (sampled(96), sampled(96))]
    factors = (mx.ones((32, 1)), mx.ones((1, cols)))
    priced = format_cost(w, 4, 64, factors, None, halves=halves)

    def error(fit, u, cov):
        q = gptq_quantize(w, 4, 64, fit, factor=u)
        return output_error(w, mx.dequantize(*q, group_size=64, bits=4), cov)

    real = np.mean([error(h, u, truth) for h, u in halves])  # what new inputs will see
    in_sample = np.mean([error(h, u, h) for h, u in halves])
    assert in_sample < 0.8 * real, (in_sample, real)  # the bias this pricing removes
    assert abs(priced / real - 1) < 0.15, (priced, real)


# ---------------------------------------------------------------------------------------------
# The budget
# ---------------------------------------------------------------------------------------------


def test_allocation_spends_the_budget_on_what_is_sensitive():
    formats = [(3, 64), (4, 64), (8, 64)]
    # Cost falls 4x per extra bit; "hot" is 100x as sensitive as the others.
    costs = {name: {f: weight * 4.0 ** -f[0] for f in formats}
             for name, weight in (("hot", 100.0), ("a", 1.0), ("b", 1.0))}
    sizes = {"hot": 1000, "a": 1000, "b": 1000}
    bpw = lambda f: f[0] + 2 * 16 / f[1]  # noqa: E731
    choice = allocate(costs, sizes, budget_bits=3000 * 6.0, scale_bits=16)
    assert sum(sizes[t] * bpw(f) for t, f in choice.items()) <= 3000 * 6.0
    assert choice == {"hot": (8, 64), "a": (4, 64), "b": (4, 64)}
    # 3 bits only when 4 cannot meet the budget.
    tight = allocate(costs, sizes, budget_bits=3000 * 4.2, scale_bits=16)
    assert sum(sizes[t] * bpw(f) for t, f in tight.items()) <= 3000 * 4.2
    assert tight["hot"][0] >= 4 and min(f[0] for f in tight.values()) == 3
    with pytest.raises(MlxLlamaError, match="--bpw is too low"):
        allocate(costs, sizes, budget_bits=3000 * 3.0, scale_bits=16)


# ---------------------------------------------------------------------------------------------
# End to end on a trained model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def conversions(trained, tmp_path_factory):
    """Plain min/max 4-bit (mlx-lm's recipe) and ours at --bpw 4.5, both bfloat16."""
    folder, _ = trained
    root = tmp_path_factory.mktemp("conversions")
    plain = convert(folder, root / "minmax", dtype="bfloat16", quantize=True, method="minmax",
                    embedding_bits=4, progress=False)
    ours = convert(folder, root / "bpw45", dtype="bfloat16", bpw=4.5, calibrate="builtin",
                   progress=False)
    return plain, ours


def test_bpw_budget_halves_the_perplexity_cost_of_minmax(trained, conversions):
    folder, text_path = trained
    plain, ours = conversions
    text = text_path.read_text()
    full = folder_ppl(folder, text)
    plain_cost = folder_ppl(plain, text) / full - 1
    ours_cost = folder_ppl(ours, text) / full - 1
    assert bits_per_weight(ours, folder) <= 4.5 + 1e-6
    assert bits_per_weight(plain, folder) >= 4.5  # the baseline is not given fewer bits
    assert plain_cost > 0.01, "the test model is not sensitive enough to judge anything"
    assert ours_cost <= 0.5 * plain_cost, (ours_cost, plain_cost)


def test_gptq_under_the_budget_halves_the_perplexity_cost_of_minmax(trained, conversions,
                                                                    tmp_path):
    folder, text_path = trained
    plain, _ = conversions
    ours = convert(folder, tmp_path / "gptq", dtype="bfloat16", bpw=4.5, method="gptq",
                   progress=False)
    text = text_path.read_text()
    full = folder_ppl(folder, text)
    plain_cost = folder_ppl(plain, text) / full - 1
    ours_cost = folder_ppl(ours, text) / full - 1
    assert bits_per_weight(ours, folder) <= 4.5 + 1e-6
    assert plain_cost > 0.01
    assert ours_cost <= 0.5 * plain_cost, (ours_cost, plain_cost)


def test_calibration_covariances_match_the_mean_squares(trained):
    from convert.api import open_source
    from convert.calibrate import calibrate
    from convert.mapping import map_weights
    from convert.measure import source_model
    from mlx_llama.config import ModelConfig

    folder, text_path = trained
    source = open_source(folder, None, False)
    cfg = ModelConfig.from_dict(source.config)
    model = source_model(map_weights(source.weights, cfg), cfg)
    _, tokenizer = load(folder)
    ids = tokenizer.encode(text_path.read_text())
    cal = calibrate(model, ids, window=64, max_tokens=128, covariance=True, head_tokens=128)
    assert set(cal.inputs) >= {"lm_head", "model.layers.0.mlp.down_proj"}
    for module, h in cal.inputs.items():  # every linear input and the head's
        cov = cal.covariance(module)
        assert cov.shape == (h.shape[0], h.shape[0])
        np.testing.assert_allclose(np.diag(cov), np.array(h), rtol=1e-4, atol=1e-6,
                                   err_msg=module)
    # Kept as input rows, fewer than the inputs (what makes it smaller than a covariance).
    even, odd = cal.rows["model.layers.0.mlp.down_proj"]
    assert len(even) + len(odd) == cal.tokens == 127  # 128 tokens: 127 with a next one
    assert even.shape[1] == cal.inputs["model.layers.0.mlp.down_proj"].shape[0]
    layer = "model.layers.1.self_attn"
    assert f"{layer}.k_proj" not in cal.rows  # k reads q's input: kept once
    np.testing.assert_array_equal(cal.covariance(f"{layer}.k_proj"),
                                  cal.covariance(f"{layer}.q_proj"))
    # Two disjoint halves of the text (even and odd windows) that add up to the whole.
    a, b = cal.covariance_halves(f"{layer}.v_proj")
    half = len(cal.rows[f"{layer}.q_proj"][0])  # tokens in the even windows
    assert 0 < half < cal.tokens
    whole = (a * half + b * (cal.tokens - half)) / cal.tokens
    np.testing.assert_allclose(whole, cal.covariance(f"{layer}.q_proj"), rtol=1e-4, atol=1e-6)
    assert not np.allclose(a, b, rtol=0.05)
    # The head's rows go on past max_tokens (forward only); nothing else changes.
    wide = calibrate(model, ids, window=64, max_tokens=128, covariance=True, head_tokens=256)
    assert len(ids) > 256
    for owner, (even, odd) in cal.rows.items():
        w_even, w_odd = wide.rows[owner]
        if owner == "lm_head":  # windows 2 and 3 (64 tokens each): one more to each half
            assert (len(w_even), len(w_odd)) == (len(even) + 64, len(odd) + 64)
            w_even, w_odd = w_even[: len(even)], w_odd[: len(odd)]
        np.testing.assert_allclose(w_even, even, rtol=1e-5, atol=1e-6, err_msg=owner)
        np.testing.assert_allclose(w_odd, odd, rtol=1e-5, atol=1e-6, err_msg=owner)
    assert wide.tokens == cal.tokens
    # The extra rows are the head's input at those tokens, as the graded pass would give it.
    graded = calibrate(model, ids, window=64, max_tokens=256, covariance=True, head_tokens=256)
    (w_even, w_odd), (g_even, g_odd) = wide.rows["lm_head"], graded.rows["lm_head"]
    np.testing.assert_allclose(w_even, g_even, rtol=1e-4, atol=1e-5)  # tokens 0-63, 128-191
    # Odd windows: tokens 64-126 (127 has no next token in the 128 graded), then 192-254.
    np.testing.assert_allclose(w_odd[:63], g_odd[:63], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(w_odd[63:126], g_odd[64:127], rtol=1e-4, atol=1e-5)
    # A text shorter than two windows is cut in two all the same.
    short = calibrate(model, tokenizer.encode(text_path.read_text()), window=64, max_tokens=64,
                      covariance=True)
    short_half = len(short.rows[f"{layer}.q_proj"][0])
    assert 0 < short_half < short.tokens


def test_mixed_precision_folder_loads_in_mlx_lm_with_our_logits(trained, conversions):
    mlx_lm = pytest.importorskip("mlx_lm")
    _, ours = conversions
    block = json.loads((ours / "config.json").read_text())["quantization"]
    overrides = {k: v for k, v in block.items() if isinstance(v, dict)}
    assert len({(v["bits"], v["group_size"]) for v in overrides.values()}) >= 2
    tokens = mx.array([[1, 17, 42, 99, 5, 260, 300, 7]])
    model, _ = load(ours, compute_dtype=mx.float32)
    theirs, _ = mlx_lm.load(str(ours))
    theirs.set_dtype(mx.float32)  # both compute in float32 from the same stored numbers
    expected = np.array(model(tokens))
    got = np.array(theirs(tokens))
    assert np.abs(expected - got).max() < 1e-3 * np.abs(expected).max()


def test_cli_prints_bits_per_weight_and_perplexity(trained, tmp_path, capsys):
    from convert.cli import main

    folder, text_path = trained
    code = main([str(folder), "-o", str(tmp_path / "out"), "--dtype", "bfloat16", "-q",
                 "--calibrate", "builtin", "--embeddings-bits", "4", "--eval", str(text_path)])
    captured = capsys.readouterr()
    out, err = captured.out, captured.err
    assert code == 0
    assert "bits per weight" in out and "Perplexity on" in out and "source" in out
    # scoring both models takes minutes on a real model: it says so, and counts the windows
    assert "Evaluating on" in err and "converted: 6 windows" in err and "source: 6 windows" in err


def test_user_errors_are_one_line(trained, tmp_path, capsys):
    from convert.cli import main

    folder, _ = trained
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    cases = [
        (["-q", "--calibrate", str(tmp_path / "missing.txt")], "does not exist"),
        (["-q", "--calibrate", str(tmp_path)], "is a folder"),  # was "does not exist"
        (["--eval", str(tmp_path)], "is a folder"),
        (["--method", "gptq"], "--method only applies when quantizing: add -q"),
        (["--bits", "8", "--calibrate", "builtin"], "--bits, --calibrate only apply when quantizing"),
        (["--bpw", "4.5", "--bits", "8"], "so --bits would be ignored"),
        (["--bpw", "4.5", "--no-quantize-embeddings"], "--no-quantize-embeddings would be ignored"),
        (["--eval", str(tmp_path / "missing.txt")], "does not exist"),
        (["--bpw", "4.5", "--method", "minmax"], "--method search"),
        (["--bpw", "2"], "--bpw 2.0 is out of range"),
        (["-q", "--eval", str(empty)], "is empty"),
    ]
    for extra, message in cases:
        code = main([str(folder), "-o", str(tmp_path / "x"), *extra])
        err = capsys.readouterr().err
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "x").exists()


def test_gptq_group_kernel_is_the_column_loop_bit_for_bit():
    """gptq._round_group (numba) does the float32 operations of the plain numpy column loop."""
    from convert.gptq import _round_group

    rng = np.random.default_rng(4)
    rows, cols, c0, c1, top = 40, 96, 32, 64, np.float32(15)
    work = rng.normal(size=(rows, cols)).astype(np.float32)
    u = np.triu(rng.normal(size=(cols, cols))).astype(np.float32) + 3 * np.eye(cols, dtype=np.float32)
    s = rng.uniform(0.1, 0.3, size=rows).astype(np.float32)
    b = rng.uniform(-1.5, -1.0, size=rows).astype(np.float32)
    ref_work, ref_codes = work.copy(), np.zeros((rows, cols), np.float32)
    ref_errs = np.empty((rows, c1 - c0), np.float32)
    inv = 1 / s
    for j in range(c0, c1):
        col = ref_work[:, j]
        q = np.clip(np.round(col * inv - b * inv), 0, top)
        ref_codes[:, j] = q
        e = (col - (s * q + b)) / u[j, j]
        ref_errs[:, j - c0] = e
        ref_work[:, j + 1 : c1] -= np.outer(e, u[j, j + 1 : c1])
    codes, errs = np.zeros((rows, cols), np.float32), np.empty((rows, c1 - c0), np.float32)
    _round_group(work, u, c0, c1, s, b, top, codes, errs)
    assert np.array_equal(work, ref_work) and np.array_equal(codes, ref_codes)
    assert np.array_equal(errs, ref_errs) and codes[:, c0:c1].max() > 0


def test_eval_is_refused_on_a_quantized_source_and_a_late_failure_says_what_was_written(
        trained, tmp_path, capsys, monkeypatch):
    """--eval on a quantized source failed only after writing the output, and any failure
    while evaluating said the output "was not written or changed" when it had been."""
    from convert import measure
    from convert.cli import main

    folder, text_path = trained
    quantized = tmp_path / "q"
    assert main([str(folder), "-o", str(quantized), "-q", "--method", "minmax",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main([str(quantized), "-o", str(tmp_path / "again"), "--eval", str(text_path)]) == 1
    err = capsys.readouterr().err
    assert "is already quantized" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "again").exists()

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(measure, "evaluate", broken)
    out = tmp_path / "late"
    assert main([str(folder), "-o", str(out), "--no-progress", "--eval", str(text_path)]) == 1
    err = capsys.readouterr().err
    assert f"{out} was written, but evaluating it" in err and "out of memory" in err, err
    assert (out / "config.json").is_file()


def test_an_eval_text_too_short_to_score_is_refused_before_converting(trained, tmp_path, capsys):
    """A one-token --eval text was found only after the whole conversion had been written."""
    import json
    import shutil

    from convert.cli import main

    folder, _ = trained
    no_bos = tmp_path / "no_bos"  # with a BOS every non-empty text has 2 tokens
    shutil.copytree(folder, no_bos)
    config_path = no_bos / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    config_path.write_text(json.dumps({**config, "add_bos_token": False}))
    one_token = tmp_path / "one.txt"
    one_token.write_text("a")
    out = tmp_path / "out"
    assert main([str(no_bos), "-o", str(out), "-q", "--eval", str(one_token)]) == 1
    err = capsys.readouterr().err
    assert "has fewer than 2 tokens under" in err and len(err.strip().splitlines()) == 1, err
    assert "Converting" not in err and not out.exists()


def test_an_unreachable_bpw_names_the_smallest_that_works(tmp_path, sp_model_file):
    """The message counted only the quantizable tensors: "need 5.00 bits, raise --bpw" while
    --bpw 5 to 7.5 all failed; with nothing quantizable it said "need 0.00 bits"."""
    import re

    from conftest import make_hf_checkpoint
    from mlx_llama.errors import MlxLlamaError

    odd = make_hf_checkpoint(tmp_path / "odd", sp_model_file, hidden_size=96,
                             intermediate_size=200, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(MlxLlamaError, match=r"--bpw 5 is too low.*give --bpw [\d.]+ or more") as e:
        convert(odd, tmp_path / "a", bpw=5.0, method="search", progress=False)
    enough = float(re.search(r"give --bpw ([\d.]+)", str(e.value)).group(1))
    assert enough > 5
    out = convert(odd, tmp_path / "b", bpw=enough, method="search", progress=False)
    assert json.loads((out / "config.json").read_text())["quantization"]
    none = make_hf_checkpoint(tmp_path / "none", sp_model_file, hidden_size=80,
                              intermediate_size=176, num_attention_heads=5, num_key_value_heads=1)
    with pytest.raises(MlxLlamaError, match="nothing to spend its budget on"):
        convert(none, tmp_path / "c", bpw=4.5, method="search", progress=False)
