"""The server's safety limits on a real uvicorn server (in a thread of the test process, so the
test can see the server's jobs): a body over the limit is a 413 (with and without a
Content-Length), an API key is required where set (header or the page's cookie; the page, the
health check and an image by id stay open), a request past its timeout is a 504 and leaves no
image, a client that disconnects cancels its job (its batch stops at the next step), DELETE
cancels a job, a cancelled generation leaves the installed feature cache as it was, and the
command refuses to listen beyond this machine without a key."""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import time

import numpy as np
import pytest

from serve_helpers import ThreadServer, call

PROMPT = "a red circle in the top left"
KEY = "k" * 8 + "-0123456789abcdef"


def _server(pipe, tmp_path, **settings):
    from sdinfer.serve.app import create_app
    from sdinfer.serve.jobs import ServeSettings
    from sdinfer.serve.store import ImageStore

    app = create_app(pipe, ServeSettings(model="unet", **settings), ImageStore(tmp_path))
    return ThreadServer(app), app


def _raw(base: str, method: str, path: str, body: bytes | None = None, headers=None, chunked=False):
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request(method, path, body=iter([body]) if chunked else body, headers=headers or {},
                     encode_chunked=chunked)
        res = conn.getresponse()
        return res.status, dict(res.getheaders()), res.read()
    finally:
        conn.close()


