"""sdinfer serve's parts without a model: the store's atomic writes and repair on open (also
after a SIGKILL mid-write), the batcher's grouping, window and bounded queue, the request
schema's checks, which samplers and caches may share a batch, and the CLI's flags."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from PIL import Image
from pydantic import ValidationError

from sdinfer.errors import UserError
from sdinfer.serve.batching import Batcher, QueueFull
from sdinfer.serve.jobs import BATCH_SAFE_CACHES, check_accelerate, is_deterministic
from sdinfer.serve.schemas import GenerationRequest
from sdinfer.serve.store import ImageStore, valid_id

SRC = Path(__file__).parents[1] / "src"


def _image(value: int) -> Image.Image:
    return Image.new("RGB", (8, 8), (value, 255 - value, 7))


# ---- the store ---------------------------------------------------------------------------
def test_store_keeps_images_and_parameters_across_reopening(tmp_path):
    store = ImageStore(tmp_path)
    ids = [store.add(_image(i), f"prompt {i}", {"seed": i}, metadata={"prompt": f"prompt {i}"}).id for i in range(5)]
    store.close()
    again = ImageStore(tmp_path)
    assert again.count() == 5 and again.repaired == {"temporary": 0, "unlisted": 0, "missing": 0}
    listed = again.list(limit=3)
    assert [r.id for r in listed] == ids[::-1][:3]                     # newest first
    assert [r.id for r in again.list(limit=3, before=listed[-1].id)] == ids[1::-1]
    got = again.get(ids[2])
    assert got.prompt == "prompt 2" and got.params == {"seed": 2}
    with Image.open(again.path(ids[2])) as im:
        assert im.getpixel((0, 0)) == (2, 253, 7) and im.text["prompt"] == "prompt 2"
    assert (tmp_path / "images.sqlite3").is_file()
    assert again._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_store_takes_ids_only():
    for bad in ["../../etc/passwd", "a" * 31, "A" * 32, "g" * 32, "0" * 32 + "/", "", "..%2F"]:
        assert not valid_id(bad)
    assert valid_id("0123456789abcdef" * 2)


def test_store_ignores_a_malformed_or_unknown_id(tmp_path):
    store = ImageStore(tmp_path)
    (tmp_path / "secret.png").write_bytes(b"x")
    assert store.path("../secret") is None and store.get("../secret") is None
    assert store.path("0" * 32) is None


def test_opening_removes_what_an_interrupted_write_left(tmp_path):
    store = ImageStore(tmp_path)
    kept = store.add(_image(1), "kept", {}).id
    lost = store.add(_image(2), "file lost", {}).id
    store.close()
    (tmp_path / "images" / f"{lost}.png").unlink()                               # a row without its file
    (tmp_path / "images" / f"{'a' * 32}.png.tmp-1234").write_bytes(b"\x89PNG half")   # killed mid-write
    _image(3).save(tmp_path / "images" / f"{'b' * 32}.png")                      # renamed, row never inserted
    again = ImageStore(tmp_path)
    assert again.repaired == {"temporary": 1, "unlisted": 1, "missing": 1}
    assert [r.id for r in again.list()] == [kept]
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [f"{kept}.png"]


WRITER = textwrap.dedent("""
    import sys
    from PIL import Image
    from sdinfer.serve.store import ImageStore
    store = ImageStore(sys.argv[1])
    print("ready", flush=True)
    i = 0
    while True:
        store.add(Image.new("RGB", (64, 64), (i % 256, 0, 0)), f"p{i}", {"i": i})
        i += 1
""")


def test_a_store_killed_mid_write_opens_whole(tmp_path):
    """SIGKILL a process that writes images as fast as it can; every row the store then lists
    has a PNG that decodes, and no file lies there without its row."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], env=env, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"ready"
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = ImageStore(tmp_path)
    rows = store.list(limit=200)
    assert rows, "the writer stored nothing before it was killed"
    for r in rows:
        with Image.open(store.path(r.id)) as im:
            im.load()
            assert im.getpixel((0, 0))[0] == r.params["i"] % 256
    files = {p.stem for p in (tmp_path / "images").iterdir()}
    assert files == {r.id for r in store.list(limit=100000)}


# ---- the batcher ---------------------------------------------------------------------------
class FakeJob:
    """What the batcher reads of a job (``jobs.Job``), with its failure recorded."""

    def __init__(self, key, n=1, batchable=True):
        self.key, self.n, self.batchable, self.arrival = key, n, batchable, time.monotonic()
        self.error = self.cancelled = None

    def should_stop(self):
        return self.cancelled

    def fail(self, err):
        self.error = err


