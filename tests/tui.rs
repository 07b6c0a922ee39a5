//! The control center in a real terminal (tmux): `clawrl-tui` on the default model, driven by
//! keys and read back from the screen.

mod common;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// A tmux server of its own (its own socket), killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    /// `clawrl-tui` serving the default model under the control center, on the data folder
    /// `data`, with `env` set.
    fn start(data: &Path, width: u16, height: u16, env: &[(&str, &str)]) -> Self {
        let model = common::model_path(common::SMOLLM2);
        let mut vars = String::new();
        for (k, v) in env {
            vars.push_str(&format!("{k}={v} "));
        }
        let args = format!("--model {} --port 0", model.display());
        Self::run(data, width, height, &vars, &args)
    }

    /// `VARS clawrl-tui ARGS` in a terminal of its own, on the data folder `data`; the pane
    /// prints `EXIT=<status>` when it ends.
    fn run(data: &Path, width: u16, height: u16, vars: &str, args: &str) -> Self {
        // One tmux server per test (tests run in parallel).
        let socket = format!(
            "clawrl-test-{}",
            data.file_name().unwrap().to_string_lossy()
        );
        let command = format!(
            "CLAWRL_DATA_DIR={} {vars} {} {args}; echo EXIT=$?; sleep 600",
            data.display(),
            env!("CARGO_BIN_EXE_clawrl-tui"),
        );
        let t = Self { socket };
        t.tmux(&[
            "new-session",
            "-d",
            "-x",
            &width.to_string(),
            "-y",
            &height.to_string(),
            &command,
        ]);
        t
    }

    fn tmux(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket, "-f", "/dev/null"])
            .args(args)
            .output()
            .expect("tmux runs (these tests drive a real terminal: apt install tmux)");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p"])
    }

    fn keys(&self, keys: &[&str]) {
        for k in keys {
            self.tmux(&["send-keys", k]);
            std::thread::sleep(Duration::from_millis(150));
        }
    }

    fn type_text(&self, text: &str) {
        self.tmux(&["send-keys", "-l", text]);
    }

    /// Waits until the screen satisfies `ok`; fails with the screen after `secs`.
    fn wait(&self, what: &str, secs: u64, ok: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let s = self.screen();
            if ok(&s) {
                return s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(secs),
                "waited {secs}s for {what}:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The pid of clawrl-tui (the pane's shell's child).
    fn app_pid(&self) -> String {
        let shell = self.tmux(&["list-panes", "-F", "#{pane_pid}"]);
        let out = Command::new("pgrep")
            .args(["-P", shell.trim()])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .expect("a child")
            .to_string()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .status();
    }
}

fn lines_with<'a>(screen: &'a str, needle: &str) -> Vec<&'a str> {
    screen.lines().filter(|l| l.contains(needle)).collect()
}

#[test]
fn a_user_chats_sees_the_judges_votes_rates_opens_help_and_quits() {
    let data = tempfile::tempdir().unwrap();
    let t = Tmux::start(
        data.path(),
        100,
        30,
        &[
            ("CLAWRL__GENERATION__MAX_TOKENS", "24"),
            ("CLAWRL__GENERATION__TEMPERATURE", "0"),
            ("CLAWRL__TRAIN__ENABLED", "false"),
            // The policy's base model judges (the quickest to load; tests/judge.rs covers
            // a judge on its own model).
            ("CLAWRL__JUDGE__MODEL", "''"),
        ],
    );
    t.wait("the screen", 60, |s| {
        s.contains("Chat box") && s.contains("live v0")
    });
    t.wait("the model", 120, |s| !s.contains("loading the model…"));

    t.type_text("What is the capital of France?");
    t.keys(&["Enter"]);
    t.wait("the first reply", 120, |s| {
        s.contains("waiting for the next message")
    });
    t.type_text("Thanks! And of Germany?");
    t.keys(&["Enter"]);
    // The first turn got its next state: the judge votes on it.
    let s = t.wait("the judge's votes on the first turn", 180, |s| {
        s.contains("votes ")
    });
    assert!(
        lines_with(&s, "#0 you")
            .iter()
            .any(|l| l.contains("capital of France")),
        "{s}"
    );
    assert!(lines_with(&s, "Sessions (1)").len() == 1, "{s}");

    // Leave the chat box, select the first turn, thumbs up.
    t.keys(&["Escape", "k", "+"]);
    let s = t.wait("the rating", 30, |s| s.contains("rated ▲ up"));
    assert!(s.contains("reward +1"), "{s}");

    t.keys(&["?"]);
    let s = t.wait("the help", 10, |s| {
        s.contains("Help") && s.contains("Everywhere")
    });
    for binding in [
        "approve the candidate",
        "rate the selected turn up",
        "send the message",
    ] {
        assert!(s.contains(binding), "help lacks {binding}:\n{s}");
    }
    t.keys(&["Escape", "2"]);
    t.wait("the training view", 10, |s| {
        s.contains("Rewards") && s.contains("System")
    });

    t.keys(&["q"]);
    let s = t.wait("a clean exit", 60, |s| s.contains("EXIT="));
    assert!(
        s.contains("EXIT=0") && s.contains("clawrl-tui: stopped"),
        "{s}"
    );

    // The rating is in the store, as any client's would be.
    let out = Command::new(env!("CARGO_BIN_EXE_clawrl-tui"))
        .args(["export"])
        .env("CLAWRL_DATA_DIR", data.path())
        .output()
        .unwrap();
    let turns: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(turns.len(), 2, "{turns:?}");
    assert_eq!(turns[0]["feedback"]["rating"], "up");
    assert_eq!(turns[0]["feedback"]["source"], "tui");
    assert!(
        turns[0]["judgment"]["votes"]
            .as_array()
            .is_some_and(|v| !v.is_empty())
    );
}

