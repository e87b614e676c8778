"""The paper protocol on the llama.cpp backend: gated ACD on the Q4_1 GGUF, judged as on torch.

An engine on the llama.cpp backend (``get_engine(backend="llamacpp")``) is an ``acd eval``
model like any engine, so this is ``acd eval --backend llamacpp`` with the settings of
``scripts/paper_eval.sh`` (100 seeded prompts per set, greedy, 48 new tokens, τ 0.1, α 0.5,
the refusal-marker judge, the shipped pack and gate, the gate read from llama.cpp's own
layers): the same report, with HLR, over-refusal, TruthfulQA MC1, degenerate outputs and
the gate's flag rates. The run directory pins the backend ("model backend": llamacpp), so
it never mixes with the torch backend's records, and it resumes like any ``acd eval`` run.

With ``--compare`` (an engine run's ``records.jsonl`` with the same settings), it also says
how often the two paths give the same verdict and the same tokens on the same prompt.

    .venv/bin/python scripts/llamacpp_quality.py --out runs/llamacpp-paper \\
        --compare runs/paper/records.jsonl

Needs the ``[llamacpp]`` extra.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from acd_engine import get_engine
from acd_engine.backends.base import LlamaCppOptions
from acd_engine.eval.registry import BENCHMARKS
from acd_engine.eval.runner import EvalOptions, run_eval

logging.basicConfig(level=logging.INFO, format="%(message)s")
log = logging.getLogger("llamacpp_quality")


def agreement(ours: Path, theirs: Path, method: str = "acd-gate") -> dict[str, float | int]:
    """Share of prompts (generations of ``method``) with the same verdict and tokens."""

    def load(path: Path) -> dict[tuple[str, str, float | None], dict[str, object]]:
        out = {}
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r["method"] == method and r["kind"] == "generate":
                out[(r["benchmark"], r["id"], r["alpha"])] = r
        return out

    a, b = load(ours), load(theirs)
    common = sorted(set(a) & set(b))
    if not common:
        raise SystemExit(f"no {method} generations in common between {ours} and {theirs}")
    return {
        "prompts": len(common),
        "same_verdict_pct": 100
        * sum(a[k]["verdict"] == b[k]["verdict"] for k in common)
        / len(common),
        "same_tokens_pct": 100
        * sum(a[k]["token_ids"] == b[k]["token_ids"] for k in common)
        / len(common),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="the acd eval run directory")
    ap.add_argument("--compare", type=Path, help="an engine run's records.jsonl")
    ap.add_argument("--methods", default="acd-gate")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    options = EvalOptions(
        methods=tuple(args.methods.split(",")),
        alphas=(0.5,),
        benchmarks=tuple(BENCHMARKS),  # the paper's sets, as scripts/paper_eval.sh runs
        limit=args.limit,
        max_new_tokens=48,
        batch_size=8,
        plausibility=0.1,
        out_dir=args.out,
        progress=True,
    )
    # the engine holds the embedding table only; llama.cpp runs every forward of the
    # method, the gate's included
    engine = get_engine(backend="llamacpp", llamacpp=LlamaCppOptions(threads=args.threads))
    summary = run_eval(engine, options)
    log.info("wrote %s (model %s)", args.out / "report.md", summary.model_name)
    if args.compare is not None:
        result = agreement(args.out / "records.jsonl", args.compare)
        (args.out / "agreement.json").write_text(json.dumps(result, indent=1) + "\n")
        log.info("agreement with %s: %s", args.compare, result)


if __name__ == "__main__":
    main()
