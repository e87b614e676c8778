"""Silence third-party warnings that say nothing to a user of this package.

Once torchao (the ``[quant]`` extra) is installed, transformers imports it on every model
load, and on a CPU build of PyTorch that prints a warning for each CUDA-only library of
torchao that cannot load, plus torch's notice about torchao's enums, into every command's
output, and torchao's int8 kernels warn that Triton (a GPU compiler) is absent. Only those
messages are dropped, by a filter on the logger that emits each (a logger's filters do not
see what its children log, so each is named exactly), so anything else those libraries log
still shows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["NOISE", "dropped", "install_noise_filters"]

# (logger name, a fragment of each message dropped from it)
NOISE: tuple[tuple[str, str], ...] = (
    ("torchao", "Failed to load"),
    ("torchao.kernel.intmm", "Detected no triton"),
    ("torch.utils._pytree", "is an Enum subclass and is now natively supported"),
)


class _DropNoise(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def install_noise_filters() -> None:
    """Add the filters once (idempotent: a second call adds nothing)."""
    for name, fragment in NOISE:
        target = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) and f.fragment == fragment for f in target.filters):
            target.addFilter(_DropNoise(fragment))


@contextmanager
def dropped(name: str, fragment: str) -> Iterator[None]:
    """Drop logger ``name``'s messages containing ``fragment`` inside the block only: for a
    message that is noise in one call (a load that skips layers on purpose) but means
    something everywhere else."""
    target, drop = logging.getLogger(name), _DropNoise(fragment)
    target.addFilter(drop)
    try:
        yield
    finally:
        target.removeFilter(drop)
