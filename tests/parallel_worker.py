"""A rank of the parallel tests, started by ``sdinfer.parallel.launch.launch_local`` or torchrun.

``strategies OUT``: every strategy against one device on the default DiT and UNet, a stock tiny
PixArt pipeline and a tiny DiTTransformer2DModel, what each sends, and bad inputs; rank 0
writes the findings to OUT (JSON) for the tests to judge.
``three OUT``: Ulysses and ring on 3 ranks, on a tiny SD3 transformer.
``four OUT``: CFG parallel combined with Ulysses and with AsyncDiff on 4 ranks.
``caches OUT``: caches under the exact strategies (each against the same cache on one device),
and the combinations refused.
``raise STAMP`` / ``kill STAMP``: rank 1 fails (an exception / SIGKILL) while the ranks exchange
tensors, after writing the time to STAMP; rank 0 would go on for 90 s if nobody stopped it.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch

from sdinfer.parallel import Communicator, apply, launch
from parallel_helpers import error_of, under, write_findings

PROMPT = "a red circle in the top left"
STEPS = 3


def fail(mode: str, stamp: str) -> int:
    launch.init_process_group("gloo")
    comm = Communicator()
    start = time.monotonic()
    step = 0
    while time.monotonic() - start < 90:
        if comm.rank == 1 and step == 3:
            with open(stamp, "w") as f:   # when it failed, for the tests' clock
                f.write(str(time.time()))
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("an injected failure")
        comm.all_gather(torch.ones(4), dim=0)
        step += 1
        time.sleep(0.01)
    return 0


def record(found: dict, key: str, run, target, spec: str, reference: torch.Tensor, leaf=None) -> None:
    """Run under ``spec``; keep the max abs error, the bytes and calls of one step, and the
    first dimensions of what ``leaf`` (a module inside the model) saw."""
    seen = []
    hook = leaf.register_forward_hook(lambda m, args, out: seen.append(list(args[0].shape[:2]))) if leaf else None
    handle = apply(target, spec)
    try:
        out = run()
    finally:
        handle.remove()
        if hook is not None:
            hook.remove()
    found[key] = {"max_abs_error": float((out - reference).abs().max()),
                  "bytes": dict(handle.comm.bytes_sent), "calls": dict(handle.comm.calls),
                  "leaf_shapes": seen[:1]}



def tiny_sd3(heads: int):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                 attention_head_dim=8, num_attention_heads=heads, joint_attention_dim=16,
                                 caption_projection_dim=8 * heads, pooled_projection_dim=8, pos_embed_max_size=8)


def call_sd3(model, side: int):
    return model(torch.ones(2, 4, side, side), encoder_hidden_states=torch.ones(2, 3, 16),
                 pooled_projections=torch.ones(2, 8), timestep=torch.tensor([500, 500]), return_dict=False)[0]


def three_ranks(out_path: str) -> int:
    """Ulysses and ring on 3 ranks (ring shifts chained, heads and tokens split 3 ways): a tiny
    SD3 transformer with 6 heads on 12x12 latents (36 image tokens, 5 text tokens)."""
    launch.init_process_group("gloo")
    model = tiny_sd3(6).eval()
    generator = torch.Generator().manual_seed(1)
    x, text, pooled = (torch.randn(*shape, generator=generator) for shape in ((2, 4, 12, 12), (2, 5, 16), (2, 8)))

    @torch.no_grad()
    def run():
        return model(x, encoder_hidden_states=text, pooled_projections=pooled, timestep=torch.tensor([300, 700]),
                     return_dict=False)[0]

    found: dict = {}
    reference = run()
    for spec in ("ulysses", "ring"):
        record(found, spec, run, model, spec, reference)
    write_findings(found, out_path)
    return 0


def strategies(out_path: str) -> int:
    from cache_helpers import tiny_transformers
    from tiny_pipelines import build_tiny_pixart

    from sdinfer.pipeline import Pipeline

    info = launch.init_process_group("gloo")
    found: dict = {}
    dit, unet = Pipeline.from_pretrained("dit"), Pipeline.from_pretrained("unet")
    pixart = build_tiny_pixart()
    tiny_dit = tiny_transformers()[2][0]

    def generate(pipe, cfg=4.0):
        return lambda: pipe([PROMPT], steps=STEPS, sampler="ddim", guidance_scale=cfg).pixels

    def run_pixart():   # the first call's model output (random weights blow the latents up to ~700)
        outputs = []
        hook = pixart.transformer.register_forward_hook(lambda m, args, out: outputs.append(out[0]))
        try:
            pixart("a red circle", num_inference_steps=2, guidance_scale=4.0, output_type="latent",
                   use_resolution_binning=False, generator=torch.Generator().manual_seed(0))
        finally:
            hook.remove()
        return outputs[0]

    @torch.no_grad()
    def run_tiny_dit():
        return tiny_dit(torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
                        timestep=torch.tensor([10, 10]), class_labels=torch.tensor([1, 3]), return_dict=False)[0]

    cases = [("dit", dit, generate(dit), ("cfg", "ulysses", "ring"), dit.model.denoiser.transformer_blocks[0].ff),
             ("unet", unet, generate(unet), ("cfg",), unet.model.denoiser.conv_in),
             ("pixart", pixart, run_pixart, ("cfg", "ulysses", "ring"), pixart.transformer.transformer_blocks[0].ff),
             ("tiny-dit", tiny_dit, run_tiny_dit, ("ulysses", "ring"), tiny_dit.transformer_blocks[0].ff)]
    references = {}
    for name, target, run, specs, leaf in cases:
        references[name] = run()
        for spec in specs:
            record(found, f"{name}/{spec}", run, target, spec, references[name], leaf)
        found[f"{name}/restored"] = bool(torch.equal(run(), references[name]))

    single = torch.distributed.new_group([0]), torch.distributed.new_group([1])
    three_heads, two_heads = tiny_sd3(3), tiny_sd3(2)

    found["errors"] = {
        "ulysses on a UNet": error_of(lambda: apply(unet, "ulysses")),
        "ring on a UNet": error_of(lambda: apply(unet, "ring")),
        "ulysses with 3 heads on 2 ranks": error_of(lambda: apply(three_heads, "ulysses")),
        "ring with 9 tokens on 2 ranks": error_of(lambda: under(two_heads, "ring", lambda: call_sd3(two_heads, 6))),
        "cfg on 1 rank": error_of(lambda: apply(dit, "cfg", group=single[info.rank])),
        "cfg without guidance": error_of(lambda: under(dit, "cfg", generate(dit, cfg=1.0))),
        "unknown strategy": error_of(lambda: apply(dit, "tensorparallel")),
        "two strategies without cfg": error_of(lambda: apply(dit, "ulysses+ring")),
        "cfg+ulysses on 2 ranks": error_of(lambda: apply(dit, "cfg+ulysses")),
    }
    found["dit/restored after errors"] = bool(torch.equal(generate(dit)(), references["dit"]))
    write_findings(found, out_path)
    return 0


def four_ranks(out_path: str) -> int:
    """cfg+ulysses and cfg+ring (2 x 2) on the default DiT, cfg+asyncdiff with every step a
    warm-up step on the default UNet, 3 DDIM steps at cfg 4, against one device."""
    from sdinfer.pipeline import Pipeline

    launch.init_process_group("gloo")
    found: dict = {}
    for model, specs in (("dit", ("cfg+ulysses", "cfg+ring")), ("unet", (f"cfg+asyncdiff:warmup_steps={STEPS}",))):
        pipe = Pipeline.from_pretrained(model)
        reference = pipe([PROMPT], steps=STEPS, sampler="ddim", guidance_scale=4.0).pixels
        for spec in specs:
            record(found, f"{model}/{spec}", lambda: pipe([PROMPT], steps=STEPS, sampler="ddim",
                                                            guidance_scale=4.0).pixels, pipe, spec, reference,
                   pipe.model.denoiser.transformer_blocks[0].ff if model == "dit" else None)
    write_findings(found, out_path)
    return 0


def ditfastattn_plans(net, folder: str) -> tuple[str, str]:
    """A 10-step DiTFastAttn plan using every method, CFG sharing included, and the same plan with
    full or window attention in place of the CFG-shared entries: the files' paths."""
    from sdinfer.cache import ditfastattn as dfa

    units = [name for name, _ in dfa.self_attentions(net)]
    codes = [dfa.FULL, dfa.WINDOW_CFG, dfa.SHARE, dfa.FULL_CFG, dfa.WINDOW, dfa.SHARE, dfa.FULL, dfa.WINDOW_CFG,
             dfa.WINDOW, dfa.SHARE]
    shared = torch.tensor(codes, dtype=torch.int8)[:, None].expand(-1, len(units)).clone()
    plain = shared.clone()
    plain[plain == dfa.FULL_CFG], plain[plain == dfa.WINDOW_CFG] = dfa.FULL, dfa.WINDOW
    paths = []
    for name, methods in (("shared", shared), ("plain", plain)):
        plan = dfa.FastAttnPlan(methods, units, 64, 0.025, [272] * len(units), [96] * len(units),
                                [1] * len(units), denoiser=type(net).__name__)
        paths.append(str(dfa.save_plans(os.path.join(folder, f"ditfastattn-{name}.safetensors"), [plan])))
    return paths[0], paths[1]


