"""The caches and CFG parallel on the real shapes of SD 1.5, SDXL, PixArt-Sigma and FLUX.1
(random weights: speed only).

    python bench/real_shapes.py              # the full run: bench/results/real-shapes.{json,md}
    python bench/real_shapes.py --quick --out /tmp/rs    # tiny widths, 2 steps (the test's run)
    python bench/real_shapes.py --model sd15 --method deepcache --no-cfg-parallel   # one piece

The default models are 1-3 M parameters; this asks whether the caches' speed-ups and the hooks'
cost hold on the denoisers people run.  Each denoiser is built with diffusers' own class from
the published config (written below as dicts: SD 1.5's and SDXL's ``unet/config.json``,
PixArt-Sigma's and FLUX.1-dev's ``transformer/config.json``), seeded random weights, float32,
and run through sdinfer's own path: ``sdinfer.accelerate(model, SPEC)`` on the bare diffusers
model and ``sdinfer.sample`` (DDIM; on FLUX's flow schedule DDIM is Euler) on a seeded noise
latent with seeded random text states of the model's widths (``call_denoiser``, the adapters'
declared call signatures; SDXL's pooled text and size ids passed as its pipeline passes them).
Random weights make every image noise, so only speed is measured: no quality column.

Per model, every cache method of the registry (``sdinfer.cache.METHODS``) that installs on the
model's class, at one fixed knob (``KNOBS``), and the same hooks at a knob that never skips
(``NEVER_SKIP``: interval 1, threshold 0, budget 1, the gate at the last step), against no hooks:

- wall_s: one generation (one prompt, ``--steps`` DDIM steps, default 8; guidance on: a batch of
  2, except FLUX.1-dev, guidance-distilled, whose pipeline runs one branch), median of
  ``--repeats`` timed runs (default 2).  The timed runs are interleaved as
  ``sdinfer.eval.bench.measure_all`` does: every configuration once per round, the order reversed
  every other round; each configuration is installed around each of its runs.  Before the rounds:
  one plain 2-step generation (the process's first run pays for the kernels' set-up), then each
  measured configuration once under the MAC counter (its warm-up).
- speedup: the uncached wall time over the method's.  macs: multiply-accumulates of that whole
  generation counted as ``sdinfer.eval.cost.count_macs`` counts them (torch's FLOP formulas / 2;
  ``MacCounter``, without FlopCounterMode's module bookkeeping, same totals), so bound = MACs
  uncached / MACs cached is the compute bound of the very run that was timed (the adaptive
  methods decide per run), and efficiency = speedup / bound.
- overhead: the never-skip knob against no hooks, both at ``--overhead-steps`` (default 2), per
  step: ms and % of an uncached step.  The baseline's spread (``noise``: (max - min) / median of
  its timed runs) says what size of difference the run resolves.
- Calibrated methods (TeaCache, MagCache, Block Caching) are calibrated on the random model
  first by their own calibrators (one 8-step generation each, another seed).  Learning-to-Cache's
  router is trained through the model (about 150 forward and backward passes), too slow here: its
  router logits are seeded random instead, so its row is the speed of a random plan at its
  budget (labelled "random router" in the table).

CFG parallel (``src/sdinfer/parallel/cfg_parallel.py``) on one UNet and one DiT shape
(``--cfg-model``; default SD 1.5 and PixArt-Sigma): 2 gloo ranks of one thread each
(``launch_local``, as ``bench/parallel.py``), against one process with 2 threads and against one
process with 1 thread (rank 0 alone while rank 1 waits in a barrier), median of ``--repeats``
after a 2-step warm-up; the largest difference from the one-process output is recorded (exact up
to float rounding).

Sizes (``SHAPES``, ``--scale``).  Every shape keeps its published widths, heads, block types and
conditioning; the latent is 16x16 (128 px for the UNets; 64 image tokens for PixArt-Sigma and,
2x2-packed, FLUX), the text 77 CLIP tokens (UNets) or 64 T5 tokens (PixArt-Sigma takes up to 300,
FLUX.1-dev 512: at 64 image tokens so many text tokens would dominate the cost, which they do not
at 1024 px).  ``fast`` (default) cuts the depth to about half so that the run fits in about a
quarter of an hour: SD 1.5 and SDXL 1 layer per block (of 2), SDXL's transformer depth 1/2/2
(of 1/2/10), PixArt-Sigma 14 of 28 blocks, FLUX 1 double + 2 single blocks (of 19 + 38); every
cut is in the table's model column.  ``full``: SD 1.5, SDXL and PixArt-Sigma whole (SDXL: 2.6 B
parameters, 10.3 GB in float32), FLUX 2 + 4 blocks (the whole of FLUX.1 is 12 B parameters, 48 GB
in float32: more than this machine's 24 GB).  ``quick``: tiny widths, 2 steps, 1 repeat.

Expected time and memory on this 2-core CPU with nothing else running, default settings: about
15-17 minutes (estimated, not timed whole), a peak of about 3 GB in the main process and about
6 GB across the two CFG ranks.  The estimate: the run is 26 + 8 (1 + n) + 2 (1 + n) (8 + 2) steps
for a model with n methods (calibrations, warm-up, MAC-counted runs, 2 timed rounds; n = 7 on the
UNets, 9 on the DiTs: about 1,110 steps) plus about 170 step-equivalents of CFG parallel, at
0.6-0.8 s a step (MAC counts and per-call probes of the four shapes).  The one timing of a piece
(``--model sd15 --method deepcache --repeats 1 --no-cfg-parallel``, 2026-12-07, other processes
sharing the machine, load average 3) gave 0.9 s an uncached step and 3.1 s for DeepCache's 8-step
generation, peak RSS 2.9 GB; a second, under load 6, ran ten times slower.  The JSON records the
run's own ``seconds`` and ``peak_rss_mb``.  ``--scale full`` takes about 3x the time and peaks
near 12 GB (SDXL).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

RESULTS = Path(__file__).resolve().parent / "results"

# ---- the published configs ---------------------------------------------------------------------
# runwayml/stable-diffusion-v1-5, unet/config.json
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    only_cross_attention=False, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
    cross_attention_dim=768, attention_head_dim=8,
)
# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    only_cross_attention=False, block_out_channels=(320, 640, 1280), layers_per_block=2,
    downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
    cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, conv_in_kernel=3, conv_out_kernel=3,
)
# PixArt-alpha/PixArt-Sigma-XL-2-1024-MS, transformer/config.json
PIXART_SIGMA = dict(
    sample_size=128, patch_size=2, in_channels=4, out_channels=8, num_layers=28, num_attention_heads=16,
    attention_head_dim=72, cross_attention_dim=1152, caption_channels=4096, attention_bias=True,
    activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
    norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=2, use_additional_conditions=False,
    upcast_attention=False, dropout=0.0, norm_num_groups=32, attention_type="default",
)
# black-forest-labs/FLUX.1-dev, transformer/config.json
FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# the schedulers' configs: SD 1.5 / SDXL / PixArt-Sigma share SD's scaled-linear betas; FLUX flows
VP_SCHEDULE = dict(_class_name="DDIMScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                   beta_schedule="scaled_linear")
FLOW_SCHEDULE = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=3.0)


@dataclass(frozen=True)
class Shape:
    name: str
    title: str                   # what the table calls it
    cls: str                     # the diffusers class
    config: dict                 # the published config
    # per scale ("fast", the default, and "full"): (overrides of the published config, what they
    # leave out, for the table); a scale not listed builds the published config whole
    scales: dict
    quick: dict                  # overrides of --scale quick (tiny widths)
    text_tokens: int = 77        # the text states' tokens (their width and the pooled width: the config's)
    latent: int = 16             # the latent's side
    channels: int = 4            # the latent's channels
    guidance: float = 5.0        # 1: one branch (no CFG batch)
    prediction: str = "epsilon"
    schedule: dict = field(default_factory=lambda: VP_SCHEDULE)

    @property
    def family(self) -> str:
        return "unet" if self.cls == "UNet2DConditionModel" else "dit"


SHAPES = {s.name: s for s in [
    Shape("sd15", "SD 1.5 UNet", "UNet2DConditionModel", SD15_UNET,
          {"fast": (dict(layers_per_block=1), "1 layer per block of 2")}, quick=dict(
        block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
        attention_head_dim=4)),
    Shape("sdxl", "SDXL UNet", "UNet2DConditionModel", SDXL_UNET,
          {"fast": (dict(layers_per_block=1, transformer_layers_per_block=(1, 2, 2)),
                    "1 layer per block of 2, transformer depth 1/2/2 of 1/2/10")}, quick=dict(
              block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
              transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4), addition_time_embed_dim=8,
              projection_class_embeddings_input_dim=16 + 6 * 8)),
    Shape("pixart-sigma", "PixArt-Sigma transformer", "PixArtTransformer2DModel", PIXART_SIGMA,
          {"fast": (dict(num_layers=14), "14 of 28 blocks")}, text_tokens=64, quick=dict(
              num_layers=3, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, caption_channels=32)),
    Shape("flux", "FLUX.1-dev transformer", "FluxTransformer2DModel", FLUX_DEV,
          {"fast": (dict(num_layers=1, num_single_layers=2), "1 double + 2 single blocks of 19 + 38"),
           # the whole of FLUX.1 is 12 B parameters, 48 GB in float32: more than this machine's 24 GB
           "full": (dict(num_layers=2, num_single_layers=4), "2 double + 4 single blocks of 19 + 38")},
          text_tokens=64, guidance=1.0, prediction="flow", channels=16, schedule=FLOW_SCHEDULE,
          quick=dict(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                     joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))),
]}
QUICK_TEXT = dict(text_tokens=8)   # --quick: short text; the widths come from each shape's ``quick``

# the fixed knob of each method, and a knob at which the same hooks never skip
KNOBS = {"deepcache": "interval=3", "fora": "interval=3", "taylorseer": "interval=3", "fbcache": "threshold=0.08",
         "dbcache": "threshold=0.12", "teacache": "threshold=0.1", "magcache": "threshold=0.06",
         "blockcache": "threshold=0.05", "tgate": "gate=0.5", "l2c": "budget=0.35"}
NEVER_SKIP = {"deepcache": "interval=1", "fora": "interval=1", "taylorseer": "interval=1,warmup=0",
              "fbcache": "threshold=0", "dbcache": "threshold=0", "teacache": "threshold=0",
              "magcache": "threshold=0", "blockcache": "threshold=0", "tgate": "gate=1.0,sp_interval=1",
              "l2c": "budget=1"}
CALIBRATED = ("teacache", "magcache", "blockcache")   # calibrated here by their own calibrators
RANDOM_ROUTER = "l2c"                                  # a seeded random router (see the docstring)
CFG_MODELS = ("sd15", "pixart-sigma")


# ---- the model and its calls -------------------------------------------------------------------
SCALES = ("quick", "fast", "full")


def model_config(shape: Shape, scale: str) -> dict:
    config = dict(shape.config)
    config.update(shape.quick if scale == "quick" else shape.scales.get(scale, ({}, ""))[0])
    return config


def model_title(shape: Shape, scale: str) -> str:
    if scale == "quick":
        return f"{shape.title} (quick: tiny widths)"
    reduction = shape.scales.get(scale, ({}, ""))[1]
    return f"{shape.title} ({'real widths, ' + reduction if reduction else 'published config'})"


def build(shape: Shape, scale: str = "fast", seed: int = 0) -> torch.nn.Module:
    import diffusers

    torch.manual_seed(seed)
    model = getattr(diffusers, shape.cls)(**model_config(shape, scale))
    return model.eval().requires_grad_(False)


class Runner:
    """One random-weight denoiser, its seeded text and noise, and one generation through sdinfer."""

    def __init__(self, shape: Shape, scale: str = "fast"):
        from sdinfer.models.calling import TextConditioning
        from sdinfer.schedules import schedule_from_diffusers

        quick = scale == "quick"
        self.shape, self.scale = shape, scale
        start = time.perf_counter()
        self.model = build(shape, scale)
        self.build_s = time.perf_counter() - start
        self.params = sum(p.numel() for p in self.model.parameters())
        config = self.model.config
        tokens = QUICK_TEXT["text_tokens"] if quick else shape.text_tokens
        width = int(config.get("cross_attention_dim") if shape.family == "unet" else
                    config.get("caption_channels") or config.get("joint_attention_dim"))
        pooled = int(config.get("pooled_projection_dim") or 0) if shape.cls == "FluxTransformer2DModel" else \
            (int(config["projection_class_embeddings_input_dim"]) - 6 * int(config["addition_time_embed_dim"])
             if config.get("addition_embed_type") == "text_time" else 0)
        g = torch.Generator().manual_seed(1)

        def text() -> TextConditioning:
            return TextConditioning(torch.randn(1, tokens, width, generator=g),
                                    torch.randn(1, pooled, generator=g) if pooled else None)
        self.cond, self.uncond = text(), text()
        self.latent = 8 if quick else shape.latent
        self.schedule = schedule_from_diffusers(shape.schedule)
        self.guided = shape.guidance != 1.0

    def call(self, x: torch.Tensor, t: torch.Tensor, text) -> torch.Tensor:
        from sdinfer.models.calling import call_denoiser

        if self.model.config.get("addition_embed_type") != "text_time":
            return call_denoiser(self.model, x, t, text)
        # SDXL: the pooled text and the size ids (original size, crop, target size) as its pipeline passes them
        side = x.shape[-1] * 8
        ids = torch.tensor([side, side, 0, 0, side, side], dtype=x.dtype).expand(x.shape[0], 6)
        return self.model(x, t, encoder_hidden_states=text.states, return_dict=False,
                          added_cond_kwargs={"text_embeds": text.pooled, "time_ids": ids})[0]

    def generate(self, steps: int, seed: int = 0) -> torch.Tensor:
        import sdinfer

        x = torch.randn(1, self.shape.channels, self.latent, self.latent, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            return sdinfer.sample(self.call, x, self.schedule, sampler="ddim", steps=steps,
                                  prediction_type=self.shape.prediction, cond=self.cond,
                                  uncond=self.uncond if self.guided else None, guidance_scale=self.shape.guidance)


# ---- calibrations ----------------------------------------------------------------------------------
class CalibrationPipe:
    """What a cache calibrator drives (``CalibrationRun.pipe``): the denoiser and a generation per
    call, here the runner's on its seeded random text."""

    def __init__(self, runner: Runner):
        self.runner = runner
        self.model = SimpleNamespace(denoiser=runner.model)

    def __call__(self, prompts, steps, sampler, guidance_scale, seed):
        for i in range(len(prompts)):
            self.runner.generate(steps, seed=seed + i)


