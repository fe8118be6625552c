"""bench/serve_load.py at a tiny scale: it starts a server, sends requests from several
threads, SIGKILLs and restarts the server mid-load, and finds every answered request's image
in the store; it refuses a server that is not on this machine."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
import serve_load  # noqa: E402


def test_the_load_generator_refuses_a_remote_server():
    with pytest.raises(SystemExit):
        serve_load.main(["--url", "http://example.com:8000", "--requests", "1"])
    with pytest.raises(SystemExit):
        serve_load.main(["--url", "http://127.0.0.1:9", "--kill-after", "1"])


def test_percentile():
    assert serve_load.percentile([3.0, 1.0, 2.0], 0.5) == 2.0 and serve_load.percentile([], 0.5) is None
    assert serve_load.percentile([1.0, 2.0], 0.95) == pytest.approx(1.95)


@pytest.mark.slow
def test_a_tiny_load_with_a_kill_loses_nothing(tmp_path):
    out = serve_load.main(["--start", "--store", str(tmp_path), "--requests", "8", "--concurrency", "3",
                           "--steps", "2", "--prompts", "quick", "--kill-after", "3",
                           "--json", str(tmp_path / "load.json")])
    assert out["config"]["killed_after_answers"] == 3
    assert out["lost"] == 0 and out["answered"] >= 3
    assert out["answered"] + out["connection_errors"] + sum(out["refused"].values()) == 8
    assert out["images_in_store"] >= out["answered"] and out["p50_s"] > 0 and out["throughput_rps"] > 0
    assert (tmp_path / "load.json").is_file()
