//! The supervisor: one actor task that owns every generation's state and is
//! the only place that moves traffic.
//!
//! Everything else talks to it through a [`Job`] handle that queues
//! [`Control`] messages; the long steps (build, snapshot, start and prove)
//! run in tasks of their own and report back, so the actor never blocks and
//! a status request is always answered at once.
//!
//! Deploys are debounced and coalesced: one pipeline runs at a time; any
//! number of changes that arrive while it runs cause exactly one more run
//! after it (the latest tree wins, since the build reads the tree when it
//! starts).

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Overrides};
use crate::control::api::{DeployOutcome, GenState, GenerationInfo, Status, Totals, timestamp};
use crate::endpoint::Endpoint;
use crate::events::Events;
use crate::proxy::Proxy;
use crate::router::{Router, Upstream};
use crate::systemd;
use crate::watch::{self, Change};
use crate::worker_proc::{self, Instance, Launch, WorkerEvent};

/// The verdict on a reload: what to note about the config applied, or why
/// the new config was refused.
pub type ReloadResult = Result<Reloaded, String>;

/// Notes on a config a reload applied.
#[derive(Debug, Clone, Default)]
pub struct Reloaded {
    /// The settings kept until the daemon restarts (the new value of each
    /// in its note).
    pub kept: Vec<String>,
    /// What in the new config is likely not what its author wants
    /// ([`Config::advice`]).
    pub advice: Vec<String>,
}

/// A reload read and checked off the actor: the new config, its watches and
/// the settings kept until the daemon restarts; or why it was refused.
type Prepared = Result<(Config, watch::Watcher, Vec<String>), String>;

/// A request to the supervisor.
#[derive(Debug)]
pub enum Control {
    /// A watched file changed.
    Changed(Change),
    /// Re-read the config file (SIGHUP, `batonctl reload`, file change).
    Reload(Option<oneshot::Sender<ReloadResult>>),
    /// Build and deploy now; the reply (if any) comes when it is decided,
    /// or at once (`queued`) unless `wait`.
    Deploy {
        /// What asked for it.
        trigger: String,
        /// Where to send the outcome.
        reply: Option<oneshot::Sender<DeployOutcome>>,
        /// Whether the reply waits for the outcome.
        wait: bool,
    },
    /// Start the active generation's snapshot afresh (or retry a failed
    /// unit), then cut over to the fresh process; replies as `Deploy`.
    Restart {
        /// Where to send the outcome.
        reply: Option<oneshot::Sender<DeployOutcome>>,
        /// Whether the reply waits for the outcome.
        wait: bool,
    },
    /// Report the state.
    Status(oneshot::Sender<Status>),
    /// Stop everything; the reply comes when all workers are gone.
    Shutdown(oneshot::Sender<()>),
}

/// The handle everyone else uses to talk to the supervisor.
#[derive(Debug, Clone)]
pub struct Job {
    tx: mpsc::UnboundedSender<Control>,
    /// The event bus (for `/v1/events`).
    pub events: Events,
    /// The proxy (for `/metrics`).
    pub proxy: Arc<Proxy>,
}

// === impl Job ===

impl Job {
    /// Queues a control message. False when the supervisor is gone.
    pub fn send(&self, c: Control) -> bool {
        self.tx.send(c).is_ok()
    }

    /// The current status, or None when the supervisor is gone.
    pub async fn status(&self) -> Option<Status> {
        let (tx, rx) = oneshot::channel();
        self.send(Control::Status(tx));
        rx.await.ok()
    }

    /// Asks for a deploy; waits for its outcome when `wait`.
    pub async fn deploy(&self, trigger: &str, wait: bool) -> DeployOutcome {
        let (tx, rx) = oneshot::channel();
        self.send(Control::Deploy {
            trigger: trigger.to_string(),
            reply: Some(tx),
            wait,
        });
        outcome(rx).await
    }

    /// Asks for a restart; waits for its outcome when `wait`.
    pub async fn restart(&self, wait: bool) -> DeployOutcome {
        let (tx, rx) = oneshot::channel();
        self.send(Control::Restart {
            reply: Some(tx),
            wait,
        });
        outcome(rx).await
    }

    /// Asks for a config reload and waits for its verdict: the settings
    /// that stay as they are until the daemon restarts, or why the new
    /// config was refused.
    pub async fn reload(&self) -> ReloadResult {
        let (tx, rx) = oneshot::channel();
        self.send(Control::Reload(Some(tx)));
        rx.await
            .unwrap_or_else(|_| Err("batond is stopping".to_string()))
    }
}

/// What a deploy or restart asked for without waiting is told at once.
fn queued() -> DeployOutcome {
    DeployOutcome {
        generation: None,
        outcome: "queued".into(),
        reason: None,
    }
}

async fn outcome(rx: oneshot::Receiver<DeployOutcome>) -> DeployOutcome {
    rx.await.unwrap_or_else(|_| DeployOutcome {
        generation: None,
        outcome: "failed".into(),
        reason: Some("batond is stopping".into()),
    })
}

/// Messages from the supervisor's own tasks.
#[derive(Debug)]
enum Internal {
    Worker(WorkerEvent),
    DebounceDue(u64),
    /// The artifact's digest (`None`: unreadable), read for the deploy due
    /// since change N; `None` outside: it was being written meanwhile.
    ArtifactChecked(u64, Option<Option<String>>),
    /// A build failed; the artifact's digest as it left it, if any.
    FailedBuildLeft(Option<String>),
    /// The config file has been quiet for `debounce_ms` since change N.
    ConfigDue(u64),
    /// A reload's blocking part is done (boxed: a whole config).
    Reloaded(Box<Prepared>),
    Progress {
        generation: u64,
        state: GenState,
        build_ms: Option<u64>,
        signature: Option<String>,
    },
    PipelineDone {
        generation: u64,
        result: Result<(Instance, Duration), (GenState, String)>,
        snapshot: Option<PathBuf>,
        /// The config the generation was built, started and proven with.
        cfg: Arc<Config>,
    },
    /// A restart's backoff is over: (generation, restart epoch).
    RestartDue(u64, u64),
    RestartDone {
        generation: u64,
        replace: bool,
        /// Which start ([`FreshStart::id`]).
        start: u64,
        result: Result<(Instance, Duration), worker_proc::StartFailure>,
    },
    DrainTimedOut {
        generation: u64,
        instance: u64,
    },
}

/// What a pipeline or start task takes from the supervisor.
struct TaskCtx {
    cfg: Arc<Config>,
    shim: PathBuf,
    itx: mpsc::UnboundedSender<Internal>,
    wtx: mpsc::UnboundedSender<WorkerEvent>,
    token: CancellationToken,
    stopping: CancellationToken,
}

/// What a generation needs to be started again.
#[derive(Debug, Clone)]
struct GenRuntime {
    /// The config the generation was proven with: its restarts start the
    /// snapshot the same way (command, env, socket kind), even after a
    /// reload whose own deploy failed.
    cfg: Arc<Config>,
    snapshot: PathBuf,
    signature: String,
    dir: PathBuf,
    next_instance: u64,
    starts: VecDeque<Instant>,
    backoff: Duration,
    /// After a replacement of an unhealthy active worker failed, the next
    /// one waits until then, however often the probes fail meanwhile.
    replace_not_before: Option<Instant>,
    /// The wait after the next failed replacement: from
    /// `backoff_initial_ms`, doubled by each failure up to
    /// `backoff_max_ms`, and back to the start once one succeeds.
    replace_backoff: Duration,
}

/// Why a fresh process is being proven beside the active one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replacing {
    /// The active worker failed its health checks.
    Health,
    /// `batonctl restart`.
    Asked,
}

struct Supervisor {
    cfg: Arc<Config>,
    overrides: Overrides,
    shim: PathBuf,
    router: Arc<Router>,
    proxy: Arc<Proxy>,
    events: Events,
    token: CancellationToken,
    /// Cancelled when the daemon begins to stop, before the workers'
    /// `token`: a build then running is stopped, and no candidate starts
    /// after it (the workers serving keep theirs until the drain is over).
    stopping: CancellationToken,
    rx: mpsc::UnboundedReceiver<Control>,
    itx: mpsc::UnboundedSender<Internal>,
    irx: mpsc::UnboundedReceiver<Internal>,
    wtx: mpsc::UnboundedSender<WorkerEvent>,
    watcher: Option<watch::Watcher>,
    change_tx: mpsc::UnboundedSender<Change>,

