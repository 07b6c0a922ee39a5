//! Commands a face gives the core (the screen's keys and chat box) and their execution. A face
//! only sends them; every outcome comes back on the bus: the events of the stage that acted
//! (a captured turn, a version gone live, training paused) or a `Notice` saying what failed.

use crate::Core;
use crate::capture::TurnType;
use crate::chat::{self, ChatRequest, Step};
use crate::events::{CloseReason, Event, Level, emit};
use crate::gate::GateError;
use crate::store::TurnRef;
use clawrl_model::SamplingParams;
use clawrl_model::messages::Message;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Say something in a chat session: the conversation so far, ending with the new message.
    Chat {
        session_id: String,
        messages: Vec<Message>,
    },
    /// Close a chat session (its last reply will get no next state).
    EndChat {
        session_id: String,
    },
    /// Rate a turn (+1 / -1); it overrides the judge for training, as `/v1/feedback` does.
    Rate {
        turn: TurnRef,
        rating: i8,
    },
    Approve(i64),
    Veto(i64),
    /// Roll back to this version, or to the one live before the current one.
    Rollback(Option<i64>),
    PauseTraining,
    ResumeTraining,
}

pub type CommandSender = mpsc::UnboundedSender<Command>;

/// Executes commands until every sender is gone, then waits for the chats in flight.
pub async fn run(core: Arc<Core>, mut commands: mpsc::UnboundedReceiver<Command>) {
    let mut chats = JoinSet::new();
    while let Some(command) = commands.recv().await {
        while chats.try_join_next().is_some() {}
        match command {
            Command::Chat {
                session_id,
                messages,
            } => {
                chats.spawn(say(core.clone(), session_id, messages));
            }
            other => {
                let acting = core.clone();
                let outcome = tokio::task::spawn_blocking(move || execute(&acting, other))
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()));
                notify(&core, outcome);
            }
        }
    }
    while chats.join_next().await.is_some() {}
}

fn notify(core: &Core, outcome: Result<String, String>) {
    let (level, text) = match outcome {
        Ok(text) => (Level::Info, text),
        Err(text) => (Level::Error, text),
    };
    if level == Level::Error {
        tracing::warn!("command failed: {text}");
    }
    if !text.is_empty() {
        emit(&core.bus, Event::Notice { level, text });
    }
}

fn gate_error(e: GateError) -> String {
    match e {
        GateError::NotFound(m) | GateError::Conflict(m) => m,
        GateError::Failed(e) => format!("The live version is unchanged: {e:#}"),
    }
}

/// Runs one command (not a chat); `Ok` says what happened, `Err` why it did not.
fn execute(core: &Core, command: Command) -> Result<String, String> {
    match command {
        Command::Chat { .. } => unreachable!("chats run as tasks"),
        Command::EndChat { session_id } => core
            .capture
            .close(&session_id, CloseReason::Client)
            .map(|_| String::new())
            .map_err(|e| format!("Could not close the chat: {e:#}")),
        Command::Rate { turn, rating } => core
            .rate(&turn, rating, None, "tui")
            .map(|r| {
                let word = if r.rating > 0 { "up" } else { "down" };
                format!("Rated turn {} of {} {word}.", r.turn_index, r.session_id)
            })
            .map_err(|e| format!("Could not rate the turn: {e:#}")),
        Command::Approve(id) => core
            .approve(id, "tui")
            .map(|_| format!("v{id} approved."))
            .map_err(gate_error),
        Command::Veto(id) => core
            .veto(id, "tui")
            .map(|_| format!("v{id} vetoed."))
            .map_err(gate_error),
        Command::Rollback(target) => core
            .rollback(target, "tui")
            .map(|(from, to)| format!("Rolled back from v{from} to v{to}."))
            .map_err(gate_error),
        Command::PauseTraining | Command::ResumeTraining => core
            .set_training_paused(command == Command::PauseTraining)
            .map(|_| String::new())
            .map_err(|e| e.to_string()),
    }
}

/// One chat turn from the chat box: served, captured, judged and trained on like any client's.
/// Its progress is on the bus (`RequestStarted`, `RequestText`, then one final event).
async fn say(core: Arc<Core>, session_id: String, messages: Vec<Message>) {
    let g = &core.config.generation;
    let req = ChatRequest {
        messages,
        tools: None,
        max_tokens: g.max_tokens,
        sampling: SamplingParams {
            temperature: g.temperature,
            top_p: g.top_p,
            top_k: g.top_k,
            seed: None,
        },
        stop: Vec::new(),
        top_logprobs: 0,
        session_id: Some(session_id),
        session_source: "tui",
        turn_type: TurnType::Main,
        session_done: false,
    };
    // A refusal is published by `chat::start` itself (RequestRefused).
    let Ok(mut turn) = chat::start(core, req).await else {
        return;
    };
    loop {
        match turn.next().await {
            Step::Text(_) => {}
            Step::Done {
                generation,
                adapter_version,
            } => {
                let reply = turn.reply(&generation);
                // A failed commit is published as the request's failure.
                turn.commit(&generation, adapter_version, &reply).await;
                return;
            }
            Step::Failed(_) => return,
        }
    }
}
