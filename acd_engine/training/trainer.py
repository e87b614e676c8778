"""Opposite Prompt Optimisation: train SP and AP on the frozen model, resumably.

Layout. Each example is fed exactly as the engine lays out a request at inference:
``head + soft prompt + tail + response``, where head/tail come from :meth:`Engine.render`
(the chat template split at the system-prompt slot). PEFT's prompt tuning is not used because
it prepends virtual tokens before everything (before BOS and the template), while our slot is
inside the chat template; the part of PEFT that matters (fp32 virtual-token embeddings
trained against a frozen model) is a two-tensor AdamW here.

Cost. The model is frozen and in eval mode; only ``sp`` and ``ap`` get gradients. Each batch
runs every example twice (SP row and AP row) in one right-padded forward. With right padding
and causal attention no real token can see a pad, so no attention mask is needed, and the
vocabulary projection is applied only at the response positions that are scored.

Resume. A checkpoint holds the prompts, the AdamW state, the step/epoch cursor, running loss
sums, history and the best pack so far; data order is a pure function of ``(seed, epoch)``,
and the forward pass is deterministic, so an interrupted run resumed from its checkpoint ends
with the same tensors as an uninterrupted one. It also records what the state was trained
*on* (model fingerprint, anchor-set hash, a hash of the encoded examples, the settings that
change the result), and a resume that differs in any of them is refused: continuing anchors
A's state on anchors B would mix the two and report B.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from acd_engine.atomic import atomic_write
from acd_engine.config import DecodingConfig
from acd_engine.errors import ConfigError
from acd_engine.eval.judges import Judge, get_judge
from acd_engine.safety.prompts import OPPOSITE_PROMPT, SAFE_PROMPT, PromptPack
from acd_engine.training.anchors import Anchor, anchor_set_hash, load_anchors
from acd_engine.training.config import SHORT_OPPOSITE_PROMPT, SHORT_SAFE_PROMPT, TrainConfig
from acd_engine.training.data import OPOExample, OPOSplits
from acd_engine.training.evaluate import evaluate_anchors, selection_key, validation_subset
from acd_engine.training.losses import (
    IGNORE_INDEX,
    OBJECTIVES,
    Objective,
    Split,
    position_weights,
    sequence_losses,
)

__all__ = [
    "EncodedExample",
    "OPOTrainer",
    "TrainResult",
    "check_checkpoint",
    "encode_splits",
    "examples_hash",
    "init_pack",
    "read_checkpoint",
    "resume_settings",
    "split_quotas",
]

logger = logging.getLogger(__name__)

# Settings a resumed run must share with its checkpoint: everything that changes the data or
# the optimisation. Only the stopping rules (epochs, max_steps, patience) and checkpoint_every
# may change between a run and its resume.
_RESUME_KEYS = (
    "samples",
    "sources",
    "gen_max_new_tokens",
    "gen_temperature",
    "gen_top_p",
    "gen_batch_size",
    "judge",
    "seed",
    "fallback",
    "min_coverage",
    "per_anchor",
    "refusal_continuations",
    "refusal_openings",
    "refusal_max_new_tokens",
    "init",
    "n_virtual",
    "lr",
    "batch_size",
    "weight_decay",
    "grad_clip",
    "examples_per_epoch",
    "target_tokens",
    "first_token_weight",
    "first_tokens",
    "benign_refusal_weight",
    "refusal_opening_tokens",
    "ul_weight",
    "benign_weight",
    "ul_min_prob",
    "val_every",
    "val_per_kind",
    "val_max_new_tokens",
    "val_alpha",
    "val_plausibility",
    "overrefusal_margin",
)

_SPLITS: tuple[Split, ...] = ("hr", "ha", "s", "br")

# What a checkpoint must hold to be resumed (older or foreign files lack some).
_CHECKPOINT_KEYS = frozenset({"sp", "ap", "optimizer", "torch_rng", "state", "settings"})

# Identity entries of a checkpoint, in the order they are compared, with their names in
# messages. The settings are compared separately, field by field.
_IDENTITY = (
    ("fingerprint", "model fingerprint"),
    ("anchors_hash", "anchors hash"),
    ("data_hash", "training data hash"),
)


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of one example around the soft-prompt slot.

    Attributes:
        head: Template tokens before the slot.
        tail: Template tokens after the slot (the user turn and assistant header).
        response: Target tokens (EOS appended when the response finished).
        split: ``hr``, ``ha``, ``s`` or ``br`` (benign prompt, refusal opening).
    """

    head: tuple[int, ...]
    tail: tuple[int, ...]
    response: tuple[int, ...]
    split: Split


