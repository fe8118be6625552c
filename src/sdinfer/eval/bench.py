"""The bench harness: a configuration against its baseline, measured the same way.

For each configuration it generates the whole prompt set (batched, one seed per
prompt, the same seeds for every configuration), once as a warm-up on the first
batch and then ``repeats`` timed times; ``wall_s`` is the median.  The timed runs
of the baseline and the configurations are interleaved batch by batch, in an order
that alternates between rounds (``measure_all``), so that none is favoured by being
timed first.  The
time of every timed batch is kept, and the baseline's time per image across its
timed batches measures the machine's noise during the run (``timing_noise``;
the bench warns when it is above 3%, the size of effect it can then resolve).
Quality is
measured on the images of the first timed run against the baseline's images
(PSNR, SSIM) and against the prompts (adherence, shapes prompts only).  MACs
are counted for one image's generation.  Speed-ups are baseline / configuration.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError
from ..pipeline import DEFAULT_GUIDANCE, DEFAULT_STEPS, Pipeline
from .adherence import adherence_rate
from .cost import PeakMemory, count_macs
from .metrics import PSNR_CAP_DB, psnr, ssim


@dataclass(frozen=True)
class RunSpec:
    """One configuration to generate with."""

    sampler: str = "ddim"
    steps: int = DEFAULT_STEPS
    cfg: float = DEFAULT_GUIDANCE
    accelerate: str = ""   # accelerator spec installed for this configuration only
    spacing: str | None = None          # time grid (None: the sampler's own)
    analytic_first_step: bool = False

    @property
    def label(self) -> str:
        extra = f" grid={self.spacing}" if self.spacing else ""
        extra += " afs" if self.analytic_first_step else ""
        extra += f" + {self.accelerate}" if self.accelerate else ""
        return f"{self.sampler}:{self.steps} cfg={self.cfg:g}{extra}"

    @classmethod
    def parse_baseline(cls, text: str, cfg: float) -> "RunSpec":
        """``SAMPLER:STEPS``, e.g. ``ddim:250`` (sampler options may precede: ``ddim:eta=1:250``)."""
        sampler, sep, steps = text.rpartition(":")
        if not sep or not steps.strip().isdigit() or not sampler:
            raise UserError(f"baseline {text!r} must look like SAMPLER:STEPS, e.g. ddim:250")
        return cls(sampler=sampler, steps=int(steps), cfg=cfg)


@dataclass
class Measurement:
    spec: RunSpec
    pixels: torch.Tensor
    nfe: int
    model_calls: int
    macs: int
    wall_runs: list[float]
    peak_mem_mb: float
    batch_runs: list[list[float]]   # [repeat][batch] seconds


    @property
    def wall_s(self) -> float:
        return statistics.median(self.wall_runs)


def _batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def measure(pipe: Pipeline, spec: RunSpec, prompts: list[str], batch: int, seed: int,
            repeats: int, size: int | None = None) -> Measurement:
    """One configuration on its own (``measure_all`` with a single spec)."""
    return measure_all(pipe, [spec], prompts, batch, seed, repeats, size)[0]


def measure_all(pipe: Pipeline, specs: list[RunSpec], prompts: list[str], batch: int, seed: int,
                repeats: int, size: int | None = None, progress: bool | None = None,
                install: Callable[[RunSpec], Callable[[], None]] | None = None) -> list[Measurement]:
    """Measure every spec with their timed runs interleaved, so no configuration is favoured by
    when it runs.

    Each spec first generates the first batch as a warm-up.  Then the timed work goes in rounds,
    one round per (repeat, batch): every spec generates that batch, in the listed order on even
    rounds and in reverse on odd ones (A B B A ...).  A spec's timed run is the sum of its batch
    times within one repeat, so a machine that speeds up or slows down over the run (turbo,
    caches, another process) costs every spec alike instead of the one timed first.  With a
    single batch and one repeat there is one round, and the shared warm-ups are what protects it.
    ``progress``: a bar on stderr (None: only when stderr is a terminal).  ``install``: how a spec's
    configuration goes on (``install(spec)``, around each of its runs, returning what takes it off
    again), for configurations that are not sdinfer accelerator specs (bench/fronts.py's peers);
    default: ``sdinfer.accelerate(pipe, spec.accelerate)`` where the spec has one.
    """
    if repeats < 1:
        raise UserError(f"repeats must be >= 1, got {repeats}")
    if batch < 1:
        raise UserError(f"batch must be >= 1, got {batch}")
    if not prompts:
        raise UserError("no prompts to measure on")
    seeds = [seed + i for i in range(len(prompts))]
    chunks = list(zip(_batches(prompts, batch), _batches(seeds, batch)))

    def generate(spec: RunSpec, chunk):
        grid = {"spacing": spec.spacing} if spec.spacing else {}   # only where set: other loops
        if spec.analytic_first_step:                               # (bench/peers.py) lack them
            grid["analytic_first_step"] = True
        return pipe(chunk[0], steps=spec.steps, sampler=spec.sampler, guidance_scale=spec.cfg,
                    seeds=chunk[1], size=size, **grid)

    n = len(specs)
    batch_walls = [[[0.0] * len(chunks) for _ in range(repeats)] for _ in range(n)]
    first: list[list] = [[] for _ in range(n)]
    peak_mb = [float("nan")] * n
    bar = _progress_bar(n * (1 + repeats * len(chunks)), progress)
    try:
        for i, spec in enumerate(specs):
            bar.set_description(f"warm-up {spec.label}")
            with _installed(pipe, spec, install):
                generate(spec, chunks[0])
            bar.update()
        for r in range(repeats):
            for b, chunk in enumerate(chunks):
                order = range(n) if (r * len(chunks) + b) % 2 == 0 else range(n - 1, -1, -1)
                for i in order:
                    bar.set_description(f"repeat {r + 1}/{repeats} {specs[i].label}")
                    with _installed(pipe, specs[i], install):
                        mem = PeakMemory()
                        with mem.measure():
                            start = time.perf_counter()
                            result = generate(specs[i], chunk)
                            batch_walls[i][r][b] = time.perf_counter() - start
                    peak_mb[i] = mem.mb if math.isnan(peak_mb[i]) else max(peak_mb[i], mem.mb)
                    if r == 0:   # kept for quality and counts; the rest of the result is dropped
                        first[i].append((result.pixels, result.nfe, result.model_calls))
                    bar.update()
    finally:
        bar.close()
    out = []
    for i, spec in enumerate(specs):
        with _installed(pipe, spec, install):
            macs = count_macs(lambda: generate(spec, (prompts[:1], seeds[:1])))
        pixels, nfe, model_calls = torch.cat([p for p, _, _ in first[i]]), first[i][0][1], first[i][0][2]
        out.append(Measurement(spec=spec, pixels=pixels, nfe=nfe, model_calls=model_calls, macs=macs,
                               wall_runs=[sum(run) for run in batch_walls[i]], peak_mem_mb=peak_mb[i],
                               batch_runs=batch_walls[i]))
    return out


def generate_images(pipe: Pipeline, prompts: list[str], steps: int, cfg: float, batch: int, seed: int = 0,
                    sampler: str = "ddim", accelerate: str = "") -> torch.Tensor:
    """The prompts' images in batches, prompt i with noise seed ``seed + i`` (what every quality run
    compares), with the accelerator spec ``accelerate`` installed for the call."""
    with _installed(pipe, RunSpec(accelerate=accelerate)):
        return torch.cat([pipe(prompts[i:i + batch], steps=steps, sampler=sampler, guidance_scale=cfg,
                               seeds=[seed + i + j for j in range(len(prompts[i:i + batch]))]).pixels
                          for i in range(0, len(prompts), batch)])


@contextmanager
def _installed(pipe: Pipeline, spec: RunSpec, install: Callable[[RunSpec], Callable[[], None]] | None = None):
    """The spec's configuration on ``pipe`` for the block: ``install(spec)`` where given, else the
    spec's accelerator (nothing when it has none)."""
    if install is not None:
        remove = install(spec)
        try:
            yield
        finally:
            remove()
        return
    if not spec.accelerate:
        yield
        return
    from ..accelerate import accelerate

    handle = accelerate(pipe, spec.accelerate)
    try:
        yield
    finally:
        handle.remove()


