//! `POST /v1/feedback`: a human rating (thumbs up/down) for one turn, named by its chat
//! completion id (`response_id`) or by `session_id` + `turn`. It overrides the judge's score
//! for training; both are kept.

use super::Core;
use super::http::{self, ApiError, Body, blocking, json_response};
use clawrl_core::store::{FeedbackError, TurnRef};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};
use std::sync::Arc;

/// Comments longer than this are refused rather than silently cut.
const MAX_COMMENT_CHARS: usize = 4000;

pub(crate) async fn route(
    state: Arc<Core>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    http::authorize(&req, state.config.api_key.as_deref())?;
    let body = http::read_json(req, http::BodyLimits::of(&state.config)).await?;
    let (turn, rating, comment) = parse(&body)?;
    let core = state.clone();
    let recorded = blocking("Could not record the feedback", move || {
        Ok(core.rate(&turn, rating, comment.as_deref(), "api"))
    })
    .await?
    .map_err(|e| match e {
        FeedbackError::UnknownTurn(m) => {
            ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", m).code("turn_not_found")
        }
        FeedbackError::SideTurn(m) => ApiError::invalid(m).code("side_turn"),
        FeedbackError::Store(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            format!("Could not record the feedback: {e:#}"),
        ),
    })?;
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "object": "feedback",
            "session_id": recorded.session_id,
            "turn": recorded.turn_index,
            "response_id": recorded.response_id,
            "rating": if recorded.rating > 0 { "up" } else { "down" },
            "judge_score": recorded.judge_score,
            "reward": recorded.rating,
        }),
    ))
}

fn parse(body: &Value) -> Result<(TurnRef, i8, Option<String>), ApiError> {
    let obj = body
        .as_object()
        .ok_or_else(|| ApiError::invalid("The request body must be a JSON object."))?;
    let rating = match obj.get("rating") {
        Some(Value::String(s)) if s.eq_ignore_ascii_case("up") => 1,
        Some(Value::String(s)) if s.eq_ignore_ascii_case("down") => -1,
        Some(v) if v.as_i64() == Some(1) => 1,
        Some(v) if v.as_i64() == Some(-1) => -1,
        Some(v) => {
            return Err(ApiError::invalid(format!(
                "`rating` must be \"up\" or \"down\", got {v}."
            ))
            .param("rating"));
        }
        None => {
            return Err(
                ApiError::invalid("`rating` (\"up\" or \"down\") is required.").param("rating"),
            );
        }
    };
    let comment = match obj.get("comment") {
        None | Some(Value::Null) => None,
        Some(Value::String(c)) if c.chars().count() <= MAX_COMMENT_CHARS => Some(c.clone()),
        Some(Value::String(_)) => {
            return Err(ApiError::invalid(format!(
                "`comment` is longer than {MAX_COMMENT_CHARS} characters."
            ))
            .param("comment"));
        }
        Some(_) => return Err(ApiError::invalid("`comment` must be a string.").param("comment")),
    };
    let text = |k: &str| {
        obj.get(k)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
    };
    let turn = match (text("response_id"), text("session_id"), obj.get("turn")) {
        (Some(id), _, _) => TurnRef::ResponseId(id.to_string()),
        (None, Some(session), Some(turn)) => TurnRef::Index {
            session_id: session.to_string(),
            turn_index: turn.as_i64().filter(|t| *t >= 0).ok_or_else(|| {
                ApiError::invalid("`turn` must be a non-negative integer (the turn index).")
                    .param("turn")
            })?,
        },
        _ => {
            return Err(ApiError::invalid(
                "Name the turn: `response_id` (the chat completion's id), or `session_id` and `turn`.",
            ));
        }
    };
    Ok((turn, rating, comment))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rating_names_its_turn_by_response_id_or_session_and_index() {
        let (t, r, c) = parse(&json!({"response_id": "chatcmpl-1", "rating": "up"})).unwrap();
        assert_eq!(
            (t, r, c),
            (TurnRef::ResponseId("chatcmpl-1".into()), 1, None)
        );
        let (t, r, c) =
            parse(&json!({"session_id": "s", "turn": 2, "rating": "DOWN", "comment": "too long"}))
                .unwrap();
        assert_eq!(
            t,
            TurnRef::Index {
                session_id: "s".into(),
                turn_index: 2
            }
        );
        assert_eq!((r, c.as_deref()), (-1, Some("too long")));
        assert_eq!(
            parse(&json!({"response_id": "x", "rating": -1})).unwrap().1,
            -1
        );
    }

    #[test]
    fn bad_feedback_says_what_is_wrong() {
        let msg = |v: Value| parse(&v).unwrap_err().message;
        assert!(msg(json!({"response_id": "x"})).contains("`rating`"));
        assert!(msg(json!({"response_id": "x", "rating": "meh"})).contains("\"meh\""));
        assert!(msg(json!({"session_id": "s", "rating": "up"})).contains("Name the turn"));
        assert!(
            msg(json!({"session_id": "s", "turn": -1, "rating": "up"})).contains("non-negative")
        );
        assert!(
            msg(json!({"response_id": "x", "rating": "up", "comment": 5})).contains("`comment`")
        );
        assert!(msg(json!([1])).contains("JSON object"));
    }
}
