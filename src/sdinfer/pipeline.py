"""The generation pipeline: prompt -> conditioning -> sampling loop -> decode -> image.

Works on the shipped default models and on diffusers pipeline folders alike
(``LoadedModel``); the model is called through ``call_denoiser`` and sampled
by any sampler of ``sdinfer.samplers``.
"""

from __future__ import annotations

import itertools
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .denoiser import Denoiser
from .devices import cast_model_fn
from .errors import UserError
from .generation_config import DEFAULT_GUIDANCE, DEFAULT_STEPS, GenerationConfig
from .memory import check_fits
from .models.calling import TextConditioning, call_denoiser
from .models.loading import LoadedModel, load_model
from .models.tokenizing import tokenizer_lock
from .samplers import sample_loop
from .samplers.base import check_final_fits, steps_one_by_one

_generation_counter = itertools.count(1)


@dataclass
class GenerationResult:
    images: list[Image.Image]
    pixels: torch.Tensor           # (B, C, H, W) in [0, 1], float32
    nfe: int
    model_calls: int
    seconds: float
    params: dict = field(default_factory=dict)


class Pipeline:
    """Text-to-image generation on a loaded model."""

    def __init__(self, model: LoadedModel):
        self.model = model

    @classmethod
    def from_pretrained(cls, name_or_path="default", device: torch.device | str | None = None,
                        dtype: torch.dtype | str | None = None) -> "Pipeline":
        """``device``: cpu (default), cuda, cuda:N or mps; ``dtype``: float32 (default), float16
        or bfloat16 (names or torch objects; ``sdinfer.devices`` checks them).  The sampler works
        in float32 on the device whatever the model's dtype; images come back on the CPU."""
        return cls(load_model(name_or_path, dtype=dtype, device=device))

    # ---- conditioning ----------------------------------------------------------
    def unknown_words(self, prompt: str) -> list[str]:
        tok = self.model.tokenizer
        unk = getattr(tok, "unk_token_id", None)
        if tok is None or unk is None:
            return []
        out = []
        with tokenizer_lock(tok):
            for word in prompt.split():
                ids = tok(word.lower() if getattr(tok, "do_lower_case", False) else word,
                          add_special_tokens=False).input_ids
                if unk in ids:
                    out.append(word)
        return out

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextConditioning | None:
        te, tok = self.model.text_encoder, self.model.tokenizer
        if te is None:
            return None
        for p in prompts:
            unknown = self.unknown_words(p)
            if unknown:
                warnings.warn(f"prompt {p!r} has words the text encoder does not know: "
                              f"{', '.join(unknown)}; they are read as <unk>", stacklevel=2)
        if self.model.text_encoder_2 is not None:   # FLUX, SD3: their own recipes
            from .models.text_encoding import encode_prompts
            with tokenizer_lock(tok):
                return encode_prompts(self.model, prompts)
        max_len = min(int(tok.model_max_length),
                      int(getattr(te.config, "max_position_embeddings", 10**6)))
        texts = [p.lower() for p in prompts] if getattr(tok, "do_lower_case", False) else prompts
        with tokenizer_lock(tok):
            ids = tok(texts, padding="max_length", max_length=max_len, truncation=True,
                      return_tensors="pt").input_ids
        out = te(ids.to(self.model.device))
        return TextConditioning(out[0], getattr(out, "pooler_output", None))

    # ---- checks ------------------------------------------------------------------
    def check_size(self, size: int | None) -> int:
        m = self.model
        if size is None:
            return m.native_size
        f = m.spatial_factor
        if size < f or size % f:
            raise UserError(f"size {size} does not fit model {m.name}: it must be a positive "
                            f"multiple of {f} (trained at {m.native_size}); use --size {m.native_size}")
        if m.max_size is not None and size > m.max_size:
            raise UserError(f"size {size} is larger than model {m.name} takes ({m.max_size}, the "
                            f"extent of its positional table); use --size {m.native_size}")
        return size

    # ---- generation --------------------------------------------------------------
    def noise(self, seeds: list[int], size: int, dtype=torch.float32) -> torch.Tensor:
        """One noise tensor per seed, so an image does not depend on its batch; drawn on the CPU
        in float32 (the same numbers on every device), then put on the model's device."""
        side = size // self.model.vae_factor
        shape = (self.model.sample_channels, side, side)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s))
                             for s in seeds])
        return noise.to(device=self.model.device, dtype=dtype)

    def denoiser(self, guidance_scale: float, size: int | None = None) -> Denoiser:
        """The model as the sampler sees it: called in its own dtype, its output (and so guidance
        and the sampler's arithmetic) in the sample's dtype, float32 from ``noise``; ``size``: the
        image side, where the schedule depends on it (FLUX)."""
        net = self.model.denoiser
        model_fn = cast_model_fn(lambda x, t, text: call_denoiser(net, x, t, text), self.model.dtype)
        return Denoiser(model_fn, self.model.schedule_at(size), self.model.prediction_type, guidance_scale)

    def attach_statistics(self, solver, guidance_scale: float) -> None:
        """DPM-Solver-v3 without statistics given takes the ones the model ships for this scale."""
        from .models import artifacts
        from .samplers.dpm_solver_v3 import DPMSolverV3
        from .samplers.ems import EMS

        if not isinstance(solver, DPMSolverV3) or solver.stats is not None or solver.degenerated:
            return
        path = artifacts.find(self.model.path, "dpm-solver-v3", guidance_scale)
        if path is None:
            where = artifacts.path(self.model.path, "dpm-solver-v3", guidance_scale)
            raise UserError(f"dpm-solver-v3 needs statistics of model {self.model.name} at cfg "
                            f"{guidance_scale:g} and {where} does not exist; make them with `sdinfer "
                            f"calibrate --model {self.model.name} --cfg {guidance_scale:g}` or pass "
                            "dpm-solver-v3:stats=PATH")
        solver.stats = EMS.load(path)

    def time_grid(self, spacing, guidance_scale: float, steps: int, sampler: str | None = None):
        """``"gits"``: the optimal grid the model ships for this guidance scale; ``"learned"``: the
        grid learned for ``sampler`` at ``steps`` steps and this guidance scale; else as given."""
        from .samplers.base import SPACINGS

        if spacing is None or hasattr(spacing, "times"):
            return spacing
        if spacing not in ("gits", "learned"):
            if spacing not in SPACINGS:
                raise UserError(f"unknown time grid {spacing!r}; choose one of {', '.join(SPACINGS)}, "
                                "gits, learned")
            if (spacing == "flow") != self.model.schedule.is_flow:
                raise UserError(f"the {spacing} grid does not fit model {self.model.name}'s "
                                f"{'flow-matching' if self.model.schedule.is_flow else 'VP'} schedule")
            return spacing
        if self.model.schedule.is_flow:
            raise UserError(f"the {spacing} grid is for VP schedules; a flow-matching model uses the flow grid")
        if spacing == "gits":
            return self._gits_grid(guidance_scale, steps)
        return self._learned_grid(guidance_scale, steps, sampler or "ddim")

    def _auto_config(self, config: GenerationConfig) -> tuple[GenerationConfig, str]:
        """``sampler="auto"``: the configuration the model's auto-sampler table chose for this
        guidance scale and NFE (``config.steps``), and its name."""
        import dataclasses

        from .auto_sampler import table_for

        use_cfg = config.guidance_scale != 1.0 and self.model.text_encoder is not None
        table = table_for(self.model.path, config.guidance_scale if use_cfg else 1.0, self.model.name)
        cand = table.candidate(config.steps)
        chosen = dataclasses.replace(config, sampler=cand.sampler, spacing=cand.spacing,
                                     analytic_first_step=cand.analytic_first_step,
                                     steps=cand.steps(config.steps))
        return chosen, cand.name

    def _check_final(self, final: str, spacing, solver, steps: int) -> None:
        schedule = self.model.schedule
        grid = spacing if spacing is not None else (schedule.default_spacing if schedule.is_flow
                                                    else getattr(solver, "spacing", schedule.default_spacing))
        try:
            check_final_fits(schedule, steps, grid, final)
        except ValueError as err:
            raise UserError(str(err)) from None

    def _check_own_loop(self, solver) -> None:
        """Caches and parallel strategies follow one model call per step: a sampler that chooses
        its steps or evaluates many in one call runs without them."""
        from .cache.base import installed_hooks

        if not steps_one_by_one(solver) and installed_hooks(self.model.denoiser):
            raise UserError(f"sampler {solver.name!r} runs its own loop over the steps (it chooses them or "
                            "evaluates several in one model call), which the accelerators installed on "
                            "this pipeline cannot follow; remove them (handle.remove()) or use a "
                            "step-by-step sampler such as ddim or dpm-solver++")

    def _gits_grid(self, guidance_scale: float, steps: int):
        from .models import artifacts
        from .samplers.optimal_grid import OptimalGrid

        path = artifacts.find(self.model.path, "gits", guidance_scale)
        if path is None:
            where = artifacts.path(self.model.path, "gits", guidance_scale)
            raise UserError(f"the gits grid of model {self.model.name} at cfg {guidance_scale:g} does not "
                            f"exist ({where}); make it with `sdinfer calibrate --method gits --model "
                            f"{self.model.name} --cfg {guidance_scale:g}` or choose another --spacing")
        try:
            grid = OptimalGrid.load(path)
        except ValueError as err:
            raise UserError(str(err)) from None
        if steps > grid.max_steps:
            raise UserError(f"the gits grid at {path} allows at most {grid.max_steps} steps, not {steps}; "
                            "recalibrate it with more --points or choose another --spacing")
        return grid

    def _learned_grid(self, guidance_scale: float, steps: int, sampler: str):
        from .models import artifacts
        from .samplers.learned_grid import LearnedGrids

        path = artifacts.find(self.model.path, "learned-grid", guidance_scale)
        how = (f"`sdinfer calibrate --method learned-grid --model {self.model.name} --cfg {guidance_scale:g} "
               f"--sampler {sampler} --step-counts {steps}`")
        if path is None:
            where = artifacts.path(self.model.path, "learned-grid", guidance_scale)
            raise UserError(f"model {self.model.name} has no learned grids at cfg {guidance_scale:g} ({where}); "
                            f"learn one with {how} or choose another --spacing")
        try:
            return LearnedGrids.load(path).grid(sampler, steps)
        except ValueError as err:
            raise UserError(str(err)) from None
        except KeyError as err:
            raise UserError(f"{err.args[0]}; learn it with {how} or choose another --spacing") from None

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        vae = self.model.vae
        if vae is not None:
            x = x / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
            x = vae.decode(x.to(vae.dtype), return_dict=False)[0]
        return ((x.float().clamp(-1, 1) + 1) / 2).cpu()

    @torch.no_grad()
    def __call__(self, prompts: str | list[str], steps: int | str = DEFAULT_STEPS,
                 sampler: str = "ddim", guidance_scale: float = DEFAULT_GUIDANCE, seed: int = 0,
                 size: int | None = None, seeds: list[int] | None = None, progress: bool = False,
                 predictor=None, spacing=None, analytic_first_step: bool = False,
                 final: str = "zero", config: GenerationConfig | None = None,
                 callback: Callable[[int, torch.Tensor], None] | None = None,
                 start: tuple[int, torch.Tensor] | None = None) -> GenerationResult:
        """``steps="auto"``: StepSaver's predictor (``predictor``: a path or a StepPredictor;
        default the one beside the model) picks the count, the largest over the prompts.
        ``spacing``: a grid name (None: the sampler's own), ``"gits"`` (the grid the model
        ships for this guidance scale), ``"learned"`` (the grid learned for this sampler, step
        count and guidance scale) or a grid object.  ``analytic_first_step``: the first
        step without a model call (``steps`` steps cost ``steps - 1`` evaluations).  ``final``:
        where the last step lands, ``"zero"`` (clean data) or ``"sigma_min"`` (the first
        training step, as diffusers' DDIM and ``final_sigmas_type="sigma_min"``; the trailing
        grid only: leading and linspace end at timestep 0 already).  ``config``: the options as
        one checked ``GenerationConfig`` (then the keyword arguments above are not read).  ``sampler``: any
        name of ``samplers.SAMPLERS``, or ``"auto"``: for ``steps`` model evaluations, what the model's
        auto-sampler table (``sdinfer calibrate auto``) chose at this guidance scale; ``dpm-solver-12`` / ``-23`` choose their own steps (``steps`` does
        not apply), ``paradigms`` / ``parataa`` batch several steps per model call; ``nfe`` in the
        result counts every step evaluated, ``model_calls`` the forward passes.  ``callback(i, x)``: called after step ``i`` (0-based) with the latents
        it produced (progress reports, intermediate latents).
        ``start=(k, latents)``: resume at step ``k`` (0 to steps - 1) of this run's grid from
        ``latents`` (what ``callback(k - 1, x)`` gave, of one prompt or of each), under these
        prompts: the first ``k`` steps are not run and the seeds' noise is not used (the seeds
        still drive a stochastic sampler); step-by-step samplers only (NIRVANA's approximate
        caching, ``sdinfer.serve.approx_cache``)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise UserError("no prompt given; pass at least one prompt")
        if config is None:
            config = GenerationConfig(steps, sampler, guidance_scale, seed, size, spacing,
                                      analytic_first_step, final)
        if config.steps == "auto":
            from .stepsaver import StepPredictor, predictor_for, prompt_features
            if not isinstance(predictor, StepPredictor):
                predictor = predictor_for(self, predictor)
            counts = predictor.predict(prompt_features(self, prompts))
            if len(set(counts)) > 1:
                if start is not None:
                    raise UserError("start= resumes one grid; the step predictor chose several step counts "
                                    "here: pass steps=N")
                if callback is not None:
                    raise UserError("a step callback needs one step count for all prompts; the step predictor "
                                    "chose several here: generate the prompts one at a time, or pass steps=N")
                return self._per_prompt_steps(prompts, counts, config, seeds, progress)
            config = config.with_steps(counts[0])
        auto_choice = None
        if config.sampler == "auto":
            config, auto_choice = self._auto_config(config)
        steps, sampler, guidance_scale, seed = config.steps, config.sampler, config.guidance_scale, config.seed
        size, spacing, analytic_first_step, final = (config.size, config.spacing, config.analytic_first_step,
                                                     config.final)
        solver = config.make_sampler()
        self._check_own_loop(solver)
        self.attach_statistics(solver, guidance_scale)
        given_spacing, spacing = spacing, self.time_grid(spacing, guidance_scale, steps, sampler)
        if final != "zero":
            self._check_final(final, spacing, solver, steps)
        size = self.check_size(size)
        start_step, start_latents = self._check_start(start, steps, solver, len(prompts), size)
        check_fits(self.model, size, len(prompts), guidance_scale != 1.0 and self.model.text_encoder is not None,
                   self.model.device, self.model.dtype)
        seeds = seeds if seeds is not None else [seed + i for i in range(len(prompts))]
        start = time.perf_counter()
        cond = self.encode(prompts)
        use_cfg = guidance_scale != 1.0 and cond is not None
        uncond = self.encode([""] * len(prompts)) if use_cfg else None
        den = self.denoiser(guidance_scale if use_cfg else 1.0, size)
        x = self.noise(seeds, size) if start_latents is None else start_latents
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=None if getattr(solver, "chooses_steps", False) else steps - start_step,
                       desc="denoising", unit="step", leave=False)
        noise_generator = torch.Generator().manual_seed(seeds[0] + 10**6)  # stochastic samplers
        try:
            x = sample_loop(den, solver, x, steps, cond, uncond, generator=noise_generator, spacing=spacing,
                            analytic_first_step=analytic_first_step, final=final,
                            generation=next(_generation_counter),
                            callback=_step_callback(bar, callback), start=start_step)
        except FloatingPointError as err:
            raise UserError(str(err)) from None
        finally:
            if bar is not None:
                bar.close()
        pixels = self.decode(x)
        seconds = time.perf_counter() - start
        images = [to_pil(p) for p in pixels]
        params = {"model": self.model.name, "sampler": sampler, "steps": steps,
                  "cfg": guidance_scale, "seed": seeds[0], "size": size}
        if given_spacing is not None:
            params["spacing"] = given_spacing if isinstance(given_spacing, str) else getattr(spacing, "name", "custom")
        if analytic_first_step:
            params["analytic_first_step"] = True
        if auto_choice is not None:
            params["auto"] = auto_choice
        if final != "zero":
            params["final"] = final
        if start_step:
            params["start_step"] = start_step
        return GenerationResult(images, pixels, den.nfe, den.model_calls, seconds, params)

    def _check_start(self, start, steps: int, solver, batch: int, size: int) -> tuple[int, torch.Tensor | None]:
        """``start=(k, latents)`` checked: k an integer step from 0 to steps - 1, the latents of
        one image or of each prompt at this size, a step-by-step sampler; returns k and the
        latents as the loop's float32 batch on the model's device."""
        if start is None:
            return 0, None
        try:
            k, latents = start
        except (TypeError, ValueError):
            raise UserError("start must be a pair (step_index, latents); e.g. start=(10, x) with x from "
                            "callback(9, x)") from None
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= int(k) < steps:
            raise UserError(f"start step {k!r} is outside this run of {steps} steps; give an integer from 0 "
                            f"to {steps - 1} (the latents after step k - 1)")
        if not torch.is_tensor(latents):
            raise UserError(f"start latents must be a torch tensor, not {type(latents).__name__}")
        side = size // self.model.vae_factor
        shape = (self.model.sample_channels, side, side)
        if latents.dim() == 3:
            latents = latents.unsqueeze(0)
        if latents.dim() != 4 or tuple(latents.shape[1:]) != shape or latents.shape[0] not in (1, batch):
            raise UserError(f"start latents have shape {tuple(latents.shape)}; model {self.model.name} at "
                            f"size {size} with {batch} prompt(s) needs {(batch, *shape)} (or {(1, *shape)}); "
                            "resume with latents of the same model, size and batch")
        if not torch.isfinite(latents).all():
            raise UserError("start latents hold NaN or infinite values; pass the latents a run produced")
        if int(k) and (not steps_one_by_one(solver) or not getattr(solver, "resumable", True)):
            raise UserError(f"sampler {solver.name!r} cannot resume at step {int(k)} (it runs its own loop over "
                            "the steps); use a step-by-step sampler such as ddim or dpm-solver++")
        latents = latents.to(device=self.model.device, dtype=torch.float32).expand(batch, *shape).clone()
        return int(k), latents


    def _per_prompt_steps(self, prompts: list[str], counts: list[int], config: GenerationConfig,
                          seeds: list[int] | None, progress: bool) -> GenerationResult:
        """``steps="auto"`` over prompts whose predicted counts differ: one generation per count,
        each prompt with its own seed, the images in the prompts' order.  ``nfe`` and
        ``model_calls``: the mean per image, rounded; ``params["steps"]``: the count per prompt."""
        seeds = seeds if seeds is not None else [config.seed + i for i in range(len(prompts))]
        start = time.perf_counter()
        pixels: list = [None] * len(prompts)
        nfe = calls = 0.0
        result = None
        for count in sorted(set(counts)):
            idx = [i for i, c in enumerate(counts) if c == count]
            result = self([prompts[i] for i in idx], seeds=[seeds[i] for i in idx], progress=progress,
                          config=config.with_steps(count))
            for i, p in zip(idx, result.pixels):
                pixels[i] = p
            nfe += result.nfe * len(idx)
            calls += result.model_calls * len(idx)
        stacked = torch.stack(pixels)
        params = {**result.params, "steps": list(counts), "seed": seeds[0]}
        return GenerationResult([to_pil(p) for p in stacked], stacked, round(nfe / len(prompts)),
                                round(calls / len(prompts)), time.perf_counter() - start, params)


def _step_callback(bar, callback):
    if bar is None:
        return callback

    def both(i, x):
        bar.update(1)
        if callback is not None:
            callback(i, x)
    return both


def to_pil(pixels: torch.Tensor) -> Image.Image:
    arr = (pixels.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr if arr.shape[2] != 1 else arr[..., 0])
