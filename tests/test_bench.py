"""The bench harness: interleaved timing, its self-comparison, progress and the machine record."""

from __future__ import annotations

import importlib
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sdinfer.eval import bench



class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class DriftingPipe:
    """Stands in for a Pipeline: each call takes 1 s plus 0.1 s more than the call before (a machine
    that slows down steadily), on the fake clock; it records which configuration ran each call."""

    def __init__(self, clock: FakeClock):
        self.clock, self.calls, self.installed = clock, [], None
        self.model = SimpleNamespace(name="fake", family="Fake", native_size=16)

    def __call__(self, prompts, steps, sampler, guidance_scale, seeds, size):
        self.calls.append((steps, self.installed, len(prompts)))
        self.clock.now += 1.0 + 0.1 * len(self.calls)
        torch.ones(2, 2) @ torch.ones(2, 2)  # something for the MAC counter to count
        pixels = torch.stack([torch.full((3, 16, 16), s / 100) for s in seeds])
        return SimpleNamespace(pixels=pixels, nfe=steps, model_calls=steps)


@pytest.fixture
def drifting(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(bench.time, "perf_counter", clock)
    return DriftingPipe(clock)


def test_interleaved_rounds_alternate_and_cancel_a_steady_drift(drifting):
    a, b = bench.RunSpec(steps=5), bench.RunSpec(steps=7)
    prompts = [f"p{i}" for i in range(4)]
    base, other = bench.measure_all(drifting, [a, b], prompts, batch=2, seed=0, repeats=2, progress=False)
    timed = [steps for steps, _, _ in drifting.calls[2:-2]]   # after the warm-ups, before the MAC counts
    assert timed == [5, 7, 7, 5, 5, 7, 7, 5]                  # A B | B A per batch, rounds alternating
    assert [steps for steps, _, _ in drifting.calls[:2]] == [5, 7]       # one warm-up each
    # A B B A under a linear drift: both configurations get the same total time in every repeat
    assert base.wall_runs == pytest.approx(other.wall_runs)
    assert len(base.wall_runs) == 2
    assert base.pixels.shape[0] == 4 and other.nfe == 7


def test_self_comparison_under_drift_reads_one(drifting):
    spec = bench.RunSpec(steps=5)
    report = bench.run_bench(drifting, [spec], spec, [f"p{i}" for i in range(6)], batch=3,
                             repeats=1, log=lambda m: None, progress=False)
    rec = report["records"][1]
    assert rec["speedup_wall"] == pytest.approx(1.0)
    assert rec["speedup_macs"] == 1.0 and rec["psnr"] == report["meta"]["psnr_cap_db"]
    assert report["meta"]["timing"] == "interleaved"


def test_accelerator_is_installed_only_around_its_own_runs(drifting, monkeypatch):
    def fake_accelerate(pipe, spec):
        assert pipe.installed is None, "two configurations installed at once"
        pipe.installed = spec

        def remove():
            pipe.installed = None
        return SimpleNamespace(remove=remove)

    monkeypatch.setattr(importlib.import_module("sdinfer.accelerate"), "accelerate", fake_accelerate)
    plain, cached = bench.RunSpec(steps=4), bench.RunSpec(steps=4, accelerate="deepcache:interval=3")
    bench.measure_all(drifting, [plain, cached], ["x", "y"], batch=1, seed=0, repeats=1, progress=False)
    assert {installed for _, installed, _ in drifting.calls} == {None, "deepcache:interval=3"}
    order = [installed for _, installed, _ in drifting.calls]
    assert order[:2] == [None, "deepcache:interval=3"]     # warm-ups
    assert order[2:6] == [None, "deepcache:interval=3", "deepcache:interval=3", None]
    assert drifting.installed is None


def test_bad_repeats_and_batch_are_user_errors(drifting):
    from sdinfer.errors import UserError

    with pytest.raises(UserError, match="repeats"):
        bench.measure_all(drifting, [bench.RunSpec()], ["x"], batch=1, seed=0, repeats=0)
    with pytest.raises(UserError, match="batch"):
        bench.measure_all(drifting, [bench.RunSpec()], ["x"], batch=0, seed=0, repeats=1)


def test_progress_is_quiet_off_a_terminal_and_shown_on_request(drifting, capsys):
    spec = bench.RunSpec(steps=3)
    bench.measure_all(drifting, [spec, spec], ["x", "y"], batch=1, seed=0, repeats=1)  # stderr: a pipe
    assert capsys.readouterr().err == ""
    bench.measure_all(drifting, [spec, spec], ["x", "y"], batch=1, seed=0, repeats=1, progress=True)
    err = capsys.readouterr().err
    assert "ddim:3" in err and "/6 " in err


def test_machine_names_the_cpu():
    name = bench.cpu_name()
    assert name.strip() and name != "unknown CPU"
    if Path("/proc/cpuinfo").exists():
        models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")]
        if models:
            assert name == models[0]
    assert name in bench.machine_description() and "threads" in bench.machine_description()


@pytest.fixture
def one_thread():
    """Tiny models on two threads under a loaded machine spend their time in thread barriers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_self_comparison_on_a_tiny_pipeline_reads_one(tiny_sd, one_thread):
    """The real harness on a tiny saved pipeline, the baseline against itself: the timed runs are
    interleaved, so the only thing between speedup_wall and 1.0 is the machine's noise.

    The margin is measured, not guessed: this exact call, repeated 12 times on the project's
    2-core machine while seven other jobs ran (load average 11), gave speedup_wall from 0.71 to
    1.29; runs of ~60 ms on a shared core are that noisy.  Hence 0.4: the test fails for a
    systematic order effect of that size (or for a broken ratio) and not for a busy machine.  The
    exact figure (1.00 +- 0.03 on the default models, idle machine) is a BENCHMARKS measurement."""
    from sdinfer.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(str(tiny_sd))
    spec = bench.RunSpec(sampler="ddim", steps=10, cfg=4.0)
    report = bench.run_bench(pipe, [spec], spec, [f"a red circle {i}" for i in range(8)], batch=2,
                             repeats=5, log=lambda m: None, progress=False)
    base, same = report["records"]
    assert same["psnr"] == report["meta"]["psnr_cap_db"] and same["speedup_macs"] == 1.0
    assert abs(same["speedup_wall"] - 1.0) < 0.4, same["wall_s_runs"]
    assert len(base["wall_s_runs"]) == 5


def test_timing_noise_is_the_baselines_spread_per_image(drifting):
    """Every call on the drifting pipe takes 0.1 s longer than the one before: the baseline's
    time per image over its four timed batches spreads, and the bench says so."""
    spec = bench.RunSpec(steps=5)
    logged = []
    report = bench.run_bench(drifting, [spec], spec, [f"p{i}" for i in range(4)], batch=2, repeats=2,
                             log=logged.append, progress=False)
    base = report["records"][0]
    per_image = [t / 2 for run in base["wall_s_batches"] for t in run]
    assert len(per_image) == 4
    spread = (max(per_image) - min(per_image)) / statistics.median(per_image)
    assert report["meta"]["timing_noise"] == pytest.approx(spread, abs=1e-3) and spread > 0.1
    assert any("varied by" in m for m in logged)
    assert sum(base["wall_s_batches"][0]) == pytest.approx(base["wall_s_runs"][0], abs=1e-3)


def test_timing_noise_is_zero_on_a_steady_machine_and_absent_with_one_batch():
    steady = [[2.0, 2.0, 1.0], [2.0, 2.0, 1.0]]   # the last batch holds half the prompts
    m = bench.Measurement(spec=bench.RunSpec(), pixels=torch.zeros(1), nfe=1, model_calls=1, macs=1,
                          wall_runs=[5.0, 5.0], peak_mem_mb=0.0, batch_runs=steady)
    assert bench.timing_noise(m, [4, 4, 2]) == 0.0
    m.batch_runs = [[2.0]]
    assert bench.timing_noise(m, [4]) is None


def test_an_install_callable_puts_each_configuration_on_around_its_own_runs(drifting):
    """``install``: configurations that are not accelerator specs (bench/fronts.py's peers)."""
    def install(spec):
        assert drifting.installed is None, "two configurations installed at once"
        drifting.installed = spec.accelerate or "none"

        def remove():
            drifting.installed = None
        return remove

    plain, peer = bench.RunSpec(steps=4), bench.RunSpec(steps=4, accelerate="peer SomeHelper(x=1)")
    bench.measure_all(drifting, [plain, peer], ["x", "y"], batch=1, seed=0, repeats=1, progress=False,
                      install=install)
    order = [installed for _, installed, _ in drifting.calls]
    assert order[:2] == ["none", "peer SomeHelper(x=1)"]   # warm-ups, each with its own configuration
    assert order[2:6] == ["none", "peer SomeHelper(x=1)", "peer SomeHelper(x=1)", "none"]
    assert order[-2:] == ["none", "peer SomeHelper(x=1)"]  # the MAC counts too
    assert drifting.installed is None
