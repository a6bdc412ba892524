"""The package's front door: the names the README and examples import, in a fresh process."""

from __future__ import annotations

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
