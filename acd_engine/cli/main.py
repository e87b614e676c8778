"""`acd`: generate, compare, chat (and the long jobs: train, eval, bench; data for eval).

Heavy modules (torch, transformers) are imported inside the commands so ``acd --help``
answers instantly.

Every command, ``train`` and ``bench`` included, reports what the user can fix as ONE line
``error: <message>`` on stderr with exit code 2 (the rule and the shared options and logging
setup live in :mod:`acd_engine.cli.common`). :class:`OneLineErrors` applies it to the whole
app, typer/click usage errors included, so no command can forget it.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Annotated, Any, Protocol, cast

import typer
from typer.core import TyperGroup

from acd_engine.cli.common import (
    USER_ERROR_EXIT,
    BackendOpt,
    ModelOpt,
    PackOpt,
    QuantizeOpt,
    RequirePackOpt,
    VerboseOpt,
    echo_error,
    run_command,
    setup_logging,
    user_error_types,
)
from acd_engine.methods import METHODS


def _click_class(name: str) -> type[Exception]:
    """A click exception class found through typer's public ``BadParameter``.

    typer 0.29 vendors click (``typer._click``), older releases use ``click`` itself; the
    classes' names are the same in both, so this works with either and imports nothing private.
    """
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == name)


_CLICK_ERROR = _click_class("ClickException")


class _ClickError(Protocol):
    """What this module calls on a :data:`_CLICK_ERROR` (found by name, so typed loosely)."""

    def show(self) -> None: ...

    def format_message(self) -> str: ...


class OneLineErrors(TyperGroup):
    """The app's click group: usage and user errors of every command become one line.

    typer prints usage errors as a multi-line panel and lets every other exception through as
    a traceback with exit code 1. Running click in non-standalone mode hands both to us.
    """

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            code = super().main(
                args=args,
                prog_name=prog_name,
                complete_var=complete_var,
                standalone_mode=False,
                windows_expand_args=windows_expand_args,
                **extra,
            )
        except typer.Abort:  # Ctrl-C or EOF at a prompt
            typer.echo("aborted", err=True)
            code = 1
        except _CLICK_ERROR as caught:  # usage: missing argument, bad int, no such option
            exc = cast(_ClickError, caught)  # _CLICK_ERROR is click's ClickException
            if type(exc).__name__ == "NoArgsIsHelpError":  # `acd` alone: show the help
                exc.show()
                code = USER_ERROR_EXIT
            else:
                code = echo_error(exc.format_message())
        except user_error_types() as exc:
            code = echo_error(exc)
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="acd",
    help="Adversarial Contrastive Decoding: safer answers from local chat models, offline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=OneLineErrors,
)


MethodOpt = Annotated[str, typer.Option("--method", "-m", help=" | ".join(METHODS))]
AlphaOpt = Annotated[float, typer.Option("--alpha", "-a", help="Contrast strength in [0, 1).")]
MaxTokOpt = Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate.")]
TempOpt = Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy.")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Nucleus mass (sampling only).")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Sampling seed.")]
TauOpt = Annotated[
    float, typer.Option("--plausibility", help="Plausibility constraint tau in [0, 1); 0 = off.")
]
GateOpt = Annotated[
    bool,
    typer.Option(
        "--gate/--no-gate",
        help="method acd: route by the pack's safety gate (flagged: SP - alpha*AP, else "
        "--gate-passed-method).",
    ),
]
GatePassedOpt = Annotated[
    str,
    typer.Option(
        "--gate-passed-method",
        help="How a request the gate passes decodes: base (safe system prompt) or plain.",
    ),
]
GateThresholdOpt = Annotated[
    float | None,
    typer.Option("--gate-threshold", help="Gate probability in (0, 1) that flags a request."),
]
SystemOpt = Annotated[
    str | None, typer.Option("--system", "-s", help="Your own system message (kept).")
]


def _text(value: str, name: str) -> str:
    """``value`` if UTF-8 can encode it; else the house-style ``ConfigError`` naming ``name``.

    Checked before any model loads: undecodable bytes in argv or stdin arrive as lone
    surrogates, which tokenizers and terminals refuse with errors that name no input.
    """
    from acd_engine.config import check_text

    return check_text(value, name)


def _messages(prompt: str, system: str | None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": _text(system, "system")}] if system else []
    return [*msgs, {"role": "user", "content": _text(prompt, "prompt")}]


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
    gate: GateOpt = True,
    gate_threshold: GateThresholdOpt = None,
    gate_passed_method: GatePassedOpt = "base",
    system: SystemOpt = None,
    model: ModelOpt = None,
    quantize: QuantizeOpt = "none",
    pack: PackOpt = None,
    require_pack: RequirePackOpt = False,
    backend: BackendOpt = "auto",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the GenerationResult as one JSON object.")
    ] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Answer one prompt with one method."""
    setup_logging(verbose)

    def go() -> None:
        from acd_engine.config import DecodingConfig
        from acd_engine.runtime.engine import get_engine

        cfg = DecodingConfig(
            method=method,
            alpha=alpha,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            plausibility=plausibility,
            gate=gate,
            gate_threshold=gate_threshold,
            gate_passed_method=gate_passed_method,
        )
        messages = _messages(prompt, system)
        engine = get_engine(
            model, pack=pack, require_pack=require_pack, quantize=quantize, backend=backend
        )
        result = engine.generate(messages, cfg)
        if as_json:
            typer.echo(json.dumps(result.model_dump(), ensure_ascii=False))
        else:
            typer.echo(result.text)

    run_command(go)


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
    quantize: QuantizeOpt = "none",
    pack: PackOpt = None,
    require_pack: RequirePackOpt = False,
    backend: BackendOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print results as JSON.")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """The same prompts under several methods, side by side, with timings."""
    setup_logging(verbose)

    def go() -> None:
        from rich.console import Console
        from rich.table import Table

        from acd_engine.config import DecodingConfig
        from acd_engine.runtime.engine import get_engine
        from acd_engine.safety.pack_info import NO_PACK

        for i, prompt in enumerate(prompts):
            _text(prompt, f"prompts[{i}]")
        names = [m.strip() for m in methods.split(",") if m.strip()]
        if not names:
            from acd_engine.errors import ConfigError

            raise ConfigError(f"methods must name at least one method, got {methods!r}")
        configs = [
            DecodingConfig(
                method=m, alpha=alpha, max_new_tokens=max_new_tokens, plausibility=plausibility
            )
            for m in names
        ]
        engine = get_engine(
            model, pack=pack, require_pack=require_pack, quantize=quantize, backend=backend
        )
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
                if out.gate_score is not None:  # show how the safety gate routed it
                    route = (
                        "flagged: SP-αAP"
                        if out.gate_flagged
                        else f"passed: {cfg.gate_passed_method}"
                    )
                    label += f"\ngate {out.gate_score:.2f} ({route})"
                if out.pack == NO_PACK:  # acd without a trained pack is oid: say so
                    label += f"\npack {NO_PACK}"
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

    run_command(go)


@app.command()
def chat(
    method: MethodOpt = "acd",
    alpha: AlphaOpt = 0.5,
    max_new_tokens: MaxTokOpt = 256,
    temperature: TempOpt = 0.0,
    system: SystemOpt = None,
    model: ModelOpt = None,
    quantize: QuantizeOpt = "none",
    pack: PackOpt = None,
    require_pack: RequirePackOpt = False,
    backend: BackendOpt = "auto",
    verbose: VerboseOpt = False,
) -> None:
    """Interactive chat with streaming output. Empty line or Ctrl-D quits."""
    setup_logging(verbose)

    def go() -> None:
        from acd_engine.config import DecodingConfig
        from acd_engine.runtime.engine import get_engine

        cfg = DecodingConfig(
            method=method, alpha=alpha, max_new_tokens=max_new_tokens, temperature=temperature
        )
        history: list[dict[str, str]] = _messages("", system)[:-1]
        engine = get_engine(
            model, pack=pack, require_pack=require_pack, quantize=quantize, backend=backend
        )
        typer.echo(f"{engine.model_name} · method {cfg.method} · empty line quits")
        while True:
            try:
                line = input("you> ").strip()
            except (EOFError, KeyboardInterrupt):
                break
            if not line:
                break
            history.append({"role": "user", "content": _text(line, "message")})
            typer.echo("acd> ", nl=False)
            parts = []
            for delta in engine.stream(history, cfg):
                parts.append(delta)
                typer.echo(delta, nl=False)
            typer.echo("")
            history.append({"role": "assistant", "content": "".join(parts)})

    run_command(go)


@app.command("eval")
def eval_command(
    methods: Annotated[
        str,
        typer.Option(
            "--methods",
            help="Comma-separated: plain,base,nid,oid,acd,acd-gate,custom. acd is the paper's "
            "ungated ACD; acd-gate routes by the pack's safety gate (needs a pack with one).",
        ),
    ] = "plain,base,nid,oid,acd,acd-gate",
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
    context: Annotated[
        str,
        typer.Option(
            "--context",
            help="Comma-separated application shapes to place each prompt in: bare, system, "
            "multi-turn, rag, rag-system, agent, padded, after-refusal, split (wrapper texts "
            "from the package's eval pool; the report adds a By context table). "
            "Multiple-choice sets run bare only.",
        ),
    ] = "bare",
    data_dir: Annotated[
        str | None,
        typer.Option(
            "--data-dir", help="Folder with <name>.jsonl benchmark files (acd data fetch)."
        ),
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
    gate_threshold: Annotated[
        float | None,
        typer.Option(
            "--gate-threshold",
            help="acd-gate only: decode with this gate threshold in (0, 1) instead of the "
            "pack's (measure the threshold your application sets).",
        ),
    ] = None,
    judge_model: Annotated[
        str | None,
        typer.Option(
            "--judge-model", help="hf: a local model dir or .gguf; openai: the model name."
        ),
    ] = None,
    judge_url: Annotated[
        str | None,
        typer.Option(
            "--judge-url",
            help="openai: the endpoint, e.g. http://localhost:8000/v1; a key, if it needs "
            "one, comes from $ACD_JUDGE_API_KEY (never $OPENAI_API_KEY).",
        ),
    ] = None,
    model: ModelOpt = None,
    quantize: QuantizeOpt = "none",
    pack: PackOpt = None,
    backend: BackendOpt = "auto",
    verbose: VerboseOpt = False,
) -> None:
    """The paper's safety evaluation: resumable, with summary.json, report.md and plots."""
    setup_logging(verbose)

    def go() -> None:
        from pathlib import Path

        from acd_engine.backends.base import resolve_backend
        from acd_engine.eval.judges import Judge, get_judge
        from acd_engine.eval.runner import EvalOptions, check_pack_file, prepare_eval, run_eval
        from acd_engine.runtime.engine import get_engine

        options = EvalOptions(
            methods=methods,
            alphas=alphas,
            benchmarks=benchmarks,
            limit=limit,
            seed=seed,
            contexts=context,
            data_dir=Path(data_dir) if data_dir else None,
            out_dir=Path(out),
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            plausibility=plausibility,
            judge=judge,
            gate_threshold=gate_threshold,
            progress=True,
        )
        judge_options: dict[str, Any] = {}
        if judge == "hf":
            judge_options = {"model": judge_model}
        elif judge == "openai":
            judge_options = {"url": judge_url, "model": judge_model}

        # Order: everything cheap first, so a typo fails before any model loads. A hf judge
        # loads a model, so the benchmarks and --out are checked before it; other judges are
        # built first and their settings checked against run.json too.
        resolve_backend(backend, model, "auto", quantize)  # a bad --backend fails before loading
        judge_obj: Judge | None = None
        if judge != "hf":
            judge_obj = get_judge(judge, **judge_options)
        plan = prepare_eval(options, judge_obj)
        check_pack_file(options, pack)  # acd-gate with a gateless --pack fails before loading
        if judge_obj is None:
            judge_obj = get_judge(judge, **judge_options)
        engine = get_engine(model, pack=pack, quantize=quantize, backend=backend)
        run_eval(engine, options, judge=judge_obj, plan=plan)
        typer.echo((Path(out) / "report.md").read_text(encoding="utf-8"))

    run_command(go)


