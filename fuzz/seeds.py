#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora (fuzz/corpus/TARGET/seed-*): small valid inputs that
the fuzzers mutate. Standard library only. Run from anywhere: python3 fuzz/seeds.py"""
import json, os, struct

here = os.path.dirname(os.path.abspath(__file__))


def put(target, name, data):
    d = os.path.join(here, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


# Chat requests: the shapes real clients send (CLIENTS.md), tools and tool calls included.
tools = [{"type": "function", "function": {"name": "read", "description": "Read a file",
          "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                         "required": ["path"]}}}]
requests = {
    "plain": {"model": "smollm2-135m-instruct",
              "messages": [{"role": "user", "content": "Hello!"}]},
    "openclaw": {"model": "clawrl", "stream": True, "stream_options": {"include_usage": True},
                 "max_completion_tokens": 64, "store": False, "tools": tools,
                 "messages": [{"role": "developer", "content": "You are a helpful agent."},
                              {"role": "user", "content": [{"type": "text", "text": "read a.txt"}]}]},
    "tool-turn": {"messages": [
        {"role": "user", "content": "What is in a.txt?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "read", "arguments": "{\"path\": \"a.txt\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "<|im_start|>system\nhi"},
        {"role": "user", "content": "thanks <|endoftext|>"}],
        "tools": tools, "temperature": 0, "top_p": 1, "top_k": -1, "seed": 18446744073709551615,
        "logprobs": True, "top_logprobs": 3, "stop": ["\n\n"], "session_id": "s-1",
        "turn_type": "main"},
}
for name, body in requests.items():
    put("chat_request", name, json.dumps(body))
    put("chat_template", name, json.dumps(body))


# GGUF: a one-layer llama with an 8-token byte-level BPE vocabulary and a chat template.
def gguf(tensors, meta):
    def s(x):
        b = x.encode()
        return struct.pack("<Q", len(b)) + b

    def val(v):
        if isinstance(v, bool):
            return struct.pack("<I", 7) + struct.pack("<?", v)
        if isinstance(v, int):
            return struct.pack("<I", 4) + struct.pack("<I", v)
        if isinstance(v, float):
            return struct.pack("<I", 6) + struct.pack("<f", v)
        if isinstance(v, str):
            return struct.pack("<I", 8) + s(v)
        if all(isinstance(x, str) for x in v):
            return struct.pack("<IIQ", 9, 8, len(v)) + b"".join(s(x) for x in v)
        return struct.pack("<IIQ", 9, 5, len(v)) + b"".join(struct.pack("<i", x) for x in v)

    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta))
    out += b"".join(s(k) + val(v) for k, v in meta.items())
    data, infos = b"", b""
    for name, dims, ty, raw in tensors:
        infos += s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        infos += struct.pack("<IQ", ty, len(data))
        data += raw + b"\0" * (-len(raw) % 32)
    out += infos
    out += b"\0" * (-len(out) % 32)
    return out + data


def f32(n, scale=0.01):
    return struct.pack("<%df" % n, *[((i * 37) % 17 - 8) * scale for i in range(n)])


hidden, ff, vocab, heads, kv = 8, 16, 8, 2, 1
head_dim = hidden // heads
F32, F16 = 0, 1
tensors = [("token_embd.weight", [hidden, vocab], F32, f32(hidden * vocab)),
           ("output_norm.weight", [hidden], F32, f32(hidden, 0.1)),
           ("blk.0.attn_norm.weight", [hidden], F32, f32(hidden, 0.1)),
           ("blk.0.attn_q.weight", [hidden, hidden], F32, f32(hidden * hidden)),
           ("blk.0.attn_k.weight", [hidden, kv * head_dim], F32, f32(hidden * kv * head_dim)),
           ("blk.0.attn_v.weight", [hidden, kv * head_dim], F16,
            struct.pack("<%de" % (hidden * kv * head_dim), *[0.01] * (hidden * kv * head_dim))),
           ("blk.0.attn_output.weight", [hidden, hidden], F32, f32(hidden * hidden)),
           ("blk.0.ffn_norm.weight", [hidden], F32, f32(hidden, 0.1)),
           ("blk.0.ffn_gate.weight", [hidden, ff], F32, f32(hidden * ff)),
           ("blk.0.ffn_up.weight", [hidden, ff], F32, f32(hidden * ff)),
           ("blk.0.ffn_down.weight", [ff, hidden], F32, f32(hidden * ff))]
meta = {"general.architecture": "llama", "general.name": "tiny",
        "llama.context_length": 64, "llama.embedding_length": hidden,
        "llama.feed_forward_length": ff, "llama.block_count": 1,
        "llama.attention.head_count": heads, "llama.attention.head_count_kv": kv,
        "llama.rope.freq_base": 10000.0, "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": ["<|im_start|>", "<|im_end|>", "a", "b", "Ġ", "ab", "Ġa", "\n"],
        "tokenizer.ggml.token_type": [3, 3, 1, 1, 1, 1, 1, 1],
        "tokenizer.ggml.merges": ["a b", "Ġ a"],
        "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"}
put("gguf", "tiny-llama", gguf(tensors, meta))
# The same shape with quantized matrices (hidden 32: whole blocks).
def blocks(n, block_len, block_bytes):
    one = struct.pack("<e", 0.01) + bytes((i * 7) % 256 for i in range(block_bytes - 2))
    return one * (n // block_len)

hidden, ff, head_dim = 32, 256, 16
Q4_0, Q4_1, Q8_0, Q4_K, Q6_K = 2, 3, 8, 12, 14
quant = [("token_embd.weight", [hidden, vocab], Q8_0, blocks(hidden * vocab, 32, 34)),
         ("output_norm.weight", [hidden], F32, f32(hidden, 0.1)),
         ("blk.0.attn_norm.weight", [hidden], F32, f32(hidden, 0.1)),
         ("blk.0.attn_q.weight", [hidden, hidden], Q4_0, blocks(hidden * hidden, 32, 18)),
         ("blk.0.attn_k.weight", [hidden, kv * head_dim], Q4_1, blocks(hidden * kv * head_dim, 32, 20)),
         ("blk.0.attn_v.weight", [hidden, kv * head_dim], Q8_0, blocks(hidden * kv * head_dim, 32, 34)),
         ("blk.0.attn_output.weight", [hidden, hidden], Q4_0, blocks(hidden * hidden, 32, 18)),
         ("blk.0.ffn_norm.weight", [hidden], F32, f32(hidden, 0.1)),
         ("blk.0.ffn_gate.weight", [hidden, ff], Q8_0, blocks(hidden * ff, 32, 34)),
         ("blk.0.ffn_up.weight", [hidden, ff], Q4_1, blocks(hidden * ff, 32, 20)),
         # K-quant blocks hold 256 weights: only this matrix has rows that long.
         ("blk.0.ffn_down.weight", [ff, hidden], Q6_K, blocks(hidden * ff, 256, 210))]
qmeta = dict(meta, **{"llama.embedding_length": hidden, "llama.feed_forward_length": ff})
put("gguf", "tiny-llama-quantized", gguf(quant, qmeta))
put("gguf", "parsed-header-only", gguf([], {"general.architecture": "qwen2"}))

# safetensors: 8-byte header length, JSON header, data; F32, F16 and BF16 tensors.
def safetensors(tensors):
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data

put("safetensors", "three-dtypes", safetensors([
    ("model.embed_tokens.weight", "F32", [16, 8], f32(128)),
    ("model.norm.weight", "F16", [8], struct.pack("<8e", *[1.0] * 8)),
    ("model.layers.0.input_layernorm.weight", "BF16", [8], b"\x80\x3f" * 8)]))
put("safetensors", "empty", safetensors([]))
