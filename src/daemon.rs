//! `batond`'s top level: wires the proxy, the supervisor, the control socket
//! and the signals together, and runs until SIGTERM/SIGINT.
//!
//! [`run`] takes the already-bound public listener and a root cancellation
//! token, so tests and socket activation use the same path.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
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
use crate::worker_proc::BUILD_PGID_FILE;

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

/// Runs the daemon on `listener` until a stop signal or `token` is cancelled.
/// `shim` is the executable that understands [`crate::process::SHIM_ARG`]
/// (`batond` itself).
///
/// # Errors
/// [`DaemonError`] when start-up fails; after start-up, failures are logged
/// and the daemon keeps running.
pub async fn run(
    listener: TcpListener,
    mut cfg: Config,
    overrides: Overrides,
    shim: PathBuf,
    token: CancellationToken,
) -> Result<(), DaemonError> {
    if let Ok(bound) = listener.local_addr() {
        cfg.daemon.listen = bound;
    }
    let state_dir = cfg.daemon.state_dir.clone();
    std::fs::create_dir_all(&state_dir).map_err(|source| DaemonError::StateDir {
        path: state_dir.clone(),
        source,
    })?;
    if let Some(pgid) = GroupRecord::reap_stale(&state_dir.join(BUILD_PGID_FILE)) {
        tracing::warn!(
            pgid,
            "killed what was left of a build from a previous daemon"
        );
    }
    let control_listener = control::server::bind(&cfg.daemon.control_socket)?;
    let control_path = cfg.daemon.control_socket.clone();
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
    let proxy = Proxy::new(
        router.clone(),
        cfg.daemon.hold_timeout,
        cfg.daemon.header_timeout,
    );
    let shutdown_grace = cfg.daemon.shutdown_timeout;
    let worker_token = CancellationToken::new();
    let (job, actor) = supervisor::spawn(
        cfg,
        overrides,
        shim,
        router,
        proxy.clone(),
        worker_token.clone(),
    )?;

    let tracker = TaskTracker::new();
    let front_token = token.child_token();
    tracker.spawn(proxy.serve(listener, front_token.clone(), shutdown_grace));
    let control_token = CancellationToken::new();
    tracker.spawn(control::server::serve(
        control_listener,
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
    handle.close();
    // Stop taking new connections; open requests and calls finish (bounded
    // by the shutdown timeout), then the workers stop.
    front_token.cancel();
    let (tx, rx) = tokio::sync::oneshot::channel();
    job.send(Control::Shutdown(tx));
    let _ = rx.await;
    let _ = actor.await;
    control_token.cancel();
    tracker.close();
    let _ = tokio::time::timeout(shutdown_grace, tracker.wait()).await;
    let _ = std::fs::remove_file(&control_path);
    // The blocking pool is idle by now: `STOPPING=1` goes out before exit.
    let _ = tokio::task::spawn_blocking(|| systemd::flush(Duration::from_secs(1))).await;
    tracing::info!("batond stopped");
    Ok(())
}
