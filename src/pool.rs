//! Keep-alive connections from the proxy to one worker.
//!
//! Each [`Upstream`](crate::router::Upstream) owns one pool, so a worker's
//! idle connections die with it and never outlive a generation. Connections
//! are plain HTTP/1.1, which keeps the proxy lean: no HTTP/2 machinery is
//! linked into `batond`. A bodiless request that asks for no upgrade goes
//! through [`crate::h1`]; any other through hyper's client
//! (`hyper::client::conn::http1`), to which an idle lean connection is
//! handed over when such a request takes it (one pool holds both kinds).
//! Each front thread (see [`crate::runtime`]) keeps idle connections of
//! its own: a connection belongs to the event loop that made it.

use std::cell::Cell;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::TrySendError;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;

use crate::endpoint::{Endpoint, Stream};
use crate::h1::LeanConn;

/// The error type of proxied bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Idle connections kept per worker.
const MAX_IDLE: usize = 256;
/// The most a connection buffers, each way, on either side of the proxy
/// (hyper's default is about 400 KiB): a request head that is still
/// incomplete once this much has arrived gets 431 (one that arrives whole
/// in a read may be up to about twice this), as nginx and HAProxy refuse
/// heads of 8-16 KiB. Below glibc's
/// 128 KiB mmap threshold, so a buffer that grew for a large head or body
/// never leaves malloc keeping buffers that size for good.
pub const MAX_BUF: usize = 64 * 1024;
/// How long a connect to a loopback worker may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a request could not be sent to a worker.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made (refused, timed out): the request never
    /// left, so it may go to another worker.
    #[error("{0}")]
    Connect(std::io::Error),
    /// No connection could be made because batond itself is short of
    /// descriptors or memory (see [`crate::process::short_of_resources`]):
    /// the worker is not at fault, and the request may wait for the
    /// shortage to pass.
    #[error("batond is short of resources: {0}")]
    Short(std::io::Error),
    /// The exchange failed after the connection was made.
    #[error("{0}")]
    Http(#[from] hyper::Error),
    /// A bodiless exchange (see [`crate::h1`]) failed after the connection
    /// was made.
    #[error("{0}")]
    Lean(#[from] crate::h1::Error),
}

/// A connection taken from a pool for one request.
#[derive(Debug)]
pub enum Conn {
    /// Through hyper's client: requests with a body, and upgrades.
    Hyper(UpstreamConn),
    /// Through [`crate::h1`]: a bodiless request.
    Lean(Box<LeanConn>),
}

/// One keep-alive connection to a worker: the request handle and the
/// connection state machine, driven by whichever task uses it.
///
/// No task per connection: the request's own task writes the request, reads
/// the response and its body by polling the connection inline, so a
/// proxied request costs no task hand-offs. An upgrade request hands the
/// connection to a task of its own (the upgraded bytes must flow after the
/// exchange), see [`UpstreamConn::send`].
pub struct UpstreamConn {
    sender: SendRequest<ReqBody>,
    driver: Driver,
}

enum Driver {
    /// Polled by the task holding the connection (boxed: it is large, and
    /// moves in and out of the pool with every request).
    Inline(Box<http1::Connection<TokioIo<Stream>, ReqBody>>),
    /// Polled by a task of its own (an upgrade was asked for).
    Spawned,
    /// The connection has ended.
    Done,
}

impl std::fmt::Debug for UpstreamConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let driver = match self.driver {
            Driver::Inline(_) => "inline",
            Driver::Spawned => "spawned",
            Driver::Done => "done",
        };
        f.debug_struct("UpstreamConn")
            .field("driver", &driver)
            .finish_non_exhaustive()
    }
}

impl UpstreamConn {
    /// Moves the connection's I/O: reads what the worker sent, writes what
    /// is queued. Wakes `cx` when there is more to do.
    pub fn drive(&mut self, cx: &mut Context<'_>) {
        if let Driver::Inline(conn) = &mut self.driver
            && Pin::new(&mut **conn).poll(cx).is_ready()
        {
            self.driver = Driver::Done;
        }
    }

    /// Sends `req`: queues it on the connection (a request that asks for
    /// an upgrade hands the connection to a task of its own first: the
    /// upgraded bytes flow after the exchange has ended). The future it
    /// gives, polled with [`UpstreamConn::poll_answer`], is the response
    /// head.
    ///
    /// Two steps, not one `async fn`: the caller keeps the one future
    /// pinned where it is, instead of a future that holds the request and
    /// then this one beside it (each request moves its handler's state,
    /// so its size is paid for per request).
    pub fn send(
        &mut self,
        req: Request<ReqBody>,
    ) -> impl Future<Output = Result<Response<Incoming>, TrySendError<Request<ReqBody>>>> + use<>
    {
        if req.headers().contains_key(http::header::UPGRADE) {
            self.spawn_driver();
        }
        self.sender.try_send_request(req)
    }

