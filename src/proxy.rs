//! The front proxy: the public listener, HTTP/1.1 with keep-alive,
//! bodies streamed both ways, WebSocket and any other `Upgrade` passed
//! through and pinned to the generation that accepted it.
//!
//! Every request goes to the upstream active when it arrives (see
//! [`crate::router`]). While there is none (a crash restart), it waits up to
//! `hold_timeout` and then gets 503 with `Retry-After`; so does one batond
//! cannot connect to the worker for want of its own descriptors or memory
//! (the worker is not taken for dead). An upstream that fails
//! mid-request gives 502 with a short reason; a malformed request gets 400
//! from hyper (431 or 414 for a head over the limits), is counted and
//! logged with what was wrong, and the listener lives on.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::h1::MAX_HEADER_LINES;
use crate::headers;
pub use crate::pool::BoxError;
use crate::pool::{
    BodyProgress, BodyWatch, Conn, Pool, ReqBody, SendError, UpstreamConn, WorkerBody,
};
use crate::router::{Router, Ticket, Upstream};

mod front;

/// The body of every response the proxy sends: a worker's, streamed, or a
/// short one the proxy made itself. An enum rather than a boxed trait
/// object: no allocation per response.
pub enum ProxyBody {
    /// A worker's response body.
    Upstream(Guarded),
    /// A response the proxy made (502, 503, a 101's empty body).
    Local(Full<Bytes>),
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Upstream(g) => Pin::new(g).poll_frame(cx),
            ProxyBody::Local(f) => Pin::new(f)
                .poll_frame(cx)
                .map(|o| o.map(|r| r.map_err(|e: Infallible| match e {}))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream(g) => g.is_end_stream(),
            ProxyBody::Local(f) => f.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream(g) => g.size_hint(),
            ProxyBody::Local(f) => f.size_hint(),
        }
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct ProxyMetrics {
    /// Requests received.
    pub requests: AtomicU64,
    /// 502s the proxy made (upstream failed).
    pub bad_gateway: AtomicU64,
    /// 503s the proxy made (no healthy worker, or batond short of
    /// descriptors, within the hold time).
    pub unavailable: AtomicU64,
    /// 504s the proxy made (the worker sent no answer within the idle
    /// timeout).
    pub gateway_timeout: AtomicU64,
    /// Responses the worker broke off after their head (a cut body).
    pub cut_responses: AtomicU64,
    /// Upgraded connections established.
    pub upgrades: AtomicU64,
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Requests refused before any handler saw them: not HTTP/1.x, or a
    /// head over the limits (hyper answers 400, 414 or 431 and closes; an
    /// HTTP/2 preface is closed without an answer).
    pub malformed: AtomicU64,
}

/// The proxy's time limits (see [`crate::config::DaemonConfig`]).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// How long a request waits for a healthy worker before a 503.
    pub hold: Duration,
    /// How long a client connection may be idle or send a request head.
    pub header: Duration,
    /// How long a request in progress, or a half-closed upgraded
    /// connection, may move no byte.
    pub idle: Duration,
}

impl Timeouts {
    /// The proxy's part of a daemon config.
    pub fn of(d: &crate::config::DaemonConfig) -> Timeouts {
        Timeouts {
            hold: d.hold_timeout,
            header: d.header_timeout,
            idle: d.idle_timeout,
        }
    }
}

/// The proxy's shared state.
#[derive(Debug)]
pub struct Proxy {
    router: Arc<Router>,
    hold_ms: AtomicU64,
    header_ms: AtomicU64,
    idle_ms: AtomicU64,
    /// Counters for `/metrics`.
    pub metrics: Arc<ProxyMetrics>,
    /// Malformed requests said in the log: at most one line a second.
    malformed_log: std::sync::Mutex<LogLimit>,
    /// Connections to a worker batond could not make for want of its own
    /// descriptors or memory: at most one line a second too.
    short_log: std::sync::Mutex<LogLimit>,
}

// === impl Proxy ===

impl Proxy {
    /// A proxy routing through `router` within the time limits `t`.
    pub fn new(router: Arc<Router>, t: Timeouts) -> Arc<Proxy> {
        Arc::new(Proxy {
            router,
            hold_ms: AtomicU64::new(millis(t.hold)),
            header_ms: AtomicU64::new(millis(t.header)),
            idle_ms: AtomicU64::new(millis(t.idle)),
            metrics: Arc::default(),
            malformed_log: std::sync::Mutex::default(),
            short_log: std::sync::Mutex::default(),
        })
    }

    /// Changes the time limits (config reload); connections accepted
    /// before keep the header and idle limits they started with.
    pub fn set_timeouts(&self, t: Timeouts) {
        self.hold_ms.store(millis(t.hold), Ordering::Relaxed);
        self.header_ms.store(millis(t.header), Ordering::Relaxed);
        self.idle_ms.store(millis(t.idle), Ordering::Relaxed);
    }

    fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_ms.load(Ordering::Relaxed))
    }

    fn hold(&self) -> Duration {
        Duration::from_millis(self.hold_ms.load(Ordering::Relaxed))
    }

    fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.header_ms.load(Ordering::Relaxed))
    }

    /// Serves `listener` until `token` is cancelled, then lets open
    /// connections finish up to `grace`. Each connection is served on the
    /// next runtime of `shards` in turn (the front threads), or on this
    /// one when there are none.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shards: Vec<tokio::runtime::Handle>,
        token: CancellationToken,
        grace: Duration,
    ) {
        let mut next = 0usize;
        let mut builder = hyper::server::conn::http1::Builder::new();
        // No per-request header timer (hyper's costs a timer and a clock
        // read per request): each connection's task checks for progress
        // instead, see `watch_connection`.
        builder
            .keep_alive(true)
            // A FIN after the request is a half-close, not a hang-up (as
            // HAProxy has it by default): the answer still goes out. A
            // client that is gone is seen when the answer is written. It
            // also spares a read per request while the worker answers,
            // which would set up a fresh 8 KiB read buffer each time (the
            // old one is held by the request in flight).
            .half_close(true)
            .writev(false)
            .header_read_timeout(None)
            .max_buf_size(crate::pool::MAX_BUF);
        let conns = TaskTracker::new();
        let stop = Arc::new(Stop::default());
        // Failed accepts since the last warning, and when that was.
        let (mut failed, mut warned) = (0u64, None::<tokio::time::Instant>);
        loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning,
                        // and say so once a second, not at every try.
                        failed += 1;
                        if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                            tracing::warn!(error = %e, failed, "accept failed; retrying every 50 ms");
                            (failed, warned) = (0, Some(tokio::time::Instant::now()));
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = token.cancelled() => break,
            };
            match shards.get(next % shards.len().max(1)) {
                None => {
                    conns.spawn(self.accepted(stream, peer, &builder, &stop));
                }
                Some(shard) => {
                    next = next.wrapping_add(1);
                    // Moved to the front thread's runtime: its poller
                    // watches the socket from now on.
                    let (this, builder, stop) = (self.clone(), builder.clone(), stop.clone());
                    let moved = stream.into_std().map(|std| {
                        shard.spawn(conns.track_future(async move {
                            match tokio::net::TcpStream::from_std(std) {
                                Ok(stream) => this.accepted(stream, peer, &builder, &stop).await,
                                Err(e) => not_handed(&peer, &e),
                            }
                        }))
                    });
                    if let Err(e) = moved {
                        not_handed(&peer, &e);
                    }
                }
            }
        }
        drop(listener);
        stop.fire();
        conns.close();
        if tokio::time::timeout(grace, conns.wait()).await.is_err() {
            tracing::warn!(?grace, "connections still open at shutdown; closing them");
        }
    }

    /// Serves one accepted client connection to its end.
    fn accepted(
        self: &Arc<Self>,
        stream: tokio::net::TcpStream,
        peer: std::net::SocketAddr,
        builder: &hyper::server::conn::http1::Builder,
        stop: &Arc<Stop>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let _ = stream.set_nodelay(true);
        keepalive(&stream);
        self.metrics.connections.fetch_add(1, Ordering::Relaxed);
        // Made once per connection.
        let client = HeaderValue::from_str(&peer.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        let activity = Arc::new(Activity::default());
        let seen = activity.clone();
        let stream = FirstByte {
            io: stream,
            activity: Some(activity.clone()),
        };
        // Asks the connection to close: after the request in progress,
        // if any (see `connection`).
        let shut = Arc::new(AtomicBool::new(false));
        let conn = connection(
            self.clone(),
            stream,
            client,
            activity,
            shut.clone(),
            builder.clone(),
        );
        watch_connection(
            conn,
            move |_| shut.store(true, Ordering::Relaxed),
            seen,
            (self.header_timeout(), self.idle_timeout()),
            stop.clone(),
            (peer, self.clone()),
        )
    }

    /// A client connection that ended on a request hyper could not parse
    /// (it has answered it itself, with an empty body): counted, and said
    /// in the log with the client's address and what was wrong, at most
    /// once a second (a scanner's stream of them is one line a second,
    /// with how many came since the line before).
    fn refused_malformed(
        &self,
        peer: &std::net::SocketAddr,
        e: &hyper::Error,
        hint: Option<&'static str>,
    ) {
        self.metrics.malformed.fetch_add(1, Ordering::Relaxed);
        let due = self
            .malformed_log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .due(std::time::Instant::now());
        let Some(more) = due else { return };
        // Fields that are `None` are left out of the line.
        let unlogged_before = (more > 0).then_some(more);
        tracing::info!(%peer, error = %e, hint, unlogged_before, "refused a malformed request");
    }

    fn bad_gateway(&self, upstream: &Upstream, e: &SendError) -> Response<ProxyBody> {
        self.metrics.bad_gateway.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(generation = upstream.generation, error = %e, "upstream request failed");
        text(
            StatusCode::BAD_GATEWAY,
            &format!(
                "bad gateway: worker of generation {} failed: {}\n",
                upstream.generation,
                reason(e)
            ),
        )
    }

    /// A 502 for a worker's answer that cannot be passed on (`why` is the
    /// body), counted with the other 502s.
    fn bad_answer(&self, why: &str) -> Response<ProxyBody> {
        self.metrics.bad_gateway.fetch_add(1, Ordering::Relaxed);
        refuse(StatusCode::BAD_GATEWAY, why)
    }

    fn gateway_timeout(&self, upstream: &Upstream) -> Response<ProxyBody> {
        self.metrics.gateway_timeout.fetch_add(1, Ordering::Relaxed);
        let idle = self.idle_timeout();
        tracing::warn!(
            generation = upstream.generation,
            ?idle,
            "worker sent no answer in time"
        );
        refuse(
            StatusCode::GATEWAY_TIMEOUT,
            &format!(
                "gateway timeout: worker of generation {} sent no answer within {} s\n",
                upstream.generation,
                idle.as_secs_f64()
            ),
        )
    }

    fn unavailable(&self) -> Response<ProxyBody> {
        self.try_again_shortly("no healthy worker")
    }

    /// A 503 with `Retry-After` saying `why`, counted with the others.
    fn try_again_shortly(&self, why: &str) -> Response<ProxyBody> {
        self.metrics.unavailable.fetch_add(1, Ordering::Relaxed);
        let mut resp = text(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("{why}; try again shortly\n"),
        );
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        resp
    }

    /// batond could not connect to the worker for want of its own
    /// descriptors or memory (`e`): the worker is not at fault, and the
    /// shortage passes as connections close. The request waits for it as
    /// it would for a healthy worker: up to the hold time from its first
    /// such failure (`since`). True when it is to be tried again; false
    /// once the hold time is over (then [`Proxy::short`] answers).
    async fn wait_short(&self, since: &mut Option<tokio::time::Instant>, e: &SendError) -> bool {
        let now = tokio::time::Instant::now();
        let deadline = *since.get_or_insert(now) + self.hold();
        let due = self
            .short_log
            .lock()
            .ok()
            .and_then(|mut l| l.due(std::time::Instant::now()));
        if let Some(unlogged_before) = due {
            tracing::warn!(error = %e, unlogged_before, "cannot connect to the worker: batond is short of resources; requests wait for them up to the hold time");
        }
        if now >= deadline {
            return false;
        }
        tokio::time::sleep_until(deadline.min(now + SHORT_RETRY)).await;
        true
    }

    /// The 503 for a request that waited out the hold time for batond's
    /// own resources (see [`Proxy::wait_short`]).
    fn short(&self, e: &SendError) -> Response<ProxyBody> {
        self.try_again_shortly(&format!("service unavailable: {e}"))
    }

    /// Where a request reset by `upstream`'s worker goes again: to the
    /// worker that replaces it when it died (the supervisor takes it out
    /// within `CRASH_GRACE`), else to the active one (maybe itself).
    async fn after_reset(&self, upstream: &Arc<Upstream>) -> Option<(Arc<Upstream>, Ticket)> {
        if self.router.leaves(upstream, CRASH_GRACE).await {
            self.router.acquire_other(Some(upstream), self.hold()).await
        } else {
            self.router.acquire(self.hold()).await
        }
    }

    async fn handle(
        &self,
        req: Request<Incoming>,
        client: &HeaderValue,
        activity: &Activity,
    ) -> Response<ProxyBody> {
        let bodies = &activity.bodies;
        self.metrics.requests.fetch_add(1, Ordering::Relaxed);
        if let Err(why) = check_target(&req) {
            return refuse(StatusCode::BAD_REQUEST, &format!("bad request: {why}\n"));
        }
        // The host the request is for (RFC 9112 §3.2): the authority of an
        // absolute-form target, which then replaces `Host`, else the one
        // `Host` line an HTTP/1.1 request must carry.
        let host = match request_host(&req) {
            Ok(h) => h,
            Err(why) => return refuse(StatusCode::BAD_REQUEST, &format!("bad request: {why}\n")),
        };
        if req.method() == http::Method::CONNECT {
            return refuse(
                StatusCode::NOT_IMPLEMENTED,
                "not implemented: CONNECT (batond is a reverse proxy)\n",
            );
        }
        // hyper takes off the chunked framing only; a body coded besides
        // (gzip, say) would reach the worker unlabelled (RFC 9112 §6.1).
        if req.headers().contains_key(header::TRANSFER_ENCODING)
            && let Some(codings) = headers::codings_besides_chunked(req.headers())
        {
            return refuse(
                StatusCode::NOT_IMPLEMENTED,
                &format!("not implemented: transfer coding {codings} (only chunked is)\n"),
            );
        }
        let http10 = req.version() == http::Version::HTTP_10;
        let Some((upstream, ticket)) = self.router.acquire(self.hold()).await else {
            return self.unavailable();
        };
        let Forward {
            mut req,
            replay,
            upgrade,
            inbound_upgrade,
            body_errors,
        } = forward(req, client, host, bodies);
        let (mut upstream, mut ticket) = (upstream, ticket);
        let (mut refused, mut sent_again, mut short_since) = (0, false, None);
        let (resp, conn) = loop {
            // What failed is decided in a block without waits, and the waits
            // that follow come after it: the answer, the error and the
            // request rebuilt would otherwise stay in the handler's state
            // through them (which each request moves).
            let lean = upgrade.is_none() && req.body().is_end_stream();
            let outcome = match upstream.pool.checkout(lean).await {
                Ok(Conn::Hyper(mut conn)) => {
                    let answer = {
                        let mut answer = std::pin::pin!(conn.send(req));
                        let exchange =
                            std::future::poll_fn(|cx| conn.poll_answer(answer.as_mut(), cx));
                        until_idle(std::pin::pin!(exchange), activity).await
                    };
                    match answer {
                        // Nothing moved for the idle timeout (see
                        // `watch_connection`): the worker hangs.
                        None => return self.gateway_timeout(&upstream),
                        Some(Ok(resp)) => Outcome::Answer(resp.map(WorkerBody::Left), Some(conn)),
                        // Not sent (the connection closed first): the
                        // request comes back whole, body included.
                        Some(Err(mut e)) => match e.take_message() {
                            Some(back) => {
                                Outcome::Back(SendError::Http(e.into_error()), back, false)
                            }
                            None => Outcome::Failed(SendError::Http(e.into_error())),
                        },
                    }
                }
                Ok(Conn::Lean(conn)) => {
                    let exchange = crate::h1::exchange(conn, req, &upstream.pool);
                    match until_idle(std::pin::pin!(exchange), activity).await {
                        None => return self.gateway_timeout(&upstream),
                        Some(Ok(resp)) => Outcome::Answer(resp.map(WorkerBody::Right), None),
                        Some(Err((e, Some(back)))) => {
                            Outcome::Back(SendError::Lean(e), back, false)
                        }
                        Some(Err((e, None))) => Outcome::Failed(SendError::Lean(e)),
                    }
                }
                // Refused: the request never left.
                Err(e) => Outcome::Back(e, req, true),
            };
            let attempt = match outcome {
                Outcome::Answer(resp, conn) => break (resp, conn),
                Outcome::Back(e, back, refused_conn) => {
                    req = back;
                    Attempt::Refused(e, refused_conn)
                }
                Outcome::Failed(err) => {
                    // The client's body broke (bad chunked framing, the
                    // client hung up mid-upload): the client's fault, not
                    // the worker's.
                    if bodies.errors.load(Ordering::Relaxed) != body_errors {
                        tracing::debug!(generation = upstream.generation, error = %err, "request body from the client failed");
                        return refuse(
                            StatusCode::BAD_REQUEST,
                            &format!(
                                "bad request: the request body could not be read: {}\n",
                                reason(&err)
                            ),
                        );
                    }
                    // The connection closed or was reset before any
                    // answer, by a worker that was not stopped on purpose:
                    // an idempotent request without a body may be sent
                    // again, once (RFC 9110 §9.2.2: a failed automatic
                    // retry is not retried). A worker that crashed is out
                    // of the router within moments (the supervisor hears
                    // of its exit): then the request goes to its
                    // replacement. One that lives on (a handler that
                    // failed) gets it again itself. So a request that
                    // itself crashes the worker costs two crashes, not a
                    // crash loop, and one a live worker drops is sent
                    // twice, not more. An answer that is not HTTP is no
                    // reset: never sent again. Not so either for a
                    // draining worker cut at its drain timeout.
                    match &replay {
                        Some((m, u, h))
                            if !sent_again && connection_lost(&err) && !upstream.is_retired() =>
                        {
                            sent_again = true;
                            let mut again = Request::new(ReqBody::Empty);
                            *again.method_mut() = m.clone();
                            *again.uri_mut() = u.clone();
                            *again.headers_mut() = h.clone();
                            req = again;
                            tracing::info!(generation = upstream.generation, error = %err, "sending an idempotent request again");
                            Attempt::Again
                        }
                        _ => return self.bad_gateway(&upstream, &err),
                    }
                }
            };
            let (failure, refused_conn) = match attempt {
                Attempt::Refused(failure, refused_conn) => (failure, refused_conn),
                Attempt::Again => {
                    drop(ticket);
                    let Some((u, t)) = self.after_reset(&upstream).await else {
                        return self.unavailable();
                    };
                    (upstream, ticket) = (u, t);
                    continue;
                }
            };
            if matches!(failure, SendError::Short(_)) {
                if self.wait_short(&mut short_since, &failure).await {
                    continue;
                }
                return self.short(&failure);
            }
            // The request is still ours: send it to the worker that replaces
            // this one, once the supervisor has swapped it in.
            if refused >= 3 {
                return self.bad_gateway(&upstream, &failure);
            }
            refused += 1;
            tracing::info!(generation = upstream.generation, error = %failure, "worker did not take the request; waiting for its replacement");
            drop(ticket);
            let dead = refused_conn.then_some(&upstream);
            let Some((u, t)) = self.router.acquire_other(dead, self.hold()).await else {
                return self.unavailable();
            };
            (upstream, ticket) = (u, t);
        };
        // Not sent again from here on.
        drop(replay);
        match (upgrade, inbound_upgrade) {
            (Some(proto), Some(inbound)) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                self.tunnel(resp, proto, inbound, &upstream)
            }
            // RFC 9110 §7.8, §15.2: a 101 answers an upgrade request only
            // (and never an HTTP/1.0 one, whose Upgrade is ignored).
            _ if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                self.bad_answer(SWITCHED_UNASKED)
            }
            _ => {
                let (mut parts, body) = resp.into_parts();
                // Framed again by hyper, which adds `chunked` after the
                // codings named.
                if let Some(codings) = headers::unframe_answer(&mut parts.headers) {
                    // An HTTP/1.0 client knows no transfer coding.
                    match HeaderValue::from_str(&codings) {
                        Ok(v) if !http10 => {
                            parts.headers.insert(header::TRANSFER_ENCODING, v);
                        }
                        _ => {
                            let why = format!(
                                "bad gateway: the worker's answer has transfer coding {codings}, which an HTTP/1.0 client cannot take\n"
                            );
                            return self.bad_answer(&why);
                        }
                    }
                }
                let mut body = Guarded {
                    inner: body,
                    first: None,
                    first_other: None,
                    ticket: Some(ticket),
                    conn: conn.map(|c| (c, upstream.pool.clone())),
                    done: false,
                    failed: None,
                    generation: upstream.generation,
                    metrics: Arc::clone(&self.metrics),
                };
                // What has arrived of the body is taken now: a response
                // that is then whole frees its worker connection before it
                // goes out (to a client that may be slow to take it).
                body.prefetch().await;
                Response::from_parts(parts, ProxyBody::Upstream(body))
            }
        }
    }

    /// Finishes an upgrade: checks that the worker switched to the protocol
    /// asked for, pins the connection to its generation and copies bytes
    /// both ways in a task of that generation's tracker.
    fn tunnel(
        &self,
        mut resp: Response<WorkerBody>,
        proto: HeaderValue,
        inbound: hyper::upgrade::OnUpgrade,
        upstream: &Arc<Upstream>,
    ) -> Response<ProxyBody> {
        let chosen = resp
            .headers()
            .get(header::UPGRADE)
            .filter(|c| headers::upgrade_offered(&proto, c))
            .cloned();
        let Some(chosen) = chosen else {
            return self.bad_answer(
                "bad gateway: worker switched to a protocol the client did not offer\n",
            );
        };
        self.metrics.upgrades.fetch_add(1, Ordering::Relaxed);
        let outbound = hyper::upgrade::on(&mut resp);
        let ticket = upstream.tunnel();
        let gone = upstream.tunnel_cancel.clone();
        let generation = upstream.generation;
        let linger = self.idle_timeout();
        upstream.tunnel_tracker.spawn(async move {
            let _ticket = ticket;
            // An upgrade still completing when its worker has gone gets
            // the same bounded time as the relay below.
            let (client, worker) = tokio::select! {
                r = async { tokio::try_join!(inbound, outbound) } => match r {
                    Ok(both) => both,
                    Err(e) => {
                        tracing::debug!(generation, error = %e, "upgrade did not complete");
                        return;
                    }
                },
                () = async {
                    gone.cancelled().await;
                    tokio::time::sleep(TUNNEL_FLUSH).await;
                } => {
                    tracing::info!(generation, "upgraded connection cut: its worker is gone");
                    return;
                }
            };
            let mut client = TokioIo::new(client);
            let mut worker = TokioIo::new(worker);
            // A reset from either side just ends the tunnel. No buffer per
            // tunnel while both sides keep up (see `tunnel`). Once its
            // worker has exited, what it wrote before it went (the last
            // audio, its close frame) still goes to the client: the relay
            // ends when that has all gone out (the kernel gives the
            // worker's end of stream right after those bytes), within
            // TUNNEL_FLUSH (a child it left may hold the socket open).
            match crate::tunnel::relay(
                &mut client,
                &mut worker,
                linger,
                gone.cancelled(),
                TUNNEL_FLUSH,
            )
            .await
            {
                Err(e) if gone.is_cancelled() => {
                    tracing::info!(generation, error = %e, "upgraded connection cut: its worker is gone");
                }
                Err(e) => tracing::debug!(generation, error = %e, "upgraded connection ended"),
                Ok(_) => {}
            }
        });
        let (mut parts, _) = resp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        headers::restore_upgrade(&mut parts.headers, chosen);
        Response::from_parts(parts, empty())
    }
}

