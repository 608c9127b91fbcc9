//! Where and how `batond`'s threads run: real-time scheduling for the
//! media path (`realtime_priority`), and each front thread kept to CPUs
//! of its own (`spread_threads`, see [`spread`]).
//!
//! On a busy host the kernel's fair scheduler lets a process that has work
//! wait for another's time slice: a few milliseconds, which is what a 20 ms
//! audio frame cannot spare. Telephony servers run their media threads at a
//! real-time priority for that reason (Asterisk's `-p`, FreeSWITCH's `-rp`).
//! `batond` and `media-worker` can do the same: `SCHED_FIFO` at the
//! configured priority for the threads that move frames, so a frame goes
//! out as soon as it is due and everything else (builds, speech engines)
//! runs in the time they leave.
//!
//! Every thread is set with `SCHED_RESET_ON_FORK`: whatever it starts (a
//! build, a worker, an `espeak-ng`, a thread the runtime adds later) begins
//! with normal scheduling, so nothing CPU-bound inherits a priority meant for
//! threads that block after each message. Priority 0 means normal
//! scheduling (`SCHED_OTHER`).
//!
//! Needs `CAP_SYS_NICE` or an `RLIMIT_RTPRIO` of at least the priority
//! (systemd: `LimitRTPRIO=`, and no `RestrictRealtime=yes`).

use std::io;
use std::process::Command;
use std::sync::OnceLock;

use nix::sched::CpuSet;
use nix::unistd::Pid;

/// The name of `batond`'s threads besides its main thread that run its
/// event loops or their blocking work: the front threads (with
/// `daemon.threads` above 1, see [`crate::runtime`]) and the blocking
/// pools' threads.
pub const RUNTIME_THREAD: &str = "batond-rt";

/// The highest `SCHED_FIFO` priority Linux takes.
pub const MAX_PRIORITY: u8 = 99;

/// The scheduling of one thread, as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// `SCHED_FIFO` (true) or another policy.
    pub fifo: bool,
    /// The real-time priority (0 for normal scheduling).
    pub priority: u8,
}

/// Sets the scheduling of thread `tid` of this process: `SCHED_FIFO` at
/// `priority` with `SCHED_RESET_ON_FORK`, or normal scheduling for 0.
///
/// The change is made with util-linux's `chrt` (part of every Debian
/// system): neither nix nor rustix binds `sched_setscheduler`, and this
/// crate has no unsafe code. It runs at start-up and on a reload only.
///
/// # Errors
/// `chrt` is missing or the kernel refused (without `CAP_SYS_NICE` or a
/// high enough `RLIMIT_RTPRIO`); the error names the priority and says why.
pub fn set_thread(tid: u32, priority: u8) -> io::Result<()> {
    if priority > MAX_PRIORITY {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("realtime priority {priority} is above {MAX_PRIORITY}"),
        ));
    }
    let mut chrt = Command::new("chrt");
    let what = if priority == 0 {
        chrt.args(["--other", "--pid", "0"]);
        "normal scheduling".to_string()
    } else {
        chrt.args(["--fifo", "--reset-on-fork", "--pid"])
            .arg(priority.to_string());
        format!("SCHED_FIFO priority {priority}")
    };
    let out = chrt.arg(tid.to_string()).output().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("{what}: cannot run chrt (util-linux): {e}"),
        )
    })?;
    if out.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let hint = if said.contains("not permitted") {
        " (needs CAP_SYS_NICE or an RLIMIT_RTPRIO of at least the priority: systemd LimitRTPRIO=, without RestrictRealtime=yes)"
    } else {
        ""
    };
    Err(io::Error::other(format!("{what}: {said}{hint}")))
}