def calibrate(runner: Runner, method: str, steps: int, folder: Path) -> Path:
    """``method``'s calibration of the random model, by its own calibrator (seed 10^6, apart from the
    timed runs' noise), written to ``folder``."""
    from sdinfer.cache.calibration import CALIBRATORS, CalibrationRun

    run = CalibrationRun(CalibrationPipe(runner), ["random text"], steps=steps, sampler="ddim",
                         guidance_scale=runner.shape.guidance, seed=10**6, batch=1)
    return CALIBRATORS[method](run).save(folder / f"{method}.safetensors")


def random_router(runner: Runner, steps: int, folder: Path) -> Path:
    """Learning-to-Cache router logits drawn at random (seeded), in the layout its calibrator writes."""
    from sdinfer.cache.block_caching import layer_blocks
    from sdinfer.cache.calibration import Calibration
    from sdinfer.cache.learning_to_cache import L1_WEIGHTS

    units = [name for name, _ in layer_blocks(runner.model, RANDOM_ROUTER)]
    logits = torch.randn(len(L1_WEIGHTS), steps, len(units), generator=torch.Generator().manual_seed(2))
    meta = {"units": units, "steps": steps, "sampler": "ddim", "guidance_scale": runner.shape.guidance,
            "prompts": 0, "l1_weights": list(L1_WEIGHTS), "random_router": True}
    return Calibration(RANDOM_ROUTER, {"logits": logits}, meta).save(folder / f"{RANDOM_ROUTER}-{steps}.safetensors")


