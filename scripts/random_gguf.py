"""Write a GGUF with random weights in a larger model's shape, for speed and memory runs of
the llama.cpp path (``acd bench --model big.gguf --rows llamacpp_plain,llamacpp_acd``).

Nothing is downloaded: the shape comes from ``acd bench``'s presets (``RANDOM_PRESETS``)
and the tokenizer, chat template and special tokens from the default model's GGUF, so the
vocabulary is SmolLM2's 49,152 tokens whatever the preset says (the Llama-3 shapes' own
128,256-token head would be 2.6× larger; the file notes it in ``general.description``).
Weights are N(0, 0.02²) quantized to the chosen type with gguf-py, norms are ones: the
outputs are noise, only time and memory mean anything.

    .venv/bin/python scripts/random_gguf.py --preset llama3-8b --type q4_1 --out runs/llama3-8b-shape.q4_1.gguf
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, quants

from acd_engine.cli.bench import RANDOM_PRESETS
from acd_engine.loading.models import default_model_path

logging.basicConfig(level=logging.INFO, format="%(message)s")
log = logging.getLogger("random_gguf")

TYPES = {"q4_0": GGMLQuantizationType.Q4_0, "q4_1": GGMLQuantizationType.Q4_1,
         "q8_0": GGMLQuantizationType.Q8_0}  # fmt: skip
COPIED_PREFIXES = ("tokenizer.", "general.quantization_version")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(RANDOM_PRESETS), required=True)
    ap.add_argument("--type", choices=sorted(TYPES), default="q4_1")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    shape = RANDOM_PRESETS[args.preset]
    qtype = TYPES[args.type]
    source = GGUFReader(str(default_model_path()))
    vocab = len(source.fields["tokenizer.ggml.tokens"].data)
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    layers, heads = shape["num_hidden_layers"], shape["num_attention_heads"]
    kv_heads = shape["num_key_value_heads"]
    head_dim = hidden // heads
    tied = bool(shape.get("tie_word_embeddings", False))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    w = GGUFWriter(str(args.out), "llama")
    w.add_name(f"random {args.preset} shape")
    w.add_description(
        f"random weights in the {args.preset} shape with SmolLM2's {vocab}-token vocabulary "
        f"(the preset's own: {shape.get('vocab_size', vocab)}); for speed and memory only"
    )
    w.add_block_count(layers)
    w.add_context_length(int(shape.get("max_position_embeddings", 8192)))
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(float(shape.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_rope_dimension_count(head_dim)
    w.add_file_type(int(qtype))
    for key, field in source.fields.items():
        if key.startswith(COPIED_PREFIXES):
            value = field.contents()
            sub = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
            w.add_key_value(key, value, field.types[0], sub_type=sub)

    rng = np.random.default_rng(args.seed)

    def matrix(name: str, rows: int, cols: int) -> None:
        # [rows, cols] in numpy order: llama.cpp reads it as cols inputs -> rows outputs
        x = (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float32)
        w.add_tensor(name, quants.quantize(x, qtype), raw_dtype=qtype)  # shape from the bytes

    def ones(name: str, n: int) -> None:
        w.add_tensor(name, np.ones(n, dtype=np.float32))

    matrix("token_embd.weight", vocab, hidden)
    for i in range(layers):
        ones(f"blk.{i}.attn_norm.weight", hidden)
        matrix(f"blk.{i}.attn_q.weight", heads * head_dim, hidden)
        matrix(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        matrix(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        matrix(f"blk.{i}.attn_output.weight", hidden, heads * head_dim)
        ones(f"blk.{i}.ffn_norm.weight", hidden)
        matrix(f"blk.{i}.ffn_gate.weight", inter, hidden)
        matrix(f"blk.{i}.ffn_up.weight", inter, hidden)
        matrix(f"blk.{i}.ffn_down.weight", hidden, inter)
        log.info("layer %d/%d", i + 1, layers)
    ones("output_norm.weight", hidden)
    if not tied:
        matrix("output.weight", vocab, hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    log.info("wrote %s (%.2f GB)", args.out, args.out.stat().st_size / 1e9)


if __name__ == "__main__":
    main()
