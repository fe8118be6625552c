"""Pareto fronts of the caching peers against sdinfer's caches on the two default models.

    python bench/fronts.py                                     # the full run (bench/fronts.sh)
    python bench/fronts.py --limit 2 --steps 10 --sweep smoke  # a smoke run (under a minute)

bench/peers.py compares same-knob pairs: equal computation, not which front is better.  Here
every peer cache that runs on the model gets a sweep of its knob, and each of sdinfer's caches a
sweep of its own, in the same loop as bench/peers.py (its ``LOOPS``: the UNet inside diffusers'
StableDiffusionPipeline, where DeepCache's helper and T-GATE's loader work; the DiT in sdinfer's
loop with the peers' hooks fed its step context), on the same held-out prompts and seeds, DDIM,
cfg 4.  The uncached run and every configuration are measured together by
``sdinfer.eval.bench.measure_all`` (timed runs interleaved, so all wall speed-ups share one
baseline); each configuration is first tried on one prompt, and one that fails is a record
saying why (its own error), not a run that stops.

From the records (``compare_fronts``, via ``sdinfer.eval.pareto``): the Pareto front of each peer
(wall speed-up against PSNR to the uncached images), of all our caches together (the best we
offer on the model) and of each of our methods; per peer, every point of its front read on our
front (our wall speed-up at the peer's PSNR, linear in PSNR between our front's neighbouring
points; outside our front's PSNR range there is no interpolation, and the record says so) and
the ratio ours / peer, its minimum and median against ``--target`` (1.2x), once against all our
caches and once against our comparable method.  Writes ``bench/results/fronts-MODEL.json`` (and
``.png`` where matplotlib is installed); BENCHMARKS.md's ``fronts`` table is built from them by
bench/report.py.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench/peers.py, when imported from elsewhere
import peers  # noqa: E402

import sdinfer  # noqa: E402
from sdinfer.cli import _quiet_libraries  # noqa: E402
from sdinfer.errors import UserError  # noqa: E402
from sdinfer.eval import bench  # noqa: E402
from sdinfer.eval.metrics import PSNR_CAP_DB  # noqa: E402
from sdinfer.eval.pareto import Point, compare, comparison_dict, front, point_dict  # noqa: E402
from sdinfer.eval.prompts import load_prompts  # noqa: E402
from sdinfer.pipeline import Pipeline  # noqa: E402

RESULTS = peers.RESULTS
TARGET = 1.2


def gate_steps(steps: int) -> list[int]:
    """T-GATE's gate at 20, 50 and 80% of the run, as whole steps."""
    return sorted({max(1, round(f * steps)) for f in (0.2, 0.5, 0.8)})


# ---- the sweeps -----------------------------------------------------------------------
@dataclass(frozen=True)
class PeerFamily:
    """One peer cache: its package, the model it runs on here, our comparable methods, its sweep."""

    name: str
    model: str
    package: str
    ours: tuple[str, ...]
    sweep: Callable[[int], list[peers.Peer]]   # steps -> configurations
    note: str = ""


PEER_FAMILIES = [
    PeerFamily("DeepCache", "unet", "DeepCache", ("deepcache",),
               lambda steps: [peers.deepcache(i) for i in (2, 3, 4, 5, 6, 8)] + [peers.deepcache(3, branch=1)]),
    PeerFamily("T-GATE", "unet", "tgate", ("tgate",),
               lambda steps: [peers.tgate(gate_step=g, sp_interval=5, warm_up=2) for g in gate_steps(steps)]),
    PeerFamily("FirstBlockCache", "dit", "diffusers", ("fbcache",),
               lambda steps: [peers.diffusers_fbcache(t) for t in (0.08, 0.15)]),
    PeerFamily("TaylorSeer", "dit", "diffusers", ("taylorseer",),
               lambda steps: [peers.diffusers_taylorseer(i, 2, sublayers=True) for i in (2, 3, 4, 5, 6)],
               "its cache_identifiers set to the blocks' attn / ff / ff_context, the sub-layers ours "
               "forecasts (its default identifiers lose 5-17 dB more: bench/peers.py)"),
    PeerFamily("MagCache", "dit", "diffusers", ("magcache",),
               lambda steps: [peers.diffusers_magcache(t) for t in (0.04, 0.06, 0.1, 0.2, 0.3)]),
    PeerFamily("PAB", "dit", "diffusers", ("fora",),
               lambda steps: [peers.diffusers_pab(r, (100, 800)) for r in (2, 4)]
               + [peers.diffusers_pab(r, (0, 1000)) for r in (3, 6)],
               "no sdinfer twin: FORA (attention / MLP outputs reused between full steps) is the closest"),
    PeerFamily("DBCache", "dit", "cache-dit", ("dbcache", "fbcache"),
               lambda steps: [peers.cache_dit(fn=1, bn=0, threshold=t, warmup=0) for t in (0.08, 0.12, 0.2, 0.3)]
               + [peers.cache_dit(fn=1, bn=1, threshold=t, warmup=2, taylorseer=True) for t in (0.12, 0.3)],
               "F1B0 without and F1B1 with its TaylorSeer calibrator (F1B0 with it does not run on SD3)"),
]