@dataclass
class TrainResult:
    """What :meth:`OPOTrainer.train` produced."""

    pack: PromptPack
    report: dict[str, Any]
    completed: bool


def _fit(init: torch.Tensor, n: int | None) -> torch.Tensor:
    """Truncate or cycle ``[k, H]`` init embeddings to ``n`` rows (``None`` keeps ``k``)."""
    if n is None or n == init.shape[0]:
        return init.clone()
    reps = math.ceil(n / init.shape[0])
    return init.repeat(reps, 1)[:n].clone()


def split_quotas(sizes: Mapping[str, int], examples_per_epoch: int | None) -> dict[Split, int]:
    """Examples of each non-empty split per epoch: all of them, or equal shares of the budget.

    A share never exceeds its split (an epoch repeats no example); the trainer's split
    weights make up for unequal shares. A function of the sizes alone, so the time estimate
    of a run (:mod:`acd_engine.training.estimate`) counts steps exactly as training takes
    them.
    """
    present = [s for s in _SPLITS if sizes.get(s)]
    if examples_per_epoch is None:
        return {s: sizes[s] for s in present}
    if not present:
        return {}
    share, extra = divmod(max(examples_per_epoch, len(present)), len(present))
    return {s: min(share + (1 if i < extra else 0), sizes[s]) for i, s in enumerate(present)}


def init_pack(engine: Any, cfg: TrainConfig) -> PromptPack:
    """The untrained SP/AP: embeddings of the init texts, fitted to ``cfg.n_virtual``."""
    safe, opposite = (
        (SAFE_PROMPT, OPPOSITE_PROMPT)
        if cfg.init == "manual"
        else (SHORT_SAFE_PROMPT, SHORT_OPPOSITE_PROMPT)
    )
    base = PromptPack.from_manual_prompts(
        engine.model, engine.tokenizer, safe, opposite, fingerprint=engine.fingerprint
    )
    return PromptPack(
        sp=_fit(base.sp, cfg.n_virtual),
        ap=_fit(base.ap, cfg.n_virtual),
        fingerprint=base.fingerprint,
        metadata={**base.metadata, "init": cfg.init},
    )


def encode_splits(engine: Any, splits: OPOSplits, cfg: TrainConfig) -> list[EncodedExample]:
    """Tokenise every example around the slot, exactly as :meth:`Engine.render` splits it."""
    eos = engine.tokenizer.eos_token_id
    if eos is None:
        eos = min(engine.eos_token_ids)
    out: list[EncodedExample] = []
    cache: dict[str, tuple[list[int], list[int]]] = {}
    groups: tuple[tuple[Split, list[OPOExample]], ...] = (
        ("hr", splits.hr),
        ("ha", splits.ha),
        ("s", splits.s),
        ("br", splits.br),
    )
    for split, examples in groups:
        # A refusal opening is trained only on its first tokens, and never on an EOS.
        limit = min(cfg.target_tokens, cfg.refusal_opening_tokens) if split == "br" else None
        for ex in examples:
            if ex.prompt not in cache:
                r = engine.render([{"role": "user", "content": ex.prompt}])
                cache[ex.prompt] = (r.head, r.tail)
            head, tail = cache[ex.prompt]
            resp = list(engine.tokenizer.encode(ex.response, add_special_tokens=False))
            if ex.finished and limit is None:
                resp.append(int(eos))
            resp = resp[: limit or cfg.target_tokens]
            if not resp:
                continue
            out.append(EncodedExample(tuple(head), tuple(tail), tuple(resp), split))
    return out


