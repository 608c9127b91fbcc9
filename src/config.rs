//! The daemon's configuration: the TOML file, parsed in two stages.
//!
//! Stage one is serde with `deny_unknown_fields`, so an unknown key or a wrong
//! type is an error. Stage two validates what serde cannot (addresses, globs,
//! header names, non-zero timeouts) and resolves every relative path against
//! `daemon.root`, which is itself relative to the folder of the config file.
//! Every error names the file, the line, the column and the key, because a
//! reload that fails must tell the operator exactly what to fix while the
//! running config stays in force.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// One problem found in a config file, with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// The file the problem is in.
    pub file: PathBuf,
    /// 1-based line, when the problem has a place in the file.
    pub line: Option<usize>,
    /// 1-based column, when the problem has a place in the file.
    pub column: Option<usize>,
    /// The dotted key, e.g. `daemon.listen`, when one is known.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        if let Some(key) = &self.key {
            write!(f, ": key `{key}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("{}: cannot read config: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file was read, and these problems were found in it.
    #[error("{}", issues.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid {
        /// Every problem found, in file order.
        issues: Vec<ConfigIssue>,
    },
}

// === raw (serde) layer ===

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    daemon: RawDaemon,
    #[serde(default)]
    watch: RawWatch,
    build: Option<RawBuild>,
    worker: Option<RawWorker>,
    #[serde(default)]
    restart: RawRestart,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    root: Option<String>,
    listen: Option<String>,
    control_socket: Option<String>,
    state_dir: Option<String>,
    hold_timeout_ms: Option<u64>,
    header_timeout_s: Option<u64>,
    idle_timeout_s: Option<u64>,
    history: Option<usize>,
    shutdown_timeout_s: Option<u64>,
    threads: Option<usize>,
    spread_threads: Option<bool>,
    realtime_priority: Option<u8>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawWatch {
    paths: Option<Vec<String>>,
    ignore: Option<Vec<String>>,
    debounce_ms: Option<u64>,
    max_wait_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBuild {
    command: Option<Vec<String>>,
    artifact: Option<String>,
    timeout_s: Option<u64>,
    nice: Option<u8>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorker {
    command: Option<Vec<String>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    health_path: Option<String>,
    signature_header: Option<String>,
    signature: Option<SignatureMode>,
    socket: Option<WorkerSocket>,
    start_timeout_s: Option<u64>,
    health_interval_ms: Option<u64>,
    health_failures: Option<u32>,
    drain_timeout_s: Option<u64>,
    stop_timeout_s: Option<u64>,
    keepalive_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRestart {
    backoff_initial_ms: Option<u64>,
    backoff_max_ms: Option<u64>,
    limit_burst: Option<u32>,
    limit_interval_s: Option<u64>,
}

// === validated layer ===

/// How a worker proves that it runs the build just made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SignatureMode {
    /// The worker hashes its own executable and presents that digest; a stale
    /// binary cannot present the new digest.
    Artifact,
    /// The supervisor passes the expected digest in `BATON_SIGNATURE` and the
    /// worker echoes it (for interpreted workers).
    Env,
}

/// The kind of listening socket `batond` binds for a worker and hands over
/// as fd 3, or (`port`) the port it reserves for a worker that binds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerSocket {
    /// A loopback TCP port, listening, as fd 3; `PORT` names it too (it is
    /// taken: a worker that binds its port itself needs `port`).
    Tcp,
    /// A Unix stream socket in the generation's folder, its path in
    /// `BATON_SOCKET`: cheaper per message than loopback TCP.
    Unix,
    /// Only a loopback port, in `PORT`, for a worker that binds it itself
    /// (it ignores `LISTEN_FDS`): `batond` keeps the port reserved (bound
    /// with `SO_REUSEADDR`, not listening) for the worker's whole life, so
    /// the kernel picks it for no other program; the worker must bind with
    /// `SO_REUSEADDR` too, as Node, Python's `socketserver`, Go and Rust do.
    Port,
}

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The config file this was read from (absolute), watched for reloads.
    pub file: PathBuf,
    /// `[daemon]`.
    pub daemon: DaemonConfig,
    /// `[watch]`.
    pub watch: WatchConfig,
    /// `[build]`.
    pub build: BuildConfig,
    /// `[worker]`.
    pub worker: WorkerConfig,
    /// `[restart]`.
    pub restart: RestartConfig,
}

/// `[daemon]`: where the daemon lives and listens.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Working folder of builds and workers; base of every relative path.
    pub root: PathBuf,
    /// The public listener, unless a socket is inherited from systemd;
    /// once bound, the address bound.
    pub listen: SocketAddr,
    /// `listen` as the file (or `--listen`) gives it, which a reload
    /// compares with the one the daemon started with.
    pub listen_asked: SocketAddr,
    /// The public socket came from systemd (`batond.socket`), not from
    /// `listen`; set by the daemon, never by the file.
    pub socket_activated: bool,
    /// The control socket path.
    pub control_socket: PathBuf,
    /// Where generations keep their snapshot and logs.
    pub state_dir: PathBuf,
    /// How long a request waits for a healthy worker before a 503.
    pub hold_timeout: Duration,
    /// A client connection that has no request in progress and sends no
    /// complete request head for this long is closed (slow or idle clients).
    pub header_timeout: Duration,
    /// A request in progress on which no byte moves either way for this
    /// long is ended (a hung worker gets the client a 504; a client that
    /// stopped reading loses its connection), and so is an upgraded
    /// connection one side of which has ended while the other sends
    /// nothing: neither holds a worker connection for ever.
    pub idle_timeout: Duration,
    /// How many finished generations the status keeps.
    pub history: usize,
    /// How long SIGTERM waits for requests and calls before stopping workers.
    pub shutdown_timeout: Duration,
    /// Front threads: 1 runs everything on the main thread's event loop;
    /// above 1, that many threads, each with an event loop of its own,
    /// serve the client connections (see [`crate::runtime`]). The default
    /// is one per CPU, up to two.
    pub threads: usize,
    /// Each front thread kept to CPUs of its own (with `threads` above 1
    /// and at least as many CPUs); the default. See [`crate::sched::spread`].
    pub spread_threads: bool,
    /// `SCHED_FIFO` priority of batond's threads; 0 (the default) is
    /// normal scheduling. See [`crate::sched`].
    pub realtime_priority: u8,
}

/// `[watch]`: what changes trigger a rebuild.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// Absolute paths watched recursively (plus the config file itself).
    pub paths: Vec<PathBuf>,
    /// The ignore globs as written, for the status.
    pub ignore_patterns: Vec<String>,
    /// Compiled ignore globs, matched against paths relative to `root` and
    /// against absolute paths.
    pub ignore: IgnoreSet,
    /// Quiet time after the last change before a build starts.
    pub debounce: Duration,
    /// Longest a change waits for that quiet, if set: a file written
    /// without pause (a log, an autosave) then no longer holds deploys
    /// back, at the price of building a tree that may be changing.
    pub max_wait: Option<Duration>,
}

/// `[build]`: how to make the artifact.
#[derive(Debug, Clone)]
pub struct BuildConfig {
    /// argv of the build; empty means "no build, snapshot the artifact as is".
    pub command: Vec<String>,
    /// The file the build produces (absolute).
    pub artifact: PathBuf,
    /// A build running longer is killed and the generation fails.
    pub timeout: Duration,
    /// Added to batond's own nice value for the build and all it starts
    /// (0-19, as `nice -n`): the workers serving calls meanwhile keep the
    /// CPU they need.
    pub nice: u8,
}

/// `[worker]`: how to run and prove a worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// argv; `{artifact}` is replaced by the generation's snapshot path.
    pub command: Vec<String>,
    /// Extra environment for the worker.
    pub env: BTreeMap<String, String>,
    /// Path probed for health.
    pub health_path: String,
    /// Response header carrying the signature.
    pub signature_header: http::HeaderName,
    /// How the signature is proven.
    pub signature: SignatureMode,
    /// The kind of socket the worker gets.
    pub socket: WorkerSocket,
    /// How long a candidate has to prove itself.
    pub start_timeout: Duration,
    /// Probe period for the active worker.
    pub health_interval: Duration,
    /// Consecutive failed probes before the active worker is replaced.
    pub health_failures: u32,
    /// How long a draining generation may keep its connections.
    pub drain_timeout: Duration,
    /// Grace between SIGTERM and SIGKILL.
    pub stop_timeout: Duration,
    /// How long a keep-alive connection to the worker may sit idle and
    /// still be used again.
    pub keepalive_timeout: Duration,
}

