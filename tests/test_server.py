"""The OpenAI-compatible server, driven through the official `openai` client and raw HTTP.

One tiny random model (SentencePiece tokenizer, a ChatML template written into its
tokenizer_config.json, an 8k context so generations can run long) is served by uvicorn on a
free loopback port, in a thread of the test process, so tests can look at the worker's
records. Random weights make gibberish, which is fine: every check compares the server with
itself (streamed vs not, concurrent vs sequential) or with the in-process API.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from conftest import make_hf_checkpoint  # noqa: E402
from mlx_llama.cache import PromptCache  # noqa: E402
from mlx_llama.generate import stream_generate  # noqa: E402
from mlx_llama.server.app import create_app  # noqa: E402
from mlx_llama.server.prefix_cache import PrefixCacheStore, allocated_bytes  # noqa: E402
from mlx_llama.server.worker import GenerationWorker, load_model_fn  # noqa: E402

API_KEY = "sk-test-key"
MODEL_ID = "tiny-chat"
EOS = 2
NO_EOS = {str(EOS): -100}  # random weights may pick EOS at any step; tests want fixed lengths
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, sp_model_file) -> Path:
    folder = make_hf_checkpoint(tmp_path_factory.mktemp("server") / "tiny-chat", sp_model_file,
                                seed=11, max_position_embeddings=8192)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHATML
    config_path.write_text(json.dumps(config))
    return folder


class RunningServer:
    def __init__(self, folder: Path, **worker_kw) -> None:
        from mlx_llama.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(folder)
        self.worker = GenerationWorker(load_model_fn(folder), self.tokenizer, **worker_kw).start()
        app = create_app(self.worker, self.tokenizer, model_id=MODEL_ID, api_key=API_KEY)
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says
        # TCP, and without it every keep-alive request waits out a 40 ms delayed ACK.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)

    def client(self, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, **kw)

    def record(self, request_id: str):
        for _ in range(200):  # the worker files its record right after the last event
            found = [r for r in self.worker.records if r.id == request_id]
            if found:
                return found[0]
            time.sleep(0.01)
        raise AssertionError(f"no worker record for {request_id}")

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until the worker has filed its last job: a client has its whole answer a
        moment before the worker releases memory and files the record."""
        _wait_for(lambda: not self.worker.busy and not self.worker.waiting, timeout)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.worker.stop()


@pytest.fixture(scope="module")
def server(chat_model_dir):
    running = RunningServer(chat_model_dir, max_queue=8, prompt_cache_bytes=64 << 20)
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=30,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c


def chat(client, content, **kw):
    messages = content if isinstance(content, list) else [{"role": "user", "content": content}]
    return client.chat.completions.create(model=MODEL_ID, messages=messages, **kw)


def streamed_chat(client, content, **kw):
    """(text, finish_reason, usage) of a streamed chat completion."""
    stream = chat(client, content, stream=True, stream_options={"include_usage": True}, **kw)
    text, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(text), finish, usage


def streamed_completion(client, prompt, **kw):
    stream = client.completions.create(model=MODEL_ID, prompt=prompt, stream=True,
                                       stream_options={"include_usage": True}, **kw)
    text, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text.append(choice.text)
            finish = choice.finish_reason or finish
    return "".join(text), finish, usage


def printable_stop(text: str, start: int = 6) -> str:
    """A short plain-ASCII piece from the middle of `text`, to use as a stop string."""
    for i in range(start, len(text) - 2):
        piece = text[i : i + 2]
        if piece.isascii() and piece.isprintable() and piece.strip() == piece:
            return piece
    pytest.skip("no printable piece in the generated text to stop on")


# ------------------------------------------------------------------------------------------
# The openai client: chat and completions, streamed and not, stop strings and seeds
# ------------------------------------------------------------------------------------------


