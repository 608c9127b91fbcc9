//! The control API's types, defined once and shared by the daemon (which
//! serialises them) and `batonctl` (which reads them).

use serde::{Deserialize, Serialize};

/// Where a generation is in its life:
/// `building -> starting -> (active | rejected) -> draining -> stopped`,
/// with `failed` for a build or start that did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GenState {
    /// The build command runs.
    Building,
    /// The worker runs and is being probed.
    Starting,
    /// The worker serves new traffic.
    Active,
    /// The worker ran but did not prove itself; traffic never moved.
    Rejected,
    /// No new traffic; open requests and calls finish.
    Draining,
    /// Done and stopped.
    Stopped,
    /// The build failed, or the worker could not be started.
    Failed,
}

impl GenState {
    /// The lowercase name, as in the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            GenState::Building => "building",
            GenState::Starting => "starting",
            GenState::Active => "active",
            GenState::Rejected => "rejected",
            GenState::Draining => "draining",
            GenState::Stopped => "stopped",
            GenState::Failed => "failed",
        }
    }
}

/// One generation, as the status shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenerationInfo {
    /// The generation number (1, 2, ...).
    pub id: u64,
    /// Where it is.
    pub state: GenState,
    /// Why it was rejected or failed, or why it stopped.
    pub reason: Option<String>,
    /// What started it (`startup`, `watch: src/main.rs`, `sighup`, `ctl`).
    pub trigger: String,
    /// The digest the worker must present (SHA-256 of the snapshot, hex).
    pub signature: Option<String>,
    /// The worker's pid while it runs.
    pub pid: Option<u32>,
    /// The worker's loopback port while it runs (`worker.socket = "tcp"`).
    pub port: Option<u16>,
    /// The worker's Unix socket while it runs (`worker.socket = "unix"`).
    #[serde(default)]
    pub socket: Option<String>,
    /// The generation's folder under the state dir.
    pub dir: String,
    /// When the generation was created (RFC 3339).
    pub created_at: String,
    /// Build duration.
    pub build_ms: Option<u64>,
    /// From worker start to a proven `/healthz`.
    pub health_ms: Option<u64>,
    /// When traffic moved to it (RFC 3339).
    pub cutover_at: Option<String>,
    /// When it stopped (RFC 3339).
    pub ended_at: Option<String>,
    /// Starts of this generation's snapshot after its first (a crash, a
    /// sick worker replaced, `batonctl restart`).
    pub restarts: u32,
    /// HTTP requests in flight on it now.
    pub requests_in_flight: u64,
    /// Upgraded (WebSocket) connections pinned to it now.
    pub connections: u64,
}

/// The daemon's whole state, `GET /v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// Daemon pid.
    pub pid: u32,
    /// Daemon version.
    pub version: String,
    /// `running`, `starting`, `restarting`, `failed` or `stopping`.
    pub state: String,
    /// The public address.
    pub listen: String,
    /// The config file in force.
    pub config_file: String,
    /// The last config reload that was refused, with its position.
    pub config_error: Option<String>,
    /// Seconds since the daemon started.
    pub uptime_s: u64,
    /// The generation that serves new traffic.
    pub active: Option<GenerationInfo>,
    /// The generation being built or proven.
    pub candidate: Option<GenerationInfo>,
    /// Old generations still finishing requests and calls.
    pub draining: Vec<GenerationInfo>,
    /// Finished generations, newest first (bounded).
    pub history: Vec<GenerationInfo>,
    /// A fresh process of the active generation proving itself beside
    /// the serving one (a health replacement or `batonctl restart`).
    #[serde(default)]
    pub replacing: Option<Replacement>,
    /// A change arrived during a deploy and will cause one more.
    pub deploy_pending: bool,
    /// Counts since the daemon started.
    #[serde(default)]
    pub totals: Totals,
}

/// A fresh process of the active generation's snapshot, started to
/// replace the serving one, which serves until it is proven.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replacement {
    /// The generation (the active one).
    pub generation: u64,
    /// The process's instance number within its generation (its
    /// `worker-N.sock`, its place in `worker.log`).
    pub instance: u64,
    /// Why: `health checks failed` or `batonctl restart`.
    pub reason: String,
    /// Seconds since it was started.
    pub since_s: u64,
}

/// What the daemon has done since it started (the history keeps the last
/// few generations only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Deploys that ended with their generation serving.
    pub deploys_active: u64,
    /// Deploys whose worker did not prove itself (`healthz`, signature,
    /// exit, start timeout).
    pub deploys_rejected: u64,
    /// Deploys whose build failed, whose worker could not be started, or
    /// that the daemon's stop cut short.
    pub deploys_failed: u64,
    /// Starts of a generation's snapshot again: after a crash, to replace
    /// a worker that failed its health checks, or asked for with
    /// `batonctl restart`.
    pub restarts: u64,
}

/// The answer to `POST /v1/deploy?wait=1` and `POST /v1/restart?wait=1`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeployOutcome {
    /// The generation the deploy made, if it got that far.
    pub generation: Option<u64>,
    /// `active`, `rejected`, `failed` or `queued`.
    pub outcome: String,
    /// Why it was rejected or failed.
    pub reason: Option<String>,
}

impl DeployOutcome {
    /// Whether the deploy ended with its generation serving.
    pub fn succeeded(&self) -> bool {
        self.outcome == "active" || self.outcome == "queued"
    }
}

/// One event of the daemon's life, streamed by `GET /v1/events` (NDJSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// When (RFC 3339, milliseconds).
    pub ts: String,
    /// What: `change`, `build_started`, `build_failed`,
    /// `candidate_started`, `rejected`, `cutover`, `draining`,
    /// `drain_timeout`, `stopped`, `worker_exited`, `restart_scheduled`,
    /// `restart`, `start_limit_hit`, `health_failed`, `health_retry`,
    /// `config_reloaded`, `config_rejected`, `stopping`.
    pub kind: String,
    /// The generation concerned.
    pub generation: Option<u64>,
    /// A human sentence.
    pub message: String,
}

/// The RFC 3339 form of a time, in UTC with milliseconds.
pub fn timestamp(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}