/// The threads of this process now, but the log writer's: it blocks on
/// stderr and moves no frames (see [`crate::logging`]). (Threads started
/// after [`note_threads`], such as the systemd notifier's, are never set.)
fn threads() -> io::Result<Vec<u32>> {
    let mut tids = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task")? {
        let entry = entry?;
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let name = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if name.trim_end() != crate::logging::WRITER_THREAD {
            tids.push(tid);
        }
    }
    Ok(tids)
}

/// The threads [`set_process`] sets, once [`note_threads`] has named them.
static FRAME_THREADS: OnceLock<Vec<u32>> = OnceLock::new();

/// Names the threads that exist now as the ones [`set_process`] sets, now
/// and on every later call (a reload), so that threads started since (a
/// file watcher, the blocking pool) keep normal scheduling. Call it once the
/// runtime is up and before anything else starts threads; later calls
/// change nothing.
pub fn note_threads() {
    if let Ok(tids) = threads() {
        let _ = FRAME_THREADS.set(tids);
    }
}

/// Sets the threads named by [`note_threads`] (every thread the process
/// has now, if none were named), as [`set_thread`] does. Threads started
/// afterwards get normal scheduling (`SCHED_RESET_ON_FORK`).
///
/// # Errors
/// The first refusal; threads already set stay set. Threads that have
/// ended are skipped.
pub fn set_process(priority: u8) -> io::Result<usize> {
    let tids = match FRAME_THREADS.get() {
        Some(tids) => tids.clone(),
        None => threads()?,
    };
    let mut set = 0;
    for tid in tids {
        match set_thread(tid, priority) {
            Ok(()) => set += 1,
            // Gone since the list was read (a blocking-pool thread ending).
            Err(_) if get_thread(tid).is_err() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(set)
}

/// [`set_process`], logged: what was set, or why it was not (the process
/// carries on with the scheduling it had).
pub fn apply_to_process(priority: u8) {
    match set_process(priority) {
        Ok(threads) if priority > 0 => tracing::info!(
            priority,
            threads,
            "real-time scheduling: SCHED_FIFO priority {priority} on {threads} threads"
        ),
        Ok(threads) => tracing::debug!(threads, "normal scheduling"),
        Err(e) => tracing::warn!(
            priority,
            error = %e,
            "realtime_priority not applied; running with normal scheduling: {e}"
        ),
    }
}

/// The scheduling of thread `tid` of this process.
///
/// # Errors
/// The thread does not exist (any more).
pub fn get_thread(tid: u32) -> io::Result<Policy> {
    policy_of(std::process::id(), tid)
}

/// The scheduling of thread `tid` of process `pid`, from
/// `/proc/PID/task/TID/stat` (`rt_priority` and `policy`, fields 40 and 41).
///
/// # Errors
/// The thread does not exist (any more).
pub fn policy_of(pid: u32, tid: u32) -> io::Result<Policy> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat"))?;
    // The command name may hold spaces and parentheses: fields are counted
    // from the last ')', which ends it; field 3 comes right after.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| io::Error::other(format!("unexpected stat line for thread {tid}")))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> io::Result<u32> {
        fields
            .get(n - 3)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| io::Error::other(format!("no field {n} in thread {tid}'s stat")))
    };
    let rt_priority = field(40)?;
    let policy = field(41)?;
    Ok(Policy {
        // SCHED_FIFO is 1.
        fifo: policy == 1,
        priority: u8::try_from(rt_priority).unwrap_or(0),
    })
}

// === CPU placement ===

/// Which CPUs of `allowed` (in order) front thread `k` of `n` keeps to:
/// every `n`-th, starting at the `k`-th. No CPU is in two shares, each
/// share has one at least (with `n` at most `allowed.len()`), and on a
/// host with more CPUs than threads each still has some to move between.
#[must_use]
pub fn share(allowed: &[usize], k: usize, n: usize) -> Vec<usize> {
    allowed
        .iter()
        .enumerate()
        .filter(|(i, _)| n > 0 && i % n == k)
        .map(|(_, &cpu)| cpu)
        .collect()
}

