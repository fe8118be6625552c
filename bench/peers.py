"""Peers side by side with sdinfer's caches on the two default models.

    python bench/peers.py                                  # the full run (bench/peers.sh)
    python bench/peers.py --model dit --limit 4 --steps 10 # a smoke run

Each row pair is one line of ``pairs()``: a peer package's own cache configured on the
default model, and sdinfer's counterpart spec (``sdinfer.accelerate(pipe, SPEC)``).  Both
rows run in the same denoising loop, on the same held-out prompts and noise seeds, DDIM,
cfg 4, measured by sdinfer's bench machinery (``sdinfer.eval.bench.measure`` / ``record``):
wall-time median, speed-ups (wall and MACs) against the uncached run of that loop in this
process, PSNR / SSIM against its images, prompt adherence.  A peer that cannot run on the
model is a row saying why (its own error); a pair whose sdinfer method is not registered
(or refuses the model) keeps the peer row and says so in ours.

The loops:
- UNet: diffusers' ``StableDiffusionPipeline`` assembled around the default UNet and its
  text encoder, sdinfer's DDIM as its scheduler (``SdinferScheduler``, the grid of sdinfer's
  own loop), no VAE (pixel space: ``output_type="latent"``), the UNet's two coordinate
  channels added by a forward pre-hook.  Its uncached images equal sdinfer's own loop's
  (checked on the first prompts: ``meta.sdinfer_loop_psnr``).  DeepCache's helper
  and T-GATE's loader need such a pipeline object (the helper reads ``pipe.unet`` and
  ``pipe.scheduler.timesteps``; T-GATE brings its own copy of the pipeline's loop).  Ours
  runs in the same pipeline through ``sdinfer.accelerate(sd_pipe, spec)``.
- DiT: sdinfer's own loop.  diffusers' hooks read the cache context a diffusers pipeline
  sets around each denoiser call: a forward pre-hook sets it from sdinfer's step context
  (and resets the hooks' state at the first step of a generation, as a pipeline does after
  each call).  cache-dit goes on the transformer through a ``BlockAdapter`` (its registered
  SD3 adapter's pattern) and its context is refreshed at each generation's first step.
After all rows the loop runs uncached again (``meta.uncached_again_psnr``): no peer left
anything behind.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import datetime
import functools
import io
import json
import os
import platform
import warnings
import weakref
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

import sdinfer
from sdinfer.cli import _quiet_libraries
from sdinfer.context import current_step
from sdinfer.errors import UserError
from sdinfer.eval import bench
from sdinfer.eval.metrics import PSNR_CAP_DB, psnr
from sdinfer.eval.prompts import QUICK, load_prompts
from sdinfer.models.calling import coordinate_channels
from sdinfer.pipeline import Pipeline

os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")  # before cache-dit is imported: it logs every hook

PEERS = {"DeepCache": "0.1.1", "tgate": "1.0.0", "cache-dit": "1.5.3", "para-attn": "0.3.38"}
INSTALL = "pip install --no-deps " + " ".join(f"{name}=={version}" for name, version in PEERS.items())
CALIBRATION_PROMPT = QUICK[0]   # MagCache calibrates on one sample; never a held-out prompt
RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Settings:
    steps: int
    cfg: float
    seed: int


# ---- loops ----------------------------------------------------------------------------
class SDLoop:
    """diffusers' StableDiffusionPipeline around a default UNet, called the way ``bench.measure``
    calls sdinfer's Pipeline."""

    def __init__(self, pipe: Pipeline):
        from diffusers import StableDiffusionPipeline
        from sdinfer.samplers.diffusers_scheduler import SdinferScheduler

        m = pipe.model
        self.pipe = pipe
        with warnings.catch_warnings():   # diffusers' advice on steps_offset, for its own DDIM grid
            warnings.simplefilter("ignore")
            scheduler = SdinferScheduler.from_config(m.scheduler_config, sampler="ddim",
                                                     timestep_spacing=m.schedule.default_spacing)
            self.sd = StableDiffusionPipeline(vae=None, text_encoder=m.text_encoder, tokenizer=m.tokenizer,
                                              unet=m.denoiser, scheduler=scheduler, safety_checker=None,
                                              feature_extractor=None, requires_safety_checker=False)
        self.sd.set_progress_bar_config(disable=True)
        self.generate = self.sd.__call__   # T-GATE swaps in its own loop
        self.unet_calls = 0
        self._hooks = [m.denoiser.register_forward_pre_hook(_add_coordinate_channels, with_kwargs=True),
                       m.denoiser.register_forward_hook(self._count)]

    @property
    def target(self):
        return self.sd

    def _count(self, *_):
        self.unet_calls += 1

    def __call__(self, prompts, steps, sampler, guidance_scale, seeds, size=None):
        if sampler != "ddim":
            raise UserError(f"the diffusers loop here runs ddim only, not {sampler}")
        size = self.pipe.check_size(size)
        cond, uncond = self.pipe.encode(prompts), self.pipe.encode([""] * len(prompts))
        before = self.unet_calls
        side = size * self.sd.vae_scale_factor   # no VAE: the pipeline only checks this size
        latents = self.generate(prompt_embeds=cond.states, negative_prompt_embeds=uncond.states,
                                latents=self.pipe.noise(seeds, size), num_inference_steps=steps,
                                guidance_scale=guidance_scale, output_type="latent",
                                height=side, width=side).images
        return SimpleNamespace(pixels=self.pipe.decode(latents), nfe=steps,
                               model_calls=self.unet_calls - before)

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


