"""Generates a tiny random Qwen3 checkpoint in Hugging Face layout and its logits computed by
an independent float64 numpy forward pass written from the Hugging Face modeling code
(rotate-half RoPE, per-head q/k RMSNorm, grouped-query attention, SwiGLU, untied head).

    pip install numpy safetensors
    python3 tests/reference/gen_tiny_qwen3.py

Writes tests/fixtures/tiny-qwen3/ (config.json + two safetensors shards, one tensor group in
F16 to exercise the F16 path) and tests/fixtures/tiny-qwen3-reference.json.
"""
import json, os
import numpy as np
from safetensors.numpy import save_file

rng = np.random.default_rng(3)
cfg = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=96, hidden_size=48,
           intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=128,
           tie_word_embeddings=False)
H, I, L, NH, NKV, HD, V = (cfg[k] for k in ["hidden_size", "intermediate_size", "num_hidden_layers",
                                            "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size"])

def w(*shape, s=0.2):
    return (rng.standard_normal(shape) * s).astype(np.float32)

t = {"model.embed_tokens.weight": w(V, H, s=1.0), "model.norm.weight": 1 + w(H, s=0.1), "lm_head.weight": w(V, H)}
for l in range(L):
    p = f"model.layers.{l}."
    t[p + "input_layernorm.weight"] = 1 + w(H, s=0.1)
    t[p + "post_attention_layernorm.weight"] = 1 + w(H, s=0.1)
    t[p + "self_attn.q_proj.weight"] = w(NH * HD, H)
    t[p + "self_attn.k_proj.weight"] = w(NKV * HD, H)
    t[p + "self_attn.v_proj.weight"] = w(NKV * HD, H)
    t[p + "self_attn.o_proj.weight"] = w(H, NH * HD)
    t[p + "self_attn.q_norm.weight"] = 1 + w(HD, s=0.1)
    t[p + "self_attn.k_norm.weight"] = 1 + w(HD, s=0.1)
    t[p + "mlp.gate_proj.weight"] = w(I, H)
    t[p + "mlp.up_proj.weight"] = w(I, H)
    t[p + "mlp.down_proj.weight"] = w(H, I)
# Layer 1's MLP is stored in F16; the reference uses the same rounded values.
for k in list(t):
    if k.startswith("model.layers.1.mlp."):
        t[k] = t[k].astype(np.float16)

out = "tests/fixtures/tiny-qwen3"
os.makedirs(out, exist_ok=True)
shard1 = {k: v for k, v in t.items() if k.startswith("model.layers.0.")}
shard2 = {k: v for k, v in t.items() if k not in shard1}
save_file(shard1, f"{out}/model-00001-of-00002.safetensors")
save_file(shard2, f"{out}/model-00002-of-00002.safetensors")
json.dump(cfg, open(f"{out}/config.json", "w"), indent=1)

T = {k: v.astype(np.float64) for k, v in t.items()}

def rms(x, g, eps=cfg["rms_norm_eps"]):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

def rope(x, pos):  # x [s, heads, hd]
    inv = cfg["rope_theta"] ** (-np.arange(0, HD, 2) / HD)
    ang = np.outer(pos, inv)
    cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None, :]
    sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None, :]
    x1, x2 = x[..., : HD // 2], x[..., HD // 2:]
    return x * cos + np.concatenate([-x2, x1], -1) * sin

def forward(ids):
    s = len(ids)
    x = T["model.embed_tokens.weight"][ids]
    pos = np.arange(s)
    for l in range(L):
        p = f"model.layers.{l}."
        h = rms(x, T[p + "input_layernorm.weight"])
        q = (h @ T[p + "self_attn.q_proj.weight"].T).reshape(s, NH, HD)
        k = (h @ T[p + "self_attn.k_proj.weight"].T).reshape(s, NKV, HD)
        v = (h @ T[p + "self_attn.v_proj.weight"].T).reshape(s, NKV, HD)
        q = rope(rms(q, T[p + "self_attn.q_norm.weight"]), pos)
        k = rope(rms(k, T[p + "self_attn.k_norm.weight"]), pos)
        rep = NH // NKV
        k = np.repeat(k, rep, axis=1)
        v = np.repeat(v, rep, axis=1)
        sc = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(HD)
        sc = np.where(np.tril(np.ones((s, s), bool))[None], sc, -np.inf)
        pr = np.exp(sc - sc.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", pr, v).reshape(s, NH * HD)
        x = x + o @ T[p + "self_attn.o_proj.weight"].T
        h = rms(x, T[p + "post_attention_layernorm.weight"])
        g = h @ T[p + "mlp.gate_proj.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * (h @ T[p + "mlp.up_proj.weight"].T)) @ T[p + "mlp.down_proj.weight"].T
    return rms(x, T["model.norm.weight"]) @ T["lm_head.weight"].T

ids = [int(i) for i in rng.integers(0, V, 11)]
logits = forward(ids)
json.dump({"input_ids": ids, "logits": [[round(float(v), 6) for v in row] for row in logits]},
          open("tests/fixtures/tiny-qwen3-reference.json", "w"))
print("ok", logits.shape, float(np.abs(logits).max()))