/// Serves one client connection: plain requests on the lean path
/// ([`front`]), and from the first request that is not plain on, hyper's
/// server, which reads that request again from the bytes already read.
/// `shut` asks it to close (after the request in progress, if any).
async fn connection(
    proxy: Arc<Proxy>,
    io: FirstByte,
    client: HeaderValue,
    activity: Arc<Activity>,
    shut: Arc<AtomicBool>,
    builder: hyper::server::conn::http1::Builder,
) -> hyper::Result<()> {
    let mut lean = front::Front::new(io, client.clone(), activity.clone(), shut.clone());
    if let front::End::Closed = lean.run(&proxy).await {
        return Ok(());
    }
    let front::Front { io, buf, .. } = lean;
    let io = front::Rewound {
        first: buf.freeze(),
        io,
    };
    let service = hyper::service::service_fn(move |req| {
        let proxy = proxy.clone();
        let client = client.clone();
        let activity = activity.clone();
        bump(&activity.started);
        async move {
            let resp = proxy.handle(req, &client, &activity).await;
            bump(&activity.heads);
            Ok::<_, Infallible>(resp.map(|body| ClientBody {
                body,
                done: Finished(activity),
            }))
        }
    });
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let mut asked = false;
    std::future::poll_fn(|cx| {
        if !asked && shut.load(Ordering::Relaxed) {
            asked = true;
            conn.as_mut().graceful_shutdown();
        }
        conn.as_mut().poll(cx)
    })
    .await
}

