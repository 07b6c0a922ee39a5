"""Load: N concurrent streaming clients (the official openai SDK) against a running clawrl-tui.

    python3 tests/clients/load.py BASE_URL API_KEY MODEL_ID [--clients 32] [--seconds 300]
        [--think SECS] [--pid SERVER_PID] [--out summary.json]

Each client holds a conversation (its own X-Session-Id, the last two exchanges as history),
streams every reply, rates every third reply up or down through /v1/feedback (so the server
has samples to train on), and on a 429 waits for Retry-After and goes on. A turn is
acknowledged when its stream ended with a finish reason. With --think a client reads each reply
for a random 0 to 2 x SECS before its next message, as people do (0: back-to-back). Every 30 s
it records the server's RSS and live version (did training go on under load?). Prints a summary and writes it as JSON
(the acknowledged response ids included, to check them against the store).
"""
import argparse
import json
import random
import threading
import time
import urllib.request

import openai

p = argparse.ArgumentParser()
p.add_argument("base")
p.add_argument("key")
p.add_argument("model")
p.add_argument("--clients", type=int, default=32)
p.add_argument("--seconds", type=float, default=300)
p.add_argument("--think", type=float, default=0)
p.add_argument("--pid", type=int)
p.add_argument("--out")
args = p.parse_args()

QUESTIONS = [
    "What is a hash map?", "Name three prime numbers.", "How do I reverse a list in Python?",
    "What is the boiling point of water?", "Give me a tip for writing tests.",
    "What does HTTP 429 mean?", "Explain recursion briefly.", "What is the capital of Italy?",
]


def rss_mb():
    if not args.pid:
        return None
    with open(f"/proc/{args.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


lock = threading.Lock()
stats = {"ok": 0, "rate_limited": 0, "errors": 0, "feedback_ok": 0, "feedback_errors": 0}
error_samples, latencies, ttfts, acknowledged = [], [], [], []


def feedback(response_id, rating):
    body = json.dumps({"response_id": response_id, "rating": rating}).encode()
    req = urllib.request.Request(args.base.rstrip("/") + "/feedback", data=body, method="POST", headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {args.key}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            ok = r.status == 200
    except Exception as e:  # noqa: BLE001 (any failure is counted and shown)
        ok = False
        with lock:
            error_samples.append(f"feedback: {e}")
    with lock:
        stats["feedback_ok" if ok else "feedback_errors"] += 1


def client(n, deadline):
    c = openai.OpenAI(base_url=args.base, api_key=args.key, max_retries=0, timeout=600)
    history, turn = [], 0
    while time.time() < deadline:
        q = QUESTIONS[(n + turn) % len(QUESTIONS)]
        messages = history[-4:] + [{"role": "user", "content": q}]
        start, first, text, finish, rid = time.time(), None, "", None, None
        try:
            stream = c.chat.completions.create(
                model=args.model, messages=messages, max_tokens=24, stream=True,
                extra_headers={"X-Session-Id": f"load-{n}"})
            for chunk in stream:
                rid = chunk.id
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.time()
                    text += chunk.choices[0].delta.content
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
        except openai.RateLimitError as e:
            with lock:
                stats["rate_limited"] += 1
            time.sleep(float(e.response.headers.get("retry-after", "2")))
            continue
        except Exception as e:  # noqa: BLE001
            with lock:
                stats["errors"] += 1
                error_samples.append(f"{type(e).__name__}: {e}"[:300])
            time.sleep(1)
            continue
        if finish is None:
            with lock:
                stats["errors"] += 1
                error_samples.append(f"stream of {rid} ended without a finish reason")
            continue
        with lock:
            stats["ok"] += 1
            latencies.append(time.time() - start)
            ttfts.append((first or time.time()) - start)
            acknowledged.append(rid)
        history = messages + [{"role": "assistant", "content": text}]
        turn += 1
        if turn % 3 == 0:
            feedback(rid, "up" if turn % 2 else "down")
        if args.think:
            time.sleep(min(random.uniform(0, 2 * args.think), max(0, deadline - time.time())))


def pct(xs, q):
    xs = sorted(xs)
    return round(1000 * xs[min(len(xs) - 1, int(q * len(xs)))]) if xs else None


rss_start = rss_mb()
t0 = time.time()
deadline = t0 + args.seconds
threads = [threading.Thread(target=client, args=(n, deadline)) for n in range(args.clients)]
for t in threads:
    t.start()
def live_version():
    req = urllib.request.Request(args.base.rstrip("/").removesuffix("/v1") + "/admin/status",
                                 headers={"Authorization": f"Bearer {args.key}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r).get("live_version")
    except Exception:  # noqa: BLE001 (a missed sample is shown as null)
        return None


rss_series, live_series = [], []  # every 30 s: is RSS stable? does training go on?
while any(t.is_alive() for t in threads):
    time.sleep(1)
    if int(time.time() - t0) % 30 == 0 and len(live_series) < (time.time() - t0) // 30:
        live_series.append(live_version())
        if args.pid:
            rss_series.append(round(rss_mb()))
for t in threads:
    t.join()
summary = dict(stats, clients=args.clients, seconds=round(time.time() - t0, 1),
               p50_ms=pct(latencies, 0.5), p99_ms=pct(latencies, 0.99),
               ttft_p50_ms=pct(ttfts, 0.5), ttft_p99_ms=pct(ttfts, 0.99),
               rss_start_mb=rss_start and round(rss_start), rss_end_mb=rss_mb() and round(rss_mb()),
               rss_every_30s_mb=rss_series, live_version_every_30s=live_series,
               think_secs=args.think,
               error_samples=error_samples[:10])
print(json.dumps(summary))
if args.out:
    with open(args.out, "w") as f:
        json.dump(dict(summary, acknowledged=acknowledged), f)
