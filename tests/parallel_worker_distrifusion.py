"""A rank of the DistriFusion tests, started by ``sdinfer.parallel.launch.launch_local`` or torchrun.

``main OUT``: DistriFusion on the default UNet (64 x 64, DDIM, cfg 4) against one device: warm-up
covering every step (exact), the paper's warm-up (PSNR), a traced run whose every all-gather is
logged with the step it started in and the step it was waited on, the model restored after
removal, a tiny stock UNet2DConditionModel called directly, and bad inputs; rank 0 writes the
findings to OUT (JSON) for ``test_parallel_distrifusion.py`` to judge.
``psnr OUT STEPS WARMUP [WARMUP ...]``: PSNR against one device at 64 x 64 over STEPS DDIM steps,
for each warm-up and GroupNorm mode (the numbers of the report; not part of the tests).
"""

from __future__ import annotations

import sys

import torch

from sdinfer.context import current_step
from sdinfer.eval.metrics import psnr
from sdinfer.parallel import DistriFusionConfig, apply, launch
from sdinfer.parallel.distrifusion import GN_MODES
from parallel_helpers import error_of, under, write_findings

PROMPT = "a red circle in the top left"
SIZE = 64
EXACT_STEPS = 8
TRACED_WARMUP = 2
PSNR_STEPS = 20




def trace(comm) -> list[dict]:
    """Log every all-gather ``comm`` starts (synchronous ones start and wait at once): the step it
    started in, the step its ``wait()`` ran in (None: after the run, when the handle was removed)
    and the bytes it counted."""
    log: list[dict] = []
    start = comm.start_all_gather

    def step() -> int | None:
        ctx = current_step()
        return None if ctx is None else ctx.step_index

    def traced(x, dim):
        before = comm.bytes_sent["all_gather"]
        pending = start(x, dim)
        entry = {"started": step(), "waited": "never", "bytes": comm.bytes_sent["all_gather"] - before}
        log.append(entry)
        for name in ("wait", "wait_now"):   # later, or at once (a synchronous all-gather)
            setattr(pending, name, _logged(getattr(pending, name), entry, step))
        return pending

    comm.start_all_gather = traced
    return log


def _logged(wait, entry: dict, step):
    def logged_wait():
        entry["waited"] = step()
        return wait()
    return logged_wait


def per_step(log: list[dict], steps: int) -> list[dict]:
    """For each step: its all-gathers waited on in the same step (synchronous), those waited on
    in the next step or, for the last, after the run (asynchronous), any other, and the bytes."""
    out = []
    for s in range(steps):
        mine = [e for e in log if e["started"] == s]
        later = s + 1 if s < steps - 1 else None
        out.append({"sync": sum(e["waited"] == s for e in mine),
                    "async": sum(e["waited"] == later for e in mine),
                    "other": sum(e["waited"] not in (s, later) for e in mine),
                    "bytes": sum(e["bytes"] for e in mine)})
    return out


