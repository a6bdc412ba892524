"""Broken sources, interruptions and existing outputs: one error line, exit 1, nothing left behind.

Every case checks the same three things: the CLI exits 1 with exactly one line on stderr, no
output or temporary folder appears next to OUT, and an existing OUT is byte-for-byte intact.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import convert.writer as writer
from convert.cli import main

ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.is_dir() else {}


def run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def assert_clean_failure(code, lines, parent: Path, out: Path, before: dict, match: str):
    assert code == 1
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and match in lines[0], lines[0]
    leftovers = [p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers == []
    assert snapshot(out) == before


@pytest.fixture
def src(tiny_checkpoints, tmp_path) -> Path:
    folder = tmp_path / "src"
    shutil.copytree(tiny_checkpoints["gqa"], folder)
    return folder


@pytest.fixture
def old_out(tmp_path) -> Path:
    """An existing output folder that a failed --force conversion must leave untouched."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"old": true}')
    (out / "model.safetensors").write_bytes(b"old weights")
    return out


def test_truncated_safetensors(src, old_out, tmp_path, capsys):
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    before = snapshot(old_out)
    code, lines = run_cli([src, "-o", old_out, "--force"], capsys)
    assert_clean_failure(code, lines, tmp_path, old_out, before, "truncated")


@pytest.mark.parametrize("damage, match", [
    (lambda raw: raw[:8] + b"{not json" + raw[17:], "header is not valid JSON"),
    (lambda raw: (2**40).to_bytes(8, "little") + raw[8:], "header length is impossible"),
    (lambda raw: b"\x01\x02", "shorter than a safetensors header"),
])
def test_corrupt_header(src, tmp_path, capsys, damage, match):
    weights = src / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    out = tmp_path / "out"
    code, lines = run_cli([src, "-o", out], capsys)
    assert_clean_failure(code, lines, tmp_path, out, {}, match)


@pytest.mark.parametrize("dtype, match", [
    ("F64", "is stored as F64, which mlx-llama does not convert"),  # was "corrupt"
    ("F8_E4M3", "is stored as F8_E4M3, which mlx-llama does not convert"),  # was "corrupt"
    ("F32", "malformed or unsupported entry"),  # string offsets below: was a TypeError traceback
])
def test_header_dtypes_and_offsets(src, tmp_path, capsys, dtype, match):
    import json
    import struct

    weights = src / "model.safetensors"
    raw = weights.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    name = next(k for k in header if k != "__metadata__")
    entry = header[name]
    if dtype == "F32":
        entry["data_offsets"] = [str(n) for n in entry["data_offsets"]]
    else:
        entry["dtype"] = dtype
    new_header = json.dumps(header).encode()
    new_header += b" " * (-len(new_header) % 8)
    weights.write_bytes(struct.pack("<Q", len(new_header)) + new_header + raw[8 + length:])
    out = tmp_path / "out"
    code, lines = run_cli([src, "-o", out], capsys)
    assert_clean_failure(code, lines, tmp_path, out, {}, match)


@pytest.mark.parametrize("value, extra, match", [
    # a float32 source with a NaN was told "try --dtype bfloat16 or float32"
    (float("nan"), [], "the source's tensor model.layers.0.mlp.down_proj.weight holds NaN"),
    (1e6, ["--dtype", "float16"], "holds NaN or infinite values as float16: the source"),
])
def test_non_finite_weights_are_named(src, tmp_path, capsys, value, extra, match):
    import mlx.core as mx

    weights = src / "model.safetensors"
    tensors = dict(mx.load(str(weights)))
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name] = mx.full(tensors[name].shape, value, tensors[name].dtype)
    mx.save_safetensors(str(weights), tensors, metadata={"format": "pt"})
    out = tmp_path / "out"
    code, lines = run_cli([src, "-o", out, *extra], capsys)
    assert_clean_failure(code, lines, tmp_path, out, {}, match)


def test_config_without_weights(src, tmp_path, capsys):
    (src / "model.safetensors").unlink()
    out = tmp_path / "out"
    code, lines = run_cli([src, "-o", out], capsys)
    assert_clean_failure(code, lines, tmp_path, out, {}, "no weights")


