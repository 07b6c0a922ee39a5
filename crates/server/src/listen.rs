//! Accepting connections without falling over.
//!
//! Every connection is accepted at once (a client never waits unaccepted in the listen
//! backlog behind connections that send nothing). Past `server.max_connections` open ones, the
//! oldest connection that is not serving a request is shed to make room, those that never
//! sent a whole request first (half-open: headers never finished) and then idle keep-alive
//! ones; when every open connection is serving, the new one is answered 503 at once. A pause
//! grows while `accept` keeps failing (out of file descriptors: retrying at once spins a
//! core), and a failure that repeats is logged once in a while with a count.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::http::Body;
use http_body_util::BodyExt;

const FIRST_PAUSE: Duration = Duration::from_millis(10);
const LONGEST_PAUSE: Duration = Duration::from_secs(1);
/// A failure that repeats is logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(10);

pub(crate) struct Acceptor {
    listener: TcpListener,
    open: Arc<OpenConnections>,
    pause: Duration,
    failures: RepeatedFailure,
    shed: RepeatedFailure,
}

impl Acceptor {
    pub fn new(listener: TcpListener, max_connections: usize) -> Self {
        Self {
            listener,
            open: Arc::new(OpenConnections::new(max_connections)),
            pause: Duration::ZERO,
            failures: RepeatedFailure::new("accept"),
            shed: RepeatedFailure::new("connections at server.max_connections"),
        }
    }

    /// The next connection to serve, room made for it among the open ones. Connections over
    /// the cap with none to shed are answered 503 here and never returned. Cancel-safe.
    pub async fn next(&mut self) -> Accepted {
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => {
                    self.pause = Duration::ZERO;
                    self.failures.recovered();
                    stream
                }
                Err(e) => {
                    self.failures.failed(&e);
                    self.pause = (self.pause * 2).clamp(FIRST_PAUSE, LONGEST_PAUSE);
                    tokio::time::sleep(self.pause).await;
                    continue;
                }
            };
            match self.open.admit() {
                Admission::Admitted(slot) => return Accepted { stream, slot },
                Admission::MadeRoom(slot) => {
                    self.shed
                        .failed(&"closed the oldest connection not serving a request");
                    return Accepted { stream, slot };
                }
                Admission::Full => {
                    self.shed
                        .failed(&"every open connection is serving: answered 503");
                    tokio::spawn(answer_busy(stream));
                }
            }
        }
    }
}

/// The whole answer to a connection over the cap: 503, then close (its request unread).
async fn answer_busy(mut stream: TcpStream) {
    let body = r#"{"error":{"message":"The server has server.max_connections connections open, each serving a request. Retry shortly.","type":"server_error","param":null,"code":"too_many_connections"}}"#;
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let write = async {
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await
    };
    // A client that reads nothing does not hold the task.
    let _ = tokio::time::timeout(Duration::from_secs(5), write).await;
}

/// An accepted connection and its place among the open ones.
pub(crate) struct Accepted {
    pub stream: TcpStream,
    pub slot: Slot,
}

/// A connection's place among the open ones (freed when dropped) and the signal that sheds it.
pub(crate) struct Slot {
    entry: Arc<Entry>,
    open: Arc<OpenConnections>,
    id: u64,
}

impl Slot {
    /// Resolves when the connection is shed to make room for a newer one.
    pub async fn shed(&self) {
        let notified = self.entry.shed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable(); // registered before the check: no signal is missed
        if !self.entry.is_shed.load(Ordering::SeqCst) {
            notified.await;
        }
    }

    /// A handle for the connection's service, which marks each request it serves.
    pub fn requests(&self) -> Requests {
        Requests(self.entry.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open
            .entries
            .lock()
            .expect("not poisoned")
            .remove(&self.id);
    }
}

/// Starts [`Serving`] guards for one connection's requests.
#[derive(Clone)]
pub(crate) struct Requests(Arc<Entry>);

impl Requests {
    /// Marks a request as being served until the returned guard drops (keep it with the
    /// response body, so that a streamed reply counts until its last byte).
    pub fn serving(&self) -> Serving {
        self.0.serving.fetch_add(1, Ordering::SeqCst);
        self.0.requests.fetch_add(1, Ordering::SeqCst);
        Serving(self.0.clone())
    }
}

/// A request in progress on a connection (it is not shed meanwhile).
pub(crate) struct Serving(Arc<Entry>);

impl Serving {
    /// `body`, keeping this request counted as served until the body is dropped (written to
    /// its last byte, or the client gone). Size and end are the body's own, so a JSON reply
    /// keeps its `content-length`.
    pub fn attach(self, body: Body) -> Body {
        Counted {
            inner: body,
            _serving: self,
        }
        .boxed()
    }
}

struct Counted {
    inner: Body,
    _serving: Serving,
}

impl hyper::body::Body for Counted {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.serving.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Default)]
struct Entry {
    /// Requests being served now.
    serving: AtomicUsize,
    /// Requests received so far.
    requests: AtomicUsize,
    is_shed: AtomicBool,
    shed: Notify,
}

/// The open connections, oldest first (ids grow with each accept).
struct OpenConnections {
    max: usize,
    entries: Mutex<BTreeMap<u64, Arc<Entry>>>,
    next_id: AtomicUsize,
}

enum Admission {
    Admitted(Slot),
    /// Admitted after shedding an older connection.
    MadeRoom(Slot),
    /// At the cap, every open connection serving a request.
    Full,
}

