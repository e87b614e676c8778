"""How much does one more row cost llama.cpp per decode step? (the llama.cpp backend)

ACD decodes two rows per request (SP and AP), so its speed against plain decoding, and the
gain from stepping N requests together, follow from what ``llama_decode`` costs for 1, 2,
4, ... rows. This times every ``llama_decode`` of ``generate_batch`` on the default model's
GGUF (manual prompts, 48 tokens, EOS masked) for plain and ACD at 1, 2, 4 and 8 requests,
and prints the median step time per row count and the rate end to end, as JSON.

    .venv/bin/python scripts/studies/llamacpp_rows.py > rows.json   # ~1 minute, idle machine

Needs the ``[llamacpp]`` extra.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import acd_engine.backends.llamacpp.backend as llamacpp_backend
from acd_engine.cli.bench import force_length
from acd_engine.config import DecodingConfig
from acd_engine.runtime.engine import Engine
from acd_engine.safety.prompts import OPPOSITE_PROMPT, PromptPack

TOPICS = [
    "a robot who paints",
    "the history of bread",
    "how tides work",
    "a trip to Mars",
    "learning the violin",
    "why leaves change colour",
    "a city under the sea",
    "the rules of chess",
]
NEW_TOKENS = 48


def main() -> None:
    engine = Engine(None, backend="llamacpp")
    engine.set_pack(
        PromptPack.from_manual_prompts(
            engine.model,
            engine.tokenizer,
            safe_text="You are a helpful assistant.",
            opposite_text=OPPOSITE_PROMPT,
        )
    )
    log: list[tuple[int, float]] = []  # (tokens in the batch, seconds)
    decode = llamacpp_backend.LlamaCppBackend._decode  # noqa: SLF001 (timing its one ctypes call)

    def timed(self: Any, batch: Any) -> None:
        start = time.perf_counter()
        decode(self, batch)
        log.append((batch.n_tokens, time.perf_counter() - start))

    llamacpp_backend.LlamaCppBackend._decode = timed  # type: ignore[method-assign]  # noqa: SLF001
    eos = [engine.tokenizer.eos_token_id]
    out: dict[str, Any] = {}
    for method in ("plain", "acd"):
        for n in (1, 2, 4, 8):
            engine.set_options(max_batch_requests=n)
            cfg = DecodingConfig(method=method, alpha=0.5, max_new_tokens=NEW_TOKENS)
            convs = [
                [{"role": "user", "content": f"Write a short story about {t}."}] for t in TOPICS[:n]
            ]
            for _ in range(2):  # the first run warms up
                log.clear()
                start = time.perf_counter()
                engine.generate_batch(
                    convs, cfg, constraint=force_length(eos, len(engine.tokenizer), [])
                )
                total = time.perf_counter() - start
            rows = n * (1 if method == "plain" else 2)
            steps = sorted(d for k, d in log if k == rows)  # one token per row: a decode step
            step_ms = 1000 * steps[len(steps) // 2]
            out[f"{method} x{n}"] = {
                "rows": rows,
                "step_ms_median": round(step_ms, 2),
                "ms_per_row": round(step_ms / rows, 2),
                "prefill_s": round(sum(d for k, d in log if k != rows), 2),
                "total_s": round(total, 2),
                "tok_s": round(NEW_TOKENS * n / total, 1),
            }
    sys.stdout.write(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
