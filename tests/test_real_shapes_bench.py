"""bench/real_shapes.py: its quick run (tiny widths of the four real configs) goes through sdinfer's
path and writes the JSON and table that BENCHMARKS.md's real-shapes section is built from."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module   # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def real_shapes():
    return _module("bench_real_shapes", ROOT / "bench" / "real_shapes.py")


@pytest.fixture(scope="module")
def report():
    return _module("bench_report_rs", ROOT / "bench" / "report.py")


def _run(real_shapes, tmp_path, *argv) -> dict:
    out = tmp_path / "rs"
    assert real_shapes.main(["--quick", "--threads", "1", "--out", str(out), *argv]) == 0
    assert out.with_suffix(".md").read_text().startswith("Random weights")
    return json.loads(out.with_suffix(".json").read_text())


def test_quick_run_measures_each_method_against_its_bound_and_overhead(real_shapes, report, tmp_path):
    # 4 steps: FORA at interval 3 computes steps 0 and 3 and reuses 1 and 2, so its MAC bound is near 2
    data = _run(real_shapes, tmp_path, "--steps", "4", "--model", "pixart-sigma", "--method", "fora",
                "--method", "l2c", "--method", "deepcache", "--no-cfg-parallel")
    assert data["meta"]["steps"] == 4 and data["meta"]["overhead_steps"] == 2 and data["meta"]["quick"]
    assert data["cfg_parallel"] == []
    (model,) = data["models"]
    assert model["class"] == "PixArtTransformer2DModel" and model["batch"] == 2
    base = model["baseline"]
    assert base["wall_s"] > 0 and base["macs"] > 0 and base["step_ms"] > 0 and base["overhead_wall_s"] > 0
    rows = {r["method"]: r for r in model["methods"]}
    assert set(rows) == {"fora", "l2c", "deepcache"}
    assert rows["deepcache"]["status"].startswith("does not install")   # a UNet method, on a transformer
    for name in ("fora", "l2c"):
        r = rows[name]
        assert r["status"] == "ok", r["status"]
        assert r["speedup"] > 0 and r["wall_s"] > 0 and r["never_skip_wall_s"] > 0
        assert r["bound"] == pytest.approx(base["macs"] / r["macs"], rel=1e-3)
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["bound"], rel=1e-2)
        assert r["overhead_ms_per_step"] == pytest.approx(   # at half the steps, against no hooks there
            (r["never_skip_wall_s"] - base["overhead_wall_s"]) / 2 * 1e3, abs=0.1)   # walls kept to 0.1 ms
        # the never-skip knob computes everything: per step the uncached MACs (its runs have 2 steps, not 4)
        assert r["never_skip_macs"] * 4 == base["macs"] * 2
    assert 1.5 < rows["fora"]["bound"] < 2.0
    assert rows["l2c"]["bound"] > 1 and rows["l2c"]["random_router"]
    table = report.real_shapes_table(data)
    assert "`fora:interval=3`" in table and "(random router)" in table and "deepcache" not in table


def test_quick_run_on_a_unet_with_a_calibrated_cache(real_shapes, tmp_path):
    data = _run(real_shapes, tmp_path, "--model", "sdxl", "--method", "deepcache", "--method", "teacache",
                "--no-cfg-parallel")
    (model,) = data["models"]
    rows = {r["method"]: r for r in model["methods"]}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert rows["teacache"]["calibrated_here"]
    assert rows["deepcache"]["bound"] >= 1 and rows["teacache"]["bound"] > 0.9   # 2 steps: both computed


def test_bad_arguments_are_named(real_shapes):
    from sdinfer.errors import UserError

    with pytest.raises(UserError, match="no-such-cache"):
        real_shapes.main(["--quick", "--method", "no-such-cache"])
    with pytest.raises(UserError, match="--scale full"):
        real_shapes.main(["--quick", "--scale", "full"])
    with pytest.raises(UserError, match="overhead-steps"):
        real_shapes.main(["--quick", "--overhead-steps", "1"])


def test_scales_name_what_they_leave_out(real_shapes):
    for shape in real_shapes.SHAPES.values():
        assert real_shapes.model_config(shape, "quick") != shape.config
        title = real_shapes.model_title(shape, "fast")
        assert "real widths" in title and shape.scales["fast"][1] in title   # every fast shape is cut, and says how
        for key, value in shape.scales["fast"][0].items():
            assert real_shapes.model_config(shape, "fast")[key] == value != shape.config[key]
    assert real_shapes.model_config(real_shapes.SHAPES["sdxl"], "full") == real_shapes.SDXL_UNET
    assert "published config" in real_shapes.model_title(real_shapes.SHAPES["sd15"], "full")
    assert "2 double + 4 single" in real_shapes.model_title(real_shapes.SHAPES["flux"], "full")


@pytest.mark.slow
def test_quick_cfg_parallel_on_two_ranks_is_exact(real_shapes, report, tmp_path):
    data = _run(real_shapes, tmp_path, "--model", "sd15", "--method", "deepcache", "--cfg-model", "sd15",
                "--cfg-model", "flux")
    rows = {r["model"]: r for r in data["cfg_parallel"]}
    assert rows["sd15"]["status"] == "ok", rows
    # 1 vs 2 threads sum in another order: CI measured 1.5e-4; a wrong split is O(1) off
    assert rows["sd15"]["max_abs_diff"] < 1e-3
    assert rows["sd15"]["speedup_vs_1_thread"] > 0 and rows["sd15"]["speedup_vs_2_threads"] > 0
    assert "guidance" in rows["flux"]["status"]   # FLUX.1-dev runs one branch: nothing to split
    assert "SD 1.5 UNet" in report.real_shapes_cfg_table(data)


def test_mac_counter_counts_as_the_project_does(real_shapes):
    from sdinfer.eval.cost import count_macs

    runner = real_shapes.Runner(real_shapes.SHAPES["flux"], "quick")
    macs = real_shapes.MacCounter().count(lambda: runner.generate(2))
    assert macs == count_macs(lambda: runner.generate(2)) > 0


def test_a_configuration_that_fails_is_a_row_not_the_end_of_the_run(real_shapes, tmp_path, monkeypatch):
    router = real_shapes.random_router
    # a router for one step more than the run: l2c installs, then refuses the run's step count
    monkeypatch.setattr(real_shapes, "random_router", lambda runner, steps, folder: router(runner, steps + 1, folder))
    data = _run(real_shapes, tmp_path, "--model", "flux", "--method", "l2c", "--method", "fora", "--no-cfg-parallel")
    rows = {r["method"]: r for r in data["models"][0]["methods"]}
    assert rows["l2c"]["status"].startswith("failed: UserError: the l2c router was learned for 3 steps")
    assert rows["fora"]["status"] == "ok" and data["models"][0]["batch"] == 1   # FLUX: one branch
