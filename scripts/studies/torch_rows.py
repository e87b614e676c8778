"""Why is the torch fast path's ACD level with HF ``generate`` on some CPUs, not faster?

ACD decodes two rows a token (SP and AP) in one forward; HF ``generate`` decodes one. So
ACD matches or beats ``generate`` only where a second row is nearly free, which depends on
the CPU's fp32 matmul kernels for few rows. This times, in one process on the default
model (fp32, 2 threads per the machine): a decode forward of the HF model with 1, 2 and 4
rows over a 96-position KV cache, and the end-to-end time of 64 tokens (EOS masked) for HF
``generate``, the engine's ``plain`` (one row) and its ungated ``acd`` (two rows) on the
bench's manual prompts. Prints JSON.

    .venv/bin/python scripts/studies/torch_rows.py > torch_rows.json   # ~2 minutes, idle
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from acd_engine.cli.bench import BENCH_SYSTEM, BENCH_USER, bench_messages, force_length
from acd_engine.config import DecodingConfig
from acd_engine.runtime.engine import Engine
from acd_engine.safety.prompts import OPPOSITE_PROMPT, PromptPack

NEW_TOKENS = 64


def forward_ms(model: Any, rows: int, context: int = 96, reps: int = 60) -> float:
    """Median time of one decode forward of ``rows`` rows over ``context`` cached positions."""
    ids = torch.randint(100, 1000, (rows, context))
    with torch.inference_mode():
        cache = model(ids, use_cache=True).past_key_values
        step = torch.randint(100, 1000, (rows, 1))
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            model(step, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - start)
            cache.crop(-1)  # drop the step just appended: the context stays fixed
    return 1000 * statistics.median(times[10:])


def median_s(run: Callable[[], object], reps: int = 5) -> float:
    run()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    engine = Engine(None)
    engine.set_pack(
        PromptPack.from_manual_prompts(
            engine.model, engine.tokenizer, safe_text=BENCH_SYSTEM, opposite_text=OPPOSITE_PROMPT
        )
    )
    model, tokenizer = engine.model, engine.tokenizer
    eos = [int(tokenizer.eos_token_id)]
    out: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        **{f"hf_forward_{r}_rows_ms": round(forward_ms(model, r), 2) for r in (1, 2, 4)},
    }
    ids = tokenizer.apply_chat_template(
        bench_messages(BENCH_USER),
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]

    def hf_generate() -> object:
        with torch.inference_mode():
            return model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                logits_processor=force_length(eos, len(tokenizer), []),
            )

    def engine_run(method: str) -> Callable[[], object]:
        cfg = DecodingConfig(method=method, alpha=0.5, max_new_tokens=NEW_TOKENS)
        msgs = bench_messages(BENCH_USER) if method == "plain" else bench_messages(BENCH_USER, None)
        return lambda: engine.generate(msgs, cfg, constraint=force_length(eos, len(tokenizer), []))

    out["hf_generate_s"] = round(median_s(hf_generate), 3)
    out["engine_plain_s"] = round(median_s(engine_run("plain")), 3)
    out["engine_acd_s"] = round(median_s(engine_run("acd")), 3)
    out["second_row_cost"] = round(out["hf_forward_2_rows_ms"] / out["hf_forward_1_rows_ms"], 3)
    out["acd_vs_hf_generate"] = round(out["hf_generate_s"] / out["engine_acd_s"], 3)
    sys.stdout.write(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
