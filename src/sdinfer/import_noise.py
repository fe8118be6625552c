"""Drop the warnings torchao's import logs on a CPU build, and only those.

With torchao installed, diffusers imports it when a model class is first used; on a machine
without CUDA torchao logs "Failed to load .../_C_*.so" for each CUDA extension, torch logs that
two of its enums "are now natively supported by torch.compile", and diffusers that it is "Unable
to import `torchao` Tensor objects" (classes this torchao release moved).  None of them concerns
what sdinfer runs, and they would bury a command's one-line error.  A filter on each of those
loggers drops records matching these messages; every other record passes.  Standard library only,
so ``import sdinfer`` stays fast.
"""

from __future__ import annotations

import logging

NOISE = {
    "torchao": ("Failed to load ",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported by torch.compile",),
    "diffusers.quantizers.torchao.torchao_quantizer": ("Unable to import `torchao` Tensor objects",),
}


class _DropNoise(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not any(fragment in message for fragment in self.fragments)


def install() -> None:
    for name, fragments in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise(fragments))
