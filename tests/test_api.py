"""The package's front door: the names the README and examples import, in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd="/")


def test_the_public_names_are_the_functions_whatever_was_imported_first():
    """`generate` is also a submodule's name: the package must still hand out the function
    (a lazy __getattr__ here once recursed forever on `from mlx_llama import generate`)."""
    for first in ("", "import mlx_llama.generate; ", "import mlx_llama.cli; "):
        result = run_python(
            first + "import inspect, mlx_llama; from mlx_llama import generate, stream_generate,"
            " load, MlxLlamaError; assert inspect.isfunction(generate), generate; "
            "assert mlx_llama.generate is generate and inspect.isfunction(stream_generate); "
            "assert sorted(mlx_llama.__all__) == ['MlxLlamaError', 'generate', 'load', "
            "'stream_generate']; print('ok')")
        assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_python_api_example_runs(tiny_checkpoints):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "python_api.py"),
                             str(tiny_checkpoints["gqa"])], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tokens" in result.stdout and "tok/s" in result.stdout


def test_a_model_loaded_on_one_thread_generates_on_another(smollm2_mlx):
    """MLX binds lazy arrays and plain streams to the thread that made them: a model loaded
    on the main thread (weights left lazy, matmuls split over main-thread streams) failed on
    an app's worker thread with "There is no Stream(cpu, 0) in current thread"."""
    code = f"""
import threading
import mlx.core as mx
from mlx_llama import generate, load
model, tok = load({str(smollm2_mlx)!r})
out = {{}}
def work():
    out["thread"] = generate(model, tok, "Name a colour.", 6)
    mx.clear_streams()  # what a thread that used MLX does before it ends
worker = threading.Thread(target=work)
worker.start()
worker.join()
assert out.get("thread") == generate(model, tok, "Name a colour.", 6), out
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, cwd="/", env={**os.environ, "MLX_LLAMA_CPU_STREAMS": "2"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_load_takes_a_dtype_by_name_and_refuses_others_in_one_line(tiny_checkpoints):
    import mlx.core as mx
    import pytest

    from mlx_llama import MlxLlamaError, generate, load

    folder = tiny_checkpoints["gqa"]
    by_name, _ = load(folder, compute_dtype="float16")
    assert by_name.model.layers[0].self_attn.q_proj.weight.dtype == mx.float16
    for bad in ("fp8", 5, mx.int32):
        with pytest.raises(MlxLlamaError, match="compute_dtype must be"):
            load(folder, compute_dtype=bad)
    for bad in (None, 5):  # pathlib's TypeError, naming no argument
        with pytest.raises(MlxLlamaError, match="load\\(\\) takes a model folder or a hub repo"):
            load(bad)


def test_a_prefill_chunk_that_is_not_a_whole_number_is_refused(tiny_checkpoints):
    import pytest

    from mlx_llama import MlxLlamaError, generate, load

    model, tok = load(tiny_checkpoints["gqa"])
    for bad in (2.5, float("nan"), True):
        with pytest.raises(MlxLlamaError, match="prefill chunk must be at least 1"):
            generate(model, tok, "Llamas are social animals and live", 3, prefill_chunk=bad)
