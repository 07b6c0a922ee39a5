//! Grouping requests into sessions, and finding each turn's next state.
//!
//! With a session id (header or body) the id decides. Without one (the stock OpenClaw CLI, the
//! openai SDK), a request belongs to the open session whose last request + assistant reply is a
//! prefix of its messages, once trailing client-internal context blocks are ignored. The
//! messages after that prefix (the user's reply, or the tool results) are the previous turn's
//! next state.

use crate::events::NextRole;
use clawrl_model::messages::{Message, Role};
use serde_json::Value;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A message reduced to what identifies it across requests.
#[derive(Debug, Clone, PartialEq)]
struct Norm {
    role: Role,
    text: String,
    /// Name and arguments: arguments may come back re-serialized, so they compare as JSON.
    tool_calls: Vec<(String, Value)>,
    tool_call_id: Option<String>,
}

fn normalize(m: &Message) -> Norm {
    Norm {
        role: m.role,
        text: m.text().trim().to_string(),
        tool_calls: m
            .tool_calls
            .iter()
            .map(|c| (c.function.name.clone(), c.arguments_value()))
            .collect(),
        tool_call_id: m.tool_call_id.clone(),
    }
}

/// The messages without trailing client-internal context blocks (user messages carrying one
/// of `markers`; OpenClaw replaces such a block on every turn).
pub(crate) fn strip_internal<'a>(messages: &'a [Message], markers: &[String]) -> &'a [Message] {
    let mut end = messages.len();
    while end > 0 {
        let m = &messages[end - 1];
        let text = m.text();
        if m.role == Role::User
            && markers
                .iter()
                .any(|k| !k.is_empty() && text.contains(k.as_str()))
        {
            end -= 1;
        } else {
            break;
        }
    }
    &messages[..end]
}

struct Open {
    id: String,
    /// Last request's messages + the assistant reply, normalized.
    expected: Vec<Norm>,
    last_turn_id: Option<i64>,
    next_turn_index: i64,
    last_active: Instant,
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Placement {
    pub session_id: String,
    /// Whether this request opened the session.
    pub new_session: bool,
    pub turn_index: i64,
    /// The previous turn of the session and what answered it, when this request carries it.
    pub next_state_of: Option<NextState>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NextState {
    pub turn_id: i64,
    pub messages: Vec<Message>,
    /// `Tool` when every message is a tool result, else `User`.
    pub role: NextRole,
}

#[derive(Default)]
pub(crate) struct SessionTracker {
    open: Vec<Open>,
    /// The next turn index handed out per session id, and when: turns in flight are not in
    /// the store yet, so two of one session (side turns, a session closed and reopened while
    /// a turn runs) would otherwise get the same index.
    handed_out: HashMap<String, (i64, Instant)>,
}

impl SessionTracker {
    /// Places a main-turn request. `first_index` gives the next free turn index of a session
    /// id seen before this process started (from the store).
    pub fn place(
        &mut self,
        explicit: Option<&str>,
        messages: &[Message],
        new_id: impl FnOnce() -> String,
        first_index: impl FnOnce(&str) -> i64,
    ) -> Placement {
        let norm: Vec<Norm> = messages.iter().map(normalize).collect();
        let pos = match explicit {
            Some(id) => self.open.iter().position(|s| s.id == id),
            None => self
                .by_prefix(&norm)
                .or_else(|| self.by_last_reply(&norm))
                .or_else(|| self.by_opening(&norm)),
        };
        let Some(i) = pos else {
            let id = explicit.map(str::to_owned).unwrap_or_else(new_id);
            let turn_index = self.hand_out(&id, first_index(&id));
            self.open.push(Open {
                id: id.clone(),
                expected: Vec::new(),
                last_turn_id: None,
                next_turn_index: turn_index + 1,
                last_active: Instant::now(),
            });
            return Placement {
                session_id: id,
                new_session: true,
                turn_index,
                next_state_of: None,
            };
        };
        let (id, candidate) = (self.open[i].id.clone(), self.open[i].next_turn_index);
        let turn_index = self.hand_out(&id, candidate);
        let s = &mut self.open[i];
        s.last_active = Instant::now();
        s.next_turn_index = turn_index + 1;
        let next_state_of = s.last_turn_id.and_then(|turn_id| {
            // Everything after the known prefix; with an explicit id whose history does not
            // match (a client sending only new messages), the messages after the last assistant one.
            let start = if !s.expected.is_empty() && norm.starts_with(&s.expected) {
                s.expected.len()
            } else {
                norm.iter()
                    .rposition(|m| m.role == Role::Assistant)
                    .map_or(0, |p| p + 1)
            };
            let after: Vec<Message> = messages[start..]
                .iter()
                .filter(|m| matches!(m.role, Role::User | Role::Tool))
                .cloned()
                .collect();
            (!after.is_empty()).then(|| {
                let role = if after.iter().all(|m| m.role == Role::Tool) {
                    NextRole::Tool
                } else {
                    NextRole::User
                };
                NextState {
                    turn_id,
                    messages: after,
                    role,
                }
            })
        });
        if next_state_of.is_some() {
            s.last_turn_id = None; // a turn gets one next state
        }
        Placement {
            session_id: s.id.clone(),
            new_session: false,
            turn_index,
            next_state_of,
        }
    }

    /// The open session whose last request + reply is a prefix of `norm` (longest wins).
    fn by_prefix(&self, norm: &[Norm]) -> Option<usize> {
        self.open
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                !s.expected.is_empty()
                    && s.expected.len() < norm.len()
                    && norm.starts_with(&s.expected)
            })
            .max_by_key(|(_, s)| s.expected.len())
            .map(|(i, _)| i)
    }

