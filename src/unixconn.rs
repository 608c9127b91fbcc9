//! A Unix stream socket watched for reading only, and for room only while a
//! write waits: both ends of a worker connection on a Unix socket use it
//! (`batond`'s connections to a worker, the worker's accepted ones).
//!
//! A Unix socket tells its writer's watchers there is room again every time
//! its reader takes a message off it. tokio watches every socket it wraps for
//! reading and writing, so each message one side read put an event on the
//! other side's epoll and, when that side was idle, woke it for nothing,
//! and the reader paid for the wake-up in its read. Measured on the worker's
//! side, with `batond` in front: 0.33-0.43 voluntary sleeps of the worker
//! per request, against 0.12-0.16 with the watch for reading only. HAProxy
//! watches its sockets for reading only, too. [`UnixConn`] writes without
//! asking first, and watches for room only while a write waits for it.
//! TCP sockets report room only after a write found none, so they keep
//! tokio's stream.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::UnixStream;

/// The most one read takes.
const READ_MAX: usize = 64 * 1024;

/// A Unix stream socket watched for reading only (see the module's doc).
#[derive(Debug)]
pub struct UnixConn {
    /// While a write waits for room: the same socket under a descriptor of
    /// its own, watched for writing (epoll keeps a watch per descriptor,
    /// and one socket's two watches are two). Dropped once the write is
    /// done, which ends the watch.
    room: Option<AsyncFd<OwnedFd>>,
    io: AsyncFd<std::os::unix::net::UnixStream>,
}

// === impl UnixConn ===

impl UnixConn {
    /// Moves a stream (accepted or connected) to a watch for reading only.
    ///
    /// # Errors
    /// When the runtime cannot watch it.
    pub fn new(stream: UnixStream) -> io::Result<UnixConn> {
        Ok(UnixConn {
            room: None,
            io: watch(stream.into_std()?, Interest::READABLE)?,
        })
    }

    /// Runs `f` on the socket once it is readable, until `f` does not say
    /// `WouldBlock` (a peek, say).
    ///
    /// # Errors
    /// What `f` returns.
    pub async fn read_with<R>(
        &self,
        mut f: impl FnMut(BorrowedFd<'_>) -> io::Result<R>,
    ) -> io::Result<R> {
        self.io.async_io(Interest::READABLE, |s| f(s.as_fd())).await
    }

    /// Whether the socket has been reported readable since a read last
    /// found nothing (`Pending` registers `cx`), as tokio's streams say it.
    ///
    /// # Errors
    /// When the runtime is gone.
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io.poll_read_ready(cx).map_ok(|_| ())
    }

    /// One read that does not wait: `WouldBlock` when nothing is there,
    /// which clears the readiness, as tokio's streams' `try_read` does.
    ///
    /// # Errors
    /// The read's error, or `WouldBlock`.
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.io.try_io(Interest::READABLE, |mut s| s.read(buf))
    }

    /// Writes with `f`, first without asking, then each time there is room.
    fn poll_write_with(
        &mut self,
        cx: &mut Context<'_>,
        f: impl Fn(&std::os::unix::net::UnixStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            match f(self.io.get_ref()) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                done => {
                    self.room = None;
                    return Poll::Ready(done);
                }
            }
            let room = match &mut self.room {
                Some(room) => room,
                slot @ None => {
                    let fd = self.io.get_ref().as_fd().try_clone_to_owned()?;
                    slot.insert(watch(fd, Interest::WRITABLE)?)
                }
            };
            // A new watch reports the socket as it is, so room made since
            // the failed write is not missed. Cleared once seen: the next
            // failure waits for the next change.
            ready!(room.poll_write_ready(cx))?.clear_ready();
        }
    }
}

/// Registers `fd` with the runtime for `interest`.
///
/// tokio deprecates its safe constructor because a type might hand out a
/// descriptor it does not own; both types used here own theirs, which stay
/// open until the watch is dropped, and the watch ends first.
#[allow(deprecated)]
fn watch<T: AsRawFd>(fd: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    AsyncFd::with_interest(fd, interest)
}

