"""sdinfer tune: budgets, the search against the exhaustive grid on mocked tables, presets, the
CLI's --preset on generate and bench, and one end-to-end tune on a default model."""

from __future__ import annotations

import json
import math
import random

import pytest

from sdinfer.errors import UserError
from sdinfer.tune.budget import Quality, parse_budget
from sdinfer.tune.search import exhaustive, rung_sizes, search
from sdinfer.tune.space import Axis, Candidate, Setting, Space


# ---- budgets -------------------------------------------------------------------------------

def test_budget_parses_each_form_and_several():
    b = parse_budget("adherence-drop=0.02")
    assert [(t.name, t.limit) for t in b.terms] == [("adherence-drop", 0.02)]
    b = parse_budget(" PSNR=35 , ssim=0.9,adherence-drop=0.05")
    assert [(t.name, t.limit) for t in b.terms] == [("psnr", 35.0), ("ssim", 0.9), ("adherence-drop", 0.05)]
    assert b.primary == "psnr" and b.needs_adherence and str(b) == "psnr=35,ssim=0.9,adherence-drop=0.05"


@pytest.mark.parametrize("text", ["", "psnr", "psnr=", "psnr=abc", "speed=3", "psnr=30,psnr=31", "adherence-drop=2",
                                  "ssim=1.5", "psnr=-3", "psnr=inf", "psnr=30;ssim=0.9", "=3"])
def test_a_bad_budget_is_one_error_naming_the_forms(text):
    with pytest.raises(UserError) as err:
        parse_budget(text)
    message = str(err.value)
    assert "adherence-drop=0.02" in message and "psnr=35" in message and "ssim=0.9" in message


def test_budget_meets_and_shortfall():
    b = parse_budget("adherence-drop=0.02,psnr=30")
    good = Quality(psnr=31.0, ssim=0.95, adherence=0.89, reference_adherence=0.90, prompts=64)
    assert b.meets(good) and b.shortfall(good) == 0
    low = Quality(psnr=28.0, ssim=0.95, adherence=0.80, reference_adherence=0.90, prompts=64)
    assert not b.meets(low)
    assert b.shortfall(low) == pytest.approx(8.0 + 2.0)   # 8 points of adherence beyond 2, 2 dB
    unmeasured = Quality(psnr=40.0, ssim=1.0, adherence=None, reference_adherence=None, prompts=4)
    assert not b.meets(unmeasured) and math.isinf(b.shortfall(unmeasured))
    assert "adherence drop 0.1000 (limit 0.02)" in b.describe(low)


# ---- the search on mocked tables -------------------------------------------------------------

class TableEvaluator:
    """Quality and cost from tables: per prompt a PSNR that rises with the steps (noisy, so a few
    prompts are not monotone), cost = NFE x a setting's cost per evaluation."""

    def __init__(self, space, prompts=32, seed=0):
        rng = random.Random(seed)
        self.prompts, self.space = prompts, space
        self.reference_cost = 50.0
        self.rate, self.per_eval, self.noise = {}, {}, {}
        for s in space.settings():
            self.rate[s] = rng.uniform(0.5, 3.0)       # dB gained per step
            self.per_eval[s] = rng.uniform(0.5, 1.2)   # a cache makes evaluations cheaper
            self.noise[s] = [rng.gauss(0, 1.0) for _ in range(prompts)]
        self.quality_calls = []
        self.measured = []

    def psnr(self, c, i):
        s = c.setting
        return 10 + self.rate[s] * c.steps - (3 if s.get("analytic_first_step") else 0) + self.noise[s][i]

    def quality(self, c, n):
        self.quality_calls.append((c, n))
        values = [self.psnr(c, i) for i in range(n)]
        return Quality(psnr=sum(values) / n, ssim=0.9, adherence=None, reference_adherence=None, prompts=n)

    def cost(self, c):
        nfe = c.steps - (1 if c.setting.get("analytic_first_step") else 0)
        return nfe * self.per_eval[c.setting]

    def measure(self, cands):
        self.measured.append(list(cands))
        return [{"speedup_wall": self.reference_cost / self.cost(c)} for c in cands]


def table_space(samplers=4, caches=4):
    axes = [Axis("sampler", tuple(f"s{i}" for i in range(samplers))), Axis("spacing", (None, "gits")),
            Axis("analytic_first_step", (False, True)), Axis("accelerate", tuple(f"c{i}" for i in range(caches)))]
    return Space(axes, steps=(3, 4, 5, 6, 7, 8, 10, 12, 15, 20, 25, 30, 40))