/// `[restart]`: crash restart policy, like systemd's `Restart=on-failure`.
#[derive(Debug, Clone)]
pub struct RestartConfig {
    /// First backoff delay.
    pub backoff_initial: Duration,
    /// Backoff ceiling.
    pub backoff_max: Duration,
    /// Starts allowed within `limit_interval`.
    pub limit_burst: u32,
    /// The start-limit window.
    pub limit_interval: Duration,
}

/// The `watch.ignore` globs, compiled.
#[derive(Debug, Clone, Default)]
pub struct IgnoreSet {
    globs: Vec<glob::Pattern>,
    /// For each glob of the form `P/**` (everything under P), the glob P:
    /// a folder it matches is not watched at all.
    dirs: Vec<glob::Pattern>,
}

const MATCH: glob::MatchOptions = glob::MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

impl IgnoreSet {
    /// Compiles `patterns`.
    ///
    /// # Errors
    /// Each pattern that is not a valid glob, with the reason.
    pub fn new<S: AsRef<str>>(
        patterns: &[S],
    ) -> Result<IgnoreSet, Vec<(String, glob::PatternError)>> {
        let mut set = IgnoreSet::default();
        let mut bad = Vec::new();
        for written in patterns {
            let written = written.as_ref();
            // `P/` (as in .gitignore): the folder P and all in it.
            let folder;
            let pat = match written.strip_suffix('/') {
                Some(p) if !p.is_empty() => {
                    folder = format!("{p}/**");
                    folder.as_str()
                }
                _ => written,
            };
            match glob::Pattern::new(pat) {
                Ok(g) => set.globs.push(g),
                Err(e) => bad.push((written.to_string(), e)),
            }
            if let Some(dir) = pat.strip_suffix("/**")
                && !dir.is_empty()
                && dir != "**"
                && let Ok(g) = glob::Pattern::new(dir)
            {
                set.dirs.push(g);
            }
        }
        if bad.is_empty() { Ok(set) } else { Err(bad) }
    }

    /// Whether `path` matches any glob (`*` stays within one path segment,
    /// `**` spans any number of them).
    /// A name that is not UTF-8 is matched as shown, its bad bytes as
    /// U+FFFD (glob's own path match says no to it, whatever the glob).
    pub fn is_match(&self, path: &Path) -> bool {
        let path = path.to_string_lossy();
        self.globs.iter().any(|g| g.matches_with(&path, MATCH))
    }

    /// Whether everything under the folder `dir` is ignored: a glob matches
    /// the folder itself, or is `P/**` with P matching it. Such a folder is
    /// not watched, nor is anything in it.
    pub fn prunes(&self, dir: &Path) -> bool {
        self.is_match(dir) || {
            let dir = dir.to_string_lossy();
            self.dirs.iter().any(|g| g.matches_with(&dir, MATCH))
        }
    }
}

/// Command-line overrides of file values.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Option<SocketAddr>,
    /// `--control-socket`.
    pub control_socket: Option<PathBuf>,
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
}

/// `daemon.state_dir` when the file does not set it (under `root`).
const DEFAULT_STATE_DIR: &str = "target/baton";

/// `build.nice` unless set: a build (a compiler on every core) yields the
/// CPU to the workers answering calls, whose audio is due every 20 ms.
pub const DEFAULT_BUILD_NICE: u8 = 10;
/// The highest nice value Linux has.
pub const MAX_NICE: u8 = 19;

/// The control socket's name in the state folder, when the file does not
/// set `daemon.control_socket`.
const CONTROL_SOCKET_NAME: &str = "control.sock";

/// The default ignore globs: build output, VCS data and editor temp files.
pub const DEFAULT_IGNORE: &[&str] = &[
    "**/target/**",
    "**/.git/**",
    // Vim's swap files: .swp, then .swo and .swn when one is taken (and
    // on down the alphabet, to .swf, a Flash file's name); .swx is its
    // write test.
    "**/*.sw[nop]",
    "**/*.swx",
    "**/*~",
    "**/.#*",
    "**/#*#",
    "**/4913",
    "**/*.tmp",
];

/// `p` with every link resolved, or as it is when it does not exist yet:
/// the state folder spelled through a link is still the state folder.
pub(crate) fn resolved(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The largest config file read: a config is a page of text, and a path
/// that leads to an endless source (`/dev/zero`) must not be read on.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Reads a config file, which must be a regular file (a link to one is
/// followed) of at most [`MAX_CONFIG_BYTES`]. It is opened without
/// waiting: a FIFO put in its place would otherwise hold the open, and
/// with it every later reload, until something wrote to it.
fn read_text(path: &Path) -> Result<String, ConfigError> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let read = |source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    };
    let refuse = |why: String| read(std::io::Error::new(std::io::ErrorKind::InvalidInput, why));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)
        .map_err(read)?;
    let meta = file.metadata().map_err(read)?;
    if !meta.is_file() {
        let what = if meta.is_dir() {
            "a folder"
        } else {
            "not a regular file (a FIFO, socket or device)"
        };
        return Err(refuse(format!("it is {what}")));
    }
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(refuse(format!(
            "it is larger than {} KiB",
            MAX_CONFIG_BYTES >> 10
        )));
    }
    String::from_utf8(bytes).map_err(|e| refuse(format!("it is not UTF-8 text: {e}")))
}

impl Config {
    /// What in a valid config is likely not what its author wants, one
    /// line each: logged at start and on each reload (and shown by
    /// `batonctl reload`).
    pub fn advice(&self) -> Vec<String> {
        let mut advice = Vec::new();
        if !self.worker.command.iter().any(|a| a.contains("{artifact}")) {
            advice.push(
                "worker.command does not name {artifact}: the worker runs what is in the tree when it starts, not the snapshot this generation proved, so a crash restart (or an `env`-mode proof, which only checks the echo) may run code that was never proven; run the snapshot, e.g. [\"python3\", \"{artifact}\"]"
                    .to_string(),
            );
        }
        advice
    }

