"""What every request passes before a route sees it (a pure ASGI middleware, so it holds under
uvicorn and under Ray Serve alike): the body-size limit and the optional API key.

- Body size: a ``Content-Length`` over the limit is answered 413 before the body is read; a body
  sent without one (chunked) is counted as it arrives, cut at the limit, and whatever the route
  then answers is replaced by the 413.
- API key: where the server has one, every route but the page (``/``, ``/page/...``), ``/healthz``
  and an image by its id (``GET /v1/images/ID``: the 128-bit random id is the capability) needs
  ``Authorization: Bearer KEY``, or the page's ``sdinfer_key`` cookie (``SameSite=Strict``, set by
  the page when the user types the key: an ``EventSource`` cannot send a header).  Without it: 401
  with ``WWW-Authenticate: Bearer``.  Keys are compared in constant time."""

from __future__ import annotations

import hmac
import json
import re
from http.cookies import CookieError, SimpleCookie
from urllib.parse import unquote

OPEN_PATHS = re.compile(r"^/(|healthz|favicon\.ico|page/.*)$")
IMAGE_PATH = re.compile(r"^/v1/images/[0-9a-f]{32}$")
COOKIE = "sdinfer_key"


def error_body(message: str, kind: str, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": None}}).encode()


class Guard:
    """``Guard(app, max_body_bytes, api_key=None)``."""

    def __init__(self, app, max_body_bytes: int, api_key: str | None = None):
        self.app, self.max_body, self.api_key = app, int(max_body_bytes), api_key or None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        if self.api_key and not self._open(scope) and not self._authorized(headers):
            return await _answer(send, 401, error_body(
                "this server needs an API key: send the header Authorization: Bearer KEY (the page asks for "
                "it); ask the server's operator for the key", "authentication_error"),
                [(b"www-authenticate", b'Bearer realm="sdinfer"')])
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await _answer(send, 413, self._too_large())

        received, over, started = 0, False, False

        async def counted():
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    over = True
                    return {"type": "http.request", "body": b"", "more_body": False}
            return message

        async def checked_send(message):
            nonlocal started
            if over:
                if not started and message["type"] == "http.response.start":
                    started = True
                    await _answer(send, 413, self._too_large())
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counted, checked_send)

    def _too_large(self) -> bytes:
        return error_body(f"the request body is larger than {self.max_body} bytes; a generation request is a "
                          "small JSON object (shorten the prompt)", "invalid_request_error", "body")

    def _open(self, scope) -> bool:
        path, method = scope.get("path", ""), scope.get("method", "GET")
        return bool(OPEN_PATHS.match(path)) or (method in ("GET", "HEAD") and bool(IMAGE_PATH.match(path)))

    def _authorized(self, headers: dict) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and _same(token.strip(), self.api_key):
            return True
        try:
            cookie = SimpleCookie(headers.get("cookie", ""))
        except CookieError:
            return False
        return COOKIE in cookie and _same(unquote(cookie[COOKIE].value), self.api_key)


def _same(given: str, key: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "replace"), key.encode("utf-8"))


async def _answer(send, status: int, body: bytes, extra: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(extra or [])]})
    await send({"type": "http.response.body", "body": body})
