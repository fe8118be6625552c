"""Sampler schedules: a different sampler per range of steps."""

import pytest
import torch

from sdinfer.context import current_step
from sdinfer.denoiser import Denoiser
from sdinfer.eval import gaussian_mixture as gm
from sdinfer.samplers import get_sampler, sample_loop


def _run(spec, steps=20, seen=None):
    sched = gm.schedule()
    model = gm.model_fn(sched)

    def fn(x, t, text=None):
        if seen is not None:
            seen.append(current_step().step_index)
        return model(x, t, text)

    x_T = torch.randn(16, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return sample_loop(Denoiser(fn, sched, "sample"), get_sampler(spec), x_T, steps, None, None,
                       spacing="trailing")


def test_one_sampler_split_in_two_ranges_is_that_sampler():
    torch.testing.assert_close(_run("ddim:0-10,ddim:10-20"), _run("ddim"), rtol=0, atol=0)
    torch.testing.assert_close(_run("ddim:0-50%,ddim:50%-100%"), _run("ddim"), rtol=0, atol=0)


def test_a_mixed_schedule_differs_from_each_part_and_keeps_the_run_step_context():
    seen = []
    mixed = _run("ddim:0-10,dpm-solver++(order=3):10-20", seen=seen)
    assert seen == list(range(20))  # model calls carry the run's step index, not the segment's
    for single in ("ddim", "dpm-solver++:order=3"):
        assert float((mixed - _run(single)).abs().max()) > 1e-6


def test_the_preset_is_the_sde_then_ode_schedule():
    s = get_sampler("sampler-scheduler")
    assert [type(seg.sampler).__name__ for seg in s.segments] == ["DPMSolverMultistep"] * 2
    assert [seg.sampler.sde for seg in s.segments] == [True, False]


@pytest.mark.parametrize("spec,message", [
    ("ddim:0-10,dpm-solver++:12-20", "without gaps or overlaps"),
    ("ddim:0-10,dpm-solver++:8-20", "without gaps or overlaps"),
    ("ddim:0-10,dpm-solver++:10-15", "end at step 15"),
])
def test_bad_ranges_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        _run(spec)


def test_unknown_sampler_in_a_range():
    with pytest.raises(ValueError, match="unknown sampler 'nope'"):
        get_sampler("nope:0-10,ddim:10-20")
