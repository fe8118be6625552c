"""Quality budgets for ``sdinfer tune``: floors against the reference run on validation prompts.

A budget is one or more comma-separated ``NAME=VALUE`` terms:

- ``adherence-drop=D``: the prompt adherence (shapes checker) may fall at most ``D`` (a fraction,
  0.02 = 2 points) below the reference run's on the same prompts;
- ``psnr=DB``: mean PSNR against the reference images at least ``DB`` dB;
- ``ssim=S``: mean SSIM against the reference images at least ``S``.

``Quality`` holds one configuration's measurements on a prompt set; ``Budget.meets`` reads them,
``Budget.shortfall`` says how far a configuration is from the budget (0 when it meets it), which
is how the best of the configurations that miss it is named.

``Budget.plausible`` is the test for a search's early rungs, on few prompts: an adherence drop
passes while the budget lies within ``z`` standard errors of it.  The drop is a paired difference
of two pass/fail rates on the same prompts; its standard error is ``sqrt(d) / n`` for ``d``
discordant prompts (those exactly one of the two runs gets right; McNemar's test, normal
approximation).  On 8 prompts one failed prompt is a 12.5-point drop: the point estimate would
discard a configuration that more prompts show within a 2-point budget.  PSNR and SSIM are means
of per-image values that move far less between prompt sets: their early test is the budget's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..errors import UserError

FORMS = "adherence-drop=0.02, psnr=35 or ssim=0.9 (several joined by commas, e.g. psnr=30,adherence-drop=0.02)"
NAMES = ("adherence-drop", "psnr", "ssim")


@dataclass(frozen=True)
class Quality:
    """A configuration's quality on ``prompts`` validation prompts against the reference."""

    psnr: float
    ssim: float
    adherence: float | None            # the configuration's adherence rate (None: prompts not checkable)
    reference_adherence: float | None  # the reference's on the same prompts
    prompts: int
    discordant: int | None = None      # prompts exactly one of the configuration and the reference adheres to

    @property
    def adherence_drop(self) -> float | None:
        if self.adherence is None or self.reference_adherence is None:
            return None
        return self.reference_adherence - self.adherence

    def as_dict(self) -> dict:
        out = {k: (None if v is None else round(v, 5) if isinstance(v, float) else v) for k, v in asdict(self).items()}
        drop = self.adherence_drop
        out["adherence_drop"] = None if drop is None else round(drop, 5)
        return out

    def value(self, name: str) -> float | None:
        """The measure a budget term reads: ``adherence-drop``, ``psnr`` or ``ssim``."""
        return {"adherence-drop": self.adherence_drop, "psnr": self.psnr, "ssim": self.ssim}[name]


@dataclass(frozen=True)
class Term:
    name: str     # one of NAMES
    limit: float

    @property
    def higher_is_better(self) -> bool:
        return self.name != "adherence-drop"

    def meets(self, q: Quality) -> bool:
        value = q.value(self.name)
        if value is None:
            return False
        return value >= self.limit - 1e-9 if self.higher_is_better else value <= self.limit + 1e-9

    def plausible(self, q: Quality, z: float) -> bool:
        """Met, or (an adherence drop) within ``z`` standard errors of the limit."""
        if self.meets(q):
            return True
        if self.name != "adherence-drop" or q.discordant is None or q.adherence_drop is None or not q.prompts:
            return False
        return q.adherence_drop - z * math.sqrt(q.discordant) / q.prompts <= self.limit + 1e-9

    def shortfall(self, q: Quality) -> float:
        """How far short of the limit, in units of the term's scale (0 when met)."""
        value = q.value(self.name)
        if value is None:
            return math.inf
        scale = {"adherence-drop": 0.01, "psnr": 1.0, "ssim": 0.01}[self.name]
        gap = self.limit - value if self.higher_is_better else value - self.limit
        return max(0.0, gap) / scale

    def __str__(self) -> str:
        return f"{self.name}={self.limit:g}"


@dataclass(frozen=True)
class Budget:
    terms: tuple[Term, ...]

    @property
    def needs_adherence(self) -> bool:
        return any(t.name == "adherence-drop" for t in self.terms)

    @property
    def primary(self) -> str:
        """The measure of the first term: the quality axis of the front."""
        return self.terms[0].name

    def meets(self, q: Quality) -> bool:
        return all(t.meets(q) for t in self.terms)

    def plausible(self, q: Quality, z: float) -> bool:
        """Every term met or, for an adherence drop, within ``z`` standard errors (module docstring)."""
        return all(t.plausible(q, z) for t in self.terms)

    def shortfall(self, q: Quality) -> float:
        """The summed shortfall over the terms (points of adherence, dB, hundredths of SSIM)."""
        return sum(t.shortfall(q) for t in self.terms)

    def describe(self, q: Quality) -> str:
        """The budget's measures of ``q``, e.g. ``adherence drop 0.031 (limit 0.02), psnr 31.2 dB``."""
        parts = []
        for t in self.terms:
            value = q.value(t.name)
            shown = "not measurable" if value is None else (f"{value:.2f} dB" if t.name == "psnr" else f"{value:.4f}")
            parts.append(f"{t.name.replace('-', ' ')} {shown} (limit {t.limit:g})")
        return ", ".join(parts) + f" on {q.prompts} validation prompts"

    def __str__(self) -> str:
        return ",".join(str(t) for t in self.terms)


def parse_budget(text: str) -> Budget:
    """``adherence-drop=0.02``, ``psnr=35``, ``ssim=0.9``, several comma-separated; anything else is
    one ``UserError`` naming the valid forms."""
    def bad(why: str) -> UserError:
        return UserError(f"budget {text!r}: {why}; write {FORMS}")

    terms: list[Term] = []
    items = [item.strip() for item in str(text).split(",")]
    if not any(items):
        raise bad("it is empty")
    for item in items:
        name, eq, value = item.partition("=")
        name = name.strip().lower()
        if not eq or not name:
            raise bad(f"{item!r} is not NAME=VALUE")
        if name not in NAMES:
            raise bad(f"unknown measure {name!r}")
        if any(t.name == name for t in terms):
            raise bad(f"{name} is given twice")
        try:
            limit = float(value)
        except ValueError:
            raise bad(f"{value.strip()!r} is not a number") from None
        if not math.isfinite(limit):
            raise bad(f"{name} needs a finite number")
        if name == "adherence-drop" and not 0 <= limit <= 1:
            raise bad(f"adherence-drop is a fraction from 0 to 1 (0.02 = 2 points), not {limit:g}")
        if name == "ssim" and not 0 < limit <= 1:
            raise bad(f"ssim is from 0 to 1, not {limit:g}")
        if name == "psnr" and limit <= 0:
            raise bad(f"psnr is a positive number of dB, not {limit:g}")
        terms.append(Term(name, limit))
    return Budget(tuple(terms))