    /// Reads, parses and validates a config file.
    ///
    /// # Errors
    /// [`ConfigError::Read`] when the file cannot be read,
    /// [`ConfigError::Invalid`] with every problem and its position otherwise.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Config, ConfigError> {
        let text = read_text(path)?;
        let abs = std::path::absolute(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&abs, &text, overrides)
    }

    /// The control socket a config file names, read without checking the
    /// rest of the file: `batonctl --config` must reach the daemon most of
    /// all while the file has a mistake elsewhere (the daemon keeps the
    /// config it runs, and its status shows the mistake).
    ///
    /// # Errors
    /// [`ConfigError::Read`] when the file cannot be read,
    /// [`ConfigError::Invalid`] when it is not TOML or `[daemon]`'s
    /// `root`, `state_dir` or `control_socket` is not a string.
    pub fn control_socket_of(path: &Path) -> Result<PathBuf, ConfigError> {
        #[derive(Deserialize, Default)]
        struct Loose {
            #[serde(default)]
            daemon: LooseDaemon,
        }
        #[derive(Deserialize, Default)]
        struct LooseDaemon {
            root: Option<String>,
            control_socket: Option<String>,
            state_dir: Option<String>,
        }
        let read = |source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        };
        let text = read_text(path)?;
        let file = std::path::absolute(path).map_err(read)?;
        // A syntax mistake in the file (a stray `=`, an unclosed string)
        // must not keep `batonctl` from the daemon, which still runs with
        // the config it had: the lines at fault are blanked (positions stay
        // where they were) and the rest read for the three keys.
        let loosen = |mut rest: String| -> Result<String, toml::de::Error> {
            while let Err(e) = rest.parse::<toml::Table>() {
                // Not lines that could hold the answer: a table header (its
                // keys would fall into another table) or one of the three
                // keys.
                let needed = |line: &str| {
                    let l = line.trim_start().trim_start_matches(['"', '\'']);
                    l.starts_with('[')
                        || ["daemon", "root", "state_dir", "control_socket"]
                            .iter()
                            .any(|k| l.starts_with(k))
                };
                let blanked = e.span().and_then(|span| {
                    let from = line_start(&rest, span.start);
                    let end = span.end.clamp(from, rest.len());
                    let to = rest[end..].find('\n').map_or(rest.len(), |i| end + i);
                    let lines = &rest[from..to];
                    (!lines.trim().is_empty() && !lines.lines().any(needed)).then_some(from..to)
                });
                match blanked {
                    Some(lines) => blank(&mut rest, lines),
                    None => return Err(e),
                }
            }
            Ok(rest)
        };
        let rest = match loosen(text.clone()) {
            Ok(rest) => rest,
            // A mistake that runs over lines (an unclosed array or string
            // swallows what follows) or breaks a table header: the
            // `[daemon]` table alone, the rest blanked.
            Err(e) => daemon_table_only(&text)
                .and_then(|daemon| loosen(daemon).ok())
                .ok_or_else(|| ConfigError::Invalid {
                    issues: vec![serde_issue(&file, &text, &e)],
                })?,
        };
        let loose: Loose = toml::from_str(&rest).map_err(|e| ConfigError::Invalid {
            issues: vec![serde_issue(&file, &rest, &e)],
        })?;
        let d = loose.daemon;
        // As `Validator::validate` resolves them.
        let root = file
            .parent()
            .unwrap_or(Path::new("/"))
            .join(d.root.as_deref().unwrap_or("."));
        let root = std::fs::canonicalize(&root).unwrap_or(root);
        Ok(match d.control_socket {
            Some(p) => root.join(p),
            None => root
                .join(d.state_dir.as_deref().unwrap_or(DEFAULT_STATE_DIR))
                .join(CONTROL_SOCKET_NAME),
        })
    }

    /// Parses and validates config text that came from `file`.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] with every problem and its position.
    pub fn parse(file: &Path, text: &str, overrides: &Overrides) -> Result<Config, ConfigError> {
        // serde stops at the first unknown key or wrong type: each one found
        // is noted and its `key = value` blanked out, and the text read
        // again, so one run names them all.
        // Blanking keeps every byte where it was, so positions are the
        // original text's.
        let mut issues = Vec::new();
        let mut blanked: Vec<String> = Vec::new();
        let mut rest = text.to_string();
        let raw = loop {
            match toml::from_str::<RawFile>(&rest) {
                Ok(raw) => break Some(raw),
                Err(e) => {
                    let issue = serde_issue(file, &rest, &e);
                    let again = issue.key.as_ref().is_some_and(|k| blanked.contains(k));
                    if !again {
                        issues.push(issue.clone());
                    }
                    if issues.len() >= MAX_FIRST_ISSUES {
                        issues.push(ConfigIssue {
                            file: file.to_path_buf(),
                            line: None,
                            column: None,
                            key: None,
                            message: format!(
                                "more unknown keys or wrong types than these {MAX_FIRST_ISSUES}; not listed"
                            ),
                        });
                        break None;
                    }
                    match e.span().and_then(|s| without_entry(&rest, s.start)) {
                        Some(next) if !again => {
                            blanked.extend(issue.key);
                            rest = next;
                        }
                        _ => break None,
                    }
                }
            }
        };
        let mut v = Validator {
            file,
            text,
            issues: Vec::new(),
        };
        let cfg = raw.and_then(|raw| v.validate(raw, overrides));
        // A key blanked out above is reported once, as what it was, and
        // checks that used its default in its place are not reported:
        // those of its table that name it, and the paths under a blanked
        // `root`.
        let table_of = |k: &str| k.rsplit_once('.').map_or("", |(t, _)| t).to_string();
        issues.extend(v.issues.into_iter().filter(|i| {
            let key = i.key.as_deref().unwrap_or("");
            !blanked.iter().any(|b| {
                let (table, leaf) = b.rsplit_once('.').unwrap_or(("", b));
                key == b
                    || key.starts_with(&format!("{b}."))
                    || (table_of(key) == table && mentions(&i.message, leaf))
                    || (b == "daemon.root" && i.message.contains("does not exist"))
            })
        }));
        match cfg {
            Some(cfg) if issues.is_empty() => Ok(cfg),
            _ => {
                // In file order (the checks run table by table), then the
                // problems with no place in the file (a missing table).
                issues.sort_by_key(|i| (i.line.is_none(), i.line, i.column));
                Err(ConfigError::Invalid { issues })
            }
        }
    }
}

/// Whether `message` names `word` as a whole (`max` in `backoff_max_ms`
/// is no mention of a key `max`).
fn mentions(message: &str, word: &str) -> bool {
    let part = |c: char| c.is_alphanumeric() || c == '_';
    message.match_indices(word).any(|(at, _)| {
        !message[..at].chars().next_back().is_some_and(part)
            && !message[at + word.len()..].chars().next().is_some_and(part)
    })
}

/// Unknown keys and wrong types listed at most, per file.
const MAX_FIRST_ISSUES: usize = 200;

/// `text` with the entry that holds `offset` blanked out wherever it is
/// written: a `key = value` (a dotted key from its first part, an inline
/// table's entry with its comma), or a table as a whole: each of its
/// headers and entries. None when there is none, for an array of tables
/// (whose headers have no place of their own), or when what is left would
/// not be TOML.
fn without_entry(text: &str, offset: usize) -> Option<String> {
    use toml::de::DeValue;
    type Entry<'a, 'b> = (
        &'b toml::Spanned<std::borrow::Cow<'a, str>>,
        &'b toml::Spanned<DeValue<'a>>,
    );
    /// The entry of `table`, at any depth, whose key or value holds
    /// `offset`: the innermost, or the table whose own key holds it.
    fn find<'a, 'b>(table: &'b toml::de::DeTable<'a>, offset: usize) -> Option<Entry<'a, 'b>> {
        for (k, v) in table {
            match v.get_ref() {
                DeValue::Table(t) => {
                    if let Some(e) = find(t, offset) {
                        return Some(e);
                    }
                    if k.span().contains(&offset) {
                        return Some((k, v));
                    }
                }
                _ => {
                    if k.span().contains(&offset) || v.span().contains(&offset) {
                        return Some((k, v));
                    }
                }
            }
        }
        None
    }
    /// Every place `(k, v)` is written.
    fn spans(
        text: &str,
        k: &toml::Spanned<std::borrow::Cow<'_, str>>,
        v: &toml::Spanned<DeValue<'_>>,
        out: &mut Vec<std::ops::Range<usize>>,
    ) -> Option<()> {
        match v.get_ref() {
            // An inline table goes whole, braces and all.
            DeValue::Table(_) if text[v.span()].starts_with('{') => {
                out.push(widen(text, k.span().start..v.span().end, false));
            }
            DeValue::Table(t) => {
                // Its own key: in a `[header]` or a dotted key's first part.
                out.push(widen(text, k.span().start..k.span().end, true));
                for (ck, cv) in t {
                    spans(text, ck, cv, out)?;
                }
            }
            // `[[key]]`: blanking its headers is not enough (each has its
            // keys below it) and the parser keeps no place for them.
            DeValue::Array(_) if in_array_header(text, k.span().start) => return None,
            _ => out.push(widen(text, k.span().start..v.span().end, false)),
        }
        Some(())
    }
    fn in_array_header(text: &str, at: usize) -> bool {
        text[line_start(text, at)..at]
            .trim_start()
            .starts_with("[[")
    }
    /// A range that also takes what belongs to it on its line: the start of
    /// a dotted key or a header's `[`, a header's closing `]`, and an inline
    /// table entry's comma.
    fn widen(text: &str, mut r: std::ops::Range<usize>, header: bool) -> std::ops::Range<usize> {
        let line_start = line_start(text, r.start);
        let keyish = |c: char| {
            c.is_alphanumeric() || matches!(c, ' ' | '\t' | '.' | '_' | '-' | '"' | '\'' | '[')
        };
        if text[line_start..r.start].chars().all(keyish) {
            r.start = line_start;
        }
        let after = &text[r.end..];
        let rest = after.trim_start_matches([' ', '\t']);
        if header {
            // `.a]` of `[bogus.a]`: up to the end of the header.
            if let Some(close) = after.find(']')
                && !after[..close].contains(['\n', '='])
            {
                r.end += close + after[close..].chars().take_while(|c| *c == ']').count();
            }
        } else if rest.starts_with(',') {
            r.end = text.len() - rest.len() + 1;
        } else {
            // The last entry of an inline table: the comma before it.
            let before = text[..r.start].trim_end_matches([' ', '\t', '\n', '\r']);
            if before.ends_with(',') {
                r.start = before.len() - 1;
            }
        }
        r
    }
    let doc = toml::de::DeTable::parse(text).ok()?;
    let (k, v) = find(doc.get_ref(), offset)?;
    let mut ranges = Vec::new();
    spans(text, k, v, &mut ranges)?;
    let mut out = text.to_string();
    for r in ranges {
        blank(&mut out, r);
    }
    toml::de::DeTable::parse(&out).ok()?;
    Some(out)
}

