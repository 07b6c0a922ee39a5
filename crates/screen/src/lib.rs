//! The control center: a ratatui screen over the core. It folds the core's events into its
//! state (`state`), turns keys into commands (`input`, `keymap`), draws panes (`panes`), and
//! never calls into the engine or the model. Starts from the core's history and reloads it
//! when it misses events. The core is in this process or elsewhere (`remote`, for `attach`):
//! the same screen over one [`Link`].
//!
//! # Public API
//! [`run`] the screen in a terminal over a [`Link`] (incoming events, a command sender, and a
//! [`Source`] of history and readings: [`local_incoming`] and [`Source::Local`] for a core in
//! this process, [`remote::Remote`] for one elsewhere); [`keymap::Keymap`] checks `tui.keys`;
//! [`state::State`] and [`screen::Screen`] are what the bench (`bench --tui`) folds and draws.

pub mod input;
pub mod keymap;
pub mod panes;
pub mod remote;
pub mod screen;
pub mod state;
pub mod text;
pub(crate) mod theme;

#[cfg(test)]
mod tests;

use anyhow::{Context, Result};
use clawrl_core::commands::CommandSender;
use clawrl_core::events::{Event, Level};
use clawrl_core::store::{Snapshot, Store};
use clawrl_core::telemetry::Counters;
use clawrl_core::telemetry::hardware::{Hardware, HardwareMonitor};
use keymap::Keymap;
use screen::{Header, Screen};
use state::{ServingSample, State};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::mpsc;

/// What the screen is given of the core: what happens (events), a way to send commands, and
/// where its history and readings come from. A local core and a remote one (`attach`) are
/// the same screen over this one interface.
pub struct Link {
    pub incoming: mpsc::UnboundedReceiver<Incoming>,
    pub commands: CommandSender,
    pub source: Source,
    pub header: Header,
    /// The model, if it was loaded before the screen subscribed.
    pub model_ready: Option<String>,
}

/// What arrives from the core.
#[derive(Debug)]
pub enum Incoming {
    Event(Event),
    /// Some events were missed (the screen fell behind, or the connection dropped): the screen
    /// reloads its history.
    Missed,
}

/// Where the history and the readings come from.
pub enum Source {
    /// This process's core: its store, its counters, this machine's hardware.
    Local {
        store_path: PathBuf,
        counters: Arc<Counters>,
    },
    /// A server elsewhere, through its admin routes.
    Remote(Arc<remote::Remote>),
}

impl Source {
    async fn snapshot(&self) -> Result<Snapshot> {
        match self {
            Source::Local { store_path, .. } => {
                let path = store_path.clone();
                tokio::task::spawn_blocking(move || load(&path)).await?
            }
            Source::Remote(r) => r.snapshot(state::MAX_SESSIONS, state::MAX_TURNS).await,
        }
    }
}

/// A local core's bus as the screen's incoming events (a lag becomes [`Incoming::Missed`]).
pub fn local_incoming(mut bus: broadcast::Receiver<Event>) -> mpsc::UnboundedReceiver<Incoming> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let incoming = match bus.recv().await {
                Ok(e) => Incoming::Event(e),
                Err(RecvError::Lagged(n)) => {
                    tracing::info!("the screen missed {n} events: reloading from the store");
                    Incoming::Missed
                }
                Err(RecvError::Closed) => return,
            };
            if tx.send(incoming).is_err() {
                return;
            }
        }
    });
    rx
}

/// What the screen reacts to besides the core's events.
pub(crate) enum Input {
    Terminal(crossterm::event::Event),
    Sampled(Hardware, ServingSample),
}

/// Frames are drawn at most this often (and only when something changed).
const FRAME: Duration = Duration::from_millis(40);

fn load(store_path: &Path) -> Result<Snapshot> {
    Store::open_read_only(store_path)?.snapshot(state::MAX_SESSIONS, state::MAX_TURNS)
}