def caches(out_path: str) -> int:
    """Data-dependent caches (their decisions summed over the ranks) and a scheduled one under
    cfg parallel and sequence parallelism, DDIM 10 steps on the default DiT and UNet."""
    from sdinfer import accelerate
    from sdinfer.pipeline import Pipeline

    launch.init_process_group("gloo")
    found: dict = {}
    pipes = {"dit": Pipeline.from_pretrained("dit"), "unet": Pipeline.from_pretrained("unet")}

    def generate(pipe):
        return pipe([PROMPT, "a blue square in the bottom right"], steps=10, sampler="ddim",
                    guidance_scale=4.0).pixels

    shared, plain = ditfastattn_plans(pipes["dit"].model.denoiser, os.path.dirname(out_path))
    cases = [("dit", "ulysses", "fbcache:threshold=0.12"), ("dit", "ring", "teacache:threshold=0.2"),
             ("dit", "cfg", "dbcache:threshold=0.12"), ("dit", "ulysses", "fora:interval=3"),
             ("unet", "cfg", "teacache:threshold=0.2"),
             ("dit", "cfg", f"ditfastattn:window_size=64,calibration={shared}"), ("unet", "cfg", "linfusion")]
    alone = {shared: plain}   # one device runs the plan without its CFG sharing, as each rank does
    for model, strategy, spec in cases:
        pipe = pipes[model]
        path = spec.partition("calibration=")[2]
        cached = accelerate(pipe, spec.replace(path, alone[path]) if path else spec)
        reference, calls = generate(pipe), None
        cached.remove()
        handle = apply(pipe, strategy)
        cached = accelerate(pipe, spec)
        try:
            out = generate(pipe)
            calls = dict(handle.comm.calls)
        finally:
            cached.remove()
            handle.remove()
        found[f"{model}/{strategy}/{spec.partition(',calibration')[0]}"] = {
            "max_abs_error": float((out - reference).abs().max()),
                                               "calls": calls}

    def combine(strategy, spec):
        handle = apply(pipes["dit"], strategy)
        try:
            accelerate(pipes["dit"], spec).remove()
        finally:
            handle.remove()

    def cache_then_strategy():
        cached = accelerate(pipes["dit"], "fora")
        try:
            apply(pipes["dit"], "ulysses").remove()
        finally:
            cached.remove()

    found["errors"] = {"tgate under cfg": error_of(lambda: combine("cfg", "tgate")),
                       "fora under asyncdiff": error_of(lambda: combine("asyncdiff", "fora")),
                       "strategy after a cache": error_of(cache_then_strategy)}
    write_findings(found, out_path)
    return 0


if __name__ == "__main__":
    mode, path = sys.argv[1:3]
    modes = {"strategies": strategies, "three": three_ranks, "four": four_ranks, "caches": caches}
    sys.exit(launch.run_rank(lambda: modes[mode](path) if mode in modes else fail(mode, path)))
