//! systemd integration: `sd_notify` messages (`READY=1`, `STATUS=`,
//! `RELOADING=1`, `STOPPING=1`, `WATCHDOG=1`) and the socket-activated
//! listener. All of it is a no-op when the daemon is not run by systemd.

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

/// Tells systemd the daemon is ready (the first worker is active).
pub fn ready(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Updates the one-line status `systemctl status` shows.
pub fn status(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Status(status)]);
}

/// Tells systemd a reload started (it then waits for the next `READY=1`).
pub fn reloading() {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| i128::from(t.tv_sec()) * 1_000_000 + i128::from(t.tv_nsec()) / 1000)
        .unwrap_or_default();
    let _ = sd_notify::notify(&[NotifyState::Reloading, NotifyState::MonotonicUsec(now)]);
}

/// Tells systemd the daemon is stopping.
pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}

/// Pings the watchdog at half its period until `token` is cancelled, when
/// the unit sets `WatchdogSec=`.
pub async fn watchdog(token: CancellationToken) {
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    let mut tick = tokio::time::interval(period / 2);
    loop {
        tokio::select! {
            _ = tick.tick() => { let _ = sd_notify::notify(&[NotifyState::Watchdog]); }
            () = token.cancelled() => return,
        }
    }
}

/// The public listener inherited through socket activation, if any
/// (`LISTEN_FDS`/`LISTEN_PID`).
///
/// # Errors
/// The I/O error when an inherited fd is not a usable TCP listener.
pub fn inherited_listener() -> std::io::Result<Option<tokio::net::TcpListener>> {
    let mut fds = listenfd::ListenFd::from_env();
    match fds.take_tcp_listener(0)? {
        Some(std) => {
            std.set_nonblocking(true)?;
            Ok(Some(tokio::net::TcpListener::from_std(std)?))
        }
        None => Ok(None),
    }
}