    /// Polls `answer` (from [`UpstreamConn::send`], whose error gives the
    /// request back when it was never sent), driving the connection
    /// meanwhile.
    pub fn poll_answer<F>(
        &mut self,
        mut answer: Pin<&mut F>,
        cx: &mut Context<'_>,
    ) -> Poll<F::Output>
    where
        F: Future,
    {
        if let Poll::Ready(r) = answer.as_mut().poll(cx) {
            return Poll::Ready(r);
        }
        self.drive(cx);
        answer.poll(cx)
    }

    /// The socket of an idle connection driven here, for the lean client:
    /// only when hyper holds nothing read from it.
    fn into_lean(self) -> Option<Box<LeanConn>> {
        let Driver::Inline(conn) = self.driver else {
            return None;
        };
        let parts = conn.into_parts();
        parts
            .read_buf
            .is_empty()
            .then(|| LeanConn::new(parts.io.into_inner()))
    }

    /// Lets a task of its own drive the connection, with upgrades.
    fn spawn_driver(&mut self) {
        if let Driver::Inline(conn) = std::mem::replace(&mut self.driver, Driver::Spawned) {
            tokio::spawn(async move {
                let _ = (*conn).with_upgrades().await;
            });
        }
    }

    /// Whether the connection is still open.
    fn is_open(&self) -> bool {
        !matches!(self.driver, Driver::Done) && !self.sender.is_closed()
    }

    /// Drives the connection, then: ready for a request (true), ended
    /// (false), or still busy with its last exchange (pending).
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        self.drive(cx);
        if !self.is_open() {
            return Poll::Ready(false);
        }
        self.sender.poll_ready(cx).map(|r| r.is_ok())
    }

    /// One poll with the caller's waker: takes in an EOF the worker sent
    /// while the connection sat idle, then asks whether it can take a
    /// request now.
    async fn ready_now(&mut self) -> bool {
        std::future::poll_fn(|cx| Poll::Ready(self.poll_idle(cx) == Poll::Ready(true))).await
    }
}

/// How many front threads (each with a runtime of its own) serve clients;
/// 0 when the daemon's one runtime does.
static SHARDS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// 1 + the front thread this is, 0 on any other thread.
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// Says how many front threads there are: each pool made from now on keeps
/// idle connections apart for each (a connection belongs to the runtime
/// that made it).
pub fn set_shards(n: usize) {
    SHARDS.store(n, Ordering::Relaxed);
}

/// Marks the calling thread as front thread `i` (from 0).
pub fn enter_shard(i: usize) {
    SHARD.with(|s| s.set(i + 1));
}

/// A worker's idle keep-alive connections.
#[derive(Debug)]
pub struct Pool {
    endpoint: Endpoint,
    /// One set for each front thread, and one for the others.
    idle: Box<[Mutex<Idle>]>,
    /// How long a connection may sit idle and still be used again.
    keepalive: Duration,
}

#[derive(Debug, Default)]
struct Idle {
    /// Oldest first, each with when it went idle.
    conns: Vec<(Conn, Duration)>,
    /// Set once the worker no longer takes new requests: connections are
    /// closed when their last exchange ends, not kept.
    closed: bool,
}

impl Pool {
    /// An empty pool for the worker at `endpoint`, whose connections are
    /// used again for up to `keepalive` of idleness.
    pub fn new(endpoint: Endpoint, keepalive: Duration) -> Arc<Pool> {
        Arc::new(Pool {
            endpoint,
            idle: (0..=SHARDS.load(Ordering::Relaxed))
                .map(|_| Mutex::new(Idle::default()))
                .collect(),
            keepalive,
        })
    }

