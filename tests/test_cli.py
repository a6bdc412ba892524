"""The command line as a user meets it: convert, generate, chat, and one-line errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_llama.cli import main

# ChatML's shape (SmolLM2, Qwen) with markers this tiny vocabulary spells out in pieces.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def run_cli(*args: str, stdin: str | None = None, env: dict | None = None):
    return subprocess.run(
        [sys.executable, "-m", "mlx_llama.cli", *args], input=stdin, capture_output=True,
        text=True, timeout=300, env={**os.environ, **(env or {})},
    )


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_convert_then_generate(tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "q4"
    assert main(["convert", str(tiny_checkpoints["gqa"]), "-o", str(out), "-q",
                 "--no-progress"]) == 0
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    capsys.readouterr()
    assert main(["generate", "-m", str(out), "-p", "Llamas", "--max-tokens", "6"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip()
    assert re.search(r"prompt: \d+ tokens .* tok/s \| generation: \d+ tokens, .* tok/s "
                     r"\| peak memory: ", captured.err)


def test_generate_with_no_model_uses_bundled_default(tmp_path):
    result = run_cli("generate", "--max-tokens", "8", env={"XDG_CACHE_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert (tmp_path / "mlx-llama").is_dir()


@pytest.mark.parametrize("case", ["missing", "no_weights", "bad_type"])
def test_bad_model_is_one_line_exit_1(tiny_checkpoints, tmp_path, capsys, case):
    folder = tmp_path / "model"
    if case != "missing":
        shutil.copytree(tiny_checkpoints["gqa"], folder)
    if case == "no_weights":
        for f in folder.glob("*.safetensors"):
            f.unlink()
    if case == "bad_type":
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    assert main(["generate", "-m", str(folder), "-p", "hi", "--max-tokens", "2"]) == 1
    line = one_line_error(capsys.readouterr().err)
    assert {"missing": "does not exist", "no_weights": "no .safetensors",
            "bad_type": "model_type 'gpt2'"}[case] in line


@pytest.fixture
def chat_model(tiny_checkpoints, tmp_path) -> Path:
    folder = tmp_path / "chat"
    shutil.copytree(tiny_checkpoints["gqa"], folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "chat_template": CHATML_TEMPLATE}))
    return folder


def test_chat_repl_prefills_only_the_new_turn(chat_model):
    turns = ["Hello there", "Tell me about llamas", "And their wool?"]
    result = run_cli("chat", "-m", str(chat_model), "--max-tokens", "6",
                     stdin="\n".join(turns + ["/quit"]) + "\n")
    assert result.returncode == 0, result.stderr
    stats = [tuple(map(int, m)) for m in re.findall(
        r"\[prompt (\d+) tokens: (\d+) cached, (\d+) prefilled \| (\d+) generated", result.stderr)]
    assert len(stats) == 3
    for (prompt, _, _, generated), (next_prompt, cached, prefilled, _) in zip(stats, stats[1:]):
        # Everything the previous turn held (its prompt and its reply) is reused.
        assert cached >= prompt + generated - 1
        assert prefilled == next_prompt - cached
        assert prefilled < next_prompt - prompt


def test_chat_reset_starts_over(chat_model):
    result = run_cli("chat", "-m", str(chat_model), "--max-tokens", "4",
                     stdin="Hello there\n/reset\nHello there\n")
    assert result.returncode == 0, result.stderr
    cached = re.findall(r"tokens: (\d+) cached", result.stderr)
    assert cached == ["0", "0"] and "conversation cleared" in result.stderr


def test_chat_ctrl_c_at_the_prompt_leaves_cleanly(chat_model):
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_llama.cli", "chat", "-m", str(chat_model)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.time() + 120
        banner = ""
        while "chatting with" not in banner and time.time() < deadline:
            banner += proc.stderr.readline()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert "Traceback" not in err


def test_sigterm_during_a_chat_reply_ends_the_chat(chat_model, monkeypatch, capsys):
    """It was taken for Ctrl-C: "[reply interrupted]", and the chat went on."""
    import io
    import signal

    import mlx_llama.chat_repl as repl
    from mlx_llama.errors import Terminated

    def killed(*args, **kwargs):
        raise Terminated(signal.SIGTERM)
        yield  # (a generator, like stream_generate)

    monkeypatch.setattr(repl, "stream_generate", killed)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\nAnd again\n"))
    assert main(["chat", "-m", str(chat_model)]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "terminated (SIGTERM)" in err and "[reply interrupted]" not in err


@pytest.fixture(scope="module")
def chat_model_hd32(tmp_path_factory, sp_model_file) -> Path:
    """Head size 32: the smallest the quantized cache's groups fit."""
    from conftest import make_hf_checkpoint

    folder = make_hf_checkpoint(tmp_path_factory.mktemp("hd32") / "m", sp_model_file, seed=3,
                                num_attention_heads=2, num_key_value_heads=1)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "chat_template": CHATML_TEMPLATE}))
    return folder


