"""How long ``acd train`` will take, measured on the model and the device at hand.

A run on one's own model takes minutes or hours depending on the model's size and the
device, and a figure measured on our CPU says nothing about either. So before the expensive
part :func:`~acd_engine.training.run.train_pack` times a few items of each phase on the
actual engine and multiplies by the counts the run will do:

* **sampling**: one batch of ``gen_batch_size`` rows prefilled, and a few decode steps
  (:func:`~acd_engine.training.data.time_sampling`), times the batches the response cache
  still lacks;
* **training**: one step's forward and backward (:meth:`OPOTrainer.measure_step`) on a
  batch of training anchors with stand-in responses of the trained length, times the steps
  left; plus one batch of validation prompts decoded as the trainer's validation decodes
  them, times the validation batches left (the base pass counted at the same rate);
* **gate reading**: a few placed anchors read at every decoder layer (an upper bound: the
  fitted gate's forward stops after its deepest layer), times the placements, plus the
  layer search's forwards of the bare anchors.

The probe's fit after the reading (seconds to minutes, on the CPU) is not estimated. The
figures are rough: a busy machine, early stopping (``patience``) or answers that end early
move them, and the text says so.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from acd_engine.config import DecodingConfig
from acd_engine.safety.gate import decoder_layers
from acd_engine.safety.pack_info import format_duration
from acd_engine.training.anchors import Anchor, anchor_set_hash, load_anchors
from acd_engine.training.config import TrainConfig
from acd_engine.training.data import (
    OPOExample,
    OPOSplits,
    fallback_refusal,
    pending_samples,
    refusal_opening,
    time_sampling,
)
from acd_engine.training.evaluate import batched_answers, validation_subset
from acd_engine.training.gate_fit import GateFitConfig, place_anchors, read_placed
from acd_engine.training.trainer import OPOTrainer, encode_splits, init_pack, split_quotas

__all__ = ["PhaseEstimate", "RunEstimate", "estimate_run", "format_estimate"]

VAL_BATCH = 16
"""Validation prompts decoded together (the trainer's ``evaluate_anchors`` default)."""

GATE_SAMPLES = 6
"""Placed anchors timed for the gate's estimate, spread over the shapes."""


@dataclass(frozen=True)
class PhaseEstimate:
    """One phase: its predicted seconds (0: nothing left to do) and the counts, in words."""

    name: str
    seconds: float
    work: str


@dataclass(frozen=True)
class RunEstimate:
    """The phases of one run, where they were measured and what measuring cost."""

    device: str
    dtype: str
    phases: tuple[PhaseEstimate, ...]
    measured_seconds: float

    @property
    def total(self) -> float:
        return sum(p.seconds for p in self.phases)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON values (for the run's report)."""
        return {**asdict(self), "total": self.total}


def _ms(seconds: float) -> str:
    """A measured unit's time: ``"12 ms"`` below a second, else ``"1.42 s"``."""
    return f"{1000 * seconds:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _about(seconds: float) -> str:
    text = format_duration(seconds)
    return text if text.startswith("<") else "~" + text


def format_estimate(estimate: RunEstimate) -> str:
    """The estimate as ``acd train`` prints it before the expensive part."""
    lines = [
        f"estimate on {estimate.device} ({estimate.dtype}), measured on this model in "
        f"{format_duration(estimate.measured_seconds)}:"
    ]
    for p in estimate.phases:
        lines.append(f"  {p.name:<9}{_about(p.seconds):>10}  {p.work}")
    lines.append(
        f"  {'total':<9}{_about(estimate.total):>10}  rough: a busy machine, early stopping "
        "or answers that end early move it"
    )
    return "\n".join(lines)


def _expected_sizes(anchors: Sequence[Anchor], cfg: TrainConfig) -> dict[str, int]:
    """Upper bounds of the splits' sizes before anything is sampled (see ``data.py``: each
    split keeps ``per_anchor`` examples per anchor; without that limit every response
    counts)."""
    harmful = sum(a.label == "harmful" for a in anchors)
    benign = len(anchors) - harmful
    per = cfg.per_anchor
    responses = len(cfg.sources) * cfg.samples
    if per is None:
        hr_ha = harmful * (responses + int(cfg.refusal_continuations))
        hr = ha = math.ceil(hr_ha / 2)
        s = benign * responses
    else:
        hr = ha = harmful * per
        s = benign * per
    br = benign * (per or 1) if cfg.benign_refusal_weight > 0 else 0
    return {"hr": hr, "ha": ha, "s": s, "br": br}


def _stand_in_examples(engine: Any, anchors: Sequence[Anchor], cfg: TrainConfig) -> Any:
    """One batch of training anchors with stand-in responses at least as long as the
    trained targets, each split in turn: what a real step's rows look like."""
    picked = [anchors[i % len(anchors)] for i in range(cfg.batch_size)]
    splits = OPOSplits()
    for i, a in enumerate(picked):
        long = " ".join([fallback_refusal(a.id)] * 3)  # cut to target_tokens when encoded
        example = OPOExample(a.id, a.prompt, long, False, "estimate", a.kind)
        which = ("hr", "ha", "s", "br")[i % 4]
        if which == "br":
            opening = refusal_opening(a.id, cfg.refusal_openings)
            example = OPOExample(a.id, a.prompt, opening, False, "estimate", a.kind)
        getattr(splits, which).append(example)
    return encode_splits(engine, splits, cfg)


def _sampling(
    engine: Any,
    train: Sequence[Anchor],
    cfg: TrainConfig,
    cache_dir: Path | None,
    anchors_hash: str,
) -> PhaseEstimate:
    answers, refusals, cached = pending_samples(engine, train, cfg, cache_dir, anchors_hash)
    if answers + refusals == 0:
        return PhaseEstimate("sampling", 0.0, f"all {cached:,} responses are in the cache")
    prefill, per_token = time_sampling(engine, train, cfg)
    size = cfg.gen_batch_size
    n_answers, n_refusals = math.ceil(answers / size), math.ceil(refusals / size)
    seconds = n_answers * (prefill + (cfg.gen_max_new_tokens - 1) * per_token)
    seconds += n_refusals * (prefill + (cfg.refusal_max_new_tokens - 1) * per_token)
    return PhaseEstimate(
        "sampling",
        seconds,
        f"{answers + refusals:,} responses to sample ({cached:,} cached) in "
        f"{n_answers + n_refusals:,} batches of {size}; a batch prefills in {_ms(prefill)} "
        f"and samples a token in {_ms(per_token)}",
    )


def _training(
    engine: Any,
    train: Sequence[Anchor],
    val: Sequence[Anchor],
    cfg: TrainConfig,
    state: dict[str, Any] | None,
) -> PhaseEstimate:
    quotas = split_quotas(_expected_sizes(train, cfg), cfg.examples_per_epoch)
    per_epoch = math.ceil(sum(quotas.values()) / cfg.batch_size)
    total = cfg.epochs * per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    state = state or {}
    finished = state.get("epoch", 0) >= cfg.epochs or bool(state.get("stopped_early"))
    steps = 0 if finished else max(0, total - int(state.get("step", 0)))
    passes = (1 + cfg.epochs // cfg.val_every) if cfg.val_every else 0
    done = sum("val" in r for r in state.get("history", []))
    validations = 0 if finished else max(0, passes - done)
    subset = validation_subset(val, cfg.val_per_kind)
    benign = sum(a.label == "benign" for a in subset)
    base_pass = bool(cfg.val_every) and not finished and state.get("base") is None
    batches = validations * math.ceil(len(subset) / VAL_BATCH)
    batches += math.ceil(benign / VAL_BATCH) if base_pass else 0
    if steps == 0 and batches == 0:
        return PhaseEstimate("training", 0.0, "done: the checkpoint holds the finished run")
    step = 0.0
    if steps:
        trainer = OPOTrainer(
            engine, _stand_in_examples(engine, train, cfg), cfg, anchors_hash="estimate"
        )
        step = trainer.measure_step()
    per_batch = 0.0
    if batches:
        dcfg = DecodingConfig(
            method="acd",
            alpha=cfg.val_alpha,
            plausibility=cfg.val_plausibility,
            max_new_tokens=cfg.val_max_new_tokens,
            gate=False,
        )
        prompts = [a.prompt for a in subset[:VAL_BATCH]]
        start = time.perf_counter()
        batched_answers(engine, prompts, dcfg, pack=init_pack(engine, cfg), batch_size=VAL_BATCH)
        per_batch = time.perf_counter() - start
    work = (
        f"{steps:,} steps of {cfg.batch_size} examples at {_ms(step)} ({cfg.epochs} "
        f"epoch{'s' if cfg.epochs != 1 else ''} of ~{per_epoch} steps); {validations} validations of {len(subset)} prompts"
        + (" and one base pass" if base_pass else "")
        + f" at {_ms(per_batch)} per batch of {min(VAL_BATCH, len(subset))}"
    )
    return PhaseEstimate("training", steps * step + batches * per_batch, work)


def _gate(
    engine: Any, train: Sequence[Anchor], val: Sequence[Anchor], cfg: GateFitConfig
) -> PhaseEstimate:
    placed_train = place_anchors(train, "train", cfg)
    placed = placed_train + place_anchors(val, "val", cfg)
    n_train = len(placed_train)
    every = list(range(len(decoder_layers(engine.model))))
    layers = list(cfg.layers) if cfg.layers is not None else every
    sample = [placed[i * len(placed) // GATE_SAMPLES] for i in range(GATE_SAMPLES)]
    read_placed(engine, sample[0].placed, layers, cfg.scope)  # warm-up
    start = time.perf_counter()
    for p in sample:
        read_placed(engine, p.placed, layers, cfg.scope)
    per_read = (time.perf_counter() - start) / len(sample)
    seconds = per_read * len(placed)
    work = (
        f"{len(placed):,} placed anchors ({n_train:,} train, {len(placed) - n_train:,} val) at "
        f"{_ms(per_read)} each"
    )
    if cfg.layers is None:
        bare = [*train, *val]
        start = time.perf_counter()
        for a in bare[:3]:
            engine.gate_states(a.prompt, every, "request").cpu()
        per_bare = (time.perf_counter() - start) / min(3, len(bare))
        seconds += per_bare * len(bare)
        work += f", and {len(bare):,} bare anchors at {_ms(per_bare)} to choose the layers"
    return PhaseEstimate("gate", seconds, work + "; the probe's fit comes on top")


def estimate_run(
    engine: Any,
    cfg: TrainConfig,
    *,
    anchors_path: Path | None = None,
    cache_dir: Path | None = None,
    gate: GateFitConfig | None = None,
    train_state: dict[str, Any] | None = None,
    trained: bool = False,
) -> RunEstimate:
    """Time a few items of each phase left to run on ``engine`` and scale by the counts.

    Args:
        engine: The target model's engine (its model and device are what is measured).
        cfg: The run's settings.
        anchors_path: The anchor file (default: the packaged set).
        cache_dir: The response cache (responses already there cost nothing).
        gate: How the gate will be fitted; None: no gate phase.
        train_state: A resumed checkpoint's state (steps and validations already done).
        trained: The trained pack exists already, so only the gate is left.
    """
    start = time.perf_counter()
    train = load_anchors("train", anchors_path)
    val = load_anchors("val", anchors_path)
    phases: list[PhaseEstimate] = []
    if trained:
        done = "done: the trained pack from an earlier run is kept"
        phases += [PhaseEstimate("sampling", 0.0, done), PhaseEstimate("training", 0.0, done)]
    else:
        phases.append(_sampling(engine, train, cfg, cache_dir, anchor_set_hash(anchors_path)))
        phases.append(_training(engine, train, val, cfg, train_state))
    if gate is not None:
        phases.append(_gate(engine, train, val, gate))
    weight = engine.model.get_input_embeddings().weight
    return RunEstimate(
        device=str(weight.device),
        dtype=str(weight.dtype).replace("torch.", ""),
        phases=tuple(phases),
        measured_seconds=time.perf_counter() - start,
    )