    gens: BTreeMap<u64, GenerationInfo>,
    runtime: BTreeMap<u64, GenRuntime>,
    /// Counts since start, for the status and `/metrics`.
    totals: Totals,
    next_gen: u64,
    /// The generation folders a previous daemon left and this one kept
    /// (not in the status), oldest first.
    earlier: VecDeque<u64>,
    active: Option<Instance>,
    draining: Vec<Instance>,
    /// Why a draining instance (generation, instance) was stopped before
    /// its connections ended (the drain timeout), for its history entry.
    cut: BTreeMap<(u64, u64), String>,
    candidate: Option<u64>,
    pipeline_busy: bool,
    /// A fresh process being proven beside the active one, and why.
    replacing: Option<Replacing>,
    /// A fresh process started with no worker serving (a crash restart,
    /// or a restart out of `failed`), not yet proven or rejected: another
    /// restart waits for it rather than starting a second process.
    starting: bool,
    /// Bumped by every restart scheduled or started: a `RestartDue` of an
    /// earlier epoch is stale (a restart went ahead meanwhile).
    restart_epoch: u64,
    /// A restart that came due while a fresh start was still proving
    /// itself (`starting`, or a replacement of the same generation):
    /// started when that one ends, unless it took over.
    restart_waiting: Option<u64>,
    /// The fresh start under way (a restart or a replacement), which a
    /// cutover of another generation makes obsolete.
    fresh: Option<FreshStart>,
    /// Numbers fresh starts.
    fresh_starts: u64,
    /// Fresh starts a cutover stopped that have not ended yet (their
    /// process is being stopped): the daemon's stop waits for them.
    stale_starts: usize,
    /// The exits of workers proven while batond stopped: never cut over,
    /// stopped at once, and waited for with the others.
    late: Vec<tokio::sync::watch::Receiver<Option<worker_proc::Exit>>>,
    pending: Option<String>,
    /// When the first change the pending deploy waits out the debounce
    /// for came (see `watch.max_wait`).
    pending_since: Option<Instant>,
    /// When the pending deploy began waiting for quiet with no build
    /// running (for the hint on changes that never pause).
    debouncing_since: Option<Instant>,
    /// The deploy due at `max_wait` was logged (once per pending deploy).
    max_wait_said: bool,
    debounce_epoch: u64,
    /// Bumped by every config file event; the reload waits for quiet.
    config_epoch: u64,
    /// File events were lost: the coming reload rebuilds whatever it
    /// finds.
    events_lost: bool,
    /// The config file changed and its reload waits for quiet. A source
    /// deploy due meanwhile waits for that reload, which deploys anyway: one
    /// save that touches both (`sed -i` leaves a temporary file beside the
    /// config) is one build, with the new config.
    config_due: bool,
    /// The pending deploy was asked for by file changes alone, namely
    /// these paths, each with how it was first seen and when (see
    /// [`Self::deploy_due`]).
    watch_only: bool,
    changed: BTreeMap<PathBuf, (Seen, u64)>,
    /// Numbers the file changes, to tell which came first.
    change_seq: u64,
    /// The artifact's digest as the last build left it: the snapshot's
    /// signature, or, after a failed build, the file as it was then.
    built: Option<String>,
    /// A digest of the artifact, not as the last build left it, read once
    /// for the pending deploy: a second read must agree before it builds.
    differs: Option<Option<String>>,
    /// A reload is being prepared on the blocking pool.
    reload_running: bool,
    /// Another reload was asked for meanwhile.
    reload_again: bool,
    /// Answered when the running reload is applied.
    reload_now: Vec<oneshot::Sender<ReloadResult>>,
    /// Answered by the reload after it.
    reload_next: Vec<oneshot::Sender<ReloadResult>>,
    waiters_next: Vec<oneshot::Sender<DeployOutcome>>,
    waiters_now: Vec<oneshot::Sender<DeployOutcome>>,
    restart_waiters: Vec<oneshot::Sender<DeployOutcome>>,
    unit_state: &'static str,
    ready_sent: bool,
    config_error: Option<String>,
    started: Instant,
}

/// Starts the supervisor actor and its watcher. The returned [`Job`] is the
/// only way to talk to it; the actor ends after `Control::Shutdown`.
///
/// # Errors
/// When the watches cannot be set up.
pub fn spawn(
    cfg: Config,
    overrides: Overrides,
    shim: PathBuf,
    router: Arc<Router>,
    proxy: Arc<Proxy>,
    token: CancellationToken,
) -> Result<(Job, tokio::task::JoinHandle<()>), watch::WatchError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let (itx, irx) = mpsc::unbounded_channel();
    let (wtx, mut wrx) = mpsc::unbounded_channel();
    let (change_tx, mut change_rx) = mpsc::unbounded_channel();
    let events = Events::default();
    let watcher = watch_sources(&cfg, change_tx.clone())?;
    {
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(c) = change_rx.recv().await {
                if tx.send(Control::Changed(c)).is_err() {
                    return;
                }
            }
        });
    }
    {
        let itx = itx.clone();
        tokio::spawn(async move {
            while let Some(e) = wrx.recv().await {
                if itx.send(Internal::Worker(e)).is_err() {
                    return;
                }
            }
        });
    }
    let job = Job {
        tx,
        events: events.clone(),
        proxy: proxy.clone(),
    };
    let sup = Supervisor {
        cfg: Arc::new(cfg),
        overrides,
        shim,
        router,
        proxy,
        events,
        token,
        stopping: CancellationToken::new(),
        rx,
        itx,
        irx,
        wtx,
        watcher: Some(watcher),
        change_tx,
        gens: BTreeMap::new(),
        runtime: BTreeMap::new(),
        totals: Totals::default(),
        next_gen: 1,
        earlier: VecDeque::new(),
        active: None,
        draining: Vec::new(),
        cut: BTreeMap::new(),
        candidate: None,
        pipeline_busy: false,
        replacing: None,
        starting: false,
        restart_epoch: 0,
        restart_waiting: None,
        fresh: None,
        fresh_starts: 0,
        stale_starts: 0,
        late: Vec::new(),
        pending: None,
        pending_since: None,
        debouncing_since: None,
        max_wait_said: false,
        debounce_epoch: 0,
        config_epoch: 0,
        events_lost: false,
        config_due: false,
        watch_only: false,
        changed: BTreeMap::new(),
        change_seq: 0,
        built: None,
        differs: None,
        reload_running: false,
        reload_again: false,
        reload_now: Vec::new(),
        reload_next: Vec::new(),
        waiters_next: Vec::new(),
        waiters_now: Vec::new(),
        restart_waiters: Vec::new(),
        unit_state: "starting",
        ready_sent: false,
        config_error: None,
        started: Instant::now(),
    };
    let handle = tokio::spawn(sup.run());
    Ok((job, handle))
}

// === impl Supervisor ===

impl Supervisor {
    async fn run(mut self) {
        self.first_generation_number();
        self.request_deploy("startup".into(), true);
        loop {
            tokio::select! {
                Some(c) = self.rx.recv() => {
                    if let Control::Shutdown(done) = c {
                        self.shutdown().await;
                        let _ = done.send(());
                        return;
                    }
                    self.control(c);
                }
                Some(i) = self.irx.recv() => self.internal(i),
            }
            // A failed unit with nothing building or starting brings no
            // worker back by itself: requests get their 503 at once then.
            // A deploy due (debouncing, or waiting for a reload) is on its
            // way too, unless its changes have not paused for a while (a
            // file written all the time holds it back for good).
            let debounce = self.cfg.watch.debounce;
            let pending_soon = self.pending.is_some()
                && self
                    .debouncing_since
                    .is_none_or(|t| t.elapsed() < (debounce * 2).max(Duration::from_secs(1)));
            self.router.set_coming(
                self.unit_state != "failed"
                    || self.work_under_way()
                    || pending_soon
                    || self.config_due
                    || self.reload_running,
            );
        }
    }

    /// Continues numbering after the generations a previous daemon left,
    /// and keeps only the newest `history` of their folders.
    fn first_generation_number(&mut self) {
        let Ok(rd) = std::fs::read_dir(&self.cfg.daemon.state_dir) else {
            return;
        };
        let mut old = Vec::new();
        for e in rd.filter_map(Result::ok) {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(n) = name
                .strip_prefix("gen-")
                .and_then(|n| n.parse::<u64>().ok())
            {
                old.push(n);
            }
        }
        old.sort_unstable();
        self.next_gen = old.last().copied().unwrap_or(0) + 1;
        let keep = self.cfg.daemon.history.max(1);
        let cut = old.len().saturating_sub(keep);
        for id in &old[..cut] {
            remove_gen_dir(&self.cfg.daemon.state_dir, *id);
        }
        self.earlier = old[cut..].iter().copied().collect();
        // Removals a daemon that stopped meanwhile did not finish.
        let state_dir = self.cfg.daemon.state_dir.clone();
        drop(tokio::task::spawn_blocking(move || sweep_trash(&state_dir)));
    }

    fn control(&mut self, c: Control) {
        match c {
            Control::Changed(Change::Config) => {
                // One save is several events (truncate, write, rename):
                // reload once the file is quiet, so a half-written file is
                // never read and one save is one reload and one deploy.
                self.config_epoch += 1;
                self.config_due = true;
                self.after_debounce(Internal::ConfigDue(self.config_epoch));
            }
            Control::Changed(Change::Source(p)) => self.file_changed(p, Seen::Changed),
            Control::Changed(Change::Appeared(p)) => self.file_changed(p, Seen::Appeared),
            Control::Changed(Change::NewFolder(p)) => {
                // No change by itself: only noted, for what goes below it.
                if self.pending.is_none() || self.watch_only {
                    self.note_change(p, Seen::NewFolder);
                }
            }
            Control::Changed(Change::Lost) => {
                // Anything may have changed: the config is read again, and
                // the worker rebuilt by that reload, or, if the file is
                // refused, anyway.
                self.events_lost = true;
                self.config_epoch += 1;
                self.config_due = true;
                self.after_debounce(Internal::ConfigDue(self.config_epoch));
            }
            Control::Reload(reply) => {
                // It reads the file as it is now: a save still waiting out
                // its debounce (edit, then `systemctl reload`) is read by
                // this reload, not by one more (two deploys for one save).
                if self.config_due {
                    self.config_epoch += 1;
                    self.config_due = false;
                }
                self.reload(reply);
            }
            Control::Deploy {
                trigger,
                reply,
                wait,
            } => {
                match reply {
                    Some(r) if wait => self.waiters_next.push(r),
                    Some(r) => {
                        let _ = r.send(queued());
                    }
                    None => {}
                }
                self.request_deploy(trigger, true);
            }
            Control::Restart { reply, wait } => {
                let reply = match reply {
                    Some(r) if !wait => {
                        let _ = r.send(queued());
                        None
                    }
                    r => r,
                };
                self.restart_now(reply);
            }
            Control::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Control::Shutdown(_) => {}
        }
    }

    // --- deploy scheduling ---

    /// A watched file changed.
    fn file_changed(&mut self, p: PathBuf, seen: Seen) {
        tracing::debug!(path = %p.display(), ?seen, "source changed");
        let only = self.pending.is_none() || self.watch_only;
        self.request_deploy(format!("watch: {}", p.display()), false);
        if only {
            self.watch_only = self.note_change(p, seen);
        }
    }

    /// Notes how `p` was first seen since the last deploy began; false when
    /// there are too many to keep (a change this large is a change,
    /// whatever it holds).
    fn note_change(&mut self, p: PathBuf, seen: Seen) -> bool {
        if self.changed.len() >= MAX_CHANGED && !self.changed.contains_key(&p) {
            return false;
        }
        self.change_seq += 1;
        let seq = self.change_seq;
        self.changed
            .entry(p)
            // A new folder's walk found files: they are its change.
            .and_modify(|(s, _)| {
                if *s == Seen::NewFolder && seen == Seen::Appeared {
                    *s = Seen::Appeared;
                }
            })
            .or_insert((seen, seq));
        true
    }

