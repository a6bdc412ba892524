"""What every request passes before anything parses it: the API key, the body's size, and
(outside both) which web origins a browser may call from."""

from __future__ import annotations

import hmac
import logging

from .http_errors import error_json

log = logging.getLogger("mlx_llama.server")

MAX_BODY_BYTES = 32 << 20
OPEN_PATHS = frozenset({"/health"})  # reachable without the API key

# Browser pages on this machine may call the server by default (as Ollama allows); other
# origins only when named, since any web page a user visits could otherwise use the model.
LOCAL_ORIGINS = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?"


class GateMiddleware:
    """Refuses requests without the right `Authorization: Bearer` key (401), and bodies
    larger than `max_body_bytes` (413: declared so, or counted when no length is declared),
    before any JSON is parsed."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        refusal = None
        if self.api_key is not None and scope.get("path") not in OPEN_PATHS:
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode("latin-1"), self.api_key
            ):
                what = "wrong" if token else "missing"
                refusal = error_json(
                    401, f"{what} API key: send 'Authorization: Bearer <key>' with the key "
                    "the server was started with (--api-key or MLX_LLAMA_API_KEY)",
                    code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if refusal is None and length is not None and (
                not length.isdigit() or int(length) > self.max_body_bytes):
            refusal = self.too_large()
        if refusal is None and length is None:
            # No declared length (Transfer-Encoding: chunked): count the bytes as they come,
            # then hand the app the body it would have read anyway.
            body = await self.read_capped(receive)
            if body is CLIENT_GONE:
                return None
            if body is None:
                refusal = self.too_large()
            else:
                receive = replay(body, receive)
        if refusal is not None:
            log.info("- %s %s status=%d", scope.get("method"), scope.get("path"),
                     refusal.status_code)
            return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)

    def too_large(self):
        return error_json(413, f"the request body is larger than {self.max_body_bytes} bytes: "
                          "send a shorter prompt", code="request_too_large")

    async def read_capped(self, receive):
        """The whole body, None as soon as it passes `max_body_bytes`, or CLIENT_GONE if the
        client leaves before sending all of it (nothing to answer then)."""
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left mid-body
                return CLIENT_GONE
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                return None
            if not message.get("more_body", False):
                return bytes(body)


CLIENT_GONE = object()


def replay(body: bytes, receive):
    """An ASGI `receive` that gives `body` first, then whatever the client sends next (the
    disconnect the streaming handlers watch for)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive_again():
        return pending.pop() if pending else await receive()

    return receive_again


class JsonBodyByDefault:
    """Reads a POST body as JSON whatever its Content-Type says, as llama.cpp, Ollama and
    mlx-lm do (`curl -d @body.json` sends it as a form), but only for callers that are not
    browsers (no `Origin` header): a web page may send a form or text/plain POST to any
    origin without a CORS preflight, so for pages JSON stays required, and with it the
    preflight that CORS checks."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST":
            headers = scope.get("headers") or []
            names = {name.lower() for name, _ in headers}
            declared = dict(headers).get(b"content-type", b"").split(b";")[0].strip().lower()
            if b"origin" not in names and not declared.endswith(b"json"):
                headers = [(n, v) for n, v in headers if n.lower() != b"content-type"]
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)