def tiny_unet():
    """A stock diffusers UNet2DConditionModel with random weights: self-attention in its first
    down block, its mid block and its last up block, 4 GroupNorm groups."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1, norm_num_groups=4, cross_attention_dim=16, attention_head_dim=2).eval()


def tiny_unet_case(found: dict) -> None:
    """Three direct calls at falling timesteps (so the step tracker counts steps 0, 1, 2) on a
    16 x 12 latent: warm-up 2 covers them all (steps 0 .. 2), warm-up 0 goes stale from the second."""
    model = tiny_unet()
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 16, 12, generator=generator)
    text = torch.randn(2, 5, 16, generator=generator)

    @torch.no_grad()
    def run():
        return torch.stack([model(x, torch.tensor([t, t]), encoder_hidden_states=text, return_dict=False)[0]
                            for t in (900, 500, 100)])

    reference = run()
    for warmup in (2, 0):
        out, _ = under(model, DistriFusionConfig(warmup_steps=warmup), run)
        found[f"tiny-unet/warmup {warmup}"] = {
            "max_abs_error": float((out - reference).abs().max()),
            "max_abs_error_first_call": float((out[0] - reference[0]).abs().max())}
    found["tiny-unet/restored"] = bool(torch.equal(run(), reference))


def unchanged_input_case(found: dict, pipe) -> None:
    """The default UNet called three times on the same 64 x 64 input and timestep (steps 0, 1, 2
    of one generation) with no warm-up after the first step: the stale halos, K/V and statistics
    then equal the fresh ones, so each ``gn_mode`` must give one device's output; staleness is
    the only approximation."""
    from sdinfer.context import StepContext, step_context
    from sdinfer.models.calling import call_denoiser

    net = pipe.model.denoiser
    text = pipe.encode([PROMPT, ""])
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([600.0, 600.0])

    @torch.no_grad()
    def run():
        outs = []
        for step in range(3):
            with step_context(StepContext(step, 3, 0.6, 600.0, generation=-10**6)):
                outs.append(call_denoiser(net, x, t, text))
        return torch.stack(outs)

    reference = run()
    found["unchanged input"] = {mode: float((under(pipe, DistriFusionConfig(0, mode), run)[0] - reference).abs().max())
                                for mode in GN_MODES}


def main(out_path: str) -> int:
    from sdinfer.pipeline import Pipeline

    info = launch.init_process_group("gloo")
    found: dict = {}
    pipe = Pipeline.from_pretrained("unet")

    def generate(steps: int, size: int = SIZE):
        return lambda: pipe([PROMPT], steps=steps, sampler="ddim", guidance_scale=4.0, size=size).pixels

    reference = generate(EXACT_STEPS)()
    out, handle = under(pipe, DistriFusionConfig(warmup_steps=EXACT_STEPS), generate(EXACT_STEPS))
    found["exact"] = {"max_abs_error": float((out - reference).abs().max()),
                      "bytes": dict(handle.comm.bytes_sent), "calls": dict(handle.comm.calls)}
    found["restored"] = bool(torch.equal(generate(EXACT_STEPS)(), reference))

    handle = apply(pipe, DistriFusionConfig(warmup_steps=TRACED_WARMUP))
    log = trace(handle.comm)
    try:
        out = generate(EXACT_STEPS)()
    finally:
        handle.remove()
    found["traced"] = {"max_abs_error": float((out - reference).abs().max()), "psnr": psnr(out, reference),
                       "steps": per_step(log, EXACT_STEPS), "blocked_s": dict(handle.comm.blocked_s)}

    reference_long = generate(PSNR_STEPS)()
    found["psnr"] = {mode: psnr(under(pipe, DistriFusionConfig(gn_mode=mode), generate(PSNR_STEPS))[0], reference_long)
                     for mode in ("corrected",)}

    unchanged_input_case(found, pipe)
    tiny_unet_case(found)

    dit = Pipeline.from_pretrained("dit")
    single = torch.distributed.new_group([0]), torch.distributed.new_group([1])
    found["errors"] = {
        "world size 1": error_of(lambda: apply(pipe, "distrifusion", group=single[info.rank])),
        "a DiT": error_of(lambda: apply(dit, "distrifusion")),
        "height 36 on 2 ranks": error_of(lambda: under(pipe, "distrifusion", generate(2, size=36))),
        "unknown gn_mode": error_of(lambda: apply(pipe, "distrifusion:gn_mode=async")),
        "warm-up -1": error_of(lambda: apply(pipe, "distrifusion:warmup_steps=-1")),
    }
    found["restored after errors"] = bool(torch.equal(generate(EXACT_STEPS)(), reference))
    write_findings(found, out_path)
    return 0


def measure_psnr(out_path: str, steps: int, warmups: list[int]) -> int:
    from sdinfer.pipeline import Pipeline

    launch.init_process_group("gloo")
    pipe = Pipeline.from_pretrained("unet")

    def generate():
        return pipe([PROMPT], steps=steps, sampler="ddim", guidance_scale=4.0, size=SIZE).pixels

    reference = generate()
    found = {f"warmup {w} / {mode}": psnr(under(pipe, DistriFusionConfig(w, mode), generate)[0], reference)
             for w in warmups for mode in GN_MODES}
    write_findings(found, out_path)
    return 0


if __name__ == "__main__":
    mode, path = sys.argv[1:3]
    if mode == "psnr":
        work = lambda: measure_psnr(path, int(sys.argv[3]), [int(w) for w in sys.argv[4:]])  # noqa: E731
    else:
        work = lambda: main(path)  # noqa: E731
    sys.exit(launch.run_rank(work))
