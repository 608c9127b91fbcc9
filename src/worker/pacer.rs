//! The outbound pacing clock: one precise 1 ms tick for every call.
//!
//! Tokio's timers round deadlines to milliseconds and sleep in `epoll_wait`
//! with a millisecond timeout taken from whenever the runtime parked, so a
//! frame due at `t` goes out anywhere in `[t, t + 2 ms)`: up to 2 ms of
//! pacing jitter before any load. Here a `timerfd` ticks on an absolute
//! 1 ms grid of `CLOCK_MONOTONIC` (the clock of [`Instant`]) while any call
//! waits, and each tick wakes the calls whose frame is due. A call's frames
//! are due exactly 20 ms apart, so they land on grid points exactly 20 ms
//! apart; what is left is the tick's wake-up latency. The ticks are read by
//! a small thread of their own, which wakes the due calls' tasks. With no
//! call waiting the timer is disarmed: an idle worker does not wake up.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use nix::time::clock_gettime;

/// The grid step.
const TICK: Duration = Duration::from_millis(1);

/// The shared clock; see the module doc.
#[derive(Debug)]
pub struct Pacer {
    /// Tick 0, as an [`Instant`] and as `CLOCK_MONOTONIC` nanoseconds.
    epoch: Instant,
    epoch_mono_ns: u128,
    timer: TimerFd,
    state: Mutex<State>,
    next_key: AtomicU64,
    stopping: AtomicBool,
}

#[derive(Debug, Default)]
struct State {
    /// Waiting calls by (tick, key).
    due: BTreeMap<(u64, u64), Waker>,
    armed: bool,
}

/// Stops the tick thread when dropped.
#[derive(Debug)]
pub struct PacerTask(Arc<Pacer>);

impl Drop for PacerTask {
    fn drop(&mut self) {
        // Under the lock, so that the thread cannot disarm the timer between
        // the flag and the wake-up.
        let _st = self.0.state.lock();
        self.0.stopping.store(true, Ordering::SeqCst);
        // Wakes the thread at once so that it sees the flag.
        let _ = self.0.timer.set(
            Expiration::OneShot(TimeSpec::new(0, 1)),
            TimerSetTimeFlags::empty(),
        );
    }
}

impl Pacer {
    /// A new clock and its tick thread.
    ///
    /// # Errors
    /// The timer or the thread could not be made.
    pub fn start() -> io::Result<(Arc<Pacer>, PacerTask)> {
        let fd = TimerFd::new(ClockId::CLOCK_MONOTONIC, TimerFlags::TFD_CLOEXEC)
            .map_err(io::Error::from)?;
        // The Instant first: the grid's timer then never fires before
        // `tick_now` has reached the tick it fires for.
        let epoch = Instant::now();
        let mono = clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_err(io::Error::from)?;
        let pacer = Arc::new(Pacer {
            epoch,
            epoch_mono_ns: timespec_ns(&mono),
            timer: fd,
            state: Mutex::new(State::default()),
            next_key: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
        });
        let ticker = pacer.clone();
        std::thread::Builder::new()
            .name("pacer".into())
            .spawn(move || ticker.tick_loop())?;
        Ok((pacer.clone(), PacerTask(pacer)))
    }

    /// A sleep on this clock, not armed yet (see [`PaceSleep::reset`]).
    pub fn sleep(self: &Arc<Self>) -> PaceSleep {
        PaceSleep {
            pacer: self.clone(),
            tick: None,
            due_now: false,
            key: self.next_key.fetch_add(1, Ordering::Relaxed),
            registered: None,
        }
    }

    /// The first grid point at or after `t`.
    fn tick_at_or_after(&self, t: Instant) -> u64 {
        let ns = t.saturating_duration_since(self.epoch).as_nanos();
        let step = TICK.as_nanos();
        u64::try_from(ns.div_ceil(step)).unwrap_or(u64::MAX)
    }

    /// The last grid point passed.
    fn tick_now(&self) -> u64 {
        let ns = self.epoch.elapsed().as_nanos();
        u64::try_from(ns / TICK.as_nanos()).unwrap_or(u64::MAX)
    }

    /// Starts the 1 ms ticks at the next grid point.
    fn arm(&self) {
        let next = u128::from(self.tick_now()) + 1;
        let at_ns = self.epoch_mono_ns + next * TICK.as_nanos();
        let first = TimeSpec::new(
            i64::try_from(at_ns / 1_000_000_000).unwrap_or(i64::MAX),
            i64::try_from(at_ns % 1_000_000_000).unwrap_or(0),
        );
        let every = TimeSpec::from_duration(TICK);
        if let Err(e) = self.timer.set(
            Expiration::IntervalDelayed(first, every),
            TimerSetTimeFlags::TFD_TIMER_ABSTIME,
        ) {
            tracing::warn!(error = %e, "pacing timer could not be armed");
        }
    }

    fn register(&self, tick: u64, key: u64, waker: &Waker) {
        let Ok(mut st) = self.state.lock() else {
            waker.wake_by_ref();
            return;
        };
        match st.due.get_mut(&(tick, key)) {
            Some(w) if w.will_wake(waker) => {}
            Some(w) => w.clone_from(waker),
            None => {
                st.due.insert((tick, key), waker.clone());
            }
        }
        if !st.armed {
            st.armed = true;
            self.arm();
        }
    }

