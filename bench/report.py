"""Rebuild BENCHMARKS.md's tables from the JSON under bench/results/.

    python bench/report.py            # rewrite BENCHMARKS.md's tables in place
    python bench/report.py --check    # exit 1 if any table differs from what the JSON gives

Every table in BENCHMARKS.md sits between ``<!-- table: NAME -->`` and ``<!-- end -->``; NAME says
where its rows come from:

- ``summary``: the one-screen summary at the top, built from the bench JSON below;
- ``self-comparisons``: every ``bench/results/{heldout,self}-*.json`` whose configuration is its
  own baseline (the timing's bias and noise);
- a name in ``BENCH_TABLES``: the records of an ``sdinfer bench --json`` file;
- a name in ``PARALLEL_TABLES``: the rows of a ``bench/parallel.py`` JSON file;
- ``fronts``: each peer's Pareto front read on ours, from ``bench/results/fronts-{unet,dit}.json``
  (``bench/fronts.py``);
- ``mixture-samplers``: ``sampler="auto"`` against the best public sampler per mixture and NFE,
  from ``bench/results/mixture-samplers.json`` (``bench/mixture_samplers.py``);
- ``tune``: each default model's tuned preset (``bench/results/tune-M/preset.json``) and its held-out
  check (``bench/results/tune-M.json``), and the search against the exhaustive grid
  (``bench/results/tune-vs-exhaustive-*.json``), from ``bench/tune.sh``;
- ``real-shapes`` / ``real-shapes-cfg``: the caches / CFG parallel on SD 1.5, SDXL, PixArt-Sigma and FLUX.1
  shapes with random weights, from ``bench/results/real-shapes.json`` (``bench/real_shapes.py``);
- ``serve-workload``: ``sdinfer serve`` on a Zipf-like stream, the approximate cache and the batcher
  off and on, from ``bench/results/serve-workload.json`` (``bench/serve_workload.py``);
- ``quant-MODEL`` / ``quant-stacks-MODEL`` / ``quant-timing``: ``bench/quantize.py``'s quality rows
  of every ``bench/results/quant-MODEL.*.json`` (the float32 row once), its stacks, and its timing
  runs ``bench/results/quant-timing.*.json``;
- any other name: ``bench/results/tables/NAME.json`` (``columns`` and ``rows``, cells as printed),
  tables whose figures came from scripts that print markdown, converted once.

Only the standard library: the check runs in the quick test suite.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BENCHMARKS = ROOT / "BENCHMARKS.md"
MARKER = re.compile(r"^<!-- table: ([\w-]+) -->\n.*?^<!-- end -->$", re.S | re.M)

# a setting counts for the summary if it keeps this much of the uncached run's quality
SUMMARY_MIN_PSNR_DB = 35.0
SUMMARY_MAX_ADHERENCE_DROP = 0.03

# table name -> (bench JSON file, configurations shown in bold)
BENCH_TABLES = {
    "caches-unet": ("caches-unet.json", {"deepcache:interval=3"}),
    "caches-dit": ("caches-dit.json", {"fora:interval=3"}),
    "caches-sweep-unet": ("caches-sweep-unet.json", set()),
    "caches-sweep-dit": ("caches-sweep-dit.json", set()),
    "ditfastattn-sweep-dit": ("ditfastattn-sweep-dit.json", set()),
}
PARALLEL_TABLES = {"parallel": "parallel.json", "parallel-64": "parallel-64.json",
                   "parallel-stride2": "parallel-stride2.json"}

CACHES_COMMAND = ("sdinfer bench --model {model} --prompts heldout --steps 50 --batch 50 --repeats 2 "
                  "--accelerate {spec}")
SWEEP_COMMAND = ("sdinfer bench --model {model} --prompts heldout --limit 32 --batch 32 --steps 50 "
                 "--cfg 4 --repeats 2 --accelerate {spec}")
# summary rows: (technique, bench JSON, method, command); the main cache table first, the sweep
# for the methods it alone has
SUMMARY_CACHES = [
    ("DeepCache", "caches-unet.json", "deepcache", CACHES_COMMAND),
    ("FORA", "caches-dit.json", "fora", CACHES_COMMAND),
    ("First-Block Cache", "caches-dit.json", "fbcache", CACHES_COMMAND),
    ("TaylorSeer", "caches-sweep-unet.json", "taylorseer", SWEEP_COMMAND),
    ("TaylorSeer", "caches-sweep-dit.json", "taylorseer", SWEEP_COMMAND),
    ("TeaCache", "caches-sweep-unet.json", "teacache", SWEEP_COMMAND),
    ("TeaCache", "caches-sweep-dit.json", "teacache", SWEEP_COMMAND),
    ("MagCache", "caches-sweep-unet.json", "magcache", SWEEP_COMMAND),
    ("MagCache", "caches-sweep-dit.json", "magcache", SWEEP_COMMAND),
    ("DBCache", "caches-sweep-dit.json", "dbcache", SWEEP_COMMAND),
    ("Learning-to-Cache", "caches-sweep-unet.json", "l2c", SWEEP_COMMAND),
    ("Learning-to-Cache", "caches-sweep-dit.json", "l2c", SWEEP_COMMAND),
    ("Block Caching", "caches-sweep-unet.json", "blockcache", SWEEP_COMMAND),
    ("Block Caching", "caches-sweep-dit.json", "blockcache", SWEEP_COMMAND),
    ("T-GATE", "caches-sweep-unet.json", "tgate", SWEEP_COMMAND),
    ("T-GATE", "caches-sweep-dit.json", "tgate", SWEEP_COMMAND),
]
SUMMARY_STEPSAVER = [("StepSaver (`--steps auto`)", "stepsaver-unet.json"),
                     ("StepSaver (`--steps auto`)", "stepsaver-dit.json")]
# multi-device: the 64x64 fine-tunes (in distribution at the size they are split at); per model the
# fastest exact strategy and the fastest one above SUMMARY_MIN_PARALLEL_PSNR_DB, where that is another
SUMMARY_PARALLEL = "parallel-64.json"
SUMMARY_MIN_PARALLEL_PSNR_DB = 30.0
PARALLEL_COMMAND = "python bench/parallel.py --model unet-64 --model dit-64 --steps 50 --prompts 3 --repeats 2"


def fixed(value: float, places: int) -> str:
    return f"{value:.{places}f}"


def percent(value: float | None) -> str:
    """A share as the bench prints it (Python's rounding: 0.8125 is 81.2%)."""
    return "-" if value is None else f"{value:.1%}"


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def markdown(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def spec_of(record: dict) -> str:
    """The accelerator spec of a bench record ("" for the baseline)."""
    head, plus, spec = record["config"].partition(" + ")
    return spec if plus else ""


def bench_table(file: str, bold: set[str]) -> str:
    records = load(file)["records"]
    rows = []
    for rec in records:
        spec = spec_of(rec)
        if rec["config"].startswith("baseline"):
            row = ["uncached", "1.00", "1.00", "-", "-", percent(rec["adherence"])]
        else:
            row = [f"`{spec}`", fixed(rec["speedup_wall"], 2), fixed(rec["speedup_macs"], 2),
                   fixed(rec["psnr"], 1), fixed(rec["ssim"], 3), percent(rec["adherence"])]
        if spec in bold:
            row[0], row[1] = f"**{row[0]}**", f"**{row[1]}**"
        rows.append(row)
    return markdown(["config", "speedup_wall", "speedup_macs", "PSNR dB", "SSIM", "adherence"], rows)


def parallel_table(file: str) -> str:
    rows = []
    for r in load(file)["rows"]:
        hidden = "-" if r["hidden_share"] is None else f"{r['hidden_share']:.0%}"
        rows.append([f"{r['model']} {r['size']}x{r['size']}", f"`{r['strategy']}`", f"{r['latency_s']:.3f}",
                     f"{r['single_device_s']:.3f}", f"{r['speedup']:.2f}x", f"{r['bytes_per_step']:,}",
                     f"{r['sync_blocked_ms_per_step']:.2f}", f"{r['overlapped_bytes_per_step']:,}",
                     f"{r['overlapped_t_comm_ms_per_step']:.2f}", hidden, f"{r['psnr']:.2f}"])
    return markdown(["model", "strategy", "latency (s)", "1 device (s)", "speed-up", "bytes / step",
                     "sync blocked (ms / step)", "overlapped bytes / step", "their t_comm (ms / step)",
                     "hidden", "PSNR vs 1 device"], rows)


FRONTS = ("fronts-unet.json", "fronts-dit.json")


def ratios(comparison: dict | None) -> str:
    """``min x1.23 / median x1.40`` (``>=`` where the minimum is a lower bound), or ``-``."""
    if not comparison or comparison["min_ratio"] is None:
        return "-"
    bound = ">=" if comparison["min_is_bound"] else ""
    return f"{bound}x{comparison['min_ratio']:.2f} / x{comparison['median_ratio']:.2f}"


def against_target(comparison: dict | None) -> str:
    """``meets x1.2``, or by how much not: the shortfall at the worst peer point, and the peer points
    whose PSNR our front does not reach."""
    if not comparison:
        return "-"
    target = comparison["target"]
    if comparison["meets"]:
        return f"meets x{target:g}"
    parts = []
    rated = [p for p in comparison["points"] if p["ratio"] is not None]
    if rated:
        worst = min(rated, key=lambda p: p["ratio"])
        if worst["ratio"] < target:
            parts.append(f"short by {target / worst['ratio'] - 1:.0%} at {worst['peer']['psnr']:.1f} dB"
                         + (" (a bound)" if worst["bound"] else ""))
    if comparison["above_our_front"]:
        best = max(p["psnr"] for p in comparison["ours_front"])
        parts.append(f"{comparison['above_our_front']} peer point(s) above our best {best:.1f} dB")
    return f"not x{target:g}: " + "; ".join(parts)


def front_span(points: list[dict]) -> str:
    """A front by its two ends: ``3 points, 1.87x at 39.7 dB ... 3.38x at 28.2 dB``."""
    if not points:
        return "-"
    hi, lo = max(points, key=lambda p: p["psnr"]), min(points, key=lambda p: p["psnr"])
    ends = f"{hi['speedup_wall']:.2f}x at {hi['psnr']:.1f} dB"
    if lo is not hi:
        ends += f" ... {lo['speedup_wall']:.2f}x at {lo['psnr']:.1f} dB"
    return f"{len(points)} point{'s' if len(points) > 1 else ''}: {ends}"


def fronts_table() -> str:
    """Per model and peer: the peer's front, our speed-up over the peer's at each of its front's
    PSNRs (minimum / median ratio), against all our caches and against our comparable method."""
    files = [name for name in FRONTS if (RESULTS / name).exists()]
    if not files:
        raise SystemExit("BENCHMARKS.md names table 'fronts', but there is no bench/results/fronts-*.json: "
                         "run bench/fronts.sh")
    rows = []
    for name in files:
        report = load(name)
        meta = report["meta"]
        noise = "-" if meta["timing_noise"] is None else f"{meta['timing_noise']:.0%}"
        run = f"{meta['prompts']} prompts, {meta['repeats']} timed runs, noise {noise}, {meta['date']}"
        for row in report["comparisons"]:
            peer = f"{row['peer']} ({row['package']} {row['version']})"
            if row["status"] != "ok":
                rows.append([meta["model"], peer, "does not run here", "-", row["status"], "-", "-", run])
                continue
            same, every = row.get("against_same"), row.get("against_all")
            methods = " + ".join(f"`{m}`" for m in row["ours_methods"])
            span = front_span(row["peer_front"])
            if row.get("peer_identical"):
                span += f" ({row['peer_identical']} more with the uncached images, left out)"
            rows.append([meta["model"], peer, span, ratios(every), against_target(every),
                         f"{methods}: {ratios(same)}", against_target(same), run])
    return markdown(["model", "peer", "peer's front (wall speed-up at PSNR)",
                     "ours (all caches) / peer at its PSNR: min / median", "all caches vs the target",
                     "ours (same method) / peer: min / median", "same method vs the target", "run"], rows)


TUNE_MODELS = ("unet", "dit")
TUNE_TARGET_SPEEDUP, TUNE_MAX_DROP = 10.0, 0.02


def tune_table() -> str:
    """Per model: the preset ``sdinfer tune --budget adherence-drop=0.02`` chose, its validation
    figures, and the held-out check (wall speed-up over 50-step DDIM, adherence against the
    baseline's) against the target; then the search against the exhaustive grid."""
    rows = []
    for model in TUNE_MODELS:
        preset_file, check_file = RESULTS / f"tune-{model}" / "preset.json", RESULTS / f"tune-{model}.json"
        if not preset_file.exists() or not check_file.exists():
            continue
        preset = json.loads(preset_file.read_text())
        v = preset["validation"]
        check = load(check_file.name)
        base, rec = check["records"][0], check["records"][1]
        drop = None if rec["adherence"] is None or base["adherence"] is None else base["adherence"] - rec["adherence"]
        meets = rec["speedup_wall"] >= TUNE_TARGET_SPEEDUP and drop is not None and drop <= TUNE_MAX_DROP + 1e-9
        verdict = "meets" if meets else (f"short: needs >= {TUNE_TARGET_SPEEDUP:g}x and a drop <= "
                                         f"{TUNE_MAX_DROP:.0%}")
        stack = rec["config"]
        rows.append([model, f"`{stack}`", f"{v['speedup_wall']:.2f}x, {percent(v.get('adherence'))} "
                     f"({percent(v.get('reference_adherence'))}), {v['prompts']} prompts",
                     fixed(rec["speedup_wall"], 2) + "x", fixed(rec["speedup_macs"], 2) + "x", fixed(rec["psnr"], 1),
                     f"{percent(rec['adherence'])} ({percent(base['adherence'])})", verdict,
                     f"{check['meta']['prompts']} held-out prompts, {check['meta']['repeats']} timed runs, "
                     f"{check['meta']['date']}"])
    for path in sorted(RESULTS.glob("tune-vs-exhaustive-*.json")):
        r = json.loads(path.read_text())
        s, e = r["search"], r["exhaustive"]
        macs = {t["config"]: t["speedup_macs"] for t in r.get("timed", [])}
        rows.append([r["meta"]["model"], f"small space: search `{s['chosen']}` vs exhaustive `{e['chosen']}`",
                     f"{s['evaluations']} / {e['evaluations']} evaluations, {s['images']} / {e['images']} images",
                     f"{s['speedup_wall']:.2f}x / {e['speedup_wall']:.2f}x",
                     " / ".join(fixed(macs.get(c), 2) + "x" for c in (s["chosen"], e["chosen"])) if macs else "-",
                     "-", "-",
                     f"search at {r.get('ratio_to_optimum', 0):.0%} of the optimum's speed",
                     f"{r['meta']['validation_prompts']} validation prompts, {r['meta']['date']}"])
    if not rows:
        raise SystemExit("BENCHMARKS.md names table 'tune', but bench/results has no tune results: run bench/tune.sh")
    return markdown(["model", "preset (or comparison)", "validation: wall speed-up, adherence (reference)",
                     "held-out wall speed-up vs DDIM 50", "MAC speed-up", "PSNR dB", "adherence (DDIM 50)",
                     "vs the target (>= 10x, within 2 points)", "run"], rows)


SELF_COMPARISONS = ("heldout-*.json", "self-*.json")


def self_comparison_table() -> str:
    """Every bench JSON whose one configuration is its own baseline: what speedup_wall reads when
    nothing differs, i.e. the timing's bias and noise."""
    rows = []
    files = sorted({p for pattern in SELF_COMPARISONS for p in RESULTS.glob(pattern)})
    for path in files:
        report = json.loads(path.read_text())
        meta, records = report["meta"], report["records"]
        if len(records) != 2 or records[1]["config"] != records[0]["config"].removeprefix("baseline "):
            continue
        same = records[1]
        runs = ", ".join(f"{a:.2f} / {b:.2f}" for a, b in zip(records[0]["wall_s_runs"], same["wall_s_runs"]))
        noise = meta.get("timing_noise")
        rows.append([f"`{path.name}`", meta["model"], str(meta["prompts"]), str(meta["batch"]),
                     str(meta["repeats"]), meta.get("timing", "baseline first"), f"{same['speedup_wall']:.2f}x",
                     "-" if noise is None else f"{noise:.0%}", runs, meta["date"]])
    return markdown(["JSON", "model", "prompts", "batch", "timed runs", "timing", "speedup_wall",
                     "timing noise", "wall s per run (baseline / itself)", "date"], rows)


def stored_table(name: str) -> str:
    path = RESULTS / "tables" / f"{name}.json"
    if not path.exists():
        raise SystemExit(f"BENCHMARKS.md names table {name!r}, but there is no {path.relative_to(ROOT)} "
                         "and no generator for it in bench/report.py")
    data = json.loads(path.read_text())
    return markdown(data["columns"], data["rows"])


def best_setting(records: list[dict], method: str) -> dict | None:
    """The fastest (wall) setting of ``method`` that keeps PSNR >= SUMMARY_MIN_PSNR_DB and adherence
    within SUMMARY_MAX_ADHERENCE_DROP of the uncached run; None if no setting does."""
    base = next(r for r in records if r["config"].startswith("baseline"))
    ok = [r for r in records if spec_of(r).split(":")[0] == method and r["psnr"] >= SUMMARY_MIN_PSNR_DB
          and (base["adherence"] is None or r["adherence"] is None
               or r["adherence"] >= base["adherence"] - SUMMARY_MAX_ADHERENCE_DROP - 1e-9)]
    return max(ok, key=lambda r: r["speedup_wall"], default=None)


def summary_table() -> str:
    rows = []
    for technique, file, method, command in SUMMARY_CACHES:
        report = load(file)
        meta, records = report["meta"], report["records"]
        base = records[0]
        best = best_setting(records, method)
        section = ("[sweep](#every-cache-method-each-with-a-sweep-of-its-knob)" if "sweep" in file
                   else "[caches](#feature-caches-on-the-default-models)")
        if best is None:
            rows.append([technique, meta["model"], f"none keeps {SUMMARY_MIN_PSNR_DB:g} dB and adherence",
                         "-", "-", "-", "-", f"{section}, {meta['date']}", "-"])
            continue
        spec = spec_of(best)
        rows.append([technique, meta["model"], f"`{spec}`", fixed(best["speedup_wall"], 2) + "x",
                     fixed(best["speedup_macs"], 2) + "x", fixed(best["psnr"], 1),
                     f"{percent(best['adherence'])} ({percent(base['adherence'])})",
                     f"{section}, {meta['prompts']} prompts, {meta['date']}",
                     "`" + command.format(model=meta["model"], spec=spec) + "`"])
    for technique, file in SUMMARY_STEPSAVER:
        s = load(file)
        rows.append([technique, s["model"], f"{s['heldout_predicted_mean_steps']:.1f} steps on average",
                     "-", fixed(50 / s["heldout_predicted_mean_steps"], 2) + "x (steps)",
                     fixed(s["heldout_psnr_db_vs_50"], 1),
                     f"{percent(s['adherence_auto_steps'])} ({percent(s['adherence_50_steps'])})",
                     "[StepSaver](#stepsaver-on-the-default-models), 200 prompts",
                     f"`python bench/stepsaver.py --model {s['model']} --train 80`"])
    report = load(SUMMARY_PARALLEL)
    for model in dict.fromkeys(r["model"] for r in report["rows"]):
        rows_of = [r for r in report["rows"] if r["model"] == model]
        exact = max((r for r in rows_of if r["psnr"] >= 100), key=lambda r: r["speedup"])
        close = max((r for r in rows_of if r["psnr"] >= SUMMARY_MIN_PARALLEL_PSNR_DB), key=lambda r: r["speedup"])
        for r in [exact] + ([close] if close is not exact else []):
            rows.append([f"multi-device, 2 ranks ({'exact' if r is exact else 'stale'})",
                         f"{r['model']} {r['size']}x{r['size']}", f"`{r['strategy']}`", f"{r['speedup']:.2f}x",
                         "-", "identical" if r["psnr"] >= 100 else f"{r['psnr']:.1f}", "-",
                         f"[2 CPU ranks](#the-default-models-fine-tuned-at-64x64), {report['meta']['date']}",
                         f"`{PARALLEL_COMMAND}`"])
    return markdown(["technique", "model", "best setting", "wall speed-up", "MAC speed-up",
                     "PSNR dB", "adherence (uncached)", "measured", "command"], rows)


def mixture_samplers_table() -> str:
    """Per mixture problem, a row per NFE: what sampler="auto" chose on validation noise, its error and
    the best public sampler's on the evaluation noise (the trimmed statistic the choice uses), the ratio,
    and the ratio by the RMS over all trajectories (each side's best by that measure)."""
    data = load("mixture-samplers.json")
    rows = []
    for p in data["problems"]:
        problem = f"{p['mixture']} ({'unguided' if p['guidance'] == 1 else 'cfg ' + format(p['guidance'], 'g')}"
        problem += f", {p['sizes']['evaluation']} trajectories"
        problem += ", reduced public set)" if p.get("peers") == "reduced" else ")"
        for c in p["cells"]:
            lo, hi = c["validation_interval"]
            rows.append([problem, str(c["nfe"]), f"`{c['auto_choice']}`",
                         f"{c['validation_score']:.2e} ({lo:.1e}-{hi:.1e}, {c['stability']:.0%})",
                         f"{c['auto']['trimmed']:.2e}", f"{c['best_peer_stats']['trimmed']:.2e}", c["best_peer"],
                         f"**{c['ratio']:.2f}**" if c["ratio"] <= 0.7 else f"{c['ratio']:.2f}",
                         f"{c['ratio_rms']:.2f}"])
    worst = max(c["ratio"] for p in data["problems"] for c in p["cells"])
    rows.append(["all", "-", "-", "-", "-", "-", f"worst ratio {worst:.2f}", f"{worst:.2f}", "-"])
    return markdown(["problem", "NFE", "auto's choice (validation)", "validation error (90% bootstrap, "
                     "chosen on resamples)", "auto, evaluation", "best public, evaluation", "best public sampler",
                     "ratio", "ratio by all-trajectory RMS"], rows)


REAL_SHAPES = "real-shapes.json"


def real_shapes_data(data: dict | None) -> dict:
    if data is not None:
        return data
    if not (RESULTS / REAL_SHAPES).exists():
        raise SystemExit(f"BENCHMARKS.md names a real-shapes table, but there is no bench/results/{REAL_SHAPES}: "
                         "run python bench/real_shapes.py")
    return load(REAL_SHAPES)


def real_shapes_table(data: dict | None = None) -> str:
    """Per model (random weights) and cache method: wall time, speed-up against no hooks, the MAC bound
    of the same run, their ratio, and the per-step cost of the same hooks when they never skip."""
    data = real_shapes_data(data)
    rows = []
    for m in data["models"]:
        b = m["baseline"]
        noise = "-" if b["noise"] is None else f"noise {b['noise']:.0%}"
        model = (f"{m['title']}, {m['params'] / 1e6:,.1f} M params, latent {m['latent']}x{m['latent']}, "
                 f"batch {m['batch']}")
        rows.append([model, "none", fixed(b["wall_s"], 2), "1.00", "1.00", "-",
                     f"step {b['step_ms']:,.0f} ms ({noise})", "-"])
        model = m["title"].partition(" (")[0]   # the method rows name the model only
        for r in m["methods"]:
            if r["status"].startswith("does not install"):
                continue
            if r["status"] != "ok":
                rows.append([model, r["method"], r["status"], "-", "-", "-", "-", "-"])
                continue
            label = f"`{r['spec']}`" + (" (random router)" if r.get("random_router") else "")
            rows.append([model, label, fixed(r["wall_s"], 2), fixed(r["speedup"], 2), fixed(r["bound"], 2),
                         fixed(r["efficiency"], 2), fixed(r["overhead_ms_per_step"], 1),
                         f"{r['overhead_pct']:.1f}%"])
    return markdown(["model", "cache", "wall (s)", "speed-up", "MAC bound", "speed-up / bound",
                     "hook overhead (ms / step)", "overhead (% of a step)"], rows)


def real_shapes_cfg_table(data: dict | None = None) -> str:
    """CFG parallel on 2 gloo ranks (one thread each) against one process with 2 threads and with 1."""
    data = real_shapes_data(data)
    rows = []
    for r in data["cfg_parallel"]:
        if r["status"] != "ok":
            rows.append([r["model"], r["status"], "-", "-", "-", "-", "-"])
            continue
        rows.append([r["title"], fixed(r["ranks_s"], 2), fixed(r["one_process_2_threads_s"], 2),
                     fixed(r["one_process_1_thread_s"], 2), f"{r['speedup_vs_2_threads']:.2f}x",
                     f"{r['speedup_vs_1_thread']:.2f}x", f"{r['max_abs_diff']:.1e}"])
    return markdown(["model", "2 ranks x 1 thread (s)", "1 process, 2 threads (s)", "1 process, 1 thread (s)",
                     "speed-up vs 2 threads", "speed-up vs 1 thread", "max abs diff vs 1 process"], rows)


SERVE_WORKLOAD = "serve-workload.json"


def serve_workload_table(data: dict | None = None) -> str:
    """``sdinfer serve`` on the Zipf-like stream (``bench/serve_workload.py``): per concurrency, the
    approximate cache off and on (hits, steps and MACs saved, latency, throughput, the hits' adherence
    and PSNR against the same requests' full images), then the batcher off and on."""
    if data is None:
        if not (RESULTS / SERVE_WORKLOAD).exists():
            raise SystemExit(f"BENCHMARKS.md names table 'serve-workload', but there is no "
                             f"bench/results/{SERVE_WORKLOAD}: run python bench/serve_workload.py")
        data = load(SERVE_WORKLOAD)

    def num(value, places=2):
        return "-" if value is None else fixed(value, places)
    rows = []
    for r in data["runs"]:
        q = r.get("quality") or {}
        adherence = "-" if not q.get("compared") else \
            f"{percent(q['adherence_cached'])} vs {percent(q['adherence_full'])} ({q['compared']})"
        rows.append([str(r["concurrency"]), "approx cache on" if r["approx_cache"] else "approx cache off",
                     percent(r["hit_rate"]), num(r["mean_steps_skipped"]), f"{r['macs_saved'] / 1e9:,.1f} G",
                     percent(r["compute_saved"]), num(r["p50_s"]), num(r["p95_s"]), num(r["throughput_rps"], 3),
                     adherence, "-" if not q.get("compared") else f"{q['psnr_db']:.1f} (min {q['psnr_min_db']:.1f})"])
    for r in data.get("batching", []):
        rows.append([str(r["concurrency"]), f"batching {'on' if r['batching'] else 'off'} (cache off, "
                     f"mean batch {num(r['mean_batch_size'])})", "-", "-", "-", "-", num(r["p50_s"]),
                     num(r["p95_s"]), num(r["throughput_rps"], 3), "-", "-"])
    return markdown(["concurrency", "run", "hit rate", "mean steps skipped", "MACs saved", "compute saved",
                     "p50 (s)", "p95 (s)", "throughput (req/s)", "hits' adherence vs full (hits)",
                     "hits' PSNR vs full (dB)"], rows)


SERVE_LOADS = (("serve-load.json", "one server, torch on 1 thread"),
               ("serve-load-2threads.json", "one server, torch on 2 threads (OMP_NUM_THREADS=2)"),
               ("serve-load-kill.json", "SIGKILL after 200 answers, restarted on the same store"),
               ("serve-load-ray.json", "--ray --replicas 2 (1 thread each, one leader)"))


def serve_load_table() -> str:
    """``bench/serve_load.py``'s load and fault runs, one row per JSON file."""
    rows = []
    for name, label in SERVE_LOADS:
        if not (RESULTS / name).exists():
            raise SystemExit(f"BENCHMARKS.md names table 'serve-load', but there is no bench/results/{name}: "
                             "run python bench/serve_load.py (see BENCHMARKS.md)")
        d = load(name)
        rows.append([label, str(d["answered"]), str(sum(d["refused"].values())), str(d["connection_errors"]),
                     str(d["lost"]), str(d["images_in_store"]), fixed(d["p50_s"], 2), fixed(d["p95_s"], 2),
                     fixed(d["throughput_rps"], 2), fixed(d["mean_batch_size"], 2)])
    return markdown(["run", "answered", "refused", "connection errors", "lost", "images in store", "p50 (s)",
                     "p95 (s)", "requests/s", "mean batch"], rows)


def _quant_files(pattern: str) -> list[dict]:
    files = sorted(RESULTS.glob(pattern))
    if not files:
        raise SystemExit(f"BENCHMARKS.md names a quantization table, but no bench/results/{pattern} exists: "
                         "run python bench/quantize.py (see BENCHMARKS.md)")
    return [json.loads(f.read_text()) for f in files]


def _quant_label(config: str) -> str:
    return config if config in ("fp32", "bf16", "fp16") or ":" not in config else f"`{config}`"


def quant_table(model: str) -> str:
    """Per configuration: bits per weight, size on disk, memory, speed, quality and quantization cost."""
    rows, seen = [], set()
    for data in _quant_files(f"quant-{model}.*.json"):
        for r in data["rows"]:
            if r["config"] in seen:
                continue
            seen.add(r["config"])
            cost = r.get("quantize_s")
            calib = (r.get("calibration") or {}).get("trajectories", {}).get("seconds")
            rows.append([_quant_label(r["config"]), fixed(r["bits_per_weight"], 2),
                         "-" if r.get("file_mb") is None else fixed(r["file_mb"], 2),
                         # torchao's tensor subclasses report their float size: not shown
                         "-" if r["config"].startswith("torchao") else fixed(r["model_mb"], 2),
                         r["speed"], fixed(r["psnr"], 1), fixed(r["ssim"], 3), percent(r["adherence"]),
                         "-" if cost is None else f"{cost:.0f} ({calib:.0f})"])
    return markdown(["config", "bits / weight", "file MiB", "denoiser MiB", "speed", "PSNR dB", "SSIM",
                     "adherence", "quantize s (trajectories s)"], rows)


def quant_stacks_table(model: str) -> str:
    rows = []
    for data in _quant_files(f"quant-{model}.*.json"):
        rows += [[_quant_label(r["config"]), str(r["nfe"]), fixed(r["psnr"], 1), fixed(r["ssim"], 3),
                  percent(r["adherence"])] for r in data.get("stacks", [])]
    return markdown(["stack", "NFE", "PSNR dB vs DDIM 50 fp32", "SSIM", "adherence"], rows)


def quant_timing_table() -> str:
    rows = []
    for data in _quant_files("quant-timing.*.json"):
        rows += [[data["model"], _quant_label(r["config"]), fixed(r["wall_s"], 2), fixed(r["speedup"], 2),
                  fixed(r["psnr"], 1)] for r in data["rows"]]
    return markdown(["model", "config", "wall s (median)", "speed-up vs fp32", "PSNR dB vs fp32"], rows)


def ditfastattn_table(model: str) -> str:
    """Per plan: its attention FLOPs and MACs against full attention, quality, and the interleaved wall
    speed-up where the run timed it."""
    data = load(f"ditfastattn-{model}.json")
    timed = {r["config"]: r for r in data.get("timing", [])}
    rows = []
    for r in data["rows"]:
        t = timed.get(r["config"])
        rows.append([r["config"], percent(r["attention_fraction"]), percent(r["macs_fraction"]),
                     fixed(r["psnr"], 1), fixed(r["ssim"], 3), percent(r["adherence"]),
                     "-" if t is None else f"x{t['speedup']:.2f}"])
    return markdown(["config", "attention FLOPs", "MACs", "PSNR dB vs full", "SSIM", "adherence",
                     f"wall speed-up ({data.get('timing_prompts', 0)} prompts)"], rows)


def ditfastattn_stacks_table(model: str) -> str:
    data = load(f"ditfastattn-{model}.json")
    return markdown(["stack", "NFE", "PSNR dB vs DDIM 50", "SSIM", "adherence", "wall speed-up"],
                    [[r["config"], str(r["nfe"]), fixed(r["psnr"], 1), fixed(r["ssim"], 3), percent(r["adherence"]),
                      "-" if r.get("speedup") is None else f"x{r['speedup']:.2f}"] for r in data.get("stacks", [])])


def ditfastattn_resolution_table() -> str:
    """One denoiser call (a guided batch of 2) per size: full attention against window attention only."""
    rows = []
    for r in load("ditfastattn-resolution.json")["resolution"]:
        window = next(k[len("window"):-len("_s")] for k in r if k.startswith("window") and k.endswith("_s"))
        rows.append([r["model"], r["label"].split(";")[0], str(r["size"]), fixed(r["full_s"], 3),
                     fixed(r[f"window{window}_s"], 3), f"x{r[f'window{window}_speedup']:.2f}", window,
                     fixed(r["full_peak_mb"], 0), fixed(r[f"window{window}_peak_mb"], 0)])
    return markdown(["model", "size is", "size", "full s", "window s", "window speed-up", "window",
                     "full peak MiB", "window peak MiB"], rows)


def linfusion_quality_table() -> str:
    rows = []
    for name in ("linfusion-unet.json", "linfusion-unet-64.json"):
        for r in load(name)["quality"]:
            rows.append([r["model"], f"{r['size']} px", str(r["prompts"]), str(r["training_steps"]),
                         fixed(r["psnr"], 1), fixed(r["ssim"], 4), percent(r["adherence_softmax"]),
                         percent(r["adherence_linfusion"])])
    return markdown(["model", "size", "held-out prompts", "distillation steps", "PSNR dB vs softmax", "SSIM",
                     "adherence softmax", "adherence LinFusion"], rows)


def linfusion_cost_table() -> str:
    """Per layer or model and size: softmax against linear attention, time and peak memory."""
    rows = []
    for r in load("linfusion-cost.json")["cost"]["rows"]:
        size = f"{r['tokens']} tokens" if "tokens" in r else f"side {r['side']} ({r['self_attention_tokens']} tokens)"
        rows.append([r["what"], size, fixed(r["softmax_ms"], 1), fixed(r["linear_ms"], 1),
                     f"x{r['softmax_ms'] / r['linear_ms']:.2f}", fixed(r["softmax_peak_mb"], 2),
                     fixed(r["linear_peak_mb"], 2)])
    return markdown(["what", "size", "softmax ms", "linear ms", "linear speed-up", "softmax peak MB",
                     "linear peak MB"], rows)


def early_exit_table() -> str:
    """Per model and configuration: MACs saved, quality against the unmodified model, and the wall
    speed-up of the timing run (interleaved) where it timed that spec."""
    rows = []
    for model in ("dit", "unet"):
        data = load(f"early-exit-{model}.json")
        timed = {r["config"]: r for r in load(f"early-exit-timing-{model}.json")["rows"]}
        timed[""] = timed.get("unmodified")
        for r in data["rows"]:
            t = timed.get(r["spec"])
            rows.append([model, r["config"], f"`{r['spec']}`" if r["spec"] else "-", percent(r["macs_saved"]),
                         fixed(r["psnr"], 1), fixed(r["ssim"], 3), percent(r["adherence"]),
                         "-" if t is None else f"x{t['speedup']:.2f}"])
    return markdown(["model", "config", "spec", "MACs saved", "PSNR dB", "SSIM", "adherence", "wall speed-up"], rows)


def table(name: str) -> str:
    if name == "early-exit":
        return early_exit_table()
    if name == "linfusion-quality":
        return linfusion_quality_table()
    if name == "linfusion-cost":
        return linfusion_cost_table()
    if name == "ditfastattn-resolution":
        return ditfastattn_resolution_table()
    if name.startswith("ditfastattn-stacks-"):
        return ditfastattn_stacks_table(name[len("ditfastattn-stacks-"):])
    if name.startswith("ditfastattn-") and name not in BENCH_TABLES:
        return ditfastattn_table(name[len("ditfastattn-"):])
    if name == "quant-timing":
        return quant_timing_table()
    if name.startswith("quant-stacks-"):
        return quant_stacks_table(name[len("quant-stacks-"):])
    if name.startswith("quant-"):
        return quant_table(name[len("quant-"):])
    if name == "serve-load":
        return serve_load_table()
    if name == "mixture-samplers":
        return mixture_samplers_table()
    if name == "summary":
        return summary_table()
    if name == "self-comparisons":
        return self_comparison_table()
    if name == "fronts":
        return fronts_table()
    if name == "tune":
        return tune_table()
    if name == "real-shapes":
        return real_shapes_table()
    if name == "real-shapes-cfg":
        return real_shapes_cfg_table()
    if name == "serve-workload":
        return serve_workload_table()
    if name in BENCH_TABLES:
        return bench_table(*BENCH_TABLES[name])
    if name in PARALLEL_TABLES:
        return parallel_table(PARALLEL_TABLES[name])
    return stored_table(name)


def rebuild(text: str) -> str:
    return MARKER.sub(lambda m: f"<!-- table: {m.group(1)} -->\n{table(m.group(1))}\n<!-- end -->", text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if BENCHMARKS.md's tables are not what the JSON gives")
    parser.add_argument("--file", type=Path, default=BENCHMARKS, help="the markdown file (default: BENCHMARKS.md)")
    args = parser.parse_args(argv)
    text = args.file.read_text()
    new = rebuild(text)
    if args.check:
        if new != text:
            print(f"{args.file} is stale: run python bench/report.py", file=sys.stderr)
            return 1
        print(f"{args.file}: every table matches bench/results")
        return 0
    if new != text:
        args.file.write_text(new)
        print(f"rewrote the tables of {args.file}")
    else:
        print(f"{args.file}: up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
