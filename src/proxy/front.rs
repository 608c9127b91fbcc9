//! The client side of a connection, for requests without a body.
//!
//! Most of what reaches `batond` is a head alone (`GET`, `HEAD`, a health
//! check, a status page). For those the connection's own task reads the
//! head, checks it and rewrites it for the worker in one pass over the
//! bytes (`httparse`, as hyper does: no header map is built), hands it to
//! the lean client ([`crate::h1::send`]) and writes the answer straight
//! to the client. hyper's server would parse the head into a map, hand it
//! to a service through its dispatcher and encode the answer again from
//! another map: on this path that is most of the proxy's own work.
//!
//! Everything else goes to hyper's server, with the bytes read so far, for
//! the rest of the connection's life: a request with a body or an upgrade
//! (WebSockets), HTTP/1.0, a target not in origin form, a head hyper would
//! refuse (it answers 400, 414 or 431 and the refusal is counted and
//! logged as before), and any head this module does not take whole. So
//! what this path takes is checked to be plain, and what it does not is
//! handled exactly as before.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Body;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::{
    Activity, FirstByte, Proxy, ProxyBody, SWITCHED_UNASKED, bump, connection_lost, until_idle,
};
use crate::h1::{Head, LeanBody, MAX_HEADER_LINES};
use crate::headers;
use crate::pool::{MAX_BUF, SendError};
use crate::router::{Ticket, Upstream};

/// How much a read of a client's request asks for.
const READ: usize = 4 * 1024;
/// What is gathered of an answer before it is written.
const WRITE: usize = 64 * 1024;
/// The most options a request's `Connection` lines may name on this path.
const MAX_OPTIONS: usize = 8;

/// A request this path takes: its head is `len` bytes of the buffer.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Plain {
    len: usize,
    /// `HEAD`: the answer has no body, whatever its head says.
    head_only: bool,
    /// May be sent again after a connection reset (RFC 9110 §9.2.2).
    idempotent: bool,
    /// The client asked to close the connection after the answer.
    close: bool,
}

/// What the head at the start of a client's buffer is.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Parsed {
    /// Not all here yet.
    Partial,
    /// A plain request, rewritten for the worker.
    Plain(Plain),
    /// For hyper's server (see the module's documentation).
    Hyper,
}

/// Parses the request head at the start of `buf` and, when this path takes
/// it, writes it to `out` as the worker gets it: the hop-by-hop headers
/// out (RFC 9110 §7.6.1, with every option `Connection` names), the
/// client's address appended to `X-Forwarded-For`, `X-Forwarded-Proto`
/// and `X-Forwarded-Host` set when absent, `Via` added; as the path
/// through hyper's server does.
pub(super) fn parse(buf: &[u8], client: &[u8], out: &mut Vec<u8>) -> Parsed {
    let mut lines = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADER_LINES];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, &mut lines)
    {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() < MAX_BUF => return Parsed::Partial,
        // Too large, too many lines, not HTTP/1.x: hyper says which.
        _ => return Parsed::Hyper,
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Parsed::Hyper;
    };
    // Origin form, and a target hyper takes (it refuses what `http::Uri`
    // does not parse).
    if !target.starts_with('/') || http::uri::PathAndQuery::try_from(target).is_err() {
        return Parsed::Hyper;
    }
    let (mut hosts, mut host) = (0, &b""[..]);
    let (mut close, mut length) = (false, false);
    let mut options = [&b""[..]; MAX_OPTIONS];
    let mut named = 0;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("host") {
            hosts += 1;
            host = h.value;
        } else if name.eq_ignore_ascii_case("content-length") {
            // A body, or more than one length: hyper's.
            if length || h.value != b"0" {
                return Parsed::Hyper;
            }
            length = true;
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("upgrade")
            || name.eq_ignore_ascii_case("expect")
        {
            return Parsed::Hyper;
        } else if name.eq_ignore_ascii_case("connection") {
            for option in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if option.eq_ignore_ascii_case(b"upgrade") || named == MAX_OPTIONS {
                    return Parsed::Hyper;
                }
                close |= option.eq_ignore_ascii_case(b"close");
                options[named] = option;
                named += 1;
            }
        }
    }
    // RFC 9112 §3.2: one `Host`, a valid authority or empty; hyper's path
    // says what is wrong otherwise.
    if hosts != 1 || !(host.is_empty() || headers::valid_host(host)) {
        return Parsed::Hyper;
    }
    let options = &options[..named];
    // Each option is a list of one.
    let hop = |name: &str| headers::for_this_hop(name.as_bytes(), options.iter().copied());
    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let (mut proto, mut forwarded_host) = (false, false);
    for h in req.headers.iter() {
        if hop(h.name) || h.name.eq_ignore_ascii_case("x-forwarded-for") {
            continue;
        }
        proto |= h.name.eq_ignore_ascii_case("x-forwarded-proto");
        forwarded_host |= h.name.eq_ignore_ascii_case("x-forwarded-host");
        line(out, h.name.as_bytes(), h.value);
    }
    // Every line an outer proxy (or the client) sent, in order, then the
    // client: the last one is the nearest hop.
    out.extend_from_slice(b"x-forwarded-for: ");
    if !hop("x-forwarded-for") {
        for h in req.headers.iter() {
            let prev = h.value.trim_ascii();
            if h.name.eq_ignore_ascii_case("x-forwarded-for") && !prev.is_empty() {
                out.extend_from_slice(prev);
                out.extend_from_slice(b", ");
            }
        }
    }
    out.extend_from_slice(client);
    out.extend_from_slice(b"\r\n");
    if !proto {
        out.extend_from_slice(b"x-forwarded-proto: http\r\n");
    }
    if !forwarded_host && !host.is_empty() {
        line(out, b"x-forwarded-host", host);
    }
    out.extend_from_slice(b"via: 1.1 batond\r\n\r\n");
    Parsed::Plain(Plain {
        len,
        head_only: method == "HEAD",
        idempotent: matches!(method, "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE"),
        close,
    })
}

