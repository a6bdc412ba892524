"""`mlx-llama bench`, the decode-step operation count, and the mlx-lm comparison script.

Figures are never asserted (the machine is shared and noisy); what is checked is that every
figure is produced, sane, and reproducible in what it measures (the prompt, the op graph).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_llama import bench
from mlx_llama.cli import main
from mlx_llama.errors import MlxLlamaError
from mlx_llama.loading import load_model
from mlx_llama.opcount import decode_step_ops, graph_ops

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def quantized_tiny(tiny_checkpoints, tmp_path_factory) -> Path:
    from convert.api import convert

    out = tmp_path_factory.mktemp("bench") / "gqa-4bit"
    return convert(tiny_checkpoints["gqa"], out, quantize=True, progress=False)


def test_fixed_prompt_is_reproducible_and_ordinary():
    a = bench.fixed_prompt(64, 512)
    assert a == bench.fixed_prompt(64, 512) and len(a) == 64
    assert all(bench.FIRST_ID <= t < 512 for t in a)
    assert a != bench.fixed_prompt(64, 512, seed=1)


def test_time_trial_counts_tokens_not_items_seen():
    seen = []

    def start():
        def gen():
            for i in range(100):
                seen.append(i)
                yield i
        return gen()

    t = bench.time_trial(start, prompt_tokens=10, generation_tokens=5)
    assert len(seen) == 5 and t.generation_tokens == 5
    assert t.ttft_s > 0 and t.prompt_tps > 0 and t.peak_memory_bytes >= 0


def test_benchmark_report(quantized_tiny):
    model, _ = load_model(quantized_tiny)
    r = bench.benchmark(model, "tiny", prompt_tokens=40, generation_tokens=6, trials=2,
                        prefill_chunk=16)
    assert r.trials == 2 and r.prompt_tokens == 40 and r.generation_tokens == 6
    for stat in (r.prompt_tps, r.generation_tps, r.ttft_s, r.peak_memory_bytes, r.bandwidth_gbs):
        assert 0 < stat.min <= stat.median <= stat.max
    assert r.model_bytes == bench.parameter_bytes(model)
    # Decode reads at least every weight but the embedding table, plus some cache.
    assert bench.weight_bytes_per_token(model) < r.bytes_per_token
    text = bench.format_report(r)
    for label in ("prompt tokens/s", "decode tokens/s", "time to first", "peak memory",
                  "model size", "implied bandwidth"):
        assert label in text


def test_bytes_per_token_counts_tied_table_once(tiny_checkpoints):
    untied, _ = load_model(tiny_checkpoints["gqa"])
    tied, _ = load_model(tiny_checkpoints["tied"])
    # Untied: the embedding table is gathered (one row read); tied: it is the output head.
    row = bench.embedding_bytes(untied) // untied.config.vocab_size
    assert bench.weight_bytes_per_token(untied) == (
        bench.parameter_bytes(untied) - bench.embedding_bytes(untied) + row)
    assert bench.weight_bytes_per_token(tied) == bench.parameter_bytes(tied)


def test_cli_json(quantized_tiny, capsys):
    assert main(["bench", "-m", str(quantized_tiny), "-p", "12", "-g", "3", "-n", "1",
                 "--dense-prefill", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prompt_tokens"] == 12 and report["trials"] == 1
    assert report["generation_tps"]["median"] > 0 and report["model_bytes"] > 0


@pytest.mark.parametrize("args, fragment", [
    (["-g", "1"], "-g must be at least 2"),
    (["-p", "500", "-g", "100"], "exceeds the model's context"),
    (["-p", "8", "-g", "4", "--prefill-chunk", "-2"], "prefill chunk must be at least 1"),
    (["-p", "8", "-g", "4", "--prefill-chunk", "0"], "prefill chunk must be at least 1"),
    (["-p", "8", "-g", "4", "--warmup", "-1"], "--warmup must be 0 or more"),
])
def test_cli_errors_are_one_line(quantized_tiny, capsys, args, fragment):
    assert main(["bench", "-m", str(quantized_tiny), "-n", "1", *args]) == 1
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1


def test_graph_ops_counts_unevaluated_primitives():
    a = mx.array([1.0, 2.0])
    mx.eval(a)
    ops = graph_ops(mx.exp(a * 2) + a)
    assert ops["Exp"] == 1 and ops["Add"] == 1 and ops["Multiply"] == 1


def test_decode_step_ops(quantized_tiny, monkeypatch):
    monkeypatch.setenv("MLX_LLAMA_CPU_STREAMS", "1")  # one matmul per layer (cpu_streams.py)
    model, _ = load_model(quantized_tiny)
    ops = decode_step_ops(model)
    layers = model.config.num_hidden_layers
    # Seven projections per layer and the output head, each one quantized matmul.
    assert ops["QuantizedMatmul"] == 7 * layers + 1
    assert ops["ArgReduce"] == 1  # the greedy sampler
    monkeypatch.setenv("MLX_LLAMA_CPU_STREAMS", "2")
    split, _ = load_model(quantized_tiny)
    shards = [m for _, m in split.named_modules() if m.__dict__.get("_row_shards")]
    more = decode_step_ops(split)["QuantizedMatmul"] - ops["QuantizedMatmul"]
    assert shards and more == len(shards)  # each split layer: one more matmul, on stream 2


def test_time_trial_refuses_one_token():
    with pytest.raises(MlxLlamaError):
        bench.time_trial(lambda: iter([1]), 1, 1)


@pytest.mark.skipif(importlib.util.find_spec("mlx_lm") is None, reason="mlx-lm (bench extra)")
def test_compare_mlx_lm_runs_on_a_tiny_checkpoint(tiny_checkpoints, tmp_path, capsys):
    """The comparison script end to end (both conversions, alternating workers, ratios)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import compare_mlx_lm
    finally:
        sys.path.remove(str(BENCHMARKS))
    out = tmp_path / "result.json"
    code = compare_mlx_lm.main(["--model", str(tiny_checkpoints["gqa"]), "-p", "16", "-g", "4",
                                "-n", "2", "--work", str(tmp_path / "work"), "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert set(result["reports"]) == {"mlx-llama", "mlx-lm"}
    for key in ("prompt_tps", "generation_tps", "ttft_s", "peak_memory_bytes", "model_bytes",
                "ops_per_decode_step"):
        assert result["ratios"][key] > 0
    assert result["ops"]["mlx-llama"] > 0 and result["ops"]["mlx-lm"] > 0
    assert "ops per decode step" in capsys.readouterr().out


def test_convert_speed_script_times_both_methods(tiny_checkpoints, capsys):
    """benchmarks/convert_speed.py end to end on a tiny checkpoint, so the script cannot rot."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import convert_speed
    finally:
        sys.path.remove(str(BENCHMARKS))
    times = convert_speed.main(["--model", str(tiny_checkpoints["gqa"]), "--rounds", "1"])
    assert set(times) == {"minmax", "search"}
    assert all(len(t) == 1 and t[0] > 0 for t in times.values())
    assert "search" in capsys.readouterr().out


def test_ppl_interval_script_brackets_the_change(tiny_checkpoints, quantized_tiny, paragraph,
                                                 tmp_path, capsys):
    """benchmarks/ppl_interval.py on a tiny float model and its 4-bit conversion."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import ppl_interval
    finally:
        sys.path.remove(str(BENCHMARKS))
    text = tmp_path / "text.txt"
    text.write_text(paragraph)
    out = ppl_interval.main(["--src", str(tiny_checkpoints["gqa"]), "--quant",
                             str(quantized_tiny), "--text", str(text)])
    change, lo, hi = out["text.txt"]
    assert lo < hi and lo <= change <= hi
    assert "95% interval" in capsys.readouterr().out
    import numpy as np
    assert ppl_interval.interval(np.full(50, 0.02)) == pytest.approx((np.expm1(0.02),) * 3)


@pytest.mark.skipif(not Path("/usr/share/common-licenses/GPL-3").is_file(),
                    reason="the docs text is built from a Debian/Ubuntu machine's GPL-3 copy")
def test_docs_validation_text_keeps_to_its_token_limit():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import docs_text
    finally:
        sys.path.remove(str(BENCHMARKS))
    words = lambda t: len(t.split())  # noqa: E731 - a stand-in tokenizer
    text = docs_text.docs_text(words, limit=400)
    assert 300 < words(text) <= 400
    assert "subprocess" in text.lower()
    assert docs_text.docs_text(words, limit=1500).startswith(text[:200])