def examples_hash(examples: Sequence[EncodedExample]) -> str:
    """Hash of the encoded training examples: a resume must train on exactly these."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.head, ex.tail, ex.response, ex.split]).encode())
    return h.hexdigest()


def resume_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The settings a checkpoint records and a resume must match (see ``_RESUME_KEYS``)."""
    dump = cfg.model_dump(mode="json")
    return {k: dump[k] for k in _RESUME_KEYS}


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by :class:`OPOTrainer`, refusing anything else cleanly.

    ``weights_only=True`` keeps a hostile file from running code; whatever torch raises for a
    torn or foreign file becomes one :class:`ConfigError` that says what to do.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types (EOFError, UnpicklingError, ...)  # noqa: BLE001
        raise ConfigError(
            f"checkpoint '{path}' must be a checkpoint written by acd train, got "
            f"{type(exc).__name__}: {str(exc)[:200]}; use a new --out or delete the checkpoint"
        ) from None
    if not isinstance(state, dict) or not state.keys() >= _CHECKPOINT_KEYS:
        have = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ConfigError(
            f"checkpoint '{path}' must hold {sorted(_CHECKPOINT_KEYS)}, got {have}; use a new "
            "--out or delete the checkpoint"
        )
    return state


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= 16 else text[:12] + "..."


def check_checkpoint(
    path: Path, state: dict[str, Any], expected: dict[str, Any], *, what: str = "checkpoint"
) -> None:
    """Refuse to resume ``state`` unless it was made with ``expected``'s identity and settings.

    Args:
        path: The checkpoint (for messages).
        state: What :func:`read_checkpoint` returned.
        expected: Any of ``fingerprint`` (dict), ``anchors_hash``, ``data_hash`` (str) and
            ``settings`` (:func:`resume_settings`); only the keys given are compared, so a
            caller can check the cheap ones before sampling and the rest later.

    Raises:
        ConfigError: naming the first difference and the way out.

    ``what`` names the file in messages: the trained pack that ``acd train`` keeps for its
    gate phase is checked by the same rule (:func:`acd_engine.training.run.train_pack`).
    """
    for key, label in _IDENTITY:
        if key not in expected:
            continue
        raw = state.get(key)
        theirs = json.loads(raw) if key == "fingerprint" and isinstance(raw, str) else raw
        ours = expected[key]
        if theirs == ours:
            continue
        if key == "fingerprint" and isinstance(theirs, dict):
            differ = ", ".join(
                f"{k} ({what} {theirs.get(k)!r}, now {ours.get(k)!r})"
                for k in sorted(set(theirs) | set(ours))
                if theirs.get(k) != ours.get(k)
            )
            raise ConfigError(
                f"{what} '{path}' was made with another model: {differ} differ; use a new "
                f"--out or delete the {what}"
            )
        was = "(not recorded)" if theirs is None else _short(theirs)
        raise ConfigError(
            f"{what} '{path}' was made with {label} {was}, got {_short(ours)}; use a new "
            f"--out or delete the {what}"
        )
    if "settings" in expected:
        raw = state.get("settings")
        theirs = json.loads(raw) if isinstance(raw, str) else {}
        ours = expected["settings"]
        diffs = [
            f"{k} ({what} {theirs.get(k)!r}, now {ours[k]!r})"
            for k in ours
            if theirs.get(k) != ours[k]
        ]
        if diffs:
            raise ConfigError(
                f"resume must use the {what}'s settings; differs: {', '.join(diffs)}. "
                f"Rerun with those settings or delete {path}"
            )


