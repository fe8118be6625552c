"""Pareto fronts of speed-up against quality, and one front read at another's points.

A configuration is a point (speed-up, PSNR); both higher is better.  Its front is the set of
points no other point beats on both (``front``).  To compare two methods' fronts, each point of
one (the peer's) is read on the other (ours): ``speedup_at`` interpolates our front linearly in
PSNR between its two neighbouring points, which is what our front would give at exactly the
peer's PSNR if the knob between two measured settings traded linearly; ``achieved_at`` is the
fastest of our measured points that keeps at least the peer's PSNR (no interpolation: a
configuration that exists).  ``compare`` gives, per peer front point, our speed-up there over the
peer's, and the row's minimum and median ratio against a target.

Outside our front's PSNR range there is nothing to interpolate:
- the peer's PSNR below all of ours: our fastest point is both faster-or-not and sharper, so its
  ratio is a lower bound of ours at the peer's PSNR (``where="below"``, ``bound=True``);
- the peer's PSNR above all of ours: our front does not reach that quality (``where="above"``,
  no ratio); the comparison then fails the target whatever the other points say.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Point:
    speedup: float
    psnr: float
    label: str = ""


def dominates(a: Point, b: Point) -> bool:
    """``a`` is at least as good as ``b`` on both counts and better on one."""
    return a.speedup >= b.speedup and a.psnr >= b.psnr and (a.speedup > b.speedup or a.psnr > b.psnr)


def front(points: list[Point]) -> list[Point]:
    """The points no other point dominates, by PSNR ascending (so speed-up descending); of points
    equal on both counts the first listed is kept."""
    kept: list[Point] = []
    for p in points:
        if any(dominates(q, p) for q in points) or any((q.speedup, q.psnr) == (p.speedup, p.psnr) for q in kept):
            continue
        kept.append(p)
    return sorted(kept, key=lambda p: (p.psnr, -p.speedup))


def speedup_at(ours: list[Point], psnr: float) -> tuple[float | None, str]:
    """Our front's speed-up at ``psnr``, linear in PSNR between the two front points around it;
    and where ``psnr`` lies: ``"inside"`` our front's PSNR range, ``"below"`` it (the speed-up is
    our fastest point's) or ``"above"`` it (None: our front does not reach that PSNR)."""
    pts = front(ours)
    if not pts:
        raise ValueError("an empty front has no speed-up at any PSNR")
    if psnr > pts[-1].psnr:
        return None, "above"
    if psnr < pts[0].psnr:
        return pts[0].speedup, "below"
    for lo, hi in zip(pts, pts[1:]):
        if lo.psnr <= psnr <= hi.psnr:
            share = (psnr - lo.psnr) / (hi.psnr - lo.psnr)
            return lo.speedup + share * (hi.speedup - lo.speedup), "inside"
    return pts[0].speedup, "inside"   # a one-point front, at exactly its PSNR


def achieved_at(ours: list[Point], psnr: float) -> Point | None:
    """Our fastest measured point with PSNR >= ``psnr`` (None if none reaches it)."""
    return max((p for p in ours if p.psnr >= psnr), key=lambda p: p.speedup, default=None)


@dataclass
class PointComparison:
    peer: Point
    ours_speedup: float | None   # interpolated on our front (below: our fastest point's)
    where: str                   # inside | below | above
    achieved: Point | None       # our fastest measured point at >= the peer's PSNR

    @property
    def ratio(self) -> float | None:
        return None if self.ours_speedup is None else self.ours_speedup / self.peer.speedup

    @property
    def bound(self) -> bool:
        """The ratio is a lower bound (the peer's PSNR is below our front's)."""
        return self.where == "below"

    @property
    def achieved_ratio(self) -> float | None:
        return None if self.achieved is None else self.achieved.speedup / self.peer.speedup


