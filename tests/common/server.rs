//! A real `clawrl-tui serve --headless` process on a loopback port, with its own data dir.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Servers still running. A server kept in a `static` (one shared by a test file) is never
/// dropped, so the test binary kills what is left here when it exits; otherwise those
/// processes would outlive the test run.
static RUNNING: Mutex<Vec<u32>> = Mutex::new(Vec::new());

extern "C" fn kill_running_servers() {
    if let Ok(pids) = RUNNING.lock() {
        for &pid in pids.iter() {
            // SAFETY: kill takes plain integers; the pids are children not yet waited for.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

fn track(pid: u32) {
    static AT_EXIT: std::sync::Once = std::sync::Once::new();
    // SAFETY: registers a plain extern "C" function with no arguments.
    AT_EXIT.call_once(|| unsafe {
        libc::atexit(kill_running_servers);
    });
    RUNNING.lock().unwrap().push(pid);
}

fn untrack(pid: u32) {
    RUNNING.lock().unwrap().retain(|&p| p != pid);
}

pub struct Server {
    pub child: Child,
    pub port: u16,
    pub data: tempfile::TempDir,
    pub key: String,
}

impl Server {
    /// Starts a server on the default model; `env` adds CLAWRL__* overrides.
    pub fn start(env: &[(&str, &str)]) -> Self {
        let s = Self::spawn(
            &super::model_path(super::SMOLLM2),
            "smollm2-135m-instruct",
            env,
        );
        s.wait_ready();
        s
    }

    /// Waits until GET /health answers 200.
    pub fn wait_ready(&self) {
        let t = Instant::now();
        while self.get("/health", false).0 != 200 {
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "server did not become ready"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts a server on `model` (served as `model_id`) and returns once it listens. The
    /// judge and the trainer are off unless `env` turns them on (they would compete with the
    /// tests for the CPU).
    pub fn spawn(model: &std::path::Path, model_id: &str, env: &[(&str, &str)]) -> Self {
        Self::spawn_in(tempfile::tempdir().unwrap(), model, model_id, env)
    }

    /// Kills this server (like a crash) and starts a new one on the same data directory.
    pub fn crash_and_restart(mut self, env: &[(&str, &str)]) -> Self {
        let _ = self.child.kill();
        let _ = self.child.wait();
        untrack(self.child.id());
        let data = std::mem::replace(&mut self.data, tempfile::tempdir().unwrap());
        let s = Self::spawn_in(
            data,
            &super::model_path(super::SMOLLM2),
            "smollm2-135m-instruct",
            env,
        );
        s.wait_ready();
        s
    }

    fn spawn_in(
        data: tempfile::TempDir,
        model: &std::path::Path,
        model_id: &str,
        env: &[(&str, &str)],
    ) -> Self {
        let key = "test-key-123".to_string();
        let mut cmd = serve_command(model, data.path(), &[]);
        cmd.args(["--api-key", &key])
            .env("CLAWRL__SERVER__MODEL_ID", model_id)
            .env("CLAWRL__JUDGE__BACKEND", "off")
            .env("CLAWRL__TRAIN__ENABLED", "false")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // The test's own settings win over the defaults above.
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        track(child.id());
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let line = lines.next().expect("server prints its address").unwrap();
        let port: u16 = line
            .split("http://127.0.0.1:")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}"));
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Self {
            child,
            port,
            data,
            key,
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    pub fn store_path(&self) -> PathBuf {
        self.data.path().join("clawrl.sqlite")
    }

    /// Sends raw HTTP/1.1 and returns (status, headers, body).
    pub fn raw(&self, request: &[u8]) -> (u16, String, String) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
        s.write_all(request).unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (status, head.to_string(), body.to_string())
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
        auth: bool,
    ) -> (u16, String, String) {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\nContent-Type: application/json\r\n",
            body.len()
        );
        if auth {
            req.push_str(&format!("Authorization: Bearer {}\r\n", self.key));
        }
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(body);
        self.raw(req.as_bytes())
    }

    pub fn get(&self, path: &str, auth: bool) -> (u16, String, String) {
        self.request("GET", path, &[], "", auth)
    }

    /// POST /v1/chat/completions; returns (status, parsed JSON body, or the SSE data lines).
    pub fn chat(
        &self,
        headers: &[(&str, &str)],
        body: &serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let (status, _, text) = self.request(
            "POST",
            "/v1/chat/completions",
            headers,
            &body.to_string(),
            true,
        );
        let body = if body["stream"] == true {
            let chunks: Vec<serde_json::Value> = text
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .map(|d| {
                    if d == "[DONE]" {
                        serde_json::json!("[DONE]")
                    } else {
                        serde_json::from_str(d).unwrap()
                    }
                })
                .collect();
            serde_json::Value::Array(chunks)
        } else {
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
        };
        (status, body)
    }

    /// The value of a Prometheus metric on `/metrics`.
    pub fn metric(&self, name: &str) -> f64 {
        let (_, _, text) = self.get("/metrics", false);
        let prefix = format!("{name} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no metric {name} in {text}"))
            .parse()
            .unwrap()
    }

    /// Every captured turn, through `clawrl-tui export`.
    pub fn export(&self) -> Vec<serde_json::Value> {
        let out = Command::new(env!("CARGO_BIN_EXE_clawrl-tui"))
            .args(["export", "--store", self.store_path().to_str().unwrap()])
            .env("CLAWRL_DATA_DIR", self.data.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// `GET /admin/status`.
    pub fn admin_status(&self) -> serde_json::Value {
        let (code, _, body) = self.get("/admin/status", true);
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Polls the status until `done` holds; fails with the last status after `secs`.
    pub fn wait_for_status(
        &self,
        what: &str,
        secs: u64,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let t = Instant::now();
        loop {
            let st = self.admin_status();
            if done(&st) {
                return st;
            }
            assert!(
                t.elapsed() < Duration::from_secs(secs),
                "{what} did not happen within {secs} s; status: {st:#}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One question, rated up through /v1/feedback; returns its response id.
    pub fn rated(&self, question: &str) -> String {
        let (code, r) = self.chat(
            &[],
            &serde_json::json!({"messages": [{"role": "user", "content": question}], "max_tokens": 16}),
        );
        assert_eq!(code, 200, "{r}");
        let id = r["id"].as_str().unwrap().to_string();
        let body = serde_json::json!({"response_id": id, "rating": "up"}).to_string();
        let (code, _, body) = self.request("POST", "/v1/feedback", &[], &body, true);
        assert_eq!(code, 200, "{body}");
        id
    }

    /// Waits until the server process exits by itself; fails if it is still up after `secs`.
    pub fn wait_exit(&mut self, what: &str, secs: u64) -> std::process::ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(exit) = self.child.try_wait().unwrap() {
                return exit;
            }
            assert!(t.elapsed() < Duration::from_secs(secs), "{what}: still up");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Everything the server has logged so far.
    pub fn log(&self) -> String {
        let mut log = String::new();
        for f in std::fs::read_dir(self.data.path().join("logs")).unwrap() {
            log.push_str(&std::fs::read_to_string(f.unwrap().path()).unwrap_or_default());
        }
        log
    }

    /// Whether the server logs `text` within `secs` (its log file is written by a background
    /// thread, so a line can land a moment after what it reports).
    pub fn logs_within(&self, text: &str, secs: u64) -> bool {
        let until = Instant::now() + Duration::from_secs(secs);
        loop {
            if self.log().contains(text) {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn signal(&self, sig: &str) {
        Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        untrack(self.child.id());
    }
}

/// `clawrl-tui --model M serve --headless --port 0` on the data folder `data`, with `env` set.
pub fn serve_command(
    model: &std::path::Path,
    data: &std::path::Path,
    env: &[(&str, &str)],
) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_clawrl-tui"));
    cmd.args([
        "--model",
        model.to_str().unwrap(),
        "serve",
        "--headless",
        "--port",
        "0",
    ])
    .env("CLAWRL_DATA_DIR", data);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}
