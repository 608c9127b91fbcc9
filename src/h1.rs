//! A lean HTTP/1.1 client for the requests to a worker that carry no body
//! and ask for no upgrade (most of what a proxy sends: `GET`, `HEAD`,
//! `DELETE`, a `POST` with `Content-Length: 0`).
//!
//! hyper's client connection hands each request to its connection through
//! a channel, answers through another, and keeps a dispatcher between
//! them; for a request that is a head alone, that machinery costs more
//! than the exchange itself. Here the request's own task writes the head
//! straight to the socket and parses the answer's head in place
//! (`httparse`, as hyper does): header values are slices of the bytes
//! read, not copies. The body ([`LeanBody`]) is read off the same socket
//! as the client takes it, and the connection goes back to its pool the
//! moment the worker's last byte has been read.
//!
//! Requests with a body, and upgrades, keep going through hyper's client
//! ([`crate::pool`]): streaming a body while an answer may already come
//! (and finishing the upload after it) is what hyper's dispatcher is for.
//!
//! The answer is read as RFC 9112 §6.3 says, as hyper's client reads it:
//! no body after `HEAD`, 1xx (skipped, but for 101), 204 and 304; chunked
//! when `Transfer-Encoding` ends in `chunked` (an HTTP/1.0 answer with
//! `Transfer-Encoding` is refused), to the connection's end when it has
//! another coding last or no length at all; else `Content-Length`, whose
//! values must agree. A connection is used again only after an answer
//! read whole, framed by its length, with nothing after it, from a worker
//! that did not ask to close (HTTP/1.0 needs `Connection: keep-alive`).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::TRANSFER_ENCODING;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Version};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::AsyncWriteExt;
use tokio_util::either::Either;

use crate::endpoint::Stream;
use crate::headers;
use crate::pool::{BoxError, MAX_BUF, Pool, ReqBody};

/// The most header lines a request or a worker's answer head (or its
/// trailers) may have: hyper's default, kept (a larger limit costs a heap
/// buffer per parsed head). HAProxy's is the same (`tune.http.maxhdr` 101,
/// with the request line); a request over it gets 431, an answer over it
/// 502.
pub const MAX_HEADER_LINES: usize = 100;
/// Header lines whose places are kept on the stack; more go to the heap.
const FEW_HEADERS: usize = 16;
/// The first read of an answer: most fit.
const FIRST_READ: usize = 8 * 1024;
/// The longest chunk-size line (with its extensions) taken.
const MAX_CHUNK_LINE: usize = 4 * 1024;

/// Why an exchange with a worker failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The worker closed the connection before its answer was complete.
    #[error("connection closed before message completed")]
    Closed,
    /// Reading or writing failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The answer's head is over [`MAX_BUF`] or [`MAX_HEADER_LINES`].
    #[error("message head is too large")]
    TooLarge,
    /// The answer is not HTTP/1.x as RFC 9112 frames it.
    #[error("the answer is not valid HTTP/1.1: {0}")]
    Invalid(&'static str),
}

impl Error {
    /// Whether the connection closed or was reset, rather than the answer
    /// being wrong.
    pub fn connection_lost(&self) -> bool {
        use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
        match self {
            Error::Closed => true,
            Error::Io(e) => matches!(
                e.kind(),
                ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
            ),
            Error::TooLarge | Error::Invalid(_) => false,
        }
    }
}

/// An idle connection to a worker, with what it has read and not used.
#[derive(Debug)]
pub struct LeanConn {
    io: Stream,
    /// Read from the worker, not yet taken.
    buf: BytesMut,
    /// The request head being written (kept: its room is used again).
    head: Vec<u8>,
    /// How much the next body read asks for: doubled, up to [`MAX_BUF`],
    /// while reads fill it.
    read_size: usize,
}

impl LeanConn {
    /// A connection just made (boxed: it moves between the pool, the
    /// exchange and the body with every request).
    pub fn new(io: Stream) -> Box<LeanConn> {
        Box::new(LeanConn {
            io,
            buf: BytesMut::new(),
            head: Vec::new(),
            read_size: FIRST_READ,
        })
    }

