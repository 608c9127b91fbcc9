//! `batond`'s top level: wires the proxy, the supervisor, the control socket
//! and the signals together, and runs until SIGTERM/SIGINT.
//!
//! [`run`] takes the already-bound public listener and a root cancellation
//! token, so tests and socket activation use the same path.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Overrides};
use crate::control;
use crate::process::GroupRecord;
use crate::proxy::Proxy;
use crate::router::Router;
use crate::supervisor::{self, Control};
use crate::systemd;

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The state dir could not be made.
    #[error("state dir {}: {source}", path.display())]
    StateDir {
        /// The folder.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Another daemon runs with the same state dir.
    #[error("state dir {} is in use by another batond{}", path.display(), pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    InUse {
        /// The folder.
        path: PathBuf,
        /// The other daemon's pid, as it wrote it.
        pid: Option<u32>,
    },
    /// The control socket could not be opened.
    #[error(transparent)]
    Control(#[from] control::server::ControlError),
    /// The watches could not be set up.
    #[error(transparent)]
    Watch(#[from] crate::watch::WatchError),
    /// Signal handlers could not be installed.
    #[error("signal handlers: {0}")]
    Signals(std::io::Error),
}

/// The lock a daemon holds on its state dir (`batond.lock`, with its pid
/// in it) for as long as it runs: the records of process groups, the
/// generation folders and the control socket in it are that daemon's.
fn lock_state_dir(dir: &Path) -> Result<Flock<std::fs::File>, DaemonError> {
    use std::io::{Seek, Write};
    let path = dir.join("batond.lock");
    let io = |source| DaemonError::StateDir {
        path: path.clone(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(mut lock) => {
            lock.set_len(0).map_err(io)?;
            lock.rewind().map_err(io)?;
            writeln!(lock, "{}", std::process::id()).map_err(io)?;
            Ok(lock)
        }
        Err((_, Errno::EWOULDBLOCK)) => Err(DaemonError::InUse {
            path: dir.to_path_buf(),
            pid: std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| t.trim().parse().ok()),
        }),
        Err((_, e)) => Err(io(std::io::Error::from(e))),
    }
}

/// Another process that holds the lock on the `batond.lock` of
/// `state_dir` (or on a removed file of that path): a daemon of this state
/// dir. A process that merely has the file open (a pager) does not count:
/// the kernel's list of locks (`/proc/locks`) must show its `flock` on a
/// file of the state dir's file system, and that open file must be the
/// lock (its path, its device and inode: another mount namespace's folder
/// of the same path is another folder). Each holder's descriptors are
/// read once.
fn other_lock_holder(state_dir: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let dir = std::fs::canonicalize(state_dir).ok()?;
    let dev = std::fs::metadata(&dir).ok()?.dev();
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    let lock = dir.join("batond.lock");
    let own = std::process::id();
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    // pid -> inodes it holds a flock on, on this file system.
    let mut held: std::collections::BTreeMap<u32, Vec<u64>> = std::collections::BTreeMap::new();
    for l in locks.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.get(1) != Some(&"FLOCK") {
            continue;
        }
        let (Some(pid), Some(id)) = (f.get(4).and_then(|p| p.parse::<u32>().ok()), f.get(5)) else {
            continue;
        };
        let mut parts = id.split(':');
        let (Some(ma), Some(mi), Some(ino)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let same_fs =
            u64::from_str_radix(ma, 16) == Ok(major) && u64::from_str_radix(mi, 16) == Ok(minor);
        if let (true, Ok(ino)) = (same_fs && pid != own, ino.parse::<u64>()) {
            held.entry(pid).or_default().push(ino);
        }
    }
    held.into_iter().find_map(|(pid, inodes)| {
        // Through the link: the open file itself, removed or not.
        let is_lock = crate::process::open_files(pid).iter().any(|(fd, file)| {
            *file == lock
                && std::fs::metadata(fd).is_ok_and(|m| m.dev() == dev && inodes.contains(&m.ino()))
        });
        is_lock.then_some(pid)
    })
}

/// How often the daemon checks that `batond.lock` is still the file it
/// holds.
const LOCK_CHECK: Duration = Duration::from_secs(2);

/// Keeps the state dir locked until `token` is cancelled, then gives the
/// lock back (the caller drops it last). Someone who removes the lock file
/// (a `rm -rf` of the state dir) takes the lock away without a word: a
/// second daemon could then start on the same folder. So the file is
/// checked every [`LOCK_CHECK`] and, if it is gone or another file, made
/// and locked again.
async fn keep_lock(
    mut lock: Flock<std::fs::File>,
    dir: PathBuf,
    token: CancellationToken,
) -> Flock<std::fs::File> {
    use std::os::unix::fs::MetadataExt;
    let path = dir.join("batond.lock");
    let mut tick = tokio::time::interval(LOCK_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut complained = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = token.cancelled() => return lock,
        }
        let held = lock.metadata().ok().map(|m| (m.dev(), m.ino()));
        let there = tokio::fs::metadata(&path)
            .await
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if held.is_some() && held == there {
            continue;
        }
        let _ = tokio::fs::create_dir_all(&dir).await;
        match lock_state_dir(&dir) {
            Ok(new) => {
                tracing::warn!("{} was removed or replaced; locked again", path.display());
                lock = new;
                complained = false;
            }
            Err(e) if !complained => {
                tracing::error!(
                    "{} was removed and cannot be locked again: {e}",
                    path.display()
                );
                complained = true;
            }
            Err(_) => {}
        }
    }
}

