//! Keep-alive connections from the proxy to one worker.
//!
//! Each [`Upstream`](crate::router::Upstream) owns one pool, so a worker's
//! idle connections die with it and never outlive a generation. Connections
//! are plain HTTP/1.1 (`hyper::client::conn::http1`) with upgrades enabled,
//! which keeps the proxy lean: no HTTP/2 machinery is linked into `batond`.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;

/// The error type of proxied bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Idle connections kept per worker.
const MAX_IDLE: usize = 256;
/// How long a connect to a loopback worker may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a request could not be sent to a worker.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made (refused, timed out): the request never
    /// left, so it may go to another worker.
    #[error("{0}")]
    Connect(std::io::Error),
    /// The exchange failed after the connection was made.
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

/// A worker's idle keep-alive connections.
#[derive(Debug)]
pub struct Pool {
    addr: SocketAddr,
    idle: Mutex<Vec<SendRequest<ReqBody>>>,
}

impl Pool {
    /// An empty pool for the worker at `addr`.
    pub fn new(addr: SocketAddr) -> Arc<Pool> {
        Arc::new(Pool {
            addr,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// An idle connection ready for a request, or a new one.
    ///
    /// # Errors
    /// [`SendError`] when no connection can be made.
    pub async fn checkout(&self) -> Result<SendRequest<ReqBody>, SendError> {
        loop {
            let next = self.idle.lock().ok().and_then(|mut v| v.pop());
            let Some(mut sender) = next else { break };
            match sender.ready().now_or_never() {
                Some(Ok(())) => return Ok(sender),
                // Closed, or still busy finishing the last response: let it go.
                Some(Err(_)) | None => continue,
            }
        }
        let stream =
            tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(self.addr))
                .await
                .map_err(|_| {
                    SendError::Connect(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "connect timed out",
                    ))
                })?
                .map_err(SendError::Connect)?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(sender)
    }

    /// Gives a connection back once its last response has been read.
    pub fn checkin(self: &Arc<Self>, mut sender: SendRequest<ReqBody>) {
        if sender.is_closed() {
            return;
        }
        if sender.is_ready() {
            self.put(sender);
            return;
        }
        // The connection task has not seen the end of the response yet.
        let pool = self.clone();
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                pool.put(sender);
            }
        });
    }

    fn put(&self, sender: SendRequest<ReqBody>) {
        if let Ok(mut v) = self.idle.lock()
            && v.len() < MAX_IDLE
        {
            v.push(sender);
        }
    }
}

/// A request body that can be taken back when the request never reached a
/// worker: the outgoing body only takes the real one out of the shared slot
/// on its first poll, so after a refused connection it is still there.
#[derive(Debug)]
pub struct Reclaim {
    slot: Arc<Mutex<Option<Incoming>>>,
    /// The body is empty (a GET, say): nothing to lose, nothing to take back.
    pub empty: bool,
    hint: SizeHint,
}

impl Reclaim {
    /// Wraps the client's body.
    pub fn new(body: Incoming) -> Reclaim {
        Reclaim {
            empty: body.is_end_stream(),
            hint: body.size_hint(),
            slot: Arc::new(Mutex::new(Some(body))),
        }
    }

    /// A body for one attempt.
    pub fn body(&self) -> ReqBody {
        ReqBody {
            slot: self.slot.clone(),
            inner: None,
            empty: self.empty,
            hint: self.hint,
        }
    }

    /// Whether no attempt has read the body yet.
    pub fn untouched(&self) -> bool {
        self.empty || self.slot.lock().is_ok_and(|s| s.is_some())
    }
}

/// The body of one attempt to send a request (see [`Reclaim`]).
#[derive(Debug)]
pub struct ReqBody {
    slot: Arc<Mutex<Option<Incoming>>>,
    inner: Option<Incoming>,
    empty: bool,
    hint: SizeHint,
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.empty {
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
        self.empty || self.inner.as_ref().is_some_and(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}
