//! The front proxy: the public listener, HTTP/1.1 (and h2c) with keep-alive,
//! bodies streamed both ways, WebSocket and any other `Upgrade` passed
//! through and pinned to the generation that accepted it.
//!
//! Every request goes to the upstream active when it arrives (see
//! [`crate::router`]). While there is none (a crash restart), it waits up to
//! `hold_timeout` and then gets 503 with `Retry-After`. An upstream that fails
//! mid-request gives 502 with a short reason; a malformed request gets 400
//! from hyper and the listener lives on.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::headers;
use crate::router::{Router, Ticket, Upstream};

/// The error type of proxied bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of every response the proxy sends.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct ProxyMetrics {
    /// Requests received.
    pub requests: AtomicU64,
    /// 502s the proxy made (upstream failed).
    pub bad_gateway: AtomicU64,
    /// 503s the proxy made (no healthy worker within the hold time).
    pub unavailable: AtomicU64,
    /// Upgraded connections established.
    pub upgrades: AtomicU64,
    /// Connections accepted.
    pub connections: AtomicU64,
}

/// The proxy's shared state.
#[derive(Debug)]
pub struct Proxy {
    router: Arc<Router>,
    client: Client<HttpConnector, Lazy>,
    hold_ms: AtomicU64,
    /// Counters for `/metrics`.
    pub metrics: ProxyMetrics,
}

// === impl Proxy ===