    /// Notes that a deploy is wanted. `now` skips the debounce (startup,
    /// explicit requests); file changes wait for quiet.
    fn request_deploy(&mut self, trigger: String, now: bool) {
        self.pending = Some(trigger);
        self.watch_only = false;
        self.debounce_epoch += 1;
        // When the first change this deploy waits for came (during a build
        // too: `max_wait` counts from it).
        let since = (!now).then(|| *self.pending_since.get_or_insert_with(Instant::now));
        if self.pipeline_busy {
            return;
        }
        let Some(since) = since else {
            self.start_pipeline();
            return;
        };
        // Each change waits for quiet; with `max_wait`, the first of them
        // no longer than that.
        let waited = since.elapsed();
        // A change since the deploy began waiting with no build running
        // (not the first look after a build).
        let rearmed = self.debouncing_since.is_some();
        let debouncing = self
            .debouncing_since
            .get_or_insert_with(Instant::now)
            .elapsed();
        let debounce = self.cfg.watch.debounce;
        let path = || {
            self.pending
                .as_deref()
                .unwrap_or("")
                .trim_start_matches("watch: ")
                .to_string()
        };
        let delay = match self.cfg.watch.max_wait {
            Some(max) => {
                let left = max.saturating_sub(waited);
                if rearmed && left < debounce && !self.max_wait_said {
                    self.max_wait_said = true;
                    tracing::info!(
                        ?max,
                        "{}: deploying watch.max_wait_ms after the first change, without waiting for quiet (a file written all the time may want an ignore glob)",
                        path()
                    );
                }
                left.min(debounce)
            }
            None => {
                if debouncing >= QUIET_HINT_AFTER && !self.max_wait_said {
                    self.max_wait_said = true;
                    tracing::warn!(
                        "{}: changes have kept coming for {} s without {} ms of quiet; the deploy waits for quiet: ignore what is written all the time (a log, an autosave), or set watch.max_wait_ms",
                        path(),
                        debouncing.as_secs(),
                        debounce.as_millis()
                    );
                }
                debounce
            }
        };
        self.after(delay, Internal::DebounceDue(self.debounce_epoch));
    }

    /// Starts the deploy that is due, unless the file changes that asked
    /// for it changed nothing:
    /// - paths that are gone again and were made (or lay below a folder
    ///   made or moved in) before they changed: a tool's temporary files,
    ///   or a build's (written beside the artifact then moved over it, a
    ///   scratch folder); a folder made is no change by itself either;
    /// - the artifact alone, if it is as the last build left it: that
    ///   build wrote it (a build that writes its artifact in a watched
    ///   folder would otherwise start the next build, for ever, even one
    ///   that fails). An artifact that is also a source (a build command
    ///   that only checks it) still deploys each edit.
    fn deploy_due(&mut self) {
        if !self.watch_only {
            self.start_pipeline();
            return;
        }
        let root = &self.cfg.daemon.root;
        let came = |p: &std::path::Path, seq: u64| {
            p.ancestors().any(|a| {
                self.changed
                    .get(a)
                    .is_some_and(|(s, at)| *s != Seen::Changed && *at <= seq)
            })
        };
        let gone: Vec<PathBuf> = self
            .changed
            .iter()
            .filter(|(p, (s, seq))| {
                *s == Seen::NewFolder
                    || (came(p, *seq) && std::fs::symlink_metadata(root.join(p)).is_err())
            })
            .map(|(p, _)| p.clone())
            .collect();
        for p in gone {
            self.changed.remove(&p);
        }
        let Some(last) = self.changed.keys().next_back() else {
            tracing::info!("files came and went; no build");
            self.drop_pending();
            return;
        };
        // The trigger names a change that stays.
        let named = self
            .pending
            .as_deref()
            .and_then(|t| t.strip_prefix("watch: "))
            .map(PathBuf::from);
        if !named.is_some_and(|n| self.changed.contains_key(&n)) {
            self.pending = Some(format!("watch: {}", last.display()));
        }
        let artifact = &self.cfg.build.artifact;
        let artifact_only = !self.cfg.build.command.is_empty()
            && self.changed.keys().all(|p| root.join(p) == *artifact);
        if artifact_only {
            self.check_artifact();
        } else {
            self.start_pipeline();
        }
    }

    /// Forgets the pending deploy: its changes changed nothing.
    fn drop_pending(&mut self) {
        self.pending = None;
        self.forget_changes();
        self.notify_status();
    }

    /// Forgets the file changes noted for the pending deploy: it is
    /// starting, or dropped.
    fn forget_changes(&mut self) {
        self.pending_since = None;
        self.debouncing_since = None;
        self.max_wait_said = false;
        self.watch_only = false;
        self.changed.clear();
        self.differs = None;
    }

    /// See [`Self::deploy_due`].
    fn check_artifact(&mut self) {
        if self.built.is_none() {
            self.start_pipeline();
            return;
        }
        let path = self.cfg.build.artifact.clone();
        let epoch = self.debounce_epoch;
        let itx = self.itx.clone();
        tokio::task::spawn_blocking(move || {
            // A file written while it is read is neither: look again once
            // that write has been quiet (its events may come after this).
            let stamp = || {
                std::fs::metadata(&path).ok().map(|m| {
                    use std::os::unix::fs::MetadataExt as _;
                    (m.len(), m.modified().ok(), m.ctime(), m.ctime_nsec())
                })
            };
            let before = stamp();
            let digest = crate::digest::sha256_file(&path).ok();
            let read = (stamp() == before).then_some(digest);
            let _ = itx.send(Internal::ArtifactChecked(epoch, read));
        });
    }

    /// Sends `msg` to this actor once `debounce_ms` has passed.
    fn after_debounce(&self, msg: Internal) {
        self.after(self.cfg.watch.debounce, msg);
    }