    /// Clients that rewrite earlier messages (OpenClaw 2026.9 folds a turn's user messages into
    /// one and drops per-turn runtime notes) break exact prefixes. Fallback: the request's last
    /// assistant message is (nearly: clients strip directive tags and control tokens from
    /// replies before echoing them) a session's last reply, its first (system) message is the
    /// same, and something follows the reply. The most recently active such session wins.
    fn by_last_reply(&self, norm: &[Norm]) -> Option<usize> {
        let last_assistant = norm.iter().rposition(|m| m.role == Role::Assistant)?;
        if last_assistant + 1 == norm.len() {
            return None;
        }
        self.most_recent(|s| {
            s.expected
                .last()
                .is_some_and(|r| same_reply(r, &norm[last_assistant]))
                && s.expected.first() == norm.first()
        })
    }

    /// Last fallback, for a reply the client rewrote beyond recognition: the same opening
    /// (system prompt and first user message, whitespace aside) and as many assistant
    /// messages as the session has produced, followed by something new. A retry or an edit
    /// of an earlier message changes that count and opens a new session.
    fn by_opening(&self, norm: &[Norm]) -> Option<usize> {
        let replies = norm.iter().filter(|m| m.role == Role::Assistant).count();
        if replies == 0 || norm.last().is_some_and(|m| m.role == Role::Assistant) {
            return None;
        }
        let opening = opening(norm)?;
        self.most_recent(|s| {
            s.expected
                .iter()
                .filter(|m| m.role == Role::Assistant)
                .count()
                == replies
                && s.expected.first().map(|m| &m.role) == norm.first().map(|m| &m.role)
                && opening_matches(&s.expected, &opening)
        })
    }

