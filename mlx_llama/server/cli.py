"""Serve a model over an OpenAI-compatible HTTP API (chat and text completions).

`mlx-llama serve -m MODEL` loads the model once, on the worker thread, then hands the app to
uvicorn. It binds to loopback unless told otherwise; with `--api-key` (or MLX_LLAMA_API_KEY)
every route but /health needs `Authorization: Bearer KEY`. Exposing the port beyond this
machine without a key is allowed but warned about.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import threading
from pathlib import Path

from ..errors import MlxLlamaError

API_KEY_ENV = "MLX_LLAMA_API_KEY"
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str) -> int:
    """'2G', '512M', '1.5g', '1000000' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 512M, 2G or 0)")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2)])


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cache_options import add_cache_arguments
    from ..cli import add_model_argument

    add_model_argument(p)
    add_cache_arguments(p, prompt_cache=False)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV} if set)")
    p.add_argument("--model-name", default=None,
                   help="model id clients must send (default: the model folder's name)")
    p.add_argument("--max-queue", type=int, default=16,
                   help="requests that may wait for the model; more get 429 (default 16)")
    p.add_argument("--prompt-cache-bytes", type=parse_bytes, default=2 << 30,
                   help="memory for reusable prompt caches, e.g. 512M, 2G; 0 disables (default 2G)")
    p.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                   help="a web origin whose pages may call the server, e.g. "
                   "https://app.example.com, or * for any (repeatable; pages served from "
                   "localhost always may)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])


def check_port_free(host: str, port: int) -> None:
    """Fail with one line before the model loads, not with uvicorn's traceback after."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise MlxLlamaError(f"cannot resolve --host {host!r} ({e}); use an IP like 127.0.0.1")
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise MlxLlamaError(f"cannot listen on {host}:{port} ({e.strerror}): "
                                "pick another --port or stop what is using it") from None


def build(folder: Path, *, model_name: str | None = None, api_key: str | None = None,
          max_queue: int = 16, prompt_cache_bytes: int = 2 << 30,
          cache_kind: tuple[str, dict] = ("default", {}), allowed_origins: list[str] | None = None):
    """Load the tokenizer, start the worker (which loads the model) and build the app."""
    from ..tokenizer import load_tokenizer
    from .app import create_app
    from .worker import GenerationWorker, load_model_fn

    tokenizer = load_tokenizer(folder)
    worker = GenerationWorker(load_model_fn(folder), tokenizer, max_queue=max_queue,
                              prompt_cache_bytes=prompt_cache_bytes,
                              cache_kind=cache_kind).start()
    app = create_app(worker, tokenizer, model_id=model_name or folder.name, api_key=api_key,
                     stop_worker_on_shutdown=True, allowed_origins=allowed_origins)
    return app, worker


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise MlxLlamaError("the server needs FastAPI and uvicorn: "
                            "pip install 'mlx-llama[server]'") from None
    from ..cache_options import cache_spec
    from ..cli import resolve_model

    if args.max_queue < 0:
        raise MlxLlamaError(f"--max-queue must be 0 or more, got {args.max_queue}")
    if not 0 < args.port < 65536:
        raise MlxLlamaError(f"--port must be 1..65535, got {args.port}")
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("mlx_llama.server")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.host not in LOOPBACK and api_key is None:
        log.warning("listening on %s without an API key: anyone who can reach this port can "
                    "use the model (set --api-key or %s)", args.host, API_KEY_ENV)
    check_port_free(args.host, args.port)
    folder = resolve_model(args.model)
    app, worker = build(folder, model_name=args.model_name, api_key=api_key,
                        max_queue=args.max_queue, prompt_cache_bytes=args.prompt_cache_bytes,
                        cache_kind=cache_spec(args), allowed_origins=args.allowed_origin)
    model_id = app.state.ctx.model_id
    log.info("serving %r (context %d tokens) on http://%s:%d/v1", model_id,
             worker.context_length, args.host, args.port)
    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # Ctrl-C, SIGTERM: end the streams now
            # (uvicorn waits for open connections before the app's shutdown). From a thread:
            # this runs between two bytecodes of the loop's thread, maybe inside submit().
            threading.Thread(target=worker.begin_shutdown, name="shutdown").start()
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                   access_log=False))
    # uvicorn handles SIGINT/SIGTERM only: a closed terminal is taken as a SIGTERM (unless
    # SIGHUP is ignored, as under nohup).
    hangup = getattr(signal, "SIGHUP", None)
    previous = None
    if (hangup is not None and threading.current_thread() is threading.main_thread()
            and signal.getsignal(hangup) is not signal.SIG_IGN):
        previous = signal.signal(hangup, lambda _s, f: server.handle_exit(signal.SIGTERM, f))
    try:
        server.run()
    finally:
        if previous is not None:
            signal.signal(hangup, previous)
    return 0
