"""``sdinfer serve --ray --replicas 2``: two replicas under Ray Serve on one machine answer, and
share the image store, the jobs and the approximate cache through their leader; SIGINT stops
Serve and the local Ray cluster, leaving no Ray process behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("ray.serve")

from serve_helpers import Server, call  # noqa: E402

pytestmark = pytest.mark.slow
PROMPT = "a red circle in the top left"
HEADER = "x-sdinfer-replica"


def replica_of(headers: dict) -> str:
    return {k.lower(): v for k, v in headers.items()}[HEADER]


def events(base: str, path: str) -> tuple[str, list[str], dict]:
    """(the replica that answered, the events' names, the last event)."""
    names, last = [], None
    with urllib.request.urlopen(base + path, timeout=120) as res:
        replica = res.headers[HEADER]
        for raw in res:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                names.append(line[7:])
            elif line.startswith("data: "):
                last = json.loads(line[6:])
    return replica, names, last


def _processes() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, start time) of every process."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()   # after "pid (name) "
        out[int(stat.parent.name)] = (int(fields[1]), fields[0], fields[19])
    return out


def descendants(root: int) -> dict[int, str]:
    """pid -> start time of every process under ``root`` (Ray's GCS, raylet, agents, workers)."""
    procs, found, todo = _processes(), {}, [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, _, start) in procs.items():
            if ppid == parent and pid not in found:
                found[pid] = start
                todo.append(pid)
    return found


def still_running(started: dict[int, str]) -> list[int]:
    """Those of ``started`` still running (the same process: same start time; zombies are not)."""
    procs = _processes()
    return [pid for pid, start in started.items()
            if pid in procs and procs[pid][2] == start and procs[pid][1] != "Z"]


def test_two_replicas_share_the_store_the_jobs_and_the_cache(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="sdray", dir="/tmp")   # Ray's own folder; short: socket paths fit 107 bytes
    env = {"RAY_TMPDIR": ray_tmp, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    server, started = None, {}
    try:
        server = Server(tmp_path / "store", ["--ray", "--replicas", "2", "--model", "unet", "--steps", "4",
                                             "--batch-window-ms", "0"], start_timeout=150, env=env)
        base = server.base

        # concurrent requests: both replicas answer
        def generate(seed):
            status, headers, body = call(base, "/v1/images/generations", {"prompt": PROMPT, "seed": seed})
            assert status == 200, body
            return replica_of(headers), body["sdinfer"][0]["id"]

        answers = []
        with ThreadPoolExecutor(6) as pool:
            for _ in range(3):
                answers += list(pool.map(generate, range(len(answers), len(answers) + 6)))
                if len({r for r, _ in answers}) == 2:
                    break
        replicas = {r for r, _ in answers}
        assert len(replicas) == 2, f"one replica answered every request: {replicas}"

        # every image is listed and served whichever replica answers
        made = {i for _, i in answers}
        seen_by = set()
        for _ in range(6):
            status, headers, page = call(base, "/v1/images?limit=200")
            assert status == 200 and {r["id"] for r in page["data"]} == made
            seen_by.add(replica_of(headers))
            some = next(iter(made))
            status, headers, png = call(base, f"/v1/images/{some}")
            assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"
            seen_by.add(replica_of(headers))

        # a job made through one replica is followed to its end through whichever answers
        status, headers, job = call(base, "/v1/jobs", {"prompt": PROMPT, "seed": 100})
        assert status == 202
        followers = set()
        for _ in range(6):
            replica, names, last = events(base, job["events"])
            assert names[0] == "queued" and names[-1] == "done" and names.count("step") == 4, names
            followers.add(replica)
            state = call(base, job["status"])[2]
            assert state["status"] == "done" and state["images"][0]["id"] == last["images"][0]["id"]
        seen_by |= followers
        assert seen_by == replicas, "one replica answered every read"

        # the approximate cache is one: a miss on one replica, then a hit on the other
        status, headers, body = call(base, "/v1/images/generations", {"prompt": PROMPT, "seed": 7, "approx_cache": True})
        assert status == 200 and body["sdinfer"][0]["cache_hit"] is False
        maker = replica_of(headers)
        for attempt in range(12):
            status, headers, body = call(base, "/v1/images/generations",
                                         {"prompt": PROMPT, "seed": 8 + attempt, "approx_cache": True})
            assert status == 200
            report = body["sdinfer"][0]
            assert report["cache_hit"] is True and report["steps_skipped"] > 0   # either replica: one index
            if replica_of(headers) != maker:
                break
        else:
            pytest.fail("the replica that filled the cache answered every request")

        # SIGINT: Serve and the local cluster stop
        started = descendants(server.proc.pid)
        assert len(started) >= 8     # Ray's GCS, raylet and agents, Serve's controller and proxy, the replicas, the leader
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(60) == 0, server._tail()
        end = time.monotonic() + 20
        while still_running(started) and time.monotonic() < end:
            time.sleep(0.5)
        assert still_running(started) == [], "Ray processes left after the server stopped"
    finally:
        if server is not None:
            server.kill()
        for pid in still_running(started):   # only what this test's server started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