    /// Sends `msg` to this actor after `d`.
    fn after(&self, d: Duration, msg: Internal) {
        let itx = self.itx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            let _ = itx.send(msg);
        });
    }

    fn start_pipeline(&mut self) {
        let Some(trigger) = self.pending.take() else {
            return;
        };
        self.forget_changes();
        self.pipeline_busy = true;
        self.waiters_now.append(&mut self.waiters_next);
        let generation = self.next_gen;
        self.next_gen += 1;
        let dir = worker_proc::gen_dir(&self.cfg.daemon.state_dir, generation);
        self.gens.insert(
            generation,
            GenerationInfo {
                id: generation,
                state: GenState::Building,
                reason: None,
                trigger: trigger.clone(),
                signature: None,
                pid: None,
                port: None,
                socket: None,
                dir: dir.display().to_string(),
                created_at: timestamp(SystemTime::now()),
                build_ms: None,
                health_ms: None,
                cutover_at: None,
                ended_at: None,
                restarts: 0,
                requests_in_flight: 0,
                connections: 0,
            },
        );
        self.candidate = Some(generation);
        self.events.emit(
            "build_started",
            Some(generation),
            format!("generation {generation}: building ({trigger})"),
        );
        self.notify_status();
        let TaskCtx {
            cfg,
            shim,
            itx,
            wtx,
            token,
            stopping,
        } = self.task_ctx();
        tokio::spawn(async move {
            // In a task of its own, so that a panic in it (a bug) still
            // ends the deploy, as failed: the pipeline is not left busy.
            let run = {
                let (cfg, itx) = (cfg.clone(), itx.clone());
                tokio::spawn(async move {
                    let tokens = (&token, &stopping);
                    pipeline(&cfg, &shim, generation, &dir, &itx, wtx, tokens).await
                })
            };
            let (result, snapshot) = run.await.unwrap_or_else(|e| {
                tracing::error!(generation, error = %e, "the deploy's task failed");
                (
                    Err((GenState::Failed, format!("internal error: {e}"))),
                    None,
                )
            });
            let _ = itx.send(Internal::PipelineDone {
                generation,
                result,
                snapshot,
                cfg,
            });
        });
    }

    /// The handles a spawned pipeline or start task needs; its token is a
    /// child of the daemon's, so a shutdown cancels it.
    fn task_ctx(&self) -> TaskCtx {
        TaskCtx {
            cfg: self.cfg.clone(),
            shim: self.shim.clone(),
            itx: self.itx.clone(),
            wtx: self.wtx.clone(),
            token: self.token.child_token(),
            stopping: self.stopping.clone(),
        }
    }

    fn internal(&mut self, i: Internal) {
        match i {
            Internal::Reloaded(prepared) => self.reloaded(*prepared),
            Internal::ConfigDue(epoch) => {
                if epoch == self.config_epoch {
                    self.config_due = false;
                    self.events.emit("change", None, "config file changed");
                    self.reload(None);
                }
            }
            Internal::DebounceDue(epoch) => {
                // A reload due or under way deploys when it is applied, or
                // starts this one if the file is refused.
                if epoch == self.debounce_epoch
                    && !self.pipeline_busy
                    && !self.config_due
                    && !self.reload_running
                {
                    self.deploy_due();
                }
            }
            Internal::FailedBuildLeft(digest) => self.built = digest,
            Internal::ArtifactChecked(epoch, read) => {
                // Anything since (a change, a deploy asked for, a reload)
                // decides anew.
                if epoch != self.debounce_epoch || !self.watch_only || self.pipeline_busy {
                    return;
                }
                match read {
                    Some(d) if d.is_some() && d == self.built => {
                        tracing::info!(
                            artifact = %self.cfg.build.artifact.display(),
                            "the artifact changed on disk as the last build wrote it; no build"
                        );
                        self.drop_pending();
                    }
                    // Different twice, a debounce apart: not a write under
                    // way whose writer stalled while it was read.
                    Some(d) if self.differs.as_ref() == Some(&d) => {
                        // Else the reload deploys, or, refused, decides anew.
                        if !self.config_due && !self.reload_running {
                            self.start_pipeline();
                        }
                    }
                    // Written while read, or different once: look again
                    // once quiet.
                    read => {
                        if let Some(d) = read {
                            self.differs = Some(d);
                        }
                        self.after_debounce(Internal::DebounceDue(epoch));
                    }
                }
            }
            Internal::Progress {
                generation,
                state,
                build_ms,
                signature,
            } => {
                if signature.is_some() {
                    self.built.clone_from(&signature);
                }
                if let Some(g) = self.gens.get_mut(&generation) {
                    g.state = state;
                    g.build_ms = build_ms.or(g.build_ms);
                    g.signature = signature.or(g.signature.take());
                }
                if state == GenState::Starting {
                    self.events.emit(
                        "candidate_started",
                        Some(generation),
                        format!(
                            "generation {generation}: built in {} ms; starting the candidate",
                            build_ms.unwrap_or(0)
                        ),
                    );
                }
                self.notify_status();
            }
            Internal::PipelineDone {
                generation,
                result,
                snapshot,
                cfg,
            } => self.pipeline_done(generation, result, snapshot, cfg),
            Internal::Worker(WorkerEvent::Exited {
                generation,
                instance,
                exit,
            }) => self.exited(generation, instance, &exit),
            Internal::Worker(WorkerEvent::Spawned {
                generation,
                instance,
                pid,
                endpoint,
            }) => self.spawned(generation, instance, pid, &endpoint),
            Internal::Worker(WorkerEvent::Unhealthy {
                generation,
                instance,
                reason,
            }) => {
                let is_active = self
                    .active
                    .as_ref()
                    .is_some_and(|a| a.generation == generation && a.instance == instance);
                let waiting = self
                    .runtime
                    .get(&generation)
                    .and_then(|rt| rt.replace_not_before)
                    .is_some_and(|t| Instant::now() < t);
                if is_active && self.replacing.is_none() && !waiting {
                    self.events.emit(
                        "health_failed",
                        Some(generation),
                        format!(
                            "generation {generation}: active worker failed {} probes in a row ({reason}); starting a fresh process",
                            self.cfg.worker.health_failures
                        ),
                    );
                    self.start_instance(generation, Some(Replacing::Health));
                }
            }
            Internal::RestartDue(generation, epoch) => {
                if epoch == self.restart_epoch
                    && self.active.is_none()
                    && self.unit_state != "failed"
                    && self.is_newest(generation)
                {
                    if self.starting || self.replacing.is_some() {
                        // A fresh process is proving itself already (a
                        // replacement the crash overtook): it is this
                        // restart if it proves itself; if not, this one
                        // starts when it ends.
                        self.restart_waiting = Some(generation);
                    } else {
                        self.start_instance(generation, None);
                    }
                }
            }
            Internal::RestartDone {
                generation,
                replace,
                start,
                result,
            } => self.restart_done(generation, replace, start, result),
            Internal::DrainTimedOut {
                generation,
                instance,
            } => {
                if let Some(d) = self
                    .draining
                    .iter()
                    .find(|d| d.generation == generation && d.instance == instance)
                {
                    let (tunnels, requests) = (d.upstream.tunnels(), d.upstream.requests());
                    self.events.emit(
                        "drain_timeout",
                        Some(generation),
                        format!(
                            "generation {generation}: drain timeout; stopping its worker with {tunnels} connection(s) and {requests} request(s) open"
                        ),
                    );
                    // The worker gets SIGTERM; its connections stay until it
                    // exits, so one that closes its calls on SIGTERM (a
                    // WebSocket close 1001) gets that close through to the
                    // caller. They are cut when it exits (`exited`), at the
                    // latest after `stop_timeout_s`.
                    d.upstream.retire();
                    d.stop.cancel();
                    self.cut.insert(
                        (generation, instance),
                        format!(
                            "drain timeout with {tunnels} connection(s) and {requests} request(s) open"
                        ),
                    );
                }
            }
        }
    }

    fn pipeline_done(
        &mut self,
        generation: u64,
        result: Result<(Instance, Duration), (GenState, String)>,
        snapshot: Option<PathBuf>,
        cfg: Arc<Config>,
    ) {
        self.pipeline_busy = false;
        self.candidate = None;
        let waiters = std::mem::take(&mut self.waiters_now);
        let outcome = match result {
            Ok((inst, health)) => {
                let signature = self
                    .gens
                    .get(&generation)
                    .and_then(|g| g.signature.clone())
                    .unwrap_or_default();
                if let (Some(g), Some(snapshot)) = (self.gens.get_mut(&generation), snapshot) {
                    g.health_ms = Some(u64::try_from(health.as_millis()).unwrap_or(u64::MAX));
                    self.runtime.insert(
                        generation,
                        GenRuntime {
                            cfg,
                            snapshot,
                            signature,
                            dir: PathBuf::from(&g.dir),
                            next_instance: 2,
                            starts: VecDeque::from([Instant::now()]),
                            backoff: self.cfg.restart.backoff_initial,
                            replace_not_before: None,
                            replace_backoff: self.cfg.restart.backoff_initial,
                        },
                    );
                }
                self.cut_over(inst);
                self.totals.deploys_active += 1;
                DeployOutcome {
                    generation: Some(generation),
                    outcome: "active".into(),
                    reason: None,
                }
            }
            Err((state, reason)) => {
                let kind = if state == GenState::Failed {
                    self.totals.deploys_failed += 1;
                    "build_failed"
                } else {
                    self.totals.deploys_rejected += 1;
                    "rejected"
                };
                let keeps = match &self.active {
                    Some(a) => format!("; generation {} keeps serving", a.generation),
                    None => "; no worker is serving".to_string(),
                };
                // Where the whole of a build's output is (the reason quotes
                // one line of it).
                let output = if reason.starts_with("build failed")
                    || reason.starts_with("build timed out")
                {
                    format!("; the build's output: batonctl logs -g {generation} --build")
                } else {
                    String::new()
                };
                self.events.emit(
                    kind,
                    Some(generation),
                    format!(
                        "generation {generation}: {} ({reason}){keeps}{output}",
                        state.as_str()
                    ),
                );
                self.finish(generation, state, Some(reason.clone()));
                // (A cutover prunes by itself.)
                self.prune();
                // No worker has served yet: the unit has failed (until a
                // deploy works), it is not still starting.
                if self.active.is_none() && self.unit_state == "starting" {
                    self.unit_state = "failed";
                }
                // The daemon is up all the same: it answers 503, watches
                // for the fix and takes deploys. systemd must hear so (its
                // status line says what failed), or `systemctl start` would
                // wait out `TimeoutStartSec` and kill it, again and again.
                if !self.ready_sent {
                    self.ready_sent = true;
                    systemd::ready(&self.status_line());
                }
                DeployOutcome {
                    generation: Some(generation),
                    outcome: state.as_str().into(),
                    reason: Some(reason),
                }
            }
        };
        for w in waiters {
            let _ = w.send(outcome.clone());
        }
        self.notify_status();
        if self.pending.is_some() {
            // Changes came in during the run: exactly one more, after quiet.
            let trigger = self.pending.take().unwrap_or_default();
            let now = !self.waiters_next.is_empty();
            let only = self.watch_only && !now;
            self.request_deploy(trigger, now);
            self.watch_only = only;
        }
    }

    /// Moves traffic to a proven instance and starts draining the old one.
    fn cut_over(&mut self, mut inst: Instance) {
        let generation = inst.generation;
        // A fresh start of another generation under way (a restart or a
        // replacement that a deploy overtook) has nothing left to take
        // over: stopped, and whoever waits for it told. Left running, it
        // held the new generation's restarts and replacements back, and
        // took their waiters.
        if let Some(f) = self.fresh.take_if(|f| f.generation != generation) {
            f.cancel.cancel();
            self.stale_starts += 1;
            self.starting = false;
            self.replacing = None;
            for w in self.restart_waiters.drain(..) {
                let _ = w.send(DeployOutcome {
                    generation: Some(f.generation),
                    outcome: "rejected".into(),
                    reason: Some(format!("superseded by generation {generation}")),
                });
            }
        }
        self.router.set(Some(inst.upstream.clone()));
        let now = timestamp(SystemTime::now());
        inst.cutover_at = Some(now.clone());
        if let Some(g) = self.gens.get_mut(&generation) {
            g.state = GenState::Active;
            g.cutover_at = Some(now);
            g.pid = Some(inst.pid);
            g.port = inst.endpoint.port();
            g.socket = inst.endpoint.unix_path().map(|p| p.display().to_string());
            g.reason = None;
            g.ended_at = None;
        }
        let old = self.active.replace(inst);
        self.unit_state = "running";
        self.events.emit(
            "cutover",
            Some(generation),
            format!(
                "generation {generation}: proven; traffic moved to pid {} on {}",
                self.active.as_ref().map_or(0, |a| a.pid),
                self.active
                    .as_ref()
                    .map_or_else(String::new, |a| a.endpoint.to_string())
            ),
        );
        self.spawn_monitor();
        if let Some(old) = old {
            self.drain(old);
        }
        // A generation whose worker was down (it crashed, and its restart
        // was due or under way) is over now: its history entry must not
        // stay `active`, and it can be pruned. (One past the start limit
        // is `failed` already.)
        let over: Vec<u64> = self
            .gens
            .values()
            .filter(|g| g.id != generation && g.state == GenState::Active && !self.is_live(g.id))
            .map(|g| g.id)
            .collect();
        for id in over {
            self.finish(
                id,
                GenState::Stopped,
                Some(format!(
                    "replaced by generation {generation} while its worker was down"
                )),
            );
        }
        self.prune();
        if !self.ready_sent {
            self.ready_sent = true;
            systemd::ready(&self.status_line());
        }
        // A worker that died between its proof and now: its exit came
        // while it was a candidate, and was let go then.
        let gone = self.active.as_ref().and_then(|a| {
            let exit = a.exited.borrow().clone();
            exit.map(|e| (a.instance, e))
        });
        if let Some((instance, exit)) = gone {
            self.exited(generation, instance, &exit);
        }
    }

    fn spawn_monitor(&self) {
        let Some(a) = &self.active else { return };
        let Some(rt) = self.runtime.get(&a.generation) else {
            return;
        };
        // With the config the generation was proven with: a reload whose
        // own deploy failed (another health path, say) must not fail the
        // probes of the worker still serving.
        tokio::spawn(worker_proc::monitor(
            rt.cfg.clone(),
            a.generation,
            a.instance,
            a.endpoint.clone(),
            rt.signature.clone(),
            a.monitor.clone(),
            self.wtx.clone(),
        ));
    }

    /// Lets an instance finish its requests and calls, then stops it.
    fn drain(&mut self, old: Instance) {
        old.monitor.cancel();
        // No new request goes there: its idle connections can go now.
        old.upstream.pool.close();
        let (generation, instance) = (old.generation, old.instance);
        let same_gen_active = self
            .active
            .as_ref()
            .is_some_and(|a| a.generation == generation);
        if !same_gen_active {
            self.set_state(generation, GenState::Draining, None);
        }
        self.events.emit(
            "draining",
            Some(generation),
            format!(
                "generation {generation} (pid {}): draining {} request(s) and {} connection(s)",
                old.pid,
                old.upstream.requests(),
                old.upstream.tunnels()
            ),
        );
        let upstream = old.upstream.clone();
        let stop = old.stop.clone();
        let itx = self.itx.clone();
        let timeout = self.cfg.worker.drain_timeout;
        tokio::spawn(async move {
            tokio::select! {
                () = upstream.idle() => {
                    upstream.retire();
                    stop.cancel();
                }
                _ = tokio::time::sleep(timeout) => {
                    let _ = itx.send(Internal::DrainTimedOut { generation, instance });
                }
                () = stop.cancelled() => {}
            }
        });
        self.draining.push(old);
    }

    /// A worker process started: a generation that has no process yet (a
    /// candidate, or one restarting after a crash or a failed unit's
    /// restart, while nothing serves) shows its pid and address while it
    /// proves itself, so a slow start can be looked at.
    fn spawned(&mut self, generation: u64, instance: u64, pid: u32, endpoint: &Endpoint) {
        let restarting = self.starting && self.active.is_none();
        let Some(g) = self.gens.get_mut(&generation) else {
            return;
        };
        // (Too late when the start has already ended: the state moved on.)
        if !(g.state == GenState::Starting || restarting) || g.pid.is_some() {
            return;
        }
        g.pid = Some(pid);
        g.port = endpoint.port();
        g.socket = endpoint.unix_path().map(|p| p.display().to_string());
        tracing::info!(
            "generation {generation}: worker {instance} started as pid {pid} on {endpoint}; proving it"
        );
        self.notify_status();
    }

    fn exited(&mut self, generation: u64, instance: u64, exit: &worker_proc::Exit) {
        if let Some(pos) = self
            .draining
            .iter()
            .position(|d| d.generation == generation && d.instance == instance)
        {
            let d = self.draining.remove(pos);
            d.upstream.tunnel_cancel.cancel();
            let still_used = self
                .active
                .as_ref()
                .is_some_and(|a| a.generation == generation)
                || self.draining.iter().any(|o| o.generation == generation);
            // (What it had open is not counted here: its connections may
            // have ended with it a moment before its exit is seen.)
            let how = if exit.requested {
                "stopped after draining"
            } else {
                "exited while draining"
            };
            self.events.emit(
                "stopped",
                Some(generation),
                format!(
                    "generation {generation} (pid {}) {how} ({})",
                    d.pid, exit.status
                ),
            );
            let cut = self.cut.remove(&(generation, instance));
            if !still_used {
                // A worker that died while draining, or was stopped at the
                // drain timeout, says so in its history entry.
                let why = if exit.requested {
                    cut
                } else {
                    Some(format!("exited with status {} while draining", exit.status))
                };
                self.finish(generation, GenState::Stopped, why);
                self.prune();
            }
            self.notify_status();
            return;
        }
        let is_active = self
            .active
            .as_ref()
            .is_some_and(|a| a.generation == generation && a.instance == instance);
        if !is_active {
            return; // a candidate: the pipeline reports it
        }
        let Some(dead) = self.active.take() else {
            return;
        };
        // The process is gone: its history entry shows no pid or port.
        if let Some(g) = self.gens.get_mut(&generation) {
            (g.pid, g.port, g.socket) = (None, None, None);
        }
        dead.monitor.cancel();
        dead.upstream.tunnel_cancel.cancel();
        self.router.set(None);
        if exit.requested || self.token.is_cancelled() || self.unit_state == "stopping" {
            return;
        }
        self.events.emit(
            "worker_exited",
            Some(generation),
            format!(
                "generation {generation}: active worker (pid {}) exited with status {}",
                dead.pid, exit.status
            ),
        );
        // A worker that ran for a whole start-limit window was not
        // crash-looping: its restart starts over from the first delay.
        if dead.started.elapsed() >= self.cfg.restart.limit_interval
            && let Some(rt) = self.runtime.get_mut(&generation)
        {
            rt.backoff = self.cfg.restart.backoff_initial;
        }
        self.schedule_restart(generation, &format!("exited with status {}", exit.status));
    }

    /// systemd's `Restart=on-failure`: restart after a growing backoff,
    /// unless the start limit is hit (then `why`, the last failure, is
    /// part of the reason).
    fn schedule_restart(&mut self, generation: u64, why: &str) {
        let limit = self.cfg.restart.clone();
        let Some(rt) = self.runtime.get_mut(&generation) else {
            return;
        };
        let now = Instant::now();
        while rt
            .starts
            .front()
            .is_some_and(|t| now.duration_since(*t) > limit.limit_interval)
        {
            rt.starts.pop_front();
        }
        if rt.starts.len() >= limit.limit_burst as usize {
            self.unit_state = "failed";
            let reason = format!(
                "start limit hit: {} starts within {} s; the last {why}",
                rt.starts.len(),
                limit.limit_interval.as_secs()
            );
            self.events.emit(
                "start_limit_hit",
                Some(generation),
                format!("generation {generation}: {reason}; the unit is failed until the next deploy or restart"),
            );
            self.finish(generation, GenState::Failed, Some(reason));
            self.notify_status();
            return;
        }
        let delay = rt.backoff;
        rt.backoff = (rt.backoff * 2).min(limit.backoff_max);
        self.unit_state = "restarting";
        // The status says why nothing serves, and when it will again.
        if let Some(g) = self.gens.get_mut(&generation) {
            g.reason = Some(format!(
                "{why}; restarting the same snapshot in {} ms",
                delay.as_millis()
            ));
        }
        self.events.emit(
            "restart_scheduled",
            Some(generation),
            format!(
                "generation {generation}: restarting the same snapshot in {} ms",
                delay.as_millis()
            ),
        );
        self.notify_status();
        self.restart_epoch += 1;
        let (itx, epoch) = (self.itx.clone(), self.restart_epoch);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = itx.send(Internal::RestartDue(generation, epoch));
        });
    }

    /// Starts a fresh process of `generation`'s snapshot. With `replace`,
    /// the active keeps serving until the new one is proven.
    fn start_instance(&mut self, generation: u64, replace: Option<Replacing>) {
        let Some(rt) = self.runtime.get_mut(&generation) else {
            return;
        };
        if replace.is_some() {
            self.replacing = replace;
        }
        let replace = replace.is_some();
        if !replace {
            // This start is the restart: a backoff timer still running
            // would start a second one.
            self.starting = true;
            self.restart_epoch += 1;
            // The status's reason said when it would start: now it does.
            if let Some(r) = self
                .gens
                .get_mut(&generation)
                .and_then(|g| g.reason.as_mut())
                && let Some(at) = r.rfind("; restarting the same snapshot in ")
            {
                r.truncate(at);
                r.push_str("; a fresh process of the same snapshot is starting");
            }
        }
        let launch = Launch {
            generation,
            instance: rt.next_instance,
            snapshot: rt.snapshot.clone(),
            signature: rt.signature.clone(),
            dir: rt.dir.clone(),
        };
        rt.next_instance += 1;
        // The start limit counts starts without a worker serving (a crash
        // loop); a replacement beside a serving one has its own backoff.
        if !replace {
            rt.starts.push_back(Instant::now());
        }
        if let Some(g) = self.gens.get_mut(&generation) {
            g.restarts += 1;
        }
        self.totals.restarts += 1;
        let cfg = rt.cfg.clone();
        let TaskCtx {
            shim,
            itx,
            wtx,
            token,
            ..
        } = self.task_ctx();
        self.fresh_starts += 1;
        let start = self.fresh_starts;
        self.fresh = Some(FreshStart {
            id: start,
            generation,
            instance: launch.instance,
            at: Instant::now(),
            cancel: token.clone(),
        });
        tokio::spawn(async move {
            let result = worker_proc::start(&cfg, &shim, &launch, wtx, &token).await;
            let _ = itx.send(Internal::RestartDone {
                generation,
                replace,
                start,
                result,
            });
        });
        // A replacement shows in systemd's status line too.
        self.notify_status();
    }

    fn restart_done(
        &mut self,
        generation: u64,
        replace: bool,
        start: u64,
        result: Result<(Instance, Duration), worker_proc::StartFailure>,
    ) {
        if self.stale_start_ended(start, &result) {
            return;
        }
        self.fresh = None;
        if !replace {
            self.starting = false;
            // Its process, shown while it proved itself, is the active one
            // now (cut over below) or gone.
            if let Some(g) = self.gens.get_mut(&generation)
                && self.active.is_none()
            {
                (g.pid, g.port, g.socket) = (None, None, None);
            }
        }
        let why = if replace { self.replacing.take() } else { None };
        let for_health = why == Some(Replacing::Health);
        let waiters = std::mem::take(&mut self.restart_waiters);
        let outcome = match result {
            Ok((inst, _)) => {
                // A deploy may have moved on meanwhile: only take over from
                // the same generation (or from nothing).
                let current = self.active.as_ref().map(|a| a.generation);
                if (current.is_none() && self.is_newest(generation)) || current == Some(generation)
                {
                    // The backoff stays where it is: a worker that proves
                    // itself and crashes again soon is still crash-looping
                    // (it starts over only after a run as long as the
                    // start-limit window, see the exit). A replacement's
                    // own backoff starts over.
                    if let Some(rt) = self.runtime.get_mut(&generation) {
                        rt.replace_backoff = self.cfg.restart.backoff_initial;
                        rt.replace_not_before = None;
                    }
                    self.cut_over(inst);
                    DeployOutcome {
                        generation: Some(generation),
                        outcome: "active".into(),
                        reason: None,
                    }
                } else {
                    inst.stop.cancel();
                    DeployOutcome {
                        generation: Some(generation),
                        outcome: "rejected".into(),
                        reason: Some("superseded by a newer generation".into()),
                    }
                }
            }
            Err(failure) => {
                // A start batond could not make (short of descriptors,
                // memory or processes) counts toward the start limit as
                // systemd counts a failed spawn: a shortage that lasts
                // ends in `failed`, which alerting sees; its reason says
                // whose failure it was.
                let reason = failure.reason;
                // Batond's own shortage is a failure, not the worker's
                // rejection (as for a deploy).
                let outcome = if failure.ours { "failed" } else { "rejected" };
                self.events.emit(
                    outcome,
                    Some(generation),
                    format!("generation {generation}: fresh start failed ({reason})"),
                );
                if self.active.is_none() && !self.token.is_cancelled() && self.is_newest(generation)
                {
                    // (It is the restart a crash meanwhile was waiting for.)
                    self.restart_waiting = None;
                    // Unless the crash hit the start limit while this one
                    // proved itself: the unit is failed and said so once.
                    if self.unit_state != "failed" {
                        self.schedule_restart(generation, &format!("failed to start: {reason}"));
                    }
                } else if for_health
                    && self
                        .active
                        .as_ref()
                        .is_some_and(|a| a.generation == generation)
                    && let Some(rt) = self.runtime.get_mut(&generation)
                {
                    // The active worker keeps serving and keeps being
                    // probed; if it is still failing after the backoff, a
                    // replacement is tried again.
                    let delay = rt.replace_backoff;
                    rt.replace_backoff = (delay * 2).min(self.cfg.restart.backoff_max);
                    rt.replace_not_before = Some(Instant::now() + delay);
                    self.events.emit(
                        "health_retry",
                        Some(generation),
                        format!(
                            "generation {generation}: the active worker stays; if its probes still fail, a fresh process is tried again in {} ms at the earliest",
                            delay.as_millis()
                        ),
                    );
                }
                DeployOutcome {
                    generation: Some(generation),
                    outcome: outcome.into(),
                    reason: Some(reason),
                }
            }
        };
        for w in waiters {
            let _ = w.send(outcome.clone());
        }
        // A restart that came due meanwhile, of the newest generation, with
        // nothing serving still (the start that ended did not take over):
        // now.
        if let Some(g) = self.restart_waiting.take()
            && self.active.is_none()
            && !self.starting
            && self.replacing.is_none()
            && self.unit_state == "restarting"
            && self.is_newest(g)
        {
            self.start_instance(g, None);
        }
        self.notify_status();
    }

    fn restart_now(&mut self, reply: Option<oneshot::Sender<DeployOutcome>>) {
        let generation = self
            .active
            .as_ref()
            .map(|a| a.generation)
            .or_else(|| self.runtime.keys().next_back().copied());
        // The operator's restart starts the crash delay over, also when it
        // joins a fresh start under way.
        if let Some(rt) = generation.and_then(|g| self.runtime.get_mut(&g)) {
            rt.backoff = self.cfg.restart.backoff_initial;
        }
        match generation {
            // A fresh process is starting already (health replacement, an
            // earlier restart, or a crash restart): this restart waits for
            // that one.
            Some(_) if self.replacing.is_some() || self.starting => {
                if let Some(r) = reply {
                    self.restart_waiters.push(r);
                }
                self.events.emit(
                    "restart",
                    generation,
                    "restart requested; a fresh process is starting already",
                );
            }
            Some(g) if self.runtime.contains_key(&g) => {
                if let Some(r) = reply {
                    self.restart_waiters.push(r);
                }
                if self.unit_state == "failed" {
                    if let Some(rt) = self.runtime.get_mut(&g) {
                        rt.starts.clear();
                    }
                    // The generation is in use again: not over, and not
                    // to be pruned while its fresh process starts.
                    if let Some(info) = self.gens.get_mut(&g)
                        && info.state == GenState::Failed
                    {
                        info.state = GenState::Active;
                        info.ended_at = None;
                        info.reason = None;
                    }
                    self.unit_state = "restarting";
                }
                self.events.emit(
                    "restart",
                    Some(g),
                    format!("generation {g}: restart requested"),
                );
                let replace = self.active.is_some();
                self.start_instance(g, replace.then_some(Replacing::Asked));
            }
            _ => {
                // Nothing was ever built: a restart is a deploy.
                if let Some(r) = reply {
                    self.waiters_next.push(r);
                }
                self.request_deploy("restart".into(), true);
            }
        }
    }

    // --- config ---

    /// Reads, checks and watches the config file on the blocking pool (a
    /// large watched tree takes a while to watch, and `chrt` runs for a
    /// priority change), then applies it here ([`Self::reloaded`]). A
    /// reload asked for while one runs runs after it.
    fn reload(&mut self, reply: Option<oneshot::Sender<ReloadResult>>) {
        if self.reload_running {
            self.reload_next.extend(reply);
            self.reload_again = true;
            return;
        }
        self.reload_running = true;
        self.reload_now.extend(reply);
        // Before the first READY=1 systemd is still waiting for the start
        // to finish: a reload then is no reload to systemd, and its end
        // must not say READY=1 while no worker serves.
        if self.ready_sent {
            systemd::reloading();
        }
        let old = self.cfg.clone();
        let overrides = self.overrides.clone();
        let change_tx = self.change_tx.clone();
        let itx = self.itx.clone();
        tokio::task::spawn_blocking(move || {
            let result = prepare_reload(&old, &overrides, change_tx);
            let _ = itx.send(Internal::Reloaded(Box::new(result)));
        });
    }

    /// Applies a config [`Self::reload`] prepared, or records why not.
    fn reloaded(&mut self, prepared: Prepared) {
        self.reload_running = false;
        let result = match prepared {
            Ok((new, w, kept)) => {
                self.watcher = Some(w);
                self.proxy
                    .set_timeouts(crate::proxy::Timeouts::of(&new.daemon));
                self.cfg = Arc::new(new);
                self.config_error = None;
                let advice = self.cfg.advice();
                for a in &advice {
                    tracing::warn!("{a}");
                }
                let mut message = "config reloaded; redeploying".to_string();
                for k in kept.iter().chain(&advice) {
                    message.push_str("; ");
                    message.push_str(k);
                }
                self.events.emit("config_reloaded", None, message);
                let trigger = if std::mem::take(&mut self.events_lost) {
                    "config reload (file events were lost)"
                } else {
                    "config reload"
                };
                self.request_deploy(trigger.into(), true);
                Ok(Reloaded { kept, advice })
            }
            Err(msg) => {
                if std::mem::take(&mut self.events_lost) {
                    self.request_deploy("watch: file events were lost".into(), true);
                } else if self.pending.is_some() && !self.pipeline_busy {
                    // Source changes that waited for this reload.
                    self.deploy_due();
                }
                Err(self.refuse_config(msg))
            }
        };
        if self.ready_sent {
            systemd::ready(&self.status_line());
        } else {
            systemd::status(&self.status_line());
        }
        for r in self.reload_now.drain(..) {
            let _ = r.send(result.clone());
        }
        if std::mem::take(&mut self.reload_again) {
            let next = std::mem::take(&mut self.reload_next);
            self.reload_now = next;
            self.reload(None);
        }
    }

    /// Records a refused reload; the running config stays.
    fn refuse_config(&mut self, msg: String) -> String {
        self.events.emit(
            "config_rejected",
            None,
            format!("config refused; the running config stays: {msg}"),
        );
        self.config_error = Some(msg.clone());
        msg
    }

    // --- bookkeeping ---

    fn set_state(&mut self, generation: u64, state: GenState, reason: Option<String>) {
        if let Some(g) = self.gens.get_mut(&generation) {
            g.state = state;
            if reason.is_some() {
                g.reason = reason;
            }
        }
    }

    fn finish(&mut self, generation: u64, state: GenState, reason: Option<String>) {
        self.set_state(generation, state, reason);
        if let Some(g) = self.gens.get_mut(&generation) {
            g.ended_at = Some(timestamp(SystemTime::now()));
            g.pid = None;
            g.port = None;
            g.socket = None;
        }
    }

    /// Keeps the history bounded: generations that fall out of it lose their
    /// folder (snapshot and logs), so the state dir does not grow forever.
    fn prune(&mut self) {
        let keep = self.cfg.daemon.history.max(1);
        // Those that ended first go first (not the lowest numbers: a
        // generation that drained for an hour ended last, and how it ended
        // is the news).
        let mut finished: Vec<(Option<&str>, u64)> = self
            .gens
            .values()
            .filter(|g| {
                matches!(
                    g.state,
                    GenState::Stopped | GenState::Rejected | GenState::Failed
                ) && !self.is_live(g.id)
                    // What `batonctl restart` of a failed unit starts.
                    && !self.is_newest(g.id)
            })
            .map(|g| (g.ended_at.as_deref(), g.id))
            .collect();
        finished.sort_unstable();
        let finished: Vec<u64> = finished.into_iter().map(|(_, id)| id).collect();
        // The folders a previous daemon left are older than any of this
        // one's: they go first, so the two together stay within `history`.
        let mut excess = (self.earlier.len() + finished.len()).saturating_sub(keep);
        while excess > 0
            && let Some(id) = self.earlier.pop_front()
        {
            remove_gen_dir(&self.cfg.daemon.state_dir, id);
            excess -= 1;
        }
        for id in &finished[..excess] {
            self.gens.remove(id);
            self.runtime.remove(id);
            remove_gen_dir(&self.cfg.daemon.state_dir, *id);
        }
    }

    /// Whether `generation` is the newest proven one: only that one is
    /// restarted when its worker dies, and only it takes traffic from a
    /// restart. An older one's restart that ends while the newer one is
    /// down between its own restarts must not take traffic back.
    fn is_newest(&self, generation: u64) -> bool {
        self.runtime.keys().next_back() == Some(&generation)
    }

    fn is_live(&self, generation: u64) -> bool {
        self.active
            .as_ref()
            .is_some_and(|a| a.generation == generation)
            || self.draining.iter().any(|d| d.generation == generation)
            || self.candidate == Some(generation)
    }

    fn info(&self, generation: u64, inst: Option<&Instance>) -> Option<GenerationInfo> {
        let mut g = self.gens.get(&generation)?.clone();
        if let Some(i) = inst {
            g.pid = Some(i.pid);
            g.port = i.endpoint.port();
            g.socket = i.endpoint.unix_path().map(|p| p.display().to_string());
            g.requests_in_flight = i.upstream.requests();
            g.connections = i.upstream.tunnels();
            // An old process of the generation (draining after a restart)
            // shows when it took traffic, not when its successor did.
            if i.cutover_at.is_some() {
                g.cutover_at.clone_from(&i.cutover_at);
            }
        }
        Some(g)
    }

    fn status(&self) -> Status {
        let active = self
            .active
            .as_ref()
            .and_then(|a| self.info(a.generation, Some(a)));
        let mut draining = Vec::new();
        for d in &self.draining {
            if let Some(mut g) = self.info(d.generation, Some(d)) {
                g.state = GenState::Draining;
                draining.push(g);
            }
        }
        let candidate = self.candidate.and_then(|c| self.info(c, None));
        // With no worker up, a unit restarting or failed shows the
        // generation it restarts, or the one that hit the limit: no pid or
        // port (nothing runs), `starting` while a restart is due.
        let active = active.or_else(|| {
            if self.unit_state == "failed" || self.unit_state == "restarting" {
                let mut g = self
                    .runtime
                    .keys()
                    .next_back()
                    .and_then(|g| self.info(*g, None))?;
                // (A restart's process shows while it proves itself.)
                if self.unit_state == "failed" {
                    (g.pid, g.port, g.socket) = (None, None, None);
                }
                if g.state == GenState::Active {
                    g.state = GenState::Starting;
                }
                Some(g)
            } else {
                None
            }
        });
        let shown = active.as_ref().map(|g| g.id);
        let history = self
            .gens
            .values()
            .rev()
            .filter(|g| !self.is_live(g.id) && Some(g.id) != shown)
            .cloned()
            .collect();
        Status {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            state: self.unit_state.to_string(),
            listen: self.cfg.daemon.listen.to_string(),
            config_file: self.cfg.file.display().to_string(),
            config_error: self.config_error.clone(),
            uptime_s: self.started.elapsed().as_secs(),
            active,
            candidate,
            draining,
            history,
            replacing: self.replacement(),
            deploy_pending: self.pending.is_some(),
            totals: self.totals,
        }
    }

    /// The replacement of the active worker under way, if one is. (Once
    /// the active worker is gone, a replacement still proving itself is
    /// the restart, and the status shows it as the generation starting.)
    fn replacement(&self) -> Option<crate::control::api::Replacement> {
        let why = self.replacing?;
        let f = self.fresh.as_ref()?;
        if self.active.as_ref()?.generation != f.generation {
            return None;
        }
        Some(crate::control::api::Replacement {
            generation: f.generation,
            instance: f.instance,
            reason: match why {
                Replacing::Health => "health checks failed",
                Replacing::Asked => "batonctl restart",
            }
            .to_string(),
            since_s: f.at.elapsed().as_secs(),
        })
    }

    fn status_line(&self) -> String {
        match (&self.active, self.candidate) {
            (Some(a), Some(c)) => format!(
                "generation {} active (pid {}); generation {c} {}",
                a.generation,
                a.pid,
                self.gens.get(&c).map_or("", |g| g.state.as_str())
            ),
            (Some(a), None) => match self.replacement() {
                Some(r) => format!(
                    "generation {} active (pid {}); a fresh process replacing it ({})",
                    a.generation, a.pid, r.reason
                ),
                None => format!("generation {} active (pid {})", a.generation, a.pid),
            },
            (None, Some(c)) => format!(
                "no active worker; generation {c} {}",
                self.gens.get(&c).map_or("", |g| g.state.as_str())
            ),
            (None, None) => {
                // What failed last, when nothing serves: a failed unit's
                // status line is what `systemctl status` shows.
                let last = (self.unit_state == "failed")
                    .then(|| self.gens.values().next_back())
                    .flatten()
                    .and_then(|g| Some((g.id, g.state.as_str(), g.reason.as_deref()?)));
                match last {
                    // One line, as the notify protocol needs, and short.
                    Some((id, state, reason)) => {
                        let reason: String = reason
                            .split(['\n', '\r'])
                            .collect::<Vec<_>>()
                            .join(" ")
                            .chars()
                            .take(200)
                            .collect();
                        format!("no active worker (failed; generation {id} {state}: {reason})")
                    }
                    None => format!("no active worker ({})", self.unit_state),
                }
            }
        }
    }

    fn notify_status(&self) {
        systemd::status(&self.status_line());
    }

    async fn shutdown(&mut self) {
        systemd::stopping();
        self.events.emit("stopping", None, "daemon stopping");
        self.unit_state = "stopping";
        // Nothing starts from now on: a request waiting for a worker gets
        // its 503 now.
        self.router.set_coming(false);
        self.stopping.cancel();
        let grace = self.cfg.daemon.shutdown_timeout;
        // The workers stay in `active` and `draining` until they are gone,
        // so `batonctl status` shows what is left meanwhile.
        type Exited = tokio::sync::watch::Receiver<Option<worker_proc::Exit>>;
        let all: Vec<(Arc<Upstream>, CancellationToken, Exited)> = self
            .draining
            .iter()
            .chain(self.active.iter())
            .map(|i| (i.upstream.clone(), i.stop.clone(), i.exited.clone()))
            .collect();
        for inst in self.draining.iter().chain(self.active.iter()) {
            inst.monitor.cancel();
        }
        // The workers keep running until the requests and calls they have
        // are done (up to the shutdown timeout): the front has stopped
        // taking connections and closes each one after its request in
        // flight, which the active worker still answers.
        let deadline = tokio::time::Instant::now() + grace;
        self.serve_while(async {
            for (upstream, _, _) in &all {
                let _ = tokio::time::timeout_at(deadline, upstream.idle()).await;
            }
        })
        .await;
        self.router.set(None);
        // What the timeout leaves open is said, as a drain timeout's is.
        let (calls, requests) = all.iter().fold((0, 0), |(c, r), (u, _, _)| {
            (c + u.tunnels(), r + u.requests())
        });
        if calls + requests > 0 {
            self.events.emit(
                "shutdown_timeout",
                None,
                format!(
                    "stopping the workers with {calls} connection(s) and {requests} request(s) open (daemon.shutdown_timeout_s is over)"
                ),
            );
        }
        // Now builds, candidates and restarts end, and every worker stops.
        // Calls still open stay connected until their worker exits: one
        // that closes them on SIGTERM (a WebSocket close 1001) gets that
        // close through.
        self.token.cancel();
        for (upstream, stop, _) in &all {
            upstream.retire();
            stop.cancel();
        }
        let wait = self.cfg.worker.stop_timeout + Duration::from_secs(2);
        self.serve_while(async {
            for (_, _, exited) in &all {
                let mut rx = exited.clone();
                let _ = tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await;
            }
        })
        .await;
        for (upstream, _, _) in &all {
            upstream.tunnel_cancel.cancel();
            upstream.tunnel_tracker.close();
        }
        // What the workers wrote before they went (their calls' close
        // frames) reaches the callers first, for a bounded time.
        self.serve_while(async {
            let _ = tokio::time::timeout(
                crate::proxy::TUNNEL_FLUSH + Duration::from_millis(500),
                async {
                    for (upstream, _, _) in &all {
                        upstream.tunnel_tracker.wait().await;
                    }
                },
            )
            .await;
        })
        .await;
        self.draining.clear();
        self.active = None;
        // Builds, candidates and fresh starts end through the cancelled
        // token: their tasks get the stop timeout to stop what they
        // started and reap it, and a worker proven meanwhile is stopped.
        let _ = tokio::time::timeout(wait, async {
            while self.work_under_way() {
                let Some(i) = self.irx.recv().await else {
                    return;
                };
                self.ended_while_stopping(i);
            }
        })
        .await;
        for mut rx in std::mem::take(&mut self.late) {
            let _ = tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await;
        }
        self.watcher = None;
    }

    /// Runs `work` while answering the control socket (status as it is,
    /// a refusal for anything that would start work) and keeping the
    /// workers' state true: an exit, a drain timeout and a candidate's
    /// progress are handled; of the rest of the supervisor's own messages
    /// only the end of a build or restart is noted.
    async fn serve_while(&mut self, work: impl std::future::Future<Output = ()>) {
        tokio::pin!(work);
        loop {
            tokio::select! {
                () = &mut work => return,
                Some(c) = self.rx.recv() => self.control_stopping(c),
                Some(i) = self.irx.recv() => match i {
                    Internal::Worker(WorkerEvent::Exited { .. })
                    | Internal::DrainTimedOut { .. }
                    | Internal::Progress { .. } => self.internal(i),
                    other => self.ended_while_stopping(other),
                },
            }
        }
    }

    /// A build-and-prove or a fresh start is under way: each ends with a
    /// `PipelineDone` or a `RestartDone` (one of each kind at most runs at
    /// a time), which the stop waits for.
    fn work_under_way(&self) -> bool {
        self.pipeline_busy || self.replacing.is_some() || self.starting || self.stale_starts > 0
    }

    /// Whether the fresh start `start` that ended is one a cutover of
    /// another generation made obsolete (its flags and waiters were settled
    /// then, and are not its to touch now). If so it is let go: its
    /// process, if it got that far, is stopped, and while batond stops,
    /// waited for with the others.
    fn stale_start_ended(
        &mut self,
        start: u64,
        result: &Result<(Instance, Duration), worker_proc::StartFailure>,
    ) -> bool {
        if self.fresh.as_ref().is_some_and(|f| f.id == start) {
            return false;
        }
        self.stale_starts = self.stale_starts.saturating_sub(1);
        if let Ok((inst, _)) = result {
            inst.upstream.retire();
            inst.stop.cancel();
            if self.stopping.is_cancelled() {
                self.late.push(inst.exited.clone());
            }
        }
        true
    }

    /// A build-and-prove or a fresh start that ended while batond stops
    /// (anything else is let go): a worker proven meanwhile is not cut
    /// over but stopped at once (its exit is waited for with the others),
    /// the generation's history entry says how its deploy ended, and who
    /// waited for it is told.
    fn ended_while_stopping(&mut self, i: Internal) {
        const WHY: &str = "batond is stopping";
        let (generation, proven, waiters) = match i {
            Internal::PipelineDone {
                generation, result, ..
            } => {
                self.pipeline_busy = false;
                self.candidate = None;
                let (proven, state, reason) = match result {
                    Ok((inst, _)) => (Some(inst), GenState::Stopped, WHY.to_string()),
                    Err((state, reason)) => (None, state, reason),
                };
                // Counted, as in `pipeline_done` (one the stop cut short
                // is a failed deploy).
                if state == GenState::Rejected {
                    self.totals.deploys_rejected += 1;
                } else {
                    self.totals.deploys_failed += 1;
                }
                // The candidate's end is an event like any other: a reader
                // of the stream saw it start.
                self.events.emit(
                    match state {
                        GenState::Rejected => "rejected",
                        GenState::Failed if reason != WHY => "build_failed",
                        _ => "stopped",
                    },
                    Some(generation),
                    format!("generation {generation}: {} ({reason})", state.as_str()),
                );
                self.finish(generation, state, Some(reason));
                (generation, proven, std::mem::take(&mut self.waiters_now))
            }
            Internal::RestartDone { start, result, .. }
                if self.stale_start_ended(start, &result) =>
            {
                self.notify_status();
                return;
            }
            Internal::RestartDone {
                generation,
                replace,
                result,
                ..
            } => {
                self.fresh = None;
                if replace {
                    self.replacing = None;
                } else {
                    self.starting = false;
                }
                let proven = result.ok().map(|(inst, _)| inst);
                (
                    generation,
                    proven,
                    std::mem::take(&mut self.restart_waiters),
                )
            }
            _ => return,
        };
        if let Some(inst) = proven {
            inst.upstream.retire();
            inst.stop.cancel();
            self.late.push(inst.exited.clone());
        }
        for w in waiters {
            let _ = w.send(DeployOutcome {
                generation: Some(generation),
                outcome: "failed".into(),
                reason: Some(WHY.into()),
            });
        }
        self.notify_status();
    }

    fn control_stopping(&mut self, c: Control) {
        const WHY: &str = "batond is stopping";
        match c {
            Control::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Control::Deploy { reply: Some(r), .. } | Control::Restart { reply: Some(r), .. } => {
                let _ = r.send(DeployOutcome {
                    generation: None,
                    outcome: "failed".into(),
                    reason: Some(WHY.into()),
                });
            }
            Control::Reload(Some(r)) => {
                let _ = r.send(Err(WHY.into()));
            }
            Control::Shutdown(done) => {
                // Already stopping; the first request's reply says when.
                drop(done);
            }
            _ => {}
        }
    }
}