@pytest.mark.parametrize("seed", range(8))
def test_the_search_finds_the_exhaustive_optimum_with_fewer_evaluations(seed):
    space = table_space()
    budget = parse_budget("psnr=32")
    ev = TableEvaluator(space, seed=seed)
    best, grid_evals = exhaustive(space, budget, ev)
    ev.quality_calls.clear()
    result = search(space, budget, ev, first_rung=4, eta=4, finalists=3)
    assert best is not None and result.chosen is not None
    chosen_cost, optimum = ev.cost(result.chosen), best.cost
    assert chosen_cost <= optimum * 1.05, (result.chosen.label, best.candidate.label)
    assert budget.meets(ev.quality(result.chosen, ev.prompts))   # it meets the budget on every prompt
    # the search's cost in images generated against the grid's (every candidate on every prompt)
    assert len(result.evaluations) < grid_evals / 2
    assert result.images < grid_evals * ev.prompts / 10


class AdherenceTable:
    """Pass / fail per prompt from tables: the reference adheres to ``ref``'s prompts; a setting
    at ``steps`` fails the prompts ``fails[setting](steps)`` of those; cost = steps x per-eval."""

    def __init__(self, space, prompts, ref, fails, per_eval):
        self.space, self.prompts, self.ref, self.fails, self.per_eval = space, prompts, ref, fails, per_eval
        self.reference_cost = 100.0

    def quality(self, c, n):
        ref = [i in self.ref for i in range(n)]
        failed = self.fails[c.setting.get("sampler")](c.steps)
        mine = [r and i not in failed for i, r in enumerate(ref)]
        return Quality(psnr=30.0, ssim=0.9, adherence=sum(mine) / n, reference_adherence=sum(ref) / n, prompts=n,
                       discordant=sum(a != b for a, b in zip(mine, ref)))

    def cost(self, c):
        return c.steps * self.per_eval[c.setting.get("sampler")]

    def measure(self, cands):
        return [{"speedup_wall": self.reference_cost / self.cost(c)} for c in cands]


def test_early_rungs_keep_a_candidate_one_unlucky_prompt_fails():
    """The cheap setting fails one of the first 8 prompts at every step count (12.5 points there,
    0.8 on all 128): the point estimate drops it on the first rung, the standard-error test keeps
    it for the rungs with more prompts, where it meets the 2-point budget."""
    space = Space([Axis("sampler", ("cheap", "dear"))], steps=(3, 4, 5, 6, 8, 10))
    table = AdherenceTable(space, 128, ref=set(range(128)) - {7, 50},
                           fails={"cheap": lambda n: {3} | (set(range(20, 40)) if n < 5 else set()),
                                  "dear": lambda n: set(range(60, 90)) if n < 5 else set()},
                           per_eval={"cheap": 0.5, "dear": 1.0})
    budget = parse_budget("adherence-drop=0.02")
    best, _ = exhaustive(space, budget, table)
    assert best.candidate.label == "cheap:5"
    assert search(space, budget, table, first_rung=8, eta=4).chosen.label == "cheap:5"
    assert search(space, budget, table, first_rung=8, eta=4, z=0.0).chosen.label == "dear:5"
    plausible = table.quality(Candidate(Setting((("sampler", "cheap"),)), 5), 8)
    assert not budget.meets(plausible) and budget.plausible(plausible, 1.0) and not budget.plausible(plausible, 0.5)


@pytest.mark.parametrize("seed", range(6))
def test_the_search_finds_the_exhaustive_optimum_of_an_adherence_budget(seed):
    """Random pass/fail tables: settings whose failures thin out with the steps, scattered over the
    prompts, so the first rungs see a few prompts' noise."""
    rng = random.Random(seed)
    space = Space([Axis("sampler", tuple(f"s{i}" for i in range(6)))], steps=(3, 4, 5, 6, 7, 8, 10, 12, 15, 20))
    order = {f"s{i}": rng.sample(range(128), 128) for i in range(6)}
    rate = {f"s{i}": rng.uniform(0.5, 4.0) for i in range(6)}
    fails = {s: (lambda n, s=s: set(order[s][:max(0, round(40 - rate[s] * n))])) for s in order}
    table = AdherenceTable(space, 128, ref=set(rng.sample(range(128), 115)), fails=fails,
                           per_eval={s: rng.uniform(0.5, 1.5) for s in order})
    budget = parse_budget("adherence-drop=0.02")
    best, _ = exhaustive(space, budget, table)
    result = search(space, budget, table, first_rung=8, eta=4)
    assert best is not None and result.chosen is not None
    assert table.cost(result.chosen) <= best.cost * 1.05, (result.chosen.label, best.candidate.label)
    assert result.images < 128 * len(space.candidates()) / 2