    /// An idle connection ready for a request, or a new one: for a
    /// bodiless request that asks for no upgrade (`lean`), one hyper's
    /// client does not hold if there is one; else one hyper's client
    /// holds (a lean one is handed over to it).
    ///
    /// A connection idle for longer than the keep-alive timeout is not
    /// used: a worker that closes idle connections itself (Node's 5 s,
    /// gunicorn's 2 s) may be closing it at this very moment, and a request
    /// that meets that close cannot be sent again unless it is idempotent.
    /// A new loopback connection costs far less than such a 502.
    ///
    /// # Errors
    /// [`SendError`] when no connection can be made.
    pub async fn checkout(&self, lean: bool) -> Result<Conn, SendError> {
        // Newest first: the most recently used connection is the likeliest
        // to be alive. One that is closed or not ready is dropped.
        while let Some(conn) = self.take_fresh() {
            match conn {
                Conn::Hyper(mut conn) => {
                    if conn.ready_now().await {
                        return Ok(Conn::Hyper(conn));
                    }
                }
                Conn::Lean(mut conn) => {
                    if !conn.is_idle() {
                        continue;
                    }
                    if lean {
                        return Ok(Conn::Lean(conn));
                    }
                    // Handed over to hyper's client; one that cannot be is
                    // dropped like a closed one (the error is not the
                    // worker refusing connections).
                    if let Some(io) = (*conn).into_io()
                        && let Ok(conn) = handshake(io).await
                    {
                        return Ok(Conn::Hyper(conn));
                    }
                }
            }
        }
        let stream = self.connect().await?;
        if lean {
            return Ok(Conn::Lean(LeanConn::new(stream)));
        }
        Ok(Conn::Hyper(handshake(stream).await?))
    }

    /// A connection for a lean exchange ([`crate::h1::send`]): an idle one
    /// of hyper's client that sits clean is taken over, else a new one.
    ///
    /// # Errors
    /// [`SendError`] when no connection can be made.
    pub async fn checkout_lean(&self) -> Result<Box<LeanConn>, SendError> {
        match self.checkout(true).await? {
            Conn::Lean(conn) => return Ok(conn),
            Conn::Hyper(conn) => {
                if let Some(conn) = conn.into_lean() {
                    return Ok(conn);
                }
            }
        }
        Ok(LeanConn::new(self.connect().await?))
    }

    async fn connect(&self) -> Result<Stream, SendError> {
        tokio::time::timeout(CONNECT_TIMEOUT, self.endpoint.connect())
            .await
            .map_err(|_| {
                SendError::Connect(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connect timed out",
                ))
            })?
            .map_err(|e| {
                if crate::process::short_of_resources(&e) {
                    SendError::Short(e)
                } else {
                    SendError::Connect(e)
                }
            })
    }

    /// Closes the idle connections and every one given back from now on:
    /// the worker is draining, and a connection a pinned WebSocket keeps
    /// its generation alive for would only hold memory.
    pub fn close(&self) {
        for idle in &self.idle {
            if let Ok(mut idle) = idle.lock() {
                idle.closed = true;
                idle.conns = Vec::new();
            }
        }
    }

    /// The idle connections of the calling thread's runtime.
    fn mine(&self) -> &Mutex<Idle> {
        let i = SHARD.with(Cell::get);
        &self.idle[i.min(self.idle.len() - 1)]
    }

    /// Gives a connection back once its response has been read. One that
    /// is not idle yet (the worker answered before it had the whole request
    /// body, which is still being sent) is driven to the end of its
    /// exchange on a task of its own first, as a spawned connection would
    /// have been. That task takes `busy` (what counts the request as in
    /// flight) and lets it go when the exchange is over: a drain waits
    /// for the upload the worker is still reading.
    pub fn checkin<B: Send + 'static>(
        self: &Arc<Self>,
        mut conn: UpstreamConn,
        busy: &mut Option<B>,
    ) {
        if !conn.is_open() {
            return;
        }
        if conn.ready_now().now_or_never() == Some(true) {
            self.keep(Conn::Hyper(conn));
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let pool = self.clone();
        let busy = busy.take();
        rt.spawn(async move {
            if std::future::poll_fn(|cx| conn.poll_idle(cx)).await {
                pool.keep(Conn::Hyper(conn));
            }
            drop(busy);
        });
    }

    /// Gives back a lean connection whose answer has been read whole.
    pub fn keep_lean(&self, conn: Box<LeanConn>) {
        self.keep(Conn::Lean(conn));
    }

    fn keep(&self, conn: Conn) {
        if let Ok(mut idle) = self.mine().lock()
            && !idle.closed
            && idle.conns.len() < MAX_IDLE
        {
            idle.conns.push((conn, coarse_now()));
        }
    }

    /// How many idle connections wait, of each kind (hyper's, lean).
    #[cfg(test)]
    pub(crate) fn idle_kinds(&self) -> (usize, usize) {
        let idle = self.mine().lock().expect("pool lock");
        let lean = idle
            .conns
            .iter()
            .filter(|(c, _)| matches!(c, Conn::Lean(_)))
            .count();
        (idle.conns.len() - lean, lean)
    }

    /// The newest idle connection, unless it has been idle too long (then
    /// all are, and all are dropped).
    fn take_fresh(&self) -> Option<Conn> {
        let mut idle = self.mine().lock().ok()?;
        let (conn, since) = idle.conns.pop()?;
        if coarse_now().saturating_sub(since) > self.keepalive {
            idle.conns.clear();
            return None;
        }
        Some(conn)
    }
}