    fn most_recent(&self, matches: impl Fn(&Open) -> bool) -> Option<usize> {
        self.open
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.expected.is_empty() && matches(s))
            .max_by_key(|(_, s)| s.last_active)
            .map(|(i, _)| i)
    }

    /// Records the reply of a main turn: the session now expects `messages + reply` as prefix.
    pub(crate) fn record_reply(
        &mut self,
        session_id: &str,
        turn_id: i64,
        messages: &[Message],
        reply: &Message,
    ) {
        if let Some(s) = self.open.iter_mut().find(|s| s.id == session_id) {
            s.expected = messages
                .iter()
                .chain(std::iter::once(reply))
                .map(normalize)
                .collect();
            s.last_turn_id = Some(turn_id);
            s.last_active = Instant::now();
        }
    }

    /// Continues a session a previous process left open: `history` + `reply` is what its
    /// next request should start with, `awaiting` the turn still waiting for its next state.
    pub fn resume(
        &mut self,
        session_id: &str,
        history: &[Message],
        reply: Option<&Message>,
        awaiting: Option<i64>,
        next_turn_index: i64,
        idle_for: Duration,
    ) {
        let expected = match reply {
            Some(r) => history
                .iter()
                .chain(std::iter::once(r))
                .map(normalize)
                .collect(),
            None => Vec::new(),
        };
        self.open.retain(|s| s.id != session_id);
        self.open.push(Open {
            id: session_id.to_string(),
            expected,
            last_turn_id: awaiting,
            next_turn_index,
            last_active: Instant::now()
                .checked_sub(idle_for)
                .unwrap_or_else(Instant::now),
        });
    }

    /// The next turn index of a session for a turn that takes no part in history matching
    /// (a side turn), so that side and main turns of one session never share an index.
    pub(crate) fn reserve_index(
        &mut self,
        session_id: &str,
        first_index: impl FnOnce(&str) -> i64,
    ) -> i64 {
        let open = self.open.iter().position(|s| s.id == session_id);
        let candidate = match open {
            Some(i) => self.open[i].next_turn_index,
            None => first_index(session_id),
        };
        let index = self.hand_out(session_id, candidate);
        if let Some(i) = open {
            self.open[i].next_turn_index = index + 1;
        }
        index
    }

    /// `candidate`, or the next index after those already handed out for `session_id`.
    fn hand_out(&mut self, session_id: &str, candidate: i64) -> i64 {
        let now = Instant::now();
        let entry = self
            .handed_out
            .entry(session_id.to_string())
            .or_insert((candidate, now));
        let index = candidate.max(entry.0);
        *entry = (index + 1, now);
        index
    }

    pub fn close(&mut self, session_id: &str) -> bool {
        let before = self.open.len();
        self.open.retain(|s| s.id != session_id);
        self.open.len() != before
    }

    /// Closes and returns the sessions idle for longer than `timeout`.
    pub(crate) fn close_idle(&mut self, timeout: Duration) -> Vec<String> {
        let (idle, keep): (Vec<Open>, Vec<Open>) = std::mem::take(&mut self.open)
            .into_iter()
            .partition(|s| s.last_active.elapsed() > timeout);
        self.open = keep;
        // Indexes handed out that long ago are committed (or their turn is gone).
        self.handed_out.retain(|_, (_, at)| at.elapsed() <= timeout);
        idle.into_iter().map(|s| s.id).collect()
    }

    pub(crate) fn open_count(&self) -> usize {
        self.open.len()
    }
}

/// Text without any whitespace: what survives a client re-joining or re-wrapping lines.
fn squash(s: &str) -> String {
    s.chars().filter(|c| !c.is_whitespace()).collect()
}

/// The system prompt (if any) and the first user message, squashed.
fn opening(norm: &[Norm]) -> Option<(String, String)> {
    let system = norm
        .first()
        .filter(|m| matches!(m.role, Role::System | Role::Developer))
        .map_or(String::new(), |m| squash(&m.text));
    let user = norm.iter().find(|m| m.role == Role::User)?;
    Some((system, squash(&user.text)))
}

fn opening_matches(expected: &[Norm], seen: &(String, String)) -> bool {
    opening(expected).is_some_and(|(system, user)| {
        system == seen.0
            && !user.is_empty()
            && (seen.1.starts_with(&user) || user.starts_with(&seen.1))
    })
}