/// Build, snapshot, start and prove one generation.
async fn pipeline(
    cfg: &Config,
    shim: &std::path::Path,
    generation: u64,
    dir: &std::path::Path,
    itx: &mpsc::UnboundedSender<Internal>,
    wtx: mpsc::UnboundedSender<WorkerEvent>,
    (token, stopping): (&CancellationToken, &CancellationToken),
) -> (
    Result<(Instance, Duration), (GenState, String)>,
    Option<PathBuf>,
) {
    const STOPPING: &str = "batond is stopping";
    if stopping.is_cancelled() {
        return (Err((GenState::Failed, STOPPING.into())), None);
    }
    if let Err(e) = std::fs::create_dir_all(dir) {
        return (
            Err((GenState::Failed, format!("{}: {e}", dir.display()))),
            None,
        );
    }
    let t0 = Instant::now();
    // A build is of no use once the daemon stops: it ends then, not
    // after the drain.
    if let Err(reason) = worker_proc::build(cfg, shim, dir, stopping).await {
        if stopping.is_cancelled() {
            return (Err((GenState::Failed, STOPPING.into())), None);
        }
        // What the failed build left, so that its own write of the
        // artifact in a watched folder does not start it again.
        let artifact = cfg.build.artifact.clone();
        let left = tokio::task::spawn_blocking(move || crate::digest::sha256_file(&artifact).ok())
            .await
            .ok()
            .flatten();
        let _ = itx.send(Internal::FailedBuildLeft(left));
        return (Err((GenState::Failed, reason)), None);
    }
    let build_ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
    // The build's time goes into the history even when its artifact then
    // turns out missing or unusable.
    let _ = itx.send(Internal::Progress {
        generation,
        state: GenState::Building,
        build_ms: Some(build_ms),
        signature: None,
    });
    // Within the build's own time limit: an artifact on a mount that hangs
    // would otherwise hold this deploy, and every one after it, for good.
    let copied = worker_proc::snapshot(&cfg.build.artifact, dir, cfg.build.timeout).await;
    let (snapshot, signature) = match copied {
        Ok(x) => x,
        Err(reason) => return (Err((GenState::Failed, reason)), None),
    };
    if stopping.is_cancelled() {
        return (Err((GenState::Failed, STOPPING.into())), None);
    }
    let _ = itx.send(Internal::Progress {
        generation,
        state: GenState::Starting,
        build_ms: Some(build_ms),
        signature: Some(signature.clone()),
    });
    let launch = Launch {
        generation,
        instance: 1,
        snapshot: snapshot.clone(),
        signature,
        dir: dir.to_path_buf(),
    };
    // A worker that did not prove itself is rejected; one batond could not
    // start at all (no port, no descriptors) failed: it says nothing of the
    // build.
    let result = worker_proc::start(cfg, shim, &launch, wtx, token)
        .await
        .map_err(|f| {
            let state = if f.ours {
                GenState::Failed
            } else {
                GenState::Rejected
            };
            (state, f.reason)
        });
    (result, Some(snapshot))
}