@dataclass
class Comparison:
    points: list[PointComparison]
    target: float
    ours_front: list[Point] = field(default_factory=list)
    peer_front: list[Point] = field(default_factory=list)

    @property
    def ratios(self) -> list[float]:
        return [p.ratio for p in self.points if p.ratio is not None]

    @property
    def min_ratio(self) -> float | None:
        return min(self.ratios, default=None)

    @property
    def median_ratio(self) -> float | None:
        return statistics.median(self.ratios) if self.ratios else None

    @property
    def above(self) -> list[PointComparison]:
        return [p for p in self.points if p.where == "above"]

    @property
    def meets(self) -> bool:
        """Every peer front point is read on our front and the smallest ratio reaches the target."""
        return bool(self.points) and not self.above and self.min_ratio is not None \
            and self.min_ratio >= self.target

    def verdict(self) -> str:
        """One line: whether ours reaches ``target`` times the peer's wall speed-up at the peer's
        PSNR on every point of its front, and by how much it does not."""
        if not self.points:
            return "no peer point to compare"
        parts = []
        if self.min_ratio is not None:
            worst = min((p for p in self.points if p.ratio is not None), key=lambda p: p.ratio)
            at = f"min x{self.min_ratio:.2f} at {worst.peer.psnr:.1f} dB" + (" (a lower bound)" if worst.bound else "")
            parts.append(f"{at}, median x{self.median_ratio:.2f}")
            if self.min_ratio < self.target:
                parts.append(f"short of x{self.target:g} by {self.target / self.min_ratio - 1:.0%} "
                             f"(ours {self.min_ratio / self.target:.0%} of the target there)")
        if self.above:
            best = max(self.ours_front, key=lambda p: p.psnr)
            psnrs = ", ".join(f"{p.peer.psnr:.1f}" for p in self.above)
            parts.append(f"{len(self.above)} peer point(s) above our front's best PSNR {best.psnr:.1f} dB "
                         f"({psnrs} dB): not reached")
        outcome = f"meets x{self.target:g}" if self.meets else f"does not meet x{self.target:g}"
        return f"{outcome}: " + "; ".join(parts)


def compare(ours: list[Point], peer: list[Point], target: float = 1.2) -> Comparison:
    """Each point of the peer's front read on our front (see the module docstring)."""
    ours_front, peer_front = front(ours), front(peer)
    if not ours_front:
        raise ValueError("our side has no point to compare with")
    points = []
    for p in peer_front:
        speed, where = speedup_at(ours_front, p.psnr)
        points.append(PointComparison(peer=p, ours_speedup=speed, where=where, achieved=achieved_at(ours, p.psnr)))
    return Comparison(points=points, target=target, ours_front=ours_front, peer_front=peer_front)


def point_dict(p: Point) -> dict:
    return {"config": p.label, "speedup_wall": p.speedup, "psnr": p.psnr}


def _rounded(value: float | None, places: int = 4) -> float | None:
    return None if value is None else round(value, places)


def comparison_dict(c: Comparison) -> dict:
    """A comparison as JSON: its front points read on ours, the minimum and median ratio, the verdict."""
    return {
        "target": c.target,
        "min_ratio": _rounded(c.min_ratio),
        "median_ratio": _rounded(c.median_ratio),
        "min_is_bound": bool(c.points) and c.min_ratio is not None
                        and min((p for p in c.points if p.ratio is not None), key=lambda p: p.ratio).bound,
        "above_our_front": len(c.above),
        "meets": c.meets,
        "verdict": c.verdict(),
        "ours_front": [point_dict(p) for p in c.ours_front],
        "points": [{"peer": point_dict(p.peer), "where": p.where, "ours_speedup": _rounded(p.ours_speedup),
                    "ratio": _rounded(p.ratio), "bound": p.bound,
                    "achieved": None if p.achieved is None else point_dict(p.achieved),
                    "achieved_ratio": _rounded(p.achieved_ratio)} for p in c.points],
    }
