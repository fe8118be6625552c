"""A bounded load generator for ``sdinfer serve`` on this machine (loopback only).

    python bench/serve_load.py --start --requests 500 --concurrency 16 --steps 10 --json load.json
    python bench/serve_load.py --start --requests 500 --concurrency 16 --kill-after 200   # SIGKILL mid-load
    python bench/serve_load.py --url http://127.0.0.1:8000 --requests 100 --concurrency 4

Sends N generation requests (prompts from a prompt set, seed = request index) from C threads
and reports p50 / p95 latency of the answered ones, throughput, the refusals by status, the
connection errors, and the *lost* requests: answered 200 but their image is not in the store
(``GET /v1/images`` and each PNG fetched and decoded) when the run ends.  ``--start`` starts its
own server (``python -m sdinfer serve``) on a free port with a fresh store; with
``--kill-after K`` it SIGKILLs that server once K requests have been answered, restarts it on
the same store, and sends the rest to the new one (requests in flight at the kill end as
connection errors: not answered, so not lost; a request refused while the server is down is sent again
until ``--timeout``).  Every loop is bounded by ``--requests`` and
each request by ``--timeout``."""

from __future__ import annotations

import argparse
import io
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
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
MAX_REQUESTS, MAX_CONCURRENCY = 10_000, 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(base: str, path: str, body: dict | None = None, timeout: float = 300.0):
    """(status, parsed JSON or bytes); a refused or dropped connection raises OSError."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"}
                                 if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as res:
            raw, kind, status = res.read(), res.headers.get("content-type", ""), res.status
    except urllib.error.HTTPError as err:
        raw, kind, status = err.read(), err.headers.get("content-type", ""), err.code
    return status, json.loads(raw) if "json" in kind else raw


class Server:
    """``python -m sdinfer serve`` on a free loopback port; ``kill()`` is SIGKILL."""

    def __init__(self, store: Path, flags: list[str], start_timeout: float = 180.0, env: dict | None = None):
        self.store, self.flags, self.start_timeout, self.extra_env = store, flags, start_timeout, env or {}
        self.proc = None
        self.start()

    def start(self) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        src = Path(__file__).parents[1] / "src"
        env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **self.extra_env}
        self.log = tempfile.TemporaryFile()   # a file: a chatty server never blocks on a full pipe
        self.proc = subprocess.Popen([sys.executable, "-m", "sdinfer", "serve", "--port", str(self.port),
                                      "--store", str(self.store), *self.flags],
                                     env=env, stdout=subprocess.DEVNULL, stderr=self.log)
        end = time.monotonic() + self.start_timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}): "
                                   f"{self._tail()}")
            try:
                if request(self.base, "/healthz", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.kill()
        raise TimeoutError(f"the server did not answer /healthz in {self.start_timeout} s")

    def _tail(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-2000:]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def stored_ids(base: str, timeout: float) -> set[str]:
    """Every id the store lists (paged), each PNG fetched and decoded."""
    from PIL import Image

    ids, before = set(), None
    while True:
        status, page = request(base, "/v1/images?limit=200" + (f"&before={before}" if before else ""), timeout=timeout)
        if status != 200:
            raise RuntimeError(f"GET /v1/images answered {status}: {page}")
        for row in page["data"]:
            status, png = request(base, f"/v1/images/{row['id']}", timeout=timeout)
            if status == 200:
                with Image.open(io.BytesIO(png)) as im:
                    im.load()
                ids.add(row["id"])
        before = page["next_before"]
        if not before:
            return ids


def run(base_of, n: int, concurrency: int, body: dict, prompts: list[str], timeout: float,
        on_answer=None) -> list[dict]:
    """Send ``n`` requests from ``concurrency`` threads; ``base_of()`` gives the current server.
    Request i asks for ``prompts[i % len(prompts)]`` with seed i; an answered one's record holds
    its image ids and the server's per-image reports (``reports``)."""
    records = []
    lock = threading.Lock()

    def one(i: int) -> None:
        rec = {"i": i, "start": time.monotonic()}
        try:
            while True:   # a refused connection (the server restarting) is retried until the timeout
                try:
                    status, answer = request(base_of(), "/v1/images/generations",
                                             {**body, "prompt": prompts[i % len(prompts)], "seed": i}, timeout=timeout)
                    break
                except OSError as err:
                    if not _refused(err) or time.monotonic() - rec["start"] > timeout:
                        raise
                    time.sleep(0.2)
            rec["status"] = status
            if status != 200:
                rec["error"] = (answer or {}).get("error", {}).get("message") if isinstance(answer, dict) else str(answer)
            if status == 200:
                rec["ids"] = [r["id"] for r in answer["sdinfer"]]
                rec["batch_size"] = answer["sdinfer"][0]["batch_size"]
                rec["reports"] = answer["sdinfer"]
        except OSError as err:
            rec["status"], rec["error"] = None, f"{type(err).__name__}: {err}"
        rec["seconds"] = time.monotonic() - rec["start"]
        with lock:
            records.append(rec)
            answered = sum(1 for r in records if r["status"] == 200)
        if on_answer is not None and rec["status"] == 200:
            on_answer(answered)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n)))
    return records