/// Drives one client connection until it ends, the daemon stops (the
/// request in flight finishes first), or it stalls: a connection on which
/// no request started or finished during a whole `timeout`, and none is in
/// progress (or the one in progress waits for the rest of its body from
/// the client, and none came), is asked to close (hyper closes it once
/// what it has written is flushed); if it is still open a `timeout` later
/// (a head or a body still half sent: a slowloris) it is dropped. So a
/// slow or idle client holds a connection for one to three `timeout`s.
///
/// A request in progress on which nothing moved (no request or response
/// body frame, no request started or ended) for `idle`, as seen at these
/// same checks, is ended: while its handler waits for the worker's
/// answer, the handler is told to give up (a 504; one waiting for a worker
/// to be swapped in is bounded by the hold time instead); while the answer
/// streams (the worker stopped sending it, or the client stopped reading
/// it), the connection is dropped. One timer per connection, not per
/// request.
async fn watch_connection<C>(
    conn: C,
    shut_down: impl Fn(Pin<&mut C>),
    activity: Arc<Activity>,
    (timeout, idle): (Duration, Duration),
    stop: Arc<Stop>,
    (peer, proxy): (std::net::SocketAddr, Arc<Proxy>),
) where
    C: Future<Output = hyper::Result<()>>,
{
    let mut conn = std::pin::pin!(conn);
    let stall = tokio::time::sleep(timeout);
    let mut stall = std::pin::pin!(stall);
    let stopped = stop.notify.notified();
    let mut stopped = std::pin::pin!(stopped);
    let (mut seen, mut stopping, mut closing) = ((0, 0, 0, 0, 0, 0), false, false);
    // What any look (a period's, or an early one for the idle time of a
    // request) last saw, and when that last changed: the idle clock.
    let (mut looked, mut moved_at) = (seen, tokio::time::Instant::now());
    // When the next whole period ends: a client is judged (a body that
    // stopped coming, no request) on whole periods only.
    let mut period_ends = stall.deadline();
    // The waker the timer and the stop were last polled with. They keep
    // it, so while the task's waker is the same (a task's always is), a
    // flag says whether they fired: no waker is registered again at every
    // wake-up of the connection, which is several per request.
    let mut armed: Option<std::task::Waker> = None;
    let r = loop {
        let event = std::future::poll_fn(|cx| {
            // The connection first: when it is ready the others are not
            // looked at (the common case, a request's I/O).
            if let Poll::Ready(r) = conn.as_mut().poll(cx) {
                return Poll::Ready(Event::Done(r));
            }
            if armed.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                if !stopping && stop.fired() {
                    return Poll::Ready(Event::Stopping);
                }
                if stall.is_elapsed() {
                    return Poll::Ready(Event::Stall);
                }
                return Poll::Pending;
            }
            if !stopping && (stopped.as_mut().poll(cx).is_ready() || stop.fired()) {
                return Poll::Ready(Event::Stopping);
            }
            if stall.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Stall);
            }
            armed = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        match event {
            Event::Done(r) => break r,
            Event::Stopping => {
                // Finish the request in flight, then close.
                stopping = true;
                shut_down(conn.as_mut());
            }
            Event::Stall => {
                let at = tokio::time::Instant::now();
                let whole = at >= period_ends;
                // Everything that moves: requests begun and ended, body
                // frames both ways, answer heads, and requests handed to a
                // worker (the idle clock starts there, not in the hold).
                let now = (
                    activity.started.load(Ordering::Relaxed),
                    activity.finished.load(Ordering::Relaxed),
                    activity.bodies.frames.load(Ordering::Relaxed),
                    activity.sent.load(Ordering::Relaxed),
                    activity.heads.load(Ordering::Relaxed),
                    activity.asked.load(Ordering::Relaxed),
                );
                if now != looked {
                    looked = now;
                    moved_at = at;
                }
                let in_progress = now.0 != now.1;
                // A request in progress is waited for, unless the client
                // stopped sending its body: no frame for a whole period.
                let waiting_on_client =
                    activity.bodies.waiting.load(Ordering::Relaxed) > 0 && now == seen;
                if !whole {
                    // An early look, when a request's idle time ran out
                    // before the period: that time only is judged.
                    if in_progress
                        && activity.bodies.waiting.load(Ordering::Relaxed) == 0
                        && moved_at.elapsed() >= idle
                        && stalled(&activity, &peer, idle)
                    {
                        return;
                    }
                } else if now != seen {
                    // Moved during the last period.
                    seen = now;
                } else if in_progress && !waiting_on_client {
                    // In progress, and nothing moved.
                    if moved_at.elapsed() >= idle && stalled(&activity, &peer, idle) {
                        return;
                    }
                } else if !closing {
                    tracing::debug!(%peer, ?timeout, "closing a client connection that sent no request");
                    closing = true;
                    shut_down(conn.as_mut());
                } else {
                    tracing::debug!(%peer, "dropping a client connection that did not close");
                    return;
                }
                if whole {
                    period_ends = at + timeout;
                }
                // The next look: at the period's end, or sooner when the
                // idle time of a request in progress runs out before that,
                // so that it ends at most a period after its last byte
                // moved plus `idle` (not `idle` rounded up to periods).
                let due = moved_at + idle;
                let next = if in_progress && due > at {
                    period_ends.min(due)
                } else {
                    period_ends
                };
                stall.as_mut().reset(next);
                armed = None;
            }
        }
    };
    match r {
        Err(e) if e.is_parse() => {
            let tls = activity.began_as_tls.load(Ordering::Relaxed);
            proxy.refused_malformed(&peer, &e, tls.then_some(TLS_ON_PLAIN));
        }
        Err(e) => tracing::debug!(%peer, error = %e, "client connection ended with an error"),
        Ok(()) => {}
    }
}