def test_models_and_health(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    health = httpx.get(f"{server.url}/health")  # no key needed
    assert health.status_code == 200 and health.json()["model"] == MODEL_ID


def test_chat_streamed_equals_unstreamed_with_seed(client):
    kw = dict(max_tokens=24, temperature=0.9, top_p=0.95, seed=1234, logit_bias=NO_EOS)
    whole = chat(client, "Tell me about llamas.", **kw)
    text, finish, usage = streamed_chat(client, "Tell me about llamas.", **kw)
    assert whole.object == "chat.completion" and whole.model == MODEL_ID
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == text
    assert whole.choices[0].finish_reason == finish == "length"
    assert whole.usage.completion_tokens == usage.completion_tokens == 24
    assert whole.usage.prompt_tokens == usage.prompt_tokens
    assert usage.total_tokens == usage.prompt_tokens + 24
    # The same seed again gives the same text; another seed (almost surely) does not.
    again = chat(client, "Tell me about llamas.", **kw)
    assert again.choices[0].message.content == text
    other = chat(client, "Tell me about llamas.", **{**kw, "seed": 99})
    assert other.choices[0].message.content != text


def test_completion_streamed_equals_unstreamed_with_seed(client):
    kw = dict(max_tokens=20, temperature=0.8, seed=7, logit_bias=NO_EOS,
              extra_body={"top_k": 50})
    whole = client.completions.create(model=MODEL_ID, prompt="Llamas are", **kw)
    text, finish, usage = streamed_completion(client, "Llamas are", **kw)
    assert whole.object == "text_completion"
    assert whole.choices[0].text == text
    assert whole.choices[0].finish_reason == finish == "length"
    assert whole.usage.completion_tokens == usage.completion_tokens == 20


def test_completion_matches_in_process_generation(server, client, chat_model_dir):
    """The HTTP path adds nothing: the same text as `stream_generate` on the same model."""
    from mlx_llama.loading import load_model

    model, _ = load_model(chat_model_dir)
    expected = "".join(r.text for r in stream_generate(
        model, server.tokenizer, server.tokenizer.encode("Their wool is"), 16, temperature=0,
        logit_bias={EOS: -100}))
    got = client.completions.create(model=MODEL_ID, prompt="Their wool is", max_tokens=16,
                                    temperature=0, logit_bias=NO_EOS)
    assert got.choices[0].text == expected


def test_a_completion_continues_its_prompt_text(server, client, chat_model_dir):
    """prompt + text reads as the whole sequence decodes (SentencePiece kept the first token's
    word-initial space off: "Llamas are" + "andD", not " andD"), and each text_offset points at
    its token's text."""
    from mlx_llama.loading import load_model

    model, _ = load_model(chat_model_dir)
    tok = server.tokenizer
    prompt = tok.encode("Llamas are")
    generated = [r.token for r in stream_generate(model, tok, prompt, 8, temperature=0,
                                                  logit_bias={EOS: -100})]
    expected = tok.decode(prompt + generated)[len(tok.decode(prompt)):]
    assert tok.id_to_token(generated[0]).startswith("\u2581") and expected.startswith(" ")
    for streamed in (False, True):
        kw = dict(max_tokens=8, temperature=0, logit_bias=NO_EOS)
        if streamed:
            text = streamed_completion(client, "Llamas are", **kw)[0]
        else:
            reply = client.completions.create(model=MODEL_ID, prompt="Llamas are", logprobs=1, **kw)
            text, lp = reply.choices[0].text, reply.choices[0].logprobs
            for token, offset in zip(lp.tokens, lp.text_offset):
                if not token.startswith("bytes:"):
                    assert text[offset:offset + len(token)] == token, (text, lp)
        assert text == expected


@pytest.mark.parametrize("streamed", [False, True])
def test_stop_strings(client, streamed):
    kw = dict(max_tokens=40, temperature=0, logit_bias=NO_EOS)
    full = chat(client, "Count the llamas.", **kw).choices[0].message.content
    stop = printable_stop(full)
    expected = full[: full.find(stop)]
    if streamed:
        text, finish, usage = streamed_chat(client, "Count the llamas.", stop=[stop, "@@@@"], **kw)
    else:
        reply = chat(client, "Count the llamas.", stop=stop, **kw)
        text, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
    assert text == expected
    assert finish == "stop"


def test_completion_stop_string(client):
    kw = dict(max_tokens=30, temperature=0, logit_bias=NO_EOS)
    full = client.completions.create(model=MODEL_ID, prompt="Llamas can", **kw).choices[0].text
    stop = printable_stop(full)
    reply = client.completions.create(model=MODEL_ID, prompt="Llamas can", stop=stop, **kw)
    assert reply.choices[0].text == full[: full.find(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_logprobs(client, http):
    reply = chat(client, "Hi", max_tokens=5, temperature=0, logit_bias=NO_EOS, logprobs=True,
                 top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == 5
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.logprob <= 0
        # Greedy: the chosen token is the most likely one.
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=1e-5)
    spelled = b"".join(bytes(i.bytes) for i in content).decode("utf-8", errors="replace")
    assert spelled.strip() == reply.choices[0].message.content.strip()
    legacy = client.completions.create(model=MODEL_ID, prompt="Hi", max_tokens=4, temperature=0,
                                       logprobs=2, logit_bias=NO_EOS)
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(t) <= 2 for t in lp.top_logprobs)


def spelled(items) -> str:
    return b"".join(bytes(i.bytes) for i in items).decode("utf-8", errors="replace")


def test_logprobs_spell_the_text_stop_strings_and_end_tokens_left_out(client):
    """A logprob is sent with the last of its token's text: tokens wholly inside a stop string
    (held back, never sent) and an end token have none, and a stream never runs ahead of its
    text."""
    kw = dict(max_tokens=40, temperature=0, logit_bias=NO_EOS, logprobs=True)
    full = chat(client, "Count the llamas.", **kw).choices[0].message.content
    stop = printable_stop(full)
    reply = chat(client, "Count the llamas.", stop=stop, **kw)
    text = reply.choices[0].message.content
    assert text == full[: full.find(stop)] and spelled(reply.choices[0].logprobs.content) == text
    content, items = "", []
    for chunk in chat(client, "Count the llamas.", stop=stop, stream=True, **kw):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            items += (choice.logprobs.content or []) if choice.logprobs else []
            assert content.startswith(spelled(items))
    assert content == text and spelled(items) == text
    ended = chat(client, "Stop now.", max_tokens=5, temperature=0, logprobs=True,
                 logit_bias={str(EOS): 100})
    assert ended.choices[0].finish_reason == "stop" and not ended.choices[0].logprobs.content
    legacy = client.completions.create(model=MODEL_ID, prompt="Llamas can", stop=stop,
                                       max_tokens=30, temperature=0, logit_bias=NO_EOS, logprobs=1)
    lp, text = legacy.choices[0].logprobs, legacy.choices[0].text
    assert lp.text_offset == sorted(lp.text_offset) and all(o <= len(text) for o in lp.text_offset)
    assert len(lp.tokens) == len(lp.text_offset) == len(lp.token_logprobs) > 0
    if not any(t.startswith("bytes:") for t in lp.tokens):
        assert "".join(lp.tokens) == text


def test_max_completion_tokens_and_penalties(client):
    reply = chat(client, "Go on.", max_completion_tokens=6, temperature=0.7, seed=3,
                 presence_penalty=1.5, frequency_penalty=1.0, logit_bias=NO_EOS,
                 extra_body={"min_p": 0.01, "top_k": 40, "repetition_penalty": 1.1})
    assert reply.usage.completion_tokens == 6
    assert reply.choices[0].finish_reason == "length"


def test_eos_gives_finish_reason_stop(client):
    reply = chat(client, "Stop now.", max_tokens=50, temperature=0, logit_bias={str(EOS): 100})
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == 1


# ------------------------------------------------------------------------------------------
# One worker: concurrent clients, disconnects, a full queue
# ------------------------------------------------------------------------------------------


def _request(server, i: int):
    """Request i of a mixed batch: chat or completion, streamed or not, each its own seed."""
    client = server.client()
    kw = dict(max_tokens=12 + 3 * i, temperature=0.9, seed=100 + i, logit_bias=NO_EOS)
    if i % 2 == 0:
        if i % 4 == 0:
            text, finish, usage = streamed_chat(client, f"Question {i} about llamas", **kw)
            return text, finish, usage.completion_tokens
        r = chat(client, f"Question {i} about llamas", **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens
    if i % 4 == 1:
        text, finish, usage = streamed_completion(client, f"Llamas number {i}", **kw)
        return text, finish, usage.completion_tokens
    r = client.completions.create(model=MODEL_ID, prompt=f"Llamas number {i}", **kw)
    return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens


def test_four_concurrent_clients_match_sequential(server):
    sequential = [_request(server, i) for i in range(4)]
    server.wait_idle()
    first = len(server.worker.records)
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(lambda i: _request(server, i), range(4)))
    server.wait_idle()
    assert concurrent == sequential
    for i, (_, finish, n) in enumerate(concurrent):
        assert finish == "length" and n == 12 + 3 * i
    # One forward pass at a time: the worker's jobs never overlap.
    jobs = sorted(list(server.worker.records)[first:], key=lambda r: r.started_at)
    assert len(jobs) == 4
    for a, b in zip(jobs, jobs[1:]):
        assert a.finished_at <= b.started_at


def _wait_for(predicate, timeout=10.0):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.005)


def test_disconnect_mid_stream_frees_the_worker(server, http, client):
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Talk forever."}],
            "max_tokens": 6000, "temperature": 0, "stream": True, "logit_bias": NO_EOS}
    with ThreadPoolExecutor(1) as pool:
        with http.stream("POST", "/v1/chat/completions", json=body) as stream:
            lines = stream.iter_lines()
            first = json.loads(next(line for line in lines if line.startswith("data:"))[5:])
            long_id = first["id"]
            _wait_for(lambda: server.worker.current is not None
                      and server.worker.current.tokens_generated >= 5)
            # A second request waits behind the long one...
            waiting = pool.submit(chat, client, "Next please", max_tokens=4, temperature=0,
                                  logit_bias=NO_EOS)
            _wait_for(lambda: server.worker.waiting == 1)
        # ...and the client hangs up: the long job stops at its next token and the waiting
        # request runs.
        reply = waiting.result(timeout=30)
    assert reply.usage.completion_tokens == 4
    cancelled = server.record(long_id)
    nxt = server.record(reply.id)
    assert cancelled.finish_reason == "cancelled"
    assert cancelled.completion_tokens < 6000
    assert cancelled.tokens_after_cancel is not None and cancelled.tokens_after_cancel <= 1
    assert nxt.started_at >= cancelled.finished_at
    assert not server.worker.busy