/// Whether `seen` is the client's echo of the `sent` reply: the same tool calls, and text that
/// is equal or differs only by what clients strip (tags, control tokens, whitespace): 80 % of
/// the shorter text's words are in the longer one, and it keeps at least half of them.
fn same_reply(sent: &Norm, seen: &Norm) -> bool {
    if sent.role != seen.role || sent.tool_calls != seen.tool_calls {
        return false;
    }
    if sent.text == seen.text || squash(&sent.text) == squash(&seen.text) {
        return true;
    }
    let words = |s: &str| -> Vec<String> {
        s.split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect()
    };
    let (a, b) = (words(&sent.text), words(&seen.text));
    if a.is_empty() || b.is_empty() {
        return false;
    }
    let mut pool = a.clone();
    let common = b
        .iter()
        .filter(|w| match pool.iter().position(|p| p == *w) {
            Some(i) => {
                pool.swap_remove(i);
                true
            }
            None => false,
        })
        .count();
    let (short, long) = (a.len().min(b.len()), a.len().max(b.len()));
    common * 5 >= short * 4 && short * 2 >= long
}

#[cfg(test)]
mod tests {
    use super::*;
    use clawrl_model::message;

    fn ids() -> impl FnMut() -> String {
        crate::capture::numbered_ids("s")
    }

    const MARK: &str = "<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>>";

    #[test]
    fn turns_in_flight_of_one_session_id_never_share_an_index() {
        let mut t = SessionTracker::default();
        let hi = [message!({"role": "user", "content": "Hi"})];
        // Nothing is committed yet: the store says index 0 is free every time.
        let side_a = t.reserve_index("s", |_| 0);
        let side_b = t.reserve_index("s", |_| 0);
        let main = t.place(Some("s"), &hi, ids(), |_| 0).turn_index;
        // The client closes the session while that turn runs, and comes back at once.
        assert!(t.close("s"));
        let reopened = t.place(Some("s"), &hi, ids(), |_| 0).turn_index;
        assert_eq!(vec![side_a, side_b, main, reopened], vec![0, 1, 2, 3]);
        // A session seen in an earlier process continues after its stored turns.
        assert_eq!(t.reserve_index("old", |_| 7), 7);
    }

