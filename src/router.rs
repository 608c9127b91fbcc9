//! Which worker gets the next request: the atomically swapped upstream
//! pointer, and per-generation counters of requests and pinned connections.
//!
//! A request takes a [`Ticket`] on the upstream that is active when it
//! arrives. Taking the ticket and checking that the upstream is still active
//! happen in that order, so a drain that sees zero tickets after a swap can
//! never race with a request that is about to start on the old worker: such a
//! request gives its ticket back and takes one on the new worker instead.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::endpoint::Endpoint;

/// One running worker that can take traffic.
#[derive(Debug)]
pub struct Upstream {
    /// The generation the worker belongs to.
    pub generation: u64,
    /// Where the worker listens.
    pub endpoint: Endpoint,
    requests: AtomicU64,
    tunnels: AtomicU64,
    retired: std::sync::atomic::AtomicBool,
    idle: Notify,
    /// Cancelled to cut this worker's upgraded connections once it has
    /// exited (a worker stopped at the drain or shutdown timeout may close
    /// them itself first).
    pub tunnel_cancel: CancellationToken,
    /// The tasks copying this worker's upgraded connections.
    pub tunnel_tracker: TaskTracker,
    /// Keep-alive connections to the worker.
    pub pool: Arc<crate::pool::Pool>,
}

/// A counted use of an [`Upstream`]; dropping it gives the count back.
#[derive(Debug)]
pub struct Ticket {
    upstream: Arc<Upstream>,
    tunnel: bool,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let counter = if self.tunnel {
            &self.upstream.tunnels
        } else {
            &self.upstream.requests
        };
        if counter.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.upstream.idle.notify_waiters();
        }
    }
}

// === impl Upstream ===

impl Upstream {
    /// A new upstream with no traffic, whose idle connections are used
    /// again for up to `keepalive`.
    pub fn new(generation: u64, endpoint: Endpoint, keepalive: Duration) -> Arc<Upstream> {
        Arc::new(Upstream {
            generation,
            pool: crate::pool::Pool::new(endpoint.clone(), keepalive),
            endpoint,
            requests: AtomicU64::new(0),
            tunnels: AtomicU64::new(0),
            retired: std::sync::atomic::AtomicBool::new(false),
            idle: Notify::new(),
            tunnel_cancel: CancellationToken::new(),
            tunnel_tracker: TaskTracker::new(),
        })
    }

    /// Counts one HTTP request until the ticket drops.
    pub fn request(self: &Arc<Self>) -> Ticket {
        self.requests.fetch_add(1, Ordering::SeqCst);
        Ticket {
            upstream: self.clone(),
            tunnel: false,
        }
    }

    /// Counts one upgraded connection until the ticket drops.
    pub fn tunnel(self: &Arc<Self>) -> Ticket {
        self.tunnels.fetch_add(1, Ordering::SeqCst);
        Ticket {
            upstream: self.clone(),
            tunnel: true,
        }
    }

    /// Marks the worker as stopped on purpose (drain timeout, shutdown): a
    /// request it fails was cut by the supervisor, not by a crash, and is
    /// not sent again elsewhere.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
    }

    /// Whether [`Upstream::retire`] was called.
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }

    /// HTTP requests in flight.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Upgraded connections open.
    pub fn tunnels(&self) -> u64 {
        self.tunnels.load(Ordering::SeqCst)
    }

    /// Resolves once no request and no connection uses this upstream.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.requests() == 0 && self.tunnels() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// The active-upstream pointer plus a way to wait for one to appear.
#[derive(Debug)]
pub struct Router {
    current: ArcSwapOption<Upstream>,
    changed: watch::Sender<u64>,
    /// Whether a worker may become active without an operator: false
    /// while the unit is failed and no deploy or start is under way or
    /// due, and once batond stops. Requests are then not held: they get
    /// their 503 at once.
    coming: AtomicBool,
}

impl Default for Router {
    fn default() -> Self {
        Router {
            current: ArcSwapOption::empty(),
            changed: watch::channel(0).0,
            coming: AtomicBool::new(true),
        }
    }
}

// === impl Router ===

impl Router {
    /// Swaps the active upstream (None: no healthy worker, requests hold).
    pub fn set(&self, upstream: Option<Arc<Upstream>>) {
        self.current.store(upstream);
        self.changed.send_modify(|v| *v += 1);
    }

    /// Says whether a worker may become active without an operator (see
    /// `coming`); requests held meanwhile end when it turns false.
    pub fn set_coming(&self, coming: bool) {
        if self.coming.swap(coming, Ordering::SeqCst) != coming {
            self.changed.send_modify(|v| *v += 1);
        }
    }

    /// The active upstream now.
    pub fn current(&self) -> Option<Arc<Upstream>> {
        self.current.load_full()
    }

    /// A ticket on the upstream active now, waiting up to `hold` for one to
    /// become active. None when none did.
    pub async fn acquire(&self, hold: Duration) -> Option<(Arc<Upstream>, Ticket)> {
        // The common case, without a clock read or a change subscription.
        if let Take::Taken(up, ticket) = self.take(None) {
            return Some((up, ticket));
        }
        self.acquire_other(None, hold).await
    }

    /// Whether `up` stops being the active upstream within `grace` (it
    /// died, and the supervisor took it out; or a deploy moved on).
    pub async fn leaves(&self, up: &Arc<Upstream>, grace: Duration) -> bool {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + grace;
        // Bounded: each round waits for a change before the deadline.
        for _ in 0..64 {
            rx.mark_unchanged();
            if !self
                .current
                .load()
                .as_ref()
                .is_some_and(|c| Arc::ptr_eq(c, up))
            {
                return true;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return false;
            }
        }
        false
    }

    /// Like [`Router::acquire`], but waits for an upstream other than
    /// `dead` (one that just refused a connection: it crashed, and the
    /// supervisor is about to notice).
    pub async fn acquire_other(
        &self,
        dead: Option<&Arc<Upstream>>,
        hold: Duration,
    ) -> Option<(Arc<Upstream>, Ticket)> {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + hold;
        // Bounded: each retry needs a swap between two loads, and a wait
        // needs a swap to end before the deadline.
        for _ in 0..64 {
            rx.mark_unchanged();
            match self.take(dead) {
                Take::Taken(up, ticket) => return Some((up, ticket)),
                Take::Swapped => continue,
                // No worker, and none on its way: no point in holding.
                Take::NoneActive if !self.coming.load(Ordering::SeqCst) => return None,
                Take::NoneActive => {}
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return None;
            }
        }
        None
    }

    /// Takes a ticket on the active upstream (unless it is `dead`), then
    /// checks that it is still the active one: the order that keeps a drain
    /// from missing a request (see the module docs).
    fn take(&self, dead: Option<&Arc<Upstream>>) -> Take {
        let Some(up) = self
            .current
            .load_full()
            .filter(|up| !dead.is_some_and(|d| Arc::ptr_eq(d, up)))
        else {
            return Take::NoneActive;
        };
        let ticket = up.request();
        if self
            .current
            .load()
            .as_ref()
            .is_some_and(|now| Arc::ptr_eq(now, &up))
        {
            Take::Taken(up, ticket)
        } else {
            Take::Swapped
        }
    }
}

/// What [`Router::take`] found.
enum Take {
    /// A ticket on the upstream that is still active.
    Taken(Arc<Upstream>, Ticket),
    /// The upstream was swapped while the ticket was taken (given back).
    Swapped,
    /// No upstream (other than the dead one) is active.
    NoneActive,
}