    /// Whether an idle connection may take a request: not closed by the
    /// worker, nothing sent by it while idle. Costs no system call unless
    /// the socket has been reported readable since its last read.
    pub fn is_idle(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let ready = match &self.io {
            Either::Left(s) => s.poll_read_ready(&mut cx),
            Either::Right(s) => s.poll_read_ready(&mut cx),
        };
        match ready {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            // Readable: an end of stream, a reset, stray bytes, or only the
            // readiness left from the last answer's read (cleared by this
            // read finding nothing).
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                let r = match &self.io {
                    Either::Left(s) => s.try_read(&mut probe),
                    Either::Right(s) => s.try_read(&mut probe),
                };
                matches!(r, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Where the next request's head is written before [`send`] (kept
    /// from one request to the next: its room is used again).
    pub fn head_mut(&mut self) -> &mut Vec<u8> {
        &mut self.head
    }

    /// The socket, for a connection that moves to hyper's client: only
    /// when nothing read is left over.
    pub fn into_io(self) -> Option<Stream> {
        self.buf.is_empty().then_some(self.io)
    }

    /// Reads more of the answer into `buf`; `Ok(0)` at the end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        self.buf.reserve(want);
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }
}

/// The result of [`exchange`]: the answer, or what failed and, when the
/// request never left, the request itself (to be sent elsewhere).
pub type Answer = Result<Response<LeanBody>, (Error, Option<Request<ReqBody>>)>;

/// Sends a bodiless request on `conn` and reads the answer's head. The
/// body is read as the caller takes it; `pool` gets the connection back
/// once the answer has been read whole.
pub async fn exchange(mut conn: Box<LeanConn>, req: Request<ReqBody>, pool: &Arc<Pool>) -> Answer {
    let head_only = req.method() == http::Method::HEAD;
    conn.head.clear();
    encode_head(&req, &mut conn.head);
    if let Err((e, none_sent)) = write_head(&mut conn).await {
        // Not a byte left: the request is still whole.
        return Err((e, none_sent.then_some(req)));
    }
    // Not kept through the wait for the answer.
    drop(req);
    let (head, body) = read_answer(conn, head_only, pool)
        .await
        .map_err(|e| (e, None))?;
    Ok(head.into_response().map(|()| body))
}

/// Sends the request head in [`LeanConn::head_mut`] (a request without a
/// body) and reads the answer's head, as [`exchange`] does, leaving it as
/// the worker wrote it. On failure, whether not a byte of the request
/// left.
pub async fn send(
    mut conn: Box<LeanConn>,
    head_only: bool,
    pool: &Arc<Pool>,
) -> Result<(Head, LeanBody), (Error, bool)> {
    write_head(&mut conn).await?;
    read_answer(conn, head_only, pool)
        .await
        .map_err(|e| (e, false))
}

/// Writes the head in `conn.head`; on failure, whether not a byte left.
async fn write_head(conn: &mut LeanConn) -> Result<(), (Error, bool)> {
    let mut sent = 0;
    while sent < conn.head.len() {
        match conn.io.write(&conn.head[sent..]).await {
            Ok(0) => return Err((Error::Io(io::ErrorKind::WriteZero.into()), sent == 0)),
            Ok(n) => sent += n,
            Err(e) => return Err((Error::Io(e), sent == 0)),
        }
    }
    Ok(())
}

/// Reads the answer's head; the body is read as the caller takes it.
async fn read_answer(
    mut conn: Box<LeanConn>,
    head_only: bool,
    pool: &Arc<Pool>,
) -> Result<(Head, LeanBody), Error> {
    loop {
        match parse_head(&mut conn.buf, head_only) {
            Ok(Parsed::Final(head, framing, keep_alive)) => {
                let mut body = LeanBody {
                    conn: Some(conn),
                    pool: pool.clone(),
                    framing,
                    keep_alive,
                };
                if body.is_end_stream() {
                    body.finish();
                }
                return Ok((head, body));
            }
            Ok(Parsed::Informational) => continue,
            Ok(Parsed::Partial) if conn.buf.len() >= MAX_BUF => return Err(Error::TooLarge),
            Ok(Parsed::Partial) => {}
            Err(e) => return Err(e),
        }
        match std::future::poll_fn(|cx| conn.poll_fill(cx, FIRST_READ)).await {
            Ok(0) => return Err(Error::Closed),
            Ok(_) => {}
            Err(e) => return Err(Error::Io(e)),
        }
    }
}

/// The request line and headers, as hyper's client writes them.
fn encode_head(req: &Request<ReqBody>, out: &mut Vec<u8>) {
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.push(b' ');
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in req.headers() {
        // No body goes with it: a framing header would promise one.
        if name == TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Where a header line's name and value lie in its head: name start and
/// end, value start and end.
type Span = (u32, u32, u32, u32);

/// An answer's head as the worker wrote it (checked as `http`'s header
/// types check names and values): its bytes and where each part lies. A
/// proxy that writes the head on as it came needs no header map.
#[derive(Debug)]
pub struct Head {
    bytes: Bytes,
    status: StatusCode,
    version: Version,
    /// The worker's reason phrase, when it gave one.
    reason: Option<(usize, usize)>,
    /// Most answers have a few lines: room for more is made only when
    /// they come.
    few: [Span; FEW_HEADERS],
    count: usize,
    more: Vec<Span>,
}

impl Head {
    /// The answer's status code.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The reason phrase the worker wrote, when it wrote one.
    pub fn reason(&self) -> Option<&[u8]> {
        self.reason.map(|(r0, r1)| &self.bytes[r0..r1])
    }

    /// Each header line's name and value, in the worker's order and case.
    pub fn lines(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.few[..self.count.min(FEW_HEADERS)]
            .iter()
            .chain(&self.more)
            .map(|&(n0, n1, v0, v1)| {
                (
                    &self.bytes[n0 as usize..n1 as usize],
                    &self.bytes[v0 as usize..v1 as usize],
                )
            })
    }

    /// The values of every line named `name` (in any case), in order.
    pub fn values<'a>(&'a self, name: &'a [u8]) -> impl Iterator<Item = &'a [u8]> {
        self.lines()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// The head at the start of `text` (a final answer), for tests.
    #[cfg(test)]
    pub(crate) fn parsed(text: &str, head_only: bool) -> Head {
        match parse_head(&mut BytesMut::from(text), head_only) {
            Ok(Parsed::Final(head, ..)) => head,
            Ok(_) => panic!("not a final answer's whole head: {text:?}"),
            Err(e) => panic!("{e}: {text:?}"),
        }
    }

    /// The head as a response for hyper: each value a slice of the bytes
    /// read, not a copy; the reason phrase kept when it is not the usual
    /// one.
    fn into_response(self) -> Response<()> {
        let mut headers = HeaderMap::with_capacity(self.count);
        for (name, value) in self.lines() {
            // Checked by `parse_head` as these check.
            let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name),
                HeaderValue::from_maybe_shared(self.bytes.slice_ref(value)),
            ) else {
                continue;
            };
            headers.append(name, value);
        }
        let mut resp = Response::new(());
        *resp.status_mut() = self.status;
        *resp.version_mut() = self.version;
        *resp.headers_mut() = headers;
        if let Some(reason) = self.reason()
            && self.status.canonical_reason().map(str::as_bytes) != Some(reason)
            && let Ok(r) = hyper::ext::ReasonPhrase::try_from(self.bytes.slice_ref(reason))
        {
            resp.extensions_mut().insert(r);
        }
        resp
    }
}

// The head is moved once, from the parse to its reader: no box for it.
#[expect(clippy::large_enum_variant)]
enum Parsed {
    /// The head is not all here yet.
    Partial,
    /// A 1xx answer (not 101), taken off the buffer: the real one follows.
    Informational,
    /// The answer's head (taken off the buffer), how its body is framed,
    /// and whether the connection may be used again after it.
    Final(Head, Framing, bool),
}

/// Parses the answer's head at the start of `buf`.
fn parse_head(buf: &mut BytesMut, head_only: bool) -> Result<Parsed, Error> {
    // Where each header's name and value lie in `buf`: the head becomes
    // one shared `Bytes`, and each value a slice of it.
    let mut few = [(0u32, 0u32, 0u32, 0u32); FEW_HEADERS];
    let mut more = Vec::new();
    let (len, code, version, reason, count) = {
        // Not zeroed first (httparse writes each before it is read).
        let mut lines = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADER_LINES];
        let mut r = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut r, buf, &mut lines);
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
            Err(httparse::Error::TooManyHeaders) => return Err(Error::TooLarge),
            Err(httparse::Error::Version) => return Err(Error::Invalid("bad HTTP version")),
            Err(httparse::Error::Status) => return Err(Error::Invalid("bad status code")),
            Err(_) => return Err(Error::Invalid("bad status line or header")),
        };
        let base = buf.as_ptr().addr();
        // Offsets within the buffer, which is far below 4 GiB (MAX_BUF).
        let offset = |p: *const u8| u32::try_from(p.addr() - base).unwrap_or(u32::MAX);
        for (i, h) in r.headers.iter().enumerate() {
            // httparse takes the bytes `http` takes in a name (a token)
            // and in a value (no control but tab); a name is also at most
            // `http`'s longest.
            if h.name.len() > usize::from(u16::MAX) {
                return Err(Error::Invalid("bad header name"));
            }
            let name = offset(h.name.as_ptr());
            let value = offset(h.value.as_ptr());
            let span = (
                name,
                name + h.name.len() as u32,
                value,
                value + h.value.len() as u32,
            );
            match few.get_mut(i) {
                Some(slot) => *slot = span,
                None => more.push(span),
            }
        }
        let reason = r.reason.unwrap_or("").as_bytes();
        let reason = (!reason.is_empty()).then(|| {
            let start = reason.as_ptr().addr() - base;
            (start, start + reason.len())
        });
        (
            len,
            r.code.unwrap_or(0),
            r.version.unwrap_or(1),
            reason,
            r.headers.len(),
        )
    };
    let bytes = buf.split_to(len).freeze();
    let status = StatusCode::from_u16(code).map_err(|_| Error::Invalid("bad status code"))?;
    if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(Parsed::Informational);
    }
    let version = if version == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let head = Head {
        bytes,
        status,
        version,
        reason,
        few,
        count,
        more,
    };
    let (mut close, mut keep) = (false, false);
    for value in head.values(b"connection") {
        close |= headers::lists(value, b"close");
        keep |= headers::lists(value, b"keep-alive");
    }
    let framing = framing(&head, head_only)?;
    let keep_alive = !close
        && (version == Version::HTTP_11 || keep)
        && !matches!(framing, Framing::ToEnd)
        && status != StatusCode::SWITCHING_PROTOCOLS;
    Ok(Parsed::Final(head, framing, keep_alive))
}

