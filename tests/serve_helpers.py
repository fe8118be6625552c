"""Helpers of the server tests: a real ``sdinfer serve`` in a subprocess on a free loopback
port (``ServerProcess``), or the app under uvicorn in a thread of the test process
(``ThreadServer``), and small HTTP calls with the standard library."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
from serve_load import Server, free_port  # noqa: E402  (the load generator's server process and port)


def call(base: str, path: str, body=None, method=None, timeout: float = 120.0):
    """(status, headers, parsed JSON or raw bytes)."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(base + path, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"Content-Type": "application/json"} if data is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as res:
            status, headers, raw = res.status, dict(res.headers), res.read()
    except urllib.error.HTTPError as err:
        status, headers, raw = err.code, dict(err.headers), err.read()
    kind = headers.get("content-type", headers.get("Content-Type", ""))
    return status, headers, json.loads(raw) if "json" in kind else raw


def wait_healthy(base: str, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if call(base, "/healthz", timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{base}/healthz did not answer in {timeout} s")


class ServerProcess(Server):
    """``python -m sdinfer serve --model unet ...`` on a free port (bench/serve_load.py's ``Server``);
    ``stop()`` (SIGTERM) or ``kill()`` (SIGKILL)."""

    def __init__(self, store: Path, *flags: str, env: dict | None = None):
        super().__init__(store, ["--model", "unet", *flags], start_timeout=120.0,
                         env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})})


class ThreadServer:
    """An app under uvicorn in a daemon thread of this process."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_healthy(self.base, timeout=30)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