def test_non_streamed_disconnect_cancels(server):
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Long answer."}],
            "max_tokens": 6000, "temperature": 0, "logit_bias": NO_EOS}
    first = len(server.worker.records)

    def post():
        try:
            httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=0.5,
                       headers={"Authorization": f"Bearer {API_KEY}"})
        except httpx.TimeoutException:
            pass  # the client gives up and closes the connection

    post()
    _wait_for(lambda: len(server.worker.records) > first and not server.worker.busy)
    record = list(server.worker.records)[first]
    assert record.finish_reason == "cancelled"
    assert record.completion_tokens < 6000 and record.tokens_after_cancel <= 1


def test_a_queued_request_whose_client_leaves_is_answered_and_logged(server, caplog):
    """Cancelled while still queued, the job must still tell its handler it ended: before,
    the handler waited forever (one stuck task per timed-out client; shutdown then hung)."""
    from mlx_llama.sampling import SamplingParams
    from mlx_llama.server.worker import Job

    release = threading.Event()  # the blocker's events are delivered on the worker's thread
    blocker = Job(id="blocker", tokens=server.tokenizer.encode("Hold on"), max_tokens=2,
                  sampling=SamplingParams(), emit=lambda event: release.wait(30))
    server.worker.submit(blocker)
    try:
        _wait_for(lambda: server.worker.busy)
        with caplog.at_level(logging.INFO, logger="mlx_llama.server"):
            with pytest.raises(httpx.TimeoutException):
                httpx.post(f"{server.url}/v1/chat/completions", timeout=0.5,
                           headers={"Authorization": f"Bearer {API_KEY}"}, json=GOOD_CHAT)
            _wait_for(lambda: any("status=499" in r.getMessage() for r in caplog.records))
    finally:
        release.set()
    server.wait_idle()
    assert not server.worker.waiting


def test_a_request_cancelled_in_its_prefill_leaves_a_reusable_cache(server):
    """The cache was kept as made for the whole prompt though it held only the chunks done:
    a retry could never move it, and forked copies of it (empty for quantized caches)."""
    from mlx_llama.sampling import SamplingParams
    from mlx_llama.server.worker import Job

    class CancelledOnThirdLook:  # the worker looks before it starts, then after each chunk
        looks = 0

        def is_set(self) -> bool:
            self.looks += 1
            return self.looks >= 3

        def set(self) -> None:
            pass

    prompt = (server.tokenizer.encode("llamas and alpacas " * 300))[:1500]
    events = []
    job = Job(id="cut", tokens=prompt, max_tokens=2, sampling=SamplingParams(),
              emit=events.append, cancelled=CancelledOnThirdLook())
    server.worker.prefix_cache.clear()
    server.worker.submit(job)
    _wait_for(lambda: events)
    server.wait_idle()
    entries = list(server.worker.prefix_cache.entries.values())
    held = len(entries[0].cache.tokens)  # one prefill chunk
    assert len(entries) == 1 and entries[0].prompt_len == held and 0 < held < len(prompt)
    assert server.worker.prefix_cache.checkout(prompt).how == "move"


def test_full_queue_gets_429_with_retry_after(server, http):
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hold the line."}],
            "max_tokens": 20, "temperature": 0, "stream": True, "logit_bias": NO_EOS}
    # The running job is held at its start until the refusal is seen: a job left to run
    # could finish first on a loaded machine, and the third request would then fit.
    gate, held = threading.Event(), threading.Event()
    run = server.worker._run

    def held_run(job, record):
        held.set()
        gate.wait(30)
        return run(job, record)

    saved = server.worker.max_queue
    server.worker.max_queue = 1
    server.worker._run = held_run
    try:
        with http.stream("POST", "/v1/chat/completions", json=body) as running:
            assert held.wait(10)
            with http.stream("POST", "/v1/chat/completions", json=body) as queued:
                assert running.status_code == queued.status_code == 200
                assert server.worker.waiting == 1
                refused = http.post("/v1/chat/completions", json={**body, "stream": False})
                assert refused.status_code == 429
                assert int(refused.headers["Retry-After"]) >= 1
                error = refused.json()["error"]
                assert error["code"] == "rate_limit_exceeded" and error["message"]
    finally:
        gate.set()
        del server.worker._run
        server.worker.max_queue = saved
    server.wait_idle()
    ok = http.post("/v1/completions", json={"model": MODEL_ID, "prompt": "ok", "max_tokens": 2})
    assert ok.status_code == 200