def _add_coordinate_channels(unet, args, kwargs):
    x = args[0]
    if x.shape[1] + 2 == unet.config.in_channels:
        return (torch.cat([x, coordinate_channels(x)], dim=1), *args[1:]), kwargs
    return None


class NativeLoop:
    """sdinfer's own loop (the Pipeline itself)."""

    def __init__(self, pipe: Pipeline):
        self.pipe = pipe

    @property
    def target(self):
        return self.pipe

    @property
    def model(self) -> torch.nn.Module:
        return self.pipe.model.denoiser

    def __call__(self, prompts, steps, sampler, guidance_scale, seeds, size=None):
        return self.pipe(prompts, steps=steps, sampler=sampler, guidance_scale=guidance_scale,
                         seeds=seeds, size=size)

    def close(self) -> None:
        pass


LOOPS = {"unet": SDLoop, "dit": NativeLoop}


def with_step(fn: Callable[[torch.nn.Module, object], None]):
    """A forward pre-hook running ``fn(model, step)`` at every call; ``step`` is sdinfer's step context."""
    def pre_hook(model, args, kwargs):
        step = current_step()
        if step is None:
            raise RuntimeError("the peer's shim needs sdinfer's step context: call the model from "
                               "sdinfer's loop")
        fn(model, step)
    return pre_hook


# ---- peers ----------------------------------------------------------------------------
@dataclass
class Peer:
    label: str
    package: str
    install: Callable[[object, Settings], Callable[[], None]]   # (loop, settings) -> remove
    known_issue: str = ""   # why it fails on these models, as traced; added to its error


def deepcache(interval: int, branch: int = 0) -> Peer:
    def install(loop: SDLoop, _settings):
        from DeepCache import DeepCacheSDHelper

        helper = DeepCacheSDHelper(pipe=loop.sd)
        helper.set_params(cache_interval=interval, cache_branch_id=branch)
        helper.enable()
        return helper.disable

    return Peer(f"DeepCacheSDHelper cache_interval={interval} cache_branch_id={branch}", "DeepCache",
                install)


def tgate(gate_step: int, sp_interval: int, fi_interval: int = 1, warm_up: int = 0) -> Peer:
    """T-GATE's SD loader; it has no way off, so removal drops what it set on the pipeline and
    on every Attention module (a patched ``forward`` and the ``cache`` tensor)."""
    def install(loop: SDLoop, _settings):
        from tgate import TgateSDLoader

        TgateSDLoader(loop.sd)
        loop.generate = functools.partial(loop.sd.tgate, gate_step=gate_step, sp_interval=sp_interval,
                                          fi_interval=fi_interval, warm_up=warm_up)

        def remove():
            loop.generate = loop.sd.__call__
            for module in loop.sd.unet.modules():
                if type(module).__name__ == "Attention":
                    vars(module).pop("forward", None)
                    vars(module).pop("cache", None)
        return remove

    return Peer(f"TgateSDLoader gate_step={gate_step} sp_interval={sp_interval} "
                f"fi_interval={fi_interval} warm_up={warm_up}", "tgate", install)


