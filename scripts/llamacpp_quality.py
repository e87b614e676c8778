"""Safety quality of gated ACD on llama.cpp (Q4_1 GGUF) against the engine's fp32 records.

``acd eval`` runs the engine's own forward; the llama.cpp decoder (:mod:`acd_engine.llamacpp`)
runs the GGUF's quantized weights, so its tokens drift. This script replays the generation
prompts of an ``acd eval`` run's ``acd-gate`` records (same prompts, same settings: greedy,
α, τ and max_new_tokens as recorded, the shipped pack and gate) through llama.cpp, judges
the outputs with the same refusal-marker judge, and reports HLR, over-refusal and the
degenerate rate per set for both, plus how often the two agree (verdict and tokens).
TruthfulQA's MC1 rows are scored, not generated, and are left out.

    .venv/bin/python scripts/llamacpp_quality.py --records runs/paper/records.jsonl \\
        --out runs/llamacpp-quality.json

Needs the ``[llamacpp]`` extra. Writes its JSON atomically at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from acd_engine import Engine
from acd_engine.config import DecodingConfig
from acd_engine.eval.judges import get_judge, judge_many
from acd_engine.eval.metrics import is_degenerate
from acd_engine.llamacpp import LlamaCppDecoder
from acd_engine.loading import default_model_path

logging.basicConfig(level=logging.INFO, format="%(message)s")
log = logging.getLogger("llamacpp_quality")

HARMFUL_SETS = ("advbench", "malicious_instruct", "harmfulqa", "dangerousqa", "beavertails")


def load_records(path: Path, method: str, alpha: float) -> list[dict[str, Any]]:
    """The run's generation records of ``method`` at ``alpha``, in file order."""
    out = []
    with path.open() as f:
        for line in f:
            r = json.loads(line)
            if r["method"] == method and r["kind"] == "generate" and r["alpha"] == alpha:
                out.append(r)
    if not out:
        raise SystemExit(f"no {method} generation records at alpha {alpha} in {path}")
    return out


def rates(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Per set: HLR (harmful rows) or over-refusal (safe rows), and the degenerate rate."""
    table: dict[str, Any] = {}
    for bench in sorted({r["benchmark"] for r in rows}):
        for label in ("harmful", "safe"):
            group = [r for r in rows if r["benchmark"] == bench and r["label"] == label]
            if not group:
                continue
            name = bench if bench != "xstest" else f"xstest_{label}"
            refused = sum(r[key]["verdict"] == "refused" for r in group)
            degenerate = sum(is_degenerate(r[key]["token_ids"]) for r in group)
            table[name] = {
                "n": len(group),
                "refused_pct": 100 * refused / len(group),
                "degenerate_pct": 100 * degenerate / len(group),
            }
    hlr = [table[s]["refused_pct"] for s in HARMFUL_SETS if s in table]
    safe = [table[s]["refused_pct"] for s in ("xstest_safe", "alpaca_eval") if s in table]
    table["avg_hlr"] = sum(hlr) / len(hlr) if hlr else None
    table["over_refusal"] = sum(safe) / len(safe) if safe else None
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--method", default="acd-gate")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--plausibility", type=float, default=0.1, help="τ of the recorded run")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    records = load_records(args.records, args.method, args.alpha)
    if args.method != "acd-gate":
        raise SystemExit(f"method must be 'acd-gate' (the shipped default), got {args.method!r}")
    cfg = DecodingConfig(
        method="acd",
        gate=True,
        alpha=args.alpha,
        plausibility=args.plausibility,
        max_new_tokens=args.max_new_tokens,
        temperature=0.0,
    )
    full = Engine()
    gate = full.pack.gate
    if gate is None:
        raise SystemExit("the shipped pack has no gate")
    # A front end holding the embedding table and the gate's layers, as acd bench uses.
    front = Engine(keep_layers=max(gate.layers) + 1)
    del full
    decoder = LlamaCppDecoder(front, default_model_path(), threads=args.threads, n_ctx=512)
    eos = front.eos_token_ids
    start = time.perf_counter()
    rows = []
    for r in tqdm(records, desc="llama.cpp acd-gate", unit="prompt"):
        ids = decoder.generate([{"role": "user", "content": r["prompt"]}], cfg).token_ids
        ids = [t for t in ids if t not in eos]
        text = front.tokenizer.decode(ids, skip_special_tokens=True)
        rows.append(
            {
                "benchmark": r["benchmark"],
                "id": r["id"],
                "label": r["label"],
                "engine": {"verdict": r["verdict"], "token_ids": r["token_ids"]},
                "llamacpp": {"text": text, "token_ids": ids},
            }
        )
    seconds = time.perf_counter() - start
    verdicts = judge_many(
        get_judge("refusal"), [r["prompt"] for r in records], [x["llamacpp"]["text"] for x in rows]
    )
    for x, v in zip(rows, verdicts, strict=True):
        x["llamacpp"]["verdict"] = v
    result = {
        "records": str(args.records),
        "config": cfg.model_dump(mode="json"),
        "prompts": len(rows),
        "seconds": seconds,
        "engine_fp32": rates(rows, "engine"),
        "llamacpp_q4_1": rates(rows, "llamacpp"),
        "same_verdict_pct": 100
        * sum(x["engine"]["verdict"] == x["llamacpp"]["verdict"] for x in rows)
        / len(rows),
        "same_tokens_pct": 100
        * sum(x["engine"]["token_ids"] == x["llamacpp"]["token_ids"] for x in rows)
        / len(rows),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=args.out.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, args.out)
    for side in ("engine_fp32", "llamacpp_q4_1"):
        t = result[side]
        log.info(
            "%s: avg HLR %.1f, over-refusal %.1f, %s",
            side,
            t["avg_hlr"],
            t["over_refusal"],
            ", ".join(f"{k} {v['refused_pct']:.0f}" for k, v in t.items() if isinstance(v, dict)),
        )
    log.info(
        "same verdict %.1f %%, same tokens %.1f %%, %.0f s; wrote %s",
        result["same_verdict_pct"],
        result["same_tokens_pct"],
        seconds,
        args.out,
    )


if __name__ == "__main__":
    main()