def test_chat_uses_the_kv_cache_flags(chat_model_hd32):
    """--kv-bits reaches the chat's cache (turns still reuse it), and the cache options are
    checked like generate's: two kinds at once is a one-line error."""
    chat_model = chat_model_hd32
    result = run_cli("chat", "-m", str(chat_model), "--max-tokens", "4", "--kv-bits", "8",
                     "--kv-group-size", "32", stdin="Hello there\nTell me more\n/quit\n")
    assert result.returncode == 0, result.stderr
    cached = [int(c) for c in re.findall(r"tokens: (\d+) cached", result.stderr)]
    assert cached[0] == 0 and cached[1] > 0
    both = run_cli("chat", "-m", str(chat_model), "--kv-bits", "8", "--max-kv-size", "64",
                   stdin="Hello\n")
    assert both.returncode == 1 and "cannot be combined" in one_line_error(both.stderr)


def test_conversation_caches_are_of_the_kind_asked(chat_model_hd32):
    import argparse

    from mlx_llama.cache_options import add_cache_arguments, cache_factory
    from mlx_llama.conversation import Conversation
    from mlx_llama.generate import generate
    from mlx_llama.loading import load

    model, tokenizer = load(chat_model_hd32)
    parser = argparse.ArgumentParser()
    add_cache_arguments(parser, prompt_cache=False)
    for flags, kind in ((["--kv-bits", "4", "--kv-group-size", "32"], "quantized"),
                        (["--max-kv-size", "64"], "rotating"), ([], "default")):
        chat = Conversation(model, tokenizer, make_layers=cache_factory(parser.parse_args(flags),
                                                                        model))
        generate(model, tokenizer, chat.add_user("Hello there"), 3, cache=chat.cache)
        assert {layer.kind for layer in chat.cache.layers} == {kind}


def test_generate_warns_in_one_line_when_the_model_cannot_fit(tiny_checkpoints, monkeypatch,
                                                              capsys, tmp_path):
    from mlx_llama import memory

    monkeypatch.setattr(memory, "available_memory", lambda: 1000)
    assert main(["generate", "-m", str(tiny_checkpoints["gqa"]), "-p", "hi",
                 "--max-tokens", "2"]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "0.00 GB is available" in warning[0], warning
    # Every subcommand that runs the model loads it the same way (cli.load_checked).
    text = tmp_path / "text.txt"
    text.write_text("Llamas are social animals and live with others as a herd. " * 4)
    assert main(["perplexity", "-m", str(tiny_checkpoints["gqa"]), "--text", str(text),
                 "--context", "16"]) == 0
    assert "0.00 GB is available" in capsys.readouterr().err


def test_a_prompt_that_is_not_utf8_is_one_line(tiny_checkpoints, tmp_path):
    """From standard input (any locale) and from argv (which Python decodes with surrogates)."""
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"Llamas \xff are")
    base = [sys.executable, "-m", "mlx_llama.cli", "generate", "-m", str(tiny_checkpoints["gqa"]),
            "--max-tokens", "2", "-p"]
    for prompt, encoding in (("-", "utf-8"), ("-", "utf-8:surrogateescape"),
                             (b"Llamas \xff are", "utf-8")):
        with open(bad, "rb") as f:
            result = subprocess.run(base + [prompt], stdin=f, capture_output=True, text=True,
                                    timeout=300, env={**os.environ, "PYTHONIOENCODING": encoding})
        assert result.returncode == 1, result.stderr
        assert "not valid UTF-8 (byte 0xff" in one_line_error(result.stderr)


@pytest.fixture
def chat_model_ctx64(chat_model) -> Path:
    cfg = json.loads((chat_model / "config.json").read_text())
    (chat_model / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 64}))
    return chat_model