def diffusers_cache(label: str, make_config: Callable[[NativeLoop, Settings], object]) -> Peer:
    def install(loop: NativeLoop, settings: Settings):
        return install_diffusers_cache(loop.model, make_config(loop, settings))

    return Peer(f"diffusers {label}", "diffusers", install)


def install_diffusers_cache(model: torch.nn.Module, config) -> Callable[[], None]:
    """``model.enable_cache(config)`` for a model without diffusers' CacheMixin (SD3's transformer
    has none in diffusers 0.42), with the cache context a diffusers pipeline would set."""
    from diffusers import hooks
    from diffusers.models.cache_utils import CacheMixin

    apply_fn, names = diffusers_cache_hooks()[type(config)]
    contexts = []

    def enter(model, step):
        if step.step_index == 0:   # a pipeline resets the stateful hooks after each generation
            hooks.HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=True)
        ctx = CacheMixin.cache_context(model, "cond_uncond", step_index=step.step_index,
                                       num_inference_steps=step.num_steps, timestep=step.model_t)
        ctx.__enter__()
        contexts.append(ctx)

    def leave(*_):
        contexts.pop().__exit__(None, None, None)

    apply_fn(model, config)
    hooks.HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
    handles = [model.register_forward_pre_hook(with_step(enter), with_kwargs=True),
               model.register_forward_hook(leave)]

    def remove():
        for h in handles:
            h.remove()
        registry = hooks.HookRegistry.check_if_exists_or_initialize(model)
        for name in names:
            registry.remove_hook(name, recurse=True)
        registry.invalidate_child_registries_cache()
    return remove


def diffusers_cache_hooks() -> dict:
    """Each diffusers cache config: its apply function and the names of the hooks it registers."""
    from diffusers import hooks
    from diffusers.hooks import first_block_cache, mag_cache, pyramid_attention_broadcast, taylorseer_cache

    return {
        hooks.FirstBlockCacheConfig: (hooks.apply_first_block_cache, [first_block_cache._FBC_LEADER_BLOCK_HOOK,
                                                                      first_block_cache._FBC_BLOCK_HOOK]),
        hooks.MagCacheConfig: (hooks.apply_mag_cache, [mag_cache._MAG_CACHE_LEADER_BLOCK_HOOK,
                                                       mag_cache._MAG_CACHE_BLOCK_HOOK]),
        hooks.TaylorSeerCacheConfig: (hooks.apply_taylorseer_cache, [taylorseer_cache._TAYLORSEER_CACHE_HOOK]),
        hooks.PyramidAttentionBroadcastConfig: (
            hooks.apply_pyramid_attention_broadcast,
            [pyramid_attention_broadcast._PYRAMID_ATTENTION_BROADCAST_HOOK]),
    }


def diffusers_fbcache(threshold: float) -> Peer:
    def make(_loop, _settings):
        from diffusers.hooks import FirstBlockCacheConfig
        return FirstBlockCacheConfig(threshold=threshold)
    peer = diffusers_cache(f"FirstBlockCacheConfig(threshold={threshold:g})", make)
    peer.known_issue = ("SD3's last block, context_pre_only, returns no text stream and the tail "
                        "hook subtracts from it; SD3Transformer2DModel has no enable_cache in diffusers")
    return peer


SD3_SUBLAYERS = [r"transformer_blocks\.\d+\.(attn|ff|ff_context)"]   # the sub-layers ours forecasts


def diffusers_taylorseer(interval: int, warmup: int, sublayers: bool) -> Peer:
    """Factors kept in float32 (its default bfloat16 would cost accuracy ours does not pay).
    ``sublayers``: forecast each block's attention and MLPs, as ours does; otherwise its default
    identifiers, which hook the attention modules only."""
    def make(_loop, _settings):
        from diffusers.hooks import TaylorSeerCacheConfig
        return TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=warmup, max_order=1,
                                     taylor_factors_dtype=torch.float32,
                                     cache_identifiers=SD3_SUBLAYERS if sublayers else None)
    which = "cache_identifiers=blocks' attn/ff/ff_context" if sublayers else "default identifiers"
    return diffusers_cache(f"TaylorSeerCacheConfig(cache_interval={interval}, disable_cache_before_step="
                           f"{warmup}, {which})", make)