/// The CPUs in `set`, in order.
fn cpus(set: &CpuSet) -> Vec<usize> {
    (0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect()
}

/// The CPUs the process may use: those of its main thread, which is never
/// kept to a share (what `taskset -p`, systemd's `CPUAffinity=` or a
/// cgroup's cpuset allow).
///
/// # Errors
/// The kernel refused to say (it does not, for a thread of this process).
pub fn process_cpus() -> io::Result<Vec<usize>> {
    main_set().map(|s| cpus(&s))
}

fn main_set() -> io::Result<CpuSet> {
    let pid = i32::try_from(std::process::id()).map_err(io::Error::other)?;
    Ok(nix::sched::sched_getaffinity(Pid::from_raw(pid))?)
}

/// The CPUs thread `tid` of this process may run on.
///
/// # Errors
/// The thread does not exist (any more).
pub fn thread_cpus(tid: u32) -> io::Result<Vec<usize>> {
    let tid = i32::try_from(tid).map_err(io::Error::other)?;
    Ok(cpus(&nix::sched::sched_getaffinity(Pid::from_raw(tid))?))
}

/// Keeps each of the front threads `tids` to a share of the CPUs the
/// process may use ([`share`]), and returns the shares. None is kept when
/// there are fewer than two threads or fewer CPUs than threads (an empty
/// list).
///
/// Why: on a host where clients, the worker and `batond` share few CPUs,
/// the kernel often puts both front threads on one CPU for a while, where
/// each waits for the other's turn while the other CPU serves the worker.
/// Kept apart, the two always run side by side: more requests a second and
/// a narrower tail of the proxy's latency (README, Benchmark), as nginx's
/// `worker_cpu_affinity` and HAProxy's `cpu-map` do for theirs.
///
/// Nothing else is: the daemon's own work (the supervisor, which starts
/// builds and workers, the file watch, the control socket, the blocking
/// pool) runs on the main thread, which keeps every CPU the process may
/// use, and what it starts inherits that.
///
/// # Errors
/// The kernel refused a thread's CPUs; threads already kept stay kept.
pub fn spread(tids: &[u32]) -> io::Result<Vec<Vec<usize>>> {
    let allowed = process_cpus()?;
    let n = tids.len();
    if n < 2 || allowed.len() < n {
        return Ok(Vec::new());
    }
    let mut shares = Vec::with_capacity(n);
    for (k, &tid) in tids.iter().enumerate() {
        let cpus = share(&allowed, k, n);
        let mut set = CpuSet::new();
        for &c in &cpus {
            set.set(c)?;
        }
        let raw = i32::try_from(tid).map_err(io::Error::other)?;
        nix::sched::sched_setaffinity(Pid::from_raw(raw), &set)
            .map_err(|e| io::Error::other(format!("front thread {tid} to CPUs {cpus:?}: {e}")))?;
        shares.push(cpus);
    }
    Ok(shares)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calling thread's id.
    fn current_tid() -> io::Result<u32> {
        let link = std::fs::read_link("/proc/thread-self")?;
        link.file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| io::Error::other(format!("unexpected {}", link.display())))
    }

    /// A thread set to real time keeps it, and what it starts does not
    /// inherit it; or, where the process may not use real-time scheduling,
    /// the refusal says why and changes nothing.
    #[test]
    fn realtime_is_set_and_not_inherited() {
        let outcome = std::thread::spawn(|| {
            let me = current_tid().expect("own tid");
            let before = get_thread(me).expect("own policy");
            match set_thread(me, 7) {
                Ok(()) => {
                    let now = get_thread(me).expect("own policy");
                    let child = std::thread::spawn(|| {
                        get_thread(current_tid().expect("child tid")).expect("child policy")
                    })
                    .join()
                    .expect("child thread");
                    set_thread(me, 0).expect("back to normal");
                    let after = get_thread(me).expect("own policy");
                    Ok((now, child, after))
                }
                Err(e) => Err((e, before, get_thread(me).expect("own policy"))),
            }
        })
        .join()
        .expect("test thread");
        match outcome {
            Ok((now, child, after)) => {
                assert_eq!(
                    now,
                    Policy {
                        fifo: true,
                        priority: 7
                    }
                );
                assert_eq!(
                    child,
                    Policy {
                        fifo: false,
                        priority: 0
                    },
                    "a thread started by a real-time one inherited its policy"
                );
                assert_eq!(
                    after,
                    Policy {
                        fifo: false,
                        priority: 0
                    }
                );
            }
            Err((e, before, after)) => {
                let msg = e.to_string();
                assert!(msg.contains("SCHED_FIFO priority 7"), "{msg}");
                assert_eq!(before, after, "a refused change changed the policy");
            }
        }
    }

    #[test]
    fn each_runtime_thread_gets_cpus_no_other_has() {
        assert_eq!(share(&[0, 1], 0, 2), [0]);
        assert_eq!(share(&[0, 1], 1, 2), [1]);
        assert_eq!(share(&[0, 1, 2, 3], 0, 2), [0, 2]);
        assert_eq!(share(&[0, 1, 2, 3], 1, 2), [1, 3]);
        assert_eq!(share(&[0, 1, 2], 1, 2), [1]);
        assert_eq!(share(&[3, 5, 9], 2, 3), [9]);
        for cpus in 2..=9 {
            let allowed: Vec<usize> = (0..cpus).map(|c| c * 2 + 1).collect();
            for n in 2..=cpus {
                let mut all: Vec<usize> = (0..n).flat_map(|k| share(&allowed, k, n)).collect();
                assert!((0..n).all(|k| !share(&allowed, k, n).is_empty()));
                all.sort_unstable();
                assert_eq!(all, allowed, "{cpus} CPUs, {n} threads");
            }
        }
    }

    /// Two threads spread over the CPUs keep to their shares.
    #[test]
    fn spread_threads_keep_to_their_share() {
        let all = process_cpus().expect("own CPUs");
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let mut go = Vec::new();
        let mut threads = Vec::new();
        for _ in 0..2 {
            let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
            go.push(go_tx);
            let tid_tx = tid_tx.clone();
            threads.push(std::thread::spawn(move || {
                let me = current_tid().expect("own tid");
                tid_tx.send(me).expect("send tid");
                go_rx.recv().expect("go");
                thread_cpus(me).expect("own CPUs")
            }));
        }
        let mut tids: Vec<u32> = (0..2).map(|_| tid_rx.recv().expect("tid")).collect();
        tids.sort_unstable();
        let shares = spread(&tids).expect("spread");
        for tx in go {
            tx.send(()).expect("go");
        }
        let seen: Vec<_> = threads
            .into_iter()
            .map(|t| t.join().expect("thread"))
            .collect();
        if all.len() < 2 {
            assert!(shares.is_empty(), "{shares:?} on {all:?}");
            return;
        }
        assert_eq!(shares, [share(&all, 0, 2), share(&all, 1, 2)]);
        for after in &seen {
            assert!(shares.contains(after), "{after:?} is not a share");
        }
        assert_ne!(seen[0], seen[1], "both threads on one share");
        assert_eq!(
            process_cpus().expect("own CPUs"),
            all,
            "the process kept its CPUs"
        );
    }

    #[test]
    fn priorities_above_99_are_refused() {
        let me = current_tid().expect("own tid");
        let e = set_thread(me, 100).expect_err("100 taken");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("100"), "{e}");
    }

    #[test]
    fn a_thread_that_does_not_exist_is_an_error() {
        assert!(get_thread(u32::MAX).is_err());
        let e = set_thread(u32::MAX, 5).expect_err("no such thread");
        assert!(e.to_string().contains("SCHED_FIFO priority 5"), "{e}");
    }
}