impl OpenConnections {
    fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            entries: Mutex::new(BTreeMap::new()),
            next_id: AtomicUsize::new(0),
        }
    }

    fn admit(self: &Arc<Self>) -> Admission {
        let mut entries = self.entries.lock().expect("not poisoned");
        let mut made_room = false;
        if entries.len() >= self.max {
            let idle = |e: &&Arc<Entry>| e.serving.load(Ordering::SeqCst) == 0;
            let never_asked = entries
                .iter()
                .find(|(_, e)| idle(e) && e.requests.load(Ordering::SeqCst) == 0);
            let victim = never_asked.or_else(|| entries.iter().find(|(_, e)| idle(e)));
            let Some((&id, _)) = victim else {
                return Admission::Full;
            };
            let entry = entries.remove(&id).expect("just found");
            entry.is_shed.store(true, Ordering::SeqCst);
            entry.shed.notify_waiters();
            made_room = true;
        }
        let id = self.next_id.fetch_add(1, Ordering::SeqCst) as u64;
        let entry = Arc::new(Entry::default());
        entries.insert(id, entry.clone());
        let slot = Slot {
            entry,
            open: self.clone(),
            id,
        };
        if made_room {
            Admission::MadeRoom(slot)
        } else {
            Admission::Admitted(slot)
        }
    }
}

/// Logs a failure, then at most one report (with a count) every [`LOG_EVERY`] however often
/// it fails or flaps between failing and working.
pub(crate) struct RepeatedFailure {
    what: &'static str,
    since_logged: u64,
    last_logged: Option<Instant>,
}

impl RepeatedFailure {
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            since_logged: 0,
            last_logged: None,
        }
    }

    fn due(&self) -> bool {
        self.last_logged.is_none_or(|t| t.elapsed() >= LOG_EVERY)
    }

    /// Records a failure; returns whether it was logged.
    pub fn failed(&mut self, e: &dyn std::fmt::Display) -> bool {
        if !self.due() {
            self.since_logged += 1;
            return false;
        }
        let what = self.what;
        match self.since_logged {
            0 => tracing::warn!("{what}: {e}"),
            n => tracing::warn!("{what}: {e} ({n} more failures since the last report)"),
        }
        self.since_logged = 0;
        self.last_logged = Some(Instant::now());
        true
    }

    /// Records a success: failures not reported yet are, when a report is due.
    pub(crate) fn recovered(&mut self) {
        if self.since_logged > 0 && self.due() {
            let (what, n) = (self.what, self.since_logged);
            tracing::warn!("{what} works again ({n} more failures since the last report)");
            self.since_logged = 0;
            self.last_logged = Some(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A client connection to `acceptor` and, where it is admitted, its slot.
    async fn connect(acceptor: &mut Acceptor) -> (TcpStream, Option<Slot>) {
        let port = acceptor.listener.local_addr().unwrap().port();
        let client = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let wait = Duration::from_millis(300);
        let slot = tokio::time::timeout(wait, acceptor.next()).await;
        (client, slot.ok().map(|a| a.slot))
    }

    /// Whether the slot has been told to close its connection.
    fn is_shed(slot: &Slot) -> bool {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let ready = std::pin::pin!(slot.shed()).poll(&mut cx).is_ready();
        assert_eq!(ready, slot.entry.is_shed.load(Ordering::SeqCst));
        ready
    }

    #[tokio::test]
    async fn past_the_cap_idle_connections_are_shed_oldest_first_and_serving_ones_never() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut acceptor = Acceptor::new(listener, 3);
        let mut open = Vec::new();
        for _ in 0..3 {
            open.push(connect(&mut acceptor).await.1.expect("under the cap"));
        }
        let [keep_alive, serving, _half_open] = &open[..] else {
            unreachable!()
        };
        drop(keep_alive.requests().serving()); // answered one request, now idle
        let _busy = serving.requests().serving();
        assert!(!open.iter().any(is_shed), "under the cap nothing is shed");

        let (_, fourth) = connect(&mut acceptor).await;
        let fourth = fourth.expect("admitted by shedding");
        let shed: Vec<bool> = open.iter().map(is_shed).collect();
        assert_eq!(
            shed,
            [false, false, true],
            "one that never asked goes first"
        );
        let _fourth_busy = fourth.requests().serving();

        let (_, fifth) = connect(&mut acceptor).await;
        let fifth = fifth.expect("admitted by shedding");
        let shed: Vec<bool> = open.iter().map(is_shed).collect();
        assert_eq!(shed, [true, false, true], "then an idle keep-alive one");
        let _fifth_busy = fifth.requests().serving();

        // Every open connection serves a request: the next one is answered 503 at once.
        let (mut sixth, slot) = connect(&mut acceptor).await;
        assert!(slot.is_none());
        let mut answer = String::new();
        sixth.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("too_many_connections"), "{answer}");
        assert!(!is_shed(serving) && !is_shed(&fourth) && !is_shed(&fifth));
    }

    #[test]
    fn a_failure_that_repeats_or_flaps_is_logged_once_per_interval() {
        let mut f = RepeatedFailure::new("accept");
        let mut logged = 0;
        for i in 0..10_000 {
            logged += usize::from(f.failed(&"Too many open files"));
            if i % 16 == 0 {
                f.recovered(); // descriptors freed now and then
            }
        }
        assert_eq!(logged, 1);
        assert_eq!(f.since_logged, 9_999);
        f.last_logged = Instant::now().checked_sub(LOG_EVERY);
        f.recovered();
        assert_eq!(
            f.since_logged, 0,
            "the count is reported once a report is due"
        );
        assert!(!f.failed(&"again"), "and the next report waits its turn");
    }
}