/// A fresh process being started beside or in place of the active one.
#[derive(Debug)]
struct FreshStart {
    /// Its number (`RestartDone::start`).
    id: u64,
    generation: u64,
    /// Its process's instance number, and when it was started (for the
    /// status).
    instance: u64,
    at: Instant,
    /// Stops it (its start's token).
    cancel: CancellationToken,
}

/// Folders of generations being removed are renamed to this prefix first.
const TRASH_PREFIX: &str = ".trash-gen-";

/// How a changed path was first seen (see [`Supervisor::deploy_due`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// Changed, removed, moved away or moved in.
    Changed,
    /// Made, or brought by a new folder.
    Appeared,
    /// A folder made or moved in.
    NewFolder,
}

/// The most file changes kept for one pending deploy (see
/// [`Supervisor::deploy_due`]); beyond, the deploy runs whatever they are.
const MAX_CHANGED: usize = 1000;

/// How long changes may keep coming without quiet before the log says the
/// deploy waits for it (when `watch.max_wait_ms` is not set).
const QUIET_HINT_AFTER: Duration = Duration::from_secs(10);

/// Removes generation `id`'s folder without holding up the runtime thread,
/// which also moves every request and call: the folder is renamed out of
/// the way at once (so it is gone from the state dir's listing), then
/// deleted on the blocking pool (a snapshot is tens of MB: freeing it takes
/// milliseconds, more on a busy disk). A daemon that stops before the
/// deletion ends removes the rest at its next start.
fn remove_gen_dir(state_dir: &std::path::Path, id: u64) {
    let dir = worker_proc::gen_dir(state_dir, id);
    let trash = state_dir.join(format!("{TRASH_PREFIX}{id:04}"));
    if let Err(e) = std::fs::rename(&dir, &trash) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove an old generation");
        }
        return;
    }
    // This one, and those an earlier removal could not finish (out of
    // descriptors, an I/O error): tried again now, not left until a
    // restart.
    let state_dir = state_dir.to_path_buf();
    drop(tokio::task::spawn_blocking(move || sweep_trash(&state_dir)));
}

