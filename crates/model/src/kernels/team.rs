//! The threads that share the matrix products of a decoding step, kept awake between them.
//!
//! A decoding step runs ~100 parallel products (4 per layer and the head), each 10–300 µs,
//! with a little serial work between them. On rayon alone the other thread went back to sleep
//! in those gaps and every product paid a wake-up (`perf`: 5–7 % of a step in `__schedule`,
//! `sched_yield`, futex), and rayon's splitting handed rows out through its deques. A serving
//! pool's threads therefore carry a [`Team`]: the thread that runs a product makes the pool's
//! other threads its helpers (rayon jobs of the same pool, so no thread competes with the
//! pool's for the cores), each product's rows are split into one contiguous range per thread,
//! and a helper waits for the next product spinning for [`SPIN`], then yielding, and returns
//! to the pool after [`AWAKE`] without one, running the pool's other work meanwhile.
//! Elsewhere (the trainer's pool, tests) products use the current rayon pool, as they do with
//! `CLAWRL_TEAM=0` (for measuring).

use rayon::prelude::*;
use std::cell::{RefCell, UnsafeCell};
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Helpers busy-wait this long after a job: the gap between two products of a step.
const SPIN: Duration = Duration::from_micros(50);
/// Then they yield to other threads until this long after the job (the gap between two steps
/// of a stream), then return to the pool. (At 2 ms a second turn after a 5 K-token system
/// prompt took 260 ms to its first token, against 224 ms on rayon alone and 211 ms at this.)
const AWAKE: Duration = Duration::from_micros(300);

