//! SGLang's side of the upstream protocol, its native API (shapes from SGLang's
//! `managers/io_struct.py` and `entrypoints/http_server.py`): `/generate` with `input_ids`,
//! `return_logprob` and `top_logprobs_num`, the adapter named in `lora_path`; adapters loaded
//! with `/load_lora_adapter` (SGLang started with `--enable-lora`).

use super::{Assembled, Delta, Replica, Request, Upstream};
use clawrl_model::FinishReason;
use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use std::sync::atomic::Ordering;

pub(super) const GENERATE: &str = "/generate";
pub(super) const LOAD: &str = "/load_lora_adapter";
pub(super) const UNLOAD: &str = "/unload_lora_adapter";

/// GETs `path`, or `fallback` where a newer or older SGLang has only that one.
async fn info(up: &Upstream, r: &Replica, path: &str, fallback: &str) -> anyhow::Result<Value> {
    for p in [path, fallback] {
        let (st, v) = up.ask(r, Method::GET, p, None).await?;
        if st.is_success() {
            return Ok(v);
        }
        if st != StatusCode::NOT_FOUND {
            anyhow::bail!("upstream {}: GET {p} answered {st}: {v}", r.url);
        }
    }
    anyhow::bail!(
        "upstream {}: neither GET {path} nor {fallback} is there: is it SGLang?",
        r.url
    )
}

/// Checks `r` and returns the model it serves (`model_path`).
pub(super) async fn check(up: &Upstream, r: &Replica, probe: &[u32]) -> anyhow::Result<String> {
    let model = info(up, r, "/get_model_info", "/model_info").await?;
    let name = model["model_path"].as_str().ok_or_else(|| {
        anyhow::anyhow!(
            "upstream {}: /get_model_info has no model_path: {model}",
            r.url
        )
    })?;
    let server = info(up, r, "/get_server_info", "/server_info").await?;
    let version = server["version"].as_str().unwrap_or("of unknown version");
    // Chunks carry everything so far, unless started with --incremental-streaming-output.
    let incremental = server["incremental_streaming_output"] == true;
    r.incremental.store(incremental, Ordering::SeqCst);

    // The two best log-probs after the probe, sampled at `temperature`.
    let best = |temperature: f64| async move {
        let body = json!({"input_ids": probe, "sampling_params": {"max_new_tokens": 1, "temperature": temperature},
                          "return_logprob": true, "top_logprobs_num": 2});
        let (st, g) = up.ask(r, Method::POST, GENERATE, Some(&body)).await?;
        let top = g["meta_info"]["output_top_logprobs"][0].as_array();
        match (
            st.is_success(),
            g["meta_info"]["output_token_logprobs"][0][1].is_u64(),
            top,
        ) {
            (true, true, Some(top)) => {
                Ok::<Vec<f64>, anyhow::Error>(top.iter().filter_map(|e| e[0].as_f64()).collect())
            }
            _ => Err(anyhow::anyhow!(
                "upstream {} (SGLang {version}): /generate with input_ids and return_logprob got no token ids back ({st}: {g})",
                r.url
            )),
        }
    };
    if super::tempered(&best(1.0).await?, &best(0.5).await?) {
        anyhow::bail!(
            "upstream {} (SGLang {version}) returns log-probs after temperature; the trainer needs the model's own: start SGLang with SGLANG_RETURN_ORIGINAL_LOGPROB=True",
            r.url
        );
    }
    let probe = json!({"lora_name": "clawrl-capability-probe"});
    let (st, answer) = up.ask(r, Method::POST, UNLOAD, Some(&probe)).await?;
    let why = answer["error_message"].as_str().unwrap_or_default();
    if answer.get("success").is_none() || why.to_lowercase().contains("not enabled") {
        anyhow::bail!(
            "upstream {} (SGLang {version}): no runtime LoRA loading (POST {UNLOAD} answered {st}: {answer}); start SGLang with --enable-lora --max-lora-rank R --lora-target-modules all (SGLang with /load_lora_adapter, mid-2025 or newer)",
            r.url
        );
    }
    Ok(name.to_string())
}

