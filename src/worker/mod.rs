//! `media-worker`: Twilio webhooks, Media Streams over WebSocket, and the
//! voice pipeline, served with hyper 1 and tokio-tungstenite.
//!
//! - [`config`]: the TOML file, env overrides, signature resolution;
//! - [`http`]: routes, `X-App-Signature`, Twilio signature checks, TwiML and
//!   the WebSocket upgrade (we write the 101 ourselves, to choose its
//!   headers);
//! - [`call`]: one task per call: protocol, pacing, barge-in, ping;
//! - [`conn`]: the accepted connections (a Unix socket watched for reading
//!   only);
//! - [`pipeline`]: the engine traits and today's engines;
//! - [`record`]: the JSON record each finished call leaves in the data dir.
//!
//! [`run`] takes a bound listener (TCP, or a Unix socket that `batond`
//! handed over) and a cancellation token; it never binds or reads the
//! environment.

pub mod call;
pub mod config;
pub mod http;
pub mod pacer;
pub mod pipeline;
pub mod record;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Instant, SystemTime};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::unixconn::UnixConn;

pub use config::Config;

/// A connection the worker accepted: loopback TCP, or a Unix socket
/// watched for reading only (see [`crate::unixconn`]).
pub type Conn = tokio_util::either::Either<tokio::net::TcpStream, UnixConn>;

/// Why the worker could not run.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The listener or the data dir failed.
    #[error("{about}: {source}")]
    Io {
        /// What we were doing.
        about: &'static str,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// An engine could not start or the greeting could not be rendered.
    #[error("engines: {0}")]
    Engine(#[from] pipeline::EngineError),
    /// A start-up task panicked or was cancelled.
    #[error("start-up task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// The socket the worker serves on.
#[derive(Debug)]
pub enum Listener {
    /// A TCP socket (inherited, or bound on `bind_address:$PORT`).
    Tcp(TcpListener),
    /// A Unix stream socket `batond` handed over (`worker.socket = "unix"`).
    Unix(UnixListener),
}

/// Who is at the other end of a connection, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// A TCP peer.
    Tcp(SocketAddr),
    /// A peer on a Unix socket (`batond`).
    Unix,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Tcp(a) => write!(f, "{a}"),
            Peer::Unix => f.write_str("unix socket"),
        }
    }
}

impl Listener {
    /// Where it listens, for the log.
    fn describe(&self) -> std::io::Result<String> {
        Ok(match self {
            Listener::Tcp(l) => l.local_addr()?.to_string(),
            Listener::Unix(l) => match l.local_addr()?.as_pathname() {
                // A long path that batond bound through its own handle on
                // the folder: the name means nothing in this process.
                Some(p) if p.starts_with("/proc/self/fd") => {
                    format!("a unix socket from batond (bound as {})", p.display())
                }
                Some(p) => format!("unix:{}", p.display()),
                None => "an unnamed unix socket".to_string(),
            },
        })
    }

    async fn accept(&self) -> std::io::Result<(Conn, Peer)> {
        use tokio_util::either::Either;
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok((Either::Left(s), Peer::Tcp(peer)))
            }
            Listener::Unix(l) => Ok((
                Either::Right(UnixConn::new(l.accept().await?.0)?),
                Peer::Unix,
            )),
        }
    }
}

