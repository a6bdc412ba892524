"""Prompt-cache files: save a prompt's KV cache, reload it (in a new process too) and continue
exactly as if the whole prompt had been prefilled; refuse other models' and damaged files."""

from __future__ import annotations

import argparse
import json
import shutil
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import make_hf_checkpoint
from mlx_llama import prompt_cache as pc
from mlx_llama.cache_options import add_cache_arguments, continue_prompt, open_prompt_cache
from mlx_llama.errors import MlxLlamaError
from mlx_llama.generate import encode_prompt, stream_generate
from mlx_llama.loading import load

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "Llamas are social animals and live with others as a herd. Their wool is soft"
MORE = " and contains only a small amount of lanolin. Llamas can learn"
NO_EOS = {2: -1e9}  # random tiny models: keep generating so continuations are comparable
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, sp_model_file) -> dict[str, Path]:
    """Two tiny models with 32-wide heads (quantizable); "b" differs only in its weights.
    "chat" is "a" with a chat template."""
    root = tmp_path_factory.mktemp("pcache")
    shape = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
    out = {name: make_hf_checkpoint(root / name, sp_model_file, seed=seed, dtype=dtype, **shape)
           for name, seed, dtype in (("a", 0, "float32"), ("b", 1, "float32"),
                                     ("bf16", 2, "bfloat16"))}
    chat = root / "chat"
    chat.mkdir()
    for f in out["a"].iterdir():
        (chat / f.name).write_bytes(f.read_bytes())
    config = json.loads((chat / "tokenizer_config.json").read_text())
    (chat / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    out["chat"] = chat
    return out


@pytest.fixture(scope="module")
def tiny(folders):
    return load(folders["a"])


def greedy(model, tok, prompt, cache=None, n: int = 24, chat=False) -> tuple[list[int], object]:
    steps = list(stream_generate(model, tok, prompt, n, cache=cache, chat=chat, logit_bias=NO_EOS))
    return [s.token for s in steps], steps[-1]


KINDS = [
    ("default", {}),
    ("quantized", {"bits": 8, "group_size": 32}),
    ("quantized", {"bits": 4, "group_size": 32, "start": 8}),
    ("rotating", {"max_size": 64}),
    ("rotating", {"max_size": 12}),  # overflowed: the file holds a rotated window
]


@pytest.mark.parametrize("kind,options", KINDS)
def test_round_trip_continues_exactly(tiny, tmp_path, kind, options):
    model, tok = tiny
    saved = pc.SavedPrompt(PREFIX)
    cache = pc.cache_prompt(model, tok, saved, kind, chunk=7, **options)
    path = pc.save_prompt_cache(tmp_path / "p.safetensors", cache, model, saved_prompt=saved)
    loaded = pc.load_prompt_cache(path, model)
    assert loaded.tokens == cache.tokens == tok.encode(PREFIX)
    assert loaded.saved_prompt == saved
    assert loaded.layers[0].kind == kind and loaded.layers[0].options() == cache.layers[0].options()
    for a, b in zip(loaded.layers, cache.layers):
        assert a.offset == b.offset and a.meta_state == b.meta_state
        for x, y in zip(a.state, b.state):
            np.testing.assert_array_equal(np.array(x), np.array(y))
    full = saved.continued(MORE)
    assert greedy(model, tok, full, loaded)[0] == greedy(model, tok, full, cache)[0]


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mlx_llama.cli", *argv], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120)


CONTINUE = """
import json, sys
from mlx_llama.loading import load
from mlx_llama.prompt_cache import load_prompt_cache
from mlx_llama.generate import stream_generate
model, tok = load(sys.argv[1])
cache = load_prompt_cache(sys.argv[2], model)
prompt = cache.saved_prompt.continued(sys.argv[3])
steps = list(stream_generate(model, tok, prompt, 24, cache=cache, chat=cache.saved_prompt.chat,
                             logit_bias={2: -1e9}))
print(json.dumps({"tokens": [s.token for s in steps], "cached": steps[-1].cached_tokens,
                  "prompt": steps[-1].prompt_tokens}))
"""


@pytest.mark.parametrize("name", ["a", "chat"])
def test_saved_prompt_in_a_new_process_matches_whole_prefill(folders, tmp_path, name):
    """cache-prompt in one process, continue in another: the same greedy tokens as prefilling
    the whole prompt, and only the new tokens are prefilled."""
    folder = folders[name]
    path = tmp_path / "prompt.safetensors"
    made = run_cli("cache-prompt", "-m", str(folder), "-p", PREFIX, "-o", str(path))
    assert made.returncode == 0, made.stderr
    assert "saved" in made.stderr and path.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name != path.name]  # no temporary left

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", CONTINUE, str(folder), str(path), MORE],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)

    model, tok = load(folder)
    chat = name == "chat"
    saved = pc.SavedPrompt(PREFIX, chat=chat)
    expected, last = greedy(model, tok, saved.continued(MORE), chat=chat)
    assert got["tokens"] == expected
    cached = pc.prefix_tokens(tok, saved)
    full = encode_prompt(tok, saved.continued(MORE), chat)
    assert full[: len(cached)] == cached  # the cache ends where the continuation begins
    assert got["cached"] == len(cached) and got["prompt"] == len(full) == last.prompt_tokens
    assert got["prompt"] - got["cached"] == len(full) - len(cached)  # only the new tokens