def _batches(jobs, window_s=0.2, max_batch=4, queue_size=16, hold=None):
    """Submit ``jobs`` at once to a batcher and return the batches it ran, in order."""
    ran, done = [], threading.Event()

    def run(batch):
        if hold is not None:
            hold.wait(5)
        ran.append(batch)
        if sum(len(b) for b in ran) == len(jobs):
            done.set()

    b = Batcher(run, window_s, max_batch, queue_size)
    for job in jobs:
        b.submit(job)
    b.start()
    assert done.wait(10)
    b.stop()
    return ran


def test_compatible_jobs_share_a_call_and_others_wait_in_order():
    a1, b1, a2, a3 = FakeJob("a"), FakeJob("b"), FakeJob("a"), FakeJob("a", n=2)
    assert _batches([a1, b1, a2, a3]) == [[a1, a2, a3], [b1]]


def test_a_batch_holds_at_most_max_batch_images():
    jobs = [FakeJob("a", n=2) for _ in range(3)] + [FakeJob("a")]
    ran = _batches(jobs, max_batch=4)
    assert [sum(j.n for j in b) for b in ran] == [4, 3]


def test_unbatchable_jobs_run_alone():
    jobs = [FakeJob("a", batchable=False), FakeJob("a", batchable=False), FakeJob("a")]
    assert [len(b) for b in _batches(jobs)] == [1, 1, 1]


def test_the_window_is_counted_from_the_first_arrival():
    ran, got = [], threading.Event()
    b = Batcher(lambda batch: (ran.append(batch), got.set()), window_s=0.3, max_batch=8).start()
    first = FakeJob("a")
    b.submit(first)
    time.sleep(0.1)
    second = FakeJob("a")
    b.submit(second)
    assert got.wait(5)
    b.stop()
    assert ran == [[first, second]]
    start = time.monotonic()   # a lone job runs once its window has passed, not later
    ran.clear(), got.clear()
    b = Batcher(lambda batch: (ran.append(time.monotonic()), got.set()), window_s=0.05).start()
    b.submit(FakeJob("a"))
    assert got.wait(5) and ran[0] - start < 1.0
    b.stop()


def test_a_full_queue_refuses_with_a_retry_time():
    hold = threading.Event()
    b = Batcher(lambda batch: hold.wait(5), window_s=0, max_batch=1, queue_size=2).start()
    b.submit(FakeJob("a"))
    time.sleep(0.2)          # the worker holds the first; two more wait
    b.submit(FakeJob("a"))
    b.submit(FakeJob("a"))
    with pytest.raises(QueueFull) as full:
        b.submit(FakeJob("a"))
    assert full.value.retry_after >= 1 and b.depth == 2
    hold.set()
    b.stop()


def test_a_failing_batch_fails_its_jobs_and_the_worker_goes_on():
    ran = []

    def run(batch):
        ran.append(batch)
        if batch[0].key == "bad":
            raise UserError("no")

    b = Batcher(run, window_s=0).start()
    bad, good = FakeJob("bad"), FakeJob("good")
    b.submit(bad)
    b.submit(good)
    end = time.monotonic() + 5
    while len(ran) < 2 and time.monotonic() < end:
        time.sleep(0.01)
    b.stop()
    assert isinstance(bad.error, UserError) and good.error is None and len(ran) == 2


# ---- requests ------------------------------------------------------------------------------
@pytest.mark.parametrize("body, field", [
    ({"prompt": "   "}, "prompt"), ({}, "prompt"), ({"prompt": "x" * 1001}, "prompt"),
    ({"prompt": "a", "size": "big"}, "size"), ({"prompt": "a", "size": "32x16"}, "size"),
    ({"prompt": "a", "steps": 0}, "steps"), ({"prompt": "a", "guidance_scale": -1}, "guidance_scale"),
    ({"prompt": "a", "response_format": "png"}, "response_format"), ({"prompt": "a", "seed": -1}, "seed"),
    ({"prompt": "a", "colour": "red"}, "colour")])
def test_the_schema_refuses_bad_fields(body, field):
    with pytest.raises(ValidationError) as err:
        GenerationRequest(**body)
    assert err.value.errors()[0]["loc"][0] == field


def test_the_schema_takes_the_openai_fields():
    req = GenerationRequest(prompt=" a red circle ", n=2, size="32X32", response_format="b64_json", user="u",
                            model="unet")
    assert (req.prompt, req.size, req.steps, req.approx_cache) == ("a red circle", "32x32", None, False)


