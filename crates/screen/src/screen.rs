//! The screen's state machine: the folded core state plus what the user is looking at (view,
//! focus, selections, the chat box, help, a pending confirmation). Keys become typed commands
//! for the core; events from the core change the state. Drawing is in `panes`.

use super::keymap::{Action, Keymap};
use super::state::State;
use super::theme;
use clawrl_core::commands::{Command, CommandSender};
use clawrl_core::events::{Event, Level};
use clawrl_core::store::{TurnRef, VersionState};
use clawrl_model::messages::Message;
use ratatui::style::Style;
use tui_textarea::TextArea;

/// The panes that take the focus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaneId {
    Sessions,
    Conversation,
    Chat,
    Updates,
}

impl PaneId {
    pub fn title(self) -> &'static str {
        match self {
            Self::Sessions => "Sessions",
            Self::Conversation => "Conversation",
            Self::Chat => "Chat box",
            Self::Updates => "Updates",
        }
    }
}

/// What the status bar says about where the core runs.
#[derive(Debug, Clone, Default)]
pub struct Header {
    pub model_id: String,
    /// The OpenAI base URL clients use.
    pub url: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    Conversations,
    Training,
}

/// Actions that work wherever the focus is.
pub(crate) const GLOBAL: &[Action] = &[
    Action::Quit,
    Action::Help,
    Action::NextPane,
    Action::PrevPane,
    Action::ShowConversations,
    Action::ShowTraining,
    Action::FocusChat,
    Action::Approve,
    Action::Veto,
    Action::Rollback,
    Action::PauseTraining,
];

/// A decision waiting for `y`.
#[derive(Debug, Clone, PartialEq)]
pub struct Confirm {
    pub question: String,
    pub command: Command,
}

/// The chat box: the conversation it holds and the message being written.
pub struct ChatBox {
    pub input: TextArea<'static>,
    pub session_id: String,
    pub messages: Vec<Message>,
    /// The request of the reply being written.
    pub request_id: Option<String>,
    pub awaiting: bool,
    pub history: Vec<String>,
    pub history_pos: Option<usize>,
}

impl ChatBox {
    /// The box's look: no highlighted cursor line, a dim placeholder saying how to use it.
    pub fn style(&mut self) {
        let input = &mut self.input;
        input.set_cursor_line_style(Style::new());
        input.set_placeholder_text("Type a message · enter sends · alt-enter new line · ↑ history");
        input.set_placeholder_style(theme::dim());
    }

    fn new(session_id: String) -> Self {
        Self {
            input: TextArea::default(),
            session_id,
            messages: Vec::new(),
            request_id: None,
            awaiting: false,
            history: Vec::new(),
            history_pos: None,
        }
    }
}

pub struct Screen {
    pub state: State,
    pub keymap: Keymap,
    pub header: Header,
    commands: CommandSender,
    pub view: View,
    /// Both views side by side (a wide terminal); set by the last draw.
    pub wide: bool,
    pub focus: PaneId,
    /// The selected session (`None`: the newest, following new ones).
    pub selected_session: Option<String>,
    /// The selected turn of the session (`None`: the newest, following new ones).
    pub selected_turn: Option<usize>,
    /// The selected version in the updates pane (`None`: the default targets).
    pub selected_version: Option<i64>,
    pub chat: ChatBox,
    pub help: bool,
    pub confirm: Option<Confirm>,
    pub quit: bool,
    pub now_ms: i64,
    new_session_id: Box<dyn FnMut() -> String + Send>,
}

impl Screen {
    /// `new_session_id` names chat-box sessions (random in the product, fixed in tests).
    pub fn new(
        state: State,
        keymap: Keymap,
        header: Header,
        commands: CommandSender,
        mut new_session_id: Box<dyn FnMut() -> String + Send>,
    ) -> Self {
        let chat = ChatBox::new(new_session_id());
        let mut app = Self {
            state,
            keymap,
            header,
            commands,
            view: View::Conversations,
            wide: false,
            focus: PaneId::Chat,
            selected_session: None,
            selected_turn: None,
            selected_version: None,
            chat,
            help: false,
            confirm: None,
            quit: false,
            now_ms: 0,
            new_session_id,
        };
        app.chat.style();
        app
    }