/// The 502 for a worker's 101 to a request that asked for no upgrade.
const SWITCHED_UNASKED: &str =
    "bad gateway: worker switched protocols on a request that asked for no upgrade\n";

/// What a refused request that began as a TLS handshake is said to be.
const TLS_ON_PLAIN: &str = "it began as a TLS handshake: this listener speaks plain HTTP; \
     put the TLS terminator in front of it, or point it at http://, not https://";

/// How long, at most, an upgraded connection whose worker has exited is
/// still relayed: what the worker wrote before it went reaches the caller
/// (the relay ends as soon as that has all gone out).
pub const TUNNEL_FLUSH: Duration = Duration::from_secs(5);

/// An accepted connection that could not be moved to a front thread (its
/// socket is closed): said, as a failed accept is.
fn not_handed(peer: &std::net::SocketAddr, e: &std::io::Error) {
    tracing::warn!(%peer, error = %e, "an accepted connection could not be handed to a front thread");
}

/// A request in progress on which nothing moved for `idle`: a handler that
/// has no answer yet and waits on the worker gives up (a 504; one that
/// waits for a worker to be swapped in is bounded by the hold time).
/// Returns true when the answer had begun: the connection is dropped.
fn stalled(activity: &Activity, peer: &std::net::SocketAddr, idle: Duration) -> bool {
    let now_started = activity.started.load(Ordering::Relaxed);
    if activity.heads.load(Ordering::Relaxed) != now_started {
        if activity.at_worker.load(Ordering::Relaxed) {
            activity.give_up.store(true, Ordering::Relaxed);
        }
        false
    } else {
        tracing::info!(%peer, ?idle, "dropping a client connection whose answer moved no byte for the idle timeout");
        true
    }
}