# ---- the cache measurements -------------------------------------------------------------------------
def spec(method: str, knob: str, calibration: Path | None) -> str:
    options = [knob] if knob else []
    if calibration is not None:
        options.append(f"calibration={calibration}")
    return f"{method}:{','.join(options)}" if options else method


def refusal(model: torch.nn.Module, method: str, text: str) -> str | None:
    """Why ``text`` does not install on ``model`` (None: it does)."""
    import sdinfer

    try:
        sdinfer.accelerate(model, text).remove()
    except Exception as err:   # noqa: BLE001 - the refusal is what the row reports
        return f"{type(err).__name__}: {err}"
    return None


class MacCounter:
    """Counts multiply-accumulates as ``sdinfer.eval.cost.count_macs`` does (torch's FLOP formulas,
    ``flop_registry``, / 2), without ``FlopCounterMode``'s per-module bookkeeping, which slows a
    large model's run by tens of percent; the totals are the same (the quick test checks it)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from sdinfer.eval.cost import flop_formulas

        counter, flop_registry = self, flop_formulas()

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                formula = flop_registry.get(func._overloadpacket)
                if formula is not None:
                    counter.flops += formula(*args, **kwargs, out_val=out)
                return out

        self.flops, self.mode = 0, Mode()

    def count(self, fn) -> int:
        self.flops = 0
        with self.mode:
            fn()
        return int(self.flops // 2)


@dataclass(frozen=True)
class Config:
    spec: str            # "" for no hooks
    steps: int
    count_macs: bool     # run once under the MAC counter first (its warm-up)


def timed_rounds(runner: Runner, configs: list[Config], repeats: int) -> tuple[list[list[float]], list]:
    """Per configuration: its timed runs and its MACs (None where not counted, the exception where its
    first run failed).  After a plain 2-step
    warm-up, those counted run once under the MAC counter (their warm-up); then rounds of every configuration, the order reversed
    every other round, each installed around each of its runs."""
    import sdinfer

    def run(config: Config, fn):
        handle = sdinfer.accelerate(runner.model, config.spec) if config.spec else None
        try:
            return fn()
        finally:
            if handle is not None:
                handle.remove()

    runner.generate(2)   # the first plain run of the process pays for the kernels' set-up
    counter = MacCounter()
    macs: list = []
    for c in configs:   # a configuration that fails here is left out of the rounds, its error kept
        try:
            macs.append(run(c, lambda c=c: counter.count(lambda: runner.generate(c.steps))) if c.count_macs else None)
        except Exception as err:   # noqa: BLE001 - the row says why
            macs.append(err)
    walls: list[list[float]] = [[] for _ in configs]

    def timed(steps: int) -> float:
        start = time.perf_counter()
        runner.generate(steps)
        return time.perf_counter() - start

    for r in range(repeats):
        order = range(len(configs)) if r % 2 == 0 else range(len(configs) - 1, -1, -1)
        for i in order:
            if not isinstance(macs[i], Exception):
                walls[i].append(run(configs[i], lambda i=i: timed(configs[i].steps)))
    return walls, macs


def measure_model(runner: Runner, methods: list[str], steps: int, overhead_steps: int, repeats: int,
                  folder: Path, count_never_skip: bool = False, log=print) -> dict:
    """Every method of ``methods`` that installs: its speed-up and MAC bound at ``steps``, and its hooks'
    overhead at ``overhead_steps`` (the never-skip knob against no hooks at that step count)."""
    from sdinfer import cache

    model = runner.model
    rows, plan = [], {}
    configs = [Config("", steps, True)]
    if overhead_steps != steps:
        configs.append(Config("", overhead_steps, False))
    base_overhead = len(configs) - 1
    for method in methods:
        calibration = overhead_calibration = None
        if method in CALIBRATED or method == RANDOM_ROUTER:
            why = refusal(model, method, f"{method}:calibration=/nonexistent")
            if why is not None and "calibration" not in why:   # refuses the class, not the missing file
                rows.append({"method": method, "status": f"does not install: {why}"})
                continue
            try:
                if method in CALIBRATED:
                    calibration = overhead_calibration = calibrate(runner, method, max(steps, 8), folder)
                else:   # a router is learned for one step count
                    calibration = random_router(runner, steps, folder)
                    overhead_calibration = random_router(runner, overhead_steps, folder)
            except Exception as err:   # noqa: BLE001 - the row says why
                rows.append({"method": method, "status": f"calibration failed: {type(err).__name__}: {err}"})
                continue
        cached = spec(method, KNOBS[method], calibration)
        never = spec(method, NEVER_SKIP[method], overhead_calibration)
        why = refusal(model, method, cached)
        if why is not None:
            rows.append({"method": method, "status": f"does not install: {why}"})
            continue
        plan[method] = len(configs)
        configs += [Config(cached, steps, True), Config(never, overhead_steps, count_never_skip)]
    log(f"  {len(configs)} configurations, {len(plan)} methods: {', '.join(plan)}")
    walls, macs = timed_rounds(runner, configs, repeats)
    if isinstance(macs[0], Exception):
        raise macs[0]
    base_wall, base_macs = statistics.median(walls[0]), macs[0]
    over_wall = statistics.median(walls[base_overhead])
    noise = (max(walls[0]) - min(walls[0])) / base_wall if len(walls[0]) > 1 else None
    for method, i in plan.items():
        failed = next((m for m in macs[i:i + 2] if isinstance(m, Exception)), None)
        if failed is not None:
            rows.append({"method": method, "status": f"failed: {type(failed).__name__}: {failed}"})
            continue
        wall, never_wall = statistics.median(walls[i]), statistics.median(walls[i + 1])
        speedup, bound = base_wall / wall, base_macs / macs[i]
        rows.append({
            "method": method, "status": "ok", "spec": spec(method, KNOBS[method], None),
            "never_skip_spec": spec(method, NEVER_SKIP[method], None),
            "random_router": method == RANDOM_ROUTER, "calibrated_here": method in CALIBRATED,
            "wall_s": round(wall, 4), "wall_s_runs": [round(w, 4) for w in walls[i]],
            "speedup": round(speedup, 3), "macs": macs[i], "bound": round(bound, 3),
            "efficiency": round(speedup / bound, 3),
            "never_skip_wall_s": round(never_wall, 4), "never_skip_wall_s_runs": [round(w, 4) for w in walls[i + 1]],
            "never_skip_macs": macs[i + 1],
            "overhead_ms_per_step": round((never_wall - over_wall) / overhead_steps * 1e3, 2),
            "overhead_pct": round((never_wall - over_wall) / over_wall * 100, 2),
        })
    order = {name: k for k, name in enumerate(cache.METHODS)}
    rows.sort(key=lambda r: order[r["method"]])
    return {"baseline": {"wall_s": round(base_wall, 4), "wall_s_runs": [round(w, 4) for w in walls[0]],
                         "macs": base_macs, "step_ms": round(base_wall / steps * 1e3, 2),
                         "noise": None if noise is None else round(noise, 4),
                         "overhead_steps": overhead_steps, "overhead_wall_s": round(over_wall, 4),
                         "overhead_wall_s_runs": [round(w, 4) for w in walls[base_overhead]]},
            "methods": rows}


# ---- CFG parallel on 2 ranks ------------------------------------------------------------------------
def cfg_rank_main(args) -> int:
    import torch.distributed as dist

    from sdinfer.parallel import apply, launch

    info = launch.init_process_group("gloo", timeout_s=1800)   # rank 1 waits out rank 0's single-process runs
    rows = []
    for name in guided_only(args.cfg_model):
        shape = SHAPES[name]
        torch.set_num_threads(1)
        runner = Runner(shape, args.scale)
        single: dict[int, list[float]] = {1: [], 2: []}
        reference = None
        for threads in (1, 2):     # rank 0 alone, rank 1 waiting at the barrier after each generation
            for k in range(1 + args.repeats):   # k = 0: a 2-step warm-up
                if info.rank == 0:
                    torch.set_num_threads(threads)
                    start = time.perf_counter()
                    out = runner.generate(args.steps if k else 2)
                    if k:
                        single[threads].append(time.perf_counter() - start)
                        reference = out
                dist.barrier()
        torch.set_num_threads(1)
        handle = apply(runner.model, "cfg")
        times = []
        try:
            for k in range(1 + args.repeats):   # k = 0: a 2-step warm-up
                dist.barrier()
                start = time.perf_counter()
                out = runner.generate(args.steps if k else 2)
                if k:
                    times.append(time.perf_counter() - start)
            sent = sum(handle.comm.bytes_sent.values())
        finally:
            handle.remove()
        if info.rank == 0:
            two, one2, one1 = (statistics.median(x) for x in (times, single[2], single[1]))
            rows.append({"model": name, "title": model_title(shape, args.scale),
                         "ranks_s": round(two, 4), "ranks_s_runs": [round(t, 4) for t in times],
                         "one_process_2_threads_s": round(one2, 4), "one_process_1_thread_s": round(one1, 4),
                         "speedup_vs_2_threads": round(one2 / two, 3), "speedup_vs_1_thread": round(one1 / two, 3),
                         "bytes_per_step": int(sent / (2 + args.repeats * args.steps)),
                         "max_abs_diff": float((out - reference).abs().max()),
                         "rank0_peak_rss_mb": round(peak_rss_mb(), 0)})
            print(f"cfg parallel {name}: {rows[-1]}", flush=True)
        del runner
    if info.rank == 0:
        Path(args.cfg_out).write_text(json.dumps(rows))
    return 0


def guided_only(names: list[str]) -> list[str]:
    return [name for name in names if SHAPES[name].guidance != 1.0]


def run_cfg_parallel(args, argv: list[str]) -> list[dict]:
    from sdinfer.parallel import launch

    skipped = [{"model": name, "status": f"not run: {SHAPES[name].title} is run with guidance off (FLUX.1-dev is "
                "guidance-distilled: one branch per call), so there are no guidance halves to split"}
               for name in args.cfg_model if name not in guided_only(args.cfg_model)]
    if not guided_only(args.cfg_model):
        return skipped
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cfg.json"
        codes = launch.launch_local([sys.executable, str(Path(__file__).resolve()), *argv, "--cfg-rank",
                                     "--cfg-out", str(out)], 2)
        if launch.exit_code(codes) != 0:
            return [{"model": m, "status": f"the ranks failed (exit codes {codes})"}
                    for m in guided_only(args.cfg_model)] + skipped
        return [{"status": "ok", **row} for row in json.loads(out.read_text())] + skipped


# ---- report ---------------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def markdown(report: dict) -> str:
    """The two tables as BENCHMARKS.md shows them (``bench/report.py``'s renderers)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        import report as tables
    finally:
        sys.path.pop(0)
    meta = report["meta"]
    text = (f"Random weights (speed only), float32, {meta['steps']} DDIM steps, one prompt, median of "
            f"{meta['repeats']} timed runs, {meta['threads']} threads, {meta['date']}.\n\n"
            + tables.real_shapes_table(report) + "\n")
    if report["cfg_parallel"]:
        text += "\n" + tables.real_shapes_cfg_table(report) + "\n"
    return text


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(SHAPES), action="append", default=None, help="default: all four")
    p.add_argument("--method", action="append", default=None, help="cache methods (default: every registered one)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default 8; --quick: 2)")
    p.add_argument("--overhead-steps", type=int, default=2,
                   help="steps of the hook-overhead runs (never-skip knob against no hooks; default 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per configuration (default 2; --quick: 1)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the cache runs (default 2)")
    p.add_argument("--quick", action="store_true", help="tiny widths, 2 steps, 1 repeat: checks the script runs")
    p.add_argument("--scale", choices=SCALES, default=None,
                   help="fast (default): the published widths at about half depth; full: SD 1.5, SDXL and "
                        "PixArt-Sigma whole, FLUX 2 + 4 blocks; quick: tiny widths (--quick)")
    p.add_argument("--cfg-model", choices=sorted(SHAPES), action="append", default=None,
                   help=f"the models of the CFG parallel runs (default: {', '.join(CFG_MODELS)})")
    p.add_argument("--no-cfg-parallel", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "real-shapes"), help="writes OUT.json and OUT.md")
    p.add_argument("--cfg-rank", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cfg-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from sdinfer import cache
    from sdinfer.errors import UserError

    if args.quick and args.scale not in (None, "quick"):
        raise UserError(f"--quick is --scale quick; drop one of --quick and --scale {args.scale}")
    args.scale = "quick" if args.quick else args.scale or "fast"
    args.quick = args.scale == "quick"
    args.steps = args.steps or (2 if args.quick else 8)
    if args.steps < 2 or args.overhead_steps < 2:
        raise UserError(f"--steps and --overhead-steps must be >= 2, got {args.steps} and {args.overhead_steps}")
    args.repeats = args.repeats or (1 if args.quick else 2)
    args.cfg_model = args.cfg_model or list(CFG_MODELS)
    unknown = sorted(set(args.method or []) - set(cache.METHODS))
    if unknown:
        raise UserError(f"unknown cache method(s) {', '.join(unknown)}; known: {', '.join(cache.METHODS)}")
    if args.cfg_rank:
        from sdinfer.parallel import launch

        return launch.run_rank(lambda: cfg_rank_main(args))
    from sdinfer.cli import _quiet_libraries

    _quiet_libraries()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    methods = args.method or list(cache.METHODS)
    models = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.model or list(SHAPES):
            shape = SHAPES[name]
            runner = Runner(shape, args.scale)
            title = model_title(shape, args.scale)
            print(f"{title}: {runner.params / 1e6:.1f} M parameters, built in {runner.build_s:.1f} s", flush=True)
            folder = Path(tmp) / name
            folder.mkdir()
            t0 = time.perf_counter()
            result = measure_model(runner, methods, args.steps, args.overhead_steps, args.repeats, folder,
                                   count_never_skip=args.quick)
            models.append({"model": name, "title": title, "class": shape.cls, "params": runner.params,
                           "config": {k: v for k, v in runner.model.config.items() if not k.startswith("_")},
                           "latent": runner.latent, "text_tokens": runner.cond.states.shape[1],
                           "batch": 2 if runner.guided else 1, "guidance": shape.guidance,
                           "build_s": round(runner.build_s, 1), "seconds": round(time.perf_counter() - t0, 1),
                           **result})
            print(f"  done in {models[-1]['seconds']:.0f} s: uncached {result['baseline']['wall_s']:.2f} s, "
                  f"peak RSS {peak_rss_mb():.0f} MB", flush=True)
            del runner
    cfg_rows = []
    if not args.no_cfg_parallel:
        forwarded = [a for a in argv if a not in ("--no-cfg-parallel",)]
        cfg_rows = run_cfg_parallel(args, forwarded)
    report = {"meta": {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
                       "cpus": os.cpu_count(), "torch": torch.__version__, "diffusers": _version("diffusers"),
                       "steps": args.steps, "overhead_steps": args.overhead_steps, "repeats": args.repeats, "threads": args.threads, "quick": args.quick,
                       "scale": args.scale, "dtype": "float32", "weights": "random (seeded)",
                       "knobs": KNOBS, "never_skip": NEVER_SKIP, "seconds": round(time.perf_counter() - started, 1),
                       "peak_rss_mb": round(peak_rss_mb(), 0),
                       "command": "python bench/real_shapes.py " + " ".join(argv)},
              "models": models, "cfg_parallel": cfg_rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"{report['meta']['seconds']:.0f} s in all, peak RSS of this process {report['meta']['peak_rss_mb']:.0f} MB")
    return 0


def _version(package: str) -> str:
    from importlib import metadata

    return metadata.version(package)


if __name__ == "__main__":
    sys.exit(main())