def our_sweeps(model: str, steps: int) -> dict[str, list[str]]:
    """Each of our caches on ``model`` and the specs of its sweep (around the settings the caches'
    own sweeps found on the default models, bench/caches_sweep.sh)."""
    gates = gate_steps(steps)
    if model == "unet":
        return {
            "deepcache": [f"deepcache:interval={i},layer=0" for i in (2, 3, 4, 5, 6, 8)]
                         + [f"deepcache:interval={i}" for i in (3, 5, 8)],
            "tgate": [f"tgate:gate_step={g},sp_interval=5,warm_up=2" for g in gates],
            "taylorseer": ["taylorseer:interval=3,order=2", "taylorseer:interval=4,warmup=0",
                           "taylorseer:interval=5,order=2", "taylorseer:interval=6,order=2,warmup=0"],
            "teacache": [f"teacache:threshold={t}" for t in (0.1, 0.15, 0.2, 0.3, 0.4)],
            "magcache": ["magcache", "magcache:threshold=0.12,max_skip_steps=2,retention=0.1"],
            "l2c": ["l2c:budget=0.2"],
            "blockcache": ["blockcache:threshold=0.05"],
        }
    if model == "dit":
        return {
            "fora": [f"fora:interval={i}" for i in (3, 4, 5)],
            "taylorseer": ["taylorseer:interval=2", "taylorseer:interval=3,order=2", "taylorseer:interval=4,warmup=0",
                           "taylorseer:interval=5", "taylorseer:interval=6,warmup=0", "taylorseer:interval=8,warmup=0"],
            "teacache": [f"teacache:threshold={t}" for t in (0.1, 0.15, 0.2, 0.3, 0.4)],
            "magcache": ["magcache", "magcache:threshold=0.24,max_skip_steps=2,retention=0.1",
                         "magcache:threshold=0.4,max_skip_steps=3,retention=0.1"],
            "dbcache": ["dbcache:threshold=0.08", "dbcache:threshold=0.12,order=2", "dbcache:threshold=0.2",
                        "dbcache:threshold=0.3"],
            "fbcache": [f"fbcache:threshold={t}" for t in (0.08, 0.12, 0.2, 0.3)],   # cache-dit's F1B0 twins
            "blockcache": ["blockcache:threshold=0.07"],
            "l2c": ["l2c:budget=0.2"],
        }
    raise UserError(f"no sweeps for model {model!r}: use unet or dit")


@dataclass
class Config:
    """One configuration of the run: a peer's or ours, and how it goes on the loop."""

    side: str      # "peer" | "ours"
    family: str    # the peer's name or our method
    label: str
    package: str
    install: Callable[[object, peers.Settings], Callable[[], None]]   # (loop, settings) -> remove
    known_issue: str = ""

    def spec(self, settings: peers.Settings) -> bench.RunSpec:
        """Its spec for ``measure_all``: the run's settings; the accelerate field names it (``install`` puts
        it on)."""
        return bench.RunSpec(sampler="ddim", steps=settings.steps, cfg=settings.cfg,
                             accelerate=f"{self.side} {self.label}")


def ours(method: str, spec: str) -> Config:
    return Config("ours", method, spec, "sdinfer", lambda loop, _settings: sdinfer.accelerate(loop.target, spec).remove)