/// One log line a second at most for a kind of event that a client can
/// cause at will (a scanner's malformed requests): the first is said, the
/// ones within the next second are counted, and the next line says how
/// many there were.
#[derive(Debug, Default)]
struct LogLimit {
    said_at: Option<std::time::Instant>,
    unsaid: u64,
}

impl LogLimit {
    /// An event at `now`: `Some(unsaid before it)` when a line is due,
    /// `None` when it is only counted.
    fn due(&mut self, now: std::time::Instant) -> Option<u64> {
        if self
            .said_at
            .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1))
        {
            self.unsaid += 1;
            return None;
        }
        self.said_at = Some(now);
        Some(std::mem::take(&mut self.unsaid))
    }
}

/// The proxy's stop, as every connection's watcher sees it: a flag read at
/// each wake-up (a `CancellationToken` takes a lock to say whether it is
/// cancelled), and a notification that wakes them all once.
#[derive(Debug, Default)]
struct Stop {
    stopping: AtomicBool,
    notify: tokio::sync::Notify,
}

impl Stop {
    fn fire(&self) {
        self.stopping.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    fn fired(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }
}

/// What woke a connection's watcher.
enum Event {
    /// The connection ended.
    Done(hyper::Result<()>),
    /// `batond` is stopping.
    Stopping,
    /// The progress check is due.
    Stall,
}

/// Requests started and finished on one client connection, and how their
/// bodies move (see `watch_connection`).
#[derive(Debug, Default)]
struct Activity {
    started: AtomicU64,
    /// Responses handed to hyper (their heads go out).
    heads: AtomicU64,
    finished: AtomicU64,
    /// Response body frames handed to hyper.
    sent: AtomicU64,
    bodies: Arc<BodyProgress>,
    /// Whether the handler waits on a worker's answer (not on a worker to
    /// be swapped in, which the hold time bounds).
    at_worker: AtomicBool,
    /// Requests handed to a worker (a resend counts again).
    asked: AtomicU64,
    /// Set by the watcher when nothing moved for the idle timeout while a
    /// handler waits on the worker; that handler takes it back and gives
    /// up. No waker is needed: the handler runs inside the connection
    /// future the watcher polls right after setting it.
    give_up: AtomicBool,
    /// Whether the first byte the client sent was 0x16, as a TLS
    /// handshake's is.
    began_as_tls: AtomicBool,
}

/// A client's stream that looks at the first byte the client sent, so that
/// a request hyper could not parse is told apart when it was no HTTP at
/// all (a TLS handshake on this plain-HTTP listener begins with 0x16). One
/// branch per read after that.
struct FirstByte {
    io: tokio::net::TcpStream,
    /// Where what the byte says goes; taken once it is seen.
    activity: Option<Arc<Activity>>,
}

impl tokio::io::AsyncRead for FirstByte {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if this.activity.is_some()
            && let Some(&b) = buf.filled().get(before)
            && let Some(a) = this.activity.take()
        {
            a.began_as_tls.store(b == 0x16, Ordering::Relaxed);
        }
        r
    }
}