def diffusers_pab(skip_range: int, timestep_range: tuple[int, int]) -> Peer:
    def make(_loop, _settings):
        from diffusers.hooks import PyramidAttentionBroadcastConfig
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=skip_range,
            spatial_attention_timestep_skip_range=timestep_range,
            current_timestep_callback=lambda: current_step().model_t)
    return diffusers_cache(f"PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range={skip_range}, "
                           f"spatial_attention_timestep_skip_range={timestep_range})", make)


def diffusers_magcache(threshold: float) -> Peer:
    """Its magnitude ratios from its own calibrate mode, on one sample at the run's step count."""
    def make(loop: NativeLoop, settings: Settings):
        from diffusers.hooks import MagCacheConfig
        return MagCacheConfig(threshold=threshold, num_inference_steps=settings.steps,
                              mag_ratios=magcache_ratios(loop, settings))
    return diffusers_cache(f"MagCacheConfig(threshold={threshold:g}, calibrated ratios)", make)


_MAGCACHE_RATIOS: "weakref.WeakKeyDictionary[NativeLoop, dict[Settings, list[float]]]" = weakref.WeakKeyDictionary()


def magcache_ratios(loop: NativeLoop, settings: Settings) -> list[float]:
    """diffusers' MagCache calibration run: its magnitude ratios for this model and step count
    (once per loop and settings: bench/fronts.py installs a configuration around each of its runs)."""
    known = _MAGCACHE_RATIOS.setdefault(loop, {})
    if settings not in known:
        known[settings] = _calibrate_magcache(loop, settings)
    return list(known[settings])


def _calibrate_magcache(loop: NativeLoop, settings: Settings) -> list[float]:
    from diffusers.hooks import MagCacheConfig

    remove = install_diffusers_cache(loop.model, MagCacheConfig(calibrate=True,
                                                                num_inference_steps=settings.steps))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):   # calibrate mode prints the ratios
            loop([CALIBRATION_PROMPT], steps=settings.steps, sampler="ddim",
                 guidance_scale=settings.cfg, seeds=[settings.seed])
    finally:
        remove()
    lists = [line for line in printed.getvalue().splitlines() if line.startswith("[")]
    if not lists:
        raise RuntimeError("diffusers' MagCache calibration printed no ratios")
    return list(ast.literal_eval(lists[-1]))


def cache_dit(fn: int, bn: int, threshold: float, warmup: int, taylorseer: bool = False) -> Peer:
    def install(loop: NativeLoop, settings: Settings):
        import cache_dit as cd

        model = loop.model
        config = cd.DBCacheConfig(Fn_compute_blocks=fn, Bn_compute_blocks=bn,
                                  residual_diff_threshold=threshold, max_warmup_steps=warmup,
                                  num_inference_steps=settings.steps)
        calibrator = cd.TaylorSeerCalibratorConfig(taylorseer_order=1) if taylorseer else None
        cd.enable_cache(cd.BlockAdapter(pipe=None, transformer=model, blocks=model.transformer_blocks,
                                        forward_pattern=cd.ForwardPattern.Pattern_1,
                                        check_forward_pattern=True),
                        cache_config=config, calibrator_config=calibrator)

        def refresh(model, step):   # without a pipeline, cache-dit's context outlives a generation
            if step.step_index == 0:
                extra = {"calibrator_config": copy.deepcopy(calibrator)} if calibrator else {}
                cd.refresh_context(model, cache_config=copy.deepcopy(config), **extra)

        handle = model.register_forward_pre_hook(with_step(refresh), with_kwargs=True)

        def remove():
            handle.remove()
            cd.disable_cache(model)
        return remove

    extra = " + TaylorSeerCalibrator(order=1)" if taylorseer else ""
    issue = ("with Bn=0 SD3's last block, context_pre_only, returns no text stream and the text "
             "stream's calibrator never gets a state; with Bn=1 it runs") if taylorseer and bn == 0 else ""
    return Peer(f"cache-dit DBCache F{fn}B{bn} threshold={threshold:g} warmup={warmup}{extra}",
                "cache-dit", install, issue)