def test_rungs_grow_by_eta_to_every_prompt():
    assert rung_sizes(64, 8, 4) == [8, 32, 64]
    assert rung_sizes(32, 8, 4) == [8, 32]
    assert rung_sizes(4, 8, 4) == [4]


def test_a_budget_nothing_meets_names_the_best_reached():
    space = table_space(samplers=2, caches=1)
    ev = TableEvaluator(space, seed=3)
    result = search(space, parse_budget("psnr=500"), ev, first_rung=4)
    assert result.chosen is None and result.best_missing is not None
    top = max(ev.psnr(c, i) for c in space.candidates() for i in range(4))
    assert result.best_missing.quality.psnr >= max(e.quality.psnr for e in result.evaluations) - 1e-9
    assert result.best_missing.quality.psnr <= top


def test_the_time_limit_stops_the_search_with_the_best_so_far():
    space = table_space()
    ev = TableEvaluator(space, seed=1)
    result = search(space, parse_budget("psnr=32"), ev, first_rung=4, time_limit_s=0)
    assert result.stopped_early and result.chosen is None and not result.evaluations


def test_new_axes_slot_in_without_changing_the_search():
    """A quantization axis: the search handles its settings like any other."""
    space = table_space(samplers=2, caches=1)
    space.axes.append(Axis("quantize", ("none", "int8")))
    ev = TableEvaluator(space, seed=5)
    best, _ = exhaustive(space, parse_budget("psnr=30"), ev)
    result = search(space, parse_budget("psnr=30"), ev, first_rung=4)
    assert ev.cost(result.chosen) <= best.cost * 1.05
    assert {s.get("quantize") for s in space.settings()} == {"none", "int8"}


def test_space_rules_and_steps():
    from sdinfer.tune.space import step_rules

    space = table_space(samplers=2, caches=1)
    space.rules.append(step_rules(lambda sampler: 5 if sampler == "s1" else 1))
    s1 = next(s for s in space.settings() if s.get("sampler") == "s1")
    assert space.steps_for(s1)[0] == 5
    c = Candidate(Setting((("sampler", "dpm-solver++"), ("spacing", "gits"), ("analytic_first_step", True),
                           ("accelerate", "deepcache:interval=2"))), 5)
    spec = c.run_spec(4.0)
    assert (spec.sampler, spec.steps, spec.spacing, spec.analytic_first_step, spec.accelerate) == \
        ("dpm-solver++", 5, "gits", True, "deepcache:interval=2")
    assert c.label == "dpm-solver++:5 grid=gits afs + deepcache:interval=2"


# ---- validation prompts ----------------------------------------------------------------------

def test_validation_prompts_never_overlap_the_heldout_ones():
    from sdinfer.eval.prompts import load_prompts, validation_prompts
    from sdinfer.models.default.shapes import heldout_prompts

    v = validation_prompts()
    assert len(v) == len(set(v)) == 200 and not set(v) & set(heldout_prompts())
    assert load_prompts("validation") == v and validation_prompts(16) == v[:16]
    assert not set(validation_prompts(600)) & set(heldout_prompts())
    with pytest.raises(UserError):
        validation_prompts(10_000)


# ---- presets ----------------------------------------------------------------------------------

def _preset(**over):
    from sdinfer.tune.preset import Preset

    fields = dict(model="unet", sampler="dpm-solver++", steps=5, guidance_scale=4.0, spacing="gits",
                  analytic_first_step=True, accelerate="deepcache:interval=2", budget="adherence-drop=0.02",
                  validation={"prompts": 8, "speedup_wall": 11.0})
    fields.update(over)
    return Preset(**fields)


def test_preset_round_trip(tmp_path):
    from sdinfer.tune.preset import load_preset, save_preset

    p = _preset()
    save_preset(p, tmp_path / "preset.json")
    assert load_preset(tmp_path / "preset.json") == p
    data = json.loads((tmp_path / "preset.json").read_text())
    assert data["kind"] == "sdinfer-preset" and data["version"] == 1


