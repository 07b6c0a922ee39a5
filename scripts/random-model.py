#!/usr/bin/env python3
"""Writes a Hugging Face Qwen3 model directory with random weights, for speed measurements
where the weights' values do not matter (a GPU machine that cannot download a real model).

    scripts/random-model.py OUT [--shape qwen3-0.6b|tiny] [--tokenizer DIR]

OUT gets config.json, model.safetensors (bf16) and, from --tokenizer, tokenizer.json and
tokenizer_config.json (the tests' Qwen3 tokenizer: target/test-assets/qwen3-tokenizer).
Needs numpy only; the safetensors file is written by hand (8-byte header length, JSON header,
raw little-endian data)."""

import argparse
import json
import shutil
import struct
from pathlib import Path

import numpy as np

QWEN3_06B = dict(
    vocab_size=151936,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    tie_word_embeddings=True,
)

SHAPES = {
    # Qwen3-0.6B's published shape.
    "qwen3-0.6b": QWEN3_06B,
    # The same vocabulary (so the real tokenizer fits), everything else small.
    "tiny": dict(QWEN3_06B, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16),
}


def bf16(a):
    """float32 array -> bf16 bytes (round to nearest even)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16).tobytes()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    ap.add_argument("--tokenizer")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    s = SHAPES[args.shape]
    rng = np.random.default_rng(args.seed)
    h, i, hd = s["hidden_size"], s["intermediate_size"], s["head_dim"]
    nh, nkv = s["num_attention_heads"], s["num_key_value_heads"]

    def normal(*shape):
        # Scaled so activations stay O(1) through the layers.
        return rng.standard_normal(shape, dtype=np.float32) * (0.5 / np.sqrt(shape[-1]))

    tensors = {"model.embed_tokens.weight": normal(s["vocab_size"], h), "model.norm.weight": np.ones(h, np.float32)}
    for l in range(s["num_hidden_layers"]):
        p = f"model.layers.{l}."
        tensors.update({
            p + "input_layernorm.weight": np.ones(h, np.float32),
            p + "post_attention_layernorm.weight": np.ones(h, np.float32),
            p + "self_attn.q_proj.weight": normal(nh * hd, h),
            p + "self_attn.k_proj.weight": normal(nkv * hd, h),
            p + "self_attn.v_proj.weight": normal(nkv * hd, h),
            p + "self_attn.o_proj.weight": normal(h, nh * hd),
            p + "self_attn.q_norm.weight": np.ones(hd, np.float32),
            p + "self_attn.k_norm.weight": np.ones(hd, np.float32),
            p + "mlp.gate_proj.weight": normal(i, h),
            p + "mlp.up_proj.weight": normal(i, h),
            p + "mlp.down_proj.weight": normal(h, i),
        })
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        b = bf16(t)
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for b in blobs:
            f.write(b)
    config = dict(
        model_type="qwen3",
        architectures=["Qwen3ForCausalLM"],
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=40960,
        torch_dtype="bfloat16",
        **s,
    )
    (out / "config.json").write_text(json.dumps(config, indent=1))
    if args.tokenizer:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(Path(args.tokenizer) / name, out / name)
    print(f"wrote {out}: {sum(t.size for t in tensors.values()) / 1e6:.1f} M parameters ({offset / 1e6:.0f} MB bf16)")


if __name__ == "__main__":
    main()
