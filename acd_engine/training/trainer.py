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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from acd_engine.atomic import atomic_write
from acd_engine.config import DecodingConfig
from acd_engine.errors import ConfigError
from acd_engine.eval.judges import Judge, get_judge
from acd_engine.prompts import OPPOSITE_PROMPT, SAFE_PROMPT, PromptPack
from acd_engine.training.anchors import Anchor, anchor_set_hash, load_anchors
from acd_engine.training.config import SHORT_OPPOSITE_PROMPT, SHORT_SAFE_PROMPT, TrainConfig
from acd_engine.training.data import OPOSplits
from acd_engine.training.evaluate import evaluate_anchors, selection_score
from acd_engine.training.losses import IGNORE_INDEX, OBJECTIVES, Split, sequence_losses

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
    "init",
    "n_virtual",
    "lr",
    "batch_size",
    "weight_decay",
    "grad_clip",
    "target_tokens",
    "ul_weight",
    "benign_weight",
    "ul_min_prob",
    "val_every",
    "val_max_new_tokens",
    "val_alpha",
    "val_plausibility",
    "overrefusal_weight",
)

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
        split: ``hr``, ``ha`` or ``s``.
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
    for split, examples in (("hr", splits.hr), ("ha", splits.ha), ("s", splits.s)):
        for ex in examples:
            if ex.prompt not in cache:
                r = engine.render([{"role": "user", "content": ex.prompt}])
                cache[ex.prompt] = (r.head, r.tail)
            head, tail = cache[ex.prompt]
            resp = list(engine.tokenizer.encode(ex.response, add_special_tokens=False))
            if ex.finished:
                resp.append(int(eos))
            resp = resp[: cfg.target_tokens]
            if not resp:
                continue
            out.append(EncodedExample(tuple(head), tuple(tail), tuple(resp), split))  # type: ignore[arg-type]
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
    except Exception as exc:  # torch raises many types (EOFError, UnpicklingError, ...)
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


def check_checkpoint(path: Path, state: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse to resume ``state`` unless it was made with ``expected``'s identity and settings.

    Args:
        path: The checkpoint (for messages).
        state: What :func:`read_checkpoint` returned.
        expected: Any of ``fingerprint`` (dict), ``anchors_hash``, ``data_hash`` (str) and
            ``settings`` (:func:`resume_settings`); only the keys given are compared, so a
            caller can check the cheap ones before sampling and the rest later.

    Raises:
        ConfigError: naming the first difference and the way out.
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
            what = ", ".join(
                f"{k} (checkpoint {theirs.get(k)!r}, now {ours.get(k)!r})"
                for k in sorted(set(theirs) | set(ours))
                if theirs.get(k) != ours.get(k)
            )
            raise ConfigError(
                f"checkpoint '{path}' was made with another model: {what} differ; use a new "
                "--out or delete the checkpoint"
            )
        was = "(not recorded)" if theirs is None else _short(theirs)
        raise ConfigError(
            f"checkpoint '{path}' was made with {label} {was}, got {_short(ours)}; use a new "
            "--out or delete the checkpoint"
        )
    if "settings" in expected:
        raw = state.get("settings")
        theirs = json.loads(raw) if isinstance(raw, str) else {}
        ours = expected["settings"]
        diffs = [
            f"{k} (checkpoint {theirs.get(k)!r}, now {ours[k]!r})"
            for k in ours
            if theirs.get(k) != ours[k]
        ]
        if diffs:
            raise ConfigError(
                f"resume must use the checkpoint's settings; differs: {', '.join(diffs)}. "
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
        counts = {s: sum(e.split == s for e in self.examples) for s in ("hr", "ha", "s")}
        present = [s for s, c in counts.items() if c]
        # Each split contributes equally (mean of per-split means), whatever its size.
        self.split_weight = {
            s: len(self.examples) / (len(present) * c) if c else 0.0 for s, c in counts.items()
        }

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
        objectives: list[str] = []
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
        per_row = sequence_losses(logits, labels, objectives, self.cfg.ul_min_prob)  # type: ignore[arg-type]
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
    def _validate(self, sp: torch.Tensor, ap: torch.Tensor, base: PromptPack) -> dict[str, Any]:
        anchors = self.val_anchors if self.val_anchors is not None else load_anchors("val")
        judge = self.judge or get_judge(self.cfg.judge)
        pack = PromptPack(
            sp.detach().clone(), ap.detach().clone(), base.fingerprint, dict(base.metadata)
        )
        dcfg = DecodingConfig(
            method="acd",
            alpha=self.cfg.val_alpha,
            plausibility=self.cfg.val_plausibility,
            max_new_tokens=self.cfg.val_max_new_tokens,
        )
        metrics = evaluate_anchors(self.engine, anchors, dcfg, judge, pack=pack)
        metrics.pop("responses")
        metrics["score"] = selection_score(metrics, self.cfg.overrefusal_weight)
        return metrics

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

        Returns:
            The best pack by validation score (the last one when validation is off), the
            report, and whether all epochs ran (False when ``max_steps`` stopped it early).
        """
        cfg = self.cfg
        base = init_pack(self.engine, cfg)
        model = self.engine.model
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        sp = torch.nn.Parameter(base.sp.clone())
        ap = torch.nn.Parameter(base.ap.clone())
        opt = torch.optim.AdamW([sp, ap], lr=cfg.lr, weight_decay=cfg.weight_decay)
        n_batches = math.ceil(len(self.examples) / cfg.batch_size)
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
                    "sp": sp.detach().clone(),
                    "ap": ap.detach().clone(),
                    "optimizer": opt.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "state": json.dumps(meta),
                    "settings": json.dumps(identity["settings"]),
                    "fingerprint": json.dumps(identity["fingerprint"], sort_keys=True),
                    "anchors_hash": identity["anchors_hash"],
                    "data_hash": identity["data_hash"],
                    "best_sp": None if best is None else best["sp"],
                    "best_ap": None if best is None else best["ap"],
                },
            )

        completed = True
        started = time.perf_counter() - state["seconds"]
        while state["epoch"] < cfg.epochs and not state["stopped_early"]:
            epoch = state["epoch"]
            order = torch.randperm(
                len(self.examples),
                generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch),
            ).tolist()
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
                best = state["best"]
                if best is None or val["score"] > best["score"]:
                    state["best"] = {
                        "score": val["score"],
                        "epoch": epoch + 1,
                        "val": val,
                        "sp": sp.detach().clone(),
                        "ap": ap.detach().clone(),
                    }
                    state["stale"] = 0
                else:
                    state["stale"] += 1
                    if state["stale"] >= cfg.patience:
                        state["stopped_early"] = True
                        logger.info(
                            "early stop: %d validations without improvement", state["stale"]
                        )
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