def _refused(err: OSError) -> bool:
    reason = getattr(err, "reason", err)
    return isinstance(reason, ConnectionRefusedError)


def report(records: list[dict], wall: float, in_store: set[str]) -> dict:
    ok = [r for r in records if r["status"] == 200]
    latencies = [r["seconds"] for r in ok]
    lost = [r["i"] for r in ok if not set(r["ids"]) <= in_store]
    refused: dict[str, int] = {}
    for r in records:
        if r["status"] not in (200, None):
            refused[str(r["status"])] = refused.get(str(r["status"]), 0) + 1
    return {"requests": len(records), "answered": len(ok), "refused": refused,
            "connection_errors": sum(1 for r in records if r["status"] is None),
            "lost": len(lost), "lost_requests": lost[:20],
            "errors": sorted({r["error"] for r in records if r["status"] != 200 and r.get("error")})[:10],
            "p50_s": percentile(latencies, 0.5), "p95_s": percentile(latencies, 0.95),
            "throughput_rps": len(ok) / wall if wall > 0 else None, "wall_s": wall,
            "mean_batch_size": sum(r["batch_size"] for r in ok) / len(ok) if ok else None,
            "images_in_store": len(in_store)}


def main(argv: list[str] | None = None) -> dict:
    from sdinfer.eval.prompts import load_prompts

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default=None, help="a running server on this machine, e.g. http://127.0.0.1:8000")
    p.add_argument("--start", action="store_true", help="start a server (python -m sdinfer serve) for the run")
    p.add_argument("--model", default="unet")
    p.add_argument("--store", default=None, help="with --start: the store folder (default: a fresh temporary one)")
    p.add_argument("--server-flag", action="append", default=[], help="with --start: a flag for sdinfer serve "
                   "(repeat), e.g. --server-flag=--batch-window-ms=20")
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--prompts", default="heldout", help="prompt set: quick, heldout, validation or a file")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--kill-after", type=int, default=None, metavar="K",
                   help="with --start: SIGKILL the server once K requests are answered, then restart it")
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)
    if not 1 <= args.requests <= MAX_REQUESTS or not 1 <= args.concurrency <= MAX_CONCURRENCY:
        p.error(f"--requests must be 1-{MAX_REQUESTS} and --concurrency 1-{MAX_CONCURRENCY}")
    if args.start == (args.url is not None):
        p.error("give either --url or --start")
    if args.kill_after is not None and not args.start:
        p.error("--kill-after needs --start (it kills and restarts the server it started)")
    if args.url is not None and urllib.parse.urlparse(args.url).hostname not in LOOPBACK:
        p.error(f"{args.url} is not on this machine; the load runs on loopback only")
    prompts = load_prompts(args.prompts)
    body = {"steps": args.steps, "sampler": args.sampler, "response_format": "url"}
    server, tmp = None, None
    if args.start:
        store = Path(args.store) if args.store else Path(tmp := tempfile.mkdtemp(prefix="sdinfer-load-"))
        server = Server(store, ["--model", args.model, *args.server_flag])
    base = {"url": server.base if server else args.url.rstrip("/")}
    restart = {"done": False, "at": None}
    restart_lock = threading.Lock()

    def on_answer(answered: int) -> None:
        if args.kill_after is None or answered < args.kill_after:
            return
        with restart_lock:
            if restart["done"]:
                return
            restart["done"], restart["at"] = True, answered
            server.kill()
            server.start()
            base["url"] = server.base

    start = time.monotonic()
    try:
        records = run(lambda: base["url"], args.requests, args.concurrency, body, prompts, args.timeout, on_answer)
        wall = time.monotonic() - start
        in_store = stored_ids(base["url"], args.timeout)
    finally:
        if server is not None:
            server.stop()
    out = {"config": {"requests": args.requests, "concurrency": args.concurrency, "steps": args.steps,
                      "sampler": args.sampler, "model": args.model, "kill_after": args.kill_after,
                      "killed_after_answers": restart["at"]}, **report(records, wall, in_store)}
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    if tmp and not args.store:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