thread_local! {
    /// Where reads land before they are copied to the reader's buffer.
    /// That buffer is not yet written, which safe code cannot read into;
    /// zeroing it first (hyper hands over 8 KiB or more each time) would
    /// cost more than copying what came.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl AsyncRead for UnixConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let want = buf.remaining().min(READ_MAX);
        if want == 0 {
            // No room to read into: nothing read, nothing taken.
            return Poll::Ready(Ok(()));
        }
        loop {
            let mut guard = ready!(self.io.poll_read_ready(cx))?;
            let read = SCRATCH.with_borrow_mut(|scratch| {
                if scratch.len() < want {
                    scratch.resize(want, 0);
                }
                let read = guard.try_io(|s| s.get_ref().read(&mut scratch[..want]));
                if let Ok(Ok(n)) = read {
                    buf.put_slice(&scratch[..n]);
                    // Less than asked for: the socket is empty now (a
                    // stream read takes all there is, up to the size). The
                    // next read waits for the next event instead of
                    // finding out with a read that fails, as tokio's own
                    // streams do. Bytes that come after this read raise a
                    // new event, and a clear of a reading older than that
                    // event is ignored. An end of stream stays readable.
                    if n > 0 && n < want {
                        guard.clear_ready();
                    }
                }
                read
            });
            if let Ok(read) = read {
                return Poll::Ready(read.map(|_| ()));
            }
        }
    }
}