LONG_TURN = "Llamas are social animals and live with others as a herd. " * 6


def test_chat_survives_a_failed_turn_and_unknown_commands(chat_model_ctx64):
    """A turn over the context is an error line, not the end of the conversation."""
    stdin = "\n".join(["/foo", "/reset now", "Hello there", LONG_TURN, "Hi",
                       "/quit now"]) + "\n"
    result = run_cli("chat", "-m", str(chat_model_ctx64), "--max-tokens", "4", stdin=stdin)
    assert result.returncode == 0, result.stderr
    assert "unknown command /foo" in result.stderr and "conversation cleared" in result.stderr
    assert re.search(r"error: the prompt has \d+ tokens but the model's context is 64", result.stderr)
    stats = [tuple(map(int, m)) for m in re.findall(
        r"\[prompt (\d+) tokens: (\d+) cached, \d+ prefilled \| (\d+) generated", result.stderr)]
    assert len(stats) == 2  # the failed turn left no trace: the next one reuses the first
    (first, _, generated), (_, cached, _) = stats
    assert cached >= first + generated - 1, result.stderr


def test_a_rotating_cache_slides_past_the_context(chat_model_ctx64):
    """--max-kv-size no wider than the context: attention never spans more than the context,
    so generate and chat go on past it (the README's "endless chats")."""
    out = run_cli("generate", "-m", str(chat_model_ctx64), "--no-chat-template", "-p", LONG_TURN,
                  "--max-tokens", "80", "--max-kv-size", "32")
    assert out.returncode == 0, out.stderr
    prompt, generated = map(int, re.search(r"prompt: (\d+) tokens.*generation: (\d+) tokens",
                                           out.stderr).groups())
    assert prompt > 64 and prompt + generated > 100
    turns = [LONG_TURN[:60], "Tell me more about llamas", "And their wool?", "Where do they live?"]
    chat = run_cli("chat", "-m", str(chat_model_ctx64), "--max-tokens", "12", "--max-kv-size", "32",
                   stdin="\n".join(turns + ["/quit"]) + "\n")
    assert chat.returncode == 0 and "error" not in chat.stderr, chat.stderr
    prompts = [int(m) for m in re.findall(r"\[prompt (\d+) tokens", chat.stderr)]
    assert len(prompts) == 4 and prompts[-1] > 64
    wide = run_cli("generate", "-m", str(chat_model_ctx64), "--no-chat-template", "-p", LONG_TURN,
                   "--max-tokens", "4", "--max-kv-size", "128")
    assert "context is 64" in one_line_error(wide.stderr)


def test_a_cancelled_turn_keeps_the_history_only_while_the_cache_matches(chat_model):
    """If the failed turn had already trimmed the cache, the history text no longer stands
    for its tokens: the next turn must not append to them (it falls back to prefix reuse)."""
    from mlx_llama.conversation import Conversation
    from mlx_llama.generate import generate
    from mlx_llama.loading import load

    model, tokenizer = load(chat_model)
    chat = Conversation(model, tokenizer)
    prompt = chat.add_user("Hello there")
    reply = generate(model, tokenizer, prompt, 3, cache=chat.cache)
    chat.add_reply(reply, chat.cache.tokens[-1], complete=True)
    history = chat.history_text
    chat.add_user("A turn that fails before the cache is touched")
    chat.cancel_user()
    assert chat.history_text == history and chat.messages[-1]["role"] == "assistant"
    chat.add_user("A turn that fails after the cache was trimmed")
    chat.cache.reuse(chat.cache.tokens[:4])
    chat.cancel_user()
    assert chat.history_text == "" and len(chat.messages) == 2
    tokens = chat.add_user("And their wool?")
    assert tokens == tokenizer.apply_chat_template(chat.messages, add_generation_prompt=True,
                                                   tokenize=True)