/// Runs the screen until the user quits or `stop` resolves. The terminal is restored on the
/// way out, on a panic too.
pub async fn run(
    mut link: Link,
    keymap: Keymap,
    stop: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let snapshot = link
        .source
        .snapshot()
        .await
        .context("cannot read the history")?;
    let mut state = State::from_snapshot(snapshot);
    state.model = link.model_ready.take();
    let mut app = Screen::new(
        state,
        keymap,
        link.header.clone(),
        link.commands.clone(),
        Box::new(|| format!("tui-{}", &clawrl_core::capture::random_id("")[..8])),
    );
    app.now_ms = clawrl_core::store::now_ms();

    let (tx, mut inputs) = mpsc::unbounded_channel();
    spawn_terminal_reader(tx.clone());
    match &link.source {
        Source::Local { counters, .. } => spawn_sampler(tx, counters.clone()),
        Source::Remote(r) => r.clone().spawn_sampler(tx),
    }

    // ratatui::init enters raw mode and the alternate screen and restores both on panic.
    let mut terminal = ratatui::init();
    let result = async {
        tokio::pin!(stop);
        let mut frames = tokio::time::interval(FRAME);
        frames.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut dirty = true;
        while !app.quit {
            tokio::select! {
                _ = frames.tick() => {
                    app.now_ms = clawrl_core::store::now_ms();
                    if dirty {
                        terminal.draw(|f| panes::draw(f, &mut app))?;
                        dirty = false;
                    }
                }
                Some(input) = inputs.recv() => {
                    match input {
                        Input::Terminal(crossterm::event::Event::Key(k)) => input::on_key(&mut app, k),
                        Input::Terminal(_) => {} // a resize: the next frame fits the new size
                        Input::Sampled(h, s) => {
                            app.state.hardware = Some(h);
                            app.state.sampled(s);
                        }
                    }
                    dirty = true;
                }
                incoming = link.incoming.recv() => {
                    match incoming {
                        Some(Incoming::Event(e)) => app.on_event(&e),
                        Some(Incoming::Missed) => match link.source.snapshot().await {
                            Ok(s) => app.state.resync(s),
                            Err(e) => app.notice(Level::Error, format!("Cannot reload the history: {e:#}")),
                        },
                        None => app.quit = true,
                    }
                    dirty = true;
                }
                _ = &mut stop => app.quit = true,
            }
        }
        anyhow::Ok(())
    }
    .await;
    ratatui::restore();
    result
}

/// Terminal input on its own thread (crossterm's reads block).
fn spawn_terminal_reader(tx: mpsc::UnboundedSender<Input>) {
    std::thread::Builder::new()
        .name("tui-input".into())
        .spawn(move || {
            while let Ok(e) = crossterm::event::read() {
                if tx.send(Input::Terminal(e)).is_err() {
                    return;
                }
            }
        })
        .expect("spawn the input thread");
}

/// Hardware and serving numbers, once a second, on their own thread.
fn spawn_sampler(tx: mpsc::UnboundedSender<Input>, counters: Arc<Counters>) {
    std::thread::Builder::new()
        .name("tui-sampler".into())
        .spawn(move || {
            let mut monitor = HardwareMonitor::new();
            loop {
                let c = &counters;
                let serving = ServingSample {
                    tokens_out: c.tokens_out.load(Relaxed),
                    decode_micros: c.decode_micros.load(Relaxed),
                    queue_depth: c.queue_depth.load(Relaxed),
                    active: c.active_sequences.load(Relaxed),
                    prefix_cache_bytes: c.prefix_cache_bytes.load(Relaxed),
                    policy_weight_bytes: c.policy_weight_bytes.load(Relaxed),
                    judge_weight_bytes: c.judge_weight_bytes.load(Relaxed),
                };
                if tx.send(Input::Sampled(monitor.sample(), serving)).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
        .expect("spawn the sampler thread");
}
