"""What reading the safety gate costs on the llama.cpp path: on llama.cpp's own layers (the
decoder's way, front end = embedding table) against on a PyTorch front end holding the
layers up to the deepest gate layer (the way before ``acd_engine/backends/llamacpp/gate.py``).

Each way runs in a fresh process (its own peak RSS): load, one warm-up request, then
``--reps`` timed requests of the bench's user turn with the shipped pack and gate (the
default method), and ``--reps`` gate reads alone. Prints one JSON line per way.

    .venv/bin/python scripts/studies/llamacpp_gate_cost.py --reps 5

Needs the ``[llamacpp]`` extra. A one-off comparison for
docs/results/performance-history.md, not a test.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from importlib import resources
from typing import Literal


def measure(where: str, reps: int) -> dict[str, object]:
    """Run in this process: ``where`` is "llamacpp" or "engine"."""
    from acd_engine import Engine
    from acd_engine.backends.base import LlamaCppOptions
    from acd_engine.cli.bench import BENCH_USER
    from acd_engine.safety.prompts import SHIPPED_PACKS, PromptPack

    # the shipped gate's layers, read from the pack file (a second engine would cost memory)
    packs = resources.files("acd_engine") / "resources" / SHIPPED_PACKS
    (entry,) = [e for e in packs.iterdir() if e.name.endswith(".safetensors")]
    with resources.as_file(entry) as file:
        gate = PromptPack.load(file).gate
    assert gate is not None, "the shipped pack has a gate"
    keep = 0 if where == "llamacpp" else max(gate.layers) + 1
    gate_on: Literal["llamacpp", "engine"] = "llamacpp" if where == "llamacpp" else "engine"
    decoder = Engine(
        backend="llamacpp", keep_layers=keep, llamacpp=LlamaCppOptions(gate_on=gate_on)
    )
    cfg = decoder.defaults.replace(method="acd", max_new_tokens=64)
    msgs = [{"role": "user", "content": BENCH_USER}]
    decoder.generate(msgs, cfg)  # warm-up
    speeds, reads = [], []
    for _ in range(reps):
        t = time.perf_counter()
        out = decoder.generate(msgs, cfg)
        speeds.append(len(out.token_ids) / (time.perf_counter() - t))
        t = time.perf_counter()
        verdict = decoder.gate_verdict(msgs, cfg)
        reads.append(time.perf_counter() - t)
    assert verdict is not None
    return {
        "gate_on": where,
        "front_end_layers": keep,
        "tokens_per_s": round(statistics.median(speeds), 1),
        "gate_read_ms": round(1000 * statistics.median(reads), 1),
        "gate_score": round(verdict.score, 4),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--only", choices=["llamacpp", "engine"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        sys.stdout.write(json.dumps(measure(args.only, args.reps)) + "\n")
        return
    for where in ("llamacpp", "engine"):
        cmd = [sys.executable, __file__, "--reps", str(args.reps), "--only", where]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        sys.stdout.write(out.strip().splitlines()[-1] + "\n")


if __name__ == "__main__":
    main()