def test_chat_prefix_ends_inside_the_user_message(folders):
    model, tok = load(folders["chat"])
    saved = pc.SavedPrompt("Tell me about llamas.", system="Be brief.", chat=True)
    text = tok.decode(pc.prefix_tokens(tok, saved))
    assert text.endswith("Tell me about llamas.") and "Be brief." in text
    assert "<|im_start|>assistant" not in tok.apply_chat_template(
        saved.messages("x"), add_generation_prompt=False)


def test_file_from_another_model_is_refused(folders, tmp_path):
    a, tok = load(folders["a"])
    b, _ = load(folders["b"])
    saved = pc.SavedPrompt(PREFIX)
    path = pc.save_prompt_cache(tmp_path / "a.safetensors", pc.cache_prompt(a, tok, saved), a,
                                saved_prompt=saved, model_name="tiny-a")
    with pytest.raises(MlxLlamaError, match="was made for another model 'tiny-a'"):
        pc.load_prompt_cache(path, b)
    assert pc.load_prompt_cache(path, a).tokens == tok.encode(PREFIX)
    # bfloat16 files give one fingerprint whether computed in bfloat16 or float32 (lossless).
    as_stored, _ = load(folders["bf16"], compute_dtype=None)
    as_float32, _ = load(folders["bf16"], compute_dtype=mx.float32)
    assert pc.model_fingerprint(as_stored) == pc.model_fingerprint(as_float32)


@pytest.fixture
def good_file(tiny, tmp_path) -> Path:
    model, tok = tiny
    saved = pc.SavedPrompt(PREFIX)
    return pc.save_prompt_cache(tmp_path / "good.safetensors", pc.cache_prompt(model, tok, saved),
                                model, saved_prompt=saved)


def damaged(path: Path, how: str) -> Path:
    data = bytearray(path.read_bytes())
    if how == "flipped":
        data[-5] ^= 0x40  # inside the last array's bytes
    elif how == "truncated":
        data = data[: len(data) - 64]
    elif how == "garbage":
        data = bytearray(b"\x00" * 8 + b"not a file" * 10)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("how,message", [
    ("flipped", "is corrupt \\(its contents do not match their checksum\\)"),
    ("truncated", "is corrupt or truncated"),
    ("garbage", "is corrupt or truncated"),
])
def test_damaged_file_is_refused(tiny, good_file, how, message):
    model, _ = tiny
    with pytest.raises(MlxLlamaError, match=message) as e:
        pc.load_prompt_cache(damaged(good_file, how), model)
    assert "mlx-llama cache-prompt" in str(e.value) and "\n" not in str(e.value)


