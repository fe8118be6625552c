"""The ``sdinfer`` command line: one module per command (generate, bench, models, calibrate,
train-default, tune), shared option helpers in ``options``.  Nothing is imported from torch, diffusers
or transformers until a command runs, so ``sdinfer --help`` and a bad flag answer at once."""

from __future__ import annotations

import argparse
import sys

from ..errors import UserError
from . import bench, calibrate, distill, generate, models, quantize, serve, train, tune
from .options import quiet_libraries as _quiet_libraries  # noqa: F401  (bench/ scripts and tests use it)

EXAMPLES = """\
examples:
  sdinfer generate "a red circle in the top left" -o out.png
  sdinfer generate "a blue square in the center" --model dit --steps 25 --cfg 4 --seed 3 -o sq.png
  sdinfer generate "a red circle in the top left" --device cuda --dtype float16 -o gpu.png
  sdinfer bench --model unet --steps 10,20 --prompts quick --json bench.json --plot bench.png
  sdinfer models
  sdinfer generate "a red circle in the top left" --accelerate deepcache:interval=3
  sdinfer generate "a red circle in the top left" --model dit --parallel ulysses --world-size 2
  sdinfer generate "a red circle in the top left" --parallel asyncdiff:stride=2 --world-size 3
  torchrun --nproc-per-node 2 -m sdinfer generate "a red circle" --model dit --parallel cfg
  sdinfer bench --model dit --accelerate fora:interval=2 --accelerate fora:interval=3
  sdinfer calibrate dpm-solver-v3 --model unet --cfg 4
  sdinfer calibrate teacache --model dit
  sdinfer train-default --arch unet
  sdinfer tune --model unet --budget adherence-drop=0.02 --out tuned-unet
  sdinfer generate "a red circle in the top left" --preset tuned-unet/preset.json
  sdinfer serve --model unet --port 8000
  sdinfer quantize --model dit --method lbq:weights=fp4,activations=fp8 --out dit-lbq-w4
  sdinfer generate "a red circle in the top left" --model dit-lbq-w4
"""


class _Commands(argparse._SubParsersAction):
    """The top-level commands; ``on_select[name](parser)`` completes a command's parser when it
    is chosen (``calibrate`` learns its cache procedures then, which needs torch)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.on_select = {}

    def __call__(self, parser, namespace, values, option_string=None):
        complete = self.on_select.pop(values[0], None) if values else None
        if complete is not None:
            complete(self._name_parser_map[values[0]])
        super().__call__(parser, namespace, values, option_string)


class _Parser(argparse.ArgumentParser):
    def _check_value(self, action, value):
        if isinstance(action, calibrate.Procedures):
            action.check(value)
        super()._check_value(action, value)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sdinfer", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate images with diffusion models faster, and measure by how much and "
                    "at what cost in quality. Runs offline on the shipped default models "
                    "(32x32 shapes, two of them also fine-tuned at 64x64) or on diffusers pipelines saved on disk.",
        epilog=EXAMPLES)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", action=_Commands)
    generate.add_parser(sub)
    bench.add_parser(sub)
    models.add_parser(sub)
    calibrate.add_parser(sub)
    sub.on_select["calibrate"] = calibrate.add_cache_procedures
    train.add_parser(sub)
    tune.add_parser(sub)
    serve.add_parser(sub)
    quantize.add_parser(sub)
    distill.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(calibrate.alias_argv(given))
        args.argv = given   # what --world-size's ranks re-run
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return args.func(args)
    except UserError as err:
        print(f"sdinfer: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdinfer: interrupted", file=sys.stderr)
        return 130
