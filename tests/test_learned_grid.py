"""Learned time grids (LD3's objective, pattern search): on the exact mixture the learned grid
lowers the global error on noise it was not learned on, files round-trip and bad ones are
refused, and `sdinfer calibrate --method learned-grid` / `generate --spacing learned` work end to end."""

from __future__ import annotations

import pytest
import torch

from sdinfer.denoiser import Denoiser
from sdinfer.eval import gaussian_mixture as gm
from sdinfer.samplers import get_sampler, sample_loop
from sdinfer.samplers.base import ExplicitGrid, continuous_grid
from sdinfer.samplers.learned_grid import LearnedGrids, learn_grid, search_grid
from file_helpers import check_bad_files_refused, check_generate_on_grid_file
from test_cli import run


def test_the_search_keeps_the_ends_and_the_order_and_finds_a_known_optimum():
    target = [1.0, 0.8, 0.3, 0.1, 0.0]
    calls = []

    def error(times):
        calls.append(times)
        assert times[0] == 1.0 and times[-1] == 0.0
        assert all(a > b for a, b in zip(times, times[1:]))
        return sum((a - b) ** 2 for a, b in zip(times, target))

    times, value, evals = search_grid(error, [1.0, 0.75, 0.5, 0.25, 0.0], min_fraction=1 / 1024, max_evals=2000)
    assert evals == len(calls) and value == error(times) and value < 1e-4
    assert max(abs(a - b) for a, b in zip(times, target)) < 0.01
    _, _, evals = search_grid(error, [1.0, 0.75, 0.5, 0.25, 0.0], max_evals=7)
    assert evals == 7


def _error_on(sched, spec, x_T, ref):
    def error(times):
        den = Denoiser(gm.model_fn(sched), sched, "sample")
        out = sample_loop(den, get_sampler(spec), x_T.clone(), len(times) - 1, None, None,
                          spacing=ExplicitGrid(times))
        return float((out - ref).square().mean().sqrt())
    return error