data_app = typer.Typer(
    help="Benchmark data for acd eval: fetch the public sets from their sources, verified.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")
DataDirOpt = Annotated[
    str | None,
    typer.Option(
        "--dir",
        help="Folder of <name>.jsonl files, the one acd eval --data-dir reads (default: "
        "$ACD_DATA_DIR, else ../shared/data/benchmarks when there, else "
        "~/.local/share/acd/benchmarks).",
    ),
]


@data_app.command("fetch")
def data_fetch_command(
    sets: Annotated[
        str, typer.Option("--sets", help="Comma-separated set names, or all (acd data list).")
    ] = "all",
    data_dir: DataDirOpt = None,
    mirror: Annotated[
        str | None,
        typer.Option("--mirror", help="Fetch <URL>/<raw file name> instead of the sources."),
    ] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Network timeout, seconds.")] = 60.0,
    verbose: VerboseOpt = False,
) -> None:
    """Download, verify (sha256) and convert the benchmark sets; skip those already there."""
    setup_logging(verbose)

    def go() -> None:
        from pathlib import Path

        from acd_engine.eval.datasets import EVAL_ONLY, describe_fetch, fetch_datasets

        folder = Path(data_dir) if data_dir else None
        for result in fetch_datasets(sets, folder, mirror=mirror, timeout=timeout):
            typer.echo(describe_fetch(result))
            folder = result.path.parent
        typer.echo(f"acd eval reads them with --data-dir {folder}\n{EVAL_ONLY}")

    run_command(go)