/// How an answer's body is framed (RFC 9112 §6.3).
fn framing(head: &Head, head_only: bool) -> Result<Framing, Error> {
    let status = head.status;
    if head_only
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Length(0));
    }
    if let Some(last) = head.values(b"transfer-encoding").last() {
        if head.version == Version::HTTP_10 {
            return Err(Error::Invalid("Transfer-Encoding in an HTTP/1.0 answer"));
        }
        // A value that is not ASCII names no coding `chunked`.
        let chunked = last.is_ascii()
            && last
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        return Ok(if chunked {
            Framing::Chunked(Chunk::Size)
        } else {
            Framing::ToEnd
        });
    }
    let mut length = None;
    for line in head.values(b"content-length") {
        let line = std::str::from_utf8(line)
            .ok()
            .filter(|l| l.is_ascii())
            .ok_or(Error::Invalid("bad Content-Length"))?;
        for v in line.split(',') {
            let n = digits(v.trim()).ok_or(Error::Invalid("bad Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(Error::Invalid("Content-Length values differ"));
            }
            length = Some(n);
        }
    }
    Ok(length.map_or(Framing::ToEnd, Framing::Length))
}

/// A decimal length, digits only.
fn digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[derive(Debug)]
enum Framing {
    /// This many bytes are still to come.
    Length(u64),
    /// Chunked, at this point of a chunk.
    Chunked(Chunk),
    /// Until the worker closes the connection.
    ToEnd,
    /// All read.
    Done,
}