@pytest.mark.parametrize("content, says", [
    ("{not json", "not readable JSON"),
    ('{"kind": "something-else"}', "not an sdinfer preset"),
    ('[1, 2]', "not an sdinfer preset"),
    ('{"kind": "sdinfer-preset", "version": 9}', "version"),
    ('{"kind": "sdinfer-preset", "version": 1, "model": "unet", "sampler": "ddim", "guidance_scale": 4}', "no 'steps'"),
    ('{"kind": "sdinfer-preset", "version": 1, "model": "unet", "sampler": "ddim", "steps": 0, "guidance_scale": 4}',
     "steps"),
    ('{"kind": "sdinfer-preset", "version": 1, "model": "unet", "sampler": "ddim", "steps": 5, "guidance_scale": "4"}',
     "guidance_scale"),
    ('{"kind": "sdinfer-preset", "version": 1, "model": "unet", "sampler": "nosuch", "steps": 5, "guidance_scale": 4}',
     "nosuch"),
    ('{"kind": "sdinfer-preset", "version": 1, "model": "unet", "sampler": "ddim", "steps": 5, "guidance_scale": 4, '
     '"accelerate": "deepcache:bogus=1"}', "bogus"),
])
def test_a_foreign_or_corrupt_preset_is_one_clear_error(tmp_path, content, says):
    from sdinfer.tune.preset import load_preset

    path = tmp_path / "preset.json"
    path.write_text(content)
    with pytest.raises(UserError) as err:
        load_preset(path)
    assert says in str(err.value) and str(path) in str(err.value)
    with pytest.raises(UserError, match="does not exist"):
        load_preset(tmp_path / "missing.json")


@pytest.mark.slow
def test_a_preset_generates_the_image_its_flags_do(tmp_path):
    """generate --preset writes the same image as the equivalent flags; an explicit flag overrides
    the preset's value and says so."""
    from PIL import Image

    from sdinfer.cli import main
    from sdinfer.tune.preset import save_preset

    save_preset(_preset(steps=4), tmp_path / "p.json")
    prompt = "a red circle in the top left"
    assert main(["generate", prompt, "--preset", str(tmp_path / "p.json"), "-o", str(tmp_path / "a.png"),
                 "--quiet"]) == 0
    assert main(["generate", prompt, "--model", "unet", "--sampler", "dpm-solver++", "--steps", "4", "--cfg", "4",
                 "--spacing", "gits", "--analytic-first-step", "--accelerate", "deepcache:interval=2",
                 "-o", str(tmp_path / "b.png"), "--quiet"]) == 0
    a, b = (Image.open(tmp_path / f"{n}.png") for n in "ab")
    assert a.tobytes() == b.tobytes()
    assert "deepcache" in a.text["parameters"] and "gits" in a.text["parameters"]


