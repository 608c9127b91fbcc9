//! `batond`'s runtimes: the main one, and the front threads that serve
//! client connections.
//!
//! With `daemon.threads = 1` one event loop on the main thread does
//! everything. With `n` above 1 the main thread's event loop keeps the
//! daemon's own work (supervision, builds, probes, the control socket, the
//! file watch) and accepts client connections; each connection is handed,
//! in turn, to one of `n` front threads, each with an event loop (a tokio
//! current-thread runtime) of its own, which serves it to its end: its
//! requests, the worker connections they use (each front thread keeps its
//! own idle ones, see [`crate::pool`]) and its upgrades. Like nginx's
//! worker processes, and unlike a work-stealing pool: no thread wakes
//! another to share a queue, so none waits for the other to be scheduled
//! (see README, Benchmark).
//!
//! With `daemon.spread_threads` (the default) each front thread keeps to
//! CPUs of its own ([`crate::sched::spread`]).

use std::io;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// The front threads, running until this is dropped.
#[derive(Debug, Default)]
pub struct FrontThreads {
    threads: Vec<(Handle, oneshot::Sender<()>)>,
}

impl FrontThreads {
    /// Starts `n` front threads (none for `n` of 1: the main runtime
    /// serves clients itself) and, with `spread`, keeps each to CPUs of its
    /// own; says so in the log.
    ///
    /// # Errors
    /// A thread or its runtime could not be made.
    pub fn start(n: usize, spread: bool) -> io::Result<FrontThreads> {
        if n < 2 {
            return Ok(FrontThreads::default());
        }
        crate::pool::set_shards(n);
        let mut threads = Vec::with_capacity(n);
        let mut tids = Vec::with_capacity(n);
        for i in 0..n {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            std::thread::Builder::new()
                .name(crate::sched::RUNTIME_THREAD.into())
                .spawn(move || {
                    crate::pool::enter_shard(i);
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .thread_name(crate::sched::RUNTIME_THREAD)
                        .build();
                    let rt = match rt {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let tid = u32::try_from(nix::unistd::gettid().as_raw()).unwrap_or(0);
                    let _ = ready_tx.send(Ok((rt.handle().clone(), tid)));
                    let _ = rt.block_on(stop_rx);
                    rt.shutdown_timeout(std::time::Duration::from_secs(1));
                })?;
            let (handle, tid) = ready_rx
                .recv()
                .map_err(|_| io::Error::other("a front thread ended at its start"))??;
            threads.push((handle, stop_tx));
            tids.push(tid);
        }
        if spread {
            match crate::sched::spread(&tids) {
                Ok(shares) if shares.is_empty() => tracing::info!(
                    threads = n,
                    "spread_threads: fewer CPUs than front threads; they run where the kernel puts them"
                ),
                Ok(shares) => {
                    let said: Vec<String> = shares.iter().map(|s| cpu_list(s)).collect();
                    tracing::info!(
                        "front threads kept to CPUs of their own: {}",
                        said.join("; ")
                    );
                }
                Err(e) => tracing::warn!(error = %e, "spread_threads not applied: {e}"),
            }
        }
        Ok(FrontThreads { threads })
    }

    /// Each front thread's runtime, to hand connections to.
    #[must_use]
    pub fn handles(&self) -> Vec<Handle> {
        self.threads.iter().map(|(h, _)| h.clone()).collect()
    }
}

impl Drop for FrontThreads {
    fn drop(&mut self) {
        for (_, stop) in self.threads.drain(..) {
            let _ = stop.send(());
        }
    }
}

/// `[0, 2, 4]` as "CPU 0, 2, 4".
fn cpu_list(cpus: &[usize]) -> String {
    let list: Vec<String> = cpus.iter().map(usize::to_string).collect();
    format!("CPU {}", list.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_read_as_the_log_says_them() {
        assert_eq!(cpu_list(&[0]), "CPU 0");
        assert_eq!(cpu_list(&[1, 3, 5]), "CPU 1, 3, 5");
    }

    /// A connection's socket made on the main thread is served by a front
    /// thread, and the thread ends when the set is dropped.
    #[test]
    fn front_threads_run_what_they_are_given_until_dropped() {
        let front = FrontThreads::start(2, false).expect("front threads");
        let handles = front.handles();
        assert_eq!(handles.len(), 2);
        let names: Vec<String> = handles
            .iter()
            .map(|h| {
                h.block_on(async {
                    tokio::task::spawn(async {
                        std::thread::current()
                            .name()
                            .unwrap_or_default()
                            .to_string()
                    })
                    .await
                    .expect("task")
                })
            })
            .collect();
        assert!(
            names.iter().all(|n| n == crate::sched::RUNTIME_THREAD),
            "{names:?}"
        );
        let one = handles[0].clone();
        drop(front);
        // Its runtime is shut down: a task given to it now never runs.
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = ran.clone();
        std::thread::sleep(std::time::Duration::from_millis(100));
        drop(one.spawn(async move { seen.store(true, std::sync::atomic::Ordering::SeqCst) }));
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
        assert!(
            FrontThreads::start(1, true)
                .expect("none")
                .handles()
                .is_empty()
        );
    }
}