# ------------------------------------------------------------------------------------------
# Prefix reuse
# ------------------------------------------------------------------------------------------


def test_second_turn_reuses_the_first_turns_cache(server, client):
    kw = dict(max_tokens=10, temperature=0, logit_bias=NO_EOS)
    system = {"role": "system", "content": "You are a llama expert. " * 6}
    turn1 = [system, {"role": "user", "content": "Where do llamas live?"}]
    first = chat(client, turn1, **kw)
    turn2 = turn1 + [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "And what do they eat?"}]
    second = chat(client, turn2, **kw)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens
    record = server.record(second.id)
    assert record.cache == "move"
    assert record.cached_tokens == cached
    assert record.prefilled_tokens == second.usage.prompt_tokens - cached

    # Another conversation with the same system prompt shares only that prefix (a fork)...
    other = chat(client, [system, {"role": "user", "content": "Are alpacas llamas?"}], **kw)
    assert 0 < other.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens
    assert server.record(other.id).cache == "fork"
    # ...and the first conversation's cache is still whole for its third turn.
    turn3 = turn2 + [{"role": "assistant", "content": second.choices[0].message.content},
                     {"role": "user", "content": "Thanks."}]
    third = chat(client, turn3, **kw)
    assert third.usage.prompt_tokens_details.cached_tokens >= second.usage.prompt_tokens


def test_prefix_store_evicts_least_recently_used(chat_model_dir):
    from mlx_llama.loading import load_model
    from mlx_llama.tokenizer import load_tokenizer

    model, _ = load_model(chat_model_dir)
    tok = load_tokenizer(chat_model_dir)

    def filled(prompt: str) -> PromptCache:
        cache = PromptCache(model.make_cache)
        list(stream_generate(model, tok, tok.encode(prompt), 3, temperature=0, cache=cache))
        return cache

    a, b, c = filled("alpha " * 20), filled("beta " * 20), filled("gamma " * 20)
    unshrunk = allocated_bytes(a)
    store = PrefixCacheStore(model.make_cache, budget_bytes=10 * unshrunk)
    store.checkin(a, 20)  # a short prompt gives back its unused block capacity
    size = allocated_bytes(a)
    assert size == a.nbytes and 2 * size < unshrunk
    store = PrefixCacheStore(model.make_cache, budget_bytes=2 * size)
    store.checkin(a, 20)
    store.checkin(b, 20)
    assert len(store) == 2
    hit = store.checkout(tok.encode("alpha " * 20 + "more"))  # a moves out, then comes back
    assert hit.how == "move" and hit.cache is a
    store.checkin(a, 20)
    store.checkin(c, 20)  # over budget: b is now the least recently used
    assert len(store) == 2 and store.nbytes <= 2 * size
    assert all(entry.cache is not b for entry in store.entries.values())
    assert store.checkout(tok.encode("beta " * 20)).matched <= 1  # at most the BOS, via a
    assert PrefixCacheStore(model.make_cache, 0).checkout([1, 2, 3]).how == "miss"
    # A shrunk cache continues exactly as the unshrunk one would.
    more = tok.encode("alpha " * 20 + "and more alpha")
    shrunk, whole = filled("alpha " * 20), filled("alpha " * 20)
    for layer in shrunk.layers:
        layer.shrink()
    texts = ["".join(r.text for r in stream_generate(model, tok, more, 8, temperature=0,
                                                     cache=cache)) for cache in (shrunk, whole)]
    assert texts[0] == texts[1]


def test_a_repeated_prompt_moves_its_own_entry_rather_than_forking_a_longer_one():
    """On a tie the oldest entry won, often one made for a longer prompt, so a repeat was
    forked (a copy; for quantized caches an empty one) and identical copies piled up."""
    from mlx_llama.cache import KVCache

    def entry(tokens: list[int]) -> PromptCache:
        cache = PromptCache(lambda: [KVCache()])
        cache.tokens = list(tokens)
        return cache

    base = list(range(1, 301))
    store = PrefixCacheStore(lambda: [KVCache()], budget_bytes=1 << 20)
    store.checkin(entry(base + [7, 8]), 300)  # the longer prompt, older
    store.checkin(entry(base[:256] + [9, 9]), 256)  # the repeat's own entry, newer
    older, newer = store.entries.values()
    out = store.checkout(base[:256] + [5])
    assert out.how == "move" and out.matched == 256 and out.cache is newer.cache
    assert [e.cache for e in store.entries.values()] == [older.cache]


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------