#[derive(Debug, Clone, Copy)]
enum Chunk {
    /// At a chunk-size line.
    Size,
    /// In a chunk's data, with this much still to come.
    Data(u64),
    /// At the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: at the trailers (or the empty line).
    Trailers,
}

/// What one step of decoding gives.
enum Step {
    Frame(Frame<Bytes>),
    /// The body has ended.
    End,
    /// More bytes are needed first.
    More,
}

/// An answer's body, read off the worker connection as the client takes
/// it; the connection goes back to its pool at the body's end.
#[derive(Debug)]
pub struct LeanBody {
    /// Until the body ends (or fails).
    conn: Option<Box<LeanConn>>,
    pool: Arc<Pool>,
    framing: Framing,
    keep_alive: bool,
}

impl LeanBody {
    /// The body has been read whole: the connection goes back, if it may.
    fn finish(&mut self) {
        self.framing = Framing::Done;
        if let Some(conn) = self.conn.take()
            && self.keep_alive
            && conn.buf.is_empty()
        {
            self.pool.keep_lean(conn);
        }
    }

    /// Decodes what `buf` holds.
    fn step(&mut self) -> Result<Step, Error> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(Step::End);
        };
        let buf = &mut conn.buf;
        loop {
            match &mut self.framing {
                Framing::Done | Framing::Length(0) => return Ok(Step::End),
                Framing::Length(rest) => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    let n = usize::try_from(*rest).unwrap_or(usize::MAX).min(buf.len());
                    *rest -= n as u64;
                    return Ok(Step::Frame(Frame::data(buf.split_to(n).freeze())));
                }
                Framing::ToEnd => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    return Ok(Step::Frame(Frame::data(buf.split().freeze())));
                }
                Framing::Chunked(state) => match *state {
                    Chunk::Size => {
                        let Some(eol) = buf.iter().position(|&b| b == b'\n') else {
                            if buf.len() > MAX_CHUNK_LINE {
                                return Err(Error::Invalid("chunk-size line too long"));
                            }
                            return Ok(Step::More);
                        };
                        let size = chunk_size(&buf[..=eol])?;
                        let _ = buf.split_to(eol + 1);
                        *state = if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        };
                    }
                    Chunk::Data(rest) => {
                        if buf.is_empty() {
                            return Ok(Step::More);
                        }
                        let n = usize::try_from(rest).unwrap_or(usize::MAX).min(buf.len());
                        let left = rest - n as u64;
                        *state = if left == 0 {
                            Chunk::DataEnd
                        } else {
                            Chunk::Data(left)
                        };
                        return Ok(Step::Frame(Frame::data(buf.split_to(n).freeze())));
                    }
                    Chunk::DataEnd => {
                        if buf.len() < 2 {
                            return Ok(Step::More);
                        }
                        if &buf[..2] != b"\r\n" {
                            return Err(Error::Invalid("no CRLF after chunk data"));
                        }
                        let _ = buf.split_to(2);
                        *state = Chunk::Size;
                    }
                    Chunk::Trailers => {
                        let mut lines = [httparse::EMPTY_HEADER; MAX_HEADER_LINES];
                        let (len, trailers) = match httparse::parse_headers(buf, &mut lines) {
                            Ok(httparse::Status::Complete((len, lines))) => {
                                let mut map = HeaderMap::with_capacity(lines.len());
                                for h in lines.iter() {
                                    let name = HeaderName::from_bytes(h.name.as_bytes())
                                        .map_err(|_| Error::Invalid("bad trailer name"))?;
                                    let value = HeaderValue::from_bytes(h.value)
                                        .map_err(|_| Error::Invalid("bad trailer value"))?;
                                    map.append(name, value);
                                }
                                (len, map)
                            }
                            Ok(httparse::Status::Partial) if buf.len() >= MAX_BUF => {
                                return Err(Error::TooLarge);
                            }
                            Ok(httparse::Status::Partial) => return Ok(Step::More),
                            Err(httparse::Error::TooManyHeaders) => return Err(Error::TooLarge),
                            Err(_) => return Err(Error::Invalid("bad trailers")),
                        };
                        let _ = buf.split_to(len);
                        self.framing = Framing::Done;
                        if trailers.is_empty() {
                            return Ok(Step::End);
                        }
                        return Ok(Step::Frame(Frame::trailers(trailers)));
                    }
                },
            }
        }
    }
}