    #[test]
    fn headerless_turns_chain_by_history_and_ignore_internal_context() {
        let mut t = SessionTracker::default();
        let mut new_id = ids();
        let markers = vec![MARK.to_string()];
        let sys = message!({"role": "system", "content": "You are an agent."});
        let ctx = |n: u32| message!({"role": "user", "content": [{"type": "text", "text": format!("{MARK} turn {n} <<<END>>>")}]});
        let u1 = message!({"role": "user", "content": "Hi"});
        let r1 = [sys.clone(), u1.clone(), ctx(1)];
        let p1 = t.place(None, strip_internal(&r1, &markers), &mut new_id, |_| 0);
        assert_eq!(
            (p1.session_id.as_str(), p1.turn_index, p1.new_session),
            ("s1", 0, true)
        );
        let a1 = message!({"role": "assistant", "content": "Hello! "});
        t.record_reply("s1", 10, strip_internal(&r1, &markers), &a1);

        // Another client's unrelated conversation opens its own session.
        let other = [message!({"role": "user", "content": "Unrelated"})];
        assert_eq!(t.place(None, &other, &mut new_id, |_| 0).session_id, "s2");

        // The same conversation continues, with a fresh internal block and the reply echoed
        // back (content as a list of parts, whitespace trimmed).
        let u2 = message!({"role": "user", "content": "Thanks, now count to 3"});
        let r2 = [
            sys.clone(),
            u1.clone(),
            message!({"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]}),
            u2.clone(),
            ctx(2),
        ];
        let p2 = t.place(None, strip_internal(&r2, &markers), &mut new_id, |_| 0);
        assert_eq!(p2.session_id, "s1");
        assert_eq!(p2.turn_index, 1);
        let ns = p2.next_state_of.unwrap();
        assert_eq!((ns.turn_id, ns.role.as_str()), (10, "user"));
        assert_eq!(ns.messages, vec![u2]);
    }

    #[test]
    fn tool_results_are_the_next_state_of_a_tool_call() {
        let mut t = SessionTracker::default();
        let u = message!({"role": "user", "content": "Weather?"});
        t.place(None, std::slice::from_ref(&u), || "s".into(), |_| 0);
        let call = message!({"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{\"city\":\"Paris\"}"}}]});
        t.record_reply("s", 1, std::slice::from_ref(&u), &call);
        // Arguments re-serialized with other spacing still match.
        let echoed = message!({"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{\"city\": \"Paris\"}"}}]});
        let r1 = message!({"role": "tool", "tool_call_id": "c1", "content": "18C"});
        let r2 = message!({"role": "tool", "tool_call_id": "c2", "content": "sunny"});
        let p = t.place(
            None,
            &[u, echoed, r1.clone(), r2.clone()],
            || "new".into(),
            |_| 0,
        );
        assert_eq!(p.session_id, "s");
        let ns = p.next_state_of.unwrap();
        assert_eq!(ns.role, NextRole::Tool);
        assert_eq!(ns.messages, vec![r1, r2]);
    }

    #[test]
    fn a_client_that_rewrites_earlier_user_messages_stays_in_its_session() {
        // What OpenClaw 2026.9 sends: turn 1 carries a runtime note and a duplicate user line;
        // turn 2 folds them into one message of parts.
        let mut t = SessionTracker::default();
        let sys = message!({"role": "system", "content": "agent rules"});
        let r1 = [
            sys.clone(),
            message!({"role": "user", "content": "[10:00] What is 2+2?\n\nRuntime: agent=main"}),
            message!({"role": "user", "content": "[10:00] What is 2+2?"}),
        ];
        let p1 = t.place(None, &r1, || "oc".into(), |_| 0);
        t.record_reply(
            &p1.session_id,
            5,
            &r1,
            &message!({"role": "assistant", "content": "4"}),
        );
        let other = [
            message!({"role": "system", "content": "other rules"}),
            message!({"role": "user", "content": "x"}),
            message!({"role": "assistant", "content": "4"}),
            message!({"role": "user", "content": "y"}),
        ];
        assert_ne!(
            t.place(None, &other, || "other".into(), |_| 0).session_id,
            "oc",
            "another system prompt is another conversation"
        );
        let next = message!({"role": "user", "content": "[10:01] Add 3."});
        let r2 = [
            sys,
            message!({"role": "user", "content": [{"type": "text", "text": "[10:00] What is 2+2?"}, {"type": "text", "text": "Runtime: agent=main"}]}),
            message!({"role": "assistant", "content": "4"}),
            next.clone(),
        ];
        let p2 = t.place(None, &r2, || "new".into(), |_| 0);
        assert_eq!(p2.session_id, "oc");
        assert_eq!(p2.next_state_of.unwrap().messages, vec![next]);
    }

    #[test]
    fn a_reply_the_client_sanitized_still_continues_its_session() {
        let mut t = SessionTracker::default();
        let sys = message!({"role": "system", "content": "agent rules"});
        let u1 =
            message!({"role": "user", "content": "[16:48] What is 2+2?\n\nRuntime: sessionId=a"});
        t.place(None, &[sys.clone(), u1.clone()], || "a".into(), |_| 0);
        let sent = "[[reply_to_current]] @BruceA\nI'm glad to know you're here.\n\nHere's how it all works:";
        t.record_reply(
            "a",
            1,
            &[sys.clone(), u1.clone()],
            &message!({"role": "assistant", "content": sent}),
        );
        // A second conversation with another opening.
        let u9 = message!({"role": "user", "content": "[16:50] Other"});
        t.place(None, &[sys.clone(), u9.clone()], || "b".into(), |_| 0);
        t.record_reply(
            "b",
            2,
            &[sys.clone(), u9],
            &message!({"role": "assistant", "content": "Other reply"}),
        );

        // The directive tag is stripped from the echoed reply: still session a.
        let echoed = message!({"role": "assistant", "content": "@BruceA\nI'm glad to know you're here.\n\nHere's how it all works:"});
        let next = message!({"role": "user", "content": "[16:49] Now add 3."});
        let r2 = [sys.clone(), u1.clone(), echoed, next.clone()];
        let p = t.place(None, &r2, || "new".into(), |_| 0);
        assert_eq!(p.session_id, "a");
        assert_eq!(p.next_state_of.unwrap().messages, vec![next.clone()]);
        t.record_reply(
            "a",
            3,
            &r2,
            &message!({"role": "assistant", "content": "5"}),
        );

        // Rewritten beyond recognition: the opening and the reply count still place it.
        let r = [
            sys.clone(),
            u1.clone(),
            message!({"role": "assistant", "content": "(hidden)"}),
            next.clone(),
            message!({"role": "assistant", "content": "five"}),
            message!({"role": "user", "content": "Thanks"}),
        ];
        let p = t.place(None, &r, || "new".into(), |_| 0);
        assert_eq!(p.session_id, "a");
        assert_eq!(p.turn_index, 2);
        // A retry of the first turn (no reply yet in its history) is a new conversation.
        let retry = [
            sys,
            u1,
            message!({"role": "assistant", "content": "x"}),
            message!({"role": "user", "content": "y"}),
        ];
        t.record_reply("a", 4, &r, &message!({"role": "assistant", "content": "z"}));
        assert_ne!(
            t.place(None, &retry, || "retry".into(), |_| 0).session_id,
            "a"
        );
    }

    #[test]
    fn replies_match_despite_stripped_tags_but_not_different_text() {
        let n = |t: &str| Norm {
            role: Role::Assistant,
            text: t.into(),
            tool_calls: vec![],
            tool_call_id: None,
        };
        assert!(same_reply(
            &n("[[reply_to_current]] The answer is 4."),
            &n("The answer is 4.")
        ));
        assert!(same_reply(&n("a\nb  c"), &n("a b\nc")));
        assert!(!same_reply(
            &n("The answer is 4."),
            &n("I cannot help with that request.")
        ));
        assert!(!same_reply(&n("ok"), &n("")));
    }

    #[test]
    fn explicit_ids_win_and_idle_sessions_close() {
        let mut t = SessionTracker::default();
        let p = t.place(
            Some("abc"),
            &[message!({"role": "user", "content": "a"})],
            || unreachable!(),
            |_| 7,
        );
        assert_eq!(
            (p.session_id.as_str(), p.turn_index),
            ("abc", 7),
            "numbering continues after a restart"
        );
        t.record_reply(
            "abc",
            3,
            &[message!({"role": "user", "content": "a"})],
            &message!({"role": "assistant", "content": "b"}),
        );
        // A client that sends only the new message still attaches it as the next state.
        let p = t.place(
            Some("abc"),
            &[message!({"role": "user", "content": "c"})],
            || unreachable!(),
            |_| 0,
        );
        assert_eq!(p.turn_index, 8);
        assert_eq!(
            p.next_state_of.unwrap().messages,
            vec![message!({"role": "user", "content": "c"})]
        );
        assert_eq!(
            t.close_idle(Duration::from_secs(3600)),
            Vec::<String>::new()
        );
        assert_eq!(t.close_idle(Duration::ZERO), vec!["abc".to_string()]);
        assert_eq!(t.open_count(), 0);
    }
}