class OPOTrainer:
    """Trains SP and AP on encoded OPO examples against a frozen model.

    Args:
        engine: The target model's engine (its model is frozen, never modified).
        examples: Encoded training examples (:func:`encode_splits`).
        cfg: Run settings.
        splits_info: Split sizes, fallback counts and data stats, copied into the report.
        val_anchors: Anchors for model selection (default: the ``val`` split).
        judge: Labeller for validation answers (default ``get_judge(cfg.judge)``).
        anchors_hash: Hash of the anchor file trained on (default: the packaged set's).
    """

    def __init__(
        self,
        engine: Any,
        examples: Sequence[EncodedExample],
        cfg: TrainConfig,
        *,
        splits_info: dict[str, Any] | None = None,
        val_anchors: Sequence[Anchor] | None = None,
        judge: Judge | None = None,
        anchors_hash: str | None = None,
    ) -> None:
        if not examples:
            raise ConfigError("examples must not be empty, got 0 encoded OPO examples")
        self.engine = engine
        self.examples = list(examples)
        self.cfg = cfg
        self.splits_info = splits_info or {}
        self.val_anchors = list(val_anchors) if val_anchors is not None else None
        self.judge = judge
        self.anchors_hash = anchors_hash or anchor_set_hash()
        self.by_split = {
            s: [i for i, e in enumerate(self.examples) if e.split == s] for s in _SPLITS
        }
        present = [s for s in _SPLITS if self.by_split[s]]
        self.quota = split_quotas(
            {s: len(self.by_split[s]) for s in _SPLITS}, cfg.examples_per_epoch
        )
        per_epoch = sum(self.quota.values())
        # Each split contributes equally (mean of per-split means), whatever its share of
        # an epoch.
        self.split_weight = {
            s: per_epoch / (len(present) * self.quota[s]) if self.quota.get(s) else 0.0
            for s in _SPLITS
        }

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps in one epoch (the last batch may be short)."""
        return math.ceil(sum(self.quota.values()) / self.cfg.batch_size)

    def epoch_order(self, epoch: int) -> list[int]:
        """Example indices of one epoch, in training order: a pure function of (seed, epoch).

        With ``examples_per_epoch`` each split walks through its own seeded shuffle, epoch
        ``e`` taking the next ``quota`` indices (wrapping around), so consecutive epochs see
        different examples; the picks are then shuffled together.
        """
        seed = self.cfg.seed * 100_003
        if self.cfg.examples_per_epoch is None:
            picked = list(range(len(self.examples)))
        else:
            picked = []
            for k, (split, q) in enumerate(self.quota.items()):
                pool = self.by_split[split]
                perm = torch.randperm(
                    len(pool), generator=torch.Generator().manual_seed(seed + 7919 * (k + 1))
                ).tolist()
                picked += [pool[perm[(epoch * q + j) % len(pool)]] for j in range(q)]
        mix = torch.randperm(len(picked), generator=torch.Generator().manual_seed(seed + epoch))
        return [picked[i] for i in mix.tolist()]

    # ------------------------------------------------------------------ batching
    def _batch_loss(
        self, batch: Sequence[EncodedExample], sp: torch.Tensor, ap: torch.Tensor
    ) -> tuple[torch.Tensor, float, float]:
        """Weighted loss of one batch (SP rows + AP rows) and its SP / AP parts."""
        model = self.engine.model
        emb = model.get_input_embeddings()
        dev, dtype = emb.weight.device, emb.weight.dtype
        rows: list[torch.Tensor] = []
        targets: list[tuple[int, list[int]]] = []  # (first scored position, token ids)
        objectives: list[Objective] = []
        weights: list[float] = []
        for prompt_name, soft in (("sp", sp), ("ap", ap)):
            for ex in batch:
                with torch.no_grad():
                    head = emb(torch.tensor(ex.head, dtype=torch.long, device=dev))
                    post = emb(torch.tensor(ex.tail + ex.response, dtype=torch.long, device=dev))
                rows.append(torch.cat([head, soft.to(dev, dtype), post], dim=0))
                start = len(ex.head) + soft.shape[0] + len(ex.tail)
                targets.append((start, list(ex.response)))
                objective = OBJECTIVES[prompt_name][ex.split]
                objectives.append(objective)
                w = self.split_weight[ex.split]
                w *= self.cfg.ul_weight if objective == "ul" else 1.0
                w *= self.cfg.benign_weight if ex.split == "s" else 1.0
                w *= self.cfg.benign_refusal_weight if ex.split == "br" else 1.0
                weights.append(w)
        width = max(r.shape[0] for r in rows)
        embeds = rows[0].new_zeros(len(rows), width, rows[0].shape[1])
        for i, r in enumerate(rows):
            embeds[i, : r.shape[0]] = r  # right padding: causal attention never sees it
        longest = max(len(t) for _, t in targets)
        index = torch.zeros(len(rows), longest, dtype=torch.long, device=dev)
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long, device=dev)
        for i, (start, toks) in enumerate(targets):
            index[i, : len(toks)] = torch.arange(start - 1, start - 1 + len(toks))
            labels[i, : len(toks)] = torch.tensor(toks)
        logits = self._response_logits(embeds, index)  # [R, L, V]
        positions = position_weights(
            longest, self.cfg.first_token_weight, self.cfg.first_tokens, device=dev
        )
        per_row = sequence_losses(
            logits,
            labels,
            objectives,
            self.cfg.ul_min_prob,
            positions,
        )
        weighted = per_row * torch.tensor(weights, device=dev) / len(batch)
        half = len(batch)
        parts = weighted.detach()
        return weighted.sum(), float(parts[:half].sum()), float(parts[half:].sum())

    def _response_logits(self, embeds: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Logits at the scored positions only: ``[R, T, H]`` + ``[R, L]`` -> ``[R, L, V]``."""
        model = self.engine.model
        head = model.get_output_embeddings()
        cfg = model.config
        plain_head = (
            head is not None
            and not getattr(cfg, "final_logit_softcapping", None)
            and (getattr(cfg, "logit_scale", None) in (None, 1.0))
        )
        if plain_head:
            hidden = model.base_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
            picked = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
            return head(picked)
        logits = model(inputs_embeds=embeds, use_cache=False).logits  # generic fallback
        return logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1]))

    # ------------------------------------------------------------------ checkpoints
    def identity(self) -> dict[str, Any]:
        """What this run trains on and with: recorded in, and compared against, checkpoints."""
        return {
            "fingerprint": dict(self.engine.fingerprint),
            "anchors_hash": self.anchors_hash,
            "data_hash": examples_hash(self.examples),
            "settings": resume_settings(self.cfg),
        }

    def _save_checkpoint(self, path: Path, state: dict[str, Any]) -> None:
        atomic_write(path, lambda tmp: torch.save(state, tmp))

    def _load_checkpoint(self, path: Path) -> dict[str, Any]:
        state = read_checkpoint(path)
        check_checkpoint(path, state, self.identity())
        return state

    # ------------------------------------------------------------------ training
    def _soft_prompts(self, base: PromptPack) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
        """SP and AP as trainable fp32 tensors on the device of the model's embeddings, with
        the model frozen (eval mode, no gradients).

        fp32 whatever the model's dtype, as PEFT keeps its virtual tokens: a bf16 model's
        rows get a bf16 copy per batch (:meth:`_batch_loss`), and the gradient flows back
        into the fp32 prompts, so AdamW's small updates are not rounded away. On the
        embeddings' device, so a GPU run moves no tensor to the CPU per step.
        """
        model = self.engine.model
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        device = model.get_input_embeddings().weight.device
        sp = torch.nn.Parameter(base.sp.to(device, torch.float32).clone())
        ap = torch.nn.Parameter(base.ap.to(device, torch.float32).clone())
        return sp, ap

    def measure_step(self) -> float:
        """Seconds of one training step's forward and backward on the first batch of epoch
        0, on this model and device, leaving no trace (no optimiser step, no checkpoint):
        what :mod:`acd_engine.training.estimate` multiplies by the number of steps."""
        sp, ap = self._soft_prompts(init_pack(self.engine, self.cfg))
        batch = [self.examples[i] for i in self.epoch_order(0)[: self.cfg.batch_size]]
        start = time.perf_counter()
        with torch.enable_grad():
            loss, _, _ = self._batch_loss(batch, sp, ap)
            loss.backward()
        assert sp.grad is not None
        float(sp.grad.norm())  # waits for an asynchronous device to finish the backward
        return time.perf_counter() - start

    def _val_set(self) -> list[Anchor]:
        anchors = self.val_anchors if self.val_anchors is not None else load_anchors("val")
        return validation_subset(anchors, self.cfg.val_per_kind)

    def _validate(self, sp: torch.Tensor, ap: torch.Tensor, base: PromptPack) -> dict[str, Any]:
        """acd (SP - val_alpha * AP, ungated: the contrast itself) on the validation set."""
        judge = self.judge or get_judge(self.cfg.judge)
        pack = PromptPack(
            sp.detach().clone(), ap.detach().clone(), base.fingerprint, dict(base.metadata)
        )
        dcfg = DecodingConfig(
            method="acd",
            alpha=self.cfg.val_alpha,
            plausibility=self.cfg.val_plausibility,
            max_new_tokens=self.cfg.val_max_new_tokens,
            gate=False,
        )
        metrics = evaluate_anchors(self.engine, self._val_set(), dcfg, judge, pack=pack)
        metrics.pop("responses")
        return metrics

    def base_over_refusal(self) -> dict[str, Any]:
        """Over-refusal of method 'base' (manual safe prompt) on the benign validation prompts.

        Measured once per run: the reference the selection rule's limit is built on.
        """
        judge = self.judge or get_judge(self.cfg.judge)
        benign = [a for a in self._val_set() if a.label == "benign"]
        dcfg = DecodingConfig(method="base", max_new_tokens=self.cfg.val_max_new_tokens)
        metrics = evaluate_anchors(self.engine, benign, dcfg, judge)
        return {
            "over_refusal": metrics["over_refusal"] or 0.0,
            "benign_answer": metrics["benign_answer"],
            "n_benign": metrics["n_benign"],
        }

    def train(
        self,
        checkpoint: Path | None = None,
        *,
        resume: bool = False,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> TrainResult:
        """Run (or continue) OPO and return the selected pack and a report.

        Args:
            checkpoint: Where to write resumable state (``None``: no checkpoints).
            resume: Continue from ``checkpoint`` if it exists (settings must match).
            progress: Called after every step with ``{"step", "epoch", "loss", "steps_total"}``.

        Selection. With validation on, the initial prompts (epoch 0) and every
        ``val_every``-th epoch are decoded under acd; the method 'base' over-refusal on the
        same benign prompts is measured once. The kept pack is the epoch with the highest
        harmful refusal among those whose over-refusal is at most base +
        ``overrefusal_margin`` (see :func:`~acd_engine.training.evaluate.selection_key`).

        Returns:
            The selected pack (the last one when validation is off), the report, and whether
            all epochs ran (False when ``max_steps`` stopped it early).
        """
        cfg = self.cfg
        base = init_pack(self.engine, cfg)
        sp, ap = self._soft_prompts(base)
        opt = torch.optim.AdamW([sp, ap], lr=cfg.lr, weight_decay=cfg.weight_decay)
        n_batches = self.steps_per_epoch
        state: dict[str, Any] = {
            "epoch": 0,
            "batch": 0,
            "step": 0,
            "sums": [0.0, 0.0, 0.0],
            "history": [],
            "best": None,
            "stale": 0,
            "seconds": 0.0,
            "stopped_early": False,
            "base": None,
        }
        if resume and checkpoint is not None and checkpoint.exists():
            saved = self._load_checkpoint(checkpoint)
            try:
                with torch.no_grad():
                    sp.copy_(saved["sp"])
                    ap.copy_(saved["ap"])
                opt.load_state_dict(saved["optimizer"])
                torch.set_rng_state(saved["torch_rng"])
                state = json.loads(saved["state"])
                if saved.get("best_sp") is not None:
                    state["best"]["sp"], state["best"]["ap"] = saved["best_sp"], saved["best_ap"]
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                # Identity matched but the contents do not fit (edited or foreign file).
                raise ConfigError(
                    f"checkpoint '{checkpoint}' must hold state that fits this run, got "
                    f"{type(exc).__name__}: {str(exc)[:200]}; use a new --out or delete the "
                    "checkpoint"
                ) from None
            logger.info(
                "resumed from %s at epoch %d batch %d (step %d)",
                checkpoint,
                state["epoch"] + 1,
                state["batch"],
                state["step"],
            )

        identity = self.identity()

        def save() -> None:
            if checkpoint is None:
                return
            best = state["best"]
            meta = dict(state)
            if best is not None:
                meta["best"] = {k: v for k, v in best.items() if k not in ("sp", "ap")}
            self._save_checkpoint(
                checkpoint,
                {
                    "sp": sp.detach().cpu().clone(),
                    "ap": ap.detach().cpu().clone(),
                    "optimizer": opt.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "state": json.dumps(meta),
                    "settings": json.dumps(identity["settings"]),
                    "fingerprint": json.dumps(identity["fingerprint"], sort_keys=True),
                    "anchors_hash": identity["anchors_hash"],
                    "data_hash": identity["data_hash"],
                    "best_sp": None if best is None else best["sp"].cpu(),
                    "best_ap": None if best is None else best["ap"].cpu(),
                },
            )

        completed = True
        started = time.perf_counter() - state["seconds"]

        def limit() -> float:
            return float(state["base"]["over_refusal"]) + cfg.overrefusal_margin

        def consider(epoch: int, val: dict[str, Any]) -> None:
            """Make ``epoch`` the selected one if the rule prefers it to the current choice."""
            best = state["best"]
            val["within_limit"] = selection_key(val, limit())[0] == 1
            if best is None or selection_key(val, limit()) > selection_key(best["val"], limit()):
                state["best"] = {
                    "epoch": epoch,
                    "val": val,
                    "sp": sp.detach().clone(),
                    "ap": ap.detach().clone(),
                }
                state["stale"] = 0
            else:
                state["stale"] += 1

        if cfg.val_every and state.get("base") is None:
            state["base"] = self.base_over_refusal()
            logger.info("base over-refusal on the benign val prompts: %s", state["base"])
        if cfg.val_every and not state["history"] and state["step"] == 0:
            val = self._validate(sp, ap, base)  # epoch 0: the initialisation is a candidate
            consider(0, val)
            state["history"].append({"epoch": 0, "val": val, "seconds": 0.0})
            logger.info("epoch 0 (init): val %s", json.dumps(val))
            save()
        while state["epoch"] < cfg.epochs and not state["stopped_early"]:
            epoch = state["epoch"]
            order = self.epoch_order(epoch)
            while state["batch"] < n_batches:
                b = state["batch"]
                batch = [
                    self.examples[i] for i in order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                ]
                opt.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    loss, l_sp, l_ap = self._batch_loss(batch, sp, ap)
                    if not math.isfinite(l_sp + l_ap):
                        # Stop before the step: a NaN would poison SP/AP and every later
                        # checkpoint, and only surface as a refused pack at the end.
                        raise ConfigError(
                            f"training loss must be finite, got {l_sp + l_ap} at step "
                            f"{state['step'] + 1}; lower lr (now {cfg.lr}) or grad_clip and "
                            "rerun (the last checkpoint is intact)"
                        )
                    loss.backward()
                torch.nn.utils.clip_grad_norm_([sp, ap], cfg.grad_clip)
                opt.step()
                state["sums"][0] += l_sp * len(batch)
                state["sums"][1] += l_ap * len(batch)
                state["sums"][2] += len(batch)
                state["batch"] += 1
                state["step"] += 1
                state["seconds"] = time.perf_counter() - started
                if progress is not None:
                    progress(
                        {
                            "step": state["step"],
                            "epoch": epoch + 1,
                            "loss": loss.item(),
                            "steps_total": cfg.epochs * n_batches,
                        }
                    )
                if state["step"] % cfg.checkpoint_every == 0:
                    save()
                if cfg.max_steps is not None and state["step"] >= cfg.max_steps:
                    break
            if state["batch"] < n_batches:  # stopped by max_steps mid-epoch
                completed = False
                save()
                break
            n = max(state["sums"][2], 1.0)
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "loss_sp": state["sums"][0] / n,
                "loss_ap": state["sums"][1] / n,
                "seconds": time.perf_counter() - started,
            }
            if cfg.val_every and (epoch + 1) % cfg.val_every == 0:
                val = self._validate(sp, ap, base)
                record["val"] = val
                consider(epoch + 1, val)
                if state["stale"] >= cfg.patience:
                    state["stopped_early"] = True
                    logger.info("early stop: %d validations without improvement", state["stale"])
            logger.info(
                "epoch %d: loss_sp %.4f loss_ap %.4f%s",
                epoch + 1,
                record["loss_sp"],
                record["loss_ap"],
                f" val {json.dumps(record['val'])}" if "val" in record else "",
            )
            state["history"].append(record)
            state["epoch"] += 1
            state["batch"] = 0
            state["sums"] = [0.0, 0.0, 0.0]
            state["seconds"] = time.perf_counter() - started
            save()
            if cfg.max_steps is not None and state["step"] >= cfg.max_steps:
                completed = state["epoch"] >= cfg.epochs or state["stopped_early"]
                break

        best = state["best"]
        final_sp, final_ap = (
            (best["sp"], best["ap"]) if best is not None else (sp.detach(), ap.detach())
        )
        selection: dict[str, Any] | None = None
        if best is not None and state["base"] is not None:
            selection = {
                "rule": "highest harmful refusal among epochs with over_refusal <= base "
                "over_refusal + overrefusal_margin (acd, ungated, val_alpha, val_plausibility); "
                "if none qualifies, the lowest over_refusal",
                "base_over_refusal": state["base"]["over_refusal"],
                "limit": limit(),
                "constraint_met": bool(best["val"].get("within_limit")),
                "selected_epoch": best["epoch"],
            }
            if not selection["constraint_met"]:
                logger.warning(
                    "no validated epoch kept over-refusal within %.3f (base %.3f + %.3f); "
                    "kept epoch %d, the least over-refusing",
                    limit(),
                    state["base"]["over_refusal"],
                    cfg.overrefusal_margin,
                    best["epoch"],
                )
        per_epoch = [
            {
                "epoch": r["epoch"],
                "harmful_refusal": r["val"]["harmful_refusal"],
                "refusal_by_kind": r["val"].get("refusal_by_kind"),
                "over_refusal": r["val"]["over_refusal"],
                "lookalike_answer": r["val"].get("lookalike_answer"),
                "within_limit": r["val"].get("within_limit"),
                "loss_sp": r.get("loss_sp"),
                "loss_ap": r.get("loss_ap"),
            }
            for r in state["history"]
            if "val" in r
        ]
        report: dict[str, Any] = {
            "completed": completed,
            "config": cfg.model_dump(mode="json"),
            "model": self.engine.model_name,
            "fingerprint": self.engine.fingerprint,
            "anchor_set_hash": self.anchors_hash,
            "examples": len(self.examples),
            **self.splits_info,
            "epochs": state["history"],
            "steps": state["step"],
            "stopped_early": state["stopped_early"],
            "selected_epoch": best["epoch"] if best is not None else len(state["history"]),
            "val": best["val"] if best is not None else None,
            "base": state["base"],
            "selection": selection,
            "per_epoch": per_epoch,
            "train_seconds": state["seconds"],
        }
        metadata = {
            **base.metadata,
            "trained": "true",
            "training": json.dumps(cfg.model_dump(mode="json"), sort_keys=True),
            "anchor_set_hash": self.anchors_hash,
            "selected_epoch": str(report["selected_epoch"]),
            "recommended_alpha": str(cfg.val_alpha),
            "recommended_plausibility": str(cfg.val_plausibility),
        }
        if report["val"] is not None:
            metadata["val"] = json.dumps(report["val"], sort_keys=True)
        pack = PromptPack(final_sp.clone(), final_ap.clone(), base.fingerprint, metadata)
        return TrainResult(pack=pack, report=report, completed=completed)