@pytest.mark.parametrize("spec", ["ddim", "dpm-solver++"])
def test_a_grid_learned_on_the_mixture_lowers_the_error_on_other_noise(spec):
    """Measured (DDIM / DPM-Solver++(2M), 5 steps, from the best fixed grid, 64 training samples):
    error on 256 other samples falls to 0.64 / 0.38 of the start's."""
    sched = gm.schedule()
    den = Denoiser(gm.model_fn(sched), sched, "sample")
    teacher = get_sampler("dpm-solver++:order=3")

    def problem(seed, n):
        x = torch.randn(n, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        return x, sample_loop(den, teacher, x.clone(), 400, None, None, spacing="logsnr")

    (x_train, ref_train), (x_test, ref_test) = problem(1, 64), problem(2, 256)
    train, test = _error_on(sched, spec, x_train, ref_train), _error_on(sched, spec, x_test, ref_test)
    starts = [continuous_grid(den, 5, s) for s in ("trailing", "logsnr", "karras", "time_quadratic")]
    start = min(starts, key=train)
    times, value, _ = search_grid(train, start, max_evals=120)
    assert value < train(start)
    assert test(times) < 0.8 * test(start), (test(times), test(start))


def test_files_round_trip_and_bad_ones_are_refused(tmp_path):
    grids = LearnedGrids()
    grids.add("DDIM", 3, [1.0, 0.5, 0.2, 0.0], {"kept": "learned"})
    grids.add("dpm-solver++:order=3", 4, [1.0, 0.6, 0.3, 0.1, 0.0], {"kept": "start"})
    path = tmp_path / "learned.safetensors"
    grids.save(path)
    back = LearnedGrids.load(path)
    assert back.entries() == [("ddim", 3), ("dpm-solver++:order=3", 4)]
    assert back.grid(" ddim", 3).times(3) == [1.0, 0.5, 0.2, 0.0]
    assert back.meta["entries"]["ddim|3"] == {"kept": "learned"}
    with pytest.raises(ValueError, match="has 3 steps, not 4"):
        back.grid("ddim", 3).times(4)
    with pytest.raises(KeyError, match="no learned grid for sampler 'ddim' at 5 steps .learned: ddim 3, "):
        back.grid("ddim", 5)
    check_bad_files_refused(LearnedGrids.load, tmp_path, "sdinfer calibrate --method learned-grid",
                            "is not a learned-grid file", "not a readable safetensors")
    with pytest.raises(ValueError, match="fall strictly"):
        grids.add("ddim", 2, [1.0, 0.0, 0.5], {})
    with pytest.raises(ValueError, match="has 2 steps"):
        LearnedGrids({"ddim|3": torch.tensor([1.0, 0.5, 0.0])})


@pytest.mark.slow
def test_calibrate_and_generate_with_a_learned_grid(tmp_path, capsys, monkeypatch):
    import sdinfer.calibrate as calibrate

    out = tmp_path / "learned.safetensors"
    args = ["calibrate", "--method", "learned-grid", "--model", "unet", "--samples", "2", "--validation", "1",
            "--step-counts", "3,2", "--evals", "4", "--out", str(out)]
    monkeypatch.setattr(calibrate, "START_SPACINGS", ("trailing", "logsnr"))
    # a quick, coarse reference (10 Runge-Kutta steps): the command is what is tested
    monkeypatch.setattr(calibrate, "REFERENCE_TOLERANCE", 1.0)
    monkeypatch.setattr(calibrate, "REFERENCE_STEP", 2.0)
    code, stdout, err = run(capsys, *args)
    assert code == 0, err
    assert "wrote learned grids of unet at cfg 4 for ddim at 2, 3 steps" in stdout
    grids = LearnedGrids.load(out)
    assert grids.entries() == [("ddim", 2), ("ddim", 3)]
    info = grids.meta["entries"]["ddim|3"]
    assert info["evaluations"] == 4 + 3 and info["kept"] in ("learned", "start")  # + trailing, logsnr, gits
    assert info["train_learned"] <= info["train_start"]
    before = out.read_bytes()
    code, _, err = run(capsys, *args)
    assert code == 2 and "has grids for ddim at 2, 3 steps" in err and "--overwrite" in err
    assert out.read_bytes() == before
    code, _, err = run(capsys, *args[:-6], "--step-counts", "4", "--evals", "2", "--out", str(out))
    assert code == 0, err
    assert LearnedGrids.load(out).entries() == [("ddim", 2), ("ddim", 3), ("ddim", 4)]
    for bad, message in ((["--step-counts", "3,x"], "whole numbers"), (["--step-counts", "0"], ">= 1"),
                         (["--validation", "0"], "--validation must be >= 1"),
                         (["--sampler", "nope"], "unknown sampler 'nope'")):
        code, _, err = run(capsys, *args[:-2], *bad, "--out", str(tmp_path / "new.safetensors"))
        assert code == 2 and message in err, err

    gen = check_generate_on_grid_file(capsys, monkeypatch, tmp_path, "learned", "learned-grid", out, 3,
                                      "sdinfer calibrate --method learned-grid --model unet --cfg 4 --sampler ddim")
    code, _, err = run(capsys, *gen, "--sampler", "unipc", "-o", str(tmp_path / "b.png"))
    assert code == 2 and "no learned grid for sampler 'unipc' at 3 steps" in err and "--step-counts 3" in err



def test_learned_times_stay_at_or_above_the_first_training_step():
    """An error that pulls every time towards 0: the last interior time stops at the floor (the
    schedule's first training step), never below it (a negative model timestep), and the grid
    stays strictly ordered."""
    floor = 0.02
    seen = []

    def error(times):
        seen.append(times)
        return sum(times)

    start = [1.0, 0.6, 0.3, 0.05, 0.0]
    times, info = learn_grid(error, {"start": start}, error, max_evals=400, min_time=floor)
    assert all(t >= floor for trial in seen for t in trial[1:-1])
    assert all(a > b for trial in seen for a, b in zip(trial, trial[1:]))
    assert times[0] == 1.0 and times[-1] == 0.0 and info["kept"] == "learned"
    assert floor <= times[-2] < floor + 1e-3
    with pytest.raises(ValueError, match="interior times must be >= 0.02"):
        learn_grid(error, {"low": [1.0, 0.5, 0.01, 0.0]}, min_time=floor)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_error_counts_as_infinite(bad):
    def error(times):
        return bad if times[1] < 0.5 else abs(times[1] - 0.55)

    times, info = learn_grid(error, {"a": [1.0, 0.6, 0.0], "b": [1.0, 0.4, 0.0]}, error, max_evals=30)
    assert info["start"] == "a" and times[1] >= 0.5
    with pytest.raises(ValueError, match="diverged on every start grid"):
        learn_grid(lambda t: bad, {"a": [1.0, 0.6, 0.0]})
