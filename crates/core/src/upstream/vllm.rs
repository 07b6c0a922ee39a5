//! vLLM's side of the upstream protocol (shapes from vLLM's `entrypoints/openai/protocol.py`,
//! vLLM ≥ 0.10.2): `/v1/completions` with a token-id `prompt`, `return_token_ids` and
//! `logprobs`; adapters named in `model` and loaded with `/v1/load_lora_adapter`.

use super::{Delta, Replica, Request, Upstream};
use clawrl_model::FinishReason;
use hyper::{Method, StatusCode};
use serde_json::{Value, json};

pub(super) const GENERATE: &str = "/v1/completions";
pub(super) const LOAD: &str = "/v1/load_lora_adapter";
pub(super) const UNLOAD: &str = "/v1/unload_lora_adapter";

/// Checks `r` and returns the name of the model it serves.
pub(super) async fn check(up: &Upstream, r: &Replica, probe: &[u32]) -> anyhow::Result<String> {
    let (st, models) = up.ask(r, Method::GET, "/v1/models", None).await?;
    let name = models["data"][0]["id"].as_str().filter(|_| st.is_success());
    let name = name.ok_or_else(|| {
        anyhow::anyhow!("upstream {}: GET /v1/models answered {st}: {models}", r.url)
    })?;
    // The two best log-probs after the probe, sampled at `temperature`.
    let best = |temperature: f64| async move {
        let body = json!({"model": name, "prompt": probe, "max_tokens": 1, "temperature": temperature,
                          "logprobs": 2, "return_token_ids": true,
                          "return_tokens_as_token_ids": true});
        let (st, c) = up.ask(r, Method::POST, GENERATE, Some(&body)).await?;
        let top = c["choices"][0]["logprobs"]["top_logprobs"][0].as_object();
        match (
            st.is_success(),
            c["choices"][0]["token_ids"].is_array(),
            top,
        ) {
            (true, true, Some(top)) => {
                Ok::<Vec<f64>, anyhow::Error>(top.values().filter_map(Value::as_f64).collect())
            }
            _ => Err(anyhow::anyhow!(
                "upstream {}: a token-id prompt with return_token_ids got no token ids back ({st}: {c}); vLLM ≥ 0.10.2 is needed",
                r.url
            )),
        }
    };
    if super::tempered(&best(1.0).await?, &best(0.5).await?) {
        anyhow::bail!(
            "upstream {} returns log-probs after temperature; the trainer needs the model's own: start vLLM with --logprobs-mode raw_logprobs (its default)",
            r.url
        );
    }
    let probe = json!({"lora_name": "clawrl-capability-probe"});
    let (st, answer) = up.ask(r, Method::POST, UNLOAD, Some(&probe)).await?;
    if !answer.to_string().to_lowercase().contains("lora") {
        anyhow::bail!(
            "upstream {}: no runtime LoRA loading (POST {UNLOAD} answered {st}: {answer}); start vLLM with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True",
            r.url
        );
    }
    Ok(name.to_string())
}

/// The streamed completion of `req` under `model` (the base's name or a version's adapter).
pub(super) fn generate_body(req: &Request, model: &str) -> Value {
    let s = &req.sampling;
    json!({
        "model": model, "prompt": req.prompt_ids, "max_tokens": req.max_tokens,
        "temperature": s.temperature, "top_p": s.top_p,
        "top_k": if s.top_k == 0 { -1 } else { s.top_k as i64 },
        "seed": s.seed, "stop": req.stop, "logprobs": req.top_logprobs, "stream": true,
        "return_token_ids": true, "return_tokens_as_token_ids": true,
    })
}

/// vLLM answers a request for an adapter it does not hold with 404.
pub(super) fn lost_adapter(status: StatusCode, _answer: &str) -> bool {
    status == StatusCode::NOT_FOUND
}

/// Why a load or unload was refused (`None`: done).
pub(super) fn refusal(status: StatusCode, answer: &Value) -> Option<String> {
    (!status.is_success()).then(|| {
        let why = answer["error"]["message"].as_str();
        format!(
            "{status}: {}",
            why.map_or_else(|| answer.to_string(), str::to_owned)
        )
    })
}

/// One stream event: each chunk's choice has the new text, `token_ids` and `logprobs`; the
/// first `prompt_token_ids`.
pub(super) fn delta(chunk: &Value, prompt_ids: &[u32]) -> Result<Delta, String> {
    let c = &chunk["choices"][0];
    if c["prompt_token_ids"].is_array() && c["prompt_token_ids"] != json!(prompt_ids) {
        return Err("the replica computed other prompt ids than were sent".into());
    }
    let ids: Vec<u32> = match &c["token_ids"] {
        Value::Null => Vec::new(),
        v => serde_json::from_value(v.clone()).map_err(|e| format!("token_ids: {e}"))?,
    };
    let lp = &c["logprobs"];
    let logprobs = lp["token_logprobs"].as_array().into_iter().flatten();
    let top = lp["top_logprobs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|row| {
            row.as_object()
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| {
                    let id = k.strip_prefix("token_id:")?.parse().ok()?;
                    Some((id, v.as_f64()? as f32))
                })
                .collect()
        });
    Ok(Delta {
        text: c["text"].as_str().unwrap_or_default().to_string(),
        ids,
        logprobs: logprobs
            .map(|v| v.as_f64().unwrap_or(f64::NAN) as f32)
            .collect(),
        top: top.collect(),
        finish: match c["finish_reason"].as_str() {
            Some("length") => Some(FinishReason::Length),
            Some(_) => Some(FinishReason::Stop),
            None => None,
        },
        cached_tokens: chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .map(|n| n as usize),
    })
}

/// Scores `continuation` after `prompt` under `model`: its tokens' log-probs from the prompt
/// log-probs of the whole sequence (one generated token, thrown away).
pub(super) fn score_body(prompt: &[u32], continuation: &[u32], model: &str) -> Value {
    let all: Vec<u32> = prompt.iter().chain(continuation).copied().collect();
    json!({"model": model, "prompt": all, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0})
}

/// The continuation's log-probs from a `score_body` answer: `prompt_logprobs` has, per
/// position, a map from token id to `{"logprob"}` holding the prompt's own token.
pub(super) fn scored(
    answer: &Value,
    start: usize,
    continuation: &[u32],
) -> Result<Vec<f32>, String> {
    let rows = answer["choices"][0]["prompt_logprobs"]
        .as_array()
        .ok_or("no prompt_logprobs in the answer")?;
    continuation
        .iter()
        .enumerate()
        .map(|(j, id)| {
            let lp = rows
                .get(start + j)
                .map(|row| &row[id.to_string()]["logprob"]);
            lp.and_then(Value::as_f64)
                .map(|v| v as f32)
                .ok_or_else(|| format!("no log-prob for token {id} at position {}", start + j))
        })
        .collect()
}
