"""sampler="auto": the guided exact mixture, the robust per-NFE choice, the table artifact and
every way to run what it chose (sdinfer.sample, Pipeline, the CLI)."""

import math
import shutil

import pytest
import torch

import sdinfer
from sdinfer.auto_sampler import (ARTIFACT, AutoTable, Candidate, calibrate_auto, choose, evaluate,
                                  robust_score, trimmed_count)
from sdinfer.cli import main
from sdinfer.denoiser import Denoiser
from sdinfer.errors import UserError
from sdinfer.eval import gaussian_mixture as gm
from sdinfer.generation_config import GenerationConfig
from sdinfer.models import artifacts


def tiny_mixture(guided_weights=True) -> gm.GuidedMixture:
    """2-d, 3 components with rotated anisotropic covariances, 2 classes."""
    angle = torch.tensor([0.3, 1.1, -0.7], dtype=torch.float64)
    axes = torch.stack([torch.stack([torch.stack([a.cos(), -a.sin()]), torch.stack([a.sin(), a.cos()])])
                        for a in angle])
    return gm.GuidedMixture(
        "tiny", (2,), torch.tensor([[-1.0, 0.5], [0.8, -0.6], [0.2, 1.2]], dtype=torch.float64), axes,
        torch.tensor([[0.09, 0.01], [0.2, 0.04], [0.05, 0.02]], dtype=torch.float64),
        torch.tensor([[0.7, 0.1, 0.2], [0.1, 0.6, 0.3]], dtype=torch.float64),
        torch.tensor([0.4, 0.6], dtype=torch.float64))


def numeric_posterior_mean(m: gm.GuidedMixture, x, alpha, sigma, weights) -> torch.Tensor:
    """E[x0 | x_t] by quadrature on a fine grid over x0 (the density written out per component)."""
    ax = torch.linspace(-4, 4, 801, dtype=torch.float64)
    g = torch.stack(torch.meshgrid(ax, ax, indexing="ij"), -1).reshape(-1, 2)
    density = torch.zeros(g.shape[0], dtype=torch.float64)
    for k in range(3):
        cov = m.axes[k] @ torch.diag(m.variances[k]) @ m.axes[k].T
        dist = torch.distributions.MultivariateNormal(m.means[k], cov)
        density += weights[k] * dist.log_prob(g).exp()
    like = torch.exp(-((x[None] - alpha * g) ** 2).sum(-1) / (2 * sigma**2))
    post = density * like
    return (post[:, None] * g).sum(0) / post.sum()


@pytest.mark.parametrize("alpha,sigma", [(0.9, 0.45), (0.5, 0.85)])
def test_guided_mixture_denoiser_is_the_exact_posterior_mean(alpha, sigma):
    m = tiny_mixture()
    x = torch.tensor([[0.3, -0.2], [-0.9, 0.6]], dtype=torch.float64)
    labels = torch.tensor([0, -1])
    got = m.x0(x, alpha, sigma, labels)
    marginal = m.class_prior @ m.class_weights
    for i, w in enumerate([m.class_weights[0], marginal]):
        want = numeric_posterior_mean(m, x[i], alpha, sigma, w)
        assert torch.allclose(got[i], want, atol=1e-6), (got[i], want)
    guided = m.guided_x0(x, alpha, sigma, torch.tensor([1, 1]), 7.5)
    cond = m.x0(x, alpha, sigma, torch.tensor([1, 1]))
    uncond = m.x0(x, alpha, sigma, torch.tensor([-1, -1]))
    assert torch.allclose(guided, uncond + 7.5 * (cond - uncond))
    assert not torch.allclose(cond, uncond)


def test_guided_reference_agrees_with_an_independent_integration():
    """scipy's solution of the guided ODE against RK4 in log s with fine steps, down to s = 1e-5."""
    m = tiny_mixture()
    sched = gm.schedule()
    x_T, labels = m.noise(6, 0)
    ref = m.reference(sched, x_T, labels, 5.0, s_end=1e-5)
    a1, s1 = float(sched.alpha(1.0)), float(sched.sigma(1.0))
    x = x_T / a1
    grid = torch.linspace(math.log(s1 / a1), math.log(1e-5), 601, dtype=torch.float64)

    def f(log_s, x):
        s = math.exp(log_s)
        a = 1 / math.sqrt(1 + s * s)
        return x - m.guided_x0(x * a, a, s * a, labels, 5.0)

    for u, v in zip(grid[:-1].tolist(), grid[1:].tolist()):
        h = v - u
        k1 = f(u, x)
        k2 = f(u + h / 2, x + h / 2 * k1)
        k3 = f(u + h / 2, x + h / 2 * k2)
        k4 = f(v, x + h * k3)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    assert float((ref - x).abs().max()) < 1e-6
    assert float(ref.std()) > 0.3   # a real spread, not collapsed