#[test]
fn attached_to_a_headless_server_the_screen_shows_its_chats_and_its_keys_act_there() {
    let server = common::server::Server::start(&[
        ("CLAWRL__TRAIN__ENABLED", "true"),
        ("CLAWRL__TRAIN__MIN_SAMPLES", "1"),
        ("CLAWRL__GATE__REPETITION_TOKENS", "0"), // a shorter guard (tests/train.rs runs it all)
    ]);
    let data = tempfile::tempdir().unwrap();
    let args = format!(
        "attach --url http://127.0.0.1:{} --api-key {}",
        server.port, server.key
    );
    let t = Tmux::run(data.path(), 100, 30, "", &args);
    let url = format!("http://127.0.0.1:{}/v1", server.port);
    t.wait("the attached screen", 60, |s| {
        s.contains("live v0") && s.contains(&url)
    });

    // Another client's chat appears live.
    let body = serde_json::json!({"messages": [{"role": "user", "content": "Name a planet."}],
                                  "max_tokens": 8, "temperature": 0});
    let (st, r) = server.chat(&[("X-Session-Id", "elsewhere")], &body);
    assert_eq!(st, 200, "{r}");
    t.wait("the other client's turn", 30, |s| {
        s.contains("Name a planet")
    });

    // Thumbs up from this screen is recorded there, trains v1 there, and shows here.
    t.keys(&["Escape", "k", "+"]);
    t.wait("the rating", 30, |s| s.contains("rated ▲ up"));
    let turn = server.export().pop().unwrap();
    assert_eq!(turn["feedback"]["rating"], "up", "{turn}");
    t.wait("v1 live", 600, |s| s.contains("live v1"));

    // A rollback from this screen: the server serves v0 again.
    t.keys(&["R"]);
    t.wait("the confirmation", 10, |s| {
        s.contains("Roll back from v1 to v0?")
    });
    t.keys(&["y"]);
    t.wait("the rollback", 30, |s| s.contains("live v0"));
    assert_eq!(server.admin_status()["live_version"], 0);

    t.keys(&["q"]);
    let s = t.wait("a clean exit", 30, |s| s.contains("EXIT="));
    assert!(s.contains("EXIT=0"), "{s}");
}

/// A TCP proxy to `port` that can cut every connection through it and refuse new ones for a
/// while: a network that drops.
struct Proxy {
    port: u16,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
    refusing: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    fn to(port: u16) -> Self {
        use std::sync::atomic::Ordering::SeqCst;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy = Proxy {
            port: listener.local_addr().unwrap().port(),
            open: Default::default(),
            refusing: Default::default(),
        };
        let (open, refusing) = (proxy.open.clone(), proxy.refusing.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let client = client.unwrap();
                if refusing.load(SeqCst) {
                    continue; // dropped: closed at once
                }
                let server = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
                open.lock()
                    .unwrap()
                    .extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        proxy
    }

    /// Cuts every connection through the proxy; new ones are refused until `restore`.
    fn cut(&self) {
        self.refusing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.refusing
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn an_attached_screen_reconnects_after_a_drop_and_shows_what_it_missed() {
    let server = common::server::Server::start(&[]);
    let proxy = Proxy::to(server.port);
    let data = tempfile::tempdir().unwrap();
    let args = format!(
        "attach --url http://127.0.0.1:{} --api-key {}",
        proxy.port, server.key
    );
    let t = Tmux::run(data.path(), 100, 30, "", &args);
    t.wait("the attached screen", 60, |s| s.contains("live v0"));

    proxy.cut();
    t.wait("the drop noticed", 30, |s| s.contains("reconnecting"));
    let body = serde_json::json!({"messages": [{"role": "user", "content": "Name a river."}],
                                  "max_tokens": 8, "temperature": 0});
    let (st, r) = server.chat(&[("X-Session-Id", "while-away")], &body);
    assert_eq!(st, 200, "{r}");
    let s = t.screen();
    assert!(
        !s.contains("Name a river"),
        "shown before the reconnect:\n{s}"
    );

    proxy.restore();
    t.wait("the missed turn, from the history", 30, |s| {
        s.contains("Name a river")
    });
}

#[test]
fn sigterm_restores_the_terminal_and_stops_cleanly_at_80x24() {
    let data = tempfile::tempdir().unwrap();
    let t = Tmux::start(data.path(), 80, 24, &[("CLAWRL__JUDGE__BACKEND", "off")]);
    let s = t.wait("the screen", 60, |s| s.contains("Chat box"));
    assert!(
        s.contains("1 Conversations") && s.contains("live v0"),
        "{s}"
    );
    // A resize redraws to the new size.
    t.tmux(&["resize-window", "-x", "120", "-y", "30"]);
    t.wait("the resized screen", 10, |s| {
        s.lines().any(|l| l.trim_end().chars().count() > 100)
    });
    let pid = t.app_pid();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let s = t.wait("a clean exit", 60, |s| s.contains("EXIT="));
    assert!(s.contains("EXIT=0"), "{s}");
    // Off the alternate screen: the shell's own lines are back, the panes are gone.
    assert!(
        !s.contains("Chat box") && s.contains("clawrl-tui: stopped"),
        "{s}"
    );
}
