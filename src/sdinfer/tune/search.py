"""The search of ``sdinfer tune``: the cheapest candidate that meets a quality budget, found with
far fewer evaluations than the grid of all combinations.

Quality is near-monotone in the step count, and cost is monotone in it.  So for every setting
of the other axes (sampler, grid, first step, cache and knob, ...) the question is the fewest
steps that meet the budget: a binary search over the setting's step counts.  Three things make
it cheaper than the grid and keep it honest:

1. successive halving over the validation prompts (Jamieson & Talwalkar 2016; Li et al.,
   Hyperband, 2018): the binary searches run on the first ``first_rung`` prompts; the survivors,
   ranked by the cost model at their step count, go on to ``eta`` times as many prompts, where a
   survivor that no longer meets the budget walks up its step counts until it does again; a
   fraction ``1/eta`` of them (at least ``finalists``) survives each rung, and the last rung is
   every validation prompt.  A survivor that meets the budget there tries the step counts below
   its own too (a few prompts can fail what more prompts pass).  Before the last rung a
   candidate passes on ``Budget.plausible`` (an adherence drop within ``z`` standard errors of
   the budget: on 8 prompts one prompt is 12.5 points), on the last rung only on the budget
   itself.  Images already made for a candidate are reused on the next rung
   (the rungs' prompts are prefixes of one list), so a rung costs only its new prompts.
2. a cost bound on the binary search (branch and bound): a setting's range is cut to the step
   counts whose cost is below the cost of the ``keep``-th cheapest candidate that has already
   passed the first rung (``keep``: how many the first rung passes on, at least twice the
   finalists, since a few prompts' optimism ranks them roughly), since none
   above it could survive the first rung's cut.  Settings are searched cheapest-first so the
   bound tightens early.
3. the finalists are timed against the reference (``Evaluator.measure``, interleaved) and the
   fastest in measured wall time wins; the cost model (MACs) only screens.

``exhaustive`` evaluates every candidate on every validation prompt and takes the cheapest that
meets the budget: the comparison the search is tested against.  An ``Evaluator`` is anything
with ``quality(candidate, n)``, ``cost(candidate)``, ``reference_cost`` and
``measure(candidates)``; ``evaluate.ModelEvaluator`` runs a model, the tests use tables.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Protocol

from .budget import Budget, Quality
from .space import Candidate, Space


class Evaluator(Protocol):
    prompts: int            # validation prompts available
    reference_cost: float

    def quality(self, candidate: Candidate, n: int) -> Quality: ...
    def cost(self, candidate: Candidate) -> float: ...
    def measure(self, candidates: list[Candidate]) -> list[dict]: ...   # each with "speedup_wall"


@dataclass
class Evaluation:
    candidate: Candidate
    quality: Quality
    cost: float
    meets: bool
    passes: bool = False    # what the rung's decision read: ``meets`` on the last rung, ``plausible`` before


@dataclass
class TuneResult:
    chosen: Candidate | None
    chosen_quality: Quality | None
    chosen_measurement: dict | None
    evaluations: list[Evaluation]        # every quality evaluation, in order
    measured: list[tuple[Candidate, dict]]
    best_missing: Evaluation | None      # when nothing meets: the nearest to the budget
    stopped_early: bool = False
    rungs: list[int] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    @property
    def images(self) -> int:
        """Images generated for quality: each evaluation's prompts beyond the same candidate's
        previous evaluations (those images are reused)."""
        seen: dict[Candidate, int] = {}
        total = 0
        for e in self.evaluations:
            before = seen.get(e.candidate, 0)
            total += max(0, e.quality.prompts - before)
            seen[e.candidate] = max(before, e.quality.prompts)
        return total

    def latest(self) -> dict[Candidate, Evaluation]:
        """Each candidate's evaluation on the most prompts."""
        out: dict[Candidate, Evaluation] = {}
        for e in self.evaluations:
            if e.candidate not in out or e.quality.prompts >= out[e.candidate].quality.prompts:
                out[e.candidate] = e
        return out


def rung_sizes(total: int, first: int, eta: int) -> list[int]:
    """Prompts per rung: ``first``, ``first * eta``, ... below ``total``, then ``total``."""
    sizes, n = [], max(1, min(first, total))
    while n < total:
        sizes.append(n)
        n *= eta
    return sizes + [total]


