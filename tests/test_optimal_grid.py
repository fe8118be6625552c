"""GITS's optimal time grid: the dynamic program finds the cheapest path, the grid calibrated on
the exact mixture beats the fixed grids at low NFE, files round-trip and bad ones are refused,
and `sdinfer calibrate --method gits` / `generate --spacing gits` work end to end."""

from __future__ import annotations

import itertools

import pytest
import torch

from sdinfer.denoiser import Denoiser
from sdinfer.eval import gaussian_mixture as gm
from sdinfer.samplers import get_sampler, sample_loop
from sdinfer.samplers.optimal_grid import OptimalGrid, compute_grid
from file_helpers import check_bad_files_refused, check_generate_on_grid_file
from test_cli import run


def _brute_force(cost: torch.Tensor, steps: int) -> float:
    n = cost.shape[0]
    best = float("inf")
    for inner in itertools.combinations(range(1, n - 1), steps - 1):
        path = (0, *inner, n - 1)
        best = min(best, sum(float(cost[a, b]) for a, b in zip(path, path[1:])))
    return best


def test_the_dynamic_program_finds_the_cheapest_path_of_each_length():
    n = 8
    cost = torch.rand(n, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = OptimalGrid(torch.linspace(1, 0, n), cost)
    for steps in range(1, n):
        path = grid.path(steps)
        assert len(path) == steps + 1 and path[0] == 0 and path[-1] == n - 1
        assert all(a < b for a, b in zip(path, path[1:]))
        total = sum(float(cost[a, b]) for a, b in zip(path, path[1:]))
        assert total == pytest.approx(_brute_force(cost, steps), rel=1e-12)
    times = grid.times(3)
    assert times[0] == 1.0 and times[-1] == 0.0 and len(times) == 4
    with pytest.raises(ValueError, match="1 to 7 steps; got 8"):
        grid.path(8)


@pytest.fixture(scope="module")
def mixture_grid():
    sched = gm.schedule()
    den = Denoiser(gm.model_fn(sched), sched, "sample")
    x_cal = torch.randn(128, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    return sched, compute_grid(den, x_cal, None, None, points=30)


def test_the_calibrated_grid_beats_the_fixed_grids_at_low_nfe(mixture_grid):
    """GITS's claim on the exact mixture, on noise other than the calibration's (measured with
    DDIM at NFE 5 / 6 / 8 / 10: gits 0.159 / 0.116 / 0.088 / 0.071, the best fixed grid
    0.210 / 0.172 / 0.125 / 0.099, at 60 points and 256 calibration samples)."""
    sched, grid = mixture_grid
    x_T = torch.randn(128, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def error(spec, steps, spacing):
        den = Denoiser(gm.model_fn(sched), sched, "sample")
        return float((sample_loop(den, get_sampler(spec), x_T.clone(), steps, None, None, spacing=spacing)
                      - ref).square().mean().sqrt())

    ref = sample_loop(Denoiser(gm.model_fn(sched), sched, "sample"), get_sampler("dpm-solver++:order=3"),
                      x_T.clone(), 500, None, None, spacing="logsnr")
    for spec in ("ddim", "dpm-solver++"):
        for steps in (5, 6, 8, 10):
            fixed = min(error(spec, steps, s) for s in ("trailing", "logsnr", "karras", "time_quadratic"))
            assert error(spec, steps, grid) < 0.9 * fixed, (spec, steps)


def test_grid_files_round_trip_and_bad_ones_are_refused(mixture_grid, tmp_path):
    _, grid = mixture_grid
    path = tmp_path / "gits.safetensors"
    grid.save(path)
    back = OptimalGrid.load(path)
    assert torch.equal(back.nodes, grid.nodes) and back.meta == grid.meta
    assert back.times(7) == grid.times(7)
    check_bad_files_refused(OptimalGrid.load, tmp_path, "sdinfer calibrate --method gits", "is not a gits grid",
                            "not a readable safetensors")
    with pytest.raises(ValueError, match="decrease strictly and end at t = 0"):
        OptimalGrid(torch.linspace(0, 1, 4), torch.ones(4, 4))
    with pytest.raises(ValueError, match="finite"):
        OptimalGrid(torch.linspace(1, 0, 3), torch.full((3, 3), float("nan")))


def test_gits_as_a_name_without_a_grid_says_where_to_get_one():
    sched = gm.schedule()
    den = Denoiser(gm.model_fn(sched), sched, "sample")
    x = torch.zeros(1, 2, 1, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="calibrated per model.*sdinfer calibrate --method gits"):
        sample_loop(den, get_sampler("ddim"), x, 5, None, None, spacing="gits")


@pytest.mark.slow
def test_calibrate_and_generate_with_the_gits_grid(tmp_path, capsys, monkeypatch):
    import sdinfer.calibrate as calibrate

    monkeypatch.setattr(calibrate, "REFERENCE_TOLERANCE", 1e-2)   # a quick teacher: the command is tested
    out = tmp_path / "gits.safetensors"
    args = ["calibrate", "--method", "gits", "--model", "unet", "--samples", "2", "--points", "6",
            "--out", str(out)]
    code, stdout, err = run(capsys, *args)
    assert code == 0, err
    assert "wrote the gits grid of unet at cfg 4" in stdout
    grid = OptimalGrid.load(out)
    assert grid.meta["samples"] == 2 and grid.meta["guidance_scale"] == 4.0
    before = out.read_bytes()
    code, _, err = run(capsys, *args)
    assert code == 2 and "--overwrite" in err and out.read_bytes() == before
    code, _, err = run(capsys, *args[:-4], "--points", "1", "--out", str(tmp_path / "g.safetensors"))
    assert code == 2 and "--points must be >= 2" in err

    gen = check_generate_on_grid_file(capsys, monkeypatch, tmp_path, "gits", "gits", out, 4,
                                      "sdinfer calibrate --method gits --model unet --cfg 4")
    code, _, err = run(capsys, *gen[:4], "--steps", str(grid.max_steps + 1), "--quiet", "--spacing", "gits",
                       "-o", str(tmp_path / "b.png"))
    assert code == 2 and f"at most {grid.max_steps} steps" in err
    code, _, err = run(capsys, *gen[:-1], "spiral", "-o", str(tmp_path / "c.png"))
    assert code == 2 and "unknown time grid 'spiral'" in err


@pytest.mark.slow
def test_the_pipeline_runs_on_a_grid_object_as_on_its_times():
    from sdinfer.pipeline import Pipeline

    pipe = Pipeline.from_pretrained("unet")
    nodes = torch.tensor([1.0, 0.7, 0.4, 0.2, 0.0], dtype=torch.float64)
    cost = torch.rand(5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grid = OptimalGrid(nodes, cost)
    a = pipe("a red circle", steps=2, spacing=grid).pixels
    times = grid.times(2)

    class Fixed:
        def times(self, steps):
            return times

    b = pipe("a red circle", steps=2, spacing=Fixed()).pixels
    assert torch.equal(a, b) and not torch.equal(a, pipe("a red circle", steps=2).pixels)