def test_guided_mixture_through_the_denoiser_converges_to_the_reference():
    m = gm.MIXTURES["vec64"]()
    sched = gm.schedule()
    x_T, labels = m.noise(8, 3)
    ref = m.reference(sched, x_T, labels, 7.5)
    errs = []
    for steps in (10, 40):
        out = sdinfer.sample(m.model_fn(sched), x_T.clone(), sched, "dpm-solver++-3m", steps, "sample",
                             cond=labels, uncond=torch.full_like(labels, -1), guidance_scale=7.5, spacing="logsnr")
        errs.append(float((out - ref).square().mean().sqrt()))
    assert errs[1] < errs[0] / 5


def test_robust_choice_ignores_a_flipped_trajectory():
    n = 64
    good = torch.full((n,), 1e-3**2, dtype=torch.float64)
    good[17] = 1.0          # one trajectory ended in another component
    steady = torch.full((n,), 2e-3**2, dtype=torch.float64)
    errors = {"flipped-once": {8: good}, "steady": {8: steady}}
    # the RMS over all trajectories prefers the steady one, the trimmed score the better one
    assert good.mean().sqrt() > steady.mean().sqrt()
    table = choose(errors, trim=0.05, resamples=50)
    e = table[8]
    assert e["choice"] == "flipped-once" and e["runner_up"] == "steady"
    assert e["score"] == pytest.approx(1e-3) and e["runner_up_score"] == pytest.approx(2e-3)
    assert e["interval"][0] <= e["score"] <= e["interval"][1] + 1e-12
    assert 0.9 <= e["stability"] <= 1.0 and e["trajectories"] == n
    never = {"a": {5: torch.full((4,), float("inf"))}, "b": {5: torch.full((4,), float("nan"))}}
    assert choose(never, resamples=5) == {}   # no candidate ran at NFE 5: no entry
    assert trimmed_count(64, 0.05) == 4 and trimmed_count(10, 0.05) == 1 and trimmed_count(5, 0.0) == 0
    assert robust_score(torch.tensor([1.0, float("nan")]), 0.5) == 1.0


def table_of(entries: dict[int, Candidate], guidance=7.5, aids=None) -> AutoTable:
    choice = {n: {"choice": c.name, "score": 0.01, "interval": [0.009, 0.011], "stability": 1.0}
              for n, c in entries.items()}
    return AutoTable.from_choice(guidance, choice, {c.name: c for c in entries.values()}, {"test": True}, aids)


def test_table_round_trip_and_uncovered_nfe(tmp_path):
    table = table_of({6: Candidate("dpm-solver++-3m", "logsnr"), 8: Candidate("unipc:order=2", "trailing", True)})
    path = table.save(artifacts.path(tmp_path, ARTIFACT, 7.5))
    assert path.name == "auto-sampler-cfg7.5.safetensors"
    back = AutoTable.load(path)
    assert back.guidance_scale == 7.5 and back.entries == table.entries and back.meta == {"test": True}
    assert back.candidate(8) == Candidate("unipc:order=2", "trailing", True)
    with pytest.raises(UserError, match="covers NFE 6, 8, not 7"):
        back.candidate(7)