/// Removes the folders of generations being removed (renamed to
/// [`TRASH_PREFIX`]); one that cannot be removed now is tried again at the
/// next removal. Blocking: run it on the blocking pool.
fn sweep_trash(state_dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(state_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(TRASH_PREFIX)
            && let Err(e) = std::fs::remove_dir_all(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %path.display(), error = %e, "cannot remove an old generation; tried again at the next removal");
        }
    }
}

/// Watches what `cfg` names, and the config file. Never the state folder,
/// where every deploy writes its logs (under a watched folder it would
/// start a build after each deploy), unless the config watches a path
/// inside it by name.
fn watch_sources(
    cfg: &Config,
    change_tx: mpsc::UnboundedSender<Change>,
) -> Result<watch::Watcher, watch::WatchError> {
    // Compared with every link resolved (see `config::resolved`).
    let state = &cfg.daemon.state_dir;
    let real_state = crate::config::resolved(state);
    let skip = if cfg
        .watch
        .paths
        .iter()
        .any(|p| crate::config::resolved(p).starts_with(&real_state))
    {
        Vec::new()
    } else {
        vec![state.clone()]
    };
    let w = watch::watch(
        &cfg.daemon.root,
        &cfg.watch.paths,
        &cfg.file,
        cfg.watch.ignore.clone(),
        &skip,
        change_tx,
    )?;
    tracing::info!(folders = w.folders(), "watching the sources");
    Ok(w)
}

