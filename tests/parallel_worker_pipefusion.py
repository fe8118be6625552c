"""A rank of the PipeFusion tests, started by ``sdinfer.parallel.launch.launch_local`` or torchrun.

``main OUT`` (2 ranks): PipeFusion on the default DiT (SD3Transformer2DModel, 32 x 32, DDIM, cfg 4)
against one device: warm-up covering every step (exact), the default warm-up with 2 and 4
patches (PSNR), the blocks each rank ran and the bytes each rank sent, the model restored
after removal; a stock tiny PixArt pipeline and a tiny DiTTransformer2DModel (exact under
warm-up, and pipelined); bad inputs.  Rank 0 writes the findings to OUT (JSON) for
``test_parallel_pipefusion.py`` to judge.
``three OUT`` (3 ranks): a tiny SD3 transformer of 4 blocks (stages of 2, 1, 1: a middle rank
receives and sends), exact under warm-up and pipelined in 4 patches (16 image tokens); and a
tiny SD3 transformer of 2 blocks on 3 ranks (an error).
``psnr OUT STEPS`` (2 ranks): PSNR against one device at STEPS DDIM steps for warm-up 1 and 2 and
2 and 4 patches, over three prompts (the numbers of the report; not part of the tests).
"""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist

from sdinfer.eval.metrics import psnr
from sdinfer.parallel import apply, launch
from parallel_helpers import error_of, under, write_findings

PROMPT = "a red circle in the top left"
EXACT_STEPS = 8
PSNR_STEPS = 20
TINY_TIMESTEPS = (900, 600, 300, 100)



def gathered(mine) -> list:
    """Every rank's ``mine``, in rank order (outside the strategy's communicator: not counted)."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


class BlockCounter:
    """Calls of each block's feed-forward (a leaf: it runs only where the block itself runs)."""

    def __init__(self, model):
        self.calls = [0] * len(model.transformer_blocks)
        self.handles = [block.ff.register_forward_hook(self._hit(i))
                        for i, block in enumerate(model.transformer_blocks)]

    def _hit(self, index):
        def hit(*_):
            self.calls[index] += 1
        return hit

    def remove(self):
        for h in self.handles:
            h.remove()


def run_under(target, model, spec: str, run):
    """Run under ``spec``; the output and, per rank, the bytes and calls of each kind of transfer
    and the calls of each block."""
    counter = BlockCounter(model)
    handle = apply(target, spec)
    try:
        start = time.perf_counter()
        out = run()
        seconds = time.perf_counter() - start
    finally:
        handle.remove()
        counter.remove()
    mine = {"bytes": dict(handle.comm.bytes_sent), "calls": dict(handle.comm.calls), "blocks": counter.calls,
            "blocked_s": dict(handle.comm.blocked_s), "seconds": seconds}
    return out, gathered(mine)


def error_between(out, reference) -> float:
    if isinstance(out, (list, tuple)):
        return max(error_between(o, r) for o, r in zip(out, reference))
    return float((out - reference).abs().max())


def tiny_sd3(layers: int, heads: int = 2):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=layers,
                                 attention_head_dim=8, num_attention_heads=heads, joint_attention_dim=16,
                                 caption_projection_dim=8 * heads, pooled_projection_dim=8,
                                 pos_embed_max_size=8).eval()


def sd3_calls(model, side: int = 8):
    """Calls at falling timesteps (steps of one generation), as a sampler makes them."""
    generator = torch.Generator().manual_seed(1)
    x, text, pooled = (torch.randn(*shape, generator=generator) for shape in ((2, 4, side, side), (2, 5, 16), (2, 8)))

    @torch.no_grad()
    def run():
        return [model(x, encoder_hidden_states=text, pooled_projections=pooled, timestep=torch.tensor([t, t]),
                      return_dict=False)[0] for t in TINY_TIMESTEPS]
    return run


