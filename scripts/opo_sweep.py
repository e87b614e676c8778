"""OPO experiments on the anchor validation split (never on the benchmarks).

Two subcommands, both resumable (results are appended as JSON lines and skipped when present):

    # train one pack per named setting (TrainConfig fields as JSON)
    python scripts/opo_sweep.py train RUN_DIR NAME '{"lr": 0.003}'

    # greedy-decode the validation split under baselines and packs, judge, tabulate
    python scripts/opo_sweep.py eval RUN_DIR --packs NAME[,NAME] --grid "0.5:0.3,0.5:0.1"

    # print the markdown tables of everything measured so far
    python scripts/opo_sweep.py table RUN_DIR

Each evaluated setting records harmful refusal, benign answer rate (plain / lookalike) and
the responses, in RUN_DIR/results.jsonl. Threads default to 1: on a shared 2-core machine one
thread per process is ~2x faster than two contended ones.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("opo_sweep")


def _engine(threads: int) -> Any:
    import torch

    from acd_engine import get_engine

    torch.set_num_threads(threads)
    return get_engine()


def cmd_train(args: argparse.Namespace) -> None:
    from acd_engine.training.config import TrainConfig
    from acd_engine.training.run import train_pack

    engine = _engine(args.threads)
    cfg = TrainConfig(**json.loads(args.settings))
    out = Path(args.run_dir) / f"{args.name}.safetensors"
    start = time.perf_counter()
    result = train_pack(engine, cfg, out, resume=True)
    logger.info(
        "%s: %.0fs wall, report %s",
        args.name,
        time.perf_counter() - start,
        json.dumps(
            {
                k: result.report[k]
                for k in ("split_sizes", "fallback", "selected_epoch", "train_seconds")
            }
        ),
    )


def _done(path: Path) -> set[str]:
    if not path.exists():
        return set()
    return {json.loads(line)["setting"] for line in path.read_text().splitlines() if line.strip()}


def cmd_eval(args: argparse.Namespace) -> None:
    from acd_engine.config import DecodingConfig
    from acd_engine.eval.judges import get_judge
    from acd_engine.prompts import PromptPack
    from acd_engine.training.anchors import load_anchors
    from acd_engine.training.evaluate import evaluate_anchors

    engine = _engine(args.threads)
    run_dir = Path(args.run_dir)
    results = run_dir / "results.jsonl"
    done = _done(results)
    anchors = load_anchors("val")
    judge = get_judge(args.judge)
    n = args.max_new_tokens
    jobs: list[tuple[str, DecodingConfig, PromptPack | None]] = []
    for method in filter(None, args.baselines.split(",")):
        jobs.append((method, DecodingConfig(method=method, max_new_tokens=n), None))
    grid = [tuple(float(x) for x in g.split(":")) for g in filter(None, args.grid.split(","))]
    for name in filter(None, args.packs.split(",")):
        path = Path(name) if name.endswith(".safetensors") else run_dir / f"{name}.safetensors"
        pack = PromptPack.load(path)
        label = path.stem
        if args.sp_alone:
            jobs.append(
                (f"{label}|sp", DecodingConfig(method="acd", alpha=0.0, max_new_tokens=n), pack)
            )
        for alpha, tau in grid:
            cfg = DecodingConfig(method="acd", alpha=alpha, plausibility=tau, max_new_tokens=n)
            jobs.append((f"{label}|acd a={alpha} t={tau}", cfg, pack))
    for setting, cfg, pack in jobs:
        if setting in done:
            continue
        start = time.perf_counter()
        metrics = evaluate_anchors(
            engine, anchors, cfg, judge, pack=pack, batch_size=args.batch_size
        )
        metrics["seconds"] = time.perf_counter() - start
        row = {"setting": setting, "config": cfg.model_dump(mode="json"), **metrics}
        with results.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        logger.info(
            "%-32s refusal %.3f  benign answer %.3f (plain %.3f, lookalike %.3f)  %.0fs",
            setting,
            metrics["harmful_refusal"],
            metrics["benign_answer"],
            metrics["plain_answer"],
            metrics["lookalike_answer"],
            metrics["seconds"],
        )


def cmd_table(args: argparse.Namespace) -> None:
    results = Path(args.run_dir) / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    lines = [
        "| setting | harmful refusal | benign answer | plain answer | lookalike answer | over-refusal |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['harmful_refusal']:.3f} | {r['benign_answer']:.3f} | "
            f"{r['plain_answer']:.3f} | {r['lookalike_answer']:.3f} | {r['over_refusal']:.3f} |"
        )
    sys.stdout.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("run_dir")
    t.add_argument("name")
    t.add_argument("settings", nargs="?", default="{}")
    e = sub.add_parser("eval")
    e.add_argument("run_dir")
    e.add_argument("--baselines", default="")
    e.add_argument("--packs", default="")
    e.add_argument("--grid", default="0.5:0.3")
    e.add_argument("--sp-alone", action="store_true")
    e.add_argument("--max-new-tokens", type=int, default=32)
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--judge", default="refusal")
    tb = sub.add_parser("table")
    tb.add_argument("run_dir")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr
    )
    {"train": cmd_train, "eval": cmd_eval, "table": cmd_table}[args.cmd](args)


if __name__ == "__main__":
    main()