impl Proxy {
    /// A proxy routing through `router`, holding requests up to `hold`.
    pub fn new(router: Arc<Router>, hold: Duration) -> Arc<Proxy> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(256)
            .build(connector);
        Arc::new(Proxy {
            router,
            client,
            hold_ms: AtomicU64::new(u64::try_from(hold.as_millis()).unwrap_or(u64::MAX)),
            metrics: ProxyMetrics::default(),
        })
    }

    /// Changes the hold time (config reload).
    pub fn set_hold(&self, hold: Duration) {
        self.hold_ms.store(
            u64::try_from(hold.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn hold(&self) -> Duration {
        Duration::from_millis(self.hold_ms.load(Ordering::Relaxed))
    }

    /// Serves `listener` until `token` is cancelled, then lets open
    /// connections finish up to `grace`.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        token: CancellationToken,
        grace: Duration,
    ) {
        let graceful = GracefulShutdown::new();
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .keep_alive(true)
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30));
        let builder = Arc::new(builder);
        loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = token.cancelled() => break,
            };
            let _ = stream.set_nodelay(true);
            self.metrics.connections.fetch_add(1, Ordering::Relaxed);
            let proxy = self.clone();
            let service = hyper::service::service_fn(move |req| {
                let proxy = proxy.clone();
                async move { Ok::<_, Infallible>(proxy.handle(req, peer).await) }
            });
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .into_owned();
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(%peer, error = %e, "client connection ended with an error");
                }
            });
        }
        drop(listener);
        if tokio::time::timeout(grace, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(?grace, "connections still open at shutdown; closing them");
        }
    }

    fn unavailable(&self) -> Response<ProxyBody> {
        self.metrics.unavailable.fetch_add(1, Ordering::Relaxed);
        let mut resp = text(
            StatusCode::SERVICE_UNAVAILABLE,
            "no healthy worker; try again shortly\n",
        );
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        resp
    }

    async fn handle(&self, mut req: Request<Incoming>, peer: SocketAddr) -> Response<ProxyBody> {
        self.metrics.requests.fetch_add(1, Ordering::Relaxed);
        let Some((upstream, ticket)) = self.router.acquire(self.hold()).await else {
            return self.unavailable();
        };
        let upgrade = headers::upgrade_protocol(req.headers());
        let inbound_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let host = parts.headers.get(header::HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        headers::strip_hop_by_hop(&mut parts.headers);
        headers::set_forwarded(&mut parts.headers, peer.ip(), "http", host.as_ref());
        if let Some(h) = &host {
            parts.headers.insert(header::HOST, h.clone());
        }
        if let Some(proto) = &upgrade {
            headers::restore_upgrade(&mut parts.headers, proto.clone());
        }
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        parts.uri = match format!("http://{}{}", upstream.addr, path).parse() {
            Ok(u) => u,
            Err(_) => return text(StatusCode::BAD_REQUEST, "bad request target\n"),
        };
        parts.version = http::Version::HTTP_11;
        let slot = Reclaim::new(body);
        let idempotent = upgrade.is_none()
            && matches!(
                parts.method,
                http::Method::GET
                    | http::Method::HEAD
                    | http::Method::OPTIONS
                    | http::Method::PUT
                    | http::Method::DELETE
            );
        let (mut upstream, mut ticket) = (upstream, ticket);
        let (mut refused, mut resets) = (0, 0);
        let resp = loop {
            let mut req = Request::new(slot.body());
            *req.method_mut() = parts.method.clone();
            *req.uri_mut() = parts.uri.clone();
            *req.version_mut() = parts.version;
            *req.headers_mut() = parts.headers.clone();
            match self.client.request(req).await {
                Ok(r) => break r,
                // Connection refused: the request never left, so it is safe
                // to send it (body included) to the worker that replaces
                // this one, once the supervisor has swapped it in.
                Err(e) if e.is_connect() && slot.untouched() && refused < 3 => {
                    refused += 1;
                    tracing::info!(generation = upstream.generation, error = %e, "worker refused a connection; waiting for its replacement");
                    drop(ticket);
                    let Some((u, t)) = self
                        .router
                        .acquire_other(Some(&upstream), self.hold())
                        .await
                    else {
                        return self.unavailable();
                    };
                    parts.uri = match format!("http://{}{}", u.addr, path).parse() {
                        Ok(uri) => uri,
                        Err(_) => return text(StatusCode::BAD_REQUEST, "bad request target\n"),
                    };
                    (upstream, ticket) = (u, t);
                }
                // A reset before any answer from the active worker (it just
                // crashed): an idempotent request without a body may be sent
                // again (RFC 9110 §9.2.2). Not so for a draining worker cut
                // at its drain timeout: that request is over.
                Err(e) if idempotent && slot.end && resets < 2 && !upstream.is_retired() => {
                    resets += 1;
                    tracing::info!(generation = upstream.generation, error = %e, "retrying an idempotent request");
                    drop(ticket);
                    let Some((u, t)) = self.router.acquire(self.hold()).await else {
                        return self.unavailable();
                    };
                    parts.uri = match format!("http://{}{}", u.addr, path).parse() {
                        Ok(uri) => uri,
                        Err(_) => return text(StatusCode::BAD_REQUEST, "bad request target\n"),
                    };
                    (upstream, ticket) = (u, t);
                }
                Err(e) => {
                    self.metrics.bad_gateway.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(generation = upstream.generation, error = %e, "upstream request failed");
                    return text(
                        StatusCode::BAD_GATEWAY,
                        &format!(
                            "bad gateway: worker of generation {} failed: {}\n",
                            upstream.generation,
                            reason(&e)
                        ),
                    );
                }
            }
        };
        match (upgrade, inbound_upgrade) {
            (Some(proto), Some(inbound)) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                self.tunnel(resp, proto, inbound, &upstream)
            }
            _ => {
                let (mut parts, body) = resp.into_parts();
                headers::strip_hop_by_hop(&mut parts.headers);
                let body = Guarded {
                    inner: body,
                    _ticket: ticket,
                };
                Response::from_parts(parts, body.boxed_unsync())
            }
        }
    }

    /// Finishes an upgrade: checks that the worker switched to the protocol
    /// asked for, pins the connection to its generation and copies bytes
    /// both ways in a task of that generation's tracker.
    fn tunnel(
        &self,
        mut resp: Response<Incoming>,
        proto: HeaderValue,
        inbound: hyper::upgrade::OnUpgrade,
        upstream: &Arc<Upstream>,
    ) -> Response<ProxyBody> {
        let same = resp
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .zip(proto.to_str().ok())
            .is_some_and(|(a, b)| a.eq_ignore_ascii_case(b));
        if !same {
            self.metrics.bad_gateway.fetch_add(1, Ordering::Relaxed);
            return text(
                StatusCode::BAD_GATEWAY,
                "bad gateway: worker switched to another protocol\n",
            );
        }
        self.metrics.upgrades.fetch_add(1, Ordering::Relaxed);
        let outbound = hyper::upgrade::on(&mut resp);
        let ticket = upstream.tunnel();
        let cancel = upstream.tunnel_cancel.clone();
        let generation = upstream.generation;
        upstream.tunnel_tracker.spawn(async move {
            let _ticket = ticket;
            let copy = async {
                let (client, worker) = tokio::try_join!(inbound, outbound)?;
                let mut client = TokioIo::new(client);
                let mut worker = TokioIo::new(worker);
                // A reset from either side just ends the tunnel.
                let _ = tokio::io::copy_bidirectional(&mut client, &mut worker).await;
                Ok::<(), hyper::Error>(())
            };
            tokio::select! {
                r = copy => if let Err(e) = r {
                    tracing::debug!(generation, error = %e, "upgrade did not complete");
                },
                () = cancel.cancelled() => {
                    tracing::info!(generation, "upgraded connection cut at drain timeout");
                }
            }
        });
        let (mut parts, _) = resp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        headers::restore_upgrade(&mut parts.headers, proto);
        Response::from_parts(parts, empty())
    }
}