def para_attn_fbcache(threshold: float) -> Peer:
    """para-attn picks its adapter by the transformer's class name (Flux, Mochi, CogVideoX,
    HunyuanVideo, Wan); the threshold goes to the cache context its pipeline adapter opens
    around each generation."""
    def install(loop: NativeLoop, _settings):
        from para_attn.first_block_cache.diffusers_adapters import apply_cache_on_transformer

        apply_cache_on_transformer(loop.model)
        vars(loop.model).pop("forward", None)   # a later para-attn that takes SD3: undo, and say so
        raise RuntimeError("para-attn accepted this transformer: open its cache context "
                           f"(residual_diff_threshold={threshold:g}) around each generation here")

    return Peer(f"para-attn first-block cache residual_diff_threshold={threshold:g}", "para-attn",
                install, "its adapters cover the Flux, Mochi, CogVideoX, HunyuanVideo and Wan "
                         "transformers only, and no UNet")


# ---- the row pairs --------------------------------------------------------------------
@dataclass
class Pair:
    model: str
    peer: Peer
    ours: str


def pairs(steps: int) -> list[Pair]:
    """Each peer configuration and sdinfer's counterpart.  DeepCache's helper at branch 0 is block 0,
    layer 0, ours ``layer=0``.  Knobs: where both sides have the same
    knob, the same value, chosen on the default models at 50 steps to land between 30 and 45 dB;
    T-GATE's gate at 40% of the run (10 of 25 steps in its paper).  cache-dit's DBCache without
    its TaylorSeer calibrator is ours with ``taylorseer=false`` (on by default in ours)."""
    gate = max(1, round(0.4 * steps))
    return [
        Pair("unet", deepcache(interval=2), "deepcache:interval=2,layer=0"),
        Pair("unet", deepcache(interval=3), "deepcache:interval=3,layer=0"),
        Pair("unet", deepcache(interval=5), "deepcache:interval=5,layer=0"),
        Pair("unet", tgate(gate_step=gate, sp_interval=1), f"tgate:gate_step={gate},sp_interval=1"),
        Pair("unet", tgate(gate_step=gate, sp_interval=5, warm_up=2),
             f"tgate:gate_step={gate},sp_interval=5,warm_up=2"),
        Pair("dit", para_attn_fbcache(0.15), "fbcache:threshold=0.15"),
        Pair("dit", diffusers_fbcache(0.15), "fbcache:threshold=0.15"),
        Pair("dit", cache_dit(fn=1, bn=0, threshold=0.15, warmup=0), "fbcache:threshold=0.15"),
        Pair("dit", cache_dit(fn=1, bn=1, threshold=0.2, warmup=2),
             "dbcache:fn=1,bn=1,threshold=0.2,warmup=2,taylorseer=false"),
        Pair("dit", cache_dit(fn=1, bn=0, threshold=0.2, warmup=2, taylorseer=True),
             "dbcache:fn=1,bn=0,threshold=0.2,warmup=2,taylorseer=true"),
        Pair("dit", cache_dit(fn=1, bn=1, threshold=0.2, warmup=2, taylorseer=True),
             "dbcache:fn=1,bn=1,threshold=0.2,warmup=2,taylorseer=true"),
        Pair("dit", diffusers_taylorseer(3, 2, sublayers=False), "taylorseer:interval=3,warmup=2"),
        Pair("dit", diffusers_taylorseer(3, 2, sublayers=True), "taylorseer:interval=3,warmup=2"),
        Pair("dit", diffusers_taylorseer(5, 2, sublayers=True), "taylorseer:interval=5,warmup=2"),
        Pair("dit", diffusers_magcache(0.06), "magcache:threshold=0.06"),
        # the same peer against our setting at its PSNR (the magnitude ratios differ: ours are the
        # whole residual's, diffusers' the mean over tokens)
        Pair("dit", diffusers_magcache(0.06), "magcache:threshold=0.24,max_skip_steps=2,retention=0.1"),
        Pair("dit", diffusers_magcache(0.2), "magcache:threshold=0.2"),
        # PAB (attention outputs broadcast over a timestep range) has no sdinfer twin: ours is
        # the feature forecast at the interval that matches its PSNR
        Pair("dit", diffusers_pab(2, (100, 800)), "taylorseer:interval=2,warmup=2"),
    ]


