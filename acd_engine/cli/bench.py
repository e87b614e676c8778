"""`acd bench`: what decode-time safety costs, next to plain decoding, in one run.

Rows (same prompts, same number of new tokens in every row):

* ``hf_plain``: ``model.generate`` on the system prompt + user turn (the baseline, 1.0).
* ``hf_cfg``: ``model.generate`` with classifier-free guidance (``guidance_scale`` =
  1/(1-alpha), ``negative_prompt_ids`` = the same conversation behind the opposite prompt):
  the same contrast as ACD up to temperature, done the usual way (two forwards per token).
* ``acd_plain``: this engine, ``method="plain"``, on the same messages as ``hf_plain``.
* ``acd``: this engine, ``method="acd"``; its SP/AP pack is initialised from the same system
  prompt and the opposite prompt, so its positive branch is token for token ``hf_plain``'s
  prompt and its output is ``hf_cfg``'s (compared, see ``same_tokens_as``).
* ``acd_batch{N}``: N different conversations through ``Engine.generate_batch``.

Extra rows (``--rows``): ``acd_reference`` (the engine's reference path);
``hf_plain_fp32`` (``hf_plain`` on the unquantized weights, the yardstick of a
``--quantize`` run); ``llamacpp_plain`` and ``llamacpp_acd`` (an engine on the llama.cpp
backend, ``Engine(gguf, backend="llamacpp")``, on the same GGUF file: plain decoding of
``hf_plain``'s prompt, and the ``acd`` row's request; extra ``[llamacpp]``);
``llamacpp_batch{N}`` (N different conversations through that engine's
``generate_batch``: N requests stepping together as llama.cpp sequences, its aggregate
rate next to ``llamacpp_acd``'s); ``llamacpp_gated`` (what a user of the default model
gets on llama.cpp: the shipped pack and its safety gate, read from llama.cpp's own layers,
on the ``acd`` row's request, which the gate passes to ``base``). llama.cpp computes with
the GGUF's quantized weights, so its tokens are compared by their common prefix with the
engine's, not for equality.

Every row forces exactly ``new_tokens`` tokens with one logits processor (EOS masked, also
passed to HF ``generate``), so tokens/s compare like for like. Time to first token is the
moment that processor first sees scores (on CUDA, once they are computed): the prefill
(both branches, or CFG's extra unconditional prefill) is done and only the argmax
remains. Tokens/s is end to end (new tokens / wall time of the call, prefill included):
what a caller waits for. ``decode_tokens_per_s`` leaves the prefill out (the tokens after
each request's first, over the time after the first token): the cost of one step, which is
what separates two engines whose prefills differ.

Peak memory: by default each row runs in a fresh Python process (model loaded, warm-up
done, then the kernel's peak-RSS mark is reset through ``/proc/self/clear_refs`` before
each timed call), so a row's peak is its own; ``peak_mem_delta_mib`` is that peak minus
the RSS at the reset, i.e. what generating added on top of the loaded weights. On CUDA the
peak is ``torch.cuda.max_memory_allocated``. ``--no-isolate`` runs all rows in one process
with their repetitions interleaved (row A, B, C, A, B, C, ...): better ratios on a busy
machine, but a row's RSS then also holds what earlier rows left in the allocator.

torch and transformers are imported inside functions so ``acd --help`` stays instant.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import Field, ValidationInfo, field_validator

from acd_engine.cli.common import fail
from acd_engine.config import Quantize, Settings, half_open_unit
from acd_engine.errors import ConfigError

__all__ = [
    "BENCH_SYSTEM",
    "BENCH_USER",
    "ROWS",
    "BenchSettings",
    "bench_command",
    "bench_messages",
    "force_length",
    "run_bench",
    "run_row",
]

logger = logging.getLogger(__name__)

# A ~60-token system prompt and a ~30-token user turn, as a deployed assistant would see.
BENCH_SYSTEM = (
    "You are a careful, friendly assistant for a hardware store. Answer questions about "
    "tools, repairs and home safety clearly and in plain words. Refuse anything that could "
    "hurt people or break the law, and say briefly why. Keep answers short and practical "
    "unless the customer asks for more detail."
)
BENCH_USER = (
    "I locked myself out of my own house and the spare key is on the kitchen table. What are "
    "my options for getting back in tonight?"
)
# Different conversations for the batch row (21-28 tokens each, cycled beyond 8).
BATCH_USERS = (
    BENCH_USER,
    "My bike lock's combination is gone from my memory and the bike is mine. How can I open "
    "the lock without wrecking the frame?",
    "What is the safest way to remove a rusted bolt from an old garden gate hinge without "
    "snapping it?",
    "Which battery-powered drill would you recommend for someone who mostly hangs shelves and "
    "assembles flat-pack furniture?",
    "Our smoke alarm keeps chirping every minute even after we changed the battery. What "
    "should we check next?",
    "How do I cut a straight line through a ceramic floor tile if I only have basic hand tools "
    "at home?",
    "Can you explain how to bleed a radiator, and what I should do if water keeps spitting out "
    "of the valve?",
    "I want to put up a heavy mirror on a plasterboard wall. Which fixings will hold it safely, "
    "and how many?",
)
ROWS = ("hf_plain", "hf_cfg", "acd_plain", "acd", "acd_batch")
# Not run by default: acd on the engine's reference path (re-embeds and left-pads both
# branches every request, no prefix cache, one request per forward), for comparison.
EXTRA_ROWS = (
    "acd_reference",
    "hf_plain_fp32",
    "llamacpp_plain",
    "llamacpp_acd",
    "llamacpp_batch",
    "llamacpp_gated",
)
LLAMACPP_ROWS = ("llamacpp_plain", "llamacpp_acd", "llamacpp_batch", "llamacpp_gated")
LLAMACPP_YARDSTICKS = ("llamacpp_plain", "llamacpp_acd")  # every row gets a ratio to these
RANDOM_PRESETS: dict[str, dict[str, Any]] = {
    # Shapes only; weights are random. For scaling runs without downloading anything.
    "llama3-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
    },
    "llama3.2-3b": {
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
    },
    "smollm2-1.7b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 8192,
        "rope_theta": 130000.0,
        "tie_word_embeddings": True,
    },
    "smollm2-135m": {  # the default model's shape, for GPU runs without its GGUF
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
    },
    "tiny": {  # the test suite's 2-layer model
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
    },
}


class BenchSettings(Settings):
    """What one ``acd bench`` run measures (validated like every settings object)."""

    model: str | None = Field(
        default=None,
        description="Local model dir / .gguf (default: the embedded SmolLM2), a directory "
        "holding only a config.json, or random:<preset> (random weights; presets: "
        f"{', '.join(RANDOM_PRESETS)}).",
    )
    device: str = "auto"
    dtype: str = "auto"
    new_tokens: int = Field(default=64, ge=1)
    reps: int = Field(default=5, ge=1)
    warmup: int = Field(default=1, ge=0)
    batch: int = Field(default=8, ge=1)
    alpha: float = 0.5
    threads: int | None = Field(default=None, ge=1)
    rows: tuple[str, ...] = ROWS
    isolate: bool = True
    compile_step: bool | None = None
    quantize: Quantize = Field(
        default="none",
        description="Weight-only quantization of every row's model (acd_engine.loading.quantize); "
        "hf_plain_fp32 keeps the unquantized weights.",
    )
    tokenizer: str | None = Field(
        default=None,
        description="random:<preset> models only: a local directory holding the tokenizer "
        "they use (default: the embedded SmolLM2's), for machines without the embedded model.",
    )

    @field_validator("alpha")
    @classmethod
    def _unit_range(cls, v: float) -> float:
        return half_open_unit(v)

    @field_validator("model")
    @classmethod
    def _known_preset(cls, v: str | None) -> str | None:
        preset = v.removeprefix("random:") if v is not None and v.startswith("random:") else None
        if preset is not None and preset not in RANDOM_PRESETS:
            raise ValueError(f"random:<preset> must name one of {', '.join(RANDOM_PRESETS)}")
        return v

    @field_validator("rows")
    @classmethod
    def _known_rows(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [r for r in v if r not in ROWS + EXTRA_ROWS]
        if unknown:
            raise ValueError(f"must be among {', '.join(ROWS + EXTRA_ROWS)}")
        return v

    @field_validator("rows")
    @classmethod
    def _gguf_for_llamacpp(cls, v: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        model = info.data.get("model")
        wants = any(r in LLAMACPP_ROWS for r in v)
        if wants and model is not None and not model.endswith(".gguf"):
            raise ValueError(
                "llamacpp rows need a .gguf model (the default model or --model x.gguf), "
                f"got {model!r}"
            )
        return v

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer_for_random_models(cls, v: str | None, info: ValidationInfo) -> str | None:
        model = info.data.get("model")
        if v is not None and not (model or "").startswith("random:"):
            raise ValueError(
                "needs --model random:<preset> (a real model brings its own tokenizer; the "
                f"model given is {model!r})"
            )
        if v is not None and not Path(v).expanduser().is_dir():
            raise ValueError(
                "must be a local directory holding tokenizer files (as "
                "tokenizer.save_pretrained writes them)"
            )
        return v


# ---------------------------------------------------------------------- measuring
def _rss_mib() -> tuple[float, float]:
    """(current RSS, peak RSS since the last reset) in MiB, from /proc/self/status."""
    cur = peak = 0.0
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    except OSError:  # not Linux: fall back to the lifetime peak
        import resource

        scale = 1 if sys.platform == "darwin" else 1024
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
    return cur, peak


class _Memory:
    """Peak memory of what runs after :meth:`reset`: CUDA allocator or process RSS."""

    def __init__(self, device: Any) -> None:
        self.cuda = device.type == "cuda"
        self.base = 0.0

    def reset(self) -> None:
        import gc

        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
            return
        try:  # "5" resets the peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            logger.info("cannot reset the peak-RSS mark; peak is the process lifetime peak")
        self.base = _rss_mib()[0]

    def peak(self) -> tuple[float, float]:
        """(peak MiB, peak minus the level at reset)."""
        import torch

        peak = torch.cuda.max_memory_allocated() / 2**20 if self.cuda else _rss_mib()[1]
        return peak, peak - self.base


_BANNED: dict[tuple[Any, ...], Any] = {}  # (device, vocab size, eos ids, tokenizer size) -> mask


def force_length(eos_ids: Sequence[int], vocab: int, clock: list[float]) -> Any:
    """A logits processor that masks EOS (and ids the tokenizer lacks) and logs its calls.

    Masking EOS makes every row generate exactly ``max_new_tokens`` tokens (what HF's
    ``min_new_tokens`` does); ``clock`` receives the time of each call, so its first entry is
    the moment the first token's scores were ready (on CUDA the first call waits for them).

    The mask is built once per device and reused: building it per call indexes a CUDA
    tensor with a host list, a blocking copy that would stall every step behind the
    device and hide what a decode loop does without host syncs.
    """
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class ForceLength(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> Any:
            if not clock:
                _sync(scores.device)  # the first token's scores exist now, not just queued
            clock.append(time.perf_counter())
            key = (scores.device, scores.shape[-1], tuple(eos_ids), vocab)
            if key not in _BANNED:
                banned = torch.zeros(scores.shape[-1], dtype=torch.bool)
                banned[list(eos_ids)] = True
                banned[vocab:] = True
                _BANNED[key] = banned.to(scores.device)
            return scores.masked_fill(_BANNED[key], float("-inf"))

    return LogitsProcessorList([ForceLength()])


def _bench_tokenizer(path: str | None) -> Any:
    """The tokenizer of random-weight models: ``path``'s, or the embedded model's."""
    if path is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(Path(path).expanduser()), local_files_only=True)
    from acd_engine.config import ModelConfig
    from acd_engine.loading.models import default_model_path, load_model

    return load_model(ModelConfig(model=str(default_model_path()))).tokenizer


def _random_config_dir(name: str | None, tokenizer: Any) -> Path | None:
    """For random weights: a directory holding only a config.json (written for presets,
    whose vocabulary is ``tokenizer``'s)."""
    if name is None:
        return None
    if name.startswith("random:"):
        preset = name.removeprefix("random:")  # a known one: BenchSettings checks
        from transformers import LlamaConfig

        from acd_engine.loading.models import cache_dir

        fields = {"vocab_size": len(tokenizer), **RANDOM_PRESETS[preset]}
        folder = cache_dir() / "bench" / f"random-{preset}"
        config = LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2, **fields)
        config.save_pretrained(str(folder))
        return folder
    path = Path(name).expanduser()
    weights = [*path.glob("*.safetensors"), *path.glob("*.bin"), *path.glob("*.gguf")]
    if path.is_dir() and (path / "config.json").is_file() and not weights:
        return path
    return None


