"""Generates tests/fixtures/dequant.json: GGML blocks and their values as dequantized by the
PyPI `gguf` package (an implementation independent of ours).

    pip install gguf==0.19.0 numpy
    python3 tests/reference/gen_dequant.py [SMOLLM2.gguf QWEN2.5.gguf]

Random blocks get finite f16 scales; when the two model files are given, real rows of each
tensor type they contain are added too.
"""
import json, sys
import numpy as np
import gguf
from gguf import quants, GGMLQuantizationType as T

rng = np.random.default_rng(7)

def f16(x):
    return np.array([x], dtype=np.float16).tobytes()

def random_block(t):
    if t == T.F32:
        return rng.standard_normal(1).astype(np.float32).tobytes()
    if t == T.F16:
        return rng.standard_normal(1).astype(np.float16).tobytes()
    if t == T.BF16:
        return (rng.standard_normal(1).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
    scale = lambda: f16(rng.uniform(-0.05, 0.05))
    b = lambda n: rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    if t == T.Q4_0: return scale() + b(16)
    if t == T.Q4_1: return scale() + scale() + b(16)
    if t == T.Q5_0: return scale() + b(4) + b(16)
    if t == T.Q8_0: return scale() + b(32)
    if t == T.Q4_K: return scale() + scale() + b(12) + b(128)
    if t == T.Q6_K: return b(128) + b(64) + b(16) + scale()
    raise ValueError(t)

cases = []
for t in [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q8_0, T.Q4_K, T.Q6_K]:
    blk_len, _ = gguf.GGML_QUANT_SIZES[t]
    n_blocks = max(1, 512 // blk_len)
    raw = b"".join(random_block(t) for _ in range(n_blocks))
    data = np.frombuffer(raw, dtype=np.uint8)
    if t in (T.F32, T.F16):
        data = np.frombuffer(raw, dtype={T.F32: np.float32, T.F16: np.float16}[t])
    vals = quants.dequantize(data, t).astype(np.float32).reshape(-1)
    cases.append({"source": "random", "type": t.name, "n": int(vals.size), "hex": raw.hex(), "values": [float(v) for v in vals]})

for path in sys.argv[1:]:
    r = gguf.GGUFReader(path)
    seen = set()
    for ti in r.tensors:
        t = T(ti.tensor_type)
        if t in seen or t in (T.F32,):
            continue
        seen.add(t)
        blk_len, blk_bytes = gguf.GGML_QUANT_SIZES[t]
        n = 256
        raw = bytes(np.asarray(ti.data).view(np.uint8).reshape(-1)[: n // blk_len * blk_bytes])
        vals = quants.dequantize(np.frombuffer(raw, dtype=np.uint8), t).astype(np.float32).reshape(-1)
        cases.append({"source": f"{path.split('/')[-1]}:{ti.name}", "type": t.name, "n": n, "hex": raw.hex(), "values": [float(v) for v in vals]})

json.dump({"generator": f"gguf {gguf.__version__ if hasattr(gguf, '__version__') else '0.19.0'} quants.dequantize", "cases": cases},
          open("tests/fixtures/dequant.json", "w"), separators=(",", ":"))
print(len(cases), "cases")