@pytest.mark.parametrize("spec, deterministic", [
    ("ddim", True), ("ddim:eta=0.5", False), ("ddpm", False), ("dpm-solver++", True), ("dpm-solver++-sde", False),
    ("unipc", True), ("euler", True), ("heun", True), ("plms", True), ("dpm-solver-v3", True),
    ("ddim:0-5,dpm-solver++:5-10", True), ("ddpm:0-5,ddim:5-10", False), ("paradigms", False)])
def test_only_samplers_that_draw_no_noise_count_as_deterministic(spec, deterministic):
    from sdinfer.samplers import get_sampler

    assert is_deterministic(get_sampler(spec)) is deterministic


def test_cache_specs_are_checked_and_the_batch_safe_ones_are_known_methods():
    from sdinfer.cache import METHODS

    assert BATCH_SAFE_CACHES <= set(METHODS)
    assert check_accelerate("deepcache:interval=3+fora") == ["deepcache", "fora"]
    for bad in ["nocache", "deepcache:interval=x", "+"]:
        with pytest.raises(UserError):
            check_accelerate(bad)


def test_a_request_spec_may_not_name_a_file():
    from sdinfer.serve.jobs import check_no_files

    for spec in ["dpm-solver-v3:stats=/etc/passwd", "dpm-solver-v3:stats=x.safetensors", "teacache:calibration=c",
                 "ddim(stats=a/b):0-5,ddim:5-10", "fora:interval=../../x", "deepcache:interval=2+magcache:calibration=f"]:
        with pytest.raises(UserError, match="names a file"):
            check_no_files(spec, "sampler")
    for spec in ["ddim:eta=0.5", "dpm-solver++:order=3", "deepcache:interval=3,branch=0+fora", "ddim:0-5,unipc:5-10"]:
        check_no_files(spec, "sampler")


def test_serve_flags_parse_and_bad_ones_are_refused():
    from sdinfer.cli import build_parser, main
    from sdinfer.cli.serve import settings_of

    args = build_parser().parse_args(["serve", "--model", "unet", "--port", "8123", "--steps", "8",
                                      "--batch-window-ms", "5", "--max-batch", "4", "--queue-size", "3"])
    s = settings_of(args)
    assert (s.steps, s.batch_window_ms, s.max_batch, s.queue_size) == (8, 5.0, 4, 3)
    assert main(["serve", "--max-batch", "0"]) == 2
    assert main(["serve", "--sampler", "nosuch"]) == 2
    assert main(["serve", "--accelerate", "nocache"]) == 2


def test_a_preset_sets_the_server_defaults_and_a_flag_overrides_it(tmp_path):
    from sdinfer.cli import build_parser
    from sdinfer.cli.serve import settings_of
    from sdinfer.tune.preset import Preset, save_preset

    save_preset(Preset(model="unet", sampler="dpm-solver++", steps=6, guidance_scale=3.0, spacing="gits",
                       analytic_first_step=True, accelerate="deepcache:interval=2"), tmp_path / "preset.json")
    argv = ["serve", "--preset", str(tmp_path / "preset.json"), "--steps", "9"]
    args = build_parser().parse_args(argv)
    args.argv = argv[1:]
    notes = []
    s = settings_of(args, notes.append)
    assert (s.model, s.sampler, s.steps, s.guidance_scale, s.spacing, s.analytic_first_step, s.accelerate) == \
        ("unet", "dpm-solver++", 9, 3.0, "gits", True, "deepcache:interval=2")
    assert len(notes) == 1 and "--steps 9 overrides" in notes[0]


def test_a_cancelled_waiting_job_is_failed_and_never_run():
    hold, ran = threading.Event(), []
    b = Batcher(lambda batch: (hold.wait(5), ran.append(batch)), window_s=0, max_batch=1, queue_size=4).start()
    first, doomed, kept = FakeJob("a"), FakeJob("a"), FakeJob("a")
    b.submit(first)
    time.sleep(0.2)          # the worker holds the first; two wait
    b.submit(doomed)
    b.submit(kept)
    doomed.cancelled = RuntimeError("the client disconnected")
    b.discard(doomed)
    assert b.depth == 1
    hold.set()
    deadline = time.monotonic() + 5
    while len(ran) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    b.stop()
    assert ran == [[first], [kept]]
    late = FakeJob("a")      # cancelled without discard: dropped when its turn comes
    late.cancelled = RuntimeError("timed out")
    b = Batcher(lambda batch: ran.append(batch), window_s=0).start()
    b.submit(late)
    b.submit(FakeJob("b"))
    deadline = time.monotonic() + 5
    while len(ran) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    b.stop()
    assert late not in [j for batch in ran for j in batch] and late.error is late.cancelled
