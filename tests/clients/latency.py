"""Time to first token and decode speed of a running clawrl-tui server, through the openai SDK.

    python3 tests/clients/latency.py BASE_URL API_KEY MODEL_ID

Prints: one client; 4 concurrent clients; a ~5 K-token system prompt sent twice (the second
turn should reuse the first one's KV cache).
"""
import sys, time, threading
import openai

base, key, model = sys.argv[1:4]
client = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=600)

def run(messages, max_tokens=32, out=None):
    t0 = time.time()
    first = None
    n = 0
    usage = None
    for c in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True}):
        if c.choices and c.choices[0].delta.content:
            if first is None:
                first = time.time()
        if c.usage:
            usage = c.usage
    end = time.time()
    n = usage.completion_tokens
    r = {"ttft": first - t0, "decode_tps": (n - 1) / (end - first) if n > 1 else 0.0, "tokens": n,
         "prompt": usage.prompt_tokens, "cached": usage.prompt_tokens_details.cached_tokens, "total": end - t0}
    if out is not None:
        out.append(r)
    return r

def show(label, r):
    print(f"{label:<34} prompt {r['prompt']:>5} (cached {r['cached']:>5})  TTFT {r['ttft']*1000:8.0f} ms  "
          f"decode {r['decode_tps']:5.1f} tok/s  ({r['tokens']} tokens, {r['total']:.1f} s)")

run([{"role": "user", "content": "warm up"}], 4)
show("1 client", run([{"role": "user", "content": "Tell me about the moon."}]))

results = []
threads = [threading.Thread(target=run, args=([{"role": "user", "content": f"Tell me about planet number {i}."}], 32, results)) for i in range(4)]
t0 = time.time()
for t in threads: t.start()
for t in threads: t.join()
wall = time.time() - t0
for i, r in enumerate(results):
    show(f"4 concurrent clients, #{i}", r)
total = sum(r["tokens"] for r in results)
print(f"4 concurrent clients: {total} tokens in {wall:.1f} s = {total / wall:.1f} tok/s aggregate")

words = ("You are a meticulous assistant for a software team. Follow the rules below. " * 400).split()
system = " ".join(words[:4600])
show("5K system prompt, turn 1", run([{"role": "system", "content": system}, {"role": "user", "content": "Say hello."}], 8))
show("5K system prompt, turn 2", run([{"role": "system", "content": system}, {"role": "user", "content": "Say goodbye."}], 8))
