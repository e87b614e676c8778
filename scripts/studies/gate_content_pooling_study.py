"""Should the gate's mean leave out the assistant header? A study on our anchors only.

The shipped gate averages a layer's states over the request's own tokens, which end with the
template's assistant header (``<|im_end|>\n<|im_start|>assistant\n`` for ChatML): for a
five-word question that header is about half the mean. This compares that pooling with the
mean over the content tokens alone, scored exactly as ``gate_pooling_study.py`` scores
(``val`` and grouped-category ``cv`` flag shares at 5 % per benign kind). Result on the
1,627 anchors (docs/opo.md): no gain, so the engine keeps one mean.

Usage: ``python scripts/studies/gate_content_pooling_study.py`` (about 5 minutes on a 2-core
CPU).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gate_pooling_study import score

from acd_engine.runtime.engine import get_engine
from acd_engine.training.anchors import load_anchors

logger = logging.getLogger("gate_content_pooling_study")
LAYERS = (12, 15, 18)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    engine = get_engine(None)
    anchors = load_anchors("all")
    # the header: the common tail of two renderings with different user text
    a, b = (engine.render(w).plain for w in ("Hi there friend", "Why"))
    trail = 0
    while a[-1 - trail] == b[-1 - trail]:
        trail += 1
    logger.info("header: %s", engine.tokenizer.convert_ids_to_tokens(a[-trail:]))
    feats: dict[tuple[str, int], list[torch.Tensor]] = {
        (p, layer): [] for p in ("mean", "content") for layer in LAYERS
    }
    with torch.inference_mode():
        for anchor in anchors:
            rendered = engine.render(anchor.prompt)
            n = engine.rows.request_tokens(rendered, {})
            out = engine.model(input_ids=torch.tensor([rendered.plain]), output_hidden_states=True)
            for layer in LAYERS:
                h = out.hidden_states[layer + 1][0].float()  # [T, H], decoder layer `layer`
                feats[("mean", layer)].append(h[-n:].mean(0))
                feats[("content", layer)].append(h[-n:-trail].mean(0))
    for (pooling, layer), rows in feats.items():
        row = {"pooling": pooling, "layer": layer, **score(torch.stack(rows), anchors)}
        logger.info(json.dumps(row))


if __name__ == "__main__":
    main()
