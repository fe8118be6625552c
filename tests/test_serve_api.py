"""sdinfer serve end to end on a real uvicorn server (``python -m sdinfer serve`` on a free
loopback port, the shipped UNet): a generation's PNG equals the pipeline's and ``sdinfer
generate``'s with the same settings, bad input gets its 4xx naming the problem, concurrent
requests batched into one call give the images each gives alone, progress comes as
server-sent events, the store survives a SIGKILL and restart, the metrics count what
happened; and, under uvicorn in a thread, a full queue answers 503 with Retry-After and an
approximate cache with NIRVANA's interface is wired through to the response and /metrics."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from serve_helpers import ServerProcess, ThreadServer, call

pytestmark = pytest.mark.slow
PROMPT = "a red circle in the top left"
STEPS = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("store"), "--steps", str(STEPS), "--batch-window-ms", "400")
    yield srv
    srv.stop()


def pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def assert_same_image(served: np.ndarray, local: np.ndarray) -> None:
    """The server's image against the test process's own run of the pipeline.  Across two
    processes float32 convolutions may round differently in the last bit (measured: a batch of 2,
    dpm-solver++ 5 steps, 1 value of 3,072 one level of 255 apart; batches of 1 equal), which
    moves a pixel by at most one level; so may a batch against a batch of 1 on some CPUs
    (test_concurrent_requests_...)."""
    diff = np.abs(served - local)
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.01, \
        f"max difference {diff.max()} levels on {(diff > 0).sum()} values"


def generate(server, **fields):
    status, _, body = call(server.base, "/v1/images/generations", {"prompt": PROMPT, **fields})
    assert status == 200, body
    return body


def test_a_generation_equals_the_pipeline_and_sdinfer_generate(server, unet_pipe, tmp_path):
    body = generate(server, seed=5, response_format="b64_json")
    assert set(body) == {"created", "data", "sdinfer"} and body["data"][0]["revised_prompt"] is None
    served = pixels(base64.b64decode(body["data"][0]["b64_json"]))
    report = body["sdinfer"][0]
    assert (report["seed"], report["steps"], report["steps_skipped"], report["cache_hit"], report["size"]) == \
        (5, STEPS, 0, False, "32x32")
    alone = np.asarray(unet_pipe([PROMPT], steps=STEPS, seed=5).images[0]).astype(int)
    assert_same_image(served, alone)
    from sdinfer.cli import main

    out = tmp_path / "g.png"
    assert main(["generate", PROMPT, "--model", "unet", "--steps", str(STEPS), "--seed", "5", "-o", str(out),
                 "--quiet"]) == 0
    assert_same_image(served, pixels(out.read_bytes()))
    status, headers, png = call(server.base, f"/v1/images/{report['id']}")   # stored under its id
    assert status == 200 and headers["content-type"] == "image/png" and np.array_equal(pixels(png), served)


def test_n_images_come_as_urls_with_consecutive_seeds(server, unet_pipe):
    body = generate(server, seed=11, n=2, guidance_scale=3.0, sampler="dpm-solver++", steps=5)
    assert [r["seed"] for r in body["sdinfer"]] == [11, 12]
    want = unet_pipe([PROMPT] * 2, steps=5, seed=11, sampler="dpm-solver++", guidance_scale=3.0).images
    for item, image in zip(body["data"], want):
        assert item["url"].startswith(server.base + "/v1/images/")
        png = urllib.request.urlopen(item["url"], timeout=30).read()
        assert_same_image(pixels(png), np.asarray(image).astype(int))


BAD = [
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt": PROMPT, "size": "48x48"}, "use one of 16x16, 32x32, 64x64"),
    ({"prompt": PROMPT, "size": "large"}, "must look like '32x32'"),
    ({"prompt": PROMPT, "n": 0}, "n must be between 1 and 8"),
    ({"prompt": PROMPT, "n": 50}, "n must be between 1 and 8"),
    ({"prompt": PROMPT, "sampler": "nosuch"}, "unknown sampler 'nosuch'"),
    ({"prompt": "a red dog in the top left"}, "does not know: dog"),
    ({"prompt": PROMPT, "accelerate": "nocache"}, "accelerate 'nocache'"),
    ({"prompt": PROMPT, "steps": 0}, "steps"),
    ({"prompt": PROMPT, "model": "dit"}, "this server runs 'unet'"),
    ({"prompt": PROMPT, "colour": "red"}, "unknown field"),
    ({"prompt": PROMPT, "sampler": "ddim:eta=5"}, "eta must be a number in [0, 1]"),
    ({"prompt": PROMPT, "sampler": "dpm-solver-v3:stats=/etc/passwd"}, "names a file, which a request may not"),
    ({"prompt": PROMPT, "accelerate": "teacache:calibration=x.safetensors"}, "names a file"),
]


@pytest.mark.parametrize("body, says", BAD, ids=[b[1][:24] for b in BAD])
def test_bad_input_is_a_400_naming_the_problem(server, body, says):
    status, _, answer = call(server.base, "/v1/images/generations", body)
    assert status == 400, answer
    assert says in answer["error"]["message"] and answer["error"]["type"] == "invalid_request_error"


def test_other_refusals(server):
    status, _, body = call(server.base, "/v1/images/generations", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    for path, code in [("/v1/images/..%2F..%2Fetc%2Fpasswd", 404), ("/v1/images/notanid", 400), ("/v1/images/" + "0" * 32, 404),
                       ("/v1/images?limit=0", 400), ("/v1/images?before=../x", 400), ("/v1/jobs/" + "0" * 32, 404),
                       ("/etc/passwd", 404), ("/page/../../store.py", 404)]:
        status, _, body = call(server.base, path)
        assert status == code, (path, body)


def test_concurrent_requests_run_as_one_batch_with_the_images_each_gives_alone(server, unet_pipe):
    seeds = [21, 22, 23, 24]
    prompt = "a blue square in the center"
    batched = {}

    def ask(seed):
        batched[seed] = generate(server, seed=seed, response_format="b64_json", prompt=prompt)

    threads = [threading.Thread(target=ask, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    sizes = [batched[s]["sdinfer"][0]["batch_size"] for s in seeds]
    assert max(sizes) > 1, f"no two requests shared a call (batch sizes {sizes})"
    for seed in seeds:   # the same requests one at a time, on the same server
        alone = generate(server, seed=seed, response_format="b64_json", prompt=prompt)
        assert alone["sdinfer"][0]["batch_size"] == 1
        # a batch of 4 and a batch of 1 may take float32 kernels that round apart (CI's CPU: one pixel
        # one level off); a mixed-up batch would be tens of levels off everywhere
        got = pixels(base64.b64decode(batched[seed]["data"][0]["b64_json"]))
        assert_same_image(got, pixels(base64.b64decode(alone["data"][0]["b64_json"])))
        local = np.asarray(unet_pipe([prompt], steps=STEPS, seeds=[seed]).images[0]).astype(int)
        assert_same_image(got, local)


def read_events(base: str, path: str) -> list[tuple[str, dict]]:
    events = []
    with urllib.request.urlopen(base + path, timeout=120) as res:
        assert res.headers["content-type"].startswith("text/event-stream")
        name = None
        for raw in res:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
                if name in ("done", "error"):
                    break
    return events


def test_a_job_reports_each_step_then_its_images(server):
    status, _, job = call(server.base, "/v1/jobs", {"prompt": PROMPT, "steps": 6, "seed": 3})
    assert status == 202
    events = read_events(server.base, job["events"])
    names = [e[0] for e in events]
    assert names[0] == "queued" and names[1] == "running" and names[-1] == "done"
    assert [(e[1]["step"], e[1]["steps"]) for e in events if e[0] == "step"] == [(i, 6) for i in range(1, 7)]
    image = events[-1][1]["images"][0]
    assert image["report"]["seed"] == 3 and call(server.base, image["url"])[0] == 200
    status, _, state = call(server.base, job["status"])
    assert state["status"] == "done" and state["images"][0]["id"] == image["id"]
    again = read_events(server.base, job["events"])   # a late reader gets the whole story
    assert [e[0] for e in again] == names


def test_a_failing_job_reports_its_error_as_an_event(server):
    status, _, job = call(server.base, "/v1/jobs", {"prompt": PROMPT, "accelerate": "fora:interval=2"})
    assert status == 202   # the spec parses; the UNet has no attention sub-layers FORA declares
    events = read_events(server.base, job["events"])
    assert events[-1][0] == "error" and events[-1][1]["status"] == 400


def test_the_gallery_lists_newest_first_with_parameters(server):
    a = generate(server, seed=31, prompt="a green triangle in the bottom right")["sdinfer"][0]["id"]
    b = generate(server, seed=32, prompt="a yellow circle in the center")["sdinfer"][0]["id"]
    status, _, page = call(server.base, "/v1/images?limit=2")
    assert status == 200 and [r["id"] for r in page["data"]] == [b, a]
    assert page["data"][1]["prompt"] == "a green triangle in the bottom right" and page["data"][1]["seed"] == 31
    status, _, older = call(server.base, f"/v1/images?limit=2&before={a}")
    assert a not in [r["id"] for r in older["data"]] and b not in [r["id"] for r in older["data"]]


def metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_the_metrics_count_what_happened(server):
    before = call(server.base, "/metrics")[2].decode()
    generate(server, seed=41)
    call(server.base, "/v1/images/generations", {"prompt": ""})
    status, headers, text = call(server.base, "/metrics")
    text = text.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    route = "/v1/images/generations"
    assert metric(text, "sdinfer_requests_total", route=route, status="200") == \
        metric(before, "sdinfer_requests_total", route=route, status="200") + 1
    assert metric(text, "sdinfer_requests_total", route=route, status="400") == \
        metric(before, "sdinfer_requests_total", route=route, status="400") + 1
    assert metric(text, "sdinfer_request_seconds_count", route=route) >= 2
    assert metric(text, "sdinfer_batch_size_count") == metric(before, "sdinfer_batch_size_count") + 1
    stored = len(call(server.base, "/v1/images?limit=200")[2]["data"])
    assert metric(text, "sdinfer_images_stored") == stored > 0
    assert metric(text, "sdinfer_queue_depth") == 0
    for name in ("hits", "misses", "steps_saved"):
        assert f"sdinfer_approx_cache_{name}_total 0.0" in text
    assert "sdinfer_approx_cache_bytes 0.0" in text


def test_the_store_survives_a_sigkill_and_restart(tmp_path):
    first = ServerProcess(tmp_path, "--steps", "4")
    try:
        ids = [generate(first, seed=s)["sdinfer"][0]["id"] for s in (1, 2)]
        pngs = {i: call(first.base, f"/v1/images/{i}")[2] for i in ids}
        def ask_long():
            try:
                call(first.base, "/v1/images/generations", {"prompt": PROMPT, "steps": 400, "n": 8}, timeout=60)
            except OSError:   # the server dies under it
                pass
        busy = threading.Thread(target=ask_long)
        busy.start()
        time.sleep(1.0)
    finally:
        first.kill()   # SIGKILL, mid-generation
    busy.join(60)
    second = ServerProcess(tmp_path, "--steps", "4")
    try:
        listed = call(second.base, "/v1/images")[2]["data"]
        assert sorted(r["id"] for r in listed) == sorted(ids)
        for i in ids:
            assert call(second.base, f"/v1/images/{i}")[2] == pngs[i]
        third = generate(second, seed=3)["sdinfer"][0]["id"]
        assert call(second.base, "/v1/images?limit=1")[2]["data"][0]["id"] == third
    finally:
        second.stop()


# ---- in-process servers (uvicorn in a thread) -----------------------------------------------
def _thread_server(pipe, tmp_path, approx_cache=None, **settings):
    from sdinfer.serve.app import create_app
    from sdinfer.serve.jobs import ServeSettings
    from sdinfer.serve.store import ImageStore

    app = create_app(pipe, ServeSettings(model="unet", **settings), ImageStore(tmp_path), approx_cache=approx_cache)
    return ThreadServer(app)


def test_approx_cache_follows_the_module(server):
    """``sdinfer serve`` makes the approximate cache where ``sdinfer.serve.approx_cache`` is
    installed (then a request may ask for it), and answers 501 where it is not."""
    import importlib.util

    status, _, body = call(server.base, "/v1/images/generations", {"prompt": PROMPT, "approx_cache": True, "steps": 4})
    if importlib.util.find_spec("sdinfer.serve.approx_cache") is None:
        assert status == 501 and "approx_cache" in body["error"]["message"]
    else:
        assert status == 200 and body["sdinfer"][0]["cache_hit"] is False and body["sdinfer"][0]["batch_size"] == 1


def test_a_server_without_the_approximate_cache_answers_501(unet_pipe, tmp_path):
    srv = _thread_server(unet_pipe, tmp_path, approx_cache=None, steps=4)
    try:
        status, _, body = call(srv.base, "/v1/images/generations", {"prompt": PROMPT, "approx_cache": True})
        ok = call(srv.base, "/v1/images/generations", {"prompt": PROMPT, "approx_cache": False})[0]
    finally:
        srv.stop()
    assert status == 501 and "approx_cache is not available" in body["error"]["message"] and ok == 200


def test_a_full_queue_is_a_503_with_retry_after(unet_pipe, tmp_path):
    srv = _thread_server(unet_pipe, tmp_path, steps=60, queue_size=1, max_batch=1, batch_window_ms=0)
    answers = []
    try:
        # the first request running (not queued) before the others arrive: one of them fits the queue
        status, _, job = call(srv.base, "/v1/jobs", {"prompt": PROMPT, "seed": 99})
        assert status == 202
        end = time.monotonic() + 60
        while call(srv.base, job["status"])[2]["status"] != "running" and time.monotonic() < end:
            time.sleep(0.01)

        def ask(seed):
            answers.append(call(srv.base, "/v1/images/generations", {"prompt": PROMPT, "seed": seed}))
        threads = [threading.Thread(target=ask, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        srv.stop()
    codes = sorted(a[0] for a in answers)
    assert codes.count(200) >= 1 and 503 in codes and set(codes) <= {200, 503}, codes
    refused = next(a for a in answers if a[0] == 503)
    assert int(refused[1]["retry-after"]) >= 1 and "busy" in refused[2]["error"]["message"]


class FakeApproxCache:
    """NIRVANA's interface (``sdinfer.serve.approx_cache.ApproxCache``) around the pipeline: a
    prompt seen before is reported as a hit that skipped half the steps, and the stats count."""

    def __init__(self, pipe):
        self.pipe, self.seen = pipe, set()
        self.counts = {"hits": 0, "misses": 0, "steps_saved": 0, "bytes": 0}
        self.thread = None

    def generate_batch(self, prompts, seeds, steps, sampler, guidance_scale, size, callback=None, **kwargs):
        self.thread = threading.current_thread().name
        out = []
        for b, (prompt, seed) in enumerate(zip(prompts, seeds)):
            hit = prompt in self.seen
            skipped = steps // 2 if hit else 0
            result = self.pipe([prompt], steps=steps, seed=seed, sampler=sampler, guidance_scale=guidance_scale,
                               size=size, callback=lambda i, x, b=b: callback(i, x, [b]), **kwargs)
            self.seen.add(prompt)
            self.counts["hits" if hit else "misses"] += 1
            self.counts["steps_saved"] += skipped
            self.counts["bytes"] += 1000
            out.append((result, 0, {"hit": hit, "similarity": 0.98 if hit else None, "skipped_steps": skipped,
                                    "source_id": "abc" if hit else None}))
        return out

    def stats(self):
        return dict(self.counts)


def test_the_approximate_cache_is_wired_through(unet_pipe, tmp_path):
    cache = FakeApproxCache(unet_pipe)
    srv = _thread_server(unet_pipe, tmp_path, approx_cache=cache, steps=6)
    try:
        miss = call(srv.base, "/v1/images/generations", {"prompt": PROMPT, "approx_cache": True})[2]["sdinfer"][0]
        status, _, job = call(srv.base, "/v1/jobs", {"prompt": PROMPT, "approx_cache": True, "n": 2})
        events = read_events(srv.base, job["events"])
        text = call(srv.base, "/metrics")[2].decode()
    finally:
        srv.stop()
    assert (miss["cache_hit"], miss["steps_skipped"], miss["steps"], miss["similarity"]) == (False, 0, 6, None)
    hits = [img["report"] for img in events[-1][1]["images"]]
    assert [(h["cache_hit"], h["steps_skipped"], h["steps"], h["similarity"], h["batch_size"]) for h in hits] == \
        [(True, 3, 3, 0.98, 1)] * 2
    assert len([e for e in events if e[0] == "step"]) == 12   # the callback reaches the cache's pipeline
    assert cache.thread == "sdinfer-model"
    assert metric(text, "sdinfer_approx_cache_hits_total") == 2 and metric(text, "sdinfer_approx_cache_misses_total") == 1
    assert metric(text, "sdinfer_approx_cache_steps_saved_total") == 6
    assert metric(text, "sdinfer_approx_cache_bytes") == 3000


def test_the_real_approximate_cache_skips_steps_on_a_repeat(unet_pipe, tmp_path):
    """NIRVANA's cache (``sdinfer.serve.approx_cache``) behind the server: the first request fills
    it, the same prompt again resumes from a cached latent and runs fewer steps."""
    approx = pytest.importorskip("sdinfer.serve.approx_cache", reason="the approximate cache is not installed")
    cache = approx.ApproxCache(approx.ApproxCacheConfig(directory=tmp_path / "approx", byte_budget=2**24), unet_pipe)
    srv = _thread_server(unet_pipe, tmp_path / "store", approx_cache=cache, steps=20)
    try:
        first = call(srv.base, "/v1/images/generations", {"prompt": PROMPT, "approx_cache": True, "seed": 1})
        again = call(srv.base, "/v1/images/generations", {"prompt": PROMPT, "approx_cache": True, "seed": 2})
        text = call(srv.base, "/metrics")[2].decode()
    finally:
        srv.stop()
        cache.close()
    miss, hit = first[2]["sdinfer"][0], again[2]["sdinfer"][0]
    assert first[0] == again[0] == 200
    assert (miss["cache_hit"], miss["steps_skipped"], miss["steps"]) == (False, 0, 20)
    assert hit["cache_hit"] and hit["similarity"] > 0.99 and hit["steps_skipped"] > 0
    assert hit["steps"] + hit["steps_skipped"] == 20 and hit["source_id"]
    assert metric(text, "sdinfer_approx_cache_hits_total") == 1 and metric(text, "sdinfer_approx_cache_misses_total") == 1
    assert metric(text, "sdinfer_approx_cache_steps_saved_total") == hit["steps_skipped"]
    assert metric(text, "sdinfer_approx_cache_bytes") > 0


def test_approximate_cache_requests_arriving_together_share_calls(unet_pipe, tmp_path):
    """Approximate-cache requests batch with each other: after one fills the cache, a repeat (a
    hit) and two new prompts (misses) sent together run as two calls, the misses as one batch."""
    approx = pytest.importorskip("sdinfer.serve.approx_cache", reason="the approximate cache is not installed")
    cache = approx.ApproxCache(approx.ApproxCacheConfig(directory=tmp_path / "approx", byte_budget=2**24), unet_pipe)
    srv = _thread_server(unet_pipe, tmp_path / "store", approx_cache=cache, steps=10, batch_window_ms=1500)
    answers = {}
    try:
        call(srv.base, "/v1/images/generations", {"prompt": PROMPT, "approx_cache": True, "seed": 1})

        def ask(prompt, seed):
            answers[prompt] = call(srv.base, "/v1/images/generations", {"prompt": prompt, "approx_cache": True,
                                                                         "seed": seed})
        prompts = (PROMPT, "a blue triangle in the bottom right", "a green square in the center")
        threads = [threading.Thread(target=ask, args=(p, 5 + i)) for i, p in enumerate(prompts)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        srv.stop()
        cache.close()
    reports = {p: a[2]["sdinfer"][0] for p, a in answers.items() if a[0] == 200}
    assert len(reports) == 3, answers
    assert reports[PROMPT]["cache_hit"] and reports[PROMPT]["batch_size"] == 1
    assert [reports[p]["cache_hit"] for p in prompts[1:]] == [False, False]
    assert [reports[p]["batch_size"] for p in prompts[1:]] == [2, 2]