# ---- measuring ------------------------------------------------------------------------
@dataclass
class Session:
    """One model's runs: its loop, prompts and settings, and its uncached measurement."""

    loop: SDLoop | NativeLoop
    prompts: list[str]
    settings: Settings
    batch: int
    repeats: int
    base: bench.Measurement | None = None

    def measure(self) -> bench.Measurement:
        spec = bench.RunSpec(sampler="ddim", steps=self.settings.steps, cfg=self.settings.cfg)
        return bench.measure(self.loop, spec, self.prompts, self.batch, self.settings.seed, self.repeats)

    def row(self, install: Callable[[], Callable[[], None]]) -> dict:
        remove = install()
        try:
            m = self.measure()
        finally:
            remove()
        return bench.record(m, self.base, self.prompts, is_baseline=False)


def run_pair(pair: Pair, session: Session, log) -> list[dict]:
    peer, loop = pair.peer, session.loop
    version = metadata.version(peer.package)
    log(f"peer  {peer.label} ({peer.package} {version}) ...")
    try:
        peer_rec = session.row(lambda: peer.install(loop, session.settings))
        peer_rec.update(config=peer.label, side="peer", status="ok")
    except Exception as err:  # noqa: BLE001 - a peer that cannot run is a row saying why
        peer_rec = failed(peer.label, "peer", "does not run", err)
        peer_rec["status"] += f" ({peer.known_issue})" if peer.known_issue else ""
    peer_rec.update(package=peer.package, version=version)
    if peer_rec["status"] != "ok":
        return [peer_rec]
    log(f"ours  {pair.ours} ...")
    try:
        sdinfer.accelerate(loop.target, pair.ours).remove()   # unknown or refused: say so, untimed
    except UserError as err:
        return [peer_rec, failed(pair.ours, "ours", "skipped", err)]
    try:
        ours_rec = session.row(lambda: sdinfer.accelerate(loop.target, pair.ours).remove)
    except Exception as err:  # noqa: BLE001 - keep the other rows of a long run
        return [peer_rec, failed(pair.ours, "ours", "failed", err)]
    ours_rec.update(config=pair.ours, side="ours", status="ok", accelerate=pair.ours,
                    verdict=verdict(peer_rec, ours_rec))
    return [peer_rec, ours_rec]


def failed(config: str, side: str, what: str, err: Exception) -> dict:
    text = str(err).strip()
    first = text.splitlines()[0] if text else ""
    reason = first if isinstance(err, UserError) else f"{type(err).__name__}: {first}"
    return {"config": config, "side": side, "status": f"{what}: {reason}"}


WALL_TOLERANCE = 0.02   # speed-ups this close count as equal: one timed run's noise here


def verdict(peer: dict, ours: dict) -> str:
    """Ours against the peer: wall speed-up ratio and PSNR difference, and whether ours is at
    least as fast (within WALL_TOLERANCE) at equal or better PSNR (at the table's 0.01 dB)."""
    ratio = ours["speedup_wall"] / peer["speedup_wall"]
    gain = round(ours["psnr"] - peer["psnr"], 2)
    faster = ratio >= 1 - WALL_TOLERANCE
    sharper = gain >= 0
    outcome = ("ours >= peer" if faster and sharper else "peer faster" if sharper
               else "peer higher PSNR" if faster else "peer better on both")
    return f"{outcome} (wall x{ratio:.2f}, PSNR {gain:+.2f} dB)"


def run_model(model: str, prompts: list[str], settings: Settings, args, log) -> dict:
    pipe = Pipeline.from_pretrained(model)
    session = Session(LOOPS[model](pipe), prompts, settings, args.batch, args.repeats)
    try:
        log(f"{model}: uncached baseline on {len(prompts)} prompts ...")
        session.base = session.measure()
        base_rec = bench.record(session.base, session.base, prompts, is_baseline=True)
        base_rec.update(config=f"uncached ({type(session.loop).__name__})", side="baseline", status="ok")
        records = [base_rec]
        for index, pair in enumerate(p for p in pairs(settings.steps) if p.model == model):
            if args.only and not any(part in pair.peer.label or part in pair.ours for part in args.only):
                continue
            records += [{"pair": index, **rec} for rec in run_pair(pair, session, log)]
        meta = run_meta(model, pipe, session, args)
    finally:
        session.loop.close()
    return {"meta": meta, "records": records}