impl tokio::io::AsyncWrite for FirstByte {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// TCP keepalive on a client connection: a peer that vanished without a
/// FIN or a reset (a NAT that forgot it, a host powered off) is found out
/// about two minutes after it went quiet (60 s, then 6 probes 10 s apart),
/// not never. An open WebSocket with a quiet worker would otherwise hold
/// its generation draining until `drain_timeout_s`.
fn keepalive(stream: &tokio::net::TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = setsockopt(stream, sockopt::KeepAlive, &true);
    let _ = setsockopt(stream, sockopt::TcpKeepIdle, &60);
    let _ = setsockopt(stream, sockopt::TcpKeepInterval, &10);
    let _ = setsockopt(stream, sockopt::TcpKeepCount, &6);
}

/// Adds one to a counter only this connection's task writes: a plain load
/// and store, no locked instruction (the watcher, in the same task, only
/// reads it).
fn bump(counter: &AtomicU64) {
    counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
}

/// `f`'s output (the worker's answer), or `None` once the connection's
/// watcher says nothing moved for the idle timeout. No allocation, lock or
/// waker registration per request: flags of this connection's own task
/// (one request at a time), checked at each poll.
async fn until_idle<F: Future>(mut f: Pin<&mut F>, activity: &Activity) -> Option<F::Output> {
    /// Marks the handler out again however the wait ends.
    struct Waiting<'a>(&'a AtomicBool);
    impl Drop for Waiting<'_> {
        fn drop(&mut self) {
            self.0.store(false, Ordering::Relaxed);
        }
    }
    activity.at_worker.store(true, Ordering::Relaxed);
    bump(&activity.asked);
    let _waiting = Waiting(&activity.at_worker);
    // Not meant for this request (set as the one before got its answer).
    activity.give_up.store(false, Ordering::Relaxed);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = f.as_mut().poll(cx) {
            return Poll::Ready(Some(r));
        }
        if activity.give_up.load(Ordering::Relaxed) {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

/// Counts a response as finished when its body is dropped: sent, or the
/// client went away.
struct Finished(Arc<Activity>);

impl Drop for Finished {
    fn drop(&mut self) {
        bump(&self.0.finished);
    }
}

/// A response body on its way to the client.
pub struct ClientBody {
    body: ProxyBody,
    done: Finished,
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &r {
            bump(&self.done.0.sent);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// How one attempt to send a request to a worker ended.
enum Outcome {
    /// The answer's head, and the connection hyper's client reads its
    /// body from (a lean answer's body holds its own).
    Answer(Response<WorkerBody>, Option<UpstreamConn>),
    /// Not sent: the error, the request, and whether the worker refused
    /// the connection.
    Back(SendError, Request<ReqBody>, bool),
    /// Failed after it was sent (in part or whole).
    Failed(SendError),
}

/// What follows a failed attempt to send a request to a worker.
enum Attempt {
    /// Reset before any answer: the request (rebuilt) goes again, once.
    Again,
    /// Not taken: the error, and whether the worker refused connections
    /// (then a different one is waited for; else the same one may take it
    /// again).
    Refused(SendError, bool),
}

/// A request made ready for the worker, and what its handler keeps of it.
struct Forward {
    req: Request<ReqBody>,
    /// What it takes to send a bodiless idempotent request again after a
    /// reset (the request itself is gone by then).
    replay: Option<(http::Method, http::Uri, http::HeaderMap)>,
    /// The protocol asked for, on an upgrade request.
    upgrade: Option<HeaderValue>,
    /// The client's side of the connection once upgraded.
    inbound_upgrade: Option<hyper::upgrade::OnUpgrade>,
    /// The client's body failures on this connection so far.
    body_errors: u64,
}

/// Rewrites a client's request for the worker: hop-by-hop headers out,
/// forwarding headers and `Via` in, origin form.
///
/// Not part of the handler's `async fn`: its locals would stay in the
/// handler's state across every wait (which each request moves).
fn forward(
    mut req: Request<Incoming>,
    client: &HeaderValue,
    host: Option<HeaderValue>,
    bodies: &Arc<BodyProgress>,
) -> Forward {
    // RFC 9110 §7.8: `Upgrade` in an HTTP/1.0 request is ignored (it
    // is stripped as hop-by-hop below); such a connection cannot be
    // upgraded.
    let upgrade = if req.version() == http::Version::HTTP_11 {
        headers::upgrade_protocol(req.headers())
    } else {
        None
    };
    let inbound_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    // Room for the forwarding headers and `Via` at once: the map hyper
    // parsed has room for the request's own headers only.
    parts.headers.reserve(4);
    // A body of unknown length on a GET or HEAD (a chunked one; a
    // Content-Length is kept): hyper's client would send such a
    // request as bodiless unless it is told the framing.
    if matches!(parts.method, http::Method::GET | http::Method::HEAD)
        && !body.is_end_stream()
        && body.size_hint().exact().is_none()
    {
        parts.headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
    headers::set_forwarded(&mut parts.headers, client, "http", host.as_ref());
    headers::add_via(&mut parts.headers, parts.version);
    if let Some(h) = host
        && parts.uri.authority().is_some()
    {
        parts.headers.insert(header::HOST, h);
    }
    // It goes on as HTTP/1.1, which carries `Host`: empty when an HTTP/1.0
    // request named none (RFC 9112 §3.2).
    if !parts.headers.contains_key(header::HOST) {
        parts
            .headers
            .insert(header::HOST, HeaderValue::from_static(""));
    }
    if let Some(proto) = &upgrade {
        headers::restore_upgrade(&mut parts.headers, proto.clone());
    }
    // Origin form: the worker gets the path, the host is in `Host`
    // (most requests are in origin form already).
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        parts.uri = parts
            .uri
            .path_and_query()
            .cloned()
            .map_or_else(|| http::Uri::from_static("/"), http::Uri::from);
    }
    parts.version = http::Version::HTTP_11;
    let idempotent = upgrade.is_none()
        && matches!(
            parts.method,
            http::Method::GET
                | http::Method::HEAD
                | http::Method::OPTIONS
                | http::Method::PUT
                | http::Method::DELETE
        );
    let replay = (idempotent && body.is_end_stream()).then(|| {
        (
            parts.method.clone(),
            parts.uri.clone(),
            parts.headers.clone(),
        )
    });
    let watch = BodyWatch::new(bodies, body.is_end_stream());
    Forward {
        req: Request::from_parts(parts, ReqBody::Client(body, watch)),
        replay,
        upgrade,
        inbound_upgrade,
        body_errors: bodies.errors.load(Ordering::Relaxed),
    }
}

/// The request target's form, checked as RFC 9112 §3.2 asks: a bare
/// `host:port` (authority form) is for CONNECT only, and `*` (asterisk
/// form) for OPTIONS only. hyper parses both for any method; taken as they
/// come, a `GET admin.internal:8080` would reach the worker as `GET /` for
/// that host.
fn check_target(req: &Request<Incoming>) -> Result<(), &'static str> {
    let uri = req.uri();
    if uri.scheme().is_some() {
        return Ok(());
    }
    if uri.authority().is_some() && req.method() != http::Method::CONNECT {
        return Err("the target is a bare host[:port], which only CONNECT uses; send a path");
    }
    if uri.path() == "*" && req.method() != http::Method::OPTIONS {
        return Err("the target * is for OPTIONS only");
    }
    Ok(())
}

/// The host a request is for, checked as RFC 9112 §3.2 asks: the
/// authority of an absolute-form target wins over `Host`; otherwise an
/// HTTP/1.1 request carries exactly one `Host` line with a valid authority
/// (or an empty one). An HTTP/1.0 request may have none.
fn request_host(req: &Request<Incoming>) -> Result<Option<HeaderValue>, &'static str> {
    let mut lines = req.headers().get_all(header::HOST).iter();
    let (first, second) = (lines.next(), lines.next());
    if second.is_some() {
        return Err("more than one Host header");
    }
    if let Some(h) = first
        && !h.is_empty()
        && !headers::valid_host(h.as_bytes())
    {
        return Err("Host is not a valid host[:port]");
    }
    if let Some(a) = req.uri().authority() {
        // Without any `user@` part: `Host` never carries one.
        let host = match (a.as_str().contains('@'), a.port()) {
            (false, _) => HeaderValue::from_str(a.as_str()),
            (true, Some(port)) => HeaderValue::from_str(&format!("{}:{port}", a.host())),
            (true, None) => HeaderValue::from_str(a.host()),
        };
        return Ok(host.ok());
    }
    match first {
        // An empty `Host` (a target with no authority) names no host.
        Some(h) if h.is_empty() => Ok(None),
        Some(h) => Ok(Some(h.clone())),
        None if req.version() == http::Version::HTTP_11 => Err("HTTP/1.1 request without Host"),
        None => Ok(None),
    }
}

/// How long a request reset by its worker waits to see whether the worker
/// died (the supervisor then takes it out of the router at once: its exit
/// is a signal handled on this same runtime) before it is sent to the same
/// worker again.
const CRASH_GRACE: Duration = Duration::from_millis(100);

/// How often a request tries again to connect to the worker while batond
/// is short of descriptors or memory (see [`Proxy::wait_short`]).
const SHORT_RETRY: Duration = Duration::from_millis(20);

/// Whether an exchange failed because the connection closed or was reset
/// before an answer came, rather than because of what came (an answer
/// that is not HTTP, a body that broke).
fn connection_lost(e: &SendError) -> bool {
    let e = match e {
        SendError::Http(e) => e,
        SendError::Lean(e) => return e.connection_lost(),
        SendError::Connect(_) | SendError::Short(_) => return false,
    };
    if e.is_incomplete_message() || e.is_canceled() || e.is_closed() {
        return true;
    }
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::{
                BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof,
            };
            return matches!(
                io.kind(),
                ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
            );
        }
        src = s.source();
    }
    false
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn reason(e: &SendError) -> String {
    // hyper says "message head is too large" for too many lines too.
    let too_large = match e {
        SendError::Http(h) => h.is_parse_too_large(),
        SendError::Lean(l) => matches!(l, crate::h1::Error::TooLarge),
        SendError::Connect(_) | SendError::Short(_) => false,
    };
    if too_large {
        return format!(
            "its response head is too large (over {} KiB, or over {} header lines)",
            crate::pool::MAX_BUF / 1024,
            MAX_HEADER_LINES
        );
    }
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg = s.to_string();
        src = s.source();
    }
    msg
}

