"""`acd`: generate, compare, chat (and the long jobs: train, eval, bench).

Heavy modules (torch, transformers) are imported inside the commands so ``acd --help``
answers instantly. Errors the user can fix are printed to stderr as one line, exit code 2.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

app = typer.Typer(
    name="acd",
    help="Adversarial Contrastive Decoding: safer answers from local chat models, offline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

T = TypeVar("T")

ModelOpt = Annotated[
    str | None,
    typer.Option("--model", help="Local HF model dir or .gguf file (default: embedded SmolLM2)."),
]
PackOpt = Annotated[
    str | None, typer.Option("--pack", help="Prompt pack .safetensors for method acd.")
]
MethodOpt = Annotated[
    str, typer.Option("--method", "-m", help="plain | base | nid | oid | acd | custom")
]
AlphaOpt = Annotated[float, typer.Option("--alpha", "-a", help="Contrast strength in [0, 1).")]
MaxTokOpt = Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate.")]
TempOpt = Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy.")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Nucleus mass (sampling only).")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Sampling seed.")]
TauOpt = Annotated[
    float, typer.Option("--plausibility", help="Plausibility constraint tau in [0, 1); 0 = off.")
]
SystemOpt = Annotated[
    str | None, typer.Option("--system", "-s", help="Your own system message (kept).")
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log progress to stderr.")]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:  # transformers' own progress bars and notices are noise here
        import os

        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _run(fn: Callable[[], T]) -> T:
    """Turn the package's own errors into one clean stderr line and exit code 2."""
    from acd_engine.errors import ACDError

    try:
        return fn()
    except ACDError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _messages(prompt: str, system: str | None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    return [*msgs, {"role": "user", "content": prompt}]


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The user message.")],
    method: MethodOpt = "acd",
    alpha: AlphaOpt = 0.5,
    max_new_tokens: MaxTokOpt = 128,
    temperature: TempOpt = 0.0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = None,
    plausibility: TauOpt = 0.0,
    system: SystemOpt = None,
    model: ModelOpt = None,
    pack: PackOpt = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the GenerationResult as one JSON object.")
    ] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Answer one prompt with one method."""
    _setup_logging(verbose)

    def go() -> None:
        from acd_engine.config import DecodingConfig
        from acd_engine.engine import get_engine

        cfg = DecodingConfig(
            method=method,
            alpha=alpha,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            plausibility=plausibility,
        )
        engine = get_engine(model, pack=pack)
        result = engine.generate(_messages(prompt, system), cfg)
        if as_json:
            typer.echo(json.dumps(result.model_dump(), ensure_ascii=False))
        else:
            typer.echo(result.text)

    _run(go)


@app.command()
def compare(
    prompts: Annotated[list[str], typer.Argument(help="One or more user messages.")],
    methods: Annotated[
        str, typer.Option("--methods", help="Comma-separated methods to compare.")
    ] = "plain,base,oid,acd",
    alpha: AlphaOpt = 0.5,
    max_new_tokens: MaxTokOpt = 48,
    plausibility: TauOpt = 0.0,
    model: ModelOpt = None,
    pack: PackOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print results as JSON.")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """The same prompts under several methods, side by side, with timings."""
    _setup_logging(verbose)

    def go() -> None:
        from rich.console import Console
        from rich.table import Table

        from acd_engine.config import DecodingConfig
        from acd_engine.engine import get_engine

        names = [m.strip() for m in methods.split(",") if m.strip()]
        configs = [
            DecodingConfig(
                method=m, alpha=alpha, max_new_tokens=max_new_tokens, plausibility=plausibility
            )
            for m in names
        ]
        engine = get_engine(model, pack=pack)
        console = Console(stderr=False, width=max(Console().width, 120))
        rows: list[dict[str, Any]] = []
        for prompt in prompts:
            table = Table(title=f"[bold]{prompt}[/bold]", show_lines=True, expand=True)
            table.add_column("method", no_wrap=True)
            table.add_column("tok/s", justify="right", no_wrap=True)
            table.add_column("answer", ratio=1)
            for cfg in configs:
                start = time.perf_counter()
                out = engine.generate(prompt, cfg)
                secs = time.perf_counter() - start
                tps = len(out.token_ids) / secs if secs > 0 else 0.0
                rows.append(
                    {"prompt": prompt, **out.model_dump(), "seconds": secs, "tokens_per_s": tps}
                )
                label = cfg.method if not cfg.is_contrastive else f"{cfg.method} α={cfg.alpha}"
                table.add_row(label, f"{tps:.1f}", out.text.strip() or "[dim](empty)[/dim]")
            if not as_json:
                console.print(table)
        if as_json:
            typer.echo(json.dumps(rows, ensure_ascii=False))
        else:
            by_method: dict[str, list[float]] = {}
            for r in rows:
                by_method.setdefault(r["method"], []).append(r["tokens_per_s"])
            summary = ", ".join(f"{m} {sum(v) / len(v):.1f} tok/s" for m, v in by_method.items())
            console.print(f"[dim]{engine.model_name} on {engine.device}: {summary}[/dim]")

    _run(go)


@app.command()
def chat(
    method: MethodOpt = "acd",
    alpha: AlphaOpt = 0.5,
    max_new_tokens: MaxTokOpt = 256,
    temperature: TempOpt = 0.0,
    system: SystemOpt = None,
    model: ModelOpt = None,
    pack: PackOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Interactive chat with streaming output. Empty line or Ctrl-D quits."""
    _setup_logging(verbose)

    def go() -> None:
        from acd_engine.config import DecodingConfig
        from acd_engine.engine import get_engine

        cfg = DecodingConfig(
            method=method, alpha=alpha, max_new_tokens=max_new_tokens, temperature=temperature
        )
        engine = get_engine(model, pack=pack)
        history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        typer.echo(f"{engine.model_name} · method {cfg.method} · empty line quits")
        while True:
            try:
                line = input("you> ").strip()
            except (EOFError, KeyboardInterrupt):
                break
            if not line:
                break
            history.append({"role": "user", "content": line})
            typer.echo("acd> ", nl=False)
            parts = []
            for delta in engine.stream(history, cfg):
                parts.append(delta)
                typer.echo(delta, nl=False)
            typer.echo("")
            history.append({"role": "assistant", "content": "".join(parts)})

    _run(go)