/// The blocking part of a reload: reads and checks the file, keeps what
/// only moves at the next daemon start (and says so), watches the new
/// paths, and sets a changed `realtime_priority`.
fn prepare_reload(
    old: &Config,
    overrides: &Overrides,
    change_tx: mpsc::UnboundedSender<Change>,
) -> Prepared {
    let mut new = Config::load(&old.file, overrides).map_err(|e| e.to_string())?;
    // The listener, the control socket, the state dir and the runtime's
    // threads are in use: they change at the next daemon start, not in the
    // middle of a run.
    let mut kept = Vec::new();
    let mut keep =
        |key: &str, differs: bool, now: &dyn std::fmt::Display, asked: &dyn std::fmt::Display| {
            if differs {
                kept.push(format!(
                    "daemon.{key} stays {now} until batond restarts (the file says {asked})"
                ));
            }
        };
    let (o, n) = (&old.daemon, &new.daemon);
    // Paths compare by their components: `state` and `./state/` are one.
    // A socket from systemd is the one used, whatever the file says, now
    // and after a restart: `batond.socket` names the address (below).
    keep(
        "listen",
        !o.socket_activated && n.listen_asked != o.listen_asked,
        &o.listen,
        &n.listen_asked,
    );
    keep(
        "control_socket",
        n.control_socket != o.control_socket,
        &o.control_socket.display(),
        &n.control_socket.display(),
    );
    keep(
        "state_dir",
        n.state_dir != o.state_dir,
        &o.state_dir.display(),
        &n.state_dir.display(),
    );
    keep("threads", n.threads != o.threads, &o.threads, &n.threads);
    keep(
        "spread_threads",
        n.spread_threads != o.spread_threads,
        &o.spread_threads,
        &n.spread_threads,
    );
    if o.socket_activated && n.listen_asked != o.listen_asked {
        kept.push(format!(
            "daemon.listen ({}) is not used: the listening socket ({}) comes from systemd; change it in batond.socket",
            n.listen_asked, o.listen
        ));
    }
    for k in &kept {
        tracing::warn!("{k}");
    }
    new.daemon.listen = old.daemon.listen;
    new.daemon.listen_asked = old.daemon.listen_asked;
    new.daemon.socket_activated = old.daemon.socket_activated;
    new.daemon.control_socket = old.daemon.control_socket.clone();
    new.daemon.state_dir = old.daemon.state_dir.clone();
    new.daemon.threads = old.daemon.threads;
    new.daemon.spread_threads = old.daemon.spread_threads;
    let w = watch_sources(&new, change_tx).map_err(|e| e.to_string())?;
    if new.daemon.realtime_priority != old.daemon.realtime_priority {
        crate::sched::apply_to_process(new.daemon.realtime_priority);
    }
    Ok((new, w, kept))
}