def test_other_files_are_refused(tiny, folders, tmp_path):
    model, _ = tiny
    with pytest.raises(MlxLlamaError, match="is not an mlx-llama prompt cache"):
        pc.load_prompt_cache(folders["a"] / "model.safetensors", model)
    with pytest.raises(MlxLlamaError, match="does not exist"):
        pc.load_prompt_cache(tmp_path / "missing.safetensors", model)
    arrays = {"tokens": mx.array([1, 2], dtype=mx.int32)}
    mx.save_safetensors(str(tmp_path / "v9.safetensors"), arrays,
                        metadata={"format": pc.FORMAT, "version": "9"})
    with pytest.raises(MlxLlamaError, match="format version 9"):
        pc.load_prompt_cache(tmp_path / "v9.safetensors", model)
    mx.save_safetensors(str(tmp_path / "meta.safetensors"), arrays,
                        metadata={"format": pc.FORMAT, "version": "1", "model": "{"})
    with pytest.raises(MlxLlamaError, match="damaged metadata"):
        pc.load_prompt_cache(tmp_path / "meta.safetensors", model)


def test_inconsistent_structure_is_refused(tiny, good_file, tmp_path):
    """A file whose checksum is right but whose arrays do not fit the model (e.g. edited)."""
    model, _ = tiny
    arrays, raw = mx.load(str(good_file), return_metadata=True)
    arrays["layers.0.0"] = arrays["layers.0.0"][:, :, :3]
    raw["sha256"] = pc._digest(arrays)
    mx.save_safetensors(str(tmp_path / "edited.safetensors"), arrays, metadata=raw)
    with pytest.raises(MlxLlamaError, match="inconsistent structure"):
        pc.load_prompt_cache(tmp_path / "edited.safetensors", model)


def test_writes_are_atomic(tiny, good_file, monkeypatch):
    model, tok = tiny
    before = good_file.read_bytes()
    cache = pc.load_prompt_cache(good_file, model)

    def crash(path, arrays, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mx, "save_safetensors", crash)
    with pytest.raises(MlxLlamaError, match="cannot write .*No space left"):
        pc.save_prompt_cache(good_file, cache, model)
    assert good_file.read_bytes() == before  # the old file is untouched
    assert [p.name for p in good_file.parent.iterdir()] == [good_file.name]  # no temporary left


def test_empty_cache_and_missing_folder_are_refused(tiny, good_file, tmp_path):
    model, _ = tiny
    from mlx_llama.cache import PromptCache

    with pytest.raises(MlxLlamaError, match="empty"):
        pc.save_prompt_cache(tmp_path / "x.safetensors", PromptCache(model.make_cache), model)
    cache = pc.load_prompt_cache(good_file, model)
    with pytest.raises(MlxLlamaError, match="does not exist: create it"):
        pc.save_prompt_cache(tmp_path / "nope" / "x.safetensors", cache, model)


def cache_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_cache_arguments(p)
    return p.parse_args(argv)


def test_cli_options_open_and_continue_a_saved_prompt(tiny, good_file):
    model, tok = tiny
    cache = open_prompt_cache(cache_args(["--prompt-cache", str(good_file)]), model)
    assert cache.tokens == tok.encode(PREFIX)
    prompt, chat = continue_prompt(cache, MORE, None)
    assert prompt == PREFIX + MORE and chat is False
    with pytest.raises(MlxLlamaError, match="holds a default cache"):
        open_prompt_cache(cache_args(["--prompt-cache", str(good_file), "--kv-bits", "8"]), model)
    path = pc.save_prompt_cache(good_file.parent / "rot.safetensors",
                                pc.cache_prompt(model, tok, pc.SavedPrompt(PREFIX), "rotating",
                                                max_size=64), model)
    same = open_prompt_cache(cache_args(["--prompt-cache", str(path), "--max-kv-size", "64"]), model)
    assert same.layers[0].kind == "rotating" and same.layers[0].offset == len(same.tokens)
    with pytest.raises(MlxLlamaError, match="holds a rotating cache"):
        open_prompt_cache(cache_args(["--prompt-cache", str(path), "--max-kv-size", "65"]), model)
    fresh = open_prompt_cache(cache_args(["--max-kv-size", "64"]), model)
    assert fresh.layers[0].kind == "rotating" and fresh.saved_prompt is None
    assert continue_prompt(fresh, "hi", None) == ("hi", None)