def test_pytorch_bin_only_folder_is_refused_without_unpickling(src, tmp_path, capsys):
    (src / "model.safetensors").unlink()
    # A pickle that would create a file if it were ever loaded.
    marker = tmp_path / "unpickled"
    payload = (b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    (src / "pytorch_model.bin").write_bytes(payload)
    out = tmp_path / "out"
    code, lines = run_cli([src, "-o", out], capsys)
    assert_clean_failure(code, lines, tmp_path, out, {}, "only PyTorch .bin/.pth")
    assert "safetensors" in lines[0] and not marker.exists()


def test_missing_config_and_unsupported_architecture(src, tmp_path, capsys):
    out = tmp_path / "out"
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    code, lines = run_cli([src, "-o", out], capsys)
    assert_clean_failure(code, lines, tmp_path, out, {}, "unsupported model_type 'gpt2'")
    (src / "config.json").unlink()
    code, lines = run_cli([src, "-o", out], capsys)
    assert_clean_failure(code, lines, tmp_path, out, {}, "no config.json")


def test_index_naming_a_missing_shard(src, tmp_path, capsys):
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}))
    out = tmp_path / "out"
    code, lines = run_cli([src, "-o", out], capsys)
    assert_clean_failure(code, lines, tmp_path, out, {}, "incomplete")


def test_existing_output_needs_force(src, old_out, tmp_path, capsys):
    before = snapshot(old_out)
    code, lines = run_cli([src, "-o", old_out], capsys)
    assert_clean_failure(code, lines, tmp_path, old_out, before, "--force")


def test_force_never_replaces_the_source(src, tmp_path, capsys):
    before = snapshot(src)
    for out in (src, tmp_path):
        code, lines = run_cli([src, "-o", out, "--force"], capsys)
        assert code == 1 and len(lines) == 1 and "would replace the source" in lines[0]
    assert snapshot(src) == before


