//! Compute that must never slow serving down (the trainer, a judge on its own model) runs on
//! threads at the lowest CPU priority, with its own rayon pool: Burn's Flex backend
//! parallelizes through rayon, which runs work on the pool of the calling thread, so inside
//! this pool background work uses every core while serving is idle and yields them to the
//! engine (on the global pool, normal priority) within a scheduler tick when a request arrives.

use crate::kernels::team::{self, Team};
use anyhow::Result;

/// A rayon pool of low-priority threads named `{name}-{i}`, one per core.
pub fn low_priority_pool(name: &'static str) -> Result<rayon::ThreadPool> {
    Ok(pool_builder(name)
        .start_handler(|_| lower_priority())
        .build()?)
}

/// A rayon pool of normal-priority threads, one per core, for serving. Code run through its
/// `install` executes on one of its workers, so the parallel matmuls of a decode step split
/// their work with the pool's other threads directly instead of injecting a job from outside
/// and sleeping on a latch (a wake-up per matmul cost a third of a decode step on 2 cores).
/// Its threads carry a [`Team`]: the products of a decoding step are split between them in
/// contiguous ranges, and the helpers stay awake between products.
pub fn serving_pool(name: &'static str) -> Result<rayon::ThreadPool> {
    let team = Team::new(threads());
    Ok(pool_builder(name)
        .start_handler(move |_| team::join(team.clone()))
        .build()?)
}

/// Gives rayon's global pool (tensor operations run outside the pools above) the same stack.
/// Call once, before any parallel work; a second call changes nothing.
pub fn init_global_pool() {
    let _ = rayon::ThreadPoolBuilder::new()
        .stack_size(STACK_BYTES)
        .build_global();
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Stack of every compute thread. Rayon's default (the platform's 2 MiB) left no margin: a
/// worker waiting inside a parallel operation runs other jobs of its pool on top of its own
/// stack, and a stack overflow cannot be caught, it aborts the server with every request in
/// flight. Only the pages a thread touches are resident, so the size costs address space.
pub(crate) const STACK_BYTES: usize = 16 << 20;

fn pool_builder(name: &'static str) -> rayon::ThreadPoolBuilder {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads())
        .stack_size(STACK_BYTES)
        .thread_name(move |i| format!("{name}-{i}"))
}

/// Gives the calling thread the lowest scheduling priority: Linux's SCHED_IDLE class (it runs
/// only on CPU time nobody else wants and is preempted as soon as a serving thread wakes),
/// else nice 19.
pub fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid, sched_setscheduler and setpriority take integers and a pointer to a
    // local, initialized sched_param.
    unsafe {
        let tid = libc::gettid();
        let param = libc::sched_param { sched_priority: 0 };
        if libc::sched_setscheduler(tid, libc::SCHED_IDLE, &param) != 0 {
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19);
        }
    }
}

/// Background work that waits for CPU time while serving keeps the cores busy (the trainer
/// in an update, a judge on its own model with turns to judge). The serving engine pauses for
/// it in slices (`engine.background_share`); without demand it never pauses.
static DEMAND: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Whether some background work waits for CPU time.
pub fn demand() -> bool {
    DEMAND.load(std::sync::atomic::Ordering::Relaxed) > 0
}

/// Registers background demand until dropped.
pub struct Demand(());

impl Demand {
    pub fn hold() -> Self {
        DEMAND.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(())
    }
}

impl Drop for Demand {
    fn drop(&mut self) {
        DEMAND.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}
