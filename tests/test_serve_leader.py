"""The leader of ``sdinfer serve --ray`` without Ray: its store, approximate-cache memory and job
board, the proxies the replicas hold (``serve/shared.py``) over an in-process link, two
approximate caches sharing one memory, and two servers sharing one leader."""

from __future__ import annotations

import asyncio
import io
import json
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from sdinfer.serve.approx_cache import ApproxCache, ApproxCacheConfig
from sdinfer.serve.approx_memory import ApproxMemory
from sdinfer.serve.leader import MAX_JOBS, Leader
from sdinfer.serve.shared import LocalLink, RemoteJobBoard, RemoteMemory, RemoteStore
from sdinfer.serve.store import ImageStore, encode_png

THRESHOLDS = (0.80, 0.85, 0.90, 0.95, 0.99)


def _image(value: int) -> Image.Image:
    return Image.new("RGB", (8, 8), (value, 255 - value, 7))


def _unit(*values) -> np.ndarray:
    v = np.array(values, dtype=np.float32)
    return v / np.linalg.norm(v)


def test_the_leader_keeps_the_store(tmp_path):
    leader = Leader(tmp_path)
    png = encode_png(_image(10), {"prompt": "a red circle"})
    first = leader.add_png(png, "a red circle", {"seed": 1})
    second = leader.add_png(encode_png(_image(20)), "a blue square", {"seed": 2})
    assert leader.read(first["id"]) == png and leader.read("0" * 32) is None and leader.read("../x") is None
    assert leader.get(first["id"]) == {**first, "params": {"seed": 1}} and leader.count() == 2
    assert [r["id"] for r in leader.list(10, None)] == [second["id"], first["id"]]
    assert [r["id"] for r in leader.list(10, second["id"])] == [first["id"]]
    leader.close()
    # the same folder is an ordinary store: the rows and files are the ones the leader wrote
    store = ImageStore(tmp_path)
    assert store.read(first["id"]) == png and store.get(second["id"]).prompt == "a blue square"
    store.close()


def test_add_is_encode_then_add_png(tmp_path):
    store = ImageStore(tmp_path)
    stored = store.add(_image(30), "p", {"k": 1}, metadata={"prompt": "p"})
    assert stored.png == encode_png(_image(30), {"prompt": "p"}) == store.read(stored.id)
    with Image.open(io.BytesIO(stored.png)) as im:
        assert im.text["prompt"] == "p"
    store.close()


def test_the_job_board_keeps_each_jobs_events_in_order_and_the_last_jobs(tmp_path):
    leader = Leader(tmp_path)
    for i in range(3):
        leader.job_event("a", {"event": "step", "step": i})
    assert [e["step"] for e in leader.job_events("a", 0)] == [0, 1, 2]
    assert [e["step"] for e in leader.job_events("a", 2)] == [2] and leader.job_events("a", 3) == []
    assert leader.job_events("unknown", 0) is None
    for i in range(MAX_JOBS):
        leader.job_event(f"j{i}", {"event": "queued"})
    assert leader.job_events("a", 0) is None                  # the oldest job left the board
    assert leader.job_events(f"j{MAX_JOBS - 1}", 0) == [{"event": "queued"}]
    leader.close()


def test_the_leaders_memory_finds_inserts_counts_uses_and_evicts(tmp_path):
    leader = Leader(tmp_path, approx_byte_budget=10**7, approx_config={"thresholds": THRESHOLDS})
    memory = RemoteMemory(LocalLink(leader))       # what a replica holds
    base = _unit(1, 0, 0, 0)
    kept = {k: torch.full((2, 4, 4), float(k)) for k in (1, 2, 3, 4, 5)}
    assert memory.lookup("s", base, 10) is None                     # empty
    memory.insert("a red circle", "s", base, kept)
    assert memory.totals()[1] == 5
    sim, k, latent, uid = memory.lookup("s", base, 10)              # the same prompt: K = 5 of 10
    assert sim == pytest.approx(1.0, abs=1e-6) and k == 5 and torch.equal(latent, kept[5]) and len(uid) == 32
    assert {r.step: r.uses for r in leader.memory.store.all_latents()}[5] == 2   # the use is counted
    near = _unit(1, 0.45, 0, 0)                                     # cosine 0.91: K = 3
    sim, k, latent, _ = memory.lookup("s", near, 10)
    assert sim == pytest.approx(0.912, abs=1e-3) and k == 3 and torch.equal(latent, kept[3])
    assert memory.lookup("s", _unit(0, 1, 0, 0), 10)[1:] == (0, None, None)   # unrelated: a miss
    assert memory.lookup("other settings", base, 10) is None
    sizes = {r.step: r.nbytes for r in leader.memory.store.all_latents()}
    leader.close()
    # a smaller budget at the next start: LCBFU evicts the lowest K x uses first (K1 1, K2 2, K4 4;
    # K3 3 x 2 and K5 5 x 2 served once each)
    small = Leader(tmp_path, approx_byte_budget=sizes[3] + sizes[4] + sizes[5], approx_config={"thresholds": THRESHOLDS})
    assert sorted(r.step for r in small.memory.store.all_latents()) == [3, 4, 5]
    small.close()