@app.command("eval")
def eval_command(
    methods: Annotated[
        str, typer.Option("--methods", help="Comma-separated: plain,base,nid,oid,acd,custom.")
    ] = "plain,base,nid,oid,acd",
    alphas: Annotated[
        str, typer.Option("--alphas", help="Comma-separated alphas for contrast methods.")
    ] = "0.5",
    benchmarks: Annotated[
        str,
        typer.Option(
            "--benchmarks",
            help="Comma-separated names (advbench, malicious_instruct, harmfulqa, dangerousqa, "
            "beavertails, xstest, alpaca_eval, truthfulqa) or .jsonl paths.",
        ),
    ] = "advbench,malicious_instruct,harmfulqa,dangerousqa,beavertails",
    limit: Annotated[int, typer.Option("--limit", help="Prompts per benchmark (seeded).")] = 100,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the per-benchmark sample.")] = 0,
    data_dir: Annotated[
        str | None, typer.Option("--data-dir", help="Folder with <name>.jsonl benchmark files.")
    ] = None,
    out: Annotated[
        str, typer.Option("--out", help="Output folder; rerun with the same folder to resume.")
    ] = "runs/eval",
    max_new_tokens: MaxTokOpt = 64,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts per batch.")] = 8,
    plausibility: Annotated[
        float,
        typer.Option(
            "--plausibility",
            help="Plausibility tau for contrast methods (0.1: the shipped pack's anchor-split "
            "choice; 0: raw contrast).",
        ),
    ] = 0.1,
    judge: Annotated[
        str, typer.Option("--judge", help="refusal (marker match), hf or openai.")
    ] = "refusal",
    judge_model: Annotated[
        str | None,
        typer.Option(
            "--judge-model", help="hf: a local model dir or .gguf; openai: the model name."
        ),
    ] = None,
    judge_url: Annotated[
        str | None,
        typer.Option("--judge-url", help="openai: the endpoint, e.g. http://localhost:8000/v1."),
    ] = None,
    model: ModelOpt = None,
    pack: PackOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """The paper's safety evaluation: resumable, with summary.json, report.md and plots."""
    _setup_logging(verbose)

    def go() -> None:
        from pathlib import Path

        from acd_engine.engine import get_engine
        from acd_engine.eval.judges import get_judge
        from acd_engine.eval.runner import EvalOptions, run_eval

        options = EvalOptions(
            methods=methods,
            alphas=alphas,
            benchmarks=benchmarks,
            limit=limit,
            seed=seed,
            data_dir=Path(data_dir) if data_dir else None,
            out_dir=Path(out),
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            plausibility=plausibility,
            judge=judge,
            progress=True,
        )
        judge_options: dict[str, Any] = {}
        if judge == "hf":
            judge_options = {"model": judge_model}
        elif judge == "openai":
            judge_options = {"url": judge_url, "model": judge_model}
        judge_obj = get_judge(judge, **judge_options)
        run_eval(get_engine(model, pack=pack), options, judge=judge_obj)
        typer.echo((Path(out) / "report.md").read_text(encoding="utf-8"))

    _run(go)


def _register_long_jobs() -> None:
    """Commands that live next to their job; their modules import torch only when run."""
    from acd_engine.bench import bench_command
    from acd_engine.training.command import train_command

    app.command("train")(train_command)
    app.command("bench")(bench_command)


_register_long_jobs()


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
