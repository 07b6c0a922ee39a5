#!/usr/bin/env python3
"""llama.cpp's side of `clawrl-tui bench --against-llama-cpp`.

Reads the token ids clawrl measured with (JSON from --tokens), runs the same workloads through
llama.cpp's C API (llama-cpp-python's low-level bindings: no Python sampling in the timed loops
beyond an argmax) and prints one JSON object of rates and times on stdout.
Workloads: prefill of a prompt; greedy decode of N tokens (batch 1); 4 streams decoded together
(one llama_decode per step over 4 sequences); decode after a long context; time to first token
of a long system prompt, first turn and a second turn that reuses the cached prefix.
"""
import argparse, ctypes, json, sys, time

import llama_cpp as L
import numpy as np


class Runner:
    def __init__(self, model_path, threads, n_ctx, n_seq):
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(model_path.encode(), mp)
        if not self.model:
            sys.exit(f"llama.cpp could not load {model_path}")
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, 512, 512, n_seq
        cp.n_threads = cp.n_threads_batch = threads
        cp.kv_unified = True  # one cache pool for all sequences, as llama-server uses it
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.mem = L.llama_get_memory(self.ctx)
        vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(vocab)
        self.eos = {L.llama_vocab_eos(vocab), L.llama_vocab_eot(vocab)}
        self.batch = L.llama_batch_init(512, 0, n_seq)

    def clear(self):
        L.llama_memory_clear(self.mem, True)

    def decode(self, items):
        """items: (token, pos, seq, want_logits) tuples, at most 512."""
        b = self.batch
        b.n_tokens = len(items)
        for i, (tok, pos, seq, logits) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
        if L.llama_decode(self.ctx, b) != 0:
            sys.exit("llama_decode failed")

    def argmax(self, i):
        ptr = L.llama_get_logits_ith(self.ctx, i)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))))

    def prefill(self, tokens, seq=0, start=0):
        """Computes tokens after `start` cached positions of `seq`; returns the next token."""
        for i in range(0, len(tokens), 512):
            chunk = tokens[i : i + 512]
            last = i + len(chunk) == len(tokens)
            self.decode([(t, start + i + j, seq, last and j == len(chunk) - 1)
                         for j, t in enumerate(chunk)])
        return self.argmax(len(tokens) - 1 - (len(tokens) - 1) // 512 * 512)

    def streams(self, prompts, n):
        """Decodes n tokens for each prompt together; returns (tokens decoded, seconds)."""
        self.clear()
        nxt = [self.prefill(p, seq=s) for s, p in enumerate(prompts)]
        pos = [len(p) for p in prompts]
        live = [t not in self.eos for t in nxt]
        done, t0 = 0, time.perf_counter()
        for _ in range(n - 1):
            seqs = [s for s in range(len(prompts)) if live[s]]
            if not seqs:
                break
            self.decode([(nxt[s], pos[s], s, True) for s in seqs])
            for i, s in enumerate(seqs):
                pos[s] += 1
                nxt[s] = self.argmax(i)
                done += 1
                live[s] = nxt[s] not in self.eos
        return done, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", required=True, help="JSON written by clawrl-tui bench")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    w = json.load(open(a.tokens))
    r = Runner(a.model, a.threads, w["n_ctx"], 4)
    out = {}

    r.clear(); r.prefill(w["prefill"])  # warm-up
    r.clear(); t = time.perf_counter(); r.prefill(w["prefill"])
    out["prefill_tps"] = len(w["prefill"]) / (time.perf_counter() - t)

    r.streams([w["decode"]], 8)  # warm-up
    # Medians of `runs` interleaved runs, as clawrl's side measures (the machines are shared).
    cases = {
        "decode_tps": ([w["decode"]], w["decode_tokens"]),
        "streams4_tps": ([w["decode"]] * 4, w["decode_tokens"]),
        "long_decode_tps": ([w["long"]], w["long_decode_tokens"]),
    }
    rates = {k: [] for k in cases}
    for _ in range(w["runs"]):
        for k, (prompts, tokens) in cases.items():
            n, s = r.streams(prompts, tokens)
            rates[k].append(n / s)
    for k, v in rates.items():
        out[k] = sorted(v)[len(v) // 2]

    r.clear()
    t = time.perf_counter(); r.prefill(w["system_first"]); out["ttft_first_s"] = time.perf_counter() - t
    shared = 0
    for x, y in zip(w["system_first"], w["system_second"]):
        if x != y:
            break
        shared += 1
    # What llama.cpp's server does with a cached prompt: keep the common prefix, compute the rest.
    L.llama_memory_seq_rm(r.mem, 0, shared, -1)
    t = time.perf_counter(); r.prefill(w["system_second"][shared:], start=shared)
    out["ttft_second_s"] = time.perf_counter() - t
    print(json.dumps(out))


main()