def test_sample_auto_runs_what_the_table_says(tmp_path):
    sched = gm.schedule()
    model = gm.model_fn(sched)
    x_T = torch.randn(16, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    table = table_of({6: Candidate("dpm-solver++-3m", "logsnr"), 8: Candidate("unipc:order=2", "trailing", True)},
                     guidance=1.0)
    got6 = sdinfer.sample(model, x_T, sched, "auto", 6, "sample", auto=table)
    want6 = sdinfer.sample(model, x_T, sched, "dpm-solver++-3m", 6, "sample", spacing="logsnr")
    assert torch.equal(got6, want6)
    got8 = sdinfer.sample(model, x_T, sched, "auto", 8, "sample", auto=table)
    want8 = sdinfer.sample(model, x_T, sched, "unipc:order=2", 9, "sample", spacing="trailing",
                           analytic_first_step=True)
    assert torch.equal(got8, want8) and not torch.equal(got8, got6)
    # from a model folder: the table there at the guidance scale
    table.save(artifacts.path(tmp_path, ARTIFACT, 1.0))
    assert torch.equal(sdinfer.sample(model, x_T, sched, "auto", 6, "sample", auto=tmp_path), want6)
    with pytest.raises(UserError, match="sdinfer calibrate auto"):
        sdinfer.sample(model, x_T, sched, "auto", 6, "sample", auto=tmp_path / "elsewhere")
    with pytest.raises(UserError, match="needs auto="):
        sdinfer.sample(model, x_T, sched, "auto", 6, "sample")
    with pytest.raises(UserError, match="chooses the grid"):
        sdinfer.sample(model, x_T, sched, "auto", 6, "sample", auto=table, spacing="karras")


def test_evaluate_and_choose_pick_the_better_candidate_on_the_mixture():
    m = tiny_mixture()
    sched = gm.schedule()
    den = Denoiser(m.model_fn(sched), sched, "sample", 5.0)
    x_T, labels = m.noise(16, 1)
    uncond = torch.full_like(labels, -1)
    ref = m.reference(sched, x_T, labels, 5.0)
    cands = [Candidate("ddim", "trailing"), Candidate("dpm-solver++-3m", "logsnr"), Candidate("ddim", "learned")]
    errors = evaluate(den, cands, x_T, labels, uncond, ref, nfes=(6, 10))
    assert torch.isinf(errors["ddim [learned]"][6]).all()   # no learned grid given: never chosen
    table = choose(errors, resamples=20)
    for n in (6, 10):
        scores = {c: robust_score(e[n]) for c, e in errors.items()}
        assert table[n]["choice"] == min(scores, key=scores.get) != "ddim [learned]"
        end = sdinfer.sample(m.model_fn(sched), x_T, sched, "ddim", n, "sample", cond=labels, uncond=uncond,
                             guidance_scale=5.0)
        assert torch.equal(errors["ddim [trailing]"][n], ((end - ref) ** 2).mean(1))
    assert table[10]["score"] < table[6]["score"]


def test_generation_config_checks_auto():
    assert GenerationConfig(steps=8, sampler="auto").sampler == "auto"
    with pytest.raises(UserError, match="chooses the time grid"):
        GenerationConfig(steps=8, sampler="auto", spacing="karras")
    with pytest.raises(UserError, match="takes a step count"):
        GenerationConfig(steps="auto", sampler="auto")


@pytest.fixture
def own_tiny_sd(tiny_sd, tmp_path):
    """A copy of the tiny pipeline, so that the tables written here stay out of other tests' folder."""
    return shutil.copytree(tiny_sd, tmp_path / "sd")


def test_pipeline_and_cli_run_the_table(own_tiny_sd, tmp_path, capsys):
    from sdinfer.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(own_tiny_sd)
    with pytest.raises(UserError, match="sdinfer calibrate auto --model"):
        pipe("a cat", steps=3, sampler="auto", guidance_scale=4.0)
    code = main(["generate", "a cat", "-o", str(tmp_path / "x.png"), "--model", str(own_tiny_sd),
                 "--sampler", "auto", "--steps", "3", "--quiet"])
    assert code == 2 and "sdinfer calibrate auto" in capsys.readouterr().err
    table_of({3: Candidate("dpm-solver++-2m", "logsnr"), 4: Candidate("ddim", "trailing", True)},
             guidance=4.0).save(artifacts.path(own_tiny_sd, ARTIFACT, 4.0))
    got = pipe("a cat", steps=3, sampler="auto", guidance_scale=4.0)
    want = pipe("a cat", steps=3, sampler="dpm-solver++-2m", spacing="logsnr", guidance_scale=4.0)
    assert torch.equal(got.pixels, want.pixels) and got.params["auto"] == "dpm-solver++-2m [logsnr]"
    got4 = pipe("a cat", steps=4, sampler="auto", guidance_scale=4.0)
    assert got4.nfe == 4 and got4.params["steps"] == 5
    code = main(["generate", "a cat", "-o", str(tmp_path / "y.png"), "--model", str(own_tiny_sd),
                 "--sampler", "auto", "--steps", "3", "--quiet"])
    assert code == 0 and (tmp_path / "y.png").exists()


@pytest.mark.slow
def test_calibrate_auto_chooses_on_validation_trajectories(own_tiny_sd, tmp_path):
    from sdinfer.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(own_tiny_sd)
    cands = [Candidate("ddim", "trailing"), Candidate("dpm-solver++-2m", "logsnr")]
    lines = []
    table = calibrate_auto(pipe, 4.0, ["a cat"], ["a dog", "a red cat", "a blue dog"], nfes=(3, 5),
                           candidates=cands, reference_steps=40, log=lines.append)
    assert sorted(table.entries) == [3, 5] and "reference" in lines[0]
    for e in table.entries.values():
        assert e["choice"] in {c.name for c in cands} and e["trajectories"] == 3
    assert table.meta["candidates"] == [c.name for c in cands]


def test_calibrate_auto_cli_checks_its_options(capsys):
    assert main(["calibrate", "auto", "--nfes", "5-x"]) == 2
    assert "--nfes" in capsys.readouterr().err
    assert main(["calibrate", "auto", "--trim", "0.7"]) == 2
    assert "--trim" in capsys.readouterr().err