def _progress_bar(total: int, enabled: bool | None):
    from tqdm.auto import tqdm

    disable = not sys.stderr.isatty() if enabled is None else not enabled
    return tqdm(total=total, file=sys.stderr, disable=disable, leave=False, unit="run")


def record(m: Measurement, base: Measurement, prompts: list[str], is_baseline: bool) -> dict:
    images = [(p.permute(1, 2, 0).numpy() * 255).round() for p in m.pixels]
    adherence = adherence_rate(images, prompts)
    rec = {
        "config": ("baseline " if is_baseline else "") + m.spec.label,
        **asdict(m.spec),
        "nfe": m.nfe,
        "model_calls": m.model_calls,
        "macs": m.macs,
        "wall_s": round(m.wall_s, 4),
        "wall_s_runs": [round(w, 4) for w in m.wall_runs],
        "wall_s_batches": [[round(w, 4) for w in run] for run in m.batch_runs],
        "peak_mem_mb": round(m.peak_mem_mb, 1),
        "psnr": round(psnr(m.pixels, base.pixels), 3),
        "ssim": round(ssim(m.pixels, base.pixels), 5),
        "adherence": None if adherence is None else round(adherence, 4),
        "speedup_wall": round(base.wall_s / m.wall_s, 4),
        "speedup_macs": round(base.macs / m.macs, 4),
    }
    return rec