def test_two_caches_share_one_memory(unet_pipe, tmp_path):
    """Two servers' approximate caches over one memory: what one generated, the other resumes."""
    config = ApproxCacheConfig(directory=tmp_path, thresholds=THRESHOLDS)
    memory = ApproxMemory(config)
    first, second = (ApproxCache(config, unet_pipe, memory=memory) for _ in range(2))
    _, miss = first.generate("a red circle in the top left", seed=1, steps=4)   # keeps K = 1, 2
    result, hit = second.generate("a red circle in the top left", seed=2, steps=4)
    assert not miss["hit"] and hit["hit"] and hit["skipped_steps"] == 2 and result.nfe == 2
    assert first.stats()["misses"] == 1 and second.stats() == {
        "hits": 1, "misses": 0, "steps_saved": 2, "bytes": memory.totals()[0], "entries": 2}
    memory.close()


def test_the_proxies_over_a_link(tmp_path):
    leader = Leader(tmp_path)
    link = LocalLink(leader)
    store, board = RemoteStore(link), RemoteJobBoard(link)
    stored = store.add(_image(40), "p", {"seed": 4}, metadata={"prompt": "p"})
    assert stored.png == store.read(stored.id) and store.get(stored.id).params == {"seed": 4}
    assert [r.id for r in store.list(5)] == [stored.id] and store.count() == 1 and store.folder == tmp_path
    board.publish("j", {"event": "queued"})
    board.publish("j", {"event": "done"})
    assert asyncio.run(board.events("j", 1)) == [{"event": "done"}]
    leader.close()


def _events(base: str, path: str) -> list[tuple[str, dict]]:
    out, name = [], None
    with urllib.request.urlopen(base + path, timeout=120) as res:
        for raw in res:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                out.append((name, json.loads(line[6:])))
    return out


@pytest.mark.slow
def test_two_servers_share_one_leader(unet_pipe, tmp_path):
    """Two apps (as two replicas) over one in-process leader: an image made by one is listed and
    served by the other, a job made through one is followed to its end through the other."""
    from serve_helpers import ThreadServer, call

    from sdinfer.serve.app import create_app
    from sdinfer.serve.jobs import ServeSettings

    link = LocalLink(Leader(tmp_path))
    servers = [ThreadServer(create_app(unet_pipe, ServeSettings(model="unet", steps=4), RemoteStore(link),
                                       job_board=RemoteJobBoard(link))) for _ in range(2)]
    a, b = (s.base for s in servers)
    try:
        status, _, body = call(a, "/v1/images/generations", {"prompt": "a red circle in the top left", "seed": 1})
        assert status == 200
        made = body["sdinfer"][0]["id"]
        assert [r["id"] for r in call(b, "/v1/images")[2]["data"]] == [made]
        assert call(b, f"/v1/images/{made}")[2] == call(a, f"/v1/images/{made}")[2]
        status, _, job = call(a, "/v1/jobs", {"prompt": "a blue square in the center", "seed": 2})
        assert status == 202
        events = _events(b, job["events"])
        names = [e[0] for e in events]
        assert names[0] == "queued" and names[-1] == "done" and names.count("step") == 4
        assert call(b, job["status"])[2]["status"] == "done"
        assert _events(b, job["events"]) == events == _events(a, job["events"])
        assert call(b, "/v1/jobs/" + "0" * 32)[0] == 404
    finally:
        for s in servers:
            s.stop()


def test_the_ray_flags_are_checked(monkeypatch, capsys, tmp_path):
    import sys

    import sdinfer.serve
    from sdinfer.cli import main

    store = ["--store", str(tmp_path)]
    assert main(["serve", "--replicas", "2", *store]) == 2
    assert "add --ray" in capsys.readouterr().err
    assert main(["serve", "--ray-address", "10.0.0.1:6379", *store]) == 2
    assert main(["serve", "--ray", "--replicas", "0", *store]) == 2
    assert "at least 1" in capsys.readouterr().err
    assert main(["serve", "--ray", "--model", "nosuch", *store]) == 2   # before any Ray starts
    assert "nosuch" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)          # Ray not installed
    monkeypatch.delitem(sys.modules, "sdinfer.serve.ray_serve", raising=False)
    monkeypatch.delattr(sdinfer.serve, "ray_serve", raising=False)
    assert main(["serve", "--ray", "--model", "nosuch", *store]) == 2
    assert "pip install 'sdinfer[ray]'" in capsys.readouterr().err