def configs(model: str, steps: int, smoke: bool, only: list[str] | None) -> list[Config]:
    """The run's configurations: the model's peers' sweeps, then ours (``smoke``: the first and last
    setting of each, and of ours only the peers' comparable methods; ``only``: the families whose
    name contains one of these, and our methods comparable to them)."""
    def pick(items: list) -> list:
        return items[:1] + items[-1:] if smoke and len(items) > 2 else items

    def wanted(name: str) -> bool:
        return not only or any(part.lower() in name.lower() for part in only)

    out = []
    for fam in PEER_FAMILIES:
        if fam.model == model and wanted(fam.name):
            out += [Config("peer", fam.name, p.label, p.package, p.install, p.known_issue)
                    for p in pick(fam.sweep(steps))]
    for method, specs in our_sweeps(model, steps).items():
        comparable = any(method in fam.ours and fam.model == model and wanted(fam.name) for fam in PEER_FAMILIES)
        if comparable or (wanted(method) and not smoke):
            out += [ours(method, spec) for spec in pick(specs)]
    labels = [(c.side, c.label) for c in out]
    if len(set(labels)) != len(labels):
        raise RuntimeError("two configurations share a label: give each sweep point its own knobs")
    return out


# ---- measuring ------------------------------------------------------------------------
def probe(config: Config, loop, prompts: list[str], settings: peers.Settings) -> str | None:
    """Try ``config`` on the first prompt; None if it runs, else why not (one line)."""
    try:
        remove = config.install(loop, settings)
        try:
            loop(prompts[:1], settings.steps, "ddim", settings.cfg, [settings.seed])
        finally:
            remove()
    except Exception as err:  # noqa: BLE001 - a configuration that cannot run is a record saying why
        what = "skipped" if isinstance(err, UserError) else "does not run"
        status = peers.failed(config.label, config.side, what, err)["status"]
        return status + (f" ({config.known_issue})" if config.known_issue else "")
    return None


def run_model(model: str, prompts: list[str], settings: peers.Settings, args, log) -> dict:
    started = time.perf_counter()
    pipe = Pipeline.from_pretrained(model)
    loop = peers.LOOPS[model](pipe)
    elapsed = {}
    try:
        runnable, records = [], []
        for config in configs(model, settings.steps, args.sweep == "smoke", args.only):
            log(f"{model}: trying {config.side} {config.label} ...")
            why = probe(config, loop, prompts, settings)
            if why is None:
                runnable.append(config)
            else:
                log(f"  {why}")
                records.append(describe(config, {"status": why}))
        elapsed["load_and_probes_s"] = round(time.perf_counter() - started, 1)
        baseline = bench.RunSpec(sampler="ddim", steps=settings.steps, cfg=settings.cfg)
        specs = [c.spec(settings) for c in runnable]
        by_spec = dict(zip(specs, runnable))

        def install(spec: bench.RunSpec):
            return by_spec[spec].install(loop, settings) if spec in by_spec else (lambda: None)

        log(f"{model}: the uncached run and {len(specs)} configurations on {len(prompts)} prompts, "
            f"{args.repeats} timed run(s) each, interleaved ...")
        base, *measured = bench.measure_all(loop, [baseline, *specs], prompts, args.batch, settings.seed,
                                            args.repeats, install=install)
        elapsed["measure_all_s"] = round(time.perf_counter() - started - elapsed["load_and_probes_s"], 1)
        base_rec = bench.record(base, base, prompts, is_baseline=True)
        base_rec.update(side="baseline", family="uncached", config=f"uncached ({type(loop).__name__})",
                        status="ok")
        records = [base_rec] + [describe(by_spec[m.spec], {**bench.record(m, base, prompts, is_baseline=False),
                                                            "status": "ok"}) for m in measured] + records
        session = peers.Session(loop, prompts, settings, args.batch, args.repeats, base)
        meta = run_meta(model, pipe, session, args, base)
        meta["elapsed"] = {**elapsed, "total_s": round(time.perf_counter() - started, 1)}
        if meta["timing_noise"] is not None and meta["timing_noise"] > bench.NOISE_WARNING:
            log(f"warning: the uncached run's time per image varied by {meta['timing_noise']:.0%} across its "
                "timed runs: ratios within about that of each other are not resolved; rerun on an idle machine")
    finally:
        loop.close()
    fronts, comparisons = compare_fronts(records, [f for f in PEER_FAMILIES if f.model == model], args.target)
    return {"meta": meta, "records": records, "fronts": fronts, "comparisons": comparisons}


def describe(config: Config, rec: dict) -> dict:
    """A record with the configuration's identity first (and no RunSpec fields that do not apply)."""
    for key in ("sampler", "steps", "cfg", "accelerate"):
        rec.pop(key, None)
    head = {"side": config.side, "family": config.family, "config": config.label, "package": config.package,
            "version": peers._version(config.package)}
    return {**head, **{k: v for k, v in rec.items() if k not in head}}