def run_bench(pipe: Pipeline, specs: list[RunSpec], baseline: RunSpec, prompts: list[str],
              batch: int = 50, seed: int = 0, repeats: int = 3, size: int | None = None,
              log=print, progress: bool | None = None) -> dict:
    """Measure the baseline and each spec, their timed runs interleaved (``measure_all``);
    returns ``{"meta": ..., "records": [...]}``."""
    log(f"baseline {baseline.label} and {len(specs)} configuration(s) on {len(prompts)} prompts, "
        f"{repeats} timed run(s) each, interleaved ...")
    base, *others = measure_all(pipe, [baseline, *specs], prompts, batch, seed, repeats, size,
                                progress=progress)
    noise = timing_noise(base, [len(chunk) for chunk in _batches(prompts, batch)])
    if noise is not None and noise > NOISE_WARNING:
        log(f"warning: the baseline's time per image varied by {noise:.0%} across its timed batches: "
            f"the machine was not steady, so speed-ups within about {noise:.0%} of each other are "
            "not resolved; rerun on an idle machine or with more --repeats")
    records = [record(base, base, prompts, is_baseline=True)]
    records += [record(m, base, prompts, is_baseline=False) for m in others]
    meta = {
        "model": pipe.model.name,
        "model_class": pipe.model.family,
        "prompts": len(prompts),
        "batch": batch,
        "seed": seed,
        "repeats": repeats,
        "size": size or pipe.model.native_size,
        "psnr_cap_db": PSNR_CAP_DB,
        "timing": "interleaved",
        "timing_noise": None if noise is None else round(noise, 4),
        "machine": machine_description(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }
    return {"meta": meta, "records": records}


NOISE_WARNING = 0.03


def timing_noise(base: Measurement, batch_sizes: list[int]) -> float | None:
    """How unsteady the machine was: (slowest - fastest) / median of the baseline's time per image
    over its timed batches of the full size.  The baseline does the same work per image in every
    batch, so on a steady machine this is near 0.  None with fewer than two such batches."""
    full = max(batch_sizes)
    per_image = [run[b] / full for run in base.batch_runs for b, size in enumerate(batch_sizes)
                 if size == full]
    if len(per_image) < 2:
        return None
    return (max(per_image) - min(per_image)) / statistics.median(per_image)


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_description() -> str:
    """e.g. ``x86_64 AMD EPYC 7B13, 2 threads``."""
    return f"{platform.machine()} {cpu_name()}, {torch.get_num_threads()} threads"


COLUMNS = [("config", "{}"), ("nfe", "{}"), ("macs", "{:.3g}"), ("wall_s", "{:.3f}"),
           ("speedup_wall", "{:.2f}x"), ("speedup_macs", "{:.2f}x"), ("psnr", "{:.2f}"),
           ("ssim", "{:.4f}"), ("adherence", "{:.1%}"), ("peak_mem_mb", "{:.0f}")]


def format_table(report: dict) -> str:
    rows = [[c for c, _ in COLUMNS]]
    for rec in report["records"]:
        rows.append(["-" if rec[c] is None else f.format(rec[c]) for c, f in COLUMNS])
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    cap = report["meta"]["psnr_cap_db"]
    lines.append(f"(psnr against the baseline, capped at {cap:g} dB for identical images)")
    return "\n".join(lines)


def write_json(report: dict, path: Path) -> None:
    path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")


def _group_and_knobs(config: str) -> tuple[str, str]:
    """(method, its knobs) of a configuration's label: the accelerator after " + " where there is
    one ("deepcache", "interval=3"), else the sampler ("ddim", "10")."""
    head, plus, accel = config.partition(" + ")
    name, _, knobs = (accel if plus else head.split()[0]).partition(":")
    return name, knobs or ("default" if plus else "")


def plot(report: dict, path: Path) -> None:
    """Quality (PSNR, SSIM, adherence) against speed-up, wall clock (o, solid) and MACs (x, dashed),
    one colour per method, its knob settings joined by a line and labelled."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def usable(value) -> bool:
        return value is not None and not (isinstance(value, float) and math.isnan(value))

    groups: dict[str, list[tuple[str, dict]]] = {}
    for rec in report["records"]:
        name, knobs = _group_and_knobs(rec["config"])
        groups.setdefault("baseline" if rec.get("is_baseline") or rec["config"].startswith("baseline") else name,
                          []).append((knobs, rec))
    colours = plt.get_cmap("tab20").colors
    panels = [("psnr", "PSNR vs baseline (dB)"), ("ssim", "SSIM vs baseline"), ("adherence", "prompt adherence")]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.5))
    for ax, (key, name) in zip(axes, panels):
        for i, (group, members) in enumerate(groups.items()):
            colour = "black" if group == "baseline" else colours[i % len(colours)]
            points = sorted((rec["speedup_wall"], rec["speedup_macs"], rec[key], knobs)
                            for knobs, rec in members if usable(rec[key])
                            and not (group == "baseline" and key in ("psnr", "ssim")))
            if not points:
                continue
            walls, macs, values, labels = zip(*points)
            ax.plot(walls, values, "o-", color=colour, label=group, markersize=5, linewidth=1)
            ax.plot(macs, values, "x--", color=colour, markersize=5, linewidth=0.6, alpha=0.6)
            for x, y, label in zip(walls, values, labels):
                if label and label != "default" or len(points) > 1:
                    ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points", color=colour)
        ax.set_xlabel("speed-up over the baseline (o solid: wall clock, x dashed: MACs)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=8, frameon=False)
    fig.suptitle(f"{report['meta']['model']}: quality vs speed-up ({report['meta']['date']})")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
