"""bench/serve_workload.py: the stream builder (Zipf-like popularity, near-duplicates one word
apart that stay grammar prompts, seeded) and, slow, the whole script at a tiny scale against
servers it starts."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
import serve_workload  # noqa: E402

from sdinfer.errors import UserError  # noqa: E402
from sdinfer.eval.prompts import heldout_prompts  # noqa: E402
from sdinfer.models.default.shapes import all_captions  # noqa: E402


def test_the_stream_is_zipf_like_seeded_and_its_near_duplicates_differ_in_one_word():
    prompts = heldout_prompts()
    stream = serve_workload.build_stream(prompts, 600, zipf=1.0, near=0.3, seed=7)
    assert [r["seed"] for r in stream] == list(range(600))
    ranks = Counter(r["rank"] for r in stream)
    assert ranks[1] > ranks[10] > 0 and ranks[1] > 2 * ranks[10]
    grammar, parts = set(all_captions()), serve_workload.caption_parts()
    near = [r for r in stream if r["changed"]]
    assert 0.2 < len(near) / len(stream) < 0.4
    assert {r["changed"] for r in near} == {"colour", "position"}
    for r in stream:
        assert r["prompt"] in grammar
        if not r["changed"]:
            assert r["prompt"] == r["base"] == prompts[r["rank"] - 1]
            continue
        a, b = parts[r["base"]], parts[r["prompt"]]
        assert [k for k in a if a[k] != b[k]] == [r["changed"]]
    assert serve_workload.build_stream(prompts, 600, 1.0, 0.3, seed=7) == stream
    assert serve_workload.build_stream(prompts, 600, 1.0, 0.3, seed=8) != stream
    flat = serve_workload.build_stream(prompts, 600, zipf=0.0, near=0.0, seed=7)
    assert not any(r["changed"] for r in flat) and len({r["rank"] for r in flat}) > 150


def test_the_stream_refuses_bad_knobs():
    with pytest.raises(UserError, match="--near"):
        serve_workload.build_stream(["a red circle in the top left"], 3, near=1.5)
    with pytest.raises(UserError, match="shapes grammar"):
        serve_workload.build_stream(["a photo of a cat"], 3, near=1.0)
    with pytest.raises(UserError, match="--concurrency"):
        serve_workload.parse_levels("1,x")


@pytest.mark.slow
def test_a_tiny_workload_hits_on_its_repeats(tmp_path):
    path = tmp_path / "w.json"
    serve_workload.main(["--requests", "12", "--steps", "4", "--concurrency", "1", "--batch-concurrency", "2",
                         "--zipf", "1.5", "--json", str(path)])
    out = json.loads(path.read_text())
    assert out["meta"]["requests"] == 12 and out["meta"]["steps"] == 4 and out["meta"]["macs_per_step"] > 0
    assert len(out["stream"]) == 12 and out["stream_summary"]["distinct_prompts"] < 12   # repeats
    assert [(r["concurrency"], r["approx_cache"]) for r in out["runs"]] == [(1, False), (1, True)]
    for r in out["runs"]:
        assert r["answered"] == 12 and r["p50_s"] <= r["p95_s"] and r["throughput_rps"] > 0
        if not r["approx_cache"]:
            assert r["hits"] == 0 and r["macs_saved"] == 0
            continue
        assert r["hits"] > 0 and r["mean_steps_skipped"] > 0
        assert r["macs_saved"] == r["steps_skipped"] * out["meta"]["macs_per_step"]
        assert r["steps_run"] + r["steps_skipped"] == 12 * 4
        q = r["quality"]
        assert q["compared"] == r["hits"] and q["psnr_db"] > 0 and 0 <= q["adherence_cached"] <= 1
    assert [b["batching"] for b in out["batching"]] == [False, True]
    assert out["batching"][0]["mean_batch_size"] == 1
    import report
    assert "approx cache on" in report.serve_workload_table(out)