def _wait(predicate, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_a_body_over_the_limit_is_a_413_with_or_without_its_length(unet_pipe, tmp_path):
    srv, _ = _server(unet_pipe, tmp_path, steps=2, max_body_bytes=2048)
    try:
        big = json.dumps({"prompt": PROMPT, "user": "x" * 4000}).encode()
        declared = _raw(srv.base, "POST", "/v1/images/generations", big, {"Content-Type": "application/json"})
        streamed = _raw(srv.base, "POST", "/v1/images/generations", big, {"Content-Type": "application/json"},
                        chunked=True)
        small = _raw(srv.base, "POST", "/v1/images/generations", json.dumps({"prompt": PROMPT}).encode(),
                     {"Content-Type": "application/json"}, chunked=True)
    finally:
        srv.stop()
    for status, _, body in (declared, streamed):
        assert status == 413, body
        assert "larger than 2048 bytes" in json.loads(body)["error"]["message"]
    assert small[0] == 200, small[2]


def test_the_api_key_guards_the_api_but_not_the_page_or_an_image_by_id(unet_pipe, tmp_path):
    srv, _ = _server(unet_pipe, tmp_path, steps=2, api_key=KEY)
    ok = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    body = json.dumps({"prompt": PROMPT}).encode()
    try:
        refused = _raw(srv.base, "POST", "/v1/images/generations", body, {"Content-Type": "application/json"})
        wrong = _raw(srv.base, "POST", "/v1/images/generations", body,
                     {"Content-Type": "application/json", "Authorization": "Bearer " + KEY[:-1] + "X"})
        made = _raw(srv.base, "POST", "/v1/images/generations", body, ok)
        url = json.loads(made[2])["data"][0]["url"]
        path = url[url.index("/v1/"):]
        image = _raw(srv.base, "GET", path)
        listing = _raw(srv.base, "GET", "/v1/images")
        by_cookie = _raw(srv.base, "GET", "/v1/images", headers={"Cookie": f"sdinfer_key={KEY}"})
        metrics = _raw(srv.base, "GET", "/metrics")
        page, health = _raw(srv.base, "GET", "/"), _raw(srv.base, "GET", "/healthz")
    finally:
        srv.stop()
    for status, headers, raw in (refused, wrong, listing, metrics):
        assert status == 401, raw
        assert headers.get("www-authenticate", "").startswith("Bearer")
        assert "Authorization: Bearer KEY" in json.loads(raw)["error"]["message"]
    assert made[0] == 200 and image[0] == 200 and image[2][:8] == b"\x89PNG\r\n\x1a\n"
    assert by_cookie[0] == 200 and len(json.loads(by_cookie[2])["data"]) == 1
    assert page[0] == 200 and health[0] == 200


def test_a_request_past_its_timeout_is_a_504_and_stores_nothing(unet_pipe, tmp_path):
    srv, app = _server(unet_pipe, tmp_path, steps=1000, request_timeout_s=0.5)
    try:
        start = time.monotonic()
        status, _, body = call(srv.base, "/v1/images/generations", {"prompt": PROMPT})
        took = time.monotonic() - start
        short = call(srv.base, "/v1/images/generations", {"prompt": PROMPT, "steps": 2})[0]
        stored = app.state.store.count()
    finally:
        srv.stop()
    assert status == 504 and body["error"]["type"] == "timeout" and "timeout" in body["error"]["message"], body
    assert took < 15, f"the 1000-step request took {took:.1f} s to time out"
    assert short == 200 and stored == 1


def test_a_client_that_disconnects_cancels_its_job(unet_pipe, tmp_path):
    srv, app = _server(unet_pipe, tmp_path, steps=1000, batch_window_ms=0)
    try:
        host, port = srv.base.removeprefix("http://").split(":")
        body = json.dumps({"prompt": PROMPT}).encode()
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            assert _wait(lambda: any(j.status == "running" for j in app.state.jobs.values()))
        job = next(iter(app.state.jobs.values()))
        assert _wait(lambda: job.status == "cancelled", timeout=20), job.status
        events = [e["event"] for e in job.events]
        steps = sum(e == "step" for e in events)
        after = call(srv.base, "/v1/images/generations", {"prompt": PROMPT, "steps": 2})[0]
        stored = app.state.store.count()
    finally:
        srv.stop()
    assert events[-1] == "error" and job.events[-1]["status"] == 499 and steps < 1000
    assert after == 200 and stored == 1


def test_delete_cancels_a_job_and_its_events_say_so(unet_pipe, tmp_path):
    srv, app = _server(unet_pipe, tmp_path, steps=1000, batch_window_ms=0)
    try:
        status, _, created = call(srv.base, "/v1/jobs", {"prompt": PROMPT})
        assert status == 202
        assert _wait(lambda: call(srv.base, created["status"])[2].get("step", 0) >= 1)
        deleted = call(srv.base, created["status"], method="DELETE")
        assert _wait(lambda: call(srv.base, created["status"])[2]["status"] == "cancelled")
        final = call(srv.base, created["status"])[2]
        unknown = call(srv.base, "/v1/jobs/" + "0" * 32, method="DELETE")[0]
    finally:
        srv.stop()
    assert deleted[0] == 200 and final["error"]["status"] == 499 and "DELETE" in final["error"]["message"]
    assert final["step"] < 1000 and unknown == 404


def test_a_cancelled_generation_leaves_the_feature_cache_as_it_was(unet_pipe):
    """A generation stopped mid-way by its callback (what cancelling a job does) and then a full
    one under the same installed cache: the full one equals a run on a freshly installed cache."""
    from sdinfer import accelerate
    from sdinfer.serve.jobs import JobCancelled

    def stop_at_3(i, x):
        if i == 3:
            raise JobCancelled("stop")

    handle = accelerate(unet_pipe, "deepcache:interval=3")
    try:
        with pytest.raises(JobCancelled):
            unet_pipe(PROMPT, seed=1, steps=10, callback=stop_at_3)
        after = np.asarray(unet_pipe(PROMPT, seed=1, steps=10).images[0])
    finally:
        handle.remove()
    handle = accelerate(unet_pipe, "deepcache:interval=3")
    try:
        fresh = np.asarray(unet_pipe(PROMPT, seed=1, steps=10).images[0])
    finally:
        handle.remove()
    assert np.array_equal(after, fresh)


@pytest.mark.parametrize("host,key,ok", [("127.0.0.1", None, True), ("localhost", None, True), ("::1", None, True),
                                         ("0.0.0.0", None, False), ("0.0.0.0", KEY, True), ("127.0.0.1", "short", False)])
def test_listening_beyond_this_machine_needs_a_key(host, key, ok):
    from sdinfer.cli.serve import api_key_of
    from sdinfer.errors import UserError

    args = argparse.Namespace(host=host, api_key_file=None)
    env = {} if key is None else {"SDINFER_API_KEY": key}
    if ok:
        assert api_key_of(args, env) == key
    else:
        with pytest.raises(UserError, match="API key|--host"):
            api_key_of(args, env)


def test_the_key_file_is_read_and_a_missing_one_is_named(tmp_path):
    from sdinfer.cli.serve import api_key_of
    from sdinfer.errors import UserError

    f = tmp_path / "key"
    f.write_text(KEY + "\n")
    assert api_key_of(argparse.Namespace(host="0.0.0.0", api_key_file=str(f)), {}) == KEY
    with pytest.raises(UserError, match="cannot read --api-key-file"):
        api_key_of(argparse.Namespace(host="0.0.0.0", api_key_file=str(tmp_path / "none")), {})