thread_local! {
    static TEAM: RefCell<Option<Arc<Team>>> = const { RefCell::new(None) };
    /// This thread is inside [`Team::help`]. A helper that yields to the pool may run another
    /// helper's job there (the leader spawns one whenever a helper has stepped out to yield);
    /// run inside the first, it would yield again, and so on: under steady load each level
    /// put another `help` frame on the stack until the thread overflowed it (issue 25's
    /// `clawrl-engine-1` stack overflow). A nested helper therefore returns at once.
    static HELPING: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The deepest `help` nesting that took jobs, on any thread (1: helpers never nested).
static DEEPEST_HELP: AtomicUsize = AtomicUsize::new(0);

/// Runs `f(i)` for every `i` in `0..n`, each exactly once, shared between the calling thread
/// and its team (a serving pool's thread), else over the current rayon pool.
pub(crate) fn for_each_index(n: usize, f: impl Fn(usize) + Sync) {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let off = *OFF.get_or_init(|| std::env::var("CLAWRL_TEAM").is_ok_and(|v| v == "0"));
    let team = if off {
        None
    } else {
        TEAM.with(|t| t.borrow().clone())
    };
    match team {
        Some(team) if n > 1 => team.run(n, &f),
        _ => (0..n).into_par_iter().for_each(&f),
    }
}

/// Makes `team` the calling thread's (a serving pool's start handler calls this).
pub fn join(team: Arc<Team>) {
    TEAM.with(|t| *t.borrow_mut() = Some(team));
}

/// One job: indexes `0..n` split into one contiguous range per thread (each walks its own
/// rows, as the prefetchers like, and claims them on a counter no one else touches until it
/// runs out and the others take what is left of it), `done` counting the finished ones.
struct Job {
    /// The caller's closure; it outlives every call made through it because the caller
    /// waits for `done == n` before returning (no index is handed out after all are).
    f: *const (dyn Fn(usize) + Sync),
    ranges: Vec<Range>,
    done: AtomicUsize,
    panicked: AtomicBool,
}

/// The next index and the end of one thread's range, alone in its cache line.
#[repr(align(128))]
struct Range {
    next: AtomicUsize,
    end: usize,
}

// SAFETY: `f` points to a `Sync` closure, called only while the caller waits (see `Job::f`).
unsafe impl Send for Job {}
unsafe impl Sync for Job {}

impl Job {
    fn new(f: *const (dyn Fn(usize) + Sync), n: usize, threads: usize) -> Self {
        let ranges = (0..threads)
            .map(|k| Range {
                next: AtomicUsize::new(k * n / threads),
                end: (k + 1) * n / threads,
            })
            .collect();
        Self {
            f,
            ranges,
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
        }
    }

    /// Runs the indexes of range `me`, then what is left of the others'.
    fn work(&self, me: usize) {
        let mut finished = 0;
        let count = self.ranges.len();
        for range in (0..count).map(|k| &self.ranges[(me + k) % count]) {
            loop {
                let i = range.next.fetch_add(1, Ordering::Relaxed);
                if i >= range.end {
                    break;
                }
                // SAFETY: i was handed out, so the caller is still waiting for it (Job::f).
                let f = unsafe { &*self.f };
                if catch_unwind(AssertUnwindSafe(|| f(i))).is_err() {
                    self.panicked.store(true, Ordering::Relaxed);
                }
                finished += 1;
            }
        }
        self.done.fetch_add(finished, Ordering::Release);
    }
}

pub struct Team {
    /// Bumped for every job, so that spinning helpers see one without taking the lock.
    epoch: AtomicU64,
    job: Mutex<Option<Arc<Job>>>,
    /// A job is running (a second caller at the same time goes through rayon).
    busy: AtomicBool,
    /// Helpers wanted: the pool's other threads.
    helpers: usize,
    /// Helpers now waiting for jobs or working on one.
    active: AtomicUsize,
}

impl Team {
    /// A team for a pool of `threads` threads: its other threads help the one that runs a
    /// product, as rayon jobs that last until no product came for [`AWAKE`].
    pub fn new(threads: usize) -> Arc<Self> {
        Arc::new(Self {
            epoch: AtomicU64::new(0),
            job: Mutex::new(None),
            busy: AtomicBool::new(false),
            helpers: threads.saturating_sub(1),
            active: AtomicUsize::new(0),
        })
    }

    fn run(self: &Arc<Self>, n: usize, f: &(dyn Fn(usize) + Sync)) {
        if self.helpers == 0 || self.busy.swap(true, Ordering::Acquire) {
            return (0..n).into_par_iter().for_each(f);
        }
        let seen = self.epoch.load(Ordering::Acquire);
        // SAFETY (lifetime erased): we wait below until every index handed out has finished.
        let f: *const (dyn Fn(usize) + Sync + '_) = f;
        let f: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f) };
        let job = Arc::new(Job::new(f, n, self.helpers + 1));
        *self.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(job.clone());
        self.epoch.fetch_add(1, Ordering::SeqCst);
        // Helpers are counted only after the job is out: a helper leaving at this moment
        // either sees the job (it looks once more after leaving, see `help`) or is no longer
        // counted here and gets a replacement. Counted before, it was neither, and the
        // product ran alone (a flaky test on CI: "round 9 ran alone").
        loop {
            let helper = self.active.load(Ordering::SeqCst);
            if helper >= self.helpers {
                break;
            }
            // The helper is a job of the caller's own pool (a thread of it that would else
            // sleep between products), not a thread of its own: another thread would compete
            // for the cores with the pool's, which the tensor library's operations use.
            self.active.fetch_add(1, Ordering::Relaxed);
            let (team, leader) = (self.clone(), std::thread::current().id());
            rayon::spawn(move || team.help(helper + 1, leader, seen));
        }
        job.work(0);
        while job.done.load(Ordering::Acquire) < n {
            std::hint::spin_loop();
        }
        *self.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.busy.store(false, Ordering::Release);
        if job.panicked.load(Ordering::Relaxed) {
            resume_unwind(Box::new("a task of a parallel product panicked"));
        }
    }

    /// A helper: takes jobs newer than `seen` (spinning, then yielding) until none came for
    /// [`AWAKE`]. Returns at once on the thread that spawned it (it may pop its own job
    /// while waiting inside the tensor library, and would wait there for itself).
    fn help(&self, me: usize, leader: std::thread::ThreadId, mut seen: u64) {
        let depth = HELPING.with(|h| {
            h.set(h.get() + 1);
            h.get()
        });
        if depth == 1 && std::thread::current().id() != leader {
            DEEPEST_HELP.fetch_max(depth, Ordering::Relaxed);
            let mut idle = Instant::now();
            let mut polls = 0u32;
            loop {
                if self.epoch.load(Ordering::Acquire) != seen {
                    let job = {
                        let job = self.job.lock().unwrap_or_else(|e| e.into_inner());
                        seen = self.epoch.load(Ordering::Acquire);
                        job.clone()
                    };
                    if let Some(job) = job {
                        job.work(me);
                    }
                    idle = Instant::now();
                    continue;
                }
                polls = polls.wrapping_add(1);
                if !polls.is_multiple_of(64) {
                    std::hint::spin_loop();
                    continue;
                }
                // The pool's other work (the tensor library's parallel operations between
                // products: a prompt's attention) goes first; meanwhile this thread is no
                // helper (a product run by that work gets one of its own).
                self.active.fetch_sub(1, Ordering::Relaxed);
                let ran = rayon::yield_now() == Some(rayon::Yield::Executed);
                self.active.fetch_add(1, Ordering::Relaxed);
                if ran {
                    idle = Instant::now();
                    continue;
                }
                let waited = idle.elapsed();
                if waited >= AWAKE {
                    // Leave, then look once more: a leader that counted this helper before it
                    // left spawned no other, so a job it put out meanwhile is taken after all.
                    self.active.fetch_sub(1, Ordering::SeqCst);
                    if self.epoch.load(Ordering::SeqCst) == seen {
                        break;
                    }
                    self.active.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if waited >= SPIN {
                    std::thread::yield_now();
                }
            }
        } else {
            self.active.fetch_sub(1, Ordering::Relaxed);
        }
        HELPING.with(|h| h.set(depth - 1));
    }
}

/// Values handed out by index, each taken at most once: the tasks of a [`for_each_index`]
/// (whose indexes are each run exactly once) without a lock per task.
pub(crate) struct Slots<T>(Vec<UnsafeCell<Option<T>>>);

// SAFETY: each slot is taken by one thread only (`take`'s contract); T moves to that thread.
unsafe impl<T: Send> Sync for Slots<T> {}

impl<T> Slots<T> {
    pub fn new(values: Vec<T>) -> Self {
        Self(
            values
                .into_iter()
                .map(|v| UnsafeCell::new(Some(v)))
                .collect(),
        )
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Slot `i`'s value.
    ///
    /// # Safety
    /// No other call may take `i` at the same time (each index of a [`for_each_index`] runs
    /// once).
    pub unsafe fn take(&self, i: usize) -> T {
        // SAFETY: exclusive access to slot i (the contract above).
        unsafe { (*self.0[i].get()).take() }.expect("each slot is taken once")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serving under steady load: products back to back with the pool's other work between
    /// them (a prompt's attention), which a waiting helper runs when it yields. Helpers once
    /// ran each other's jobs inside that yield, one level deeper each time, until the
    /// engine's thread overflowed its stack (issue 25); now a helper never runs inside one.
    #[test]
    fn helpers_never_nest_under_back_to_back_products() {
        let team = Team::new(2);
        let joined = team.clone();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .start_handler(move |_| join(joined.clone()))
            .build()
            .unwrap();
        let sum = AtomicUsize::new(0);
        let until = Instant::now() + Duration::from_secs(3);
        pool.install(|| {
            while Instant::now() < until {
                for _ in 0..50 {
                    for_each_index(4, |i| {
                        sum.fetch_add(i, Ordering::Relaxed);
                    });
                    (0..8).into_par_iter().for_each(|i| {
                        sum.fetch_add(i, Ordering::Relaxed);
                    });
                }
                // A gap as between two decoding steps, long enough for helpers to yield.
                std::thread::sleep(Duration::from_micros(100));
            }
        });
        assert!(sum.load(Ordering::Relaxed) > 0);
        assert_eq!(
            DEEPEST_HELP.load(Ordering::Relaxed),
            1,
            "a helper took jobs inside another helper"
        );
    }

    #[test]
    fn every_index_runs_exactly_once_on_a_team_and_a_panic_reaches_the_caller() {
        let team = Team::new(3);
        let joined = team.clone();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .start_handler(move |_| join(joined.clone()))
            .build()
            .unwrap();
        pool.install(|| {
            for n in [2, 3, 64, 1000] {
                for _ in 0..20 {
                    let counts: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                    for_each_index(n, |i| {
                        // Run by the team, not by rayon's fallback.
                        assert!(team.busy.load(Ordering::Relaxed));
                        counts[i].fetch_add(1, Ordering::Relaxed);
                    });
                    assert!(
                        counts.iter().all(|c| c.load(Ordering::Relaxed) == 1),
                        "n = {n}"
                    );
                }
            }
            // The helpers take part: a job long enough for them to arrive is shared.
            let threads = Mutex::new(std::collections::HashSet::new());
            for_each_index(64, |_| {
                std::thread::sleep(Duration::from_millis(2));
                threads.lock().unwrap().insert(std::thread::current().id());
            });
            assert!(threads.lock().unwrap().len() > 1);

            let caught = catch_unwind(|| for_each_index(8, |i| assert!(i != 5, "task 5 fails")));
            assert!(caught.is_err());
            // The team still works after a panicking job.
            let sum = AtomicUsize::new(0);
            for_each_index(100, |i| {
                sum.fetch_add(i, Ordering::Relaxed);
            });
            assert_eq!(sum.load(Ordering::Relaxed), 4950);
        });
        // Products each run through `install` from outside the pool (as `bench --kernels`
        // does): one may land on the thread still helping after the last one, which must then
        // get a helper of its own rather than run alone. The gaps between them sweep across
        // [`AWAKE`], when the helpers of the last product are leaving: one that left as the
        // next product came must be replaced or take it.
        for round in 0..40u32 {
            std::thread::sleep(AWAKE - Duration::from_micros(100) + round * AWAKE / 100);
            let threads = Mutex::new(std::collections::HashSet::new());
            pool.install(|| {
                for_each_index(16, |_| {
                    std::thread::sleep(Duration::from_millis(2));
                    threads.lock().unwrap().insert(std::thread::current().id());
                })
            });
            assert!(threads.lock().unwrap().len() > 1, "round {round} ran alone");
        }
    }
}
