//! Copying an upgraded connection's bytes both ways, without a buffer per
//! connection.
//!
//! `tokio::io::copy_bidirectional` keeps a buffer per direction for the
//! life of the connection: 8 KiB per WebSocket call at the smallest useful
//! size, most of a thousand-call daemon's memory. Here every read goes into
//! one scratch buffer per thread and is written on at once; only bytes the
//! other side cannot take yet are kept, in a buffer of their own that is
//! freed as soon as they are written. A call whose peers keep up (the
//! normal case: a few hundred bytes every 20 ms) holds no buffer at all.
//!
//! Back-pressure is kept: while a direction holds unwritten bytes it does
//! not read. At end of stream the other side's write half is shut down and
//! the other direction carries on, as `copy_bidirectional` does, but not
//! for ever: once one direction has ended, the other must move a byte at
//! least every `linger` (a WebSocket's close handshake is over by then; a
//! peer that neither closes nor sends is gone), as HAProxy's
//! `timeout client-fin`/`server-fin` do.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Size of the per-thread scratch buffer: the most one read takes.
const SCRATCH_BYTES: usize = 16 * 1024;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH_BYTES].into_boxed_slice());
}

/// Bytes moved each way by [`relay`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    /// From `a` to `b`.
    pub a_to_b: u64,
    /// From `b` to `a`.
    pub b_to_a: u64,
}

/// Copies `a` to `b` and `b` to `a` until both have ended (or either
/// fails, or one has ended and the other moved nothing for `linger`).
///
/// Once `b_gone` resolves (the process behind `b` has exited), the relay
/// ends as soon as everything `b` had sent has gone to `a` (its end of
/// stream included), or after `flush` at the latest.
///
/// # Errors
/// The first I/O error of either side, `TimedOut` after `linger`, or
/// `TimedOut` when `b` is gone and what it sent did not all go out within
/// `flush`; the connection is over then.
pub async fn relay<A, B, G>(
    a: &mut A,
    b: &mut B,
    linger: Duration,
    b_gone: G,
    flush: Duration,
) -> io::Result<Moved>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
    G: std::future::Future<Output = ()>,
{
    let mut ab = Direction::default();
    let mut ba = Direction::default();
    // Armed once one direction has ended: the deadline, and the bytes
    // moved when it was set.
    let mut half_closed: Option<(Pin<Box<Sleep>>, u64)> = None;
    let mut b_gone = std::pin::pin!(b_gone);
    // Armed once `b` is gone.
    let mut flushing: Option<Pin<Box<Sleep>>> = None;
    poll_fn(|cx| {
        let ab_done = ab.poll(cx, &mut *a, &mut *b)?.is_ready();
        let ba_done = ba.poll(cx, &mut *b, &mut *a)?.is_ready();
        let moved = Moved {
            a_to_b: ab.moved,
            b_to_a: ba.moved,
        };
        if ab_done && ba_done {
            return Poll::Ready(Ok(moved));
        }
        if flushing.is_none() && b_gone.as_mut().poll(cx).is_ready() {
            flushing = Some(Box::pin(tokio::time::sleep(flush)));
        }
        if let Some(deadline) = &mut flushing {
            if ba_done {
                return Poll::Ready(Ok(moved));
            }
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("its side is gone and what it sent did not all go out in {flush:?}"),
                )));
            }
        }
        if ab_done || ba_done {
            let moved = ab.moved + ba.moved;
            let timer =
                half_closed.get_or_insert_with(|| (Box::pin(tokio::time::sleep(linger)), moved));
            if timer.1 != moved {
                timer.1 = moved;
                timer.0.as_mut().reset(Instant::now() + linger);
            }
            if timer.0.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("one side ended and the other moved nothing for {linger:?}"),
                )));
            }
        }
        Poll::Pending
    })
    .await
}

/// One direction of a relay.
#[derive(Debug, Default)]
struct Direction {
    /// Bytes read but not yet written (the writer was full), and how many
    /// of them have gone out since.
    backlog: Vec<u8>,
    sent: usize,
    /// Written since the last flush.
    unflushed: bool,
    /// The reader ended; the writer's shutdown is under way or done.
    eof: bool,
    done: bool,
    moved: u64,
}

