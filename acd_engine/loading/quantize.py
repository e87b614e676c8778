"""Weight-only quantization of a loaded model's linear layers, through torchao.

Batch-1 decoding reads every weight once per token, so on a CPU its speed is bounded by
memory bandwidth and its footprint by the weights: a 7-8B model in fp32 (~32 GB) does not
fit a 24 GB machine at all. ``--quantize int8`` stores each linear weight as int8 with one
scale per output row; ``int4`` as 4-bit groups of :data:`INT4_GROUP` input columns with a
scale and zero point each (the default model ships as Q4_1, whose blocks are 32 wide too,
so re-quantizing its dequantized weights loses almost nothing). The embedding table, the
norms, the soft prompts, the prefix KV cache, the contrast and the grammar stay as they are:
only ``nn.Linear`` weights change, which is what torchao's ``quantize_`` does.

Which kernels run: torchao's int8 weight-only tensor casts the weight to the activation
dtype inside its ``linear`` (a fused kernel needs ``torch.compile``); its CPU int4 tensor
calls PyTorch's tinygemm CPU kernel (``_weight_int4pack_mm_for_cpu``). Whether either is
faster than fp32 depends on the CPU and the PyTorch build, so the speed is measured in
``acd bench --quantize``, never assumed (docs/performance.md has the figures). The
engine's own CPU matmul modes (:mod:`acd_engine.backends.torch.skinny`, :mod:`acd_engine.backends.torch.prepack`) work on
plain weights only, so they stand aside on a quantized model.
"""

from __future__ import annotations

import ctypes
import gc
import logging
from collections.abc import Callable
from typing import Any, Protocol, cast

import torch

from acd_engine.config import Quantize
from acd_engine.errors import ConfigError
from acd_engine.install import pip_install_extra

__all__ = [
    "INT4_GROUP",
    "is_quantized",
    "quantize_linear",
    "quantize_model",
    "quantized_bytes",
]

logger = logging.getLogger(__name__)

INT4_GROUP = 32  # input columns per int4 scale/zero: GGUF Q4_0/Q4_1 blocks are 32 wide too


def _torchao() -> Any:
    """Import torchao quietly, or say how to install it.

    torchao's wheels carry CUDA kernels for specific PyTorch builds; on a CPU build it logs
    a warning per library it cannot load, which is noise here (the CPU paths need none).
    """
    ao_logger = logging.getLogger("torchao")
    level = ao_logger.level
    ao_logger.setLevel(logging.ERROR)
    try:
        import torchao  # noqa: F401
        import torchao.quantization as quantization
    except ImportError as exc:
        raise ConfigError(
            f"quantize needs torchao: {pip_install_extra('quant')} (or pip install torchao)"
        ) from exc
    finally:
        ao_logger.setLevel(level)
    return quantization


def _config(scheme: Quantize) -> Any:
    """torchao's config object for ``scheme`` on CPU."""
    quantization = _torchao()
    if scheme == "int8":
        return quantization.Int8WeightOnlyConfig()  # per output row
    from torchao.prototype.quantization.int4.inference_workflow import (
        PrototypeInt4WeightOnlyConfig,
    )

    # The CPU int4 layout (tinygemm's CPU packing); torchao's stable Int4WeightOnlyConfig
    # targets CUDA kernels.
    return PrototypeInt4WeightOnlyConfig(group_size=INT4_GROUP, set_inductor_config=False)


def is_quantized(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is a quantized tensor subclass rather than plain floats."""
    return type(weight) not in (torch.Tensor, torch.nn.Parameter)


def _fits(scheme: Quantize, module: torch.nn.Module) -> bool:
    if not isinstance(module, torch.nn.Linear) or is_quantized(module.weight):
        return False
    return scheme != "int4" or module.in_features % INT4_GROUP == 0


def quantize_linear(module: torch.nn.Linear, scheme: Quantize) -> bool:
    """Quantize one linear layer in place; False when its shape does not allow ``scheme``.

    For building large random-weight models layer by layer: each fp32 weight exists only
    until its own layer is quantized, so an 8B model never needs its 32 GB fp32 copy.
    """
    if scheme == "none" or not _fits(scheme, module):
        return False
    _torchao().quantize_(module, _config(scheme))
    return True


def _release_freed_memory() -> None:
    """Hand the freed fp32 weights back to the OS.

    glibc keeps freed blocks in its arenas, so the process would go on holding the fp32
    copy's size after quantizing it (measured: 942 MiB RSS for the int8 default model,
    619 MiB after trimming). ``malloc_trim`` exists on glibc only; elsewhere this is a no-op.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        logger.debug("malloc_trim unavailable; freed memory stays with the allocator")


def quantize_model(
    model: torch.nn.Module,
    scheme: Quantize,
    device: torch.device,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Quantize every ``nn.Linear`` of ``model`` in place (the LM head too); return how many.

    A head tied to the input embeddings gets its own quantized weight; the embedding table
    stays in floats (soft prompts live in its space). Layers whose width the scheme cannot
    group stay in floats and are logged.

    Raises:
        ConfigError: ``int4`` off the CPU (torchao's CPU int4 layout is what is wired here).
    """
    if scheme == "none":
        return 0
    if scheme == "int4" and device.type != "cpu":
        raise ConfigError(
            f"quantize int4 runs on the CPU only in this release, got device {device.type!r}; "
            "use quantize='int8' or a bfloat16 model there"
        )
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    done = 0
    skipped: list[str] = []
    for i, module in enumerate(linears):
        if quantize_linear(module, scheme):
            done += 1
        else:
            skipped.append(f"{module.in_features}x{module.out_features}")
        if progress is not None:
            progress(i + 1, len(linears))
    # transformers loads safetensors as views of the file's memory map. Every page of it
    # was read while quantizing, and one float tensor still viewing it (the embedding
    # table) would keep the whole fp32 file resident: give the float tensors that remain
    # their own memory, so the map (and the fp32 weights with it) is released.
    for param in model.parameters():
        if not is_quantized(param):
            param.data = param.data.clone()
    _release_freed_memory()
    if skipped:
        logger.info("%d linear layers stay in floats for %s: %s", len(skipped), scheme, skipped)
    logger.info("quantized %d linear layers to %s", done, scheme)
    return done


class _Traceable(Protocol):
    """torch's traceable tensor subclass protocol, which torchao's quantized weights
    implement: the names of the plain tensors a subclass holds, and its metadata."""

    def __tensor_flatten__(self) -> tuple[list[str], Any]: ...


def quantized_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's parameters and buffers hold, quantized ones at their packed size."""
    total = 0
    seen: set[int] = set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if is_quantized(tensor):
            inner, _ = cast(_Traceable, tensor).__tensor_flatten__()  # a torchao subclass
            total += sum(
                t.numel() * t.element_size()
                for name in inner
                if (t := getattr(tensor, name)) is not None
            )
        else:
            total += tensor.numel() * tensor.element_size()
    return total
