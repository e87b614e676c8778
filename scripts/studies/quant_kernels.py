"""Time one linear layer per weight format on this CPU: which quantized kernel pays here?

``acd bench --quantize`` measures whole requests; this isolates the products behind them, on
the default model's shapes (SmolLM2-135M: hidden 576, MLP 1536, vocab 49152), for the row
counts decoding uses (1: plain, 2: ACD's two branches, 16: a short prefill). Whether a format
wins depends on the CPU's instructions (AVX-512 VNNI, AMX) and the PyTorch build, so run it
on the machine in question and compare within one run. It needs the ``[quant]`` extra
(torchao) and a machine that is otherwise idle.

    .venv/bin/python scripts/studies/quant_kernels.py --out runs/quant-kernels.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import benchmark

logging.basicConfig(level=logging.INFO, format="%(message)s")
log = logging.getLogger("quant_kernels")

SHAPES = {  # name: (out_features, in_features)
    "lm_head": (49152, 576),
    "mlp_up": (1536, 576),
    "mlp_down": (576, 1536),
}
ROWS = (1, 2, 16)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            wanted = ("avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
            have = set(line.split(":", 1)[1].split())
            return [f for f in wanted if f in have]
    return []


def torchao_linear(weight: torch.Tensor, scheme: str) -> torch.nn.Linear:
    """A linear layer holding ``weight``, quantized by torchao's ``scheme`` config."""
    import torchao.quantization as q

    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    lin.weight.data = weight.clone()
    if scheme == "int8_weight_only":
        cfg = q.Int8WeightOnlyConfig()
    elif scheme == "int8_dynamic":
        cfg = q.Int8DynamicActivationInt8WeightConfig()
    else:
        from torchao.prototype.quantization.int4.inference_workflow import (
            PrototypeInt4WeightOnlyConfig,
        )

        cfg = PrototypeInt4WeightOnlyConfig(group_size=32, set_inductor_config=False)
    q.quantize_(lin, cfg)
    return lin


def formats(weight: torch.Tensor) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Each format's product ``x [n, in] -> [n, out]`` over the same weight."""
    w_bf16 = weight.to(torch.bfloat16)
    scales = weight.abs().amax(dim=1) / 127  # per output row
    w_int8 = torch.round(weight / scales[:, None]).to(torch.int8)
    out: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "fp32": lambda x: F.linear(x, weight),
        "bf16": lambda x: F.linear(x.to(torch.bfloat16), w_bf16),
        # PyTorch's own int8 weight-only CPU kernel (private name; torchao calls it too)
        "int8pack_mm": lambda x: torch._weight_int8pack_mm(x, w_int8, scales),  # noqa: SLF001
    }
    for scheme in ("int8_weight_only", "int8_dynamic", "int4_tinygemm"):
        try:
            lin = torchao_linear(weight, scheme)
        except (ImportError, RuntimeError, NotImplementedError) as exc:  # reported, not fatal
            log.info("%s unavailable: %s", scheme, exc)
            continue
        out[f"torchao_{scheme}"] = lin
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--min-run-time", type=float, default=1.0, help="seconds per timing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = []
    with torch.inference_mode():
        for shape, (n_out, n_in) in SHAPES.items():
            weight = torch.randn(n_out, n_in) * n_in**-0.5
            for name, fn in formats(weight).items():
                for n in ROWS:
                    x = torch.randn(n, n_in)
                    err = (fn(x).float() - F.linear(x, weight)).abs().max().item()
                    t = benchmark.Timer("fn(x)", globals={"fn": fn, "x": x})
                    ms = t.blocked_autorange(min_run_time=args.min_run_time).median * 1e3
                    results.append(
                        {"shape": shape, "format": name, "rows": n, "ms": ms, "max_abs_err": err}
                    )
                    log.info("%-9s %-28s rows %2d  %8.3f ms  err %.2e", shape, name, n, ms, err)
    meta = {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "threads": args.threads,
        "torch": torch.__version__,
        "mkldnn_bf16": torch.backends.mkldnn.is_available(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": meta, "results": results}, indent=1) + "\n")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