/// Waits until `stream` has bytes to read, or is closed. Readiness alone
/// can be spurious (a new socket is reported readable at once), so each
/// time it is checked with a peek, which reads nothing.
async fn first_bytes(stream: &Conn) -> std::io::Result<()> {
    use std::os::fd::{AsFd, AsRawFd};
    use tokio::io::Interest;
    use tokio_util::either::Either;
    fn peek(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<usize> {
        let flags = nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT;
        nix::sys::socket::recv(fd.as_raw_fd(), &mut [0u8; 1], flags).map_err(std::io::Error::from)
    }
    loop {
        let peeked = match stream {
            Either::Left(s) => {
                s.readable().await?;
                s.try_io(Interest::READABLE, || peek(s.as_fd()))
            }
            Either::Right(s) => s.read_with(peek).await,
        };
        match peeked {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
            Ok(_) => return Ok(()),
        }
    }
}

/// State shared by every connection and call.
#[derive(Debug)]
pub struct AppState {
    /// The validated configuration.
    pub cfg: Config,
    /// Engines and the pre-rendered greeting.
    pub engines: pipeline::Engines,
    /// The `X-App-Signature` value, ready to insert.
    pub signature_header: hyper::header::HeaderValue,
    /// Wall-clock start, for `/version`.
    pub started_at: SystemTime,
    /// Monotonic start.
    pub started: Instant,
    /// Calls in progress; shutdown waits on it.
    pub calls: TaskTracker,
    /// Cancelled when the shutdown grace runs out: calls close with 1001.
    pub calls_cancel: CancellationToken,
    /// Connection counter, to name calls before their `start` arrives.
    pub next_conn: AtomicU64,
    /// A permit per call in progress (`cfg.max_calls` in all), held while
    /// the call's connection is open.
    pub call_slots: Arc<tokio::sync::Semaphore>,
    /// As many again for calls that have ended and wait for their
    /// transcriptions (the audio they hold stays bounded); an ended call
    /// that finds none writes its record at once.
    pub finishing_slots: Arc<tokio::sync::Semaphore>,
    /// Upgrades refused because `cfg.max_calls` calls were in progress.
    pub calls_refused: AtomicU64,
    /// Calls whose connection is open (`/version`'s `calls_active`).
    pub calls_connected: AtomicU64,
    /// The outbound pacing clock every call shares.
    pub pacer: Arc<pacer::Pacer>,
}

/// Serves until `shutdown` is cancelled, then stops accepting, lets open
/// calls finish for `cfg.shutdown_grace`, closes the rest, and returns.
///
/// # Errors
/// [`WorkerError`] when the greeting cannot be rendered or the data dir
/// cannot be created.
pub async fn run(
    listener: Listener,
    cfg: Config,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let addr = listener.describe().map_err(|source| WorkerError::Io {
        about: "reading listener address",
        source,
    })?;
    let (pacer, _pacer_task) = pacer::Pacer::start().map_err(|source| WorkerError::Io {
        about: "starting the pacing timer",
        source,
    })?;
    // The runtime's workers, this thread and the pacer are all the threads
    // there are yet: they move the frames. Threads started from here on
    // (the blocking pool, where the speech engines' work runs) keep normal
    // scheduling, see `crate::sched`.
    if cfg.realtime_priority > 0 {
        crate::sched::apply_to_process(cfg.realtime_priority);
    }
    tokio::fs::create_dir_all(cfg.data_dir.join("calls"))
        .await
        .map_err(|source| WorkerError::Io {
            about: "creating data dir",
            source,
        })?;
    let cfg_for_engines = cfg.clone();
    let engines =
        tokio::task::spawn_blocking(move || pipeline::Engines::build(&cfg_for_engines)).await??;
    let signature_header = hyper::header::HeaderValue::from_str(&cfg.app_signature)
        .unwrap_or_else(|_| hyper::header::HeaderValue::from_static("invalid"));
    let call_slots = Arc::new(tokio::sync::Semaphore::new(cfg.max_calls));
    let finishing_slots = Arc::new(tokio::sync::Semaphore::new(cfg.max_calls));
    let state = Arc::new(AppState {
        cfg,
        engines,
        signature_header,
        started_at: SystemTime::now(),
        started: Instant::now(),
        calls: TaskTracker::new(),
        calls_cancel: CancellationToken::new(),
        next_conn: AtomicU64::new(1),
        call_slots,
        finishing_slots,
        calls_refused: AtomicU64::new(0),
        calls_connected: AtomicU64::new(0),
        pacer,
    });
    info!(
        addr = %addr,
        signature = %state.cfg.app_signature,
        tts = state.engines.tts.name(),
        stt = state.engines.stt.name(),
        "listening on {addr}"
    );

    if let Some((from, to)) = crate::process::raise_fd_limit() {
        info!(from, to, "open files limit raised from {from} to {to}");
    }
    tokio::spawn(crate::logging::report_dropped(
        std::time::Duration::from_secs(5),
        shutdown.clone(),
    ));
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // A connection that sends no complete request head in time, idle or
    // half sent, is closed: the worker may face clients with no proxy in
    // front (batond closes such clients itself). hyper's timer runs once it
    // knows the protocol, from the first bytes; until then, see below.
    let header_timeout = state.cfg.header_timeout;
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout);
    let builder = Arc::new(builder);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off briefly, keep serving.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let st = Arc::clone(&state);
                let svc = service_fn(move |req| http::handle(Arc::clone(&st), peer, req));
                let (builder, watcher, stop) = (Arc::clone(&builder), graceful.watcher(), shutdown.clone());
                tokio::spawn(async move {
                    // The first bytes, within the header timeout.
                    tokio::select! {
                        r = tokio::time::timeout(header_timeout, first_bytes(&stream)) => {
                            if r.is_err() {
                                debug!(peer = %peer, "closing a connection that sent nothing");
                                return;
                            }
                        }
                        () = stop.cancelled() => return,
                    }
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                    if let Err(e) = watcher.watch(conn.into_owned()).await {
                        debug!(peer = %peer, error = %e, "connection ended with error");
                    }
                });
            }
            () = shutdown.cancelled() => break,
        }
    }
    drop(listener);
    info!(
        grace_ms = state.cfg.shutdown_grace.as_millis() as u64,
        calls = state.calls.len(),
        "shutting down: no longer accepting"
    );
    state.calls.close();
    let http_done = tokio::time::timeout(state.cfg.shutdown_grace, graceful.shutdown());
    let calls_done = tokio::time::timeout(state.cfg.shutdown_grace, state.calls.wait());
    let (http_res, calls_res) = tokio::join!(http_done, calls_done);
    if http_res.is_err() {
        warn!("http connections still open after grace");
    }
    if calls_res.is_err() {
        warn!(
            calls = state.calls.len(),
            "grace over: closing remaining calls"
        );
        state.calls_cancel.cancel();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), state.calls.wait()).await;
    }
    info!("stopped");
    Ok(())
}