fn line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// How a connection left this path.
pub(super) enum End {
    /// It is over (closed by either side, or asked to close).
    Closed,
    /// The request at the start of the buffer is for hyper's server.
    Hyper,
}

/// One client connection on this path.
pub(super) struct Front {
    pub(super) io: FirstByte,
    /// Read from the client, not yet taken.
    pub(super) buf: BytesMut,
    /// The request head as the worker gets it.
    head: Vec<u8>,
    /// What goes to the client next.
    out: Vec<u8>,
    client: HeaderValue,
    activity: Arc<Activity>,
    /// Set when the connection is asked to close (the daemon stops, or
    /// the client sent nothing for a while): it does after the answer in
    /// progress, if any.
    shut: Arc<AtomicBool>,
}

/// What the answer's body is framed by, towards the client.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Framing {
    /// None goes with the head (`HEAD`, 204, 304).
    Bodiless,
    /// This many bytes.
    Length(u64),
    Chunked,
}

impl Front {
    pub(super) fn new(
        io: FirstByte,
        client: HeaderValue,
        activity: Arc<Activity>,
        shut: Arc<AtomicBool>,
    ) -> Front {
        Front {
            io,
            buf: BytesMut::new(),
            head: Vec::new(),
            out: Vec::new(),
            client,
            activity,
            shut,
        }
    }