def test_force_replaces_the_folder(src, old_out, tmp_path, capsys):
    code, _ = run_cli([src, "-o", old_out, "--force", "-q"], capsys)
    assert code == 0
    assert "quantization" in json.loads((old_out / "config.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def interrupt_on_shard(monkeypatch, shard: int, exc: BaseException):
    """Make the writer fail while writing output shard number `shard` (1-based)."""
    real = writer.write_safetensors
    calls = []

    def failing(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == shard:
            Path(path).write_bytes(b"partial")
            raise exc
        return real(path, *args, **kwargs)

    monkeypatch.setattr(writer, "write_safetensors", failing)
    return calls


def test_ctrl_c_mid_way_leaves_old_output_intact(src, old_out, tmp_path, capsys, monkeypatch):
    calls = interrupt_on_shard(monkeypatch, 3, KeyboardInterrupt())
    before = snapshot(old_out)
    code, lines = run_cli([src, "-o", old_out, "--force", "--shard-size", "100KB"], capsys)
    assert len(calls) == 3  # it really was interrupted after two complete shards
    assert_clean_failure(code, lines, tmp_path, old_out, before, "interrupted")


TERMINATED_MID_WAY = """
import os, signal, sys
import convert.writer as writer
from mlx_llama.cli import main
real, calls = writer.write_safetensors, []
def write(path, *args, **kwargs):
    calls.append(path)
    if len(calls) == 2:
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    return real(path, *args, **kwargs)
writer.write_safetensors = write
sys.exit(main(["convert", *sys.argv[2:]]))
"""


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_kill_mid_way_cleans_up_like_ctrl_c(src, old_out, tmp_path, name):
    """`kill` / `timeout` / a closed terminal left the whole temporary folder behind."""
    before = snapshot(old_out)
    proc = subprocess.run(
        [sys.executable, "-c", TERMINATED_MID_WAY, name, str(src), "-o", str(old_out), "--force",
         "--shard-size", "100KB", "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 128 + getattr(signal, name), proc.stderr  # kill's own status
    assert lines[0] == f"conversion stopped: {old_out} was not written or changed", lines
    assert lines[1:] == [f"terminated ({name})"], lines
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []
    assert snapshot(old_out) == before


def test_full_disk(src, old_out, tmp_path, capsys, monkeypatch):
    interrupt_on_shard(monkeypatch, 2, OSError(errno.ENOSPC, "No space left on device"))
    before = snapshot(old_out)
    code, lines = run_cli([src, "-o", old_out, "--force", "--shard-size", "100KB"], capsys)
    assert_clean_failure(code, lines, tmp_path, old_out, before, "no space left")


def test_unexpected_exception_during_verification(src, old_out, tmp_path, capsys, monkeypatch):
    import convert.api

    def broken(folder):
        raise RuntimeError("simulated bug\nwith a second line")

    monkeypatch.setattr(convert.api, "verify_folder", broken)
    before = snapshot(old_out)
    code, lines = run_cli([src, "-o", old_out, "--force"], capsys)
    assert_clean_failure(code, lines, tmp_path, old_out, before, "simulated bug")


def test_a_failed_conversion_removes_the_folders_it_made_for_the_output(src, tmp_path, capsys,
                                                                       monkeypatch):
    import convert.api

    def broken(folder):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(convert.api, "verify_folder", broken)
    (tmp_path / "kept").mkdir()
    code, lines = run_cli([src, "-o", tmp_path / "kept" / "new" / "deeper" / "out"], capsys)
    assert code == 1 and "simulated bug" in lines[0]
    assert list((tmp_path / "kept").iterdir()) == []  # "kept" was there before: it stays


def test_failed_rename_restores_the_old_folder(src, old_out, tmp_path, monkeypatch):
    """If the final rename fails after the old folder was moved aside, it is moved back."""
    real_rename = os.rename

    def rename(a, b):
        if Path(a).name.startswith(".out.tmp-"):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_rename(a, b)

    before = snapshot(old_out)
    monkeypatch.setattr(writer.os, "rename", rename)
    from convert.api import convert
    from mlx_llama.errors import MlxLlamaError

    with pytest.raises(MlxLlamaError, match="cannot write"):
        convert(src, old_out, force=True, progress=False)
    assert snapshot(old_out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_cli_process_exit_code_and_single_line(tmp_path):
    """The real process: exit status 1 and one stderr line, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "convert.cli", str(tmp_path / "nowhere"), "-o", str(tmp_path / "o")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr
    assert not (tmp_path / "o").exists()


def run_on_terminal(argv: list[str]) -> tuple[int, str]:
    """Run the CLI with stdout/stderr on a pseudo-terminal (100 columns) and collect its output."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "convert.cli", *map(str, argv)], cwd=ROOT,
                            stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace")


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_progress_bar_on_a_terminal_only(src, tmp_path):
    code, text = run_on_terminal([src, "-o", tmp_path / "a", "-q"])
    assert code == 0 and "Converting" in text and "bits per weight" in text
    code, text = run_on_terminal([src, "-o", tmp_path / "b", "-q", "--no-progress"])
    assert code == 0 and text.strip() == ""


def test_force_replaces_only_model_folders(src, tmp_path, capsys, monkeypatch):
    """--force deletes the old folder, so a folder that is not a model (no config.json), or
    one that holds the working directory, is refused and left as it was."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "thesis.txt").write_text("years of work")
    before = snapshot(docs)
    code, lines = run_cli([src, "-o", docs, "--force"], capsys)
    assert_clean_failure(code, lines, tmp_path, docs, before, "not a model folder")
    inside = tmp_path / "model"
    (inside / "sub").mkdir(parents=True)
    (inside / "config.json").write_text("{}")
    monkeypatch.chdir(inside / "sub")
    for out in (inside, Path("..")):
        code, lines = run_cli([src, "-o", out, "--force"], capsys)
        assert code == 1 and len(lines) == 1 and "holds the current directory" in lines[0], lines
    assert (inside / "config.json").read_text() == "{}" and (inside / "sub").is_dir()
    monkeypatch.chdir(tmp_path)
    mac = tmp_path / "mac"
    mac.mkdir()
    (mac / ".DS_Store").write_bytes(b"\0")  # what Finder leaves: still an empty folder
    code, _ = run_cli([src, "-o", mac, "--force"], capsys)
    assert code == 0 and (mac / "config.json").is_file()
    mac_plain = tmp_path / "mac_plain"
    mac_plain.mkdir()
    (mac_plain / ".DS_Store").write_bytes(b"\0")
    code, _ = run_cli([src, "-o", mac_plain], capsys)  # no --force needed for an empty folder
    assert code == 0 and (mac_plain / "config.json").is_file()


def test_force_never_deletes_a_repository_or_dot_files(src, tmp_path, capsys):
    """A fresh clone (nothing but .git and dot-files) counted as empty, and --force deleted
    it with its history; a model folder that is a git clone lost its .git the same way."""
    clone = tmp_path / "clone"
    (clone / ".git").mkdir(parents=True)
    (clone / ".git" / "HEAD").write_text("ref: refs/heads/main")
    (clone / ".gitattributes").write_text("*.safetensors filter=lfs")
    code, lines = run_cli([src, "-o", clone, "--force"], capsys)
    assert code == 1 and "not a model folder" in lines[0], lines
    (clone / "config.json").write_text("{}")
    code, lines = run_cli([src, "-o", clone, "--force"], capsys)
    assert code == 1 and len(lines) == 1 and "is a git repository" in lines[0], lines
    assert (clone / ".git" / "HEAD").is_file() and (clone / ".gitattributes").is_file()
    code, lines = run_cli([src, "-o", clone], capsys)
    assert code == 1 and "already exists" in lines[0]


def test_an_output_inside_a_file_is_named_as_such(src, tmp_path, capsys):
    """`-o notes.txt/model` said "File exists (...notes.txt)"."""
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    code, lines = run_cli([src, "-o", notes / "sub" / "model"], capsys)
    assert code == 1 and len(lines) == 1 and "notes.txt is a file, so the output" in lines[0], lines
    assert notes.read_text() == "mine"


def test_an_empty_current_directory_is_not_renamed_away(src, tmp_path, capsys, monkeypatch):
    """`-o .` in an empty folder moved it aside under the user's shell (and the model card
    got an empty name)."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    code, lines = run_cli([src, "-o", "."], capsys)
    assert code == 1 and len(lines) == 1 and "holds the current directory" in lines[0], lines
    assert here.is_dir() and Path.cwd() == here.resolve()


def test_a_symlinked_output_is_written_where_it_points(src, tmp_path, capsys):
    """The link was replaced by a folder beside it, its target left unchanged and a dangling
    .OUT.old-* link left behind."""
    target = tmp_path / "disk" / "model"
    target.parent.mkdir()
    link = tmp_path / "link_out"
    link.symlink_to(target)  # dangling: the target does not exist yet
    code, lines = run_cli([src, "-o", link], capsys)
    assert code == 0, lines
    assert link.is_symlink() and (target / "config.json").is_file()
    (target / "marker").write_text("old")
    code, lines = run_cli([src, "-o", link, "--force"], capsys)
    assert code == 0 and not (target / "marker").exists() and link.is_symlink(), lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "link_out", "src"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]
    assert "# model" in (target / "README.md").read_text()


@pytest.mark.parametrize("damage, match", [
    ("remove", "has no tokenizer (tokenizer.json or tokenizer.model)"),
    ("truncate", "the tokenizer does not load (Could not read tokenizer.model)"),
])
def test_a_source_whose_tokenizer_is_missing_or_broken(src, tmp_path, capsys, damage, match):
    """The result could not run, so it is not written (its error would then blame convert)."""
    for name in ("tokenizer.json", "tokenizer.model"):
        if (src / name).exists():
            if damage == "remove":
                (src / name).unlink()
            else:
                (src / name).write_bytes((src / name).read_bytes()[:500])
    out = tmp_path / "out"
    code, lines = run_cli([src, "-o", out], capsys)
    assert_clean_failure(code, lines, tmp_path, out, {}, match)