/// The streamed generation of `req`, under `adapter` (`None`: the base model).
pub(super) fn generate_body(req: &Request, adapter: Option<String>) -> Value {
    let s = &req.sampling;
    let mut body = json!({
        "input_ids": req.prompt_ids,
        "sampling_params": {
            "max_new_tokens": req.max_tokens, "temperature": s.temperature, "top_p": s.top_p,
            "top_k": if s.top_k == 0 { -1 } else { s.top_k as i64 }, "stop": req.stop,
        },
        // Log-probs of the output only: the prompt's would limit the radix cache's reuse.
        "return_logprob": true, "logprob_start_len": -1, "top_logprobs_num": req.top_logprobs,
        "stream": true,
    });
    if let Some(name) = adapter {
        body["lora_path"] = json!(name);
    }
    body
}

/// SGLang refuses a request for an adapter it does not hold with 400 "… not loaded".
pub(super) fn lost_adapter(status: StatusCode, answer: &str) -> bool {
    status == StatusCode::BAD_REQUEST && answer.contains("not loaded")
}

/// Why a load or unload was refused (`None`: done): `{"success": false, "error_message"}`.
pub(super) fn refusal(status: StatusCode, answer: &Value) -> Option<String> {
    if status.is_success() && answer["success"] != false {
        return None;
    }
    let why = answer["error_message"]
        .as_str()
        .or(answer["error"]["message"].as_str());
    Some(format!(
        "{status}: {}",
        why.map_or_else(|| answer.to_string(), str::to_owned)
    ))
}

/// The new part of one stream event. By default SGLang sends everything so far in each
/// event (text, and the output log-probs with their ids); with `incremental` only the new part.
pub(super) fn delta(chunk: &Value, so_far: &Assembled, incremental: bool) -> Result<Delta, String> {
    let meta = &chunk["meta_info"];
    let finish = match meta["finish_reason"]["type"].as_str() {
        None => None,
        Some("length") => Some(FinishReason::Length),
        Some("abort") => {
            let why = meta["finish_reason"]["message"].as_str();
            return Err(why.unwrap_or("the replica aborted the request").to_string());
        }
        Some(_) => Some(FinishReason::Stop),
    };
    let entries = meta["output_token_logprobs"].as_array();
    let tops = meta["output_top_logprobs"].as_array();
    let (skip, text) = if incremental {
        (0, chunk["text"].as_str().unwrap_or_default())
    } else {
        let text = chunk["text"].as_str().unwrap_or_default();
        let new = text
            .strip_prefix(so_far.text.as_str())
            .ok_or("the replica's streamed text changed what it had sent")?;
        (so_far.ids.len(), new)
    };
    let mut ids = Vec::new();
    let mut logprobs = Vec::new();
    for e in entries.into_iter().flatten().skip(skip) {
        // [log-prob, token id, text or null]
        let id = e[1]
            .as_u64()
            .ok_or_else(|| format!("a log-prob entry: {e}"))?;
        ids.push(id as u32);
        logprobs.push(e[0].as_f64().unwrap_or(f64::NAN) as f32);
    }
    let top = tops.into_iter().flatten().skip(skip).map(|row| {
        let row = row.as_array().into_iter().flatten();
        row.filter_map(|e| Some((e[1].as_u64()? as u32, e[0].as_f64()? as f32)))
            .collect()
    });
    Ok(Delta {
        text: text.to_string(),
        ids,
        logprobs,
        top: top.collect(),
        finish,
        cached_tokens: meta["cached_tokens"].as_u64().map(|n| n as usize),
    })
}

/// Scores `continuation` after `prompt` under `adapter`: the input log-probs from where the
/// continuation starts (one generated token, thrown away).
pub(super) fn score_body(prompt: &[u32], continuation: &[u32], adapter: Option<String>) -> Value {
    let all: Vec<u32> = prompt.iter().chain(continuation).copied().collect();
    let mut body = json!({"input_ids": all, "sampling_params": {"max_new_tokens": 1, "temperature": 0},
                          "return_logprob": true, "logprob_start_len": prompt.len()});
    if let Some(name) = adapter {
        body["lora_path"] = json!(name);
    }
    body
}

