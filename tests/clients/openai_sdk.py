"""The official `openai` Python SDK against a running clawrl-tui server.

    python3 tests/clients/openai_sdk.py BASE_URL API_KEY MODEL_ID

Prints one line per check ("ok <name>: <detail>"); exits non-zero on the first failure.
"""
import sys
import openai

base, key, model = sys.argv[1:4]
client = openai.OpenAI(base_url=base, api_key=key, max_retries=0)

ids = [m.id for m in client.models.list()]
assert ids == [model], ids
print("ok models.list:", ids)

r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is 2+2?"}], temperature=0, max_tokens=24)
text = r.choices[0].message.content
assert "4" in text, text
assert r.choices[0].finish_reason in ("stop", "length")
assert r.usage.prompt_tokens == 37 and r.usage.completion_tokens > 0, r.usage
print("ok create:", repr(text), r.usage.completion_tokens, "tokens")

chunks = list(client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "What is 2+2?"}], temperature=0, max_tokens=24,
    stream=True, stream_options={"include_usage": True}))
streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert streamed == text, (streamed, text)
assert chunks[0].choices[0].delta.role == "assistant"
finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
assert finish == [r.choices[0].finish_reason], finish
assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0, "the repeated prompt hits the prefix cache"
print("ok stream:", len(chunks), "chunks, cached", chunks[-1].usage.prompt_tokens_details.cached_tokens)

r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hi"}], max_tokens=3, logprobs=True, top_logprobs=2, temperature=0)
lp = r.choices[0].logprobs.content
assert len(lp) == r.usage.completion_tokens and all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in lp), lp
assert lp[0].top_logprobs[0].logprob == lp[0].logprob, "greedy picks the top alternative"
print("ok logprobs:", [(t.token, round(t.logprob, 3)) for t in lp])

try:
    openai.OpenAI(base_url=base, api_key="wrong-key", max_retries=0).models.list()
    raise SystemExit("wrong key accepted")
except openai.AuthenticationError as e:
    print("ok wrong key:", e.status_code, e.body["message"] if isinstance(e.body, dict) else e.body)

try:
    client.chat.completions.create(model="gpt-unknown", messages=[{"role": "user", "content": "hi"}])
    raise SystemExit("unknown model accepted")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body
    print("ok unknown model:", e.status_code, e.body["code"])

try:
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], temperature=5)
    raise SystemExit("temperature 5 accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "temperature", e.body
    print("ok bad parameter:", e.status_code, e.body["param"])
print("ALL OK")