/// Puts hyper's HTTP/1.1 client on a connection.
async fn handshake(stream: Stream) -> Result<UpstreamConn, SendError> {
    let (sender, conn) = http1::Builder::new()
        .writev(false)
        .max_buf_size(MAX_BUF)
        .handshake(TokioIo::new(stream))
        .await?;
    Ok(UpstreamConn {
        sender,
        driver: Driver::Inline(Box::new(conn)),
    })
}

/// The monotonic clock as the kernel last ticked it: a few ms coarse, and
/// cheaper to read than the exact one, on every request.
fn coarse_now() -> Duration {
    use nix::time::{ClockId, clock_gettime};
    clock_gettime(ClockId::CLOCK_MONOTONIC_COARSE).map_or(Duration::ZERO, Duration::from)
}

/// The body of a worker's answer: hyper's (`Left`), or a lean exchange's
/// (`Right`); either one's error boxed.
pub type WorkerBody = http_body_util::Either<Incoming, crate::h1::LeanBody>;

/// The body of a request to a worker: the client's, or none (a request
/// sent again after its first attempt was reset).
#[derive(Debug)]
pub enum ReqBody {
    /// The client's body, streamed, and what watches it come in.
    Client(Incoming, BodyWatch),
    /// No body.
    Empty,
}

/// How the request bodies of one client connection come in: how many the
/// proxy is waiting on the client for, and how many frames have arrived.
/// With these the proxy tells a client that stalls in the middle of a body
/// (a slowloris on the body) from one that waits for a slow answer, or
/// whose upload waits for a slow worker to read it.
#[derive(Debug, Default)]
pub struct BodyProgress {
    /// Bodies whose last read found no data from the client.
    pub waiting: AtomicU64,
    /// Frames read, over all bodies.
    pub frames: AtomicU64,
    /// Bodies that failed on the client's side (bad framing, the client
    /// gone): a request that fails after one did is the client's fault.
    pub errors: AtomicU64,
}

/// Keeps one body's part of [`BodyProgress`] up to date, until its end (or
/// until it is dropped unfinished).
#[derive(Debug)]
pub struct BodyWatch {
    progress: Option<Arc<BodyProgress>>,
    waiting: bool,
}

impl BodyWatch {
    /// Watches a body that is `done` already (no body) or not.
    pub fn new(progress: &Arc<BodyProgress>, done: bool) -> BodyWatch {
        BodyWatch {
            progress: (!done).then(|| progress.clone()),
            waiting: false,
        }
    }

    fn read(&mut self, frame: bool, waiting: bool) {
        let Some(p) = &self.progress else { return };
        if frame {
            p.frames.fetch_add(1, Ordering::Relaxed);
        }
        if waiting != self.waiting {
            self.waiting = waiting;
            if waiting {
                p.waiting.fetch_add(1, Ordering::Relaxed);
            } else {
                p.waiting.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    fn failed(&self) {
        if let Some(p) = &self.progress {
            p.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn end(&mut self) {
        self.read(false, false);
        self.progress = None;
    }
}

impl Drop for BodyWatch {
    fn drop(&mut self) {
        self.end();
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ReqBody::Client(b, watch) => {
                let r = Pin::new(&mut *b).poll_frame(cx);
                match &r {
                    Poll::Ready(Some(Ok(_))) if !b.is_end_stream() => watch.read(true, false),
                    Poll::Ready(Some(Err(_))) => {
                        watch.failed();
                        watch.end();
                    }
                    Poll::Ready(_) => watch.end(),
                    Poll::Pending => watch.read(false, true),
                }
                r.map(|o| o.map(|r| r.map_err(Into::into)))
            }
            ReqBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Client(b, _) => b.is_end_stream(),
            ReqBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Client(b, _) => b.size_hint(),
            ReqBody::Empty => SizeHint::with_exact(0),
        }
    }
}