impl Direction {
    /// Moves what it can; `Ready` once this direction has ended.
    fn poll<R, W>(&mut self, cx: &mut Context<'_>, r: &mut R, w: &mut W) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            // The backlog first: nothing is read while it lasts.
            while self.sent < self.backlog.len() {
                let n = ready!(Pin::new(&mut *w).poll_write(cx, &self.backlog[self.sent..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.sent += n;
                self.moved += n as u64;
                self.unflushed = true;
            }
            if !self.backlog.is_empty() {
                // Freed, not kept: most connections never need it again.
                self.backlog = Vec::new();
                self.sent = 0;
            }
            if self.eof {
                ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            let step = SCRATCH.with_borrow_mut(|scratch| {
                let mut buf = ReadBuf::new(scratch);
                match Pin::new(&mut *r).poll_read(cx, &mut buf) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) => {
                        let data = buf.filled();
                        if data.is_empty() {
                            self.eof = true;
                            return Poll::Ready(Ok(()));
                        }
                        let mut off = 0;
                        while off < data.len() {
                            match Pin::new(&mut *w).poll_write(cx, &data[off..]) {
                                Poll::Ready(Ok(0)) => {
                                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                                }
                                Poll::Ready(Ok(n)) => off += n,
                                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                                Poll::Pending => break,
                            }
                        }
                        self.moved += off as u64;
                        self.unflushed |= off > 0;
                        if off < data.len() {
                            self.backlog.extend_from_slice(&data[off..]);
                        }
                        Poll::Ready(Ok(()))
                    }
                }
            });
            match step {
                Poll::Ready(r) => r?,
                Poll::Pending => {
                    // Nothing more to read for now: push out what was
                    // written before waiting.
                    if self.unflushed {
                        ready!(Pin::new(&mut *w).poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const LINGER: Duration = Duration::from_secs(30);

    /// Once one side has ended, the other may go on sending (each byte
    /// restarts the linger), but a side that neither sends nor closes for
    /// `linger` ends the relay.
    #[tokio::test]
    async fn a_half_closed_relay_ends_when_the_other_side_goes_quiet() {
        let linger = Duration::from_millis(300);
        let (mut client, mut near) = tokio::io::duplex(1024);
        let (mut far, mut server) = tokio::io::duplex(1024);
        let relay = tokio::spawn(async move {
            relay(&mut near, &mut far, linger, std::future::pending(), LINGER).await
        });
        // The worker closes its side (a WebSocket close handshake done).
        server.shutdown().await.expect("server shutdown");
        let mut buf = [0u8; 16];
        assert_eq!(client.read(&mut buf).await.expect("client read"), 0);
        // The client keeps talking for longer than the linger, a byte at a
        // time: the relay carries it.
        for _ in 0..4 {
            tokio::time::sleep(linger / 3).await;
            client.write_all(b"x").await.expect("client write");
            assert_eq!(server.read(&mut buf).await.expect("server read"), 1);
        }
        assert!(!relay.is_finished(), "ended while bytes still moved");
        // Then it goes quiet without closing.
        let started = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(10), relay)
            .await
            .expect("the relay did not end")
            .expect("join");
        assert!(started.elapsed() >= linger);
        assert_eq!(r.expect_err("timed out").kind(), io::ErrorKind::TimedOut);
        drop(client);
    }

    /// Once `b`'s process is gone, the relay ends as soon as everything
    /// `b` sent (its end of stream included) has gone to `a`, without
    /// waiting for `a` to close; and within `flush` when that does not
    /// happen (here: a reader that takes nothing).
    #[tokio::test]
    async fn a_relay_whose_far_side_is_gone_ends_once_its_bytes_are_out() {
        // A relay whose far side sends `bytes` and is gone (its end of
        // stream and the token), with a client pipe of `room` bytes.
        async fn gone_after(
            bytes: &[u8],
            room: usize,
            flush: Duration,
        ) -> (
            tokio::io::DuplexStream,
            tokio::task::JoinHandle<io::Result<Moved>>,
        ) {
            let (client, mut near) = tokio::io::duplex(room);
            let (mut far, mut server) = tokio::io::duplex(1 << 20);
            let gone = tokio_util::sync::CancellationToken::new();
            let task = {
                let gone = gone.clone();
                tokio::spawn(async move {
                    relay(&mut near, &mut far, LINGER, gone.cancelled(), flush).await
                })
            };
            server.write_all(bytes).await.expect("server write");
            drop(server);
            gone.cancel();
            (client, task)
        }
        let flush = Duration::from_secs(2);
        let (mut client, task) = gone_after(b"last words", 1 << 20, flush).await;
        let r = tokio::time::timeout(flush / 2, task)
            .await
            .expect("ended before the flush time, the client still open")
            .expect("join");
        assert_eq!(r.expect("ok").b_to_a, 10);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.expect("client read");
        assert_eq!(got, b"last words");

        // A client that takes nothing: cut at the flush time.
        let (client, task) = gone_after(&[7u8; 4096], 64, Duration::from_millis(300)).await;
        let r = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the relay did not end")
            .expect("join");
        assert_eq!(r.expect_err("cut").kind(), io::ErrorKind::TimedOut);
        drop(client);
    }

    /// A relay between two in-memory pipes: everything arrives in order
    /// both ways, also when one side reads slowly (the backlog path), and
    /// an end of stream on each side ends the relay.
    #[tokio::test]
    async fn relays_both_ways_with_back_pressure_and_half_close() {
        // Small pipes so that a big write backs up.
        let (mut client, mut near) = tokio::io::duplex(1024);
        let (mut far, mut server) = tokio::io::duplex(1024);
        let relay = tokio::spawn(async move {
            relay(&mut near, &mut far, LINGER, std::future::pending(), LINGER).await
        });
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let expect = payload.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&payload).await.expect("client write");
            client.shutdown().await.expect("client shutdown");
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.expect("client read");
            back
        });
        // The server reads slowly, in small pieces.
        let mut got = Vec::new();
        let mut chunk = [0u8; 700];
        loop {
            let n = server.read(&mut chunk).await.expect("server read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
            tokio::task::yield_now().await;
        }
        assert!(got == expect, "client->server bytes differ");
        server.write_all(b"bye").await.expect("server write");
        server.shutdown().await.expect("server shutdown");
        let back = writer.await.expect("writer");
        assert_eq!(back, b"bye");
        let moved = relay.await.expect("join").expect("relay");
        assert_eq!(
            moved,
            Moved {
                a_to_b: 200_000,
                b_to_a: 3
            }
        );
    }

    /// An error on one side ends the relay with that error.
    #[tokio::test]
    async fn a_failed_side_ends_the_relay() {
        let (client, mut near) = tokio::io::duplex(64);
        let (mut far, server) = tokio::io::duplex(64);
        drop(server);
        let mut client = client;
        let relay = tokio::spawn(async move {
            relay(&mut near, &mut far, LINGER, std::future::pending(), LINGER).await
        });
        client.write_all(b"hello").await.expect("write");
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), relay)
            .await
            .expect("relay did not end")
            .expect("join");
        assert!(r.is_err(), "{r:?}");
    }
}