/// Turns `range` of `text` into spaces, byte for byte (line breaks kept),
/// so every other position stays where it was.
fn blank(text: &mut String, range: std::ops::Range<usize>) {
    let spaces: String = text[range.clone()]
        .chars()
        .flat_map(|c| {
            let (c, n) = if c == '\n' || c == '\r' {
                (c, 1)
            } else {
                (' ', c.len_utf8())
            };
            std::iter::repeat_n(c, n)
        })
        .collect();
    text.replace_range(range, &spaces);
}

/// `text` with every line in a table other than `[daemon]` blanked (from
/// the header of each to the next line that starts a table), positions
/// kept; the top-level lines stay (they may hold `daemon.` keys). `None`
/// when no daemon table is found (the defaults would be a guess: the
/// mistake may be where it was) or a broken header could be its own.
fn daemon_table_only(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut inside = true;
    let mut found = false;
    for line in text.split_inclusive('\n') {
        let l = line.trim_start();
        if let Some(h) = l.strip_prefix('[') {
            match h.split_once(']') {
                // `[daemon]`, `[ "daemon" ]`, `['daemon']`
                Some((name, _)) => {
                    inside = name.trim().trim_matches(['"', '\'']) == "daemon";
                    found |= inside;
                }
                None if h.contains("daemon") => return None,
                None => inside = false,
            }
        } else if inside && !found && names_daemon(l) {
            // A top-level `daemon.key = ...`, `"daemon".key = ...` or
            // `daemon = { ... }`.
            found = true;
        }
        if inside {
            out.push_str(line);
        } else {
            let mut blanked = line.to_string();
            blank(&mut blanked, 0..line.len());
            out.push_str(&blanked);
        }
    }
    found.then_some(out)
}

/// Whether a `key = value` line's key is `daemon` or starts with
/// `daemon.` (bare or quoted), not merely a word that starts so
/// (`daemonize = true`).
fn names_daemon(line: &str) -> bool {
    let key = line
        .strip_prefix('"')
        .and_then(|l| l.strip_prefix("daemon\""))
        .or_else(|| {
            line.strip_prefix('\'')
                .and_then(|l| l.strip_prefix("daemon'"))
        })
        .or_else(|| line.strip_prefix("daemon"));
    key.is_some_and(|rest| {
        let rest = rest.trim_start();
        rest.starts_with('.') || rest.starts_with('=')
    })
}

/// Where the line that holds byte `at` begins.
fn line_start(text: &str, at: usize) -> usize {
    text[..at.min(text.len())].rfind('\n').map_or(0, |i| i + 1)
}