@pytest.mark.parametrize("edit, named", [
    ([1, 2], "holds a list"),
    ({"hidden_size": "abc"}, "hidden_size='abc'"),
    ({"num_attention_heads": 0}, "num_attention_heads=0"),
    ({"eos_token_id": "x"}, "eos_token_id='x'"),
    ({"eos_token_id": [1, None]}, "eos_token_id=[1, None]"),
    ({"rms_norm_eps": "x"}, "rms_norm_eps='x'"),
    ({"rope_theta": "abc"}, "rope_theta='abc'"),
    ({"vocab_size": None}, "missing vocab_size"),
    ({"rope_scaling": "linear"}, "rope_scaling='linear'"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "abc"}}, "wrong type"),
    ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
])
def test_a_config_with_bad_values_is_one_line(tiny_checkpoints, tmp_path, capsys, edit, named):
    """What a hand-edited or foreign config.json holds is named, not a traceback (and a GELU
    model is refused rather than run as SwiGLU, which would be silently wrong)."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_checkpoints["gqa"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(edit if isinstance(edit, list)
                                                   else {**cfg, **edit}))
    assert main(["generate", "-m", str(folder), "-p", "hi", "--max-tokens", "2"]) == 1
    line = one_line_error(capsys.readouterr().err)
    assert named in line and "config.json" in line, line


def test_a_seed_out_of_range_is_one_line(tiny_checkpoints, capsys):
    assert main(["generate", "-m", str(tiny_checkpoints["gqa"]), "-p", "hi", "--seed", "-1"]) == 1
    assert "invalid seed -1" in one_line_error(capsys.readouterr().err)


def test_generate_says_when_the_context_cut_it_short(chat_model_ctx64, capsys):
    """Greedy on this random model does not reach EOS in 64 tokens: the context ends the run."""
    assert main(["generate", "-m", str(chat_model_ctx64), "--no-chat-template", "-p", "Llamas",
                 "--max-tokens", "200"]) == 0
    err = capsys.readouterr().err
    generated = int(re.search(r"generation: (\d+) tokens", err).group(1))
    assert generated < 200 and "at the end of the model's context" in err


@pytest.mark.parametrize("argv, help_of", [
    (["convert", "x", "-o", "y", "--group-size", "48"], "mlx-llama convert --help"),
    (["generate", "--bogus"], "mlx-llama generate --help"),
    (["convert", "x", "-o", "y", "--bogus"], "mlx-llama convert --help"),
    ([], "mlx-llama --help")])
def test_a_bad_flag_is_one_line_pointing_at_its_commands_help(argv, help_of):
    result = run_cli(*argv)
    assert result.returncode == 2
    line = one_line_error(result.stderr)
    assert help_of in line


def test_chat_skips_a_line_that_is_not_utf8_and_keeps_the_rest(chat_model):
    result = subprocess.run(
        [sys.executable, "-m", "mlx_llama.cli", "chat", "-m", str(chat_model), "--max-tokens", "3"],
        input=b"Hi\n\xff oops\nSay yes\n/quit\n", capture_output=True, timeout=300,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    err = result.stderr.decode()
    assert result.returncode == 0, err
    assert "not valid UTF-8 (byte 0xff" in err
    assert len(re.findall(r"\[prompt \d+ tokens", err)) == 2  # "Hi" and "Say yes" both answered


def test_a_config_with_whole_floats_still_loads(tiny_checkpoints, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_checkpoints["gqa"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "hidden_size": 64.0}))
    assert main(["generate", "-m", str(folder), "-p", "hi", "--max-tokens", "2"]) == 0


def test_chat_drops_the_oldest_turns_when_it_outgrows_the_context(chat_model_ctx64):
    turns = ["Tell me about llamas", "And their wool?", "Where do they live?", "What do they eat?",
             "How tall are they?"]
    result = run_cli("chat", "-m", str(chat_model_ctx64), "--max-tokens", "8",
                     stdin="\n".join(turns + ["/quit"]) + "\n")
    assert result.returncode == 0 and "error" not in result.stderr, result.stderr
    assert "the conversation outgrew the context" in result.stderr
    prompts = [int(m) for m in re.findall(r"\[prompt (\d+) tokens", result.stderr)]
    assert len(prompts) == len(turns) and max(prompts) <= 64 - 8


def test_chat_with_no_token_limit_still_drops_the_oldest_turns(chat_model_ctx64):
    """--max-tokens -1: each reply runs to the context, so the next turn must make room (the
    reserve for the reply was once -1, which dropped nothing and failed every later turn)."""
    turns = ["Tell me about llamas", "And their wool?", "Where do they live?"]
    result = run_cli("chat", "-m", str(chat_model_ctx64), "--max-tokens", "-1",
                     stdin="\n".join(turns + ["/quit"]) + "\n")
    assert result.returncode == 0 and "error" not in result.stderr, result.stderr
    assert "the conversation outgrew the context" in result.stderr
    assert len(re.findall(r"\[prompt (\d+) tokens", result.stderr)) == len(turns)


@pytest.mark.parametrize("flags, named", [
    (["--max-tokens", "0"], "max_tokens"), (["--temp", "-1"], "temperature"),
    (["--top-p", "2"], "top_p"), (["--system", "Be brief. " * 40], "system message"),
])
def test_chat_refuses_bad_settings_before_the_first_turn(chat_model_ctx64, flags, named):
    """Settings every turn would fail on are one line and exit 1 up front, not an error per
    turn and exit 0."""
    result = run_cli("chat", "-m", str(chat_model_ctx64), *flags, stdin="Hello\n/quit\n")
    assert result.returncode == 1, result.stderr
    assert named in one_line_error(result.stderr)


def test_the_reply_reserve_is_a_quarter_of_the_context_at_most_and_with_no_limit():
    from mlx_llama.chat_repl import reply_reserve

    assert [reply_reserve(n, 64) for n in (8, 100, -1)] == [8, 16, 16]


def test_generate_with_standard_input_closed(tiny_checkpoints):
    """With fd 0 closed, the weights' file took number 0 and MLX failed to read it as if it
    were corrupt; `-p -` then reads an empty prompt and chat leaves at once, as with </dev/null."""
    def run_closed(*args):
        return subprocess.run([sys.executable, "-m", "mlx_llama.cli", *args],
                              preexec_fn=lambda: os.close(0), capture_output=True, text=True,
                              timeout=300)

    model = str(tiny_checkpoints["gqa"])
    result = run_closed("generate", "-m", model, "-p", "hi", "--max-tokens", "2")
    assert result.returncode == 0, result.stderr
    assert "generation: 2 tokens" in result.stderr
    from_stdin = run_closed("generate", "-m", model, "-p", "-", "--max-tokens", "2",
                            "--no-chat-template")
    assert from_stdin.returncode == 1
    assert "the prompt is empty" in one_line_error(from_stdin.stderr)


def test_ctrl_c_while_the_parser_imports_the_subcommands_is_not_a_traceback(monkeypatch, capsys):
    import mlx_llama.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["generate"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_sigterm_unwinds_like_ctrl_c_with_its_own_exit_status():
    """SIGTERM killed the process where it stood (no cleanup, no message)."""
    code = ("import os, signal, sys\n"
            "import mlx_llama.cli as cli\n"
            "cli.build_parser = lambda: os.kill(os.getpid(), signal.SIGTERM)\n"
            "sys.exit(cli.main([]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 143 and proc.stderr.strip() == "terminated (SIGTERM)", proc.stderr


@pytest.mark.parametrize("rotating", [False, True])
def test_a_chat_without_a_template_reuses_its_cache_turn_after_turn(tiny_checkpoints, rotating):
    """Without a chat template the first turn was the bare text and later ones a transcript,
    and a reply's leading space was written twice: the last reply was never reused from the
    cache, and with a rotating window nothing was, once it had rotated."""
    import argparse

    from mlx_llama.cache_options import add_cache_arguments, cache_factory
    from mlx_llama.conversation import Conversation
    from mlx_llama.generate import stream_generate
    from mlx_llama.loading import load

    model, tok = load(tiny_checkpoints["gqa"])
    assert tok.chat_template is None
    word = tok.encode(" llama", add_special_tokens=False)[0]  # a reply of " llama llama ..."
    parser = argparse.ArgumentParser()
    add_cache_arguments(parser, prompt_cache=False)
    flags = ["--max-kv-size", "48"] if rotating else []
    chat = Conversation(model, tok, make_layers=cache_factory(parser.parse_args(flags), model))
    previous = None
    for turn in ["Hello there", "Tell me about llamas", "And their wool?", "Thanks"]:
        prompt = chat.add_user(turn)
        steps = list(stream_generate(model, tok, prompt, 6, cache=chat.cache,
                                     logit_bias={word: 100.0}))
        if previous is not None:  # all of the previous turn, its reply included, was reused
            assert steps[-1].cached_tokens == previous, (turn, steps[-1].cached_tokens, previous)
        chat.add_reply("".join(s.text for s in steps), steps[-1].token, True)
        previous = steps[-1].prompt_tokens + len(steps)