@pytest.mark.slow
def test_generate_says_when_a_flag_overrides_the_preset(tmp_path, capsys):
    from sdinfer.cli import main
    from sdinfer.tune.preset import save_preset

    save_preset(_preset(steps=4, accelerate=""), tmp_path / "p.json")
    assert main(["generate", "a blue square in the center", "--preset", str(tmp_path / "p.json"), "--steps", "3",
                 "-o", str(tmp_path / "o.png"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "--steps 3 overrides the preset's steps 4" in captured.err
    assert "3 steps" in captured.out


@pytest.mark.slow
def test_bench_runs_a_preset_against_the_baseline(tmp_path):
    from sdinfer.cli import main
    from sdinfer.tune.preset import save_preset

    save_preset(_preset(steps=4), tmp_path / "p.json")
    out = tmp_path / "b.json"
    assert main(["bench", "--preset", str(tmp_path / "p.json"), "--baseline", "ddim:8", "--prompts", "quick",
                 "--limit", "2", "--repeats", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["meta"]["model"] == "unet"
    base, rec = report["records"]
    assert base["config"].startswith("baseline ddim:8")
    assert (rec["sampler"], rec["steps"], rec["spacing"], rec["analytic_first_step"], rec["accelerate"]) == \
        ("dpm-solver++", 4, "gits", True, "deepcache:interval=2")
    assert rec["nfe"] == 3 and rec["cfg"] == 4.0


def test_bench_and_generate_refuse_a_bad_preset_before_loading(tmp_path, capsys):
    from sdinfer.cli import main

    (tmp_path / "bad.json").write_text("{}")
    assert main(["bench", "--preset", str(tmp_path / "bad.json")]) == 2
    assert main(["generate", "a red circle", "--preset", str(tmp_path / "bad.json"), "-o",
                 str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("is not an sdinfer preset") == 2


# ---- the CLI ----------------------------------------------------------------------------------

def test_tune_refuses_bad_input_with_one_line(tmp_path, capsys):
    from sdinfer.cli import main

    assert main(["tune", "--model", "unet", "--budget", "speed=3"]) == 2
    assert main(["tune", "--model", "unet", "--budget", "psnr=30", "--prompts", "heldout"]) == 2
    assert main(["tune", "--model", "unet", "--budget", "psnr=30", "--time-limit", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("sdinfer: error: ") for line in err)


@pytest.mark.slow
def test_tune_end_to_end_on_a_tiny_space(tmp_path, capsys):
    """A default model, a space of two samplers at a few step counts, 4 validation prompts: the
    preset, the front and the plot are written, and the preset meets the budget it was tuned to."""
    from sdinfer.cli import main
    from sdinfer.tune.preset import load_preset

    out = tmp_path / "tuned"
    assert main(["tune", "--model", "unet", "--budget", "psnr=25", "--validation", "4", "--space", "small",
                 "--out", str(out)]) == 0
    preset = load_preset(out / "preset.json")
    assert preset.model == "unet" and preset.budget == "psnr=25"
    assert preset.validation["psnr"] >= 25 and preset.validation["speedup_wall"] > 0
    front = json.loads((out / "front.json").read_text())
    assert front["front"] and len(front["points"]) >= 2 and front["meta"]["evaluations"] >= len(front["points"])
    assert any(p["chosen"] for p in front["points"])
    assert (out / "front.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "preset: " in printed and "faster than ddim:50" in printed
    # a budget nothing meets: one error naming the best reached
    assert main(["tune", "--model", "unet", "--budget", "psnr=99", "--validation", "2", "--space", "small",
                 "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "no configuration meets the budget psnr=99" in err and "the best reached is" in err


@pytest.mark.slow
def test_auto_steps_run_each_prompt_at_its_own_count(unet_pipe):
    """steps="auto" over prompts whose predicted counts differ: each prompt's image is the one its
    own count gives it (the search's per-prompt axis and a preset with steps "auto" rely on it)."""
    import torch

    from sdinfer.eval.prompts import validation_prompts
    from sdinfer.stepsaver import predictor_for, prompt_features

    prompts = validation_prompts(24)
    counts = predictor_for(unet_pipe).predict(prompt_features(unet_pipe, prompts))
    i = 0
    j = next(k for k, c in enumerate(counts) if c != counts[0])
    pair = [prompts[i], prompts[j]]
    result = unet_pipe(pair, steps="auto", seeds=[3, 4])
    assert result.params["steps"] == [counts[i], counts[j]]
    for k, (prompt, count, seed) in enumerate(zip(pair, (counts[i], counts[j]), (3, 4))):
        alone = unet_pipe([prompt], steps=count, seeds=[seed]).pixels[0]
        assert torch.allclose(result.pixels[k], alone, atol=1e-4)
    assert result.nfe == round((counts[i] + counts[j]) / 2)


@pytest.mark.parametrize("limit", [50, 70])
def test_a_time_limit_mid_search_still_chooses_among_what_met_the_budget(monkeypatch, limit):
    """The clock runs out part-way (one tick per clock check: 50 ends the first rung early, 70
    the second): the search stops and still returns a candidate that met the budget on the
    prompts it was evaluated on, after fewer evaluations than the whole search."""
    import sdinfer.tune.search as search_module

    space = table_space()
    whole = search(space, parse_budget("psnr=32"), TableEvaluator(space, seed=2), first_rung=4)
    ev = TableEvaluator(space, seed=2)
    ticks = iter(range(100_000))
    monkeypatch.setattr(search_module.time, "monotonic", lambda: next(ticks) * 1.0)
    result = search(space, parse_budget("psnr=32"), ev, first_rung=4, time_limit_s=limit)
    assert result.stopped_early and result.chosen is not None
    assert result.chosen_quality.psnr >= 32
    assert len(result.evaluations) < len(whole.evaluations)
    assert any("time limit" in line for line in result.log)
