//! systemd integration: `sd_notify` messages (`READY=1`, `STATUS=`,
//! `RELOADING=1`, `STOPPING=1`, `WATCHDOG=1`) and the socket-activated
//! listener. All of it is a no-op when the daemon is not run by systemd.

use std::sync::OnceLock;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

/// The name of the thread that sends to systemd's notify socket. It blocks
/// when systemd does not read and moves no traffic; it starts after
/// [`crate::sched::note_threads`], so it keeps normal scheduling.
pub const NOTIFY_THREAD: &str = "sd-notify";

/// Messages queued for the notify thread; more are dropped (systemd is not
/// reading them anyway).
const QUEUE: usize = 64;

/// One notify datagram, owned so that it can cross to the notify thread.
enum Message {
    Ready(String),
    Status(String),
    Reloading(i128),
    Stopping,
    Watchdog,
    /// Answered once everything queued before it has been sent.
    Flush(SyncSender<()>),
}

/// The queue to the notify thread; `None` when not run by systemd.
///
/// `sd_notify` sends on a blocking datagram socket, and a datagram socket
/// whose reader is slow blocks the sender once a few messages wait (ten,
/// by default): were that the runtime thread, a busy PID 1 would stop every
/// request and call. So the sends happen on a thread of their own.
fn queue() -> Option<&'static SyncSender<Message>> {
    static TX: OnceLock<Option<SyncSender<Message>>> = OnceLock::new();
    TX.get_or_init(|| {
        std::env::var_os("NOTIFY_SOCKET")?;
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        std::thread::Builder::new()
            .name(NOTIFY_THREAD.into())
            .spawn(move || send_all(&rx))
            .ok()?;
        Some(tx)
    })
    .as_ref()
}

fn send_all(rx: &Receiver<Message>) {
    let target = std::env::var_os("NOTIFY_SOCKET").unwrap_or_default();
    let sock = notify_socket(&target);
    // Said once per run of failures, and when they end.
    let mut warned = false;
    while let Ok(m) = rx.recv() {
        let states = match &m {
            Message::Ready(s) => vec![NotifyState::Ready, NotifyState::Status(s)],
            Message::Status(s) => vec![NotifyState::Status(s)],
            Message::Reloading(t) => vec![NotifyState::Reloading, NotifyState::MonotonicUsec(*t)],
            Message::Stopping => vec![NotifyState::Stopping],
            Message::Watchdog => vec![NotifyState::Watchdog],
            Message::Flush(done) => {
                let _ = done.send(());
                continue;
            }
        };
        let text: String = states.iter().map(|s| format!("{s}\n")).collect();
        let sent = match &sock {
            Ok((sock, addr)) => sock.send_to_addr(text.as_bytes(), addr).map(drop),
            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
        };
        match sent {
            Err(e) if !std::mem::replace(&mut warned, true) => tracing::warn!(
                notify_socket = %target.to_string_lossy(),
                error = %e,
                "cannot send to systemd's notify socket (NOTIFY_SOCKET); systemd misses batond's notifications (READY=1, STATUS=, WATCHDOG=1) until a send works again"
            ),
            Err(_) => {}
            Ok(()) if std::mem::replace(&mut warned, false) => {
                tracing::info!("systemd's notify socket takes notifications again");
            }
            Ok(()) => {}
        }
    }
}

/// A datagram socket and the address in `NOTIFY_SOCKET`: a path, or a name
/// in the abstract namespace when it starts with `@` (sd_notify(3)).
fn notify_socket(
    target: &std::ffi::OsStr,
) -> std::io::Result<(
    std::os::unix::net::UnixDatagram,
    std::os::unix::net::SocketAddr,
)> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::SocketAddr;
    let addr = match target.as_bytes().strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(target)?,
    };
    Ok((std::os::unix::net::UnixDatagram::unbound()?, addr))
}

fn send(m: Message) {
    if let Some(tx) = queue()
        && let Err(TrySendError::Full(_)) = tx.try_send(m)
    {
        tracing::debug!("systemd is not reading notify messages; one dropped");
    }
}

/// Tells systemd the daemon is ready (the first worker is active).
pub fn ready(status: &str) {
    send(Message::Ready(status.to_string()));
}

/// Updates the one-line status `systemctl status` shows.
pub fn status(status: &str) {
    send(Message::Status(status.to_string()));
}

/// Tells systemd a reload started (it then waits for the next `READY=1`).
pub fn reloading() {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| i128::from(t.tv_sec()) * 1_000_000 + i128::from(t.tv_nsec()) / 1000)
        .unwrap_or_default();
    send(Message::Reloading(now));
}

/// Tells systemd the daemon is stopping.
pub fn stopping() {
    send(Message::Stopping);
}

/// Waits (up to `limit`) until the messages queued so far have been sent:
/// called before the daemon exits, so that `STOPPING=1` is not lost.
pub fn flush(limit: Duration) {
    let Some(tx) = queue() else { return };
    let (done, wait) = std::sync::mpsc::sync_channel(1);
    if tx.try_send(Message::Flush(done)).is_ok() {
        let _ = wait.recv_timeout(limit);
    }
}

/// Pings the watchdog at half its period until `token` is cancelled, when
/// the unit sets `WatchdogSec=`.
pub async fn watchdog(token: CancellationToken) {
    // Zero is no period (and `interval` refuses it); a ping at most every
    // millisecond.
    let Some(period) = sd_notify::watchdog_enabled().filter(|p| !p.is_zero()) else {
        return;
    };
    let period = period.max(Duration::from_millis(2));
    let mut tick = tokio::time::interval(period / 2);
    loop {
        tokio::select! {
            _ = tick.tick() => send(Message::Watchdog),
            () = token.cancelled() => return,
        }
    }
}

/// The public listener inherited through socket activation, if any
/// (`LISTEN_FDS`/`LISTEN_PID`).
///
/// # Errors
/// The I/O error when an inherited fd is not a usable TCP listener, or
/// when more than one was passed: batond serves one public address, and a
/// second socket would accept connections that nobody ever answers.
pub fn inherited_listener() -> std::io::Result<Option<tokio::net::TcpListener>> {
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() > 1 {
        let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "socket activation passed {} sockets (LISTEN_FDNAMES={names:?}); batond serves one \
                 public listener: give its .socket unit one ListenStream= (ListenStream=[::]:PORT \
                 takes IPv4 and IPv6 both)",
                fds.len()
            ),
        ));
    }
    match fds.take_tcp_listener(0)? {
        Some(std) => {
            ensure_listening(&std)?;
            std.set_nonblocking(true)?;
            Ok(Some(tokio::net::TcpListener::from_std(std)?))
        }
        None => Ok(None),
    }
}

/// Checks that an inherited socket is listening (`SO_ACCEPTCONN`): one
/// that was bound but never `listen`ed on would fail every `accept` with
/// EINVAL, and the process would look up while it serves nothing.
///
/// # Errors
/// An `InvalidInput` error that says so, or the `getsockopt` error.
pub fn ensure_listening(fd: &impl std::os::fd::AsFd) -> std::io::Result<()> {
    let listening = nix::sys::socket::getsockopt(fd, nix::sys::socket::sockopt::AcceptConn)
        .map_err(std::io::Error::from)?;
    if listening {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the inherited socket (LISTEN_FDS) is not listening: it was bound, but listen() was never called on it",
        ))
    }
}