GOOD_CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}]}
BAD_REQUESTS = [
    # (description, path, body (dict, or bytes sent raw), status, param)
    ("malformed JSON", "/v1/chat/completions", b'{"model": "tiny-chat", "messages": [', 400, None),
    ("not an object", "/v1/chat/completions", b"[1, 2, 3]", 400, None),
    ("empty body", "/v1/completions", b"", 400, None),
    ("unknown field", "/v1/chat/completions", {**GOOD_CHAT, "tools": []}, 400, "tools"),
    ("wrong type", "/v1/chat/completions", {**GOOD_CHAT, "temperature": "hot"}, 400,
     "temperature"),
    ("string number", "/v1/chat/completions", {**GOOD_CHAT, "max_tokens": "5"}, 400,
     "max_tokens"),
    ("missing messages", "/v1/chat/completions", {"model": MODEL_ID}, 400, "messages"),
    ("bad role", "/v1/chat/completions",
     {**GOOD_CHAT, "messages": [{"role": "llama", "content": "x"}]}, 400, "messages.0.role"),
    ("max_tokens zero", "/v1/chat/completions", {**GOOD_CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens too big", "/v1/chat/completions", {**GOOD_CHAT, "max_tokens": 10**6}, 400,
     "max_tokens"),
    ("prompt too long", "/v1/completions",
     {"model": MODEL_ID, "prompt": "llama " * 9000}, 400, "prompt"),
    ("wrong model", "/v1/chat/completions", {**GOOD_CHAT, "model": "gpt-4o"}, 404, "model"),
    ("unencodable model", "/v1/chat/completions",  # a lone surrogate made the message a 500
     b'{"model": "\\ud800", "messages": [{"role": "user", "content": "Hi"}]}', 404, "model"),
    ("n=2", "/v1/chat/completions", {**GOOD_CHAT, "n": 2}, 400, "n"),
    ("top_p out of range", "/v1/chat/completions", {**GOOD_CHAT, "top_p": 1.5}, 400, "top_p"),
    ("logit_bias token", "/v1/chat/completions", {**GOOD_CHAT, "logit_bias": {"99999": 1}}, 400,
     "logit_bias"),
    ("token id outside the vocabulary", "/v1/completions",
     {"model": MODEL_ID, "prompt": [1, 10**7]}, 400, "prompt"),
    ("batched prompts", "/v1/completions", {"model": MODEL_ID, "prompt": ["a", "b"]}, 400,
     "prompt"),
    ("echo", "/v1/completions", {"model": MODEL_ID, "prompt": "a", "echo": True}, 400, "echo"),
    ("image part", "/v1/chat/completions", {**GOOD_CHAT, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages.0.content.0.type"),
    ("stream_options without stream", "/v1/chat/completions",  # accepted silently; OpenAI: 400
     {**GOOD_CHAT, "stream_options": {"include_usage": True}}, 400, "stream_options"),
]


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "\n" not in error["message"]
    return error


@pytest.mark.parametrize("what,path,body,status,param", BAD_REQUESTS,
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_gets_status_and_error_json(http, what, path, body, status, param):
    if isinstance(body, bytes):
        response = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        response = http.post(path, json=body)
    error = assert_openai_error(response, status)
    assert error["param"] == param


def test_a_key_that_is_not_text_is_named_as_the_request(http):
    """The message read "invalid 'None': ..." (no field to name)."""
    body = b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}], "\\ud800": 1}'
    response = http.post("/v1/chat/completions", content=body,
                         headers={"Content-Type": "application/json"})
    error = assert_openai_error(response, 400)
    assert error["message"].startswith("invalid request: ") and "None" not in error["message"]


def test_health_answers_head_for_probes(server):
    assert httpx.head(f"{server.url}/health").status_code == 200  # was 405


def test_too_many_stop_strings_says_the_limit(http):
    response = http.post("/v1/chat/completions", json={**GOOD_CHAT, "stop": ["a"] * 17})
    error = assert_openai_error(response, 400)
    assert error["param"] == "stop" and "at most 16 stop strings" in error["message"]


def test_api_key_required_except_health(server):
    no_key = httpx.post(f"{server.url}/v1/chat/completions", json=GOOD_CHAT)
    assert assert_openai_error(no_key, 401)["code"] == "invalid_api_key"
    wrong = httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer nope"})
    assert_openai_error(wrong, 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_unknown_route_and_method(http):
    assert_openai_error(http.get("/v1/engines"), 404)
    assert_openai_error(http.get("/v1/chat/completions"), 405)


def _random_bad_request(rng: random.Random) -> tuple[str, bytes]:
    path = rng.choice(["/v1/chat/completions", "/v1/completions"])
    base = dict(GOOD_CHAT) if "chat" in path else {"model": MODEL_ID, "prompt": "Hi"}
    base["max_tokens"] = 4  # a mutation that stays valid must not run for the whole context
    kind = rng.randrange(5)
    if kind == 0:  # truncated or garbled JSON
        raw = json.dumps(base).encode()
        raw = raw[: rng.randrange(len(raw))] + bytes(rng.randrange(256) for _ in range(3))
        return path, raw
    if kind == 1:  # a wrong type in a known field
        field = rng.choice(["max_tokens", "temperature", "top_p", "seed", "stop", "stream",
                            "logit_bias", "n", "model", "presence_penalty", "top_k"])
        values = ["x", [1, {}], {"a": None}, True, 1.5, -7, 10**30]
        base[field] = rng.choice(values + ([] if field == "max_tokens" else [None]))
    elif kind == 2:  # an unknown field
        base["".join(rng.choice("abcxyz_") for _ in range(6))] = rng.random()
    elif kind == 3:  # out-of-range numbers
        field = rng.choice(["max_tokens", "temperature", "top_p", "frequency_penalty", "min_p"])
        base[field] = rng.choice([-1, 0, 3, 1e9, -1e9])
    else:  # structurally wrong messages or prompt
        key = "messages" if "chat" in path else "prompt"
        base[key] = rng.choice([[], {}, 5, [None], [{"role": "user"}], [[1, "a"]],
                                [{"content": "x"}], [-3]])
    return path, json.dumps(base).encode()


def test_server_survives_random_malformed_requests(server, http):
    kw = dict(max_tokens=8, temperature=0, logit_bias=NO_EOS)
    client = server.client()
    before = chat(client, "Still there?", **kw).choices[0].message.content
    rng = random.Random(2024)
    statuses, valid = set(), 0
    for _ in range(200):
        path, raw = _random_bad_request(rng)
        response = http.post(path, content=raw, headers={"Content-Type": "application/json"})
        if response.status_code == 200:  # a mutation that happened to stay valid
            valid += 1
            continue
        statuses.add(response.status_code)
        assert_openai_error(response, response.status_code)
        assert 400 <= response.status_code < 500, response.text
    assert 400 in statuses and valid < 50
    assert chat(client, "Still there?", **kw).choices[0].message.content == before
    server.wait_idle()  # nothing left running or queued by the bad requests


# ------------------------------------------------------------------------------------------
# Logs
# ------------------------------------------------------------------------------------------


def test_one_log_line_per_request(client, caplog):
    with caplog.at_level(logging.INFO, logger="mlx_llama.server"):
        reply = chat(client, "Log me.", max_tokens=3, temperature=0, logit_bias=NO_EOS)
    lines = [r.getMessage() for r in caplog.records if reply.id in r.getMessage()]
    assert len(lines) == 1
    line = lines[0]
    for part in ("status=200", "in=", "out=3", "cached=", "prefill=", "decode=", "tok/s",
                 "cache="):
        assert part in line


def test_undeclared_body_length_is_counted(server):
    """Transfer-Encoding: chunked has no Content-Length; the cap still holds, and a body under
    it reaches the app whole (then the client's disconnect still arrives)."""
    import asyncio

    from mlx_llama.server.gate import GateMiddleware

    seen = {}

    async def app(scope, receive, send):
        seen["body"] = (await receive())["body"]
        seen["next"] = (await receive())["type"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def call(chunks):
        messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                    for i, c in enumerate(chunks)] + [{"type": "http.disconnect"}]
        sent = []

        async def receive():
            return messages.pop(0)

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
        asyncio.run(GateMiddleware(app, None, max_body_bytes=100)(scope, receive, send))
        return sent[0]["status"]

    assert call([b"x" * 60, b"y" * 60]) == 413 and "body" not in seen
    seen.clear()
    gone = [{"type": "http.request", "body": b"x", "more_body": True}, {"type": "http.disconnect"}]
    sent = []

    async def receive_then_leave():
        return gone.pop(0)

    async def record(message):
        sent.append(message)

    asyncio.run(GateMiddleware(app, None, max_body_bytes=100)(
        {"type": "http", "method": "POST", "path": "/", "headers": []}, receive_then_leave, record))
    assert sent == [] and seen == {}  # a client gone mid-body: no answer, the app never runs
    assert call([b"x" * 60, b"y" * 40]) == 200
    assert seen == {"body": b"x" * 60 + b"y" * 40, "next": "http.disconnect"}
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  b"\r\nTransfer-Encoding: chunked\r\nAuthorization: Bearer " + API_KEY.encode()
                  + b"\r\n\r\n")
        chunk = b"x" * (1 << 20)
        reply = b""
        try:
            for _ in range(40):  # 40 MiB, over the 32 MiB cap
                s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused mid-upload: the reply is already there
        while b"}}" not in reply:
            more = s.recv(65536)
            if not more:
                break
            reply += more
    assert reply.startswith(b"HTTP/1.1 413") and b'"request_too_large"' in reply


def test_browsers_on_this_machine_may_call_it(server):
    """CORS: pages served from localhost get the headers (preflight too, before the API key
    gate, and on the gate's own 401); other origins do not unless --allowed-origin names them."""
    preflight = {"Access-Control-Request-Method": "POST",  # what the OpenAI JS SDK asks
                 "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os,"
                                                   "x-stainless-retry-count"}
    url = f"{server.url}/v1/chat/completions"
    local = httpx.options(url, headers={"Origin": "http://localhost:3000", **preflight})
    assert local.status_code == 200
    assert local.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "x-stainless-os" in local.headers["access-control-allow-headers"].lower()
    foreign = httpx.options(url, headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in foreign.headers
    refused = httpx.post(url, json=GOOD_CHAT, headers={"Origin": "http://127.0.0.1:5173"})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == "http://127.0.0.1:5173"
    named = create_app(server.worker, server.tokenizer, model_id=MODEL_ID,
                       allowed_origins=["https://app.example"])
    from starlette.testclient import TestClient

    with TestClient(named) as c:
        ok = c.options("/v1/models", headers={"Origin": "https://app.example",
                                              "Access-Control-Request-Method": "GET"})
        assert ok.headers["access-control-allow-origin"] == "https://app.example"


def test_fields_that_ask_for_nothing_are_accepted(client, http, server):
    """What SDKs send by default (plain text, no tools) works; the modes that would change the
    answer are refused in one line."""
    body = {**GOOD_CHAT, "max_tokens": 2, "response_format": {"type": "text"},
            "tool_choice": "none", "parallel_tool_calls": False, "top_p": 0}
    assert http.post("/v1/chat/completions", json=body).status_code == 200
    for field, value in (("response_format", {"type": "json_object"}), ("tool_choice", "required")):
        error = assert_openai_error(
            http.post("/v1/chat/completions", json={**GOOD_CHAT, field: value}), 400)
        assert error["param"] == field and "not supported" in error["message"]


def test_developer_role_and_tool_call_history(http):
    def prompt_tokens(messages):
        r = http.post("/v1/chat/completions", json={**GOOD_CHAT, "messages": messages,
                                                    "max_tokens": 1})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]

    user = {"role": "user", "content": "Hi"}
    assert (prompt_tokens([{"role": "developer", "content": "Be brief."}, user])
            == prompt_tokens([{"role": "system", "content": "Be brief."}, user]))
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"id": "c1", "type": "function",
                            "function": {"name": "f", "arguments": "{}"}}]}
    assert prompt_tokens([user, call, user]) > 0
    error = assert_openai_error(http.post("/v1/chat/completions", json={
        **GOOD_CHAT, "messages": [{"role": "user"}]}), 400)
    assert "has no 'content'" in error["message"]