    /// Serves plain requests until the connection ends or one is not.
    pub(super) async fn run(&mut self, proxy: &Proxy) -> End {
        loop {
            let plain = loop {
                if !self.buf.is_empty() {
                    match parse(&self.buf, self.client.as_bytes(), &mut self.head) {
                        Parsed::Partial => {}
                        Parsed::Plain(p) => break p,
                        Parsed::Hyper => return End::Hyper,
                    }
                }
                let (io, buf, shut) = (&mut self.io, &mut self.buf, &self.shut);
                let read = std::future::poll_fn(|cx| {
                    // Asked to close between requests: closed now. A head
                    // half sent is waited for (its watcher drops it).
                    if buf.is_empty() && shut.load(Ordering::Relaxed) {
                        return Poll::Ready(Ok(0));
                    }
                    buf.reserve(READ);
                    tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf)
                })
                .await;
                if !matches!(read, Ok(n) if n > 0) {
                    return End::Closed;
                }
            };
            self.buf.advance(plain.len);
            bump(&self.activity.started);
            proxy.metrics.requests.fetch_add(1, Ordering::Relaxed);
            let keep = self.answer(proxy, &plain).await;
            bump(&self.activity.finished);
            if !keep || plain.close || self.shut.load(Ordering::Relaxed) {
                return End::Closed;
            }
        }
    }

    /// Answers the request whose head is in `self.head`; whether the
    /// connection may take another.
    async fn answer(&mut self, proxy: &Proxy, plain: &Plain) -> bool {
        let (head, body, upstream, ticket) =
            match proxy.exchange(&self.head, plain, &self.activity).await {
                Ok(x) => x,
                Err(local) => return self.local(local, plain.close).await,
            };
        // RFC 9110 §15.2: a 101 answers an upgrade request only.
        if head.status() == StatusCode::SWITCHING_PROTOCOLS {
            return self
                .local(proxy.bad_answer(SWITCHED_UNASKED), plain.close)
                .await;
        }
        let status = head.status();
        // Framed again here, `chunked` after the codings named.
        let codings = headers::codings_listed(head.values(b"transfer-encoding"));
        let framing = if plain.head_only
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            Framing::Bodiless
        } else if codings.is_none()
            && let Some(n) = body.size_hint().exact()
        {
            Framing::Length(n)
        } else {
            Framing::Chunked
        };
        let close = plain.close || self.shut.load(Ordering::Relaxed);
        self.out.clear();
        encode_answer(&mut self.out, &head, framing, codings.as_deref(), close);
        // The head's bytes are the worker connection's: let go of them.
        drop(head);
        bump(&self.activity.heads);
        let kept = self.body(body, framing, &upstream, proxy).await;
        // The drain of this generation waited for the last byte.
        drop(ticket);
        kept && !close
    }

    /// Writes the head in `self.out` and the worker's body after it;
    /// whether all of it went out.
    async fn body(
        &mut self,
        body: LeanBody,
        framing: Framing,
        upstream: &Upstream,
        proxy: &Proxy,
    ) -> bool {
        let mut body = std::pin::pin!(body);
        if framing == Framing::Bodiless {
            return self.io.write_all(&self.out).await.is_ok();
        }
        loop {
            // What has come is gathered; what waits for the worker goes
            // out first.
            let out = &self.out;
            let next = std::future::poll_fn(|cx| match body.as_mut().poll_frame(cx) {
                Poll::Pending if !out.is_empty() => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
                Poll::Ready(f) => Poll::Ready(Some(f)),
            })
            .await;
            let frame = match next {
                None => {
                    if self.flush().await.is_err() {
                        return false;
                    }
                    continue;
                }
                Some(None) => {
                    if framing == Framing::Chunked {
                        self.out.extend_from_slice(b"0\r\n\r\n");
                    }
                    return self.flush().await.is_ok();
                }
                Some(Some(Ok(frame))) => frame,
                Some(Some(Err(e))) => {
                    // The client sees a cut answer (its length short, or
                    // no last chunk); the operator sees it here.
                    proxy.metrics.cut_responses.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(generation = upstream.generation, error = %e, "the worker broke off a response after its head");
                    let _ = self.flush().await;
                    return false;
                }
            };
            bump(&self.activity.sent);
            // Trailers are not passed on, as on the path through hyper's
            // server: it sends only those the answer's `Trailer` line
            // declares, and that line is hop-by-hop (stripped above).
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if data.is_empty() {
                continue;
            }
            if framing == Framing::Chunked {
                self.out
                    .extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
            }
            if self.out.len() + data.len() > WRITE {
                if self.flush().await.is_err() || self.io.write_all(&data).await.is_err() {
                    return false;
                }
            } else {
                self.out.extend_from_slice(&data);
            }
            if framing == Framing::Chunked {
                self.out.extend_from_slice(b"\r\n");
            }
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        let r = self.io.write_all(&self.out).await;
        self.out.clear();
        r
    }

    /// Writes an answer `batond` made (503, 502, 504); whether the
    /// connection may take another request.
    async fn local(&mut self, resp: Response<ProxyBody>, close: bool) -> bool {
        let (mut parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        // A refusal closes the connection.
        let refused = parts
            .headers
            .get(header::CONNECTION)
            .is_some_and(|v| headers::lists_token(v, "close"));
        parts.headers.remove(header::CONNECTION);
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        let close = close || refused || self.shut.load(Ordering::Relaxed);
        self.out.clear();
        encode_local(&mut self.out, parts.status, &parts.headers, close);
        self.out.extend_from_slice(&body);
        bump(&self.activity.heads);
        self.flush().await.is_ok() && !close
    }
}

/// The worker's answer head as the client gets it: the worker's status
/// line and lines in its order (names in lower case, as hyper's server
/// writes them), without the hop-by-hop ones (RFC 9110 §7.6.1, with every
/// option `Connection` names) and the worker's framing (RFC 9112 §6.3:
/// `Transfer-Encoding`, and `Content-Length` beside it or where the body
/// is framed again by its length); then the framing towards the client,
/// `Date` when the worker sent none, and `Connection: close` when the
/// connection closes after this answer. As the path through hyper's
/// server writes it.
fn encode_answer(
    out: &mut Vec<u8>,
    head: &Head,
    framing: Framing,
    codings: Option<&str>,
    close: bool,
) {
    let status = head.status();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    let reason = head.reason();
    out.extend_from_slice(reason.unwrap_or(status.canonical_reason().unwrap_or("").as_bytes()));
    out.extend_from_slice(b"\r\n");
    let coded = head.values(b"transfer-encoding").next().is_some();
    let mut dated = false;
    for (name, value) in head.lines() {
        if headers::for_this_hop(name, head.values(b"connection")) {
            continue;
        }
        if name.eq_ignore_ascii_case(b"content-length")
            && (coded || matches!(framing, Framing::Length(_)))
        {
            continue;
        }
        dated |= name.eq_ignore_ascii_case(b"date");
        out.extend(name.iter().map(u8::to_ascii_lowercase));
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::Bodiless => {}
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => {
            out.extend_from_slice(b"transfer-encoding: ");
            if let Some(c) = codings {
                out.extend_from_slice(c.as_bytes());
                out.extend_from_slice(b", ");
            }
            out.extend_from_slice(b"chunked\r\n");
        }
    }
    end_head(out, dated, close);
}

/// `n` in decimal digits.
fn decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// The head of an answer `batond` made.
fn encode_local(out: &mut Vec<u8>, status: StatusCode, fields: &HeaderMap, close: bool) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in fields {
        line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    end_head(out, fields.contains_key(header::DATE), close);
}

/// `Date` unless `dated`, `Connection: close` when `close`, the empty line.
fn end_head(out: &mut Vec<u8>, dated: bool, close: bool) {
    if !dated {
        let now = httpdate::fmt_http_date(std::time::SystemTime::now());
        line(out, b"date", now.as_bytes());
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

impl Proxy {
    /// Sends a plain request's head (`head`) to the active worker and
    /// reads its answer's head, as `handle` does for the requests through
    /// hyper: held while no worker is healthy (then 503), sent to the
    /// replacement of a worker that did not take it (up to three times),
    /// sent again once after a reset when it is idempotent, 502 when the
    /// worker failed, 504 when it sent nothing for the idle timeout.
    async fn exchange(
        &self,
        head: &[u8],
        plain: &Plain,
        activity: &Activity,
    ) -> Result<(Head, LeanBody, Arc<Upstream>, Ticket), Response<ProxyBody>> {
        let Some((mut upstream, mut ticket)) = self.router.acquire(self.hold()).await else {
            return Err(self.unavailable());
        };
        let (mut refused, mut sent_again, mut short_since) = (0, false, None);
        loop {
            let (failure, refused_conn) = match upstream.pool.checkout_lean().await {
                Ok(mut conn) => {
                    let room = conn.head_mut();
                    room.clear();
                    room.extend_from_slice(head);
                    let answer = {
                        let send = crate::h1::send(conn, plain.head_only, &upstream.pool);
                        until_idle(std::pin::pin!(send), activity).await
                    };
                    match answer {
                        None => return Err(self.gateway_timeout(&upstream)),
                        Some(Ok((head, body))) => return Ok((head, body, upstream, ticket)),
                        // Not a byte left: as if refused, but the worker
                        // may take it on another connection.
                        Some(Err((e, true))) => (SendError::Lean(e), false),
                        Some(Err((e, false))) => {
                            let err = SendError::Lean(e);
                            // See `handle`: once, for a reset before any
                            // answer, from a worker not stopped on purpose.
                            let replay = plain.idempotent
                                && !sent_again
                                && connection_lost(&err)
                                && !upstream.is_retired();
                            if !replay {
                                return Err(self.bad_gateway(&upstream, &err));
                            }
                            sent_again = true;
                            tracing::info!(generation = upstream.generation, error = %err, "sending an idempotent request again");
                            drop(ticket);
                            let Some((u, t)) = self.after_reset(&upstream).await else {
                                return Err(self.unavailable());
                            };
                            (upstream, ticket) = (u, t);
                            continue;
                        }
                    }
                }
                Err(e) => (e, true),
            };
            if matches!(failure, SendError::Short(_)) {
                if self.wait_short(&mut short_since, &failure).await {
                    continue;
                }
                return Err(self.short(&failure));
            }
            if refused >= 3 {
                return Err(self.bad_gateway(&upstream, &failure));
            }
            refused += 1;
            tracing::info!(generation = upstream.generation, error = %failure, "worker did not take the request; waiting for its replacement");
            drop(ticket);
            let dead = refused_conn.then_some(&upstream);
            let Some((u, t)) = self.router.acquire_other(dead, self.hold()).await else {
                return Err(self.unavailable());
            };
            (upstream, ticket) = (u, t);
        }
    }
}

/// A client's stream with the bytes already read off it in front: what
/// hyper's server reads first when a connection moves to it.
pub(super) struct Rewound {
    pub(super) first: Bytes,
    pub(super) io: FirstByte,
}

impl AsyncRead for Rewound {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.first.is_empty() {
            let n = this.first.len().min(buf.remaining());
            buf.put_slice(&this.first.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewound {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(head: &str) -> (Parsed, String) {
        let mut out = Vec::new();
        let parsed = parse(head.as_bytes(), b"192.0.2.7", &mut out);
        (parsed, String::from_utf8(out).expect("utf-8"))
    }

    #[test]
    fn a_plain_request_is_rewritten_for_the_worker_in_one_pass() {
        let head = "GET /calls?id=7 HTTP/1.1\r\nHost: crm.example\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic x\r\nX-Forwarded-For: 198.51.100.1\r\nX-Forwarded-For:  \r\nX-Forwarded-For: 203.0.113.9\r\nAccept: */*\r\nVia: 1.1 edge\r\n\r\nGET /next";
        let (parsed, out) = rewrite(head);
        assert_eq!(
            parsed,
            Parsed::Plain(Plain {
                len: head.len() - "GET /next".len(),
                head_only: false,
                idempotent: true,
                close: false,
            })
        );
        assert_eq!(
            out,
            "GET /calls?id=7 HTTP/1.1\r\nHost: crm.example\r\nAccept: */*\r\nVia: 1.1 edge\r\n\
             x-forwarded-for: 198.51.100.1, 203.0.113.9, 192.0.2.7\r\n\
             x-forwarded-proto: http\r\nx-forwarded-host: crm.example\r\nvia: 1.1 batond\r\n\r\n"
        );
    }

    #[test]
    fn forwarding_headers_an_outer_proxy_set_are_kept() {
        let (parsed, out) = rewrite(
            "HEAD / HTTP/1.1\r\nhost: a\r\nx-forwarded-proto: https\r\nX-Forwarded-Host: public.example\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        );
        let Parsed::Plain(p) = parsed else {
            panic!("{parsed:?}")
        };
        assert!(p.head_only && p.idempotent && p.close, "{p:?}");
        assert_eq!(
            out,
            "HEAD / HTTP/1.1\r\nhost: a\r\nx-forwarded-proto: https\r\nX-Forwarded-Host: public.example\r\nContent-Length: 0\r\n\
             x-forwarded-for: 192.0.2.7\r\nvia: 1.1 batond\r\n\r\n"
        );
        // An empty Host names no host; a POST is not sent again; an
        // X-Forwarded-For named in Connection is the last hop's only.
        let (parsed, out) = rewrite(
            "POST /hook HTTP/1.1\r\nHost:\r\nConnection: x-forwarded-for\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n",
        );
        let Parsed::Plain(p) = parsed else {
            panic!("{parsed:?}")
        };
        assert!(!p.idempotent && !p.head_only && !p.close, "{p:?}");
        assert_eq!(
            out,
            "POST /hook HTTP/1.1\r\nHost: \r\nx-forwarded-for: 192.0.2.7\r\nx-forwarded-proto: http\r\nvia: 1.1 batond\r\n\r\n"
        );
    }

    fn answer(head: &str, head_only: bool, framing: Framing, close: bool) -> String {
        let head = Head::parsed(head, head_only);
        let codings = headers::codings_listed(head.values(b"transfer-encoding"));
        let mut out = Vec::new();
        encode_answer(&mut out, &head, framing, codings.as_deref(), close);
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn the_workers_answer_is_written_on_as_it_came_less_its_hops() {
        // Hop-by-hop lines out, those `Connection` names too (but `Host`),
        // the length framed again, names in lower case, order and the
        // reason phrase kept, no `Date` added to the worker's.
        let out = answer(
            "HTTP/1.1 200 Fine\r\nConnection: keep-alive, X-Trace, host\r\nX-Trace: a\r\n\
             Keep-Alive: timeout=5\r\nX-App-Signature: abc\r\nContent-Length: 5\r\nHost: w\r\n\
             Set-Cookie: a=1\r\nDate: Sat, 28 Nov 2026 12:00:00 GMT\r\nset-cookie: b=2\r\n\
             Proxy-Authenticate: Basic\r\nTrailer: X-Sum\r\n\r\nhello",
            false,
            Framing::Length(5),
            false,
        );
        assert_eq!(
            out,
            "HTTP/1.1 200 Fine\r\nx-app-signature: abc\r\nhost: w\r\nset-cookie: a=1\r\n\
             date: Sat, 28 Nov 2026 12:00:00 GMT\r\nset-cookie: b=2\r\ncontent-length: 5\r\n\r\n"
        );
        // Codings besides `chunked` stay named; a length beside them goes;
        // `Date` is added; the connection closes.
        let out = answer(
            "HTTP/1.1 201 \r\nTransfer-Encoding: gzip\r\nContent-Length: 9\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
            Framing::Chunked,
            true,
        );
        let (start, rest) = out.split_at(out.find("date: ").expect("a date"));
        assert_eq!(
            start,
            "HTTP/1.1 201 Created\r\ntransfer-encoding: gzip, chunked\r\n"
        );
        assert!(
            rest.ends_with(" GMT\r\nconnection: close\r\n\r\n"),
            "{rest:?}"
        );
        // A HEAD's answer keeps the length of what a GET would get.
        let out = answer(
            "HTTP/1.1 200 OK\r\nContent-Length: 42\r\nDate: x\r\n\r\n",
            true,
            Framing::Bodiless,
            false,
        );
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\ncontent-length: 42\r\ndate: x\r\n\r\n"
        );
        let mut digits = Vec::new();
        for n in [0, 7, 10, 1234567890, u64::MAX] {
            digits.clear();
            decimal(&mut digits, n);
            assert_eq!(digits, n.to_string().as_bytes());
        }
    }

    #[test]
    fn what_is_not_plain_goes_to_hypers_server() {
        for (what, head) in [
            (
                "a body",
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
            ),
            (
                "two lengths",
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
            ),
            (
                "a chunked body",
                "GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            ),
            (
                "an upgrade",
                "GET /media HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            ),
            (
                "an upgrade option alone",
                "GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, upgrade\r\n\r\n",
            ),
            (
                "Expect",
                "PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
            ),
            ("HTTP/1.0", "GET / HTTP/1.0\r\n\r\n"),
            ("absolute form", "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n"),
            ("asterisk form", "OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n"),
            ("CONNECT", "CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n"),
            ("no Host", "GET / HTTP/1.1\r\n\r\n"),
            ("two Hosts", "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
            (
                "a Host that is no host",
                "GET / HTTP/1.1\r\nHost: u@a\r\n\r\n",
            ),
            (
                "many options",
                "GET / HTTP/1.1\r\nHost: a\r\nConnection: a,b,c,d,e,f,g,h,i\r\n\r\n",
            ),
            (
                "a TLS handshake",
                "\x16\x03\x01\x02\x00\x01\x00\x01\x7c\x03\x03",
            ),
            ("HTTP/2", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            (
                "a bad header",
                "GET / HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n",
            ),
        ] {
            assert_eq!(rewrite(head).0, Parsed::Hyper, "{what}");
        }
        let many = format!(
            "GET / HTTP/1.1\r\nHost: a\r\n{}\r\n",
            "X: y\r\n".repeat(MAX_HEADER_LINES)
        );
        assert_eq!(rewrite(&many).0, Parsed::Hyper, "too many lines");
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_BUF));
        assert_eq!(rewrite(&long).0, Parsed::Hyper, "a head too large");
        assert_eq!(rewrite("GET / HTTP/1.1\r\nHost: a\r\n").0, Parsed::Partial);
        assert_eq!(rewrite("GE").0, Parsed::Partial);
    }
}
