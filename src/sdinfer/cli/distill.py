"""``sdinfer distill PROCEDURE``: train what makes one model evaluation cheaper from the model
itself (resumable and seeded like ``train-default``), saved beside the model.

One subcommand per procedure, each a module of this package with its own ``add_parser``."""

from __future__ import annotations

from . import distill_early_exit, distill_linfusion

PROCEDURES: tuple = (distill_linfusion, distill_early_exit)   # the cli modules of the procedures, each with add_parser(subparsers)


def add_parser(sub) -> None:
    d = sub.add_parser("distill", help="train a model's cheaper variant from the model itself (resumable)",
                       description="Train the modules or fine-tuned weights of a cheaper variant of a model "
                                   "by distillation from the model; saved beside the model for --accelerate.")
    procedures = d.add_subparsers(dest="procedure", metavar="PROCEDURE")
    for module in PROCEDURES:
        module.add_parser(procedures)