/// A plain-text response made by the proxy itself.
pub fn text(status: StatusCode, body: &str) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::Local(Full::new(Bytes::from(body.to_string()))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// A refusal of a request the proxy will not pass on, or of an upgrade
/// the worker botched; the connection closes after it (what the client
/// sends next cannot be trusted to be framed right, or to be HTTP).
fn refuse(status: StatusCode, body: &str) -> Response<ProxyBody> {
    let mut resp = text(status, body);
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

fn empty() -> ProxyBody {
    ProxyBody::Local(Full::new(Bytes::new()))
}

/// An upstream response body that holds its request's ticket until the last
/// byte has gone out (or the client went away), so a drain waits for it.
/// It gives the worker connection back to its pool once the worker has sent
/// the whole body: at once when it came with the head (see
/// [`Guarded::prefetch`]), else at the end.
pub struct Guarded {
    inner: WorkerBody,
    /// Data taken off `inner` before hyper asked (see
    /// [`Guarded::prefetch`]), given first.
    first: Option<Bytes>,
    /// A first frame that is not data (trailers), likewise: boxed, as it
    /// is rare and large.
    first_other: Option<Box<Frame<Bytes>>>,
    /// Counts the request in flight; given to the task that finishes the
    /// exchange when the worker still reads the request body after its
    /// answer (see [`Pool::checkin`]).
    ticket: Option<Ticket>,
    /// The worker connection, driven from here while the body streams.
    conn: Option<(UpstreamConn, Arc<Pool>)>,
    done: bool,
    /// The worker's body failed: given to hyper on the next poll.
    failed: Option<BoxError>,
    /// Whose response it is, and where a cut one is counted.
    generation: u64,
    metrics: Arc<ProxyMetrics>,
}

impl Body for Guarded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(data) = this.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(f) = this.first_other.take() {
            return Poll::Ready(Some(Ok(*f)));
        }
        if let Some(e) = this.failed.take() {
            return Poll::Ready(Some(Err(e)));
        }
        let mut r = Pin::new(&mut this.inner).poll_frame(cx);
        if r.is_pending()
            && let Some((conn, _)) = &mut this.conn
        {
            // The body comes off the connection this task drives.
            conn.drive(cx);
            r = Pin::new(&mut this.inner).poll_frame(cx);
        }
        match r {
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(None)
            }
            // The worker broke off its response. hyper drops what it has
            // not written yet when a body fails, so the error waits one
            // poll: the head and the bytes before it go out first, and the
            // client sees a cut response (as from nginx or HAProxy), not a
            // connection closed without a word.
            Poll::Ready(Some(Err(e))) => {
                // The client sees a cut response; the operator sees it here.
                this.metrics.cut_responses.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(generation = this.generation, error = %e, "the worker broke off a response after its head");
                this.failed = Some(e);
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            r => r,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none()
            && self.first_other.is_none()
            && self.failed.is_none()
            && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let rest = self.inner.size_hint();
        let Some(n) = self.first.as_ref().map(Bytes::len) else {
            return rest;
        };
        // The frame taken early, plus what is still to come.
        let n = n as u64;
        let mut hint = SizeHint::new();
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + n);
        }
        hint.set_lower(rest.lower() + n);
        hint
    }
}

impl Guarded {
    /// Takes the body's first frame if it has arrived already (a small
    /// response usually comes whole with its head), without waiting for
    /// it. A body that is then complete gives its worker connection back
    /// to the pool at once, instead of when the client has it: another
    /// request can use it meanwhile, and fewer connections stay open.
    async fn prefetch(&mut self) {
        if self.inner.is_end_stream() {
            self.done = true;
        } else {
            // A broken body is kept in `failed` by `poll_frame` itself.
            std::future::poll_fn(|cx| {
                if let Poll::Ready(Some(Ok(f))) = Pin::new(&mut *self).poll_frame(cx) {
                    match f.into_data() {
                        Ok(data) => self.first = Some(data),
                        Err(f) => self.first_other = Some(Box::new(f)),
                    }
                }
                Poll::Ready(())
            })
            .await;
        }
        if (self.done || self.inner.is_end_stream())
            && let Some((conn, pool)) = self.conn.take()
        {
            pool.checkin(conn, &mut self.ticket);
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        // Only a fully read response leaves the connection reusable.
        if (self.done || self.inner.is_end_stream())
            && let Some((conn, pool)) = self.conn.take()
        {
            pool.checkin(conn, &mut self.ticket);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_of_malformed_requests_is_one_log_line_a_second() {
        let t0 = std::time::Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut limit = LogLimit::default();
        assert_eq!(limit.due(at(0)), Some(0), "the first is said");
        assert_eq!(limit.due(at(10)), None);
        assert_eq!(limit.due(at(999)), None);
        assert_eq!(limit.due(at(1000)), Some(2), "with the two unsaid");
        assert_eq!(limit.due(at(1500)), None);
        assert_eq!(limit.due(at(5000)), Some(1));
        assert_eq!(limit.due(at(6000)), Some(0));
        // A clock read behind the last line (another thread's) counts as
        // within its second.
        assert_eq!(limit.due(at(5999)), None);
    }
}