def run_meta(model: str, pipe: Pipeline, session: peers.Session, args, base: bench.Measurement) -> dict:
    settings = session.settings
    sizes = [len(session.prompts[i:i + args.batch]) for i in range(0, len(session.prompts), args.batch)]
    noise = bench.timing_noise(base, sizes)
    meta = {
        "model": model,
        "model_class": pipe.model.family,
        "loop": type(session.loop).__name__,
        "prompts": len(session.prompts),
        "prompt_set": args.prompts,
        "steps": settings.steps,
        "sampler": "ddim",
        "cfg": settings.cfg,
        "batch": args.batch,
        "seed": settings.seed,
        "repeats": args.repeats,
        "sweep": args.sweep,
        "target": args.target,
        "psnr_cap_db": PSNR_CAP_DB,
        "timing": "interleaved",
        "timing_noise": None if noise is None else round(noise, 4),
        "versions": {p: peers._version(p) for p in [*peers.PEERS, "diffusers"]},
        "torch": torch.__version__,
        "machine": bench.machine_description(),
        "date": datetime.date.today().isoformat(),
        "command": "python bench/fronts.py " + " ".join(args.argv),
    }
    meta.update(peers.checks(pipe, session))
    return meta


# ---- fronts ---------------------------------------------------------------------------
def ran(records: list[dict], keep: Callable[[dict], bool]) -> list[dict]:
    return [r for r in records if r.get("status") == "ok" and r["side"] != "baseline" and keep(r)]


def points(records: list[dict], keep: Callable[[dict], bool]) -> list[Point]:
    """The configurations that ran, as (wall speed-up, PSNR) points; those whose images equal the
    uncached run's (PSNR at the cap: no step skipped) are left out, since the only difference they
    can show is their hooks' overhead, and a front through the cap would interpolate across tens of dB."""
    return [Point(r["speedup_wall"], r["psnr"], r["config"]) for r in ran(records, keep) if r["psnr"] < PSNR_CAP_DB]


def compare_fronts(records: list[dict], families: list[PeerFamily], target: float = TARGET) -> tuple[dict, list]:
    """The fronts (each peer's, all our caches', each of our methods') and, per peer family, its front
    read on ours: against all our caches and against its comparable methods.  Pure: records in,
    JSON-ready dicts out."""
    ours_all = points(records, lambda r: r["side"] == "ours")
    methods = dict.fromkeys(r["family"] for r in records if r["side"] == "ours")
    fronts = {"ours: all caches": [point_dict(p) for p in front(ours_all)]}
    for method in methods:
        fronts[f"ours: {method}"] = [point_dict(p) for p in front(points(records, lambda r: r["family"] == method
                                                                         and r["side"] == "ours"))]
    comparisons = []
    for fam in families:
        mine = [r for r in records if r["side"] == "peer" and r["family"] == fam.name]
        if not mine:
            continue
        is_peer = lambda r: r["side"] == "peer" and r["family"] == fam.name  # noqa: E731
        theirs = points(records, is_peer)
        row = {"peer": fam.name, "package": fam.package, "version": mine[0].get("version"),
               "ours_methods": list(fam.ours), "note": fam.note,
               "peer_points": len(mine), "peer_ran": len(ran(records, is_peer)),
               "peer_identical": len(ran(records, is_peer)) - len(theirs),
               "peer_front": [point_dict(p) for p in front(theirs)]}
        fronts[f"peer: {fam.name}"] = row["peer_front"]
        if not theirs:
            row["status"] = (mine[0]["status"] if not row["peer_ran"] else
                             "every setting ran with the uncached run's images (no step skipped): nothing to compare")
            comparisons.append(row)
            continue
        row["status"] = "ok"
        row["against_all"] = comparison_dict(compare(ours_all, theirs, target)) if ours_all else None
        same = points(records, lambda r: r["side"] == "ours" and r["family"] in fam.ours)
        row["against_same"] = comparison_dict(compare(same, theirs, target)) if same else None
        comparisons.append(row)
    return fronts, comparisons


