"""A rank of the AsyncDiff tests, started by ``sdinfer.parallel.launch.launch_local``.

``python parallel_worker_asyncdiff.py [stride2] OUT``: AsyncDiff (stride 1 on 2 ranks, or
stride 2 on 3) on the default UNet (64x64) and DiT (32x32) against one device, DDIM at cfg 4:
with every step a warm-up step, with the default warm-up, the blocks each rank ran, the bytes
each rank sent, and bad inputs.  Rank 0 writes the findings to OUT (JSON) for
``test_parallel_asyncdiff.py`` to judge.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from sdinfer.eval.metrics import psnr
from sdinfer.parallel import apply, launch
from sdinfer.parallel.asyncdiff import balanced_split
from parallel_helpers import error_of, under, write_findings

PROMPT = "a red circle in the top left"
STEPS = 8


def leaves(model) -> list[torch.nn.Module]:
    """One module inside each block that runs only when the block itself runs."""
    from sdinfer.models.adapters import adapter_for

    found = []
    for _, block in adapter_for(model).blocks(model):
        resnets = getattr(block, "resnets", None)
        found.append(resnets[0] if resnets else block.ff if getattr(block, "ff", None) is not None else block.norm1)
    return found


def run_under(pipe, spec: str, size: int, steps: int = STEPS) -> dict:
    model = pipe.model.denoiser
    counts = [0] * len(leaves(model))
    hooks = [leaf.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
             for i, leaf in enumerate(leaves(model))]
    handle = apply(pipe, spec)
    try:
        pixels = pipe([PROMPT], steps=steps, sampler="ddim", guidance_scale=4.0, size=size, seeds=[3]).pixels
    finally:
        handle.remove()
        for hook in hooks:
            hook.remove()
    plan = next(iter(handle.state.plans.values()))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {"bytes": dict(handle.comm.bytes_sent), "calls": dict(handle.comm.calls),
                                      "block_runs": counts})
    return {"pixels": pixels, "owners": plan.owners, "exchanged": sorted(plan.exchanged), "ranks": everyone}



def main(out_path: str, mode: str = "") -> int:
    from sdinfer.pipeline import Pipeline

    info = launch.init_process_group("gloo")
    options = ",stride=2" if mode == "stride2" else ""
    found: dict = {}
    for name, size in (("unet", 64), ("dit", 32)):
        pipe = Pipeline.from_pretrained(name)
        reference = pipe([PROMPT], steps=STEPS, sampler="ddim", guidance_scale=4.0, size=size, seeds=[3]).pixels
        exact = run_under(pipe, f"asyncdiff:warmup_steps={STEPS}{options}", size)
        stale = run_under(pipe, f"asyncdiff:warmup_steps=1{options}", size)
        found[name] = {
            "exact_max_abs_error": float((exact.pop("pixels") - reference).abs().max()),
            "exact": exact,
            "stale_psnr": psnr(stale.pop("pixels"), reference),
            "stale": stale,
            "restored": bool(torch.equal(
                pipe([PROMPT], steps=STEPS, sampler="ddim", guidance_scale=4.0, size=size, seeds=[3]).pixels,
                reference)),
            "out_channels": int(pipe.model.denoiser.config.out_channels),
        }
    dit = Pipeline.from_pretrained("dit")
    if mode == "stride2":
        found["errors"] = {"two calls a step": error_of(lambda: under(
            dit, "asyncdiff:stride=2", lambda: dit([PROMPT], steps=4, sampler="heun", size=32, seeds=[3])))}
        write_findings(found, out_path)
        return 0
    found["balanced_split"] = balanced_split([5, 1, 1, 1, 1, 1, 4], 2)
    single = dist.new_group([0]), dist.new_group([1])
    found["errors"] = {
        "world size 1": error_of(lambda: apply(dit, "asyncdiff", group=single[info.rank])),
        "no warm-up": error_of(lambda: apply(dit, "asyncdiff:warmup_steps=0")),
        "stride 2 on 2 ranks": error_of(lambda: apply(dit, "asyncdiff:stride=2")),
        "stride 3": error_of(lambda: apply(dit, "asyncdiff:stride=3")),
    }
    write_findings(found, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(launch.run_rank(lambda: main(sys.argv[-1], *sys.argv[1:-1])))
