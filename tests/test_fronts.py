"""Pareto fronts against the caching peers: the front, our front read at a peer's PSNR, the ratio
and its verdict (sdinfer.eval.pareto), the comparison records of bench/fronts.py and their table in
bench/report.py, on constructed numbers (the peers themselves are never imported here)."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from sdinfer.eval.pareto import Point, achieved_at, compare, comparison_dict, front, speedup_at

ROOT = Path(__file__).resolve().parent.parent


def load_script(name: str):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module   # its dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return module


@pytest.fixture(scope="module")
def fronts():
    return load_script("fronts")


@pytest.fixture(scope="module")
def report():
    return load_script("report")


OURS = [Point(1.5, 50.0, "a"), Point(2.0, 40.0, "b"), Point(3.0, 30.0, "c"),
        Point(1.8, 38.0, "dominated by b"), Point(2.5, 29.0, "dominated by c")]


def test_front_keeps_the_undominated_points_by_psnr():
    assert [p.label for p in front(OURS)] == ["c", "b", "a"]
    assert front([Point(2.0, 40.0, "x"), Point(2.0, 40.0, "y")]) == [Point(2.0, 40.0, "x")]   # equal: one kept
    # better on one count only: both stay
    assert {p.label for p in front([Point(2.0, 40.0, "x"), Point(2.0, 41.0, "y"), Point(2.1, 40.0, "z")])} \
        == {"y", "z"}


def test_our_speedup_at_a_psnr_is_linear_between_front_points():
    assert speedup_at(OURS, 35.0) == (pytest.approx(2.5), "inside")    # halfway between c and b
    assert speedup_at(OURS, 48.0) == (pytest.approx(1.6), "inside")    # a fifth of the way from a to b
    assert speedup_at(OURS, 40.0) == (pytest.approx(2.0), "inside")    # on a point
    assert speedup_at(OURS, 25.0) == (3.0, "below")                    # our fastest point, sharper than asked
    assert speedup_at(OURS, 51.0) == (None, "above")                   # a PSNR our front does not reach
    assert speedup_at([Point(2.0, 40.0)], 40.0) == (2.0, "inside")
    with pytest.raises(ValueError):
        speedup_at([], 40.0)


def test_achieved_is_the_fastest_measured_point_at_or_above_the_psnr():
    assert achieved_at(OURS, 35.0).label == "b"      # interpolation says 2.5x, a real setting gives 2.0x
    assert achieved_at(OURS, 30.0).label == "c"
    assert achieved_at(OURS, 60.0) is None


def test_ratio_min_median_and_a_met_target():
    peer = [Point(1.5, 45.0, "p1"), Point(2.0, 35.0, "p2"), Point(1.0, 30.0, "dominated")]
    c = compare(OURS, peer, target=1.2)
    assert [p.peer.label for p in c.points] == ["p2", "p1"]            # the peer's front only
    assert [p.ratio for p in c.points] == pytest.approx([2.5 / 2.0, 1.75 / 1.5])
    assert c.min_ratio == pytest.approx(1.75 / 1.5) and c.median_ratio == pytest.approx((1.25 + 1.75 / 1.5) / 2)
    assert not c.meets                                                 # 1.167 < 1.2
    assert "short of x1.2 by 3%" in c.verdict() and "at 45.0 dB" in c.verdict()
    assert compare(OURS, peer, target=1.1).meets
    assert compare(OURS, peer, target=1.1).verdict().startswith("meets x1.1: min x1.17 at 45.0 dB")


def test_a_peer_point_above_our_front_fails_the_target_and_says_so():
    peer = [Point(1.1, 55.0, "sharper than ours"), Point(2.0, 35.0, "fast")]
    c = compare(OURS, peer, target=1.2)
    assert [p.where for p in c.points] == ["inside", "above"]
    assert c.min_ratio == pytest.approx(1.25) and not c.meets      # 1.25 >= 1.2, but one point not reached
    assert "1 peer point(s) above our front's best PSNR 50.0 dB (55.0 dB): not reached" in c.verdict()


def test_a_peer_point_below_our_front_is_a_lower_bound():
    c = compare(OURS, [Point(4.0, 20.0, "fast and blurry")], target=1.2)
    (p,) = c.points
    assert p.where == "below" and p.bound and p.ratio == pytest.approx(0.75)
    assert "(a lower bound)" in c.verdict() and "short of x1.2 by 60%" in c.verdict()
    d = comparison_dict(c)
    assert d["min_is_bound"] and d["points"][0]["achieved"]["config"] == "c"
    json.dumps(d, allow_nan=False)


def record(side, family, config, speedup, psnr, status="ok"):
    return {"side": side, "family": family, "config": config, "speedup_wall": speedup, "psnr": psnr,
            "status": status, "version": "1.0"}


RECORDS = [
    {"side": "baseline", "family": "uncached", "config": "uncached", "speedup_wall": 1.0, "psnr": 100.0,
     "status": "ok"},
    record("peer", "DeepCache", "helper interval=2", 1.8, 40.0),
    record("peer", "DeepCache", "helper interval=4", 2.8, 31.0),
    record("peer", "T-GATE", "loader gate=10", 1.3, 25.0),
    record("ours", "deepcache", "deepcache:interval=2,layer=0", 1.9, 40.0),
    record("ours", "deepcache", "deepcache:interval=4,layer=0", 2.9, 31.0),
    record("ours", "taylorseer", "taylorseer:interval=3,order=2", 2.4, 50.0),
    record("ours", "tgate", "tgate:gate_step=10", 1.4, 25.0),
    record("ours", "l2c", "l2c:budget=0.2", None, None, status="skipped: routers for 50 steps only"),
]


def test_compare_fronts_reads_each_peer_on_all_our_caches_and_on_its_twin(fronts):
    families = [f for f in fronts.PEER_FAMILIES if f.model == "unet"]
    out_fronts, rows = fronts.compare_fronts(RECORDS, families, target=1.2)
    assert [p["config"] for p in out_fronts["ours: all caches"]] == [   # T-GATE's 1.4x at 25 dB is dominated
        "deepcache:interval=4,layer=0", "taylorseer:interval=3,order=2"]
    assert [p["config"] for p in out_fronts["ours: deepcache"]] == [
        "deepcache:interval=4,layer=0", "deepcache:interval=2,layer=0"]
    deep = next(r for r in rows if r["peer"] == "DeepCache")
    # same method: the same PSNRs, ours a little faster: x1.06 and x1.04, short of 1.2
    assert deep["against_same"]["min_ratio"] == pytest.approx(2.9 / 2.8, abs=1e-4)
    assert not deep["against_same"]["meets"]
    # all caches: TaylorSeer's 2.4x at 50 dB lifts our front above 31 dB
    at40 = next(p for p in deep["against_all"]["points"] if p["peer"]["psnr"] == 40.0)
    assert at40["ours_speedup"] == pytest.approx(2.9 - 0.5 * (9 / 19), abs=1e-4)
    assert at40["achieved"]["config"] == "taylorseer:interval=3,order=2"
    tgate = next(r for r in rows if r["peer"] == "T-GATE")
    (point,) = tgate["against_all"]["points"]   # 25 dB: below our front, our fastest point is a bound
    assert point["where"] == "below" and point["ratio"] == pytest.approx(2.9 / 1.3, abs=1e-4)
    assert tgate["against_all"]["min_is_bound"] and tgate["against_all"]["meets"]
    assert tgate["against_same"]["min_ratio"] == pytest.approx(1.4 / 1.3, abs=1e-4)


def test_a_peer_that_does_not_run_is_a_row_with_its_reason(fronts):
    families = [f for f in fronts.PEER_FAMILIES if f.model == "dit"]
    records = [record("peer", "FirstBlockCache", "diffusers FBC 0.08", None, None,
                      status="does not run: TypeError: unsupported operand"),
               record("ours", "fbcache", "fbcache:threshold=0.08", 1.6, 44.0)]
    _, rows = fronts.compare_fronts(records, families)
    assert rows == [{"peer": "FirstBlockCache", "package": "diffusers", "version": "1.0", "ours_methods": ["fbcache"],
                     "note": "", "peer_points": 1, "peer_ran": 0, "peer_identical": 0, "peer_front": [],
                     "status": "does not run: TypeError: unsupported operand"}]


def test_settings_that_skip_nothing_are_left_out_of_the_fronts(fronts):
    """PSNR at the cap: the uncached images, so only hook overhead to compare, and a front through
    100 dB would interpolate across tens of dB."""
    families = [f for f in fronts.PEER_FAMILIES if f.model == "dit"]
    records = [record("peer", "DBCache", "cache-dit F1B0 0.02", 1.02, 100.0),
               record("peer", "DBCache", "cache-dit F1B0 0.15", 2.0, 36.0),
               record("peer", "MagCache", "diffusers MagCache 0.001", 0.98, 100.0),
               record("ours", "dbcache", "dbcache:threshold=0.02", 1.05, 100.0),
               record("ours", "dbcache", "dbcache:threshold=0.2", 2.2, 37.0)]
    out_fronts, rows = fronts.compare_fronts(records, families)
    assert [p["config"] for p in out_fronts["ours: all caches"]] == ["dbcache:threshold=0.2"]
    db = next(r for r in rows if r["peer"] == "DBCache")
    assert db["peer_ran"] == 2 and db["peer_identical"] == 1
    assert [p["peer"]["config"] for p in db["against_same"]["points"]] == ["cache-dit F1B0 0.15"]
    assert db["against_same"]["min_ratio"] == pytest.approx(1.1)   # 2.2x at 37 dB is >= 36 dB: a bound
    mag = next(r for r in rows if r["peer"] == "MagCache")
    assert "no step skipped" in mag["status"] and "against_all" not in mag


def test_the_sweeps_are_valid_specs_and_the_smoke_sweep_is_small(fronts):
    from sdinfer.cache import parse_spec

    for model in ("unet", "dit"):
        full = fronts.configs(model, 50, smoke=False, only=None)
        for c in full:
            if c.side == "ours":
                parse_spec(c.label)   # a typo in a knob would only show in the long run otherwise
        peers_ = {c.family for c in full if c.side == "peer"}
        assert peers_ == {f.name for f in fronts.PEER_FAMILIES if f.model == model}
        for fam in fronts.PEER_FAMILIES:   # every comparable method of ours is swept on the peer's model
            if fam.model == model:
                assert set(fam.ours) <= {c.family for c in full if c.side == "ours"}
        smoke = fronts.configs(model, 10, smoke=True, only=None)
        per_family = Counter((c.side, c.family) for c in smoke)
        assert len(smoke) < len(full) and max(per_family.values()) == 2
        comparable = {m for f in fronts.PEER_FAMILIES if f.model == model for m in f.ours}
        assert {c.family for c in smoke if c.side == "ours"} == comparable
    only = fronts.configs("unet", 50, smoke=False, only=["T-GATE"])
    assert {(c.side, c.family) for c in only} == {("peer", "T-GATE"), ("ours", "tgate")}
    assert fronts.gate_steps(10) == [2, 5, 8] and fronts.gate_steps(50) == [10, 25, 40]


def test_report_builds_the_fronts_table_from_the_json(fronts, report, tmp_path, monkeypatch):
    _, rows = fronts.compare_fronts(RECORDS, [f for f in fronts.PEER_FAMILIES if f.model == "unet"])
    meta = {"model": "unet", "prompts": 16, "repeats": 2, "timing_noise": 0.021, "date": "2026-12-07"}
    (tmp_path / "fronts-unet.json").write_text(json.dumps({"meta": meta, "comparisons": rows}))
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    table = report.table("fronts").splitlines()
    assert len(table) == 4   # head, rule, DeepCache, T-GATE
    deep = table[2]
    assert "| unet | DeepCache (DeepCache 1.0) | 2 points: 1.80x at 40.0 dB ... 2.80x at 31.0 dB |" in deep
    assert "`deepcache`: x1.04 / x1.05 | not x1.2: short by 16% at 31.0 dB |" in deep
    assert "16 prompts, 2 timed runs, noise 2%, 2026-12-07" in deep
    monkeypatch.setattr(report, "RESULTS", tmp_path / "none")
    with pytest.raises(SystemExit, match="bench/fronts.sh"):
        report.table("fronts")
