"""``sdinfer quantize --model NAME|PATH --method SPEC --out DIR``: calibrate and quantize a
model's denoiser and write a pipeline folder that ``--model DIR`` loads anywhere."""

from __future__ import annotations

import json

from ..errors import UserError
from .options import MODEL_HELP, whole_number

METHOD_HELP = ("method and settings: rtn:weights=int8|int4|int2[,activations=int8|fp8], "
               "lbq:weights=fp8|fp6|fp4[,activations=fp8|''], tfm-ptq:weights=int8|int4, vq4dit:bits=2|3")


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model's denoiser (LBQ, TFM-PTQ, VQ4DiT, RTN) into a new folder",
                       description="Calibrate a quantization method on the model's own sampling trajectories "
                                   "(training captions, seeded) and write the quantized pipeline folder: packed "
                                   "codes, scales and codebooks in safetensors, with the method in its metadata.")
    p.add_argument("--model", default="default", help=MODEL_HELP)
    p.add_argument("--method", required=True, help=METHOD_HELP)
    p.add_argument("--out", required=True, help="the new folder to write (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it holds files")
    p.add_argument("--calibration-prompts", type=whole_number, default=8,
                   help="training captions whose trajectories calibrate (default: 8)")
    p.add_argument("--calibration-steps", type=whole_number, default=20,
                   help="DDIM steps per calibration trajectory (default: 20)")
    p.add_argument("--cfg", type=float, default=4.0, help="guidance scale of the calibration runs (default: 4)")
    p.add_argument("--seed", type=whole_number, default=None, help="calibration seed (default: 31337)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..pipeline import Pipeline
    from ..quant import CalibrationConfig, parse_spec, quantize
    from ..quant.calibration import CALIBRATION_SEED
    from .options import quiet_libraries

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a new folder")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"--out {out} exists and is not empty; give a new folder (or --overwrite to replace it)")
    config = parse_spec(args.method)          # a bad spec fails before the model loads
    calibration = CalibrationConfig(prompts=args.calibration_prompts, steps=args.calibration_steps,
                                    guidance_scale=args.cfg,
                                    seed=CALIBRATION_SEED if args.seed is None else args.seed)
    quiet_libraries()
    pipe = Pipeline.from_pretrained(args.model)
    handle = quantize(pipe, config, calibration)
    handle.save(out, source=pipe.model.path, overwrite=args.overwrite)
    print(json.dumps(handle.summary(), indent=1))
    print(f"wrote {out}")
    return 0