/// The size on a chunk-size line (`line` ends with its LF): hex digits,
/// then optional whitespace and extensions (ignored), then CRLF.
fn chunk_size(line: &[u8]) -> Result<u64, Error> {
    let bad = Error::Invalid("bad chunk-size line");
    let Some(line) = line.strip_suffix(b"\r\n") else {
        return Err(bad);
    };
    let end = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let (hex, rest) = line.split_at(end);
    // 16 hex digits are a u64.
    if hex.is_empty() || hex.len() > 16 {
        return Err(bad);
    }
    let rest = rest.trim_ascii_start();
    if !rest.is_empty() && rest[0] != b';' {
        return Err(bad);
    }
    std::str::from_utf8(hex)
        .ok()
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .ok_or(bad)
}

impl Body for LeanBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        // Bounded: each read either adds bytes (then a step decodes them)
        // or ends the body.
        loop {
            match this.step() {
                Ok(Step::Frame(f)) => {
                    if this.is_end_stream() {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(f)));
                }
                Ok(Step::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Step::More) => {}
                Err(e) => {
                    this.conn = None;
                    this.framing = Framing::Done;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let want = conn.read_size;
            match conn.poll_fill(cx, want) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    this.conn = None;
                    if matches!(this.framing, Framing::ToEnd) {
                        this.framing = Framing::Done;
                        return Poll::Ready(None);
                    }
                    this.framing = Framing::Done;
                    return Poll::Ready(Some(Err(Error::Closed.into())));
                }
                Poll::Ready(Ok(n)) => {
                    if n >= want {
                        conn.read_size = (want * 2).min(MAX_BUF);
                    }
                }
                Poll::Ready(Err(e)) => {
                    this.conn = None;
                    this.framing = Framing::Done;
                    return Poll::Ready(Some(Err(Error::Io(e).into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.framing, Framing::Done | Framing::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Done => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::endpoint::Endpoint;
    use crate::pool::Conn;

    const PATIENCE: Duration = Duration::from_secs(10);

    /// A worker that answers each request on one connection with the next
    /// of `answers` (written `piece` bytes at a time), then closes; it
    /// gives back the request heads it read.
    async fn worker(
        answers: Vec<Vec<u8>>,
        piece: usize,
    ) -> (SocketAddr, tokio::task::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            s.set_nodelay(true).expect("nodelay");
            let mut heads = Vec::new();
            for answer in answers {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match tokio::time::timeout(PATIENCE, s.read(&mut byte)).await {
                        Ok(Ok(1)) => head.push(byte[0]),
                        _ => return heads,
                    }
                }
                heads.push(String::from_utf8_lossy(&head).into_owned());
                for part in answer.chunks(piece) {
                    s.write_all(part).await.expect("write");
                    if piece < answer.len() {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
            heads
        });
        (addr, task)
    }

    fn pool(addr: SocketAddr) -> Arc<Pool> {
        Pool::new(Endpoint::Tcp(addr), Duration::from_secs(60))
    }

    async fn lean(pool: &Arc<Pool>) -> Box<LeanConn> {
        match pool.checkout(true).await.expect("checkout") {
            Conn::Lean(c) => c,
            Conn::Hyper(_) => panic!("a lean checkout gave hyper's connection"),
        }
    }

    fn get(method: &str, target: &str) -> Request<ReqBody> {
        Request::builder()
            .method(method)
            .uri(target)
            .header("host", "w")
            .body(ReqBody::Empty)
            .expect("request")
    }

    /// Sends one request and reads the whole answer: status, body,
    /// trailers, and whether the connection went back to the pool.
    async fn one(
        answer: &[u8],
        method: &str,
        piece: usize,
    ) -> (
        Response<()>,
        Result<(Vec<u8>, Option<HeaderMap>), String>,
        bool,
    ) {
        let (addr, _worker) = worker(vec![answer.to_vec()], piece).await;
        let pool = pool(addr);
        let conn = lean(&pool).await;
        let resp = tokio::time::timeout(PATIENCE, exchange(conn, get(method, "/x"), &pool))
            .await
            .expect("timeout")
            .map_err(|(e, _)| e)
            .expect("answer");
        let (parts, body) = resp.into_parts();
        let body = match tokio::time::timeout(PATIENCE, body.collect()).await {
            Ok(Ok(c)) => {
                let trailers = c.trailers().cloned();
                Ok((c.to_bytes().to_vec(), trailers))
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".into()),
        };
        let kept = pool.idle_kinds() == (0, 1);
        (Response::from_parts(parts, ()), body, kept)
    }

    #[tokio::test]
    async fn answers_are_framed_as_rfc_9112_says() {
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 11\r\n\r\n";
        // (answer, method, body, connection used again)
        let cases: &[(&[u8], &str, &[u8], bool)] = &[
            (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", "GET", b"hello", true),
            (chunked, "GET", b"hello world", true),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", "GET", b"abc", true),
            // No length: to the end of the connection, which is then gone.
            (b"HTTP/1.1 200 OK\r\n\r\nto the end", "GET", b"to the end", false),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nzipped", "GET", b"zipped", false),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", "HEAD", b"", true),
            (b"HTTP/1.1 204 No Content\r\n\r\n", "DELETE", b"", true),
            (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n", "GET", b"", true),
            (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", "GET", b"ok", true),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\nContent-Length: 2\r\n\r\nok", "GET", b"ok", true),
            (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", "GET", b"ok", false),
            (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", "GET", b"ok", false),
            (b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\nok", "GET", b"ok", true),
            // Bytes with the answer, after its end: the connection cannot
            // be trusted. (Bytes that come later, when the answer has been
            // read, are seen when the connection is next taken: see
            // `an_idle_connection_the_worker_closed_or_wrote_to_is_not_taken`.)
            (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n", "GET", b"ok", false),
        ];
        let last = cases.len() - 1;
        for (i, &(answer, method, want, reused)) in cases.iter().enumerate() {
            for piece in [usize::MAX, 1] {
                let (resp, body, kept) = one(answer, method, piece).await;
                let (body, _) = body.unwrap_or_else(|e| panic!("case {i} piece {piece}: {e}"));
                assert_eq!(body, want, "case {i} piece {piece}");
                if i != last || piece != 1 {
                    assert_eq!(kept, reused, "case {i} piece {piece}: used again");
                }
                assert!(resp.status().is_success() || resp.status().is_redirection());
            }
        }
        let (resp, body, _) = one(chunked, "GET", 1).await;
        let (_, trailers) = body.expect("body");
        let trailers = trailers.expect("trailers");
        assert_eq!(trailers["x-sum"], "11");
        assert_eq!(resp.headers()["transfer-encoding"], "chunked");
        // A reason phrase of the worker's own is kept; the usual one is not
        // stored.
        let (resp, _, _) = one(b"HTTP/1.1 200 Fine\r\nContent-Length: 0\r\n\r\n", "GET", 4).await;
        let reason = resp.extensions().get::<hyper::ext::ReasonPhrase>();
        assert_eq!(reason.map(|r| r.as_bytes()), Some(&b"Fine"[..]));
        let (resp, _, _) = one(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", "GET", 4).await;
        assert!(
            resp.extensions()
                .get::<hyper::ext::ReasonPhrase>()
                .is_none()
        );
        assert_eq!(resp.version(), Version::HTTP_11);
    }

    #[tokio::test]
    async fn broken_answers_fail_with_what_was_wrong() {
        let many: String = (0..101).map(|i| format!("X-{i}: v\r\n")).collect();
        let many = format!("HTTP/1.1 200 OK\r\n{many}\r\n");
        let long = format!("HTTP/1.1 200 OK\r\nX-Long: {}\r\n", "a".repeat(MAX_BUF));
        // (answer, the error, whether it is a lost connection)
        let heads: &[(&[u8], &str, bool)] = &[
            (b"", "connection closed before message completed", true),
            (
                b"HTTP/1.1 200 OK\r\nContent-Le",
                "connection closed before message completed",
                true,
            ),
            (b"this is not http\r\n\r\n", "bad HTTP version", false),
            (b"HTTP/1.1 2000 OK\r\n\r\n", "bad status code", false),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
                "Content-Length values differ",
                false,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                "bad Content-Length",
                false,
            ),
            (
                b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                "Transfer-Encoding in an HTTP/1.0 answer",
                false,
            ),
            (many.as_bytes(), "message head is too large", false),
            (long.as_bytes(), "message head is too large", false),
        ];
        for &(answer, want, lost) in heads {
            let (addr, _worker) = worker(vec![answer.to_vec()], usize::MAX).await;
            let pool = pool(addr);
            let conn = lean(&pool).await;
            let r = tokio::time::timeout(PATIENCE, exchange(conn, get("GET", "/"), &pool))
                .await
                .expect("timeout");
            let Err((e, back)) = r else {
                panic!("{want}: an answer");
            };
            assert!(e.to_string().contains(want), "{want}: {e}");
            assert_eq!(e.connection_lost(), lost, "{want}");
            assert!(back.is_none(), "{want}: the request was sent");
        }
        // Bodies that break after the head: the error comes as the body's.
        let bodies: &[(&[u8], &str)] = &[
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort",
                "connection closed before message completed",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
                "bad chunk-size line",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
                "no CRLF after chunk data",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
                "connection closed before message completed",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n11111111111111111\r\n",
                "bad chunk-size line",
            ),
        ];
        for &(answer, want) in bodies {
            let (_, body, kept) = one(answer, "GET", usize::MAX).await;
            let e = body.expect_err(want);
            assert!(e.contains(want), "{want}: {e}");
            assert!(!kept, "{want}: a broken connection was kept");
        }
    }

    #[tokio::test]
    async fn the_request_goes_out_as_its_head_alone_and_the_connection_is_used_again() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec();
        let (addr, worker) = worker(vec![ok.clone(), ok], usize::MAX).await;
        let pool = pool(addr);
        for target in ["/a?b=c", "/d"] {
            let mut req = get("POST", target);
            req.headers_mut()
                .insert("content-length", HeaderValue::from_static("0"));
            req.headers_mut()
                .insert("transfer-encoding", HeaderValue::from_static("chunked"));
            let conn = lean(&pool).await;
            let resp = exchange(conn, req, &pool).await.map_err(|(e, _)| e);
            let body = resp.expect("answer").into_body().collect().await;
            assert_eq!(&body.expect("body").to_bytes()[..], b"ok");
            assert_eq!(pool.idle_kinds(), (0, 1), "{target}");
        }
        drop(pool);
        let heads = tokio::time::timeout(PATIENCE, worker)
            .await
            .expect("timeout")
            .expect("join");
        assert_eq!(
            heads,
            [
                "POST /a?b=c HTTP/1.1\r\nhost: w\r\ncontent-length: 0\r\n\r\n",
                "POST /d HTTP/1.1\r\nhost: w\r\ncontent-length: 0\r\n\r\n"
            ]
        );
    }

    #[tokio::test]
    async fn an_idle_connection_the_worker_closed_or_wrote_to_is_not_taken() {
        for stray in [&b""[..], b"HTTP/1.1 408 Request Timeout\r\n\r\n"] {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let pool = pool(listener.local_addr().expect("addr"));
            let mut conn = lean(&pool).await;
            let (mut s, _) = listener.accept().await.expect("accept");
            assert!(conn.is_idle(), "a fresh connection");
            // Taken again while nothing came: still idle.
            assert!(conn.is_idle(), "a fresh connection, again");
            s.write_all(stray).await.expect("write");
            if stray.is_empty() {
                drop(s);
            }
            let mut seen = false;
            for _ in 0..500 {
                if !conn.is_idle() {
                    seen = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(seen, "{stray:?} was not seen");
        }
        // A request on a connection the worker closed fails as a lost
        // connection: the head may still go out (the kernel takes it),
        // so the request is not given back.
        let (addr, worker) = worker(vec![], usize::MAX).await;
        let pool = pool(addr);
        let conn = lean(&pool).await;
        tokio::time::timeout(PATIENCE, worker)
            .await
            .expect("timeout")
            .expect("join");
        let r = exchange(conn, get("GET", "/"), &pool).await;
        let Err((e, _)) = r else {
            panic!("an answer from a closed connection");
        };
        assert!(e.connection_lost(), "{e}");
        assert_eq!(pool.idle_kinds(), (0, 0));
    }
}