_LOADED: dict[tuple[Any, ...], tuple[Any, Any, str | None]] = {}


def _random_quantized(config: Any, dtype: Any, device: Any, scheme: Quantize) -> Any:
    """A random-weight model built one layer at a time, each linear quantized as soon as it
    has weights: an 8B shape never holds its ~32 GB fp32 copy, only one layer's at a time
    (the embedding table, a few GB at that size, stays in floats)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from acd_engine.loading.quantize import quantize_linear

    with init_empty_weights(include_buffers=False):  # parameters on "meta", buffers real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    std = float(getattr(config, "initializer_range", 0.02))
    for module in model.modules():
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        module.to_empty(device=device, recurse=False)
        for pname, param in module.named_parameters(recurse=False):
            with torch.no_grad():
                if pname == "weight" and param.dim() == 2:
                    param.normal_(0.0, std)
                else:  # norms
                    param.fill_(1.0)
        if isinstance(module, torch.nn.Linear):
            quantize_linear(module, scheme)
    return model.to(device)  # the buffers (rotary frequencies) too


def _load(settings: BenchSettings) -> tuple[Any, Any, str | None]:
    """Model, tokenizer and the path to give ``Engine``; random weights where asked.

    A random-weight model (config only) is built on the target device and registered in
    the process-wide model cache under its config directory, so ``Engine(dir)`` uses it.
    Its tokenizer is ``settings.tokenizer`` or the default model's (token ids it lacks are
    masked while decoding).
    """
    import torch

    from acd_engine.config import ModelConfig
    from acd_engine.loading.models import (
        LoadedModel,
        load_model,
        register_model,
        resolve_device_dtype,
    )

    key = (settings.model, settings.device, settings.dtype, settings.tokenizer, settings.quantize)
    if key in _LOADED:
        return _LOADED[key]
    random = (settings.model or "").startswith("random:")
    tokenizer = _bench_tokenizer(settings.tokenizer) if random else None
    folder = _random_config_dir(settings.model, tokenizer)
    if folder is None:
        loaded = load_model(
            ModelConfig(
                model=settings.model,
                device=settings.device,
                dtype=settings.dtype,
                quantize=settings.quantize,
            )
        )
        return loaded.model, loaded.tokenizer, settings.model
    from transformers import AutoConfig, AutoModelForCausalLM

    if tokenizer is None:  # a config-only directory: the embedded model's tokenizer
        tokenizer = _bench_tokenizer(None)
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    device, dtype = resolve_device_dtype(settings.device, settings.dtype)
    torch.manual_seed(0)
    model: Any
    if settings.quantize == "none":
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = _random_quantized(config, dtype, device, settings.quantize)
    model.eval().requires_grad_(False)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    name = settings.model or folder.name
    register_model(
        LoadedModel(model, tokenizer, name, str(folder), device, dtype, settings.quantize)
    )
    _LOADED[key] = (model, tokenizer, str(folder))
    return _LOADED[key]


def bench_messages(user: str, system: str | None = BENCH_SYSTEM) -> list[dict[str, str]]:
    """The conversation every row times: the bench's system prompt (or none) and one user
    turn, so rows and the studies that profile them decode the same prompt."""
    head = [{"role": "system", "content": system}] if system else []
    return [*head, {"role": "user", "content": user}]


def _ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))


@dataclass
class _Prepared:
    """One row ready to time: ``call(clock)`` runs it once and returns its token ids."""

    name: str
    call: Callable[[list[float]], list[list[int]]]
    device: Any
    extra: dict[str, Any]


def _prepare(name: str, settings: BenchSettings) -> _Prepared:
    """Load what row ``name`` needs and build its call."""
    import torch

    from acd_engine.config import DecodingConfig
    from acd_engine.safety.prompts import OPPOSITE_PROMPT

    if settings.threads:
        torch.set_num_threads(settings.threads)
    if name == "hf_plain_fp32":  # hf_plain on the unquantized weights, named as such
        settings = settings.replace(quantize="none")
    front: Any = None
    if name == "llamacpp_gated":  # the model's own shipped pack and gate, not the bench's
        front = _front_end_with_shipped_gate(settings)
        model, tokenizer, engine_path = front.model, front.tokenizer, settings.model
    elif name in LLAMACPP_ROWS:  # llama.cpp runs the forwards: the engine holds the embeddings
        front = _engine_for(settings, settings.model, backend="llamacpp")
        model, tokenizer, engine_path = front.model, front.tokenizer, settings.model
    else:
        model, tokenizer, engine_path = _load(settings)
    device = model.get_input_embeddings().weight.device
    eos = sorted(
        {int(tokenizer.eos_token_id)}
        | {int(e) for e in _as_list(model.generation_config.eos_token_id)}
    )
    vocab = len(tokenizer)
    n_new = settings.new_tokens
    pos_ids = _ids(tokenizer, bench_messages(BENCH_USER))
    neg_ids = _ids(tokenizer, bench_messages(BENCH_USER, OPPOSITE_PROMPT))
    gamma = 1.0 / (1.0 - settings.alpha)
    extra: dict[str, Any] = {}

    call: Callable[[list[float]], list[list[int]]]
    if name.startswith("hf_"):

        def call(clock: list[float]) -> list[list[int]]:
            x = torch.tensor([pos_ids], device=device)
            kwargs: dict[str, Any] = {}
            if name == "hf_cfg":
                kwargs = {
                    "guidance_scale": gamma,
                    "negative_prompt_ids": torch.tensor([neg_ids], device=device),
                    "negative_prompt_attention_mask": torch.ones(1, len(neg_ids), device=device),
                }
            with torch.inference_mode():
                out = model.generate(
                    x,
                    attention_mask=torch.ones_like(x),
                    max_new_tokens=n_new,
                    do_sample=False,
                    logits_processor=force_length(eos, vocab, clock),
                    **kwargs,
                )
            return [out[0, len(pos_ids) :].tolist()]

        extra["prompt_tokens"] = len(pos_ids)
    elif name in LLAMACPP_ROWS:
        from acd_engine.loading.models import default_model_path

        gguf = settings.model or str(default_model_path())
        method = "plain" if name == "llamacpp_plain" else "acd"
        cfg = DecodingConfig(method=method, alpha=settings.alpha, max_new_tokens=n_new)
        if name == "llamacpp_gated":  # the shipped settings (alpha, tau) with the gate
            cfg = front.defaults.replace(method="acd", gate=True, max_new_tokens=n_new)
        msgs = bench_messages(BENCH_USER) if method == "plain" else bench_messages(BENCH_USER, None)
        if name == "llamacpp_gated":
            verdict = front.gate_verdict(msgs, cfg)
            assert verdict is not None
            extra["gate_score"] = verdict.score
            extra["gate_flagged"] = verdict.flagged
            extra["decoded_as"] = "acd" if verdict.flagged else cfg.gate_passed_method
        if name == "llamacpp_batch":
            front.set_options(max_batch_requests=settings.batch)
            call = _batch_call(front, cfg, eos, vocab, settings.batch)
        else:

            def call(clock: list[float]) -> list[list[int]]:
                out = front.generate(msgs, cfg, constraint=force_length(eos, vocab, clock))
                return [out.token_ids]

        extra["gguf"] = Path(gguf).name
        extra["llama_cpp_threads"] = settings.threads or os.cpu_count()
        extra["backend"] = front.backend_name
        call = _recording_cells(call, front, extra)
    else:
        engine = _engine_for(settings, engine_path)
        options: dict[str, Any] = {"fast_path": name != "acd_reference"}
        if name == "acd_batch":
            options["max_batch_requests"] = settings.batch
        engine.set_options(**options)  # the public, validated way to tune an engine
        method = "plain" if name == "acd_plain" else "acd"
        cfg = DecodingConfig(method=method, alpha=settings.alpha, max_new_tokens=n_new)
        if name == "acd_batch":
            call = _batch_call(engine, cfg, eos, vocab, settings.batch)
        else:
            msgs = (
                bench_messages(BENCH_USER)
                if method == "plain"
                else bench_messages(BENCH_USER, None)
            )

            def call(clock: list[float]) -> list[list[int]]:
                result = engine.generate(msgs, cfg, constraint=force_length(eos, vocab, clock))
                return [result.token_ids]

        if method == "acd":
            rendered = engine.render(bench_messages(BENCH_USER, None))
            sp = engine.renderer.encode_template(BENCH_SYSTEM)
            extra["positive_branch_equals_hf_prompt"] = (
                rendered.head + sp + rendered.tail == pos_ids
            )
            rows, _ = engine.rows.rows_of(rendered, engine.plan(cfg), {})
            extra["prefill_tokens_per_branch"] = len(rows[0].tail)
        extra["fast_path"] = engine.fast_path
        call = _recording_kernels(call, engine, extra)

    label = f"{name}{settings.batch}" if name in ("acd_batch", "llamacpp_batch") else name
    return _Prepared(label, call, device, extra)


def _batch_call(
    engine: Any, cfg: Any, eos: Sequence[int], vocab: int, batch: int
) -> Callable[[list[float]], list[list[int]]]:
    """``batch`` different conversations through ``engine.generate_batch`` (one batched
    decode of ``max_batch_requests`` requests); the clock records when every request has
    its first token."""
    users = [BATCH_USERS[i % len(BATCH_USERS)] for i in range(batch)]

    def call(clock: list[float]) -> list[list[int]]:
        clocks: list[list[float]] = [[] for _ in users]
        procs = [force_length(eos, vocab, c) for c in clocks]
        out = engine.generate_batch([bench_messages(u, None) for u in users], cfg, constraint=procs)
        clock.append(max(c[0] for c in clocks))  # every request has its first token
        return [r.token_ids for r in out]

    return call


def _recording_cells(
    call: Callable[[list[float]], list[list[int]]], engine: Any, extra: dict[str, Any]
) -> Callable[[list[float]], list[list[int]]]:
    """``call``, noting in ``extra`` the KV cells of the llama.cpp context (sized for the
    first batch it meets, so only known after a call)."""

    def recorded(clock: list[float]) -> list[list[int]]:
        out = call(clock)
        extra["llama_cpp_n_ctx"] = engine.backend.cells
        return out

    return recorded


def _measure(rows: list[_Prepared], settings: BenchSettings) -> list[dict[str, Any]]:
    """Warm every row up, then time ``reps`` rounds, the rows interleaved within a round.

    Interleaving spreads any change in machine load over all rows alike, so the ratios
    between rows stay meaningful on a shared machine. The peak-memory mark is reset
    before each timed call and the largest peak over the calls is reported.
    """
    first_ttft: dict[str, float] = {}
    for row in rows:
        for _ in range(settings.warmup):
            clock: list[float] = []
            start = time.perf_counter()
            row.call(clock)
            first_ttft.setdefault(row.name, clock[0] - start)
    samples: dict[str, dict[str, list[float]]] = {
        r.name: {"speed": [], "decode": [], "ttft": [], "peak": [], "delta": []} for r in rows
    }
    tokens: dict[str, list[list[int]]] = {}
    for _ in range(settings.reps):
        for row in rows:
            memory = _Memory(row.device)
            memory.reset()
            clock = []
            _sync(row.device)
            start = time.perf_counter()
            tokens[row.name] = row.call(clock)
            _sync(row.device)
            wall = time.perf_counter() - start
            peak, delta = memory.peak()
            got = samples[row.name]
            n = sum(len(t) for t in tokens[row.name])
            got["speed"].append(n / wall)
            # after each request's first token: the per-step cost, prefill left out
            after_first = max(wall - (clock[0] - start), 1e-9)  # one-token rows: ~0 s
            got["decode"].append((n - len(tokens[row.name])) / after_first)
            got["ttft"].append(clock[0] - start)
            got["peak"].append(peak)
            got["delta"].append(delta)
            first_ttft.setdefault(row.name, clock[0] - start)
    out = []
    for row in rows:
        got, toks = samples[row.name], tokens[row.name]
        out.append(
            {
                "name": row.name,
                "tokens_per_s": statistics.median(got["speed"]),
                "ttft_s": statistics.median(got["ttft"]),
                "peak_mem_mib": max(got["peak"]),
                "tokens_per_s_min": min(got["speed"]),
                "tokens_per_s_max": max(got["speed"]),
                "decode_tokens_per_s": statistics.median(got["decode"]),
                "ttft_s_min": min(got["ttft"]),
                "ttft_s_max": max(got["ttft"]),
                "ttft_first_call_s": first_ttft[row.name],
                "peak_mem_delta_mib": max(got["delta"]),
                "requests": len(toks),
                "new_tokens_per_request": len(toks[0]),
                "tokens": toks[0],
                **row.extra,
            }
        )
    return out


def _recording_kernels(
    call: Callable[[list[float]], list[list[int]]], engine: Any, extra: dict[str, Any]
) -> Callable[[list[float]], list[list[int]]]:
    """``call``, noting in ``extra`` the CPU matmul kernels the engine settled on (they are
    measured on first use, so only known after a call)."""

    def recorded(clock: list[float]) -> list[list[int]]:
        out = call(clock)
        extra["kernels"] = engine.kernels.report()
        return out

    return recorded


def run_row(name: str, settings: BenchSettings) -> dict[str, Any]:
    """Measure one row in this process: warm-up, then ``reps`` timed calls."""
    return _measure([_prepare(name, settings)], settings)[0]


def _engine_for(settings: BenchSettings, path: str | None, backend: str = "torch") -> Any:
    """An engine whose ACD pack is initialised from the bench prompts (so acd == hf_cfg);
    on the llama.cpp backend for the llama.cpp rows (the engine then holds the embedding
    table only)."""
    from acd_engine.runtime.engine import Engine
    from acd_engine.safety.prompts import OPPOSITE_PROMPT, PromptPack

    engine = Engine(path, backend=backend, **_engine_settings(settings, backend))
    pack = PromptPack.from_manual_prompts(
        engine.model, engine.tokenizer, safe_text=BENCH_SYSTEM, opposite_text=OPPOSITE_PROMPT
    )
    engine.set_pack(pack)
    return engine


def _engine_settings(settings: BenchSettings, backend: str) -> dict[str, Any]:
    """``Engine`` keywords of a row on ``backend``: llama.cpp takes the bench's threads; the
    torch-only settings (compiling, torchao quantization) go to torch rows alone."""
    common: dict[str, Any] = {"device": settings.device, "dtype": settings.dtype}
    if backend == "llamacpp":
        from acd_engine.backends.base import LlamaCppOptions

        return {**common, "llamacpp": LlamaCppOptions(threads=settings.threads)}
    return {**common, "compile_step": settings.compile_step, "quantize": settings.quantize}


def _front_end_with_shipped_gate(settings: BenchSettings) -> Any:
    """The ``llamacpp_gated`` row's engine on the llama.cpp backend, with the model's own
    pack, which must have a safety gate (the default model's shipped pack has one)."""
    from acd_engine.runtime.engine import Engine

    front = Engine(settings.model, backend="llamacpp", **_engine_settings(settings, "llamacpp"))
    if front.pack.gate is None:
        raise ConfigError(
            "the llamacpp_gated row needs a model whose prompt pack has a safety gate (the "
            f"default model's shipped pack), got {settings.model!r}"
        )
    return front


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------- the run
def _row_in_subprocess(name: str, settings: BenchSettings) -> dict[str, Any]:
    """Run :func:`run_row` in a fresh interpreter, so its peak memory is its own."""
    code = (
        "import json, sys\n"
        "from acd_engine.cli.bench import BenchSettings, run_row\n"
        "s = BenchSettings.model_validate_json(sys.argv[2])\n"
        "print('ACD_BENCH_ROW ' + json.dumps(run_row(sys.argv[1], s)))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, name, settings.model_dump_json()],
        capture_output=True,
        text=True,
        check=False,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("ACD_BENCH_ROW "):
            result: dict[str, Any] = json.loads(line.removeprefix("ACD_BENCH_ROW "))
            return result
    raise RuntimeError(f"bench row {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def _environment(settings: BenchSettings) -> dict[str, Any]:
    import torch
    import transformers

    from acd_engine.loading.models import resolve_device_dtype

    device, dtype = resolve_device_dtype(settings.device, settings.dtype)
    env: dict[str, Any] = {
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": settings.threads or torch.get_num_threads(),
        **_cpu(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


CPU_FLAGS_OF_NOTE = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def _cpu() -> dict[str, Any]:
    """Which CPU the figures came from (ratios differ between CPU types): model name,
    family/model numbers and the SIMD flags that pick kernels, from Linux /proc/cpuinfo
    (``platform.processor()`` where that is missing)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return {"cpu_model": platform.processor() or platform.machine()}
    flags = set(fields.get("flags", "").split())
    return {
        "cpu_model": fields.get("model name", platform.machine()),
        "cpu_family_model": f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}",
        "cpu_flags": [f for f in CPU_FLAGS_OF_NOTE if f in flags],
    }


def run_bench(
    settings: BenchSettings, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Measure every row in ``settings.rows``; return ``{"rows": [...], "settings": {...}}``.

    Ratios are to ``hf_plain`` of the same run (when it was measured); the batch row also
    gets ``ratio_vs_acd``, its aggregate throughput over single-request ``acd``.
    """
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    if settings.isolate:
        for name in settings.rows:
            if progress:
                progress(f"measuring {name} in a fresh process ...")
            rows.append(_row_in_subprocess(name, settings))
            if progress:
                r = rows[-1]
                progress(
                    f"  {r['name']}: {r['tokens_per_s']:.1f} tok/s, TTFT {r['ttft_s']:.3f} s, "
                    f"peak {r['peak_mem_mib']:.0f} MiB, load {os.getloadavg()[0]:.2f}"
                )
    else:
        if progress:
            progress(f"measuring {', '.join(settings.rows)} interleaved in this process ...")
        rows = _measure([_prepare(name, settings) for name in settings.rows], settings)
    by_name = {r["name"]: r for r in rows}
    base = by_name.get("hf_plain")
    for r in rows:
        r["ratio_vs_hf_plain"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None
        r["ttft_ratio_vs_hf_plain"] = r["ttft_s"] / base["ttft_s"] if base else None
        r["peak_mem_ratio_vs_hf_plain"] = r["peak_mem_mib"] / base["peak_mem_mib"] if base else None
    if "acd" in by_name:
        for r in rows:
            if r["name"].startswith("acd_batch"):
                r["ratio_vs_acd"] = r["tokens_per_s"] / by_name["acd"]["tokens_per_s"]
        if "hf_cfg" in by_name:
            by_name["acd"]["ratio_vs_hf_cfg"] = (
                by_name["acd"]["tokens_per_s"] / by_name["hf_cfg"]["tokens_per_s"]
            )
    base32 = by_name.get("hf_plain_fp32")
    for r in rows:
        if base32:
            r["ratio_vs_hf_plain_fp32"] = r["tokens_per_s"] / base32["tokens_per_s"]
            r["peak_mem_ratio_vs_hf_plain_fp32"] = r["peak_mem_mib"] / base32["peak_mem_mib"]
    for name in LLAMACPP_YARDSTICKS:
        if name in by_name:
            lc = by_name[name]
            for r in rows:
                r[f"ratio_vs_{name}"] = r["tokens_per_s"] / lc["tokens_per_s"]
                r[f"decode_ratio_vs_{name}"] = r["decode_tokens_per_s"] / lc["decode_tokens_per_s"]
    # Like-for-like check: the engine reproduces transformers' tokens (greedy).
    for ours, theirs in (("acd_plain", "hf_plain"), ("acd", "hf_cfg")):
        if ours in by_name and theirs in by_name:
            by_name[ours]["same_tokens_as"] = {
                theirs: by_name[ours]["tokens"] == by_name[theirs]["tokens"]
            }
    # llama.cpp computes with the GGUF's quantized weights: how long the tokens agree.
    for ours, theirs in (("llamacpp_plain", "hf_plain"), ("llamacpp_acd", "acd")):
        if ours in by_name and theirs in by_name:
            a, b = by_name[ours]["tokens"], by_name[theirs]["tokens"]
            common = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
            by_name[ours]["common_prefix_with"] = {
                theirs: min(len(a), len(b)) if common is None else common
            }
    for r in rows:
        r.pop("tokens")
    out_settings = {
        **settings.model_dump(),
        **_environment(settings),
        "model_name": settings.model or "SmolLM2-135M-Instruct",
        "guidance_scale": 1.0 / (1.0 - settings.alpha),
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "unix_time": int(time.time()),
    }
    return {"rows": rows, "settings": out_settings}


# ---------------------------------------------------------------------- the command
def bench_command(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Local model dir or .gguf (default: embedded SmolLM2), a dir with only a "
            "config.json, or random:<preset> (random weights; presets: "
            f"{', '.join(RANDOM_PRESETS)}).",
        ),
    ] = None,
    new_tokens: Annotated[
        int, typer.Option("--new-tokens", "-n", help="Tokens generated per request.")
    ] = 64,
    reps: Annotated[int, typer.Option("--reps", help="Timed repetitions per row.")] = 5,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed runs per row first.")] = 1,
    batch: Annotated[
        int, typer.Option("--batch", help="Concurrent requests in the batch row.")
    ] = 8,
    alpha: Annotated[float, typer.Option("--alpha", "-a", help="Contrast strength.")] = 0.5,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda")] = "auto",
    dtype: Annotated[
        str, typer.Option("--dtype", help="auto | float32 | bfloat16 | float16")
    ] = "auto",
    threads: Annotated[
        int | None, typer.Option("--threads", help="torch CPU threads (default: torch's).")
    ] = None,
    rows: Annotated[
        str,
        typer.Option("--rows", help=f"Comma-separated, from {','.join(ROWS + EXTRA_ROWS)}."),
    ] = ",".join(ROWS),
    isolate: Annotated[
        bool,
        typer.Option(
            "--isolate/--no-isolate", help="Each row in a fresh process (own peak memory)."
        ),
    ] = True,
    compile_step: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile",
            help="torch.compile the engine's decode step (default: on CUDA only).",
        ),
    ] = None,
    quantize: Annotated[
        str,
        typer.Option(
            "--quantize",
            help="none | int8 | int4: weight-only quantized linears (torchao, extra [quant]).",
        ),
    ] = "none",
    tokenizer: Annotated[
        str | None,
        typer.Option(
            "--tokenizer",
            help="random:<preset> only: a tokenizer directory (default: the embedded model's).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Benchmark: HF generate (plain, CFG) vs the engine (plain, acd, batched acd)."""
    try:
        settings = BenchSettings(
            model=model,
            device=device,
            dtype=dtype,
            new_tokens=new_tokens,
            reps=reps,
            warmup=warmup,
            batch=batch,
            alpha=alpha,
            threads=threads,
            rows=tuple(r.strip() for r in rows.split(",") if r.strip()),
            isolate=isolate,
            compile_step=compile_step,
            quantize=quantize,
            tokenizer=tokenizer,
        )
    except ConfigError as exc:
        fail(exc)

    def progress(msg: str) -> None:
        typer.echo(msg, err=True)  # stderr: stdout stays one JSON document with --json

    try:
        result = run_bench(settings, progress)
    except (ValueError, RuntimeError) as exc:
        fail(exc)
    if as_json:
        print(json.dumps(result))
        return
    _print_table(result)


def _print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    s = result["settings"]
    table = Table(
        title=f"{s['model_name']} on {s['device']} ({s['dtype']}), {s['new_tokens']} new "
        f"tokens, median of {s['reps']}, load {s['load_avg_before'][0]:.2f}",
    )
    for col in (
        "row",
        "tok/s (min-max)",
        "decode tok/s",
        "× hf_plain",
        "TTFT s",
        "× hf_plain",
        "peak MiB",
        "Δ MiB",
    ):
        table.add_column(col, justify="left" if col == "row" else "right")
    for r in result["rows"]:
        ratio = r.get("ratio_vs_hf_plain")
        tratio = r.get("ttft_ratio_vs_hf_plain")
        table.add_row(
            r["name"],
            f"{r['tokens_per_s']:.1f} ({r['tokens_per_s_min']:.1f}-{r['tokens_per_s_max']:.1f})",
            f"{r['decode_tokens_per_s']:.1f}",
            "-" if ratio is None else f"{ratio:.2f}",
            f"{r['ttft_s']:.3f}",
            "-" if tratio is None else f"{tratio:.2f}",
            f"{r['peak_mem_mib']:.0f}",
            f"{r['peak_mem_delta_mib']:.0f}",
        )
    console = Console()
    console.print(table)
    notes = []
    for r in result["rows"]:
        if "ratio_vs_hf_cfg" in r:
            notes.append(f"acd vs hf_cfg: {r['ratio_vs_hf_cfg']:.2f}×")
        if "ratio_vs_acd" in r:
            notes.append(f"{r['name']} vs acd: {r['ratio_vs_acd']:.2f}×")
        for other, same in r.get("same_tokens_as", {}).items():
            notes.append(f"{r['name']} tokens == {other}: {same}")
    if notes:
        console.print("; ".join(notes))