def test_text_far_over_the_context_is_refused_before_tokenizing(server, http, monkeypatch):
    ctx = app_context(server)
    limit = 2 * server.worker.context_length * ctx.longest_token
    assert 1 < ctx.longest_token < 100
    calls = []
    monkeypatch.setattr(ctx.tokenizer, "encode", lambda *a, **k: calls.append(1) or [1])
    for path, body in (("/v1/completions", {"model": MODEL_ID, "prompt": "x" * (limit + 1)}),
                       ("/v1/chat/completions", {**GOOD_CHAT, "messages": [
                           {"role": "user", "content": "x" * (limit + 1)}]})):
        error = assert_openai_error(http.post(path, json=body), 400)
        assert error["code"] == "context_length_exceeded" and "characters" in error["message"]
    assert calls == []


def app_context(server):
    return server.server.config.app.state.ctx


def test_an_empty_body_is_named(http):
    error = assert_openai_error(http.post("/v1/completions", content=b"",
                                          headers={"Content-Type": "application/json"}), 400)
    assert error["message"] == "the request body is empty: send a JSON object"


def test_declared_oversized_body_gets_413(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + API_KEY.encode() +
                  b"\r\nContent-Length: 999999999\r\n\r\n")
        reply = b""
        while b"}}" not in reply:  # headers and body may come in separate packets
            more = s.recv(65536)
            if not more:
                break
            reply += more
    text = reply.decode("latin-1")
    assert text.startswith("HTTP/1.1 413")
    assert '"request_too_large"' in text


# ------------------------------------------------------------------------------------------
# The command line: `python -m mlx_llama.server` (what `mlx-llama serve` runs)
# ------------------------------------------------------------------------------------------