/// Turns a toml/serde error into an issue with line, column and key.
fn serde_issue(file: &Path, text: &str, e: &toml::de::Error) -> ConfigIssue {
    let (line, column, key) = match e.span() {
        Some(span) => {
            let (line, column) = line_col(text, span.start);
            (Some(line), Some(column), key_at(text, span.start))
        }
        None => (None, None, None),
    };
    ConfigIssue {
        file: file.to_path_buf(),
        line,
        column,
        key,
        message: e.message().trim().to_string(),
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// The dotted key at `offset` as the file's own structure has it: the key
/// whose name or value holds it, with every table above it, however the
/// file spells them (`[table]` headers, dotted keys, inline tables). `None`
/// when the text does not parse as TOML or nothing there holds `offset`.
fn key_path_at(text: &str, offset: usize) -> Option<String> {
    fn walk(table: &toml::de::DeTable<'_>, offset: usize, path: &mut Vec<String>) -> bool {
        for (k, v) in table {
            path.push(k.get_ref().to_string());
            if k.span().contains(&offset) {
                return true;
            }
            let found = match v.get_ref() {
                toml::de::DeValue::Table(t) => walk(t, offset, path) || v.span().contains(&offset),
                _ => v.span().contains(&offset),
            };
            if found {
                return true;
            }
            path.pop();
        }
        false
    }
    let doc = toml::de::DeTable::parse(text).ok()?;
    let mut path = Vec::new();
    walk(doc.get_ref(), offset, &mut path).then(|| path.join("."))
}

/// The dotted key whose line holds `offset`: [`key_path_at`], or for text
/// that is not TOML, the nearest `[table]` header above plus the bare key
/// before `=` on that line (if any).
pub(crate) fn key_at(text: &str, offset: usize) -> Option<String> {
    if let Some(path) = key_path_at(text, offset) {
        return Some(path);
    }
    let start = line_start(text, offset);
    let line = text[start..].lines().next().unwrap_or("");
    let table = text[..start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && !l.starts_with("[["))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    let trimmed = line.trim();
    if trimmed.starts_with('[') {
        return Some(
            trimmed
                .trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_string(),
        );
    }
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"').to_string());
    match (table, key) {
        (Some(t), Some(k)) => Some(format!("{t}.{k}")),
        (None, Some(k)) => Some(k),
        (Some(t), None) => Some(t),
        (None, None) => None,
    }
}

/// Finds the position of `key` inside `table` (a dotted path, `""` for the
/// top level) for validation errors, however the file spells it: a
/// `[table]` header, a dotted key (`restart.limit_burst = 0`) or an inline
/// table. A key the file does not set is placed at its table's name; a
/// table the file does not have has no position.
fn locate(text: &str, table: &str, key: &str) -> (Option<usize>, Option<usize>) {
    let Ok(doc) = toml::de::DeTable::parse(text) else {
        return (None, None);
    };
    let mut at: Option<usize> = None;
    let mut current = doc.get_ref();
    for name in table.split('.').filter(|n| !n.is_empty()) {
        let Some((k, v)) = current.iter().find(|(k, _)| k.get_ref().as_ref() == name) else {
            return (None, None);
        };
        at = Some(k.span().start);
        match v.get_ref() {
            toml::de::DeValue::Table(t) => current = t,
            _ => return (None, None),
        }
    }
    if !key.is_empty()
        && let Some((k, _)) = current.iter().find(|(k, _)| k.get_ref().as_ref() == key)
    {
        at = Some(k.span().start);
    }
    match at {
        Some(offset) => {
            let (line, column) = line_col(text, offset);
            (Some(line), Some(column))
        }
        None => (None, None),
    }
}

struct Validator<'a> {
    file: &'a Path,
    text: &'a str,
    issues: Vec<ConfigIssue>,
}

impl Validator<'_> {
    fn issue(&mut self, table: &str, key: &str, message: impl Into<String>) {
        let (line, column) = locate(self.text, table, key);
        let dotted = if key.is_empty() {
            table.to_string()
        } else {
            format!("{table}.{key}")
        };
        self.issues.push(ConfigIssue {
            file: self.file.to_path_buf(),
            line,
            column,
            key: Some(dotted),
            message: message.into(),
        });
    }

    /// A key the file must set: missing is an issue placed at its table.
    fn required<T>(&mut self, table: &str, key: &str, v: Option<T>, what: &str) -> Option<T> {
        if v.is_none() {
            self.issue(table, key, format!("missing: `{key}` is required ({what})"));
        }
        v
    }

    fn positive(&mut self, table: &str, key: &str, v: Option<u64>, default: u64) -> u64 {
        let v = v.unwrap_or(default);
        if v == 0 {
            self.issue(table, key, "must be greater than 0");
        }
        self.at_most_a_year(table, key, v)
    }

    /// A duration in the unit its key ends in (`_ms` or `_s`), at most a
    /// year: past that it means "never", and a far larger one would not
    /// fit in the clock's arithmetic.
    fn at_most_a_year(&mut self, table: &str, key: &str, v: u64) -> u64 {
        const YEAR_S: u64 = 365 * 24 * 3600;
        let max = if key.ends_with("_ms") {
            YEAR_S * 1000
        } else {
            YEAR_S
        };
        if v > max {
            self.issue(table, key, format!("must be at most {max} (a year)"));
            return max;
        }
        v
    }

    fn validate(&mut self, raw: RawFile, ov: &Overrides) -> Option<Config> {
        let config_dir = self.file.parent().unwrap_or(Path::new("/")).to_path_buf();
        let root = config_dir.join(raw.daemon.root.as_deref().unwrap_or("."));
        let root = match std::fs::canonicalize(&root) {
            Ok(r) if !r.is_dir() => {
                self.issue("daemon", "root", format!("{} is not a folder", r.display()));
                r
            }
            Ok(r) => r,
            Err(e) => {
                self.issue("daemon", "root", format!("{}: {e}", root.display()));
                root
            }
        };
        let at_root = |p: &str| root.join(p);

        let listen = match ov.listen {
            Some(a) => a,
            None => {
                let s = raw.daemon.listen.as_deref().unwrap_or("127.0.0.1:8080");
                match s.parse::<SocketAddr>() {
                    Ok(a) => a,
                    Err(e) => {
                        self.issue(
                            "daemon",
                            "listen",
                            format!(
                                "`{s}` is not an IP address and port such as 127.0.0.1:8080 or [::1]:8080 (names like localhost are not looked up): {e}"
                            ),
                        );
                        SocketAddr::from(([127, 0, 0, 1], 8080))
                    }
                }
            }
        };
        let state_dir = ov.state_dir.clone().map_or_else(
            || at_root(raw.daemon.state_dir.as_deref().unwrap_or(DEFAULT_STATE_DIR)),
            |p| std::path::absolute(&p).unwrap_or(p),
        );
        let control_socket = ov.control_socket.clone().map_or_else(
            || match &raw.daemon.control_socket {
                Some(p) => at_root(p),
                None => state_dir.join(CONTROL_SOCKET_NAME),
            },
            |p| std::path::absolute(&p).unwrap_or(p),
        );
        if control_socket.is_dir()
            || control_socket
                .as_os_str()
                .as_encoded_bytes()
                .ends_with(b"/")
        {
            self.issue(
                "daemon",
                "control_socket",
                format!(
                    "{} is a folder; name the socket file in it",
                    control_socket.display()
                ),
            );
        }
        let hold = self.positive(
            "daemon",
            "hold_timeout_ms",
            raw.daemon.hold_timeout_ms,
            5000,
        );
        let header = self.positive(
            "daemon",
            "header_timeout_s",
            raw.daemon.header_timeout_s,
            30,
        );
        let idle = self.positive("daemon", "idle_timeout_s", raw.daemon.idle_timeout_s, 60);
        let shutdown = raw.daemon.shutdown_timeout_s.unwrap_or(30);
        let shutdown = self.at_most_a_year("daemon", "shutdown_timeout_s", shutdown);
        // One per CPU, up to two: with a second, the proxy's work runs on
        // both CPUs (see README, Benchmark); more would mostly cost memory
        // (an allocator arena each).
        let threads = raw
            .daemon
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(2)));
        if threads == 0 || threads > 64 {
            self.issue("daemon", "threads", "must be between 1 and 64");
        }
        let realtime_priority = raw.daemon.realtime_priority.unwrap_or(0);
        if realtime_priority > crate::sched::MAX_PRIORITY {
            self.issue(
                "daemon",
                "realtime_priority",
                "must be between 0 (normal scheduling) and 99",
            );
        }
        let daemon = DaemonConfig {
            root: root.clone(),
            listen,
            listen_asked: listen,
            socket_activated: false,
            control_socket,
            state_dir,
            hold_timeout: Duration::from_millis(hold),
            header_timeout: Duration::from_secs(header),
            idle_timeout: Duration::from_secs(idle),
            history: raw.daemon.history.unwrap_or(20).max(1),
            shutdown_timeout: Duration::from_secs(shutdown),
            threads: threads.clamp(1, 64),
            spread_threads: raw.daemon.spread_threads.unwrap_or(true),
            realtime_priority: realtime_priority.min(crate::sched::MAX_PRIORITY),
        };

        let ignore_patterns: Vec<String> = raw
            .watch
            .ignore
            .unwrap_or_else(|| DEFAULT_IGNORE.iter().map(|s| s.to_string()).collect());
        let ignore = match IgnoreSet::new(&ignore_patterns) {
            Ok(set) => set,
            Err(bad) => {
                for (pat, e) in bad {
                    self.issue("watch", "ignore", format!("bad glob `{pat}`: {e}"));
                }
                IgnoreSet::default()
            }
        };
        let paths = raw
            .watch
            .paths
            .unwrap_or_default()
            .iter()
            .map(|p| at_root(p))
            .collect::<Vec<_>>();
        let real_state = resolved(&daemon.state_dir);
        for p in &paths {
            if !p.exists() {
                self.issue("watch", "paths", format!("{} does not exist", p.display()));
            } else if resolved(p) == real_state {
                self.issue(
                    "watch",
                    "paths",
                    format!(
                        "{} is daemon.state_dir, where every deploy writes: watching it would deploy again after each deploy",
                        p.display()
                    ),
                );
            }
        }
        let debounce = raw.watch.debounce_ms.unwrap_or(200);
        let debounce = self.at_most_a_year("watch", "debounce_ms", debounce);
        // 0 (the default) is off: wait for quiet however long it takes.
        let max_wait = raw.watch.max_wait_ms.unwrap_or(0);
        let max_wait = self.at_most_a_year("watch", "max_wait_ms", max_wait);
        if max_wait != 0 && max_wait < debounce {
            self.issue(
                "watch",
                "max_wait_ms",
                format!("must be 0 (off) or at least debounce_ms ({debounce})"),
            );
        }
        let watch = WatchConfig {
            paths,
            ignore_patterns,
            ignore,
            debounce: Duration::from_millis(debounce),
            max_wait: (max_wait != 0).then(|| Duration::from_millis(max_wait.max(debounce))),
        };

        let build = match raw.build {
            Some(b) => {
                let timeout = self.positive("build", "timeout_s", b.timeout_s, 600);
                let command = self.required("build", "command", b.command, "an argv list");
                // `[]` is no build step: the artifact is the source itself.
                if command
                    .as_ref()
                    .is_some_and(|c| c.first().is_some_and(String::is_empty))
                {
                    self.issue(
                        "build",
                        "command",
                        "must name a program (or be [] for none)",
                    );
                }
                let artifact = self.required("build", "artifact", b.artifact, "a path");
                let nice = b.nice.unwrap_or(DEFAULT_BUILD_NICE);
                if nice > MAX_NICE {
                    self.issue(
                        "build",
                        "nice",
                        format!(
                            "must be 0-{MAX_NICE} (added to batond's own nice value, as `nice -n`)"
                        ),
                    );
                }
                BuildConfig {
                    command: command.unwrap_or_default(),
                    artifact: at_root(artifact.as_deref().unwrap_or_default()),
                    timeout: Duration::from_secs(timeout),
                    nice: nice.min(MAX_NICE),
                }
            }
            None => {
                self.issue(
                    "build",
                    "",
                    "the [build] table is required (command, artifact)",
                );
                return None;
            }
        };

        let Some(w) = raw.worker else {
            self.issue("worker", "", "the [worker] table is required (command)");
            return None;
        };
        let command = self.required("worker", "command", w.command, "an argv list");
        if command
            .as_ref()
            .is_some_and(|c| c.first().is_none_or(String::is_empty))
        {
            self.issue("worker", "command", "must name a program");
        }
        let command = command.unwrap_or_default();
        let health_path = w.health_path.unwrap_or_else(|| "/healthz".into());
        if !health_path.starts_with('/') {
            self.issue("worker", "health_path", "must start with `/`");
        } else if let Err(e) = health_path.parse::<http::uri::PathAndQuery>() {
            self.issue(
                "worker",
                "health_path",
                format!(
                    "`{health_path}` is not a URL path (spaces and the like must be %-encoded): {e}"
                ),
            );
        }
        let header = w
            .signature_header
            .unwrap_or_else(|| "X-App-Signature".into());
        let signature_header = match http::HeaderName::from_bytes(header.as_bytes()) {
            Ok(h) => h,
            Err(_) => {
                self.issue(
                    "worker",
                    "signature_header",
                    format!("`{header}` is not a valid header name"),
                );
                http::HeaderName::from_static("x-app-signature")
            }
        };
        let start = self.positive("worker", "start_timeout_s", w.start_timeout_s, 30);
        let interval = self.positive("worker", "health_interval_ms", w.health_interval_ms, 1000);
        let failures = w.health_failures.unwrap_or(3);
        if failures == 0 {
            self.issue("worker", "health_failures", "must be greater than 0");
        }
        let drain = w.drain_timeout_s.unwrap_or(300);
        let drain = self.at_most_a_year("worker", "drain_timeout_s", drain);
        let stop = self.positive("worker", "stop_timeout_s", w.stop_timeout_s, 10);
        let keepalive = self.positive(
            "worker",
            "keepalive_timeout_ms",
            w.keepalive_timeout_ms,
            1000,
        );
        let socket = w.socket.unwrap_or(WorkerSocket::Tcp);
        if socket == WorkerSocket::Unix && command.iter().any(|a| a.contains("{port}")) {
            self.issue(
                "worker",
                "command",
                "uses {port}, but worker.socket = \"unix\" gives the worker no port",
            );
        }
        for k in w.env.keys() {
            if k.is_empty() || k.contains(['=', '\0']) {
                self.issue(
                    "worker",
                    "env",
                    format!("{k:?} is not a variable name (empty, or with `=` or NUL in it)"),
                );
            } else if crate::process::PRIVATE_ENV.contains(&k.as_str()) {
                // The shim drops these, given or inherited: they are the
                // socket handover's and systemd's, never a worker's own.
                self.issue(
                    "worker",
                    "env",
                    format!("{k} is batond's to set or withhold (socket handover, systemd); it cannot be given here"),
                );
            } else {
                // What batond sets for this worker would win over it.
                let set = match k.as_str() {
                    "BATON_GENERATION" => true,
                    "PORT" => socket != WorkerSocket::Unix,
                    "BATON_SOCKET" => socket == WorkerSocket::Unix,
                    "BATON_SIGNATURE" => w.signature == Some(SignatureMode::Env),
                    _ => false,
                };
                if set {
                    self.issue(
                        "worker",
                        "env",
                        format!("{k} is set by batond for each worker; it cannot be given here"),
                    );
                }
            }
        }
        for (k, v) in &w.env {
            if v.contains('\0') {
                self.issue("worker", "env", format!("the value of {k} has a NUL in it"));
            }
        }
        let worker = WorkerConfig {
            command,
            env: w.env,
            health_path,
            signature_header,
            signature: w.signature.unwrap_or(SignatureMode::Artifact),
            socket,
            start_timeout: Duration::from_secs(start),
            health_interval: Duration::from_millis(interval),
            health_failures: failures,
            drain_timeout: Duration::from_secs(drain),
            stop_timeout: Duration::from_secs(stop),
            keepalive_timeout: Duration::from_millis(keepalive),
        };

        let r = raw.restart;
        let initial = self.positive("restart", "backoff_initial_ms", r.backoff_initial_ms, 100);
        let max = r.backoff_max_ms.unwrap_or(10_000);
        let max = self.at_most_a_year("restart", "backoff_max_ms", max);
        if max < initial {
            match r.backoff_max_ms {
                Some(_) => self.issue(
                    "restart",
                    "backoff_max_ms",
                    "must be at least backoff_initial_ms",
                ),
                None => self.issue(
                    "restart",
                    "backoff_initial_ms",
                    format!("must be at most backoff_max_ms ({max}, the default)"),
                ),
            }
        }
        let burst = r.limit_burst.unwrap_or(5);
        if burst == 0 {
            self.issue("restart", "limit_burst", "must be greater than 0");
        }
        let interval = self.positive("restart", "limit_interval_s", r.limit_interval_s, 60);
        let restart = RestartConfig {
            backoff_initial: Duration::from_millis(initial),
            backoff_max: Duration::from_millis(max),
            limit_burst: burst,
            limit_interval: Duration::from_secs(interval),
        };

        Some(Config {
            file: self.file.to_path_buf(),
            daemon,
            watch,
            build,
            worker,
            restart,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let dir = std::env::temp_dir();
        Config::parse(&dir.join("baton.toml"), text, &Overrides::default())
    }

    const MINIMAL: &str =
        "[build]\ncommand = [\"true\"]\nartifact = \"a\"\n[worker]\ncommand = [\"{artifact}\"]\n";

    #[test]
    fn a_worker_command_without_the_snapshot_gets_advice() {
        assert!(parse(MINIMAL).expect("valid").advice().is_empty());
        let cfg = parse(
            "[build]\ncommand = []\nartifact = \"app.py\"\n[worker]\ncommand = [\"python3\", \"app.py\"]\nsignature = \"env\"\n",
        )
        .expect("valid");
        let advice = cfg.advice();
        assert_eq!(advice.len(), 1, "{advice:?}");
        assert!(advice[0].contains("does not name {artifact}"), "{advice:?}");
    }

    #[test]
    fn build_nice_is_ten_unless_set_and_at_most_nineteen() {
        assert_eq!(parse(MINIMAL).expect("valid").build.nice, 10);
        let set = MINIMAL.replace("artifact = \"a\"\n", "artifact = \"a\"\nnice = 0\n");
        assert_eq!(parse(&set).expect("valid").build.nice, 0);
        let i =
            single_issue(&MINIMAL.replace("artifact = \"a\"\n", "artifact = \"a\"\nnice = 20\n"));
        assert_eq!(i.line, Some(4));
        assert_eq!(i.key.as_deref(), Some("build.nice"));
        assert!(i.message.contains("must be 0-19"), "{}", i.message);
        // A negative one (a higher priority) is not a nice value it takes.
        let i =
            single_issue(&MINIMAL.replace("artifact = \"a\"\n", "artifact = \"a\"\nnice = -5\n"));
        assert_eq!(i.key.as_deref(), Some("build.nice"));
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let cfg = parse(MINIMAL).expect("valid");
        assert_eq!(cfg.daemon.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(cfg.worker.health_path, "/healthz");
        assert_eq!(cfg.worker.signature, SignatureMode::Artifact);
        assert_eq!(cfg.worker.signature_header.as_str(), "x-app-signature");
    }

    fn single_issue(text: &str) -> ConfigIssue {
        match parse(text) {
            Err(ConfigError::Invalid { issues }) => issues[0].clone(),
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn unknown_key_names_line_column_and_key() {
        let text = format!("{MINIMAL}[daemon]\nlisten = \"127.0.0.1:1\"\nlisten_port = 3\n");
        let i = single_issue(&text);
        assert_eq!(i.line, Some(8));
        assert_eq!(i.column, Some(1));
        assert_eq!(i.key.as_deref(), Some("daemon.listen_port"));
        assert!(i.message.contains("unknown field"), "{}", i.message);
    }

    #[test]
    fn every_problem_is_listed_in_file_order() {
        let text = format!(
            "{MINIMAL}[daemon]\nheader_timeout_s = 0\nhold_timeout_ms = 0\nthreads = 0\nidle_timeout_s = 0\n"
        );
        let Err(ConfigError::Invalid { issues }) = parse(&text) else {
            panic!("expected invalid");
        };
        let found: Vec<_> = issues
            .iter()
            .map(|i| (i.line, i.key.as_deref().unwrap_or("")))
            .collect();
        assert_eq!(
            found,
            [
                (Some(7), "daemon.header_timeout_s"),
                (Some(8), "daemon.hold_timeout_ms"),
                (Some(9), "daemon.threads"),
                (Some(10), "daemon.idle_timeout_s"),
            ]
        );
    }

    #[test]
    fn every_unknown_key_and_wrong_type_is_listed_with_the_range_errors() {
        let found = |text: &str| -> Vec<(Option<usize>, String)> {
            let Err(ConfigError::Invalid { issues }) = parse(text) else {
                panic!("expected invalid: {text}");
            };
            issues
                .iter()
                .map(|i| (i.line, i.key.clone().unwrap_or_default()))
                .collect()
        };
        let key = |l: usize, k: &str| (Some(l), k.to_string());
        // Two unknown keys, a wrong type, a dotted key of the wrong type, a
        // wrong type inside an inline table, and a range error.
        let text = format!(
            "{MINIMAL}[daemon]\nbogus1 = 1\nbogus2 = \"x\"\nhold_timeout_ms = \"soon\"\nthreads = 0\nrestart.limit_burst = \"many\"\n"
        );
        assert_eq!(
            found(&text),
            [
                key(7, "daemon.bogus1"),
                key(8, "daemon.bogus2"),
                key(9, "daemon.hold_timeout_ms"),
                key(10, "daemon.threads"),
                key(11, "daemon.restart"),
            ]
        );
        let text = "[build]\ncommand = [\"true\"]\nartifact = 3\n[worker]\ncommand = [\"{artifact}\"]\nenv = { A = \"1\", B = 2 }\n[bogus]\nx = 1\n[restart]\nlimit_burst = -1\n";
        assert_eq!(
            found(text),
            [
                key(3, "build.artifact"),
                key(6, "worker.env.B"),
                key(7, "bogus"),
                key(10, "restart.limit_burst"),
            ]
        );
        // An unknown table in two parts takes none of the tables between
        // them; an inline table's first entry goes with its comma; a check
        // that would use a blanked key's default is not reported.
        let text = "[bogus.a]\nx = 1\n[build]\ncommand = [\"true\"]\nartifact = \"a\"\n[worker]\ncommand = [\"{artifact}\"]\nenv = { B = 2, A = \"1\" }\nstop_timeout_s = \"x\"\n[bogus.b]\ny = 1\n[restart]\nbackoff_initial_ms = 20000\nbackoff_max_ms = \"30s\"\n[daemon]\nthreads = 0\n";
        assert_eq!(
            found(text),
            [
                key(1, "bogus"),
                key(8, "worker.env.B"),
                key(9, "worker.stop_timeout_s"),
                key(14, "restart.backoff_max_ms"),
                key(16, "daemon.threads"),
            ]
        );
        // An unknown array of tables ends the listing (its keys have no
        // table of their own to be blanked with), rather than have its keys
        // read as keys of the table above.
        let text = format!("{MINIMAL}[[hooks]]\na = 1\n[daemon]\nthreads = 0\n");
        assert_eq!(found(&text), [key(6, "hooks")]);
        // A blanked key with a short name hides no check that merely
        // contains its letters, nor one of another table that names a key
        // of the same name; an unknown key set to an inline table goes
        // whole.
        let text = format!("{MINIMAL}[daemon]\na = 1\nthreads = 0\n");
        assert_eq!(found(&text), [key(7, "daemon.a"), key(8, "daemon.threads")]);
        let text = "[build]\nartifact = \"a\"\n[worker]\ncommand = \"./app\"\nbogus = { a = 1 }\n[daemon]\nthreads = 0\n";
        assert_eq!(
            found(text),
            [
                key(1, "build.command"),
                key(4, "worker.command"),
                key(5, "worker.bogus"),
                key(7, "daemon.threads"),
            ]
        );
        // Past the limit, a note says there are more.
        let many: String = (0..250).map(|i| format!("k{i} = 1\n")).collect();
        let Err(ConfigError::Invalid { issues }) = parse(&format!("{MINIMAL}[daemon]\n{many}"))
        else {
            panic!("expected invalid");
        };
        assert_eq!(issues.len(), MAX_FIRST_ISSUES + 1);
        assert!(issues[MAX_FIRST_ISSUES].message.contains("not listed"));
        // A key of the wrong type that must be there is named once, as
        // what it was, not again as missing.
        let text =
            "[build]\ncommand = \"make\"\nartifact = \"a\"\n[worker]\ncommand = [\"{artifact}\"]\n";
        assert_eq!(found(text), [key(2, "build.command")]);
    }

    #[test]
    fn wrong_type_names_key() {
        let text = format!("{MINIMAL}[daemon]\nhold_timeout_ms = \"soon\"\n");
        let i = single_issue(&text);
        assert_eq!(i.line, Some(7));
        assert_eq!(i.key.as_deref(), Some("daemon.hold_timeout_ms"));
        let shown = i.to_string();
        assert!(shown.contains("baton.toml:7:"), "{shown}");
    }

    #[test]
    fn the_control_socket_is_found_in_a_file_with_mistakes_elsewhere() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("etc")).expect("etc");
        let file = dir.path().join("etc/baton.toml");
        for daemon in [
            "",
            "[daemon]\nroot = \"..\"\nstate_dir = \"st\"\n",
            "[daemon]\nroot = \"..\"\ncontrol_socket = \"run/c.sock\"\n",
        ] {
            std::fs::write(&file, format!("{daemon}{MINIMAL}")).expect("write");
            let full = Config::load(&file, &Overrides::default()).expect("valid");
            let found = Config::control_socket_of(&file).expect("socket");
            assert_eq!(found, full.daemon.control_socket, "{daemon}");
            // A mistake in another key, or an unknown one: still found.
            let broken = format!("{daemon}{MINIMAL}stop_timeout_s = \"2\"\nbogus = 1\n");
            std::fs::write(&file, broken).expect("write");
            assert!(Config::load(&file, &Overrides::default()).is_err());
            assert_eq!(Config::control_socket_of(&file).expect("socket"), found);
            // Syntax mistakes too: a stray `=`, a string left open, each
            // after the `[daemon]` keys.
            for mistake in ["debounce_ms = = 200\n", "note = \"unclosed\n"] {
                let broken = format!("{daemon}{MINIMAL}{mistake}");
                std::fs::write(&file, &broken).expect("write");
                assert!(Config::load(&file, &Overrides::default()).is_err());
                assert_eq!(
                    Config::control_socket_of(&file).expect("socket"),
                    found,
                    "{broken}"
                );
            }
            // Mistakes that run over lines (an array left open), or break
            // a table header: the `[daemon]` table alone is read, when
            // there is one.
            for mistake in [
                "paths = [\"src\",\ndebounce_ms = 100\n",
                "command = [\"./build.sh]\nartifact = \"b\"\n",
                "[watch\npaths = []\n",
            ] {
                let broken = format!("{daemon}{MINIMAL}{mistake}");
                std::fs::write(&file, &broken).expect("write");
                assert!(Config::load(&file, &Overrides::default()).is_err());
                // (With no `[daemon]` table: the defaults only when the
                // rest still reads, else an error; never another path.)
                match Config::control_socket_of(&file) {
                    Ok(got) => assert_eq!(got, found, "{broken}"),
                    Err(e) => assert!(daemon.is_empty(), "{broken}: {e}"),
                }
            }
            // A quoted dotted key at the top is the daemon table too.
            let dotted = format!("\"daemon\".control_socket = \"q.sock\"\n{MINIMAL}[watch\n");
            std::fs::write(&file, &dotted).expect("write");
            assert_eq!(
                Config::control_socket_of(&file).expect("socket"),
                std::fs::canonicalize(dir.path().join("etc"))
                    .expect("etc")
                    .join("q.sock"),
                "{dotted}"
            );
            // The header quoted is the same table.
            if !daemon.is_empty() {
                let quoted = daemon.replace("[daemon]", "[ \"daemon\" ]");
                let broken = format!("{quoted}{MINIMAL}paths = [\"src\",\n");
                std::fs::write(&file, &broken).expect("write");
                assert_eq!(
                    Config::control_socket_of(&file).expect("socket"),
                    found,
                    "{broken}"
                );
            }
        }
        // A wrong type in one of the keys it needs is still an error, and
        // so is a mistake on a line that could hold the answer (a table
        // header, or one of the keys), rather than a guess.
        for text in [
            format!("[daemon]\nstate_dir = 5\n{MINIMAL}"),
            format!("[daemon\nroot = \"..\"\ncontrol_socket = \"c.sock\"\n{MINIMAL}"),
            format!("{MINIMAL}[ daemon \nroot = \"..\"\n"),
            format!("daemon.control_socket = \"c.sock\" x\n{MINIMAL}"),
            format!("daemon.state_dir = \"sd\" ,\n{MINIMAL}"),
            // No `[daemon]` table, and a mistake that swallows what
            // follows it: the defaults would be a guess (a key that only
            // starts with "daemon" is no daemon table).
            format!("{MINIMAL}[watch]\npaths = [\"src\",\n[extra]\nx = 1\n"),
            format!("daemonize = true\n{MINIMAL}[watch\n"),
        ] {
            std::fs::write(&file, &text).expect("write");
            assert!(Config::control_socket_of(&file).is_err(), "{text}");
        }
    }

    #[test]
    fn worker_env_names_must_be_names() {
        for bad in [r#""" = "x""#, r#""A=B" = "x""#] {
            let text = MINIMAL.replace("[worker]\n", &format!("[worker]\nenv = {{ {bad} }}\n"));
            let i = single_issue(&text);
            assert_eq!(i.key.as_deref(), Some("worker.env"), "{i}");
            assert!(i.message.contains("not a variable name"), "{i}");
        }
        let ok = MINIMAL.replace("[worker]\n", "[worker]\nenv = { RUST_LOG = \"a=b\" }\n");
        assert!(parse(&ok).is_ok());
    }

    #[test]
    fn durations_past_a_year_are_refused() {
        // u64::MAX seconds would overflow the clock where it is added.
        for (table, key) in [
            ("worker", "start_timeout_s"),
            ("daemon", "shutdown_timeout_s"),
            ("worker", "keepalive_timeout_ms"),
        ] {
            let text = if table == "worker" {
                MINIMAL.replace("[worker]\n", &format!("[worker]\n{key} = {}\n", u64::MAX))
            } else {
                format!("{MINIMAL}[{table}]\n{key} = {}\n", u64::MAX)
            };
            let i = single_issue(&text);
            assert_eq!(i.key, Some(format!("{table}.{key}")), "{i}");
            assert!(i.message.contains("at most"), "{i}");
        }
        let year = format!("{MINIMAL}[daemon]\nshutdown_timeout_s = 31536000\n");
        assert!(parse(&year).is_ok());
    }

    #[test]
    fn validation_errors_are_located() {
        let text = format!("{MINIMAL}[daemon]\nlisten = \"nowhere\"\n");
        let i = single_issue(&text);
        assert_eq!(i.line, Some(7));
        assert_eq!(i.key.as_deref(), Some("daemon.listen"));
        // A dotted key and an inline table are found where they are.
        let text = format!("restart.limit_burst = 0\n{MINIMAL}");
        let i = single_issue(&text);
        assert_eq!((i.line, i.column), (Some(1), Some(9)), "{i}");
        assert_eq!(i.key.as_deref(), Some("restart.limit_burst"));
        let text =
            format!("restart = {{ backoff_initial_ms = 50, backoff_max_ms = 20 }}\n{MINIMAL}");
        let i = single_issue(&text);
        assert_eq!((i.line, i.column), (Some(1), Some(38)), "{i}");
        // A bound the file does not set is not blamed: the key it does is.
        let text = format!("{MINIMAL}[restart]\nbackoff_initial_ms = 20000\n");
        let i = single_issue(&text);
        assert_eq!(i.key.as_deref(), Some("restart.backoff_initial_ms"), "{i}");
        assert!(i.message.contains("10000, the default"), "{i}");
    }

    #[test]
    fn settings_that_could_never_work_are_refused_with_their_key() {
        const BUILD: &str = "[build]\ncommand = [\"true\"]\nartifact = \"a\"\n";
        const WORKER: &str = "[worker]\ncommand = [\"{artifact}\"]\n";
        let cases = [
            (
                format!("{MINIMAL}[daemon]\ncontrol_socket = \"\"\n"),
                "daemon.control_socket",
                "is a folder",
            ),
            (
                format!("{MINIMAL}[daemon]\ncontrol_socket = \"run/\"\n"),
                "daemon.control_socket",
                "is a folder",
            ),
            (
                format!("{MINIMAL}health_path = \"/health z\"\n"),
                "worker.health_path",
                "not a URL path",
            ),
            (
                format!("{MINIMAL}env = {{ PORT = \"5\" }}\n"),
                "worker.env",
                "set by batond",
            ),
            (
                format!("{MINIMAL}env = {{ LISTEN_FDS = \"1\" }}\n"),
                "worker.env",
                "batond's to set or withhold",
            ),
            (
                format!("{BUILD}[worker]\ncommand = [\"\"]\n"),
                "worker.command",
                "must name a program",
            ),
            (
                format!("[build]\ncommand = [\"\", \"x\"]\nartifact = \"a\"\n{WORKER}"),
                "build.command",
                "must name a program",
            ),
            (
                format!("{MINIMAL}[watch]\ndebounce_ms = 500\nmax_wait_ms = 100\n"),
                "watch.max_wait_ms",
                "or at least debounce_ms (500)",
            ),
        ];
        for (text, key, says) in cases {
            let i = single_issue(&text);
            assert_eq!(i.key.as_deref(), Some(key), "{text}: {i}");
            assert!(i.message.contains(says), "{text}: {i}");
        }
    }

    #[test]
    fn worker_env_may_give_what_batond_does_not_set_for_that_worker() {
        for env in [
            "socket = \"unix\"\nenv = { PORT = \"8080\", BATON_SIGNATURE = \"x\" }",
            "env = { BATON_SOCKET = \"/s\", BATON_CONFIG = \"c\", WATCHDOG_SEC = \"1\" }",
        ] {
            let text = format!("{MINIMAL}{env}\n");
            assert!(parse(&text).is_ok(), "{text}");
        }
        let text = format!("{MINIMAL}signature = \"env\"\nenv = {{ BATON_SIGNATURE = \"x\" }}\n");
        assert_eq!(single_issue(&text).key.as_deref(), Some("worker.env"));
    }

    #[test]
    fn the_root_must_be_a_folder_and_the_state_folder_is_not_watched() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("f"), "x").expect("file");
        let file = dir.path().join("baton.toml");
        let issues = |text: &str| match Config::parse(&file, text, &Overrides::default()) {
            Err(ConfigError::Invalid { issues }) => issues,
            Ok(_) => Vec::new(),
            Err(e) => panic!("{e}"),
        };
        let i = issues(&format!("[daemon]\nroot = \"f\"\n{MINIMAL}"));
        assert!(
            i.iter()
                .any(|i| i.key.as_deref() == Some("daemon.root")
                    && i.message.contains("not a folder")),
            "{i:?}"
        );
        let i = issues(&format!(
            "[daemon]\nstate_dir = \".\"\n[watch]\npaths = [\".\"]\n{MINIMAL}"
        ));
        assert_eq!(i.len(), 1, "{i:?}");
        assert_eq!(i[0].key.as_deref(), Some("watch.paths"));
        assert!(i[0].message.contains("daemon.state_dir"), "{}", i[0]);
        // A state folder inside a watched one is fine: it is left out.
        assert!(issues(&format!("[watch]\npaths = [\".\"]\n{MINIMAL}")).is_empty());
    }

    #[test]
    fn a_config_that_is_no_regular_file_is_refused_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("fifo.toml");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        let big = dir.path().join("big.toml");
        // Cut at the limit inside a two-byte character: still "larger".
        std::fs::write(&big, "é".repeat(600_000)).expect("big");
        let (tx, rx) = std::sync::mpsc::channel();
        let paths = [fifo, dir.path().to_path_buf(), big];
        let todo = paths.clone();
        std::thread::spawn(move || {
            for p in todo {
                let _ = tx.send(Config::load(&p, &Overrides::default()).map(|_| ()));
            }
        });
        for (p, says) in paths
            .iter()
            .zip(["not a regular file", "a folder", "larger than"])
        {
            let got = rx
                .recv_timeout(std::time::Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("reading {} did not end", p.display()));
            let e = got.expect_err("refused");
            assert!(matches!(e, ConfigError::Read { .. }), "{e}");
            assert!(e.to_string().contains(says), "{e}");
        }
    }

    #[test]
    fn ignore_globs_match_relative_and_absolute_paths() {
        let cfg = parse(MINIMAL).expect("valid");
        let ig = &cfg.watch.ignore;
        for p in [
            "target/debug/x",
            "src/.git/HEAD",
            "src/main.rs.swp",
            "src/.main.rs.swo",
            "src/.main.rs.swn",
            "src/main.rs~",
            "src/.#main.rs",
            "src/4913",
            "/abs/target/x",
        ] {
            assert!(ig.is_match(Path::new(p)), "{p} should be ignored");
        }
        for p in [
            "src/main.rs",
            "Cargo.toml",
            "src/targets.rs",
            "etc/media-worker.toml",
            "static/movie.swf",
        ] {
            assert!(!ig.is_match(Path::new(p)), "{p} should be watched");
        }
        // Names that are not UTF-8 are matched too.
        use std::os::unix::ffi::OsStrExt as _;
        let odd = |b: &[u8]| PathBuf::from(std::ffi::OsStr::from_bytes(b));
        assert!(ig.is_match(&odd(b"src/.\xff.swp")));
        assert!(ig.prunes(&odd(b"src/v\xff/target")));
        assert!(!ig.is_match(&odd(b"src/\xff.rs")));
    }

    #[test]
    fn bad_signature_mode_is_refused() {
        let text = MINIMAL.replace("[worker]\n", "[worker]\nsignature = \"magic\"\n");
        let i = single_issue(&text);
        assert_eq!(i.key.as_deref(), Some("worker.signature"));
    }

    #[test]
    fn worker_socket_is_tcp_unless_unix_is_asked_for() {
        assert_eq!(
            parse(MINIMAL).expect("valid").worker.socket,
            WorkerSocket::Tcp
        );
        let text = MINIMAL.replace("[worker]\n", "[worker]\nsocket = \"unix\"\n");
        assert_eq!(
            parse(&text).expect("valid").worker.socket,
            WorkerSocket::Unix
        );
        let text = MINIMAL.replace("[worker]\n", "[worker]\nsocket = \"port\"\n");
        assert_eq!(
            parse(&text).expect("valid").worker.socket,
            WorkerSocket::Port
        );
        let text = MINIMAL.replace("[worker]\n", "[worker]\nsocket = \"udp\"\n");
        let i = single_issue(&text);
        assert_eq!(i.key.as_deref(), Some("worker.socket"));
        assert_eq!(i.line, Some(5));
        let text = MINIMAL
            .replace("[worker]\n", "[worker]\nsocket = \"unix\"\n")
            .replace(
                "[\"{artifact}\"]",
                "[\"{artifact}\", \"--port\", \"{port}\"]",
            );
        let i = single_issue(&text);
        assert_eq!(i.key.as_deref(), Some("worker.command"));
        assert!(i.message.contains("{port}"), "{}", i.message);
    }
}
