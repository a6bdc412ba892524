"""Hub downloads for real, against a fake Hugging Face hub served over loopback HTTP.

The server implements the endpoints huggingface_hub calls for `snapshot_download`:
- GET  /api/models/{repo}/revision/{rev}    repo info: commit sha and file list
- GET  /api/models/{repo}/tree/{rev}        recursive file listing (path, size, oid)
- HEAD /{repo}/resolve/{rev}/{file}         X-Repo-Commit, ETag and Content-Length
- GET  /{repo}/resolve/{rev}/{file}         the bytes
with the X-Error-Code headers the real hub sends for missing repos, revisions and files and
for gated repos. Conversions run in a subprocess so that HF_ENDPOINT, HF_HOME and
HF_HUB_OFFLINE are set before huggingface_hub is imported, and every request is logged so the
test can assert which files were (and were not) fetched.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlx.core as mx
import numpy as np
import pytest

from mlx_llama.loading import load_model

ROOT = Path(__file__).resolve().parents[1]
SHA = "0123456789abcdef0123456789abcdef01234567"
NEEDED = {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
          "generation_config.json"}


class FakeHub:
    """repos: repo id -> {"files": {path: bytes}, "refs": {name: sha}, "gated": bool}."""

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.log: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_HEAD(self):
                hub.handle(self, body=False)

            def do_GET(self):
                hub.handle(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add_repo(self, repo_id: str, files: dict[str, bytes], gated: bool = False) -> None:
        self.repos[repo_id] = {"files": files, "refs": {"main": SHA, "v1": SHA, SHA: SHA},
                               "gated": gated}

    def fetched(self) -> set[str]:
        return {path.split("/resolve/", 1)[1].split("/", 1)[1] for method, path in self.log
                if method == "GET" and "/resolve/" in path}

    def requested(self) -> set[str]:
        return {path.split("/resolve/", 1)[1].split("/", 1)[1] for _, path in self.log
                if "/resolve/" in path}

    def handle(self, req: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(req.path).path)
        self.log.append((req.command, path))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            self.api(req, "/".join(parts[2:4]), parts[4], parts[5])
        elif len(parts) >= 5 and parts[2] == "resolve":
            self.resolve(req, "/".join(parts[:2]), parts[3], "/".join(parts[4:]), body)
        else:
            self.send(req, 404, b"", {})

    def lookup(self, req, repo_id: str, rev: str):
        repo = self.repos.get(repo_id)
        if repo is None:
            self.send(req, 401, b'{"error":"Repository not found"}',
                      {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
            return None, None
        if rev not in repo["refs"]:
            self.send(req, 404, b'{"error":"Invalid rev id"}',
                      {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"})
            return None, None
        return repo, repo["refs"][rev]

    def api(self, req, repo_id: str, kind: str, rev: str) -> None:
        repo, sha = self.lookup(req, repo_id, rev)
        if repo is None:
            return
        files = repo["files"]
        if kind == "revision":
            data = {"id": repo_id, "sha": sha, "private": False, "gated": repo["gated"] and "auto",
                    "siblings": [{"rfilename": name} for name in sorted(files)]}
        else:
            data = [{"type": "file", "path": name, "size": len(content),
                     "oid": hashlib.sha1(content).hexdigest()} for name, content in sorted(files.items())]
        self.send(req, 200, json.dumps(data).encode(), {"Content-Type": "application/json"})

    def resolve(self, req, repo_id: str, rev: str, name: str, body: bool) -> None:
        repo, sha = self.lookup(req, repo_id, rev)
        if repo is None:
            return
        if repo["gated"]:
            self.send(req, 401, b"", {"X-Error-Code": "GatedRepo",
                                      "X-Error-Message": "Access to this model is restricted"})
            return
        content = repo["files"].get(name)
        if name.endswith(".safetensors") and repo.get("weights_status"):
            self.send(req, repo["weights_status"], b"", {"X-Repo-Commit": sha})
            return
        if content is None:
            self.send(req, 404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha})
            return
        etag = '"' + hashlib.sha256(content).hexdigest() + '"'
        self.send(req, 200, content if body else b"",
                  {"X-Repo-Commit": sha, "ETag": etag, "Content-Type": "application/octet-stream"},
                  length=len(content))

    @staticmethod
    def send(req, status: int, payload: bytes, headers: dict, length: int | None = None) -> None:
        req.send_response(status)
        for key, value in headers.items():
            req.send_header(key, value)
        req.send_header("Content-Length", str(len(payload) if length is None else length))
        req.end_headers()
        if payload and req.command != "HEAD":
            req.wfile.write(payload)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def run(args: list[str], home: Path, endpoint: str, offline: bool = False, code: str | None = None):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("HF_") and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_IMPLICIT_TOKEN="1", NO_PROXY="127.0.0.1,localhost",
               HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="10")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "convert.cli"]
    proc = subprocess.run([*command, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    return proc.returncode, proc.stdout, [l for l in proc.stderr.splitlines() if l.strip()]


def repo_files(folder: Path) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    files["pytorch_model.bin"] = b"pickled weights that must never be requested"
    files["model-q4_0.gguf"] = b"GGUF weights that must never be requested"
    files["original/consolidated.safetensors"] = b"original-format weights in a sub-folder"
    files["consolidated.safetensors"] = b"Mistral-format duplicate of the weights, never read"
    files["README.md"] = b"# tiny"
    files[".gitattributes"] = b"*.bin filter=lfs"
    return files


def all_tensors(folder: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for p in sorted(folder.glob("*.safetensors"))
            for k, v in mx.load(str(p)).items()}


def test_convert_by_repo_id_downloads_only_needed_files_and_then_works_offline(
        tiny_checkpoints, tmp_path):
    home = tmp_path / "hf_home"
    with FakeHub() as hub:
        hub.add_repo("tiny-org/tiny-llama", repo_files(tiny_checkpoints["gqa"]))
        code, stdout, err = run(["tiny-org/tiny-llama", "-o", tmp_path / "online", "-q",
                                 "--revision", "v1"], home, hub.url)
        assert code == 0, err
        assert hub.fetched() == NEEDED
        assert hub.requested() == NEEDED  # not even a HEAD for .bin, .gguf or sub-folders
        assert any("/api/models/tiny-org/tiny-llama/revision/v1" in p for _, p in hub.log)
    assert "bits per weight" in stdout
    model, config = load_model(tmp_path / "online")
    model(mx.array([[1, 2, 3]]))
    assert config["quantization"]["bits"] == 4
    card = (tmp_path / "online" / "README.md").read_text()
    assert f"tiny-org/tiny-llama@{SHA}" in card and "base_model: tiny-org/tiny-llama" in card

    # The server is gone: the cached snapshot serves the same conversion.
    code, _, err = run(["tiny-org/tiny-llama", "-o", tmp_path / "offline", "-q", "--revision", "v1"],
                       home, hub.url, offline=True)
    assert code == 0, err
    online, offline = all_tensors(tmp_path / "online"), all_tensors(tmp_path / "offline")
    assert online.keys() == offline.keys()
    assert all(np.array_equal(online[k], offline[k]) for k in online)


def test_hub_errors_are_one_line(tiny_checkpoints, tmp_path):
    home = tmp_path / "hf_home"
    with FakeHub() as hub:
        hub.add_repo("tiny-org/tiny-llama", repo_files(tiny_checkpoints["gqa"]))
        hub.add_repo("tiny-org/gated", repo_files(tiny_checkpoints["gqa"]), gated=True)
        bin_only = {k: v for k, v in repo_files(tiny_checkpoints["gqa"]).items()
                    if not k.endswith(".safetensors")}
        hub.add_repo("tiny-org/bin-only", bin_only)
        hub.add_repo("tiny-org/gguf-only", {"model.Q4_0.gguf": b"GGUF", "README.md": b"# q"})
        cases = [
            (["tiny-org/gguf-only"], "holds GGUF files (model.Q4_0.gguf)",
             "mlx-llama convert model.Q4_0.gguf"),
            (["nobody/missing"], "not found on the Hugging Face hub", "huggingface-cli login"),
            (["tiny-org/tiny-llama", "--revision", "no-such-branch"], "revision 'no-such-branch'",
             "--revision"),
            (["tiny-org/gated"], "gated", "HF_TOKEN"),
            (["tiny-org/bin-only"], "no .safetensors", "refs/pr/1"),
        ]
        for args, first, second in cases:
            out = tmp_path / "out"
            code, _, err = run([*args, "-o", out], home, hub.url)
            assert code == 1 and len(err) == 1, (args, err)
            assert first in err[0] and second in err[0], err[0]
            assert not out.exists()
        assert "pytorch_model.bin" not in hub.requested()
    port = hub.server.server_address[1]  # closed now: nothing listens there

    code, _, err = run(["tiny-org/tiny-llama", "-o", tmp_path / "out"], tmp_path / "empty",
                       f"http://127.0.0.1:{port}")
    assert code == 1 and len(err) == 1 and "check your network connection" in err[0], err
    assert "HF_HUB_OFFLINE=1" in err[0]
    code, _, err = run(["tiny-org/tiny-llama", "-o", tmp_path / "out"], tmp_path / "empty",
                       f"http://127.0.0.1:{port}", offline=True)
    assert code == 1 and len(err) == 1 and "not in the local cache" in err[0], err


RESOLVE = (
    "import sys\n"
    "from mlx_llama.errors import MlxLlamaError\n"
    "from mlx_llama.hub import resolve_model_folder\n"
    "try:\n"
    "    print(resolve_model_folder(sys.argv[1]))\n"
    "except MlxLlamaError as e:\n"
    "    sys.exit(f'error: {e}')\n"
)


def test_runtime_resolves_an_mlx_repo_id(tiny_checkpoints, tmp_path):
    """`generate -m org/name` goes through resolve_model_folder: MLX files only, then cached."""
    from convert.api import convert

    mlx_folder = convert(tiny_checkpoints["gqa"], tmp_path / "mlx", quantize=True, progress=False)
    files = repo_files(mlx_folder)
    home = tmp_path / "hf_home"
    with FakeHub() as hub:
        hub.add_repo("mlx-community/tiny-4bit", files)
        code, stdout, err = run(["mlx-community/tiny-4bit"], home, hub.url, code=RESOLVE)
        assert code == 0, err
        wanted = {n for n in files if "/" not in n and n.endswith((".json", ".safetensors", ".model"))
                  and not n.startswith("consolidated")}
        assert hub.requested() == wanted
    folder = Path(stdout.strip())
    assert folder.parent.name == "snapshots" and (folder / "model.safetensors").is_file()
    code, stdout2, err = run(["mlx-community/tiny-4bit"], home, hub.url, offline=True, code=RESOLVE)
    assert code == 0 and stdout2 == stdout, err
    model, _ = load_model(folder)
    model(mx.array([[1, 2]]))


def test_a_repo_the_runtime_cannot_run_is_refused_before_its_weights_are_fetched(
        tiny_checkpoints, tmp_path):
    """Another architecture was downloaded whole (gigabytes) before its config was read; a
    repo with only PyTorch weights gave "no .safetensors weights in <a cache path>"."""
    from convert.api import convert

    files = repo_files(convert(tiny_checkpoints["gqa"], tmp_path / "mlx", quantize=True,
                               progress=False))
    config = json.loads(files["config.json"])
    qwen = {**files, "config.json": json.dumps({**config, "model_type": "qwen2"}).encode()}
    bin_only = {k: v for k, v in files.items() if not k.endswith(".safetensors")}
    with FakeHub() as hub:
        hub.add_repo("org/qwen", qwen)
        hub.add_repo("org/bin-only", bin_only)
        code, _, err = run(["org/qwen"], tmp_path / "home", hub.url, code=RESOLVE)
        assert code == 1 and len(err) == 1 and "org/qwen: " in err[0] and "qwen2" in err[0], err
        assert not {n for n in hub.requested() if n.endswith(".safetensors")}
        code, _, err = run(["org/bin-only"], tmp_path / "home", hub.url, code=RESOLVE)
        assert code == 1 and len(err) == 1, err
        assert "org/bin-only has no .safetensors weights" in err[0]
        assert "mlx-llama convert org/bin-only -o OUT" in err[0] and "snapshots" not in err[0]


def test_a_local_path_typo_says_so_and_a_repo_id_stays_one(tmp_path, monkeypatch):
    """`out/nonexist` where `out/` is a folder here: the error says there is no such folder
    before what the hub said; `org/name` is still a repo id when a folder `org/` exists (the
    layout `huggingface-cli download --local-dir org/name` leaves)."""
    from mlx_llama import hub
    from mlx_llama.errors import MlxLlamaError

    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    asked = []

    def unreachable(repo_id, revision, patterns, progress=True):
        asked.append(repo_id)
        raise MlxLlamaError(f"cannot reach the Hugging Face hub to download {repo_id}")

    monkeypatch.setattr(hub, "download", unreachable)
    assert hub.looks_like_repo_id("out/nonexist")
    with pytest.raises(MlxLlamaError, match=r"^there is no folder out/nonexist here \(though "
                                            r"out/ exists\), and as a hub repo id: cannot reach"):
        hub.resolve_model_folder("out/nonexist")
    with pytest.raises(MlxLlamaError, match="^cannot reach the Hugging Face hub"):
        hub.resolve_model_folder("org/name")
    assert asked == ["out/nonexist", "org/name"]


def test_a_server_error_wrapped_as_not_found_locally_is_named_as_the_hubs():
    """huggingface_hub 2.x wraps a 500 met while downloading in LocalEntryNotFoundError, which
    was reported as "cannot reach the hub: check your network connection"."""
    import httpx
    from huggingface_hub import errors as hf

    from mlx_llama.hub import describe_hub_error

    response = httpx.Response(500, request=httpx.Request("GET", "http://hub/x"))
    try:
        try:
            raise hf.HfHubHTTPError("500 Server Error", response=response)
        except hf.HfHubHTTPError as inner:
            raise hf.LocalEntryNotFoundError("cannot find the file locally") from inner
    except hf.LocalEntryNotFoundError as wrapped:
        message = describe_hub_error(wrapped, "tiny-org/tiny", None)
    assert "HTTP 500" in message and "try again later" in message, message
    assert "network" not in message


def test_a_failing_hub_gives_one_line_not_the_librarys_retry_warnings(tiny_checkpoints, tmp_path):
    """huggingface_hub logged two warnings per retry (a dozen lines) before it gave up on a 5xx."""
    with FakeHub() as hub:
        hub.add_repo("tiny-org/down", repo_files(tiny_checkpoints["gqa"]))
        hub.repos["tiny-org/down"]["weights_status"] = 503
        out = tmp_path / "out"
        code, _, err = run(["tiny-org/down", "-o", out], tmp_path / "hf_home", hub.url)
    # one line while it waits (why nothing happens for half a minute), one for the failure
    assert code == 1 and len(err) == 2, err
    assert "HTTP Error 503" in err[0] and "retrying" in err[0] and "http://" not in err[0], err[0]
    assert "503" in err[1] and "try again later" in err[1], err[1]
    assert not out.exists()
