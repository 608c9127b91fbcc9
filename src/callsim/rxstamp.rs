//! A TCP stream that remembers when the kernel received what it last read
//! (`SO_TIMESTAMPNS`).
//!
//! Pacing jitter is a property of what reaches the wire: Twilio's edge
//! times a frame when its packet arrives, not when some busy program gets
//! round to reading it. `callsim` shares the machine with the daemon and
//! the worker it measures, so it times each frame by the kernel's receive
//! timestamp; its own scheduling delays are then not counted against them.
//! The stamp is that of the last packet a read took in: when callsim falls
//! more than a frame behind, the frames of one read share it (and the
//! kernel may have merged their packets), which shows up as jitter, not as
//! less of it.

use std::io::{self, IoSliceMut};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg, setsockopt, sockopt};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// The receive time (nanoseconds of `CLOCK_REALTIME`) of the data read
/// last, shared with whoever parses it; 0 until something was read.
#[derive(Debug, Clone, Default)]
pub struct RxTime(Arc<AtomicU64>);

impl RxTime {
    /// Nanoseconds since the epoch, or `None` before the first read.
    pub fn get(&self) -> Option<u64> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            t => Some(t),
        }
    }
}

/// A [`TcpStream`] whose reads record their kernel receive time.
#[derive(Debug)]
pub struct RxStamped {
    inner: TcpStream,
    rx: RxTime,
    cmsg: Vec<u8>,
}

impl RxStamped {
    /// Turns on receive timestamps for `inner`.
    ///
    /// # Errors
    /// The socket option could not be set.
    pub fn new(inner: TcpStream) -> io::Result<(RxStamped, RxTime)> {
        setsockopt(&inner, sockopt::ReceiveTimestampns, &true).map_err(io::Error::from)?;
        let rx = RxTime::default();
        Ok((
            RxStamped {
                inner,
                rx: rx.clone(),
                cmsg: nix::cmsg_space!(nix::sys::time::TimeSpec),
            },
            rx,
        ))
    }
}

impl AsyncRead for RxStamped {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            ready!(this.inner.poll_read_ready(cx))?;
            let fd = this.inner.as_raw_fd();
            let cmsg = &mut this.cmsg;
            let unfilled = buf.initialize_unfilled();
            let r = this.inner.try_io(Interest::READABLE, || {
                let mut iov = [IoSliceMut::new(unfilled)];
                let msg = recvmsg::<()>(fd, &mut iov, Some(cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
                    .map_err(io::Error::from)?;
                let mut stamp = None;
                if let Ok(cmsgs) = msg.cmsgs() {
                    for c in cmsgs {
                        if let ControlMessageOwned::ScmTimestampns(ts) = c {
                            let ns =
                                i128::from(ts.tv_sec()) * 1_000_000_000 + i128::from(ts.tv_nsec());
                            stamp = u64::try_from(ns).ok();
                        }
                    }
                }
                Ok((msg.bytes, stamp))
            });
            match r {
                Ok((n, stamp)) => {
                    // A read without a stamp clears it: the reader then
                    // falls back to its own clock rather than an old stamp.
                    this.rx
                        .0
                        .store(stamp.map_or(0, |t| t.max(1)), Ordering::Relaxed);
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for RxStamped {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Reads come through whole and carry a receive time taken when the
    /// data arrived, not when it was read.
    #[tokio::test]
    async fn reads_carry_the_kernel_receive_time() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (mut stream, rx) = RxStamped::new(client.expect("connect")).expect("stamped");
        let (mut server, _) = server.expect("accept");
        assert_eq!(rx.get(), None);
        // The kernel turns packet timestamps on a moment after the first
        // socket asks for them: the first packets may come without one.
        let mut stamped = None;
        for _ in 0..100 {
            server.write_all(b"hello").await.expect("write");
            // On loopback the data is in the receiver's queue once the
            // write returns: its receive time cannot be later than this.
            let mark = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_nanos();
            // Read well after the data arrived.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            let before = rx.get();
            let mut buf = [0u8; 16];
            let n = stream.read(&mut buf).await.expect("read");
            assert_eq!(&buf[..n], b"hello");
            if let Some(at) = rx.get().filter(|t| Some(*t) != before) {
                stamped = Some((u128::from(at), mark));
                break;
            }
        }
        let (at, mark) = stamped.expect("no read carried a receive time");
        assert!(
            at <= mark,
            "receive time {at} is after {mark}: the read's time, not the arrival's"
        );
        stream.write_all(b"back").await.expect("write back");
        let mut buf = [0u8; 16];
        let n = server.read(&mut buf).await.expect("read back");
        assert_eq!(&buf[..n], b"back");
    }
}