impl AsyncWrite for UnixConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_with(cx, |mut s| s.write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_with(cx, |mut s| s.write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.io.get_ref().shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const EPOLLIN: u32 = 0x1;
    const EPOLLOUT: u32 = 0x4;

    /// What this process's epoll instances watch the socket `ino` for, one
    /// entry a watch (`/proc/self/fdinfo`: `tfd: N events: HEX ... ino:HEX`).
    /// An instance the runtime holds under two descriptors is read once.
    fn watches(ino: u64) -> Vec<u32> {
        let mut instances = std::collections::BTreeSet::new();
        for entry in std::fs::read_dir("/proc/self/fd").expect("fds").flatten() {
            let is_epoll = std::fs::read_link(entry.path())
                .is_ok_and(|t| t.to_string_lossy().contains("eventpoll"));
            let info = std::fs::read_to_string(
                std::path::Path::new("/proc/self/fdinfo").join(entry.file_name()),
            );
            if let (true, Ok(info)) = (is_epoll, info) {
                let lines: Vec<String> = info
                    .lines()
                    .filter(|l| l.starts_with("tfd:"))
                    .map(str::to_string)
                    .collect();
                instances.insert(lines);
            }
        }
        let mut found = Vec::new();
        for line in instances.iter().flatten() {
            let words: Vec<&str> = line.split_whitespace().collect();
            let after = |name: &str| {
                let i = words.iter().position(|w| *w == name)?;
                words.get(i + 1).copied()
            };
            let ino_here = words
                .iter()
                .find_map(|w| w.strip_prefix("ino:"))
                .and_then(|v| u64::from_str_radix(v, 16).ok());
            let events = after("events:").and_then(|v| u32::from_str_radix(v, 16).ok());
            if let (Some(i), Some(ev)) = (ino_here, events)
                && i == ino
            {
                found.push(ev);
            }
        }
        found
    }

    fn pair() -> (UnixConn, UnixStream, u64) {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        a.set_nonblocking(true).expect("nonblocking");
        b.set_nonblocking(true).expect("nonblocking");
        let ino = std::fs::metadata(format!("/proc/self/fd/{}", a.as_raw_fd()))
            .expect("socket inode")
            .ino();
        let conn = UnixConn::new(UnixStream::from_std(a).expect("register")).expect("watch");
        (conn, UnixStream::from_std(b).expect("register"), ino)
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    #[tokio::test]
    async fn a_unix_connection_is_watched_for_room_only_while_a_write_waits() {
        let (mut conn, mut peer, ino) = pair();
        let w = watches(ino);
        assert_eq!(w.len(), 1, "one watch of the socket: {w:x?}");
        assert_ne!(w[0] & EPOLLIN, 0, "watched for reading: {:x}", w[0]);
        assert_eq!(w[0] & EPOLLOUT, 0, "not watched for room: {:x}", w[0]);

        // More than the socket holds: the write waits for the peer.
        let sent = pattern(8 << 20);
        {
            let mut write = std::pin::pin!(conn.write_all(&sent));
            assert!(
                futures_util::poll!(write.as_mut()).is_pending(),
                "8 MiB fit in the socket?"
            );
            let w = watches(ino);
            let (room, reading): (Vec<u32>, Vec<u32>) =
                w.iter().partition(|ev| *ev & EPOLLOUT != 0);
            assert_eq!(
                (room.len(), reading.len()),
                (1, 1),
                "a second watch, for room, while the write waits: {w:x?}"
            );
            // The peer reads; the rest goes out as room is made.
            let mut got = vec![0u8; sent.len()];
            let (wrote, read) = tokio::time::timeout(std::time::Duration::from_secs(30), async {
                tokio::join!(write.as_mut(), peer.read_exact(&mut got))
            })
            .await
            .expect("the waiting write ends once the peer reads");
            wrote.expect("write");
            read.expect("read");
            assert!(got == sent, "the bytes arrive whole and in order");
        }
        assert!(conn.room.is_none());
        let w = watches(ino);
        assert_eq!(w.len(), 1, "the watch for room ends with the write: {w:x?}");
        assert_eq!(w[0] & EPOLLOUT, 0);

        // Reading: more than one read holds, in reads of any size, to EOF.
        let sent = pattern(READ_MAX * 3 + 17);
        let writer = tokio::spawn({
            let sent = sent.clone();
            async move {
                peer.write_all(&sent).await?;
                peer.shutdown().await
            }
        });
        let mut got = Vec::new();
        assert_eq!(conn.read(&mut []).await.expect("empty read"), 0);
        let mut small = [0u8; 100];
        let n = conn.read(&mut small).await.expect("small read");
        got.extend_from_slice(&small[..n]);
        conn.read_to_end(&mut got).await.expect("read to end");
        writer.await.expect("writer task").expect("writer");
        assert!(got == sent, "{} bytes read of {}", got.len(), sent.len());
    }

    #[tokio::test]
    async fn a_write_to_a_peer_that_is_gone_fails_instead_of_waiting() {
        let (mut conn, peer, _) = pair();
        let sent = pattern(8 << 20);
        let mut write = std::pin::pin!(conn.write_all(&sent));
        assert!(futures_util::poll!(write.as_mut()).is_pending());
        drop(peer);
        let r = tokio::time::timeout(std::time::Duration::from_secs(30), write)
            .await
            .expect("the waiting write ends when the peer goes");
        assert!(r.is_err(), "{r:?}");
    }

    #[tokio::test]
    async fn a_read_that_empties_the_socket_leaves_it_waiting_for_the_next_event() {
        let (mut conn, mut peer, _) = pair();
        let noop = || Context::from_waker(std::task::Waker::noop());
        peer.write_all(b"GET / HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 100];
        let n = conn.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"GET / HTTP/1.1\r\n\r\n");
        // All there was: no readiness left for a read to find nothing with.
        assert!(conn.poll_read_ready(&mut noop()).is_pending());
        assert_eq!(
            conn.try_read(&mut buf).map_err(|e| e.kind()),
            Err(io::ErrorKind::WouldBlock)
        );

        // A read that fills its buffer keeps the readiness: more may wait.
        peer.write_all(b"0123456789").await.expect("write");
        let mut four = [0u8; 4];
        conn.read_exact(&mut four).await.expect("read");
        assert_eq!(&four, b"0123");
        assert!(conn.poll_read_ready(&mut noop()).is_ready());
        assert_eq!(conn.try_read(&mut buf).expect("the rest"), 6);
        assert_eq!(&buf[..6], b"456789");

        // Bytes that come after an emptying read are seen.
        peer.write_all(b"x").await.expect("write");
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), conn.read(&mut buf))
            .await
            .expect("the new bytes wake the reader")
            .expect("read");
        assert_eq!(&buf[..n], b"x");
        // The end of stream stays readable, read after read.
        drop(peer);
        for _ in 0..2 {
            assert_eq!(conn.read(&mut buf).await.expect("eof"), 0);
        }
    }

    #[tokio::test]
    async fn batond_connects_to_a_unix_worker_socket_watched_for_reading_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (endpoint, listener) =
            crate::endpoint::Endpoint::bind_unix(&dir.path().join("w.sock")).expect("bind");
        let listener = std::os::unix::net::UnixListener::from(listener);
        let conn = match endpoint.connect().await.expect("connect") {
            tokio_util::either::Either::Right(conn) => conn,
            tokio_util::either::Either::Left(_) => panic!("a TCP stream for a Unix endpoint"),
        };
        let (_accepted, _) = listener.accept().expect("accept");
        let ino = std::fs::metadata(format!("/proc/self/fd/{}", conn.io.get_ref().as_raw_fd()))
            .expect("socket inode")
            .ino();
        let w = watches(ino);
        assert_eq!(w.len(), 1, "one watch of the socket: {w:x?}");
        assert_ne!(w[0] & EPOLLIN, 0, "watched for reading: {:x}", w[0]);
        assert_eq!(w[0] & EPOLLOUT, 0, "not watched for room: {:x}", w[0]);
    }
}