@data_app.command("list")
def data_list_command(data_dir: DataDirOpt = None) -> None:
    """Each set in the data folder: present, missing or corrupt (checksum); licence; path."""

    def go() -> None:
        from pathlib import Path

        from acd_engine.eval.datasets import data_status, describe_status

        folder, how, statuses = data_status(Path(data_dir) if data_dir else None)
        typer.echo("\n".join(describe_status(folder, how, statuses)))

    run_command(go)


def _register_long_jobs() -> None:
    """Commands that live next to their job; their modules import torch only when run."""
    from acd_engine.cli.bench import bench_command
    from acd_engine.cli.gate import gate_command
    from acd_engine.cli.train import train_command

    app.command("train")(train_command)
    app.command("gate")(gate_command)
    app.command("bench")(bench_command)


_register_long_jobs()


@app.command("serve")
def serve_command(
    model: ModelOpt = None,
    quantize: QuantizeOpt = "none",
    pack: PackOpt = None,
    require_pack: Annotated[
        bool,
        typer.Option(
            "--require-pack",
            help="Refuse what needs a trained prompt pack the model lacks: the load fails "
            "when the default method needs one; a request that picks one gets 400.",
        ),
    ] = False,
    host: Annotated[str, typer.Option("--host", help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    api_key: Annotated[
        str | None, typer.Option("--api-key", help="Require 'Authorization: Bearer KEY'.")
    ] = None,
    max_concurrency: Annotated[
        int, typer.Option("--max-concurrency", help="Requests admitted at once; then 429.")
    ] = 32,
    max_body_bytes: Annotated[
        int | None,
        typer.Option("--max-body-bytes", help="Largest request body (default 4 MiB); then 413."),
    ] = None,
    sse_keepalive: Annotated[
        float | None,
        typer.Option(
            "--sse-keepalive",
            help="Seconds a stream may wait without an event before a keep-alive comment "
            "(default 15).",
        ),
    ] = None,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(
            "--cors-origin",
            help="Let browser pages of this origin call the API (repeat, or a comma list; "
            "'*': any). Off by default.",
        ),
    ] = None,
    method: Annotated[str, typer.Option("--method", "-m", help="Default method.")] = "acd",
    alpha: Annotated[float, typer.Option("--alpha", "-a", help="Default alpha in [0, 1).")] = 0.5,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", help="Default max_tokens of a request.")
    ] = 256,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | mps")] = "auto",
    device_map: Annotated[
        str | None, typer.Option("--device-map", help="'auto': spread the model (accelerate).")
    ] = None,
    backend: BackendOpt = "auto",
    ray: Annotated[bool, typer.Option("--ray", help="Deploy on Ray Serve (extra [ray]).")] = False,
    replicas: Annotated[int, typer.Option("--replicas", help="Ray Serve replicas.")] = 1,
    num_cpus: Annotated[
        float, typer.Option("--num-cpus-per-replica", help="Ray: CPUs per replica.")
    ] = 1.0,
    num_gpus: Annotated[
        float, typer.Option("--num-gpus-per-replica", help="Ray: GPUs per replica.")
    ] = 0.0,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (extra [serve])."""
    from acd_engine.cli.common import fail, setup_logging

    setup_logging(True)  # the start line (URL, model id) is logged at INFO
    try:
        from acd_integrations.server.cli import serve
    except ImportError as exc:
        from acd_engine.install import pip_install_extra

        fail(f"acd serve needs the serve extra: {pip_install_extra('serve')} ({exc})")
    serve(
        model=model,
        pack=pack,
        require_pack=require_pack,
        host=host,
        port=port,
        api_key=api_key,
        max_concurrency=max_concurrency,
        defaults={"method": method, "alpha": alpha, "max_tokens": max_tokens},
        max_body_bytes=max_body_bytes,
        sse_keepalive=sse_keepalive,
        cors_origins=cors_origin or (),
        device=device,
        device_map=device_map,
        quantize=quantize,
        backend=backend,
        ray=ray,
        replicas=replicas,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )


pack_app = typer.Typer(help="Prompt packs: what a pack file is for.", no_args_is_help=True)
app.add_typer(pack_app, name="pack")


@pack_app.command("info")
def pack_info_command(
    pack: Annotated[str, typer.Argument(help="A prompt pack .safetensors file.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print everything the pack holds as one JSON object.")
    ] = False,
) -> None:
    """What a pack is for: model, soft prompts, gate, validation figures, training."""
    setup_logging(False)

    def go() -> None:
        from acd_engine.safety.pack_info import format_pack_info, pack_info

        info = pack_info(_text(pack, "pack"))
        typer.echo(
            json.dumps(info, ensure_ascii=False, indent=2) if as_json else format_pack_info(info)
        )

    run_command(go)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