/// The continuation's log-probs from a `score_body` answer (`input_token_logprobs`, entries
/// `[log-prob, token id, text]` from the continuation's first token on).
pub(super) fn scored(answer: &Value, continuation: &[u32]) -> Result<Vec<f32>, String> {
    let rows = answer["meta_info"]["input_token_logprobs"]
        .as_array()
        .ok_or("no input_token_logprobs in the answer")?;
    if rows.len() < continuation.len() {
        return Err(format!(
            "{} input log-probs for {} tokens",
            rows.len(),
            continuation.len()
        ));
    }
    continuation
        .iter()
        .zip(rows)
        .map(|(&id, e)| match (e[0].as_f64(), e[1].as_u64()) {
            (Some(lp), Some(got)) if got == id as u64 => Ok(lp as f32),
            _ => Err(format!(
                "the input log-prob entry {e} is not for token {id}"
            )),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(text: &str, entries: &[(f64, u32)], finish: Value) -> Value {
        let lp: Vec<Value> = entries.iter().map(|(l, id)| json!([l, id, null])).collect();
        let top: Vec<Value> = entries
            .iter()
            .map(|(l, id)| json!([[l, id, null]]))
            .collect();
        json!({"text": text, "meta_info": {"finish_reason": finish, "cached_tokens": 3,
               "output_token_logprobs": lp, "output_top_logprobs": top}})
    }

    fn assemble(events: &[Value], incremental: bool) -> Assembled {
        let mut a = Assembled::default();
        for e in events {
            let d = delta(e, &a, incremental).unwrap();
            a.add(d);
        }
        a
    }

    #[test]
    fn cumulative_and_incremental_streams_give_the_same_reply() {
        let cumulative = [
            event("Hel", &[(-0.1, 5)], Value::Null),
            event("Hello", &[(-0.1, 5), (-0.2, 6)], Value::Null),
            event(
                "Hello!",
                &[(-0.1, 5), (-0.2, 6), (-0.3, 7)],
                json!({"type": "length", "length": 3}),
            ),
        ];
        let incremental = [
            event("Hel", &[(-0.1, 5)], Value::Null),
            event("lo", &[(-0.2, 6)], Value::Null),
            event("!", &[(-0.3, 7)], json!({"type": "length", "length": 3})),
        ];
        for a in [assemble(&cumulative, false), assemble(&incremental, true)] {
            assert_eq!(a.text, "Hello!");
            assert_eq!(a.ids, [5, 6, 7]);
            assert_eq!(a.logprobs, [-0.1, -0.2, -0.3]);
            assert_eq!(a.top_logprobs[2], [(7, -0.3)]);
            assert_eq!(a.finish, Some(FinishReason::Length));
            assert_eq!(a.cached_tokens, 3);
        }
        // Text before its ids (clawrl's own replica sends the ids with the last event).
        let late_ids = [
            event("Hel", &[], Value::Null),
            event(
                "Hello!",
                &[(-0.1, 5), (-0.2, 6), (-0.3, 7)],
                json!({"type": "stop", "matched": 2}),
            ),
        ];
        let a = assemble(&late_ids, false);
        assert_eq!((a.text.as_str(), a.ids.len()), ("Hello!", 3));
        assert_eq!(a.finish, Some(FinishReason::Stop));
    }

    #[test]
    fn an_abort_or_a_rewritten_text_is_an_error() {
        let abort = json!({"text": "", "meta_info": {"finish_reason": {"type": "abort", "message": "out of memory"}}});
        let e = delta(&abort, &Assembled::default(), false).unwrap_err();
        assert_eq!(e, "out of memory");
        let mut a = Assembled::default();
        a.add(delta(&event("Hello", &[], Value::Null), &a, false).unwrap());
        let e = delta(&event("Help", &[], Value::Null), &a, false).unwrap_err();
        assert!(e.contains("changed"), "{e}");
    }

    #[test]
    fn refusals_are_read_from_sglangs_answer() {
        assert_eq!(refusal(StatusCode::OK, &json!({"success": true})), None);
        let no =
            json!({"success": false, "error_message": "LoRA rank 64 exceeds max_lora_rank 16"});
        let why = refusal(StatusCode::BAD_REQUEST, &no).unwrap();
        assert!(why.contains("max_lora_rank 16"), "{why}");
        assert!(lost_adapter(
            StatusCode::BAD_REQUEST,
            "The following requested LoRA adapters are not loaded: clawrl-v3"
        ));
        assert!(!lost_adapter(StatusCode::BAD_REQUEST, "context too long"));
    }
}