def serve_process(model_dir: Path, *flags: str, env: dict | None = None):
    """`python -m mlx_llama.server` on a free loopback port, once it answers /health:
    (process, base url)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_llama.server", "-m", str(model_dir), "--port", str(port),
         "--log-level", "warning", *flags],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read())
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("server did not come up")
        time.sleep(0.1)


def test_serve_command_with_api_key_from_environment(chat_model_dir, tmp_path):
    env = {**os.environ, "MLX_LLAMA_API_KEY": "env-key"}
    proc, url = serve_process(chat_model_dir, "--model-name", "served", env=env)
    try:
        assert httpx.get(f"{url}/v1/models").status_code == 401
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="env-key", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["served"]
        reply = client.completions.create(model="served", prompt="Llamas", max_tokens=3,
                                          temperature=0, logit_bias=NO_EOS)
        assert reply.usage.completion_tokens == 3
        # A second server on the same port fails with one line, before loading the model.
        busy = subprocess.run(
            [sys.executable, "-m", "mlx_llama.server", "-m", str(chat_model_dir), "--port",
             url.rsplit(":", 1)[1]], env=env, capture_output=True, text=True, timeout=60)
        assert busy.returncode == 1
        assert busy.stderr.strip().startswith("error: cannot listen on")
        assert len(busy.stderr.strip().splitlines()) == 1
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_exiting_ends_a_running_stream_at_once(chat_model_dir, signum):
    """Ctrl-C / SIGTERM let a running stream generate to its end (minutes for a long reply)
    before the server exited: uvicorn waits for open connections before the app's shutdown."""
    proc, url = serve_process(chat_model_dir)
    try:
        body = {"model": "tiny-chat", "prompt": "Llamas", "max_tokens": 6000, "stream": True,
                "logit_bias": NO_EOS}
        lines = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as reply:
            for line in reply.iter_lines():
                lines.append(line)
                if len(lines) == 3:  # generating now
                    sent = time.monotonic()
                    os.kill(proc.pid, signum)
        ended = time.monotonic() - sent
        # uvicorn re-raises the signal once it has shut down: the usual exit status for it
        # (a hang-up is shut down as a SIGTERM: uvicorn knows only SIGINT and SIGTERM)
        assert proc.wait(30) == (130 if signum == signal.SIGINT else -signal.SIGTERM)
        events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        assert [x for x in lines if x][-1] == "data: [DONE]", lines[-3:]
        assert events[-1]["error"]["message"] == "the server is shutting down; retry later"
        assert events[-1]["error"]["code"] == "service_unavailable"
        assert ended < 10 and len(events) < 1000, (ended, len(events))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_a_job_queued_as_the_shutdown_begins_is_told(chat_model_dir):
    """A shutdown signal landing inside submit() (the loop's thread, between two bytecodes)
    could leave a job queued that the worker then never answered: its client, and with it
    uvicorn's shutdown, waited forever."""
    from mlx_llama.sampling import SamplingParams
    from mlx_llama.server.worker import Failed, Job, JobRecord, ShuttingDown
    from mlx_llama.tokenizer import load_tokenizer

    worker = GenerationWorker(load_model_fn(chat_model_dir), load_tokenizer(chat_model_dir)).start()
    events = []
    job = Job(id="late", tokens=[1, 2, 3], max_tokens=2, sampling=SamplingParams(),
              emit=events.append)
    with worker._cond:  # what the interleaving leaves: stopping, and the job queued after
        worker._stopping = True
        worker._queue.append(job)
        worker._pending[job.id] = JobRecord(job.id, 3)
        worker._cond.notify_all()
    worker._thread.join(10)
    assert not worker._thread.is_alive()
    assert len(events) == 1 and isinstance(events[0], Failed)
    assert isinstance(events[0].error, ShuttingDown)


def test_a_load_error_is_raised_only_once_the_worker_thread_has_ended(chat_model_dir,
                                                                     monkeypatch):
    """The process exiting while the worker thread still clears its MLX streams aborted it
    (exit 134, about one run in six); slow the clearing down to make the race certain."""
    from mlx_llama.errors import MlxLlamaError
    from mlx_llama.server import worker as worker_module
    from mlx_llama.tokenizer import load_tokenizer

    clear = getattr(worker_module.mx, "clear_streams", lambda: None)
    monkeypatch.setattr(worker_module.mx, "clear_streams", lambda: (time.sleep(0.5), clear()),
                        raising=False)
    worker = GenerationWorker(load_model_fn(chat_model_dir), load_tokenizer(chat_model_dir),
                              cache_kind=("quantized", {"bits": 4, "group_size": 32}))
    with pytest.raises(MlxLlamaError, match="does not divide the model's head size"):
        worker.start()
    assert not worker._thread.is_alive()