    fn unregister(&self, tick: u64, key: u64) {
        if let Ok(mut st) = self.state.lock() {
            st.due.remove(&(tick, key));
        }
    }

    /// The tick thread: blocks on the timer, wakes the due calls.
    fn tick_loop(self: Arc<Self>) {
        let mut woken: Vec<Waker> = Vec::new();
        loop {
            if let Err(e) = self.timer.wait() {
                tracing::warn!(error = %e, "pacing timer failed");
                return;
            }
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            let now = self.tick_now();
            if let Ok(mut st) = self.state.lock() {
                let later = st.due.split_off(&(now.saturating_add(1), 0));
                let due = std::mem::replace(&mut st.due, later);
                woken.extend(due.into_values());
                if st.due.is_empty() && st.armed && !self.stopping.load(Ordering::SeqCst) {
                    st.armed = false;
                    if let Err(e) = self.timer.unset() {
                        tracing::warn!(error = %e, "pacing timer could not be disarmed");
                    }
                }
            }
            for w in woken.drain(..) {
                w.wake();
            }
        }
    }
}

fn timespec_ns(ts: &TimeSpec) -> u128 {
    u128::try_from(ts.tv_sec()).unwrap_or(0) * 1_000_000_000
        + u128::try_from(ts.tv_nsec()).unwrap_or(0)
}

/// A resettable sleep on a [`Pacer`]: ready at the first grid point at or
/// after its deadline.
#[derive(Debug)]
pub struct PaceSleep {
    pacer: Arc<Pacer>,
    tick: Option<u64>,
    /// The deadline had passed when it was set: ready at once (a `mark`,
    /// or a frame that is late), not at the next grid point.
    due_now: bool,
    key: u64,
    /// The tick the waker is filed under.
    registered: Option<u64>,
}

impl PaceSleep {
    /// Sets the deadline (replacing any earlier one). One that has already
    /// passed ends the sleep at its next poll.
    pub fn reset(&mut self, deadline: Instant) {
        self.due_now = deadline <= Instant::now();
        let tick = self.pacer.tick_at_or_after(deadline);
        if self.registered.is_some_and(|t| t != tick) {
            self.clear();
        }
        self.tick = Some(tick);
    }

    fn clear(&mut self) {
        if let Some(t) = self.registered.take() {
            self.pacer.unregister(t, self.key);
        }
    }
}

impl Future for PaceSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(tick) = self.tick else {
            return Poll::Pending;
        };
        if self.due_now || self.pacer.tick_now() >= tick {
            self.due_now = false;
            self.clear();
            self.tick = None;
            return Poll::Ready(());
        }
        self.pacer.register(tick, self.key, cx.waker());
        self.registered = Some(tick);
        Poll::Pending
    }
}

impl Drop for PaceSleep {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sleeps end on the grid point at or after their deadline, in order,
    /// and a reset moves the deadline.
    #[tokio::test]
    async fn sleeps_end_on_their_grid_point() {
        let (pacer, _task) = Pacer::start().expect("pacer");
        let t0 = Instant::now();
        let mut a = pacer.sleep();
        let mut b = pacer.sleep();
        a.reset(t0 + Duration::from_millis(30));
        b.reset(t0 + Duration::from_millis(500));
        // B moves before A.
        b.reset(t0 + Duration::from_millis(10));
        (&mut b).await;
        let tb = Instant::now();
        (&mut a).await;
        let ta = Instant::now();
        assert!(tb >= t0 + Duration::from_millis(10), "b woke early");
        assert!(ta >= t0 + Duration::from_millis(30), "a woke early");
        assert!(ta >= tb, "out of order");
        // Once the last sleeper is gone the timer is disarmed.
        tokio::task::yield_now().await;
        let armed = pacer.timer.get().expect("gettime");
        let st = pacer.state.lock().expect("state");
        assert!(st.due.is_empty());
        assert_eq!(armed.is_some(), st.armed);
    }

    /// A sleep with no deadline never ends; one whose deadline passed ends
    /// at once; dropping a waiting sleep leaves nothing filed.
    #[tokio::test]
    async fn unset_past_and_dropped_sleeps() {
        let (pacer, _task) = Pacer::start().expect("pacer");
        let mut idle = pacer.sleep();
        let r = tokio::time::timeout(Duration::from_millis(30), &mut idle).await;
        assert!(r.is_err(), "a sleep without a deadline ended");
        let mut past = pacer.sleep();
        past.reset(Instant::now() - Duration::from_millis(5));
        tokio::time::timeout(Duration::from_secs(5), &mut past)
            .await
            .expect("a past deadline did not end at once");
        let mut gone = pacer.sleep();
        gone.reset(Instant::now() + Duration::from_secs(60));
        let _ = tokio::time::timeout(Duration::from_millis(5), &mut gone).await;
        assert_eq!(pacer.state.lock().expect("state").due.len(), 1);
        drop(gone);
        assert!(pacer.state.lock().expect("state").due.is_empty());
    }
}