def main(out_path: str) -> int:
    from cache_helpers import tiny_transformers
    from tiny_pipelines import build_tiny_pixart

    from sdinfer.pipeline import Pipeline

    info = launch.init_process_group("gloo")
    found: dict = {}
    dit, unet = Pipeline.from_pretrained("dit"), Pipeline.from_pretrained("unet")
    dit_model = dit.model.denoiser

    def generate(steps, pipe=dit):
        return lambda: pipe([PROMPT], steps=steps, sampler="ddim", guidance_scale=4.0).pixels

    # ---- the default DiT ----------------------------------------------------------------------
    exact_reference = generate(EXACT_STEPS)()
    out, ranks = run_under(dit, dit_model, f"pipefusion:warmup_steps={EXACT_STEPS}", generate(EXACT_STEPS))
    found["dit/exact"] = {"max_abs_error": error_between(out, exact_reference), "ranks": ranks}
    reference = generate(PSNR_STEPS)()
    for spec in ("pipefusion", "pipefusion:patches=4"):
        out, ranks = run_under(dit, dit_model, spec, generate(PSNR_STEPS))
        found[f"dit/{spec}"] = {"psnr": psnr(out, reference), "max_abs_error": error_between(out, reference),
                                "ranks": ranks}
    # two generations under one handle, no warm-up asked for: the second must not start from the
    # first one's K/V (its first step runs whole, like the first's)
    handle = apply(dit, "pipefusion:warmup_steps=0")
    try:
        first, second = generate(EXACT_STEPS)(), generate(EXACT_STEPS)()
    finally:
        handle.remove()
    found["dit/two generations"] = {"equal": bool(torch.equal(first, second)),
                                    "max_abs_error": error_between(first, exact_reference)}
    found["dit/restored"] = bool(torch.equal(generate(EXACT_STEPS)(), exact_reference))

    # ---- a stock tiny PixArt pipeline: every model call's output ---------------------------------
    pixart = build_tiny_pixart()

    def run_pixart(steps):
        def run():
            outputs = []
            hook = pixart.transformer.register_forward_hook(lambda m, args, out: outputs.append(out[0]))
            try:
                pixart("a red circle", num_inference_steps=steps, guidance_scale=4.0, output_type="latent",
                       use_resolution_binning=False, generator=torch.Generator().manual_seed(0))
            finally:
                hook.remove()
            return outputs
        return run

    pixart_reference = run_pixart(3)()
    for key, spec in (("exact", "pipefusion:warmup_steps=3"), ("pipelined", "pipefusion")):
        out, ranks = run_under(pixart, pixart.transformer, spec, run_pixart(3))
        found[f"pixart/{key}"] = {"max_abs_error": error_between(out, pixart_reference),
                                  "scale": max(float(r.abs().max()) for r in pixart_reference), "ranks": ranks}
    found["pixart/restored"] = all(torch.equal(a, b) for a, b in zip(run_pixart(3)(), pixart_reference))

    # ---- a tiny DiTTransformer2DModel called directly (class labels, no text) ----------------------
    tiny_dit = tiny_transformers()[2][0]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator)

    @torch.no_grad()
    def run_tiny_dit():
        return [tiny_dit(x, timestep=torch.tensor([t, t]), class_labels=torch.tensor([1, 3]), return_dict=False)[0]
                for t in TINY_TIMESTEPS]

    tiny_reference = run_tiny_dit()
    for key, spec in (("exact", f"pipefusion:warmup_steps={len(TINY_TIMESTEPS)}"), ("pipelined", "pipefusion")):
        out, ranks = run_under(tiny_dit, tiny_dit, spec, run_tiny_dit)
        found[f"tiny-dit/{key}"] = {"max_abs_error": error_between(out, tiny_reference), "ranks": ranks}
    found["tiny-dit/restored"] = all(torch.equal(a, b) for a, b in zip(run_tiny_dit(), tiny_reference))

    # a new sample size within a generation (falling timesteps): its first call runs whole (exact)
    y = torch.randn(2, 4, 12, 12, generator=generator)

    @torch.no_grad()
    def run_two_sizes():
        return [tiny_dit(sample, timestep=torch.tensor([t, t]), class_labels=torch.tensor([1, 3]), return_dict=False)[0]
                for sample, t in zip((x, x, y, y), TINY_TIMESTEPS)]

    two_sizes_reference = run_two_sizes()
    out, ranks = run_under(tiny_dit, tiny_dit, "pipefusion", run_two_sizes)
    found["tiny-dit/new size"] = {"max_abs_error": [error_between(o, r) for o, r in zip(out, two_sizes_reference)],
                                  "ranks": ranks}

    # ---- bad input -------------------------------------------------------------------------------
    single = dist.new_group([0]), dist.new_group([1])

    found["errors"] = {
        "pipefusion on a UNet": error_of(lambda: apply(unet, "pipefusion")),
        "pipefusion on 1 rank": error_of(lambda: apply(dit, "pipefusion", group=single[info.rank])),
        "1 block on 2 ranks": error_of(lambda: apply(tiny_sd3(1), "pipefusion")),
        "3 patches of 256 tokens": error_of(lambda: under(dit, "pipefusion:patches=3", generate(2))),
        "patches=0": error_of(lambda: apply(dit, "pipefusion:patches=0")),
        "patches=two": error_of(lambda: apply(dit, "pipefusion:patches=two")),
    }
    found["dit/restored after errors"] = bool(torch.equal(generate(EXACT_STEPS)(), exact_reference))
    write_findings(found, out_path)
    return 0


def three_ranks(out_path: str) -> int:
    launch.init_process_group("gloo")
    model = tiny_sd3(4)
    run = sd3_calls(model)
    reference = run()
    found = {}
    for key, spec in (("exact", f"pipefusion:warmup_steps={len(TINY_TIMESTEPS)},patches=4"),
                      ("pipelined", "pipefusion:patches=4")):
        out, ranks = run_under(model, model, spec, run)
        found[key] = {"max_abs_error": error_between(out, reference), "ranks": ranks}
    found["2 blocks on 3 ranks"] = error_of(lambda: apply(tiny_sd3(2), "pipefusion"))
    write_findings(found, out_path)
    return 0


def psnr_table(out_path: str, steps: str) -> int:
    from sdinfer.pipeline import Pipeline

    launch.init_process_group("gloo")
    dit = Pipeline.from_pretrained("dit")
    prompts = [PROMPT, "a blue square in the bottom right", "a green triangle in the middle"]

    def run():
        return dit(prompts, steps=int(steps), sampler="ddim", guidance_scale=4.0).pixels

    start = time.perf_counter()
    reference = run()
    found = {"one device seconds": time.perf_counter() - start}
    for warmup in (1, 2):
        for patches in (2, 4):
            out, ranks = run_under(dit, dit.model.denoiser, f"pipefusion:warmup_steps={warmup},patches={patches}", run)
            found[f"warmup {warmup}, patches {patches}"] = {
                "psnr": psnr(out, reference), "max_abs_error": error_between(out, reference),
                "seconds": [r["seconds"] for r in ranks], "blocked_s": [r["blocked_s"] for r in ranks],
                "bytes": [r["bytes"] for r in ranks]}
    write_findings(found, out_path)
    return 0


if __name__ == "__main__":
    mode, path = sys.argv[1:3]
    modes = {"main": lambda: main(path), "three": lambda: three_ranks(path),
             "psnr": lambda: psnr_table(path, sys.argv[3])}
    sys.exit(launch.run_rank(modes[mode]))