class _Clock:
    def __init__(self, limit_s: float | None):
        self.deadline = None if limit_s is None else time.monotonic() + limit_s

    def over(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


def search(space: Space, budget: Budget, evaluator: Evaluator, first_rung: int = 8, eta: int = 4,
           finalists: int = 3, time_limit_s: float | None = None, z: float = 1.0,
           log=lambda message: None) -> TuneResult:
    """The cheapest candidate of ``space`` meeting ``budget`` (see the module docstring)."""
    clock = _Clock(time_limit_s)
    evaluations: list[Evaluation] = []
    cache: dict[tuple[Candidate, int], Evaluation] = {}
    result = TuneResult(None, None, None, evaluations, [], None, rungs=rung_sizes(evaluator.prompts, first_rung, eta))
    rungs = result.rungs

    def say(message: str) -> None:
        result.log.append(message)
        log(message)

    def evaluate(c: Candidate, n: int) -> Evaluation:
        if (c, n) not in cache:
            q = evaluator.quality(c, n)
            meets = budget.meets(q)
            e = Evaluation(c, q, evaluator.cost(c), meets, meets if n >= rungs[-1] else budget.plausible(q, z))
            evaluations.append(e)
            cache[(c, n)] = e
        return cache[(c, n)]

    # rung 0: the fewest steps per setting, cheapest settings first, bounded by the keep-th best
    n0 = rungs[0]
    keep = max(2 * finalists, math.ceil(len(space.settings()) / eta)) if len(rungs) > 1 else finalists
    passed: list[Evaluation] = []
    searched = 0
    settings = space.settings()
    settings.sort(key=lambda s: evaluator.cost(Candidate(s, space.steps_for(s)[0])))
    for setting in settings:
        if clock.over():
            result.stopped_early = True
            say("time limit reached during the first rung; stopping with what met the budget so far")
            break
        bound = sorted(e.cost for e in passed)[keep - 1] if len(passed) >= keep else math.inf
        counts = list(space.steps_for(setting))
        if bound < math.inf:   # cost grows with the steps: cut at the first count at or above the bound
            cut = next((i for i, n in enumerate(counts) if evaluator.cost(Candidate(setting, n)) >= bound), len(counts))
            counts = counts[:cut]
        best = _fewest_steps(setting, counts, lambda c: evaluate(c, n0))
        searched += 1
        log(f"  [{searched}/{len(settings)}] {setting.label}: "
            + (f"{best.candidate.steps} steps pass on {n0} prompts" if best else
               "no step count below the bound passes" if bound < math.inf else "no step count passes"))
        if best is not None:
            passed.append(best)
    for setting in space.per_prompt:
        if not clock.over():
            e = evaluate(Candidate(setting, "auto"), n0)
            if e.passes:
                passed.append(e)
    say(f"rung 1: {searched} of {len(settings)} settings searched on {n0} prompts, {len(passed)} pass"
        + (f" (the budget, or an adherence drop within {z:g} standard errors of it)" if len(rungs) > 1 else ""))

    # later rungs: the cheapest survivors on more prompts, walking up their steps where they now miss
    survivors = sorted(passed, key=lambda e: e.cost)[:keep]
    for r, n in enumerate(rungs[1:], start=2):
        if clock.over():
            result.stopped_early = True
            say(f"time limit reached before rung {r}; stopping with rung {r - 1}'s survivors")
            break
        kept = []
        for e in survivors:
            if clock.over():
                result.stopped_early = True
                break
            moved = _walk_up(space, e.candidate, lambda c: evaluate(c, n))
            if moved is not None:
                kept.append(moved)
        if result.stopped_early and not kept:
            say(f"time limit reached during rung {r} before any survivor was settled; keeping rung {r - 1}'s")
            break
        count = finalists if r == len(rungs) or result.stopped_early else max(finalists, math.ceil(len(kept) / eta))
        survivors = sorted(kept, key=lambda e: e.cost)[:count]
        say(f"rung {r}: {len(kept)} of the survivors {'meet the budget' if n >= rungs[-1] else 'pass'} on {n} prompts, "
            f"{len(survivors)} go on")
        if result.stopped_early:
            say(f"time limit reached during rung {r}; choosing among the survivors it settled")
            break

    if not survivors:
        result.best_missing = min(evaluations, key=lambda e: (budget.shortfall(e.quality), -e.quality.prompts,
                                                               e.cost), default=None)
        return result
    survivors = survivors[:finalists]
    measurements = evaluator.measure([e.candidate for e in survivors])
    result.measured = [(e.candidate, m) for e, m in zip(survivors, measurements)]
    best = max(range(len(survivors)), key=lambda i: measurements[i]["speedup_wall"])
    result.chosen = survivors[best].candidate
    result.chosen_quality = survivors[best].quality
    result.chosen_measurement = measurements[best]
    return result


def _fewest_steps(setting, counts: list, evaluate) -> Evaluation | None:
    """Binary search for the smallest of ``counts`` meeting the budget (quality near-monotone)."""
    lo, hi, best = 0, len(counts) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        e = evaluate(Candidate(setting, counts[mid]))
        if e.passes:
            best, hi = e, mid - 1
        else:
            lo = mid + 1
    return best


def _walk_up(space: Space, candidate: Candidate, evaluate) -> Evaluation | None:
    """``candidate`` settled on the next rung's prompts: where it misses there, the fewest step
    counts above it that pass (a binary search); where it passes, the fewest below it that pass
    too (the earlier rung's few prompts can fail a candidate that more prompts pass)."""
    e = evaluate(candidate)
    if candidate.steps == "auto":
        return e if e.passes else None
    counts = space.steps_for(candidate.setting)
    if e.passes:
        lower = _fewest_steps(candidate.setting, [n for n in counts if n < candidate.steps], evaluate)
        return lower or e
    return _fewest_steps(candidate.setting, [n for n in counts if n > candidate.steps], evaluate)


def exhaustive(space: Space, budget: Budget, evaluator: Evaluator) -> tuple[Evaluation | None, int]:
    """Every candidate on every validation prompt; the cheapest meeting ``budget`` (by the cost
    model) and how many evaluations that took."""
    n = evaluator.prompts
    evaluated = []
    for c in space.candidates():
        q = evaluator.quality(c, n)
        evaluated.append(Evaluation(c, q, evaluator.cost(c), budget.meets(q), budget.meets(q)))
    meeting = [e for e in evaluated if e.meets]
    return (min(meeting, key=lambda e: e.cost) if meeting else None), len(evaluated)