    pub fn send(&mut self, command: Command) {
        if self.commands.send(command).is_err() {
            self.state
                .notice(Level::Error, "The core has stopped.", self.now_ms);
        }
    }

    pub(crate) fn notice(&mut self, level: Level, text: impl Into<String>) {
        self.state.notice(level, text, self.now_ms);
    }

    /// The panes the current layout shows that take the focus, in Tab order.
    pub(crate) fn focusable(&self) -> Vec<PaneId> {
        let conversations = [PaneId::Sessions, PaneId::Conversation, PaneId::Chat];
        match (self.wide, self.view) {
            (true, _) => [&conversations[..], &[PaneId::Updates]].concat(),
            (false, View::Conversations) => conversations.to_vec(),
            (false, View::Training) => vec![PaneId::Updates],
        }
    }

    pub(crate) fn focus_on(&mut self, pane: PaneId) {
        if !self.wide {
            self.view = if pane == PaneId::Updates {
                View::Training
            } else {
                View::Conversations
            };
        }
        self.focus = pane;
    }

    fn cycle_focus(&mut self, step: isize) {
        let panes = self.focusable();
        let at = panes.iter().position(|p| *p == self.focus).unwrap_or(0) as isize;
        let next = (at + step).rem_euclid(panes.len() as isize) as usize;
        self.focus = panes[next];
    }

    /// The session the conversation pane shows.
    pub fn session_id(&self) -> Option<&str> {
        match &self.selected_session {
            Some(id) if self.state.session(id).is_some() => Some(id),
            _ => self.state.sessions.first().map(|s| s.id.as_str()),
        }
    }

    pub fn on_event(&mut self, event: &Event) {
        self.state.apply(event, self.now_ms);
        let chat = &mut self.chat;
        match event {
            Event::RequestStarted {
                request_id,
                session_id,
                ..
            } if *session_id == chat.session_id => chat.request_id = Some(request_id.clone()),
            Event::RequestFinished { request_id, .. }
                if chat.request_id.as_ref() == Some(request_id) =>
            {
                let reply = self
                    .state
                    .session(&chat.session_id)
                    .and_then(|s| s.turns.last())
                    .map(|t| t.reply.clone())
                    .unwrap_or_default();
                chat.messages.push(Message::assistant(reply));
                chat.request_id = None;
                chat.awaiting = false;
            }
            Event::RequestFailed {
                request_id,
                message,
                ..
            } if chat.request_id.as_ref() == Some(request_id) => {
                let message = message.clone();
                self.chat_failed();
                self.notice(Level::Error, format!("The reply failed: {message}"));
            }
            Event::RequestCancelled { request_id }
                if chat.request_id.as_ref() == Some(request_id) =>
            {
                self.chat_failed()
            }
            Event::RequestRefused {
                session_id: Some(s),
                ..
            } if *s == chat.session_id && chat.awaiting => self.chat_failed(),
            _ => {}
        }
    }

    /// The message got no reply: it leaves the conversation and goes back into the box.
    fn chat_failed(&mut self) {
        let chat = &mut self.chat;
        chat.request_id = None;
        chat.awaiting = false;
        if let Some(m) = chat.messages.pop() {
            let text = m.text();
            if chat.input.is_empty() {
                chat.input = TextArea::from(text.split('\n').map(String::from));
                self.chat.style();
            }
        }
    }