/// Runs the daemon on `listener` until a stop signal or `token` is cancelled.
/// Client connections are served by the runtimes in `front` in turn (the
/// front threads, see [`crate::runtime`]), or here when it is empty.
/// `shim` is the executable that understands [`crate::process::SHIM_ARG`]
/// (`batond` itself).
///
/// # Errors
/// [`DaemonError`] when start-up fails; after start-up, failures are logged
/// and the daemon keeps running.
pub async fn run(
    listener: TcpListener,
    front: Vec<tokio::runtime::Handle>,
    mut cfg: Config,
    overrides: Overrides,
    shim: PathBuf,
    token: CancellationToken,
) -> Result<(), DaemonError> {
    if let Ok(bound) = listener.local_addr() {
        cfg.daemon.listen = bound;
    }
    for advice in cfg.advice() {
        tracing::warn!("{advice}");
    }
    let state_dir = cfg.daemon.state_dir.clone();
    std::fs::create_dir_all(&state_dir).map_err(|source| DaemonError::StateDir {
        path: state_dir.clone(),
        source,
    })?;
    // Before anything in the state dir is touched: a second daemon must not
    // take the first one's records for leftovers.
    // A daemon whose lock file was removed (a `rm -rf` of the state dir)
    // still holds it open, until it makes and locks a new one (within
    // `LOCK_CHECK`): in that window the lock is free, but the folder is not.
    if let Some(pid) = other_lock_holder(&state_dir) {
        return Err(DaemonError::InUse {
            path: state_dir.clone(),
            pid: Some(pid),
        });
    }
    let lock = lock_state_dir(&state_dir)?;
    let reaped = GroupRecord::reap_stale(&state_dir);
    for (pgid, what) in reaped.killed {
        tracing::warn!(
            pgid,
            "killed what was left of a {what} from a previous daemon (process group {pgid})"
        );
    }
    for (pgid, what) in reaped.left {
        tracing::info!(
            pgid,
            "a previous daemon's {what} was process group {pgid}; that number now belongs to other processes, left alone"
        );
    }
    let control_listener = control::server::bind(&cfg.daemon.control_socket)?;
    let control_path = cfg.daemon.control_socket.clone();

    if let Some((from, to)) = crate::process::raise_fd_limit() {
        tracing::info!(from, to, "open files limit raised from {from} to {to}");
    }
    // The runtime's threads, before the watcher and the blocking pool start
    // theirs: the ones `realtime_priority` is for, now and on reload.
    crate::sched::note_threads();
    if cfg.daemon.realtime_priority > 0 {
        crate::sched::apply_to_process(cfg.daemon.realtime_priority);
    }

    let router = Arc::new(Router::default());
    let proxy = Proxy::new(router.clone(), crate::proxy::Timeouts::of(&cfg.daemon));
    let shutdown_grace = cfg.daemon.shutdown_timeout;
    let worker_token = CancellationToken::new();
    let (job, actor) = supervisor::spawn(
        cfg,
        overrides,
        shim,
        router,
        proxy.clone(),
        worker_token.clone(),
    )
    .inspect_err(|_| {
        // Refused before serving: no socket left behind for the next start
        // to find.
        let _ = std::fs::remove_file(&control_path);
    })?;
    // Only now: a watch that cannot be set up refuses the start above, and
    // the log must not have said the daemon was up.
    let public = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    tracing::info!(
        listen = %public,
        control = %control_path.display(),
        "batond listening on {public}; control socket {}",
        control_path.display()
    );

    let tracker = TaskTracker::new();
    let front_token = token.child_token();
    tracker.spawn(proxy.serve(listener, front, front_token.clone(), shutdown_grace));
    let control_token = CancellationToken::new();
    let lock = tokio::spawn(keep_lock(lock, state_dir.clone(), control_token.clone()));
    tracker.spawn(control::server::serve(
        control_listener,
        control_path.clone(),
        job.clone(),
        state_dir,
        control_token.clone(),
    ));
    tracker.spawn(systemd::watchdog(control_token.clone()));
    tracker.spawn(crate::logging::report_dropped(
        Duration::from_secs(5),
        control_token.clone(),
    ));

    let mut signals =
        signal_hook_tokio::Signals::new([SIGHUP, SIGTERM, SIGINT]).map_err(DaemonError::Signals)?;
    let handle = signals.handle();
    loop {
        tokio::select! {
            s = signals.next() => match s {
                Some(SIGHUP) => {
                    tracing::info!("SIGHUP: reloading the config");
                    job.send(Control::Reload(None));
                }
                Some(sig) => {
                    tracing::info!(signal = sig, "stop signal: draining");
                    break;
                }
                None => break,
            },
            () = token.cancelled() => break,
        }
    }
    // Stop taking new connections; open requests and calls finish (bounded
    // by the shutdown timeout), then the workers stop. A signal meanwhile
    // changes nothing of that, and the log says so.
    front_token.cancel();
    let (tx, rx) = tokio::sync::oneshot::channel();
    job.send(Control::Shutdown(tx));
    let stopped = async {
        let _ = rx.await;
        let _ = actor.await;
    };
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            () = &mut stopped => break,
            Some(sig) = signals.next() => tracing::info!(
                signal = sig,
                "already stopping: the workers stop once their calls and requests end or daemon.shutdown_timeout_s is over"
            ),
        }
    }
    handle.close();
    control_token.cancel();
    tracker.close();
    let _ = tokio::time::timeout(shutdown_grace, tracker.wait()).await;
    // What the workers left in their groups has its grace (SIGTERM, then
    // SIGKILL at `worker.stop_timeout_s`): each ends by its deadline, and
    // an exit now would leave it running.
    let ending = crate::process::ending_groups();
    ending.close();
    ending.wait().await;
    // Held until the control socket is gone: a daemon that starts next
    // binds its own, which this one must not remove.
    let lock = lock.await;
    control::server::remove_unless_answered(&control_path);
    drop(lock);
    // The blocking pool is idle by now: `STOPPING=1` goes out before exit.
    let _ = tokio::task::spawn_blocking(|| systemd::flush(Duration::from_secs(1))).await;
    tracing::info!("batond stopped");
    Ok(())
}