# ---- output ---------------------------------------------------------------------------
def summary(report: dict) -> str:
    """The comparisons as plain lines (the run's own printout; BENCHMARKS.md's table is report.py's)."""
    meta = report["meta"]
    lines = [f"{meta['model']}: {meta['prompts']} {meta['prompt_set']} prompts, DDIM {meta['steps']} steps, "
             f"cfg {meta['cfg']:g}, {meta['repeats']} timed run(s), timing noise "
             + ("-" if meta["timing_noise"] is None else f"{meta['timing_noise']:.1%}")]
    for rec in report["records"]:
        if rec.get("status") == "ok":
            lines.append(f"  {rec['side']:8} {rec['config']:70.70} {rec['speedup_wall']:5.2f}x {rec['psnr']:6.2f} dB")
        else:
            lines.append(f"  {rec['side']:8} {rec['config']:70.70} {rec['status']}")
    for row in report["comparisons"]:
        if row["status"] != "ok":
            lines.append(f"{row['peer']} ({row['package']}): {row['status']}")
            continue
        for key, name in (("against_all", "all our caches"), ("against_same", "+".join(row["ours_methods"]))):
            if row.get(key):
                lines.append(f"{row['peer']} ({row['package']}) vs {name}: {row[key]['verdict']}")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """One panel per peer: its points and front, our comparable method's front, all our caches' front."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["comparisons"]
    if not rows:
        return
    cols = min(3, len(rows))
    height = -(-len(rows) // cols)
    fig, axes = plt.subplots(height, cols, figsize=(5.5 * cols, 4.5 * height), squeeze=False)
    for ax in axes.flat[len(rows):]:
        ax.axis("off")
    records = report["records"]
    for ax, row in zip(axes.flat, rows):
        peer = [r for r in records if r["side"] == "peer" and r["family"] == row["peer"] and r["status"] == "ok"]
        ax.plot([r["speedup_wall"] for r in peer], [r["psnr"] for r in peer], "o", color="tab:red", alpha=0.4)
        lines = [("peer: " + row["peer"], row["peer_front"], "o-", "tab:red")]
        for method in row["ours_methods"]:
            lines.append((f"ours: {method}", report["fronts"].get(f"ours: {method}", []), "s--", None))
        lines.append(("ours: all caches", report["fronts"]["ours: all caches"], "^-", "black"))
        for name, pts, style, colour in lines:
            if pts:
                ax.plot([p["speedup_wall"] for p in pts], [p["psnr"] for p in pts], style, color=colour,
                        label=name, markersize=4, linewidth=1)
        verdict = (row.get("against_all") or {}).get("verdict", row["status"])
        ax.set_title(f"{row['peer']} ({row['package']})\n{verdict[:70]}", fontsize=8)
        ax.set_xlabel("wall speed-up over uncached")
        ax.set_ylabel("PSNR vs uncached (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    meta = report["meta"]
    fig.suptitle(f"{meta['model']}: Pareto fronts, peers against sdinfer ({meta['prompts']} prompts, "
                 f"DDIM {meta['steps']}, {meta['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(report: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"fronts-{report['meta']['model']}.json"
    path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    try:
        plot(report, path.with_suffix(".png"))
    except ImportError:
        pass   # matplotlib is optional: the JSON is the result
    return path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["unet", "dit", "both"], default="both")
    p.add_argument("--prompts", default="heldout", help="quick | heldout | FILE (default: heldout)")
    p.add_argument("--limit", type=int, default=16, help="first N prompts (default: 16; 0: all)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--batch", type=int, default=0, help="prompts per batch (default 0: all in one)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per configuration (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep", choices=["full", "smoke"], default="full",
                   help="smoke: the first and last setting of each sweep only")
    p.add_argument("--only", action="append", default=None,
                   help="only the peers / our methods whose name contains this (repeatable)")
    p.add_argument("--target", type=float, default=TARGET, help="the ratio ours / peer to reach (default 1.2)")
    p.add_argument("--out", default=str(RESULTS), help="folder for fronts-{model}.{json,png}")
    args = p.parse_args(argv)
    args.argv = list(argv)
    needed = {fam.package for fam in PEER_FAMILIES if args.model in ("both", fam.model)}
    missing = sorted(name for name in needed if peers._version(name) is None)
    if missing:
        p.error(f"peers not installed: {', '.join(missing)}; install them with: {peers.INSTALL}")
    _quiet_libraries()
    prompts = load_prompts(args.prompts)
    prompts = prompts[: args.limit] if args.limit else prompts
    args.batch = args.batch or len(prompts)
    settings = peers.Settings(steps=args.steps, cfg=args.cfg, seed=args.seed)
    log = functools.partial(print, flush=True)
    for model in (["unet", "dit"] if args.model == "both" else [args.model]):
        report = run_model(model, prompts, settings, args, log)
        path = write(report, Path(args.out))
        print(summary(report))
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