    /// What a key bound to an action that works wherever the focus is does.
    pub(crate) fn on_global(&mut self, a: Action) {
        match a {
            Action::Quit => self.quit = true,
            Action::Help => self.help = true,
            Action::NextPane => self.cycle_focus(1),
            Action::PrevPane => self.cycle_focus(-1),
            Action::ShowConversations => {
                self.view = View::Conversations;
                if !self.focusable().contains(&self.focus) {
                    self.focus = PaneId::Conversation;
                }
            }
            Action::ShowTraining => {
                self.view = View::Training;
                if !self.focusable().contains(&self.focus) {
                    self.focus = PaneId::Updates;
                }
            }
            Action::FocusChat => self.focus_on(PaneId::Chat),
            Action::Approve | Action::Veto => self.decide(a),
            Action::Rollback => {
                let live = self.state.live_version;
                let target = self
                    .selected_version
                    .filter(|v| self.focus == PaneId::Updates && *v != live);
                match target.or(self.state.rollback_default()) {
                    Some(to) => {
                        self.confirm = Some(Confirm {
                            question: format!(
                                "Roll back from v{live} to v{to}? y confirms, any other key cancels."
                            ),
                            command: Command::Rollback(target),
                        })
                    }
                    None => self.notice(
                        Level::Error,
                        "The base model (v0) is live; there is nothing earlier to roll back to.",
                    ),
                }
            }
            Action::PauseTraining => {
                let c = if self.state.paused {
                    Command::ResumeTraining
                } else {
                    Command::PauseTraining
                };
                self.send(c);
            }
            _ => {}
        }
    }

    /// Approve or veto: the selected version when it is a candidate, else the held one.
    fn decide(&mut self, a: Action) {
        let selected = self.selected_version.filter(|id| {
            self.state
                .versions
                .iter()
                .any(|v| v.id == *id && v.state == VersionState::Candidate)
        });
        let Some(id) = selected.or(self.state.held_candidate()) else {
            self.notice(Level::Info, "No candidate is waiting for a decision.");
            return;
        };
        self.send(if a == Action::Approve {
            Command::Approve(id)
        } else {
            Command::Veto(id)
        });
    }

    /// Rates the selected turn.
    pub fn rate(&mut self, rating: i8) {
        let Some(session_id) = self.session_id().map(String::from) else {
            return;
        };
        let turn = self.state.session(&session_id).and_then(|s| {
            let i = self
                .selected_turn
                .unwrap_or(s.turns.len().saturating_sub(1));
            s.turns.get(i)
        });
        match turn {
            None => self.notice(Level::Info, "Select a turn to rate."),
            Some(t) if t.turn_id.is_none() => self.notice(
                Level::Info,
                "This turn is not stored yet; rate it when its reply is complete.",
            ),
            Some(t) => {
                let turn = TurnRef::Index {
                    session_id,
                    turn_index: t.turn_index,
                };
                self.send(Command::Rate { turn, rating });
            }
        }
    }

    /// Sends the chat box's message.
    pub(crate) fn send_message(&mut self) {
        let text = self.chat.input.lines().join("\n");
        let text = text.trim();
        if text.is_empty() {
            return;
        }
        if self.chat.awaiting {
            self.notice(
                Level::Info,
                "Wait for the reply (or start a new conversation).",
            );
            return;
        }
        let text = text.to_string();
        self.chat.messages.push(Message::user(text.clone()));
        self.chat.history.push(text);
        self.chat.history_pos = None;
        self.chat.awaiting = true;
        self.chat.input = TextArea::default();
        self.chat.style();
        self.selected_session = Some(self.chat.session_id.clone());
        self.selected_turn = None;
        let command = Command::Chat {
            session_id: self.chat.session_id.clone(),
            messages: self.chat.messages.clone(),
        };
        self.send(command);
    }

    /// Starts a new chat-box conversation (the old session is closed).
    pub(crate) fn new_chat(&mut self) {
        if !self.chat.messages.is_empty() {
            let session_id = self.chat.session_id.clone();
            self.send(Command::EndChat { session_id });
        }
        let history = std::mem::take(&mut self.chat.history);
        self.chat = ChatBox::new((self.new_session_id)());
        self.chat.history = history;
        self.chat.style();
        self.notice(Level::Info, "New conversation.");
    }
}