fn reason(e: &hyper_util::client::legacy::Error) -> String {
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
    let mut resp = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|e: Infallible| match e {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn empty() -> ProxyBody {
    Full::new(Bytes::new())
        .map_err(|e: Infallible| match e {})
        .boxed_unsync()
}

/// A request body that can be taken back when the request never reached a
/// worker: the outgoing body only takes the real one out of the shared slot
/// on its first poll, so after a refused connection it is still there.
struct Reclaim {
    slot: Arc<std::sync::Mutex<Option<Incoming>>>,
    end: bool,
    hint: SizeHint,
}

impl Reclaim {
    fn new(body: Incoming) -> Reclaim {
        Reclaim {
            end: body.is_end_stream(),
            hint: body.size_hint(),
            slot: Arc::new(std::sync::Mutex::new(Some(body))),
        }
    }

    /// A body for one attempt.
    fn body(&self) -> Lazy {
        Lazy {
            slot: self.slot.clone(),
            inner: None,
            end: self.end,
            hint: self.hint,
        }
    }

    /// Whether no attempt has read the body yet.
    fn untouched(&self) -> bool {
        self.end || self.slot.lock().is_ok_and(|s| s.is_some())
    }
}

struct Lazy {
    slot: Arc<std::sync::Mutex<Option<Incoming>>>,
    inner: Option<Incoming>,
    end: bool,
    hint: SizeHint,
}

impl Body for Lazy {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.end {
            return Poll::Ready(None);
        }
        if self.inner.is_none() {
            let taken = self.slot.lock().ok().and_then(|mut s| s.take());
            match taken {
                Some(b) => self.inner = Some(b),
                None => return Poll::Ready(Some(Err("request body already used".into()))),
            }
        }
        match self.inner.as_mut() {
            Some(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|o| o.map(|r| r.map_err(Into::into))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.end || self.inner.as_ref().is_some_and(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

/// An upstream response body that holds its request's ticket until the last
/// byte has gone out (or the client went away), so a drain waits for it.
struct Guarded {
    inner: Incoming,
    _ticket: Ticket,
}

impl Body for Guarded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner)
            .poll_frame(cx)
            .map(|o| o.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