def run_meta(model: str, pipe: Pipeline, session: Session, args) -> dict:
    settings = session.settings
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
        "psnr_cap_db": PSNR_CAP_DB,
        "versions": {p: _version(p) for p in [*PEERS, "diffusers"]},
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
        "date": datetime.date.today().isoformat(),
    }
    meta.update(checks(pipe, session))
    return meta


def checks(pipe: Pipeline, session: Session) -> dict:
    """PSNR on the first prompts of the loop's uncached images after all rows against its first
    uncached run (no peer left anything behind) and, for the diffusers loop, of sdinfer's own
    loop against it (the two loops compute the same images)."""
    settings, prompts = session.settings, session.prompts[:2]
    seeds = [settings.seed + i for i in range(len(prompts))]
    reference = session.base.pixels[: len(prompts)]
    again = session.loop(prompts, settings.steps, "ddim", settings.cfg, seeds).pixels
    out = {"uncached_again_psnr": round(psnr(again, reference), 3)}
    if isinstance(session.loop, SDLoop):
        own = pipe(prompts, steps=settings.steps, sampler="ddim", guidance_scale=settings.cfg,
                   seeds=seeds).pixels
        out["sdinfer_loop_psnr"] = round(psnr(own, reference), 3)
    return out


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


# ---- output ---------------------------------------------------------------------------
COLUMNS = [("pair", "{}"), ("side", "{}"), ("config", "{}"), ("wall_s", "{:.2f}"),
           ("speedup_wall", "{:.2f}x"), ("speedup_macs", "{:.2f}x"), ("psnr", "{:.2f}"),
           ("ssim", "{:.4f}"), ("adherence", "{:.1%}")]


def markdown(report: dict) -> str:
    meta = report["meta"]
    head = [c for c, _ in COLUMNS] + ["note"]
    lines = [f"# Peers on the default {meta['model']} ({meta['model_class']})", "",
             f"{meta['prompts']} {meta['prompt_set']} prompts, DDIM {meta['steps']} steps, cfg "
             f"{meta['cfg']:g}, batch {meta['batch']}, {meta['repeats']} timed run(s); loop "
             f"{meta['loop']}; {meta['machine']}, torch {meta['torch']}, {meta['date']}.",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
             f"Speed-ups and PSNR (capped at {meta['psnr_cap_db']:g} dB) against the uncached run "
             "of the same loop in the same process.  Note on our rows: ours / peer wall speed-up and "
             f"our PSNR minus the peer's; wall speed-ups within {WALL_TOLERANCE:.0%} count as equal.",
             ""]
    lines += [f"Checks on the first prompts, against the uncached run: the loop uncached again after "
              f"all rows {meta['uncached_again_psnr']:g} dB"
              + (f"; sdinfer's own loop {meta['sdinfer_loop_psnr']:g} dB" if "sdinfer_loop_psnr" in meta
                 else "") + ".", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rec in report["records"]:
        cells = ["-" if rec.get(c) is None else f.format(rec[c]) for c, f in COLUMNS]
        note = rec.get("verdict") or ("" if rec["status"] == "ok" else rec["status"])
        lines.append("| " + " | ".join(cells + [note.replace("|", "/")]) + " |")
    return "\n".join(lines) + "\n"


def write(report: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["unet", "dit", "both"], default="both")
    p.add_argument("--prompts", default="heldout", help="quick | heldout | FILE (default: heldout)")
    p.add_argument("--limit", type=int, default=48, help="first N prompts (default: 48; 0: all)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per row (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", action="append", default=None,
                   help="only the pairs whose peer label or spec contains this (repeatable: any of them)")
    p.add_argument("--out", default=str(RESULTS), help="folder for peers-{model}.{json,md}")
    args = p.parse_args(argv)
    missing = [name for name in PEERS if _version(name) is None]
    if missing:
        p.error(f"peers not installed: {', '.join(missing)}; install them with: {INSTALL}")
    _quiet_libraries()
    prompts = load_prompts(args.prompts)
    prompts = prompts[: args.limit] if args.limit else prompts
    settings = Settings(steps=args.steps, cfg=args.cfg, seed=args.seed)
    log = functools.partial(print, flush=True)
    for model in (["unet", "dit"] if args.model == "both" else [args.model]):
        report = run_model(model, prompts, settings, args, log)
        stem = Path(args.out) / f"peers-{model}"
        write(report, stem)
        print(markdown(report))
        log(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