def test_a_cache_option_the_model_cannot_take_is_one_line_and_exit_1(chat_model_dir):
    """The message was right, then the process aborted (exit 134): the worker thread kept the
    model's arrays past the end of its MLX streams."""
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = subprocess.run(
        [sys.executable, "-m", "mlx_llama.server", "-m", str(chat_model_dir), "--port", str(port),
         "--kv-bits", "4", "--kv-group-size", "32"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "group" in lines[0], lines


@pytest.mark.parametrize("kind, options", [("quantized", {"bits": 8, "group_size": 32}),
                                           ("rotating", {"max_size": 256})])
def test_server_uses_the_chosen_kv_cache_kind(tmp_path, sp_model_file, kind, options):
    """`serve --kv-bits/--max-kv-size` reach every request's cache, prefix reuse included."""
    folder = make_hf_checkpoint(tmp_path / "hd32", sp_model_file, seed=5,
                                num_attention_heads=2, num_key_value_heads=1)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    running = RunningServer(folder, cache_kind=(kind, options))
    try:
        client = running.client()
        kw = dict(max_tokens=6, temperature=0, logit_bias=NO_EOS)
        turn1 = [{"role": "user", "content": "Where do llamas live?"}]
        first = chat(client, turn1, **kw)
        assert first.choices[0].message.content
        turn2 = turn1 + [{"role": "assistant", "content": first.choices[0].message.content},
                         {"role": "user", "content": "And what do they eat?"}]
        second = chat(client, turn2, **kw)
        assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
        assert {c.kind for c in running.worker.prefix_cache.make_layers()} == {kind}
    finally:
        running.close()


def test_cached_memory_is_released_after_each_request(server, client):
    """MLX keeps freed buffers for reuse; between requests the worker hands them back, so an
    idle server holds its weights and prefix cache only."""
    import mlx.core as mx

    reply = chat(client, "Hello there", max_tokens=8, temperature=0)
    assert server.record(reply.id).finished_at is not None  # filed after the release
    assert mx.get_cache_memory() == 0


def release(tokenizer, ids, stop):
    """What stream_generate sends per token (its detokenizer, then its stop-string hold)."""
    from mlx_llama.generate import StopStrings

    detok, stops, out = tokenizer.detokenizer(), StopStrings([stop] if stop else []), []
    for n, token in enumerate(ids, start=1):
        text, hit = stops.feed(detok.add_token(token))
        if hit or n == len(ids):
            tail, hit2 = ("", True) if hit else stops.feed(detok.finalize())
            out.append((text + tail + ("" if hit or hit2 else stops.flush()), True))
            return out
        out.append((text, False))


@pytest.mark.parametrize("tok_dir, text, stop", [
    ("llama3_dir", "안녕 하세요 llamas", None),  # a byte-level token spans two characters
    ("llama3_dir", "Hello llamas and alpacas", "amas and"),  # a stop cut inside a token
    ("llama2_dir", "Hello llamas 🦙 and alpacas", "lpa"),  # SentencePiece: space dropped; bytes
    ("smol_dir", "Llamas 🦙🦙 are calm, naïve", "e ca"),
])
def test_logprob_aligner_never_runs_ahead_and_covers_what_was_sent(request, tok_dir, text, stop):
    from mlx_llama.server.worker import LogprobAligner, TokenLogprob
    from mlx_llama.tokenizer import load_tokenizer

    tok = load_tokenizer(request.getfixturevalue(tok_dir))
    ids = tok.encode(text, add_special_tokens=False) + [min(tok.eos_token_ids)]
    sent = release(tok, ids, stop)
    aligner, content, items = LogprobAligner(tok), "", []
    for token, (piece, last) in zip(ids, sent):
        lp = TokenLogprob(token=str(token), logprob=0.0, bytes=list(tok.token_bytes(token)), top=[])
        items += aligner.add(token, lp, piece, last)
        content += piece
        if not last:  # (SentencePiece's decoder drops the first word-initial space)
            so_far = b"".join(bytes(i.bytes) for i in items)
            assert content.encode().startswith(so_far.removeprefix(b" ")), (content, items)
    spelled = b"".join(bytes(i.bytes) for i in items).decode("utf-8", "replace").lstrip(" ")
    assert content == (text[: text.find(stop)] if stop else text)
    assert spelled.startswith(content) and all(int(i.token) not in tok.all_special_ids for i in items)
    if stop:  # the tokens wholly inside the stop string are left out
        assert len(spelled) < len(content) + len(stop)
    else:
        assert spelled == content


def test_the_process_exits_cleanly_after_the_worker_has_generated(smollm2_mlx):
    """MLX aborted the process at exit ("terminate called without an active exception") once
    the worker thread had generated on split matmuls (SmolLM2's layers are big enough to be
    split; the tiny test models' are not) and ended, unless that thread destroys its
    streams before it ends."""
    chat_model_dir = smollm2_mlx
    code = f"""
from fastapi.testclient import TestClient
from mlx_llama.server.app import create_app
from mlx_llama.server.worker import GenerationWorker, load_model_fn
from mlx_llama.tokenizer import load_tokenizer
tok = load_tokenizer({str(chat_model_dir)!r})
worker = GenerationWorker(load_model_fn({str(chat_model_dir)!r}), tok).start()
reply = TestClient(create_app(worker, tok, model_id="m")).post("/v1/chat/completions", json={{
    "model": "m", "messages": [{{"role": "user", "content": "hi"}}], "max_tokens": 3}})
assert reply.status_code == 200, reply.text
worker.stop()
print("ok")
"""
    for _ in range(3):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                timeout=120, env={**os.environ, "MLX_LLAMA_CPU_STREAMS": "2"})
        assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_prefix_store_counts_a_quantized_cache_still_in_full_precision():
    """Before `quantized_kv_start` a quantized cache holds a plain block-growing cache: it was
    budgeted by the tokens held (not its 256-token blocks) and never gave the blocks back."""
    import mlx.core as mx

    from mlx_llama.cache import QuantizedKVCache

    def make():
        return [QuantizedKVCache(bits=8, group_size=32, start=512) for _ in range(2)]

    cache = PromptCache(make)
    for layer in cache.layers:
        keys = mx.random.normal((1, 2, 20, 32))
        layer.update_and_fetch(keys, keys)
    cache.tokens = list(range(20))
    assert cache.layers[0]._plain.keys.shape[2] == 256  # still one plain block
    block_bytes = allocated_bytes(cache)
    assert block_bytes == sum(2 * layer._plain.keys.nbytes for layer in cache.layers)
    assert block_bytes > 4 * cache.nbytes
    store = PrefixCacheStore(make, budget_bytes=10 * block_bytes)
    store.checkin(cache, 20)  # given back on the way in
    assert allocated_bytes(cache) == cache.nbytes == store.nbytes


def test_impossible_tokens_get_a_json_number_as_logprob(chat_model_dir):
    """A -inf or NaN log-probability made the reply a 500 ('Out of range float values are
    not JSON compliant') and a streamed chunk's logprob null."""
    import math
    import types

    import mlx.core as mx

    from mlx_llama.tokenizer import load_tokenizer

    fake = types.SimpleNamespace(tokenizer=load_tokenizer(chat_model_dir))
    logprobs = mx.array([0.0, -math.inf, math.nan, -1.0] + [-math.inf] * 60)
    item = GenerationWorker._logprob(fake, 1, logprobs, 3)
    values = [item.logprob] + [value for _, value, _ in item.top]
    assert all(math.isfinite(v) for v in values) and item.logprob == -9999.0
    json.dumps(values, allow_nan=False)


def test_a_json_body_sent_as_a_form_is_read_as_json_except_from_web_pages(http):
    """`curl -d @body.json` (a form Content-Type) or no Content-Type was refused; llama.cpp,
    Ollama and mlx-lm read the body as JSON. A web page can send such a POST cross-origin
    without a preflight, so from pages (an Origin header) JSON stays required."""
    body = json.dumps({**GOOD_CHAT, "max_tokens": 2, "logit_bias": NO_EOS})
    for headers in ({"Content-Type": "application/x-www-form-urlencoded"},
                    {"Content-Type": "text/plain"}, {}):
        reply = http.post("/v1/chat/completions", content=body, headers=headers)
        assert reply.status_code == 200, (headers, reply.text)
        assert reply.json()["usage"]["completion_tokens"] == 2
    page = http.post("/v1/chat/completions", content=body,
                     headers={"Content-Type": "text/plain", "Origin": "http://localhost:3000"})
    assert page.status_code == 400 and "Content-Type: application/json" in page.text