def test_cli_generate_with_a_prompt_cache_equals_the_whole_prompt(folders, tmp_path):
    folder, path = str(folders["a"]), str(tmp_path / "p.safetensors")
    assert run_cli("cache-prompt", "-m", folder, "-p", PREFIX, "-o", path).returncode == 0
    cached = run_cli("generate", "-m", folder, "--prompt-cache", path, "-p", MORE,
                     "--max-tokens", "16")
    whole = run_cli("generate", "-m", folder, "-p", PREFIX + MORE, "--max-tokens", "16")
    assert cached.returncode == 0 == whole.returncode, cached.stderr + whole.stderr
    assert cached.stdout == whole.stdout
    _, tok = load(folders["a"])
    n_cached, n_prompt = len(tok.encode(PREFIX)), len(tok.encode(PREFIX + MORE))
    assert f"prompt: {n_prompt} tokens ({n_cached} cached)" in cached.stderr
    assert f"prompt: {n_prompt} tokens (0 cached)" in whole.stderr


def test_cli_reports_bad_files_in_one_line(folders, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    out = run_cli("generate", "-m", str(folders["a"]), "--prompt-cache", str(bad), "-p", "x")
    assert out.returncode == 1 and out.stderr.count("\n") == 1
    assert "is corrupt or truncated" in out.stderr and "mlx-llama cache-prompt" in out.stderr
    out = run_cli("cache-prompt", "-m", str(folders["a"]), "-p", PREFIX, "-o",
                  str(tmp_path / "missing" / "x.safetensors"))
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "does not exist" in out.stderr


def test_saving_never_replaces_a_file_that_is_not_a_prompt_cache(folders, tiny, tmp_path):
    """-o pointing at a model's weights (a typo) must not eat them; an old cache is replaced."""
    model, tok = tiny
    weights = tmp_path / "model.safetensors"
    weights.write_bytes((folders["a"] / "model.safetensors").read_bytes())
    before = weights.read_bytes()
    cache = pc.cache_prompt(model, tok, pc.SavedPrompt(PREFIX))
    with pytest.raises(MlxLlamaError, match="exists and is not a prompt cache.*--force"):
        pc.save_prompt_cache(weights, cache, model)
    assert weights.read_bytes() == before
    out = run_cli("cache-prompt", "-m", str(folders["a"]), "-p", PREFIX, "-o", str(weights))
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert weights.read_bytes() == before
    old = pc.save_prompt_cache(tmp_path / "p.safetensors", cache, model)
    assert pc.is_prompt_cache(old) and not pc.is_prompt_cache(weights)
    pc.save_prompt_cache(old, pc.cache_prompt(model, tok, pc.SavedPrompt(PREFIX + MORE)), model)
    assert len(pc.load_prompt_cache(old, model).tokens) == len(tok.encode(PREFIX + MORE))
    pc.save_prompt_cache(weights, cache, model, force=True)
    assert pc.is_prompt_cache(weights)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(weights).st_mode & 0o777 == 0o666 & ~umask  # as any file the user writes


def test_no_chat_template_cannot_continue_a_chat_prompt(folders, tmp_path):
    model, tok = load(folders["chat"])
    saved = pc.SavedPrompt(PREFIX, chat=True)
    path = pc.save_prompt_cache(tmp_path / "chat.safetensors", pc.cache_prompt(model, tok, saved),
                                model, saved_prompt=saved)
    cache = pc.load_prompt_cache(path, model)
    assert continue_prompt(cache, MORE, None)[1] is True
    with pytest.raises(MlxLlamaError, match="saved with the chat template: drop --no-chat-template"):
        continue_prompt(cache, MORE, False)


@pytest.mark.parametrize("kind,options", [("rotating", {"max_size": 16}),
                                          ("quantized", {"bits": 8, "group_size": 32})])
def test_a_loaded_cache_keeps_the_dtype_the_model_caches_in(folders, tmp_path, kind, options):
    """A bfloat16 model on the CPU backend computes in float32 and caches in bfloat16: the
    loaded cache must hold bfloat16 too (it was cast to float32: twice the memory, and a
    rotating or quantized cache never went back)."""
    model, tok = load(folders["bf16"])
    kv_dtype = model.model.layers[0].self_attn.kv_dtype or model.model.norm.weight.dtype
    saved = pc.SavedPrompt(PREFIX)
    cache = pc.cache_prompt(model, tok, saved, kind, chunk=7, **options)
    path = pc.save_prompt_cache(tmp_path / "p.safetensors", cache, model, saved_prompt=saved)
    loaded = pc.load_prompt_cache(path, model)
    for a, b in zip(loaded.layers, cache.layers):
        for x, y in zip(a.state, b.state):
            assert x.dtype == y.dtype
            if mx.issubdtype(x.dtype, mx.floating):
                assert x.dtype == kv_dtype
            np.testing.assert_array_equal(np.array(x.astype(mx.float32) if x.dtype == mx.bfloat16 else x),
                                          np.array(y.astype(mx.float32) if y.dtype == mx.bfloat16 else y))
    full = saved.continued(MORE)
    assert greedy(model, tok, full, loaded)[0] == greedy(model, tok, full, cache)[0]
    assert loaded.nbytes == cache.nbytes


@pytest.mark.parametrize("field,value", [("prompt", {"uext": "x"}), ("prompt", "hello"),
                                         ("model", "7c44"), ("cache", [1])])
def test_metadata_of_the_wrong_shape_is_refused_in_one_line(tiny, good_file, tmp_path, field, value):
    """The checksum covers the arrays, not the header: a header edited into valid JSON of the
    wrong shape raised TypeError / AttributeError (a traceback in the CLI)."""
    model, _ = tiny
    arrays, raw = mx.load(str(good_file), return_metadata=True)
    raw[field] = json.dumps(value)
    mx.save_safetensors(str(tmp_path / "edited.safetensors"), arrays, metadata=raw)
    with pytest.raises(MlxLlamaError, match="damaged metadata|inconsistent structure") as e:
        pc.load_prompt_cache(tmp_path / "edited.safetensors", model)
    assert "\n" not in str(e.value)


def test_write_failures_of_every_kind_are_one_line(tiny, good_file, monkeypatch):
    """MLX's writer raises RuntimeError (a full disk), the temporary file's creation OSError (a
    read-only folder), and a long but valid name once overflowed with the temporary's suffix."""
    model, _ = tiny
    cache = pc.load_prompt_cache(good_file, model)
    long_name = good_file.parent / ("a" * 240 + ".safetensors")  # 252 bytes: a valid name
    assert pc.save_prompt_cache(long_name, cache, model) == long_name and long_name.is_file()
    with monkeypatch.context() as m:
        m.setattr(mx, "save_safetensors",
                  lambda *a, **k: (_ for _ in ()).throw(RuntimeError("[write] Unable to write")))
        with pytest.raises(MlxLlamaError, match="cannot write .*Unable to write"):
            pc.save_prompt_cache(good_file.parent / "new.safetensors", cache, model)

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(pc.tempfile, "mkstemp", read_only)
    with pytest.raises(MlxLlamaError, match="cannot write .*Read-only file system"):
        pc.save_prompt_cache(good_file.parent / "new.safetensors", cache, model)
    assert sorted(p.name for p in good_file.parent.iterdir()) == sorted(
        [good_file.name, long_name.name])


def test_a_missing_output_folder_is_found_before_the_prefill(tmp_path):
    with pytest.raises(MlxLlamaError, match="folder .*nope does not exist"):
        pc.check_writable(tmp_path / "nope" / "x.safetensors")


def test_a_rotating_cache_takes_a_prompt_longer_than_the_context(tiny, monkeypatch):
    """As in generate: a window no wider than the context slides past it."""
    import dataclasses

    model, tok = tiny
    monkeypatch.setattr(model, "config",
                        dataclasses.replace(model.config, max_position_embeddings=16))
    saved = pc.SavedPrompt(PREFIX)
    assert len(tok.encode(PREFIX)) > 16
    cache = pc.cache_prompt(model, tok, saved, "rotating", max_size=16)
    assert cache.tokens == tok.encode(PREFIX) and cache.layers[0].offset == len(cache.tokens)
    with pytest.raises(MlxLlamaError, match="context is 16: shorten it, or use a rotating"):
        pc.cache_prompt(model, tok, saved)


def test_a_folder_given_as_the_prompt_cache_is_named_as_one(tmp_path):
    with pytest.raises(MlxLlamaError, match="is a folder"):
        pc.read_file(tmp_path)


def test_past_the_context_a_loaded_file_is_told_to_be_re_made_rotating(tiny, good_file,
                                                                        monkeypatch):
    """The hint said `--max-kv-size`, which a loaded file then refuses (it keeps its kind)."""
    import dataclasses

    from mlx_llama.generate import stream_generate

    model, tok = tiny
    cache = pc.load_prompt_cache(good_file, model)
    limit = len(cache.tokens) + 4
    monkeypatch.setattr(model, "config",
                        dataclasses.replace(model.config, max_position_embeddings=limit))
    prompt = cache.saved_prompt.continued(" and they hum to each other when they are worried")
    with pytest.raises(MlxLlamaError, match=r"re-create the prompt cache .*cache-prompt .*"
                                            rf"--max-kv-size {limit}"):
        list(stream_generate(model, tok, prompt, 4, cache=cache))
    with pytest.raises(MlxLlamaError, match=rf"use a rotating cache .*--max-kv-size {limit} or"):
        list(stream_generate(model, tok, prompt, 4))


def test_cli_note_at_the_end_of_the_context_names_what_works(folders, tmp_path):
    """With --prompt-cache the note said '--max-kv-size lets a rotating cache go on', a flag
    the loaded file then refuses."""
    folder = tmp_path / "short"
    shutil.copytree(folders["a"], folder)
    _, tok = load(folders["a"])
    limit = len(tok.encode(PREFIX + MORE)) + 6
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": limit}))
    path = str(tmp_path / "p.safetensors")
    assert run_cli("cache-prompt", "-m", str(folder), "-p", PREFIX, "-o", path).returncode == 0
    for extra, flag in ((["--prompt-cache", path, "-p", MORE], "a prompt cache made with --max-kv"),
                        (["-p", PREFIX + MORE], "(--max-kv-size lets")):
        result = run_cli("generate", "-m", str(folder), *extra, "--max-tokens", "-1", "--temp", "0")
        assert result.returncode == 0, result.stderr
        assert "at the end of the model's context" in result.stderr and flag in result.stderr, \
            result.stderr


def test_a_bad_byte_after_a_prompt_cache_is_placed_in_the_users_text(tiny, good_file):
    """The position counted the saved prompt's characters too."""
    from mlx_llama.cache_options import continue_prompt

    model, _ = tiny
    cache = pc.load_prompt_cache(good_file, model)
    with pytest.raises(MlxLlamaError, match="byte 0xff at character 3\\)"):
        continue_prompt(cache, "abc\udcffdef", None)
