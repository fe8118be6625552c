"""Helpers of the server tests: a real ``sdinfer serve`` in a subprocess on a free loopback
port (``ServerProcess``), or the app under uvicorn in a thread of the test process
(``ThreadServer``), and small HTTP calls with the standard library."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

SRC = Path(__file__).parents[1] / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _tail(proc) -> str:
    """The end of a server's stderr (a file, never a pipe that a chatty server could fill)."""
    log = getattr(proc, "log", None)
    if log is None:
        return ""
    log.seek(0)
    return log.read().decode(errors="replace")[-2000:]


def wait_healthy(base: str, timeout: float = 120.0, proc=None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {_tail(proc)}")
        try:
            if call(base, "/healthz", timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{base}/healthz did not answer in {timeout} s")


class ServerProcess:
    """``python -m sdinfer serve ...`` on a free port; ``stop()`` (SIGTERM) or ``kill()`` (SIGKILL)."""

    def __init__(self, store: Path, *flags: str):
        self.store, self.flags = store, flags
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "sdinfer", "serve", "--model", "unet",
                                      "--port", str(self.port), "--store", str(store), *flags],
                                     env=env, stdout=subprocess.DEVNULL, stderr=self.log)
        self.proc.log = self.log
        try:
            wait_healthy(self.base, proc=self.proc)
        except BaseException:
            self.kill()
            raise

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


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
