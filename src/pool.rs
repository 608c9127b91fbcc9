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
        if let Ok(mut idle) = self.idle.lock() {
            // Newest first; a connection still finishing its last response
            // stays in the pool for the next request.
            let mut i = idle.len();
            while i > 0 {
                i -= 1;
                match idle[i].ready().now_or_never() {
                    Some(Ok(())) => return Ok(idle.swap_remove(i)),
                    Some(Err(_)) => {
                        idle.swap_remove(i);
                    }
                    None => {}
                }
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
        let (sender, conn) = http1::Builder::new()
            .writev(false)
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(sender)
    }

    /// Gives a connection back once its last response has been read (its
    /// task may not have seen the end yet: checkout checks readiness).
    pub fn checkin(&self, sender: SendRequest<ReqBody>) {
        if sender.is_closed() {
            return;
        }
        if let Ok(mut v) = self.idle.lock()
            && v.len() < MAX_IDLE
        {
            v.push(sender);
        }
    }
}

/// The body of a request to a worker: the client's, or none (a request
/// sent again after its first attempt was reset).
#[derive(Debug)]
pub enum ReqBody {
    /// The client's body, streamed.
    Client(Incoming),
    /// No body.
    Empty,
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ReqBody::Client(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|o| o.map(|r| r.map_err(Into::into))),
            ReqBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Client(b) => b.is_end_stream(),
            ReqBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Client(b) => b.size_hint(),
            ReqBody::Empty => SizeHint::with_exact(0),
        }
    }
}
