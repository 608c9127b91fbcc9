//! One worker process of a generation: build, snapshot, start, prove, watch.
//!
//! These are the steps the supervisor runs in tasks of their own; each
//! returns a result the supervisor's actor turns into state. Nothing here
//! touches the router: traffic only moves in the actor.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, SignatureMode, WorkerSocket};
use crate::endpoint::Endpoint;
use crate::probe::{self, Verdict};
use crate::process::{self, Child, GroupRecord, Spec};
use crate::router::Upstream;

/// A generation's folder: `state_dir/gen-000N`.
pub fn gen_dir(state_dir: &Path, generation: u64) -> PathBuf {
    state_dir.join(format!("gen-{generation:04}"))
}

/// Runs the build command with its timeout in its own process group,
/// writing its output to `build.log`.
///
/// # Errors
/// A one-line reason: the exit status or the timeout, with the last line of
/// the log.
pub async fn build(
    cfg: &Config,
    shim: &Path,
    dir: &Path,
    token: &CancellationToken,
) -> Result<(), String> {
    let log_path = dir.join("build.log");
    if cfg.build.command.is_empty() {
        let _ = std::fs::write(&log_path, "no build command; artifact used as is\n");
        return Ok(());
    }
    let log = tokio::fs::File::create(&log_path)
        .await
        .map_err(|e| format!("{}: {e}", log_path.display()))?;
    // Through a pipe, not the file itself: `build.log` is rotated at
    // BUILD_LOG_MAX_BYTES like `worker.log`, so a build that prints without
    // end does not fill the disk. One pipe for stdout and stderr, as one
    // file was: the lines stay in the order the build wrote them.
    let pipe_err = |e: std::io::Error| format!("build output pipe: {e}");
    let (read, write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| pipe_err(e.into()))?;
    let write_err = write.try_clone().map_err(pipe_err)?;
    let output = tokio::net::unix::pipe::Receiver::from_owned_fd(read).map_err(pipe_err)?;
    let mut child = Child::spawn(
        shim,
        Spec {
            argv: cfg.build.command.clone(),
            env: vec![],
            cwd: cfg.daemon.root.clone(),
            listener: None,
            stdout: Stdio::from(write),
            stderr: Stdio::from(write_err),
            nice: cfg.build.nice,
        },
    )
    .map_err(|e| e.to_string())?;
    let (queue, writer) = LogQueue::spawn(
        Ok(log),
        log_path.clone(),
        BUILD_LOG_MAX_BYTES,
        LOG_QUEUE_BYTES,
        "build.log",
    );
    let pumping = tokio::spawn(pump(output, queue, None));
    let what = format!(
        "build in {}",
        dir.file_name().unwrap_or_default().to_string_lossy()
    );
    let record = GroupRecord::write(&cfg.daemon.state_dir, child.pid(), &what);
    // The outcome, and whether batond stopped the build (its timeout, or
    // batond's own stop).
    let (outcome, stopped) = tokio::select! {
        r = tokio::time::timeout(cfg.build.timeout, child.wait()) => match r {
            Ok(Ok(status)) if status.success() => (Ok(()), false),
            Ok(Ok(status)) => (Err(format!("build failed: {}", process::describe(status))), false),
            Ok(Err(e)) => (Err(format!("build failed: {e}")), false),
            Err(_) => {
                let killed = stopped_with_sigkill(&mut child).await;
                (Err(format!("build timed out after {} s{killed}", cfg.build.timeout.as_secs())), true)
            }
        },
        () = token.cancelled() => {
            let killed = stopped_with_sigkill(&mut child).await;
            (Err(format!("build cancelled: daemon stopping{killed}")), true)
        }
    };
    record.clear();
    // The build's last words into the file before they are quoted; not
    // longer than that, though: something the build left running may keep
    // its output open.
    let unwritten = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = pumping.await;
        writer.await.ok().flatten()
    })
    .await
    .ok()
    .flatten();
    // A stopped build's log says why it ended there, as the reason does
    // (written after the reason has quoted the build's own last words).
    let stopped = outcome.as_ref().err().filter(|_| stopped).cloned();
    let kept = match &outcome {
        Err(_) => build_quote(&log_path).await,
        Ok(()) => None,
    };
    let outcome = outcome.map_err(|r| {
        // An error line from the file or from what could not be written
        // to it (the file's first), else the last line of either.
        let lost = unwritten.as_ref().and_then(|u| u.quote.clone());
        let quote = match (kept, lost) {
            (Some(k), _) if is_error_line(&k) => Some(k),
            (_, Some(l)) if is_error_line(&l) => Some(l),
            (k, l) => k.or(l),
        };
        let r = match quote {
            Some(l) => format!("{r}: {l}"),
            None => r,
        };
        match unwritten {
            Some(u) => format!("{r} ({})", u.summary),
            None => r,
        }
    });
    if let Some(r) = stopped {
        use std::io::Write;
        let _ = std::fs::OpenOptions::new()
            .append(true)
            .open(&log_path)
            .and_then(|mut f| writeln!(f, "[batond: {r}]"));
    }
    outcome
}

/// Stops a build (SIGTERM to its group, SIGKILL 2 s later) and says
/// whether it took SIGKILL, for its reason.
async fn stopped_with_sigkill(child: &mut Child) -> &'static str {
    match process::stop(child, Duration::from_secs(2)).await {
        Some((_, true)) => " (it ignored SIGTERM: killed)",
        _ => "",
    }
}

/// The last `max_bytes` of a file (a worker log can be large).
///
/// # Errors
/// The I/O error of opening or reading it.
pub fn read_tail(path: &Path, max_bytes: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max_bytes)))?;
    let mut tail = Vec::new();
    f.read_to_end(&mut tail)?;
    Ok(tail)
}

/// Where the last `lines` lines of `f` start, looking back at most
/// `max_bytes` from its end (then there), where it ends (its length now),
/// and how many lines that range holds (fewer than `lines` when the file,
/// or `max_bytes`, ran out first). Reads backwards 16 KiB at a time: the
/// tail is found without holding it in memory. The file's final newline
/// ends its last line.
///
/// # Errors
/// The I/O error of a read.
pub fn tail_lines(
    f: &mut std::fs::File,
    lines: usize,
    max_bytes: u64,
) -> std::io::Result<(u64, u64, usize)> {
    use std::io::{Read, Seek, SeekFrom};
    let len = f.metadata()?.len();
    if lines == 0 {
        return Ok((len, len, 0));
    }
    let floor = len.saturating_sub(max_bytes);
    let mut buf = [0u8; 16 * 1024];
    let (mut end, mut found) = (len, 0);
    while end > floor {
        let start = end.saturating_sub(buf.len() as u64).max(floor);
        let chunk = &mut buf[..usize::try_from(end - start).unwrap_or(0)];
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(chunk)?;
        for (i, b) in chunk.iter().enumerate().rev() {
            let at = start + i as u64;
            if *b == b'\n' && at + 1 != len {
                found += 1;
                if found == lines {
                    return Ok((at + 1, len, lines));
                }
            }
        }
        end = start;
    }
    // The lines after each newline found, and the one before the first.
    Ok((floor, len, if floor < len { found + 1 } else { 0 }))
}

/// What a failed build's reason quotes from its log (see [`BuildErrors`]),
/// read from its start line by line (a log of megabytes is never held
/// whole: freed, such a buffer would stay in `batond`'s heap).
async fn build_quote(path: &Path) -> Option<String> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let f = std::fs::File::open(&path).ok()?;
        let mut errors = BuildErrors::default();
        for line in std::io::BufReader::with_capacity(64 << 10, f).split(b'\n') {
            errors.line(&String::from_utf8_lossy(&line.ok()?));
        }
        errors.quote()
    })
    .await
    .ok()
    .flatten()
}

/// What a failed build's reason quotes, from its output line by line: the
/// first error that is not a summary (cargo's `could not compile`,
/// rustc's `aborting due to`), with the place rustc names on a ` --> `
/// line below it, and how many errors follow; else what [`quotable`]
/// would pick. The first error is the one to fix first; the summary that
/// comes last says only that there were some.
#[derive(Debug, Default)]
struct BuildErrors {
    first: Option<String>,
    /// Lines read since the first error, while its place may still come.
    after_first: usize,
    count: usize,
    last_error: Option<String>,
    last: Option<String>,
}

impl BuildErrors {
    fn line(&mut self, line: &str) {
        let line = line.trim();
        if line.is_empty() {
            return;
        }
        if let Some(first) = &mut self.first
            && self.after_first < 3
        {
            self.after_first += 1;
            if let Some(place) = line.strip_prefix("--> ") {
                let place: String = place.chars().take(200).collect();
                *first = format!("{first} at {place}");
                self.after_first = 3;
            }
        }
        let clipped = || line.chars().take(240).collect::<String>();
        if is_build_error(line) {
            if line.contains("could not compile") || line.contains("aborting due to") {
                self.last_error = Some(clipped());
            } else {
                self.count += 1;
                if self.first.is_none() {
                    self.first = Some(clipped());
                }
            }
        }
        self.last = Some(clipped());
    }

    fn quote(self) -> Option<String> {
        let Some(mut first) = self.first else {
            return self.last_error.or(self.last);
        };
        match self.count - 1 {
            0 => {}
            1 => first.push_str(" (and 1 more error)"),
            n => first.push_str(&format!(" (and {n} more errors)")),
        }
        Some(first)
    }
}

/// Whether a build's output line reports an error: rustc's and cargo's
/// `error:`/`error[E0425]:`, a compiler's `file:line:col: error:`, a
/// `fatal error:`. Not a line of source rustc shows around an error
/// (`2 |     let error: u32 = 5;`) nor a warning that names one.
fn is_build_error(l: &str) -> bool {
    if l.starts_with("error") || l.starts_with("fatal error") {
        return true;
    }
    // `PLACE: error: ...`, where PLACE is one word (a path and position).
    [": error:", ": fatal error:"].iter().any(|tag| {
        l.split_once(tag)
            .is_some_and(|(place, _)| !place.is_empty() && !place.contains(char::is_whitespace))
    })
}

/// What one instance of a worker wrote that a failed start quotes: its
/// last line that mentions an error, else its last non-empty one, as
/// [`quotable`] picks them. Kept by the instance's own output pumps while
/// it is being proven, so neither an earlier instance's lines in the
/// generation's `worker.log` nor those of the instance serving beside it
/// (a restart, a replacement) are taken for its words.
#[derive(Debug, Default)]
pub struct LastWords {
    proving: AtomicBool,
    /// Output streams not yet at their end.
    open: AtomicUsize,
    ended: tokio::sync::Notify,
    /// (last non-empty line, last error line)
    lines: std::sync::Mutex<(Option<String>, Option<String>)>,
    /// The instance's budget of lines copied into `batond`'s own log, for
    /// its stdout and stderr together (see [`COPIED_LINES_PER_S`]).
    copied: std::sync::Mutex<Tokens>,
}

impl LastWords {
    fn note(&self, line: &str) {
        if !self.proving.load(Ordering::Relaxed) {
            return;
        }
        let line = line.trim();
        if line.is_empty() {
            return;
        }
        let error = is_error_line(line);
        let line: String = line.chars().take(240).collect();
        if let Ok(mut lines) = self.lines.lock() {
            if error {
                lines.1 = Some(line.clone());
            }
            lines.0 = Some(line);
        }
    }

    fn quote(&self) -> Option<String> {
        let lines = self.lines.lock().ok()?;
        lines.1.clone().or_else(|| lines.0.clone())
    }

    fn stream_ended(&self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        self.ended.notify_waiters();
    }

    /// Waits, at most `limit`, for the output streams to end: an exited
    /// worker's last lines are read by then (a child it left may hold
    /// them open; hence the limit).
    async fn read_to_end(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, async {
            loop {
                let ended = self.ended.notified();
                if self.open.load(Ordering::Acquire) == 0 {
                    return;
                }
                ended.await;
            }
        })
        .await;
    }
}

/// The line of `text` worth quoting: the last that mentions an error, else
/// the last non-empty one.
fn quotable(text: &str) -> Option<String> {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let pick = lines
        .iter()
        .rev()
        .find(|l| is_error_line(l))
        .or(lines.last())?;
    Some(pick.chars().take(240).collect())
}

fn is_error_line(l: &str) -> bool {
    l.starts_with("error") || l.contains("error:")
}

/// The chunk a snapshot is copied and hashed in.
const COPY_BUF: usize = 16 * 1024;

/// Copies the artifact into the generation's folder, hashing it on the way.
/// Returns the snapshot path and its SHA-256 (hex).
///
/// # Errors
/// A one-line reason when the artifact is missing or cannot be copied.
pub async fn snapshot(
    artifact: &Path,
    dir: &Path,
    limit: Duration,
) -> Result<(PathBuf, String), String> {
    let artifact = artifact.to_path_buf();
    let dir = dir.to_path_buf();
    // The copy checks this between chunks: a copy past its time limit
    // stops and leaves nothing behind (a blocking task cannot be dropped).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let copying = {
        let (artifact, stop) = (artifact.clone(), stop.clone());
        tokio::task::spawn_blocking(move || {
            let tmp = dir.join(".snapshot.tmp");
            let r = copy_and_hash(&artifact, &dir, &tmp, &stop);
            if r.is_err() {
                // Nothing half-written is left behind (it may fill the disk).
                let _ = std::fs::remove_file(&tmp);
            }
            r
        })
    };
    match tokio::time::timeout(limit, copying).await {
        Ok(r) => r.map_err(|e| format!("snapshot task: {e}"))?,
        Err(_) => {
            stop.store(true, Ordering::Relaxed);
            Err(format!(
                "snapshot of {} took longer than build.timeout_s ({} s)",
                artifact.display(),
                limit.as_secs()
            ))
        }
    }
}

/// What kind of file a non-regular file is, for a message.
fn file_kind(t: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a folder"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "not a regular file"
    }
}

fn copy_and_hash(
    artifact: &Path,
    dir: &Path,
    tmp: &Path,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<(PathBuf, String), String> {
    use std::io::{Read, Write};
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let name = artifact.file_name().map_or_else(
        || std::ffi::OsString::from("artifact"),
        std::ffi::OsStr::to_os_string,
    );
    let dest = dir.join(name);
    let shown = artifact.display();
    // Non-blocking, so that a FIFO in its place cannot hold the open (and
    // with it every deploy after this one) until something writes to it.
    let mut src = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(artifact)
        .map_err(|e| format!("artifact {shown}: {e}"))?;
    let meta = src
        .metadata()
        .map_err(|e| format!("artifact {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!(
            "artifact {shown} is {}, not the file a build makes",
            file_kind(meta.file_type())
        ));
    }
    let mode = meta.permissions().mode();
    let mut out =
        std::fs::File::create(tmp).map_err(|e| format!("snapshot {}: {e}", tmp.display()))?;
    let mut hasher = Sha256::new();
    // Small and on the stack: the 256 KiB heap buffer this was would
    // be mapped and unmapped, which makes glibc's malloc raise its
    // thresholds and keep such buffers in each blocking thread's arena
    // for good (0.26 MB per arena; `batond` at 8.3 MB instead of 7.6
    // after 30 deploys under load).
    let mut buf = [0u8; COPY_BUF];
    let written = |e: std::io::Error| format!("writing snapshot {}: {e}", tmp.display());
    let mut copied = 0u64;
    loop {
        if stop.load(Ordering::Relaxed) {
            return Err("snapshot stopped at its time limit".into());
        }
        let n = src
            .read(&mut buf)
            .map_err(|e| format!("reading artifact {shown}: {e}"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(written)?;
        copied += n as u64;
    }
    // A file written in place meanwhile (not replaced: a replaced file is
    // read whole from what was opened) gives a copy that is neither the
    // old build nor the new one.
    let after = src
        .metadata()
        .map_err(|e| format!("artifact {shown}: {e}"))?;
    if copied != meta.len()
        || after.len() != meta.len()
        || after.modified().ok() != meta.modified().ok()
    {
        drop(out);
        let _ = std::fs::remove_file(tmp);
        return Err(format!(
            "artifact {shown} was written to while it was copied; deploy again once the build has finished writing it"
        ));
    }
    out.sync_all().map_err(written)?;
    drop(out);
    std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(mode | 0o500))
        .map_err(|e| format!("snapshot mode {}: {e}", tmp.display()))?;
    std::fs::rename(tmp, &dest)
        .map_err(|e| format!("snapshot {} to {}: {e}", tmp.display(), dest.display()))?;
    Ok((dest, hex::encode(hasher.finalize())))
}

/// How a worker process ended.
#[derive(Debug, Clone)]
pub struct Exit {
    /// `code 1`, `signal SIGKILL`, ...
    pub status: String,
    /// Whether the supervisor asked it to stop.
    pub requested: bool,
}

/// A message a worker task sends the supervisor.
#[derive(Debug)]
pub enum WorkerEvent {
    /// The process ended.
    Exited {
        /// Its generation.
        generation: u64,
        /// Its instance number within the generation.
        instance: u64,
        /// How it ended.
        exit: Exit,
    },
    /// The process was started (it has yet to prove itself).
    Spawned {
        /// Its generation.
        generation: u64,
        /// Its instance number.
        instance: u64,
        /// Its process id.
        pid: u32,
        /// Where it listens.
        endpoint: Endpoint,
    },
    /// The active worker failed its probes too many times in a row.
    Unhealthy {
        /// Its generation.
        generation: u64,
        /// Its instance number.
        instance: u64,
        /// The last failure.
        reason: String,
    },
}

/// A running worker process.
#[derive(Debug)]
pub struct Instance {
    /// Its generation.
    pub generation: u64,
    /// 1 for the first start of a generation's snapshot, +1 per restart.
    pub instance: u64,
    /// The process id.
    pub pid: u32,
    /// Where it listens.
    pub endpoint: Endpoint,
    /// Its traffic counters and tunnels.
    pub upstream: Arc<Upstream>,
    /// Cancel to stop the process (SIGTERM, then SIGKILL).
    pub stop: CancellationToken,
    /// Cancel to end its health monitor.
    pub monitor: CancellationToken,
    /// Becomes Some when the process has ended.
    pub exited: watch::Receiver<Option<Exit>>,
    /// When it started.
    pub started: Instant,
    /// When traffic moved to it (RFC 3339), once it has.
    pub cutover_at: Option<String>,
}

/// Everything needed to start one instance of a generation.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The generation.
    pub generation: u64,
    /// The instance number.
    pub instance: u64,
    /// The snapshot to run.
    pub snapshot: PathBuf,
    /// The digest it must present.
    pub signature: String,
    /// The generation's folder (for `worker.log` and a Unix socket).
    pub dir: PathBuf,
}

/// Why a start failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartFailure {
    /// `exited with status S`, `healthz NNN`, `signature mismatch: want X
    /// got Y`, `start timeout ...`, or what stopped batond from starting it
    /// (`batond could not start it: ...` when it was batond's own
    /// shortage).
    pub reason: String,
    /// batond's own failure before any worker process ran: it was short
    /// of file descriptors, memory or processes. It says nothing of the
    /// build, and it comes back once batond has them again.
    pub ours: bool,
}

impl StartFailure {
    /// A failure before the worker ran, because of `e`: batond's own when
    /// it ran short of a resource (descriptors, memory, processes), which
    /// comes back; anything else (a folder gone) counts as a failed start.
    fn before_spawn(reason: String, e: &std::io::Error) -> Self {
        // EAGAIN: fork's "too many processes".
        let short = crate::process::short_of_resources(e)
            || e.raw_os_error() == Some(nix::errno::Errno::EAGAIN as i32);
        if short {
            Self {
                reason: format!("batond could not start it: {reason}"),
                ours: true,
            }
        } else {
            Self {
                reason,
                ours: false,
            }
        }
    }
}

impl From<String> for StartFailure {
    fn from(reason: String) -> Self {
        Self {
            reason,
            ours: false,
        }
    }
}

/// Starts a worker and probes it until it proves the expected signature.
/// Returns the proven instance and the time it took.
///
/// # Errors
/// The reason for rejection: `exited with status S`, `healthz NNN`,
/// `signature mismatch: want X got Y`, `start timeout`; or batond's own
/// failure to start it (marked [`StartFailure::ours`]).
pub async fn start(
    cfg: &Config,
    shim: &Path,
    launch: &Launch,
    events: mpsc::UnboundedSender<WorkerEvent>,
    token: &CancellationToken,
) -> Result<(Instance, Duration), StartFailure> {
    // The socket handed over as fd 3, or (`port`) the reservation kept
    // here until the worker exits.
    let (endpoint, listener, reservation) = match cfg.worker.socket {
        WorkerSocket::Tcp => {
            let (endpoint, listener) = Endpoint::bind_tcp().map_err(|e| {
                StartFailure::before_spawn(format!("cannot bind a loopback port: {e}"), &e)
            })?;
            (endpoint, Some(listener), None)
        }
        WorkerSocket::Port => {
            let (endpoint, reserved) = Endpoint::reserve_tcp().map_err(|e| {
                StartFailure::before_spawn(format!("cannot reserve a loopback port: {e}"), &e)
            })?;
            (endpoint, None, Some(reserved))
        }
        WorkerSocket::Unix => {
            let path = launch.dir.join(format!("worker-{}.sock", launch.instance));
            let (endpoint, listener) = Endpoint::bind_unix(&path).map_err(|e| {
                StartFailure::before_spawn(format!("cannot bind the worker socket: {e}"), &e)
            })?;
            (endpoint, Some(listener), None)
        }
    };
    let snapshot = launch.snapshot.to_string_lossy();
    let port = endpoint.port().map(|p| p.to_string());
    let mut values = vec![("{artifact}", snapshot.as_ref())];
    if let Some(p) = &port {
        values.push(("{port}", p.as_str()));
    }
    let argv: Vec<String> = cfg
        .worker
        .command
        .iter()
        .map(|a| fill_placeholders(a, &values))
        .collect();
    let mut env: Vec<(String, String)> = cfg
        .worker
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    env.push(match &endpoint {
        Endpoint::Tcp(a) => ("PORT".into(), a.port().to_string()),
        Endpoint::Unix(u) => ("BATON_SOCKET".into(), u.path.display().to_string()),
    });
    env.push(("BATON_GENERATION".into(), launch.generation.to_string()));
    if cfg.worker.signature == SignatureMode::Env {
        env.push(("BATON_SIGNATURE".into(), launch.signature.clone()));
    }
    let log_path = launch.dir.join("worker.log");
    // A log that cannot be opened costs its lines only (they still go to
    // batond's own log), not the worker.
    let log = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .await;
    if let Err(e) = &log {
        tracing::warn!(
            generation = launch.generation,
            path = %log_path.display(),
            error = %e,
            "cannot open the worker's log; its output goes to batond's log only"
        );
    }
    let mut child = Child::spawn(
        shim,
        Spec {
            argv,
            env,
            cwd: cfg.daemon.root.clone(),
            listener,
            stdout: Stdio::piped(),
            stderr: Stdio::piped(),
            // Workers run at batond's own priority.
            nice: 0,
        },
    )
    .map_err(|e| {
        endpoint.remove_file();
        match &e {
            crate::process::SpawnError::Io { source, .. } => {
                StartFailure::before_spawn(e.to_string(), source)
            }
            crate::process::SpawnError::Empty => e.to_string().into(),
        }
    })?;
    let started = Instant::now();
    let pid = u32::try_from(child.pid()).unwrap_or_default();
    let _ = events.send(WorkerEvent::Spawned {
        generation: launch.generation,
        instance: launch.instance,
        pid,
        endpoint: endpoint.clone(),
    });
    let record = GroupRecord::write(
        &cfg.daemon.state_dir,
        child.pid(),
        &format!("worker of generation {}", launch.generation),
    );
    // The writer runs until both streams' queues are gone.
    let (queue, _writer) = LogQueue::spawn(
        log,
        log_path.clone(),
        WORKER_LOG_MAX_BYTES,
        LOG_QUEUE_BYTES,
        "worker.log",
    );
    let words = Arc::new(LastWords::default());
    words.proving.store(true, Ordering::Relaxed);
    if let Some(out) = child.take_stdout() {
        words.open.fetch_add(1, Ordering::AcqRel);
        tokio::spawn(pump(
            out,
            queue.another(),
            Some((launch.generation, words.clone())),
        ));
    }
    if let Some(err) = child.take_stderr() {
        words.open.fetch_add(1, Ordering::AcqRel);
        tokio::spawn(pump(err, queue, Some((launch.generation, words.clone()))));
    }
    let stop = token.child_token();
    let (exit_tx, exited) = watch::channel(None);
    {
        let stop = stop.clone();
        let grace = cfg.worker.stop_timeout;
        let (generation, instance) = (launch.generation, launch.instance);
        let endpoint = endpoint.clone();
        let pid = child.pid();
        tokio::spawn(async move {
            // When a stop's SIGTERM went out: what the worker left in its
            // group has until the same deadline.
            let mut stopped_by = None;
            let exit = tokio::select! {
                r = child.wait_leader() => Exit {
                    status: r.map_or_else(|e| e.to_string(), process::describe),
                    requested: false,
                },
                // A worker that died just before it was asked to stop (its
                // calls ended with it, which made it idle) was not stopped.
                () = stop.cancelled() => match child.exited() {
                    Some(status) => Exit {
                        status: process::describe(status),
                        requested: false,
                    },
                    None => {
                        let deadline = tokio::time::Instant::now() + grace;
                        stopped_by = Some(deadline);
                        match process::stop_leader(&mut child, deadline).await {
                            Some((status, killed)) => Exit {
                                status: process::describe(status),
                                requested: process::stopped_by_us(status, killed),
                            },
                            None => Exit {
                                status: "unknown".into(),
                                requested: true,
                            },
                        }
                    }
                },
            };
            // Said at once: a crash restart, a candidate's rejection or a
            // drain's end does not wait for what the worker left behind.
            let _ = exit_tx.send(Some(exit.clone()));
            let _ = events.send(WorkerEvent::Exited {
                generation,
                instance,
                exit,
            });
            // What the worker started and left in its group gets the
            // grace a stop gives (SIGTERM, then SIGKILL at
            // `stop_timeout_s`), as systemd gives a unit's remaining
            // processes; batond waits for it before it exits.
            process::ending_groups()
                .track_future(async move {
                    match stopped_by {
                        Some(deadline) => process::end_group_by(pid, deadline, true).await,
                        None => {
                            let deadline = tokio::time::Instant::now() + grace;
                            process::end_group_by(pid, deadline, false).await
                        }
                    };
                    // The group is gone: its record goes, and the socket
                    // and port it may have held are free for others only
                    // now.
                    record.clear();
                    endpoint.remove_file();
                    drop(reservation);
                })
                .await;
        });
    }
    let inst = Instance {
        generation: launch.generation,
        instance: launch.instance,
        pid,
        upstream: Upstream::new(
            launch.generation,
            endpoint.clone(),
            cfg.worker.keepalive_timeout,
        ),
        endpoint,
        stop,
        monitor: CancellationToken::new(),
        exited,
        started,
        cutover_at: None,
    };
    let proven = prove(cfg, &inst, &launch.signature, &words).await;
    // From now on the lines go to the log only.
    words.proving.store(false, Ordering::Relaxed);
    match proven {
        Ok(()) => Ok((inst, started.elapsed())),
        Err(reason) => {
            inst.stop.cancel();
            let mut rx = inst.exited.clone();
            let _ = tokio::time::timeout(
                cfg.worker.stop_timeout + Duration::from_secs(1),
                rx.wait_for(Option::is_some),
            )
            .await;
            Err(reason.into())
        }
    }
}

async fn prove(cfg: &Config, inst: &Instance, want: &str, words: &LastWords) -> Result<(), String> {
    const PROBE: Duration = Duration::from_secs(2);
    let deadline = tokio::time::Instant::now() + cfg.worker.start_timeout;
    let timeout = |last: &str| {
        format!(
            "start timeout after {} s ({last})",
            cfg.worker.start_timeout.as_secs()
        )
    };
    let mut last: Option<String> = None;
    let mut exited = inst.exited.clone();
    let mut delay = Duration::from_millis(10);
    loop {
        let exit = exited.borrow().clone();
        if let Some(exit) = exit {
            // Its last words are read once its output has ended.
            words.read_to_end(Duration::from_millis(500)).await;
            return Err(match words.quote() {
                Some(l) => format!("exited with status {} (last log line: {l})", exit.status),
                None => format!("exited with status {}", exit.status),
            });
        }
        // Each probe within what is left of the start timeout.
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Err(timeout(last.as_deref().unwrap_or("no answer")));
        }
        let p = probe::probe(
            &inst.endpoint,
            &cfg.worker.health_path,
            &cfg.worker.signature_header,
            left.min(PROBE),
        )
        .await;
        match probe::judge(&p, want) {
            Verdict::Proven => return Ok(()),
            Verdict::Wrong(r) => return Err(r),
            // A probe the deadline cut short says less than the answer
            // before it (a 503, say): that one stays the reason.
            Verdict::NotYet(_)
                if left < PROBE && matches!(p, probe::Probe::TimedOut(_)) && last.is_some() => {}
            Verdict::NotYet(r) => last = Some(r),
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(timeout(last.as_deref().unwrap_or("no answer")));
        }
        tokio::select! {
            _ = tokio::time::sleep(delay.min(deadline - now)) => {}
            _ = exited.changed() => {}
        }
        delay = (delay * 2).min(Duration::from_millis(100));
    }
}

/// Probes an active instance every `health_interval` until `token` is
/// cancelled (it drains); after every `health_failures` failures in a row
/// it reports the instance unhealthy. A probe `batond` could not make
/// (out of descriptors) counts neither way.
pub async fn monitor(
    cfg: Arc<Config>,
    generation: u64,
    instance: u64,
    endpoint: Endpoint,
    want: String,
    token: CancellationToken,
    events: mpsc::UnboundedSender<WorkerEvent>,
) {
    let mut failures = 0;
    // Whether the last probe could not be made (warned once per spell).
    let mut unable = false;
    let mut tick = tokio::time::interval(cfg.worker.health_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = token.cancelled() => return,
        }
        let probed = probe::probe(
            &endpoint,
            &cfg.worker.health_path,
            &cfg.worker.signature_header,
            cfg.worker.health_interval.max(Duration::from_secs(1)),
        );
        // A worker drained meanwhile is no longer this monitor's concern.
        let p = tokio::select! {
            p = probed => p,
            () = token.cancelled() => return,
        };
        if let probe::Probe::Unable(e) = &p {
            // batond's own shortage: no verdict on the worker either way.
            if !unable {
                tracing::warn!(
                    generation,
                    instance,
                    "cannot probe the active worker: {e}; its failures are not counted meanwhile"
                );
            }
            unable = true;
            continue;
        }
        unable = false;
        match probe::judge(&p, &want) {
            Verdict::Proven => failures = 0,
            Verdict::Wrong(r) | Verdict::NotYet(r) => {
                failures += 1;
                tracing::warn!(generation, instance, failures, "health probe failed: {r}");
                if failures >= cfg.worker.health_failures {
                    // The supervisor starts a replacement (or, while one
                    // is under way or after one failed, waits); probing
                    // goes on until this worker drains, so a replacement
                    // that failed is tried again.
                    let _ = events.send(WorkerEvent::Unhealthy {
                        generation,
                        instance,
                        reason: r,
                    });
                    failures = 0;
                }
            }
        }
    }
}

/// The longest worker log line kept whole; a longer one is cut into pieces
/// of this size, so a worker that writes without newlines cannot make
/// `batond` buffer without end.
const MAX_LINE: usize = 16 << 10;

/// Reads a worker's (or a build's) stdout or stderr to its end, line by
/// line, into `queue` (the generation's `worker.log` or `build.log`) and,
/// for a worker (`generation` given), `batond`'s log.
///
/// It never waits on either, so the worker never blocks on a full pipe:
/// `batond`'s log drops what stderr does not take (see [`crate::logging`]),
/// and the file gets what its queue has room for (see [`LogQueue`]).
/// Bytes that are not UTF-8 are kept, replaced with U+FFFD.
async fn pump(
    out: impl AsyncRead + Unpin,
    mut queue: LogQueue,
    worker: Option<(u64, Arc<LastWords>)>,
) {
    // A worker's stream counts as ended however the pump ends.
    struct Ended(Option<Arc<LastWords>>);
    impl Drop for Ended {
        fn drop(&mut self) {
            if let Some(w) = &self.0 {
                w.stream_ended();
            }
        }
    }
    let (generation, words) = match worker {
        Some((g, w)) => (Some(g), Some(w)),
        None => (None, None),
    };
    let _ended = Ended(words.clone());
    let mut reader = BufReader::with_capacity(64 << 10, out);
    let mut buf = Vec::new();
    // The start of a character a long line's piece cut in two: it begins
    // the next piece, so that no valid text turns into U+FFFD.
    let mut carry = Vec::new();
    let mut shown = Copied::default();
    loop {
        // A worker that floods its output must not hold the runtime thread,
        // which also moves every request and call: one line is one unit of
        // the task's budget, and a spent budget yields.
        tokio::task::consume_budget().await;
        buf.clear();
        buf.append(&mut carry);
        let room = (MAX_LINE - buf.len()) as u64;
        let ended = match (&mut reader).take(room).read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) if buf.is_empty() => break,
            Ok(0) | Err(_) => true,
            Ok(_) => false,
        };
        if !ended
            && !buf.ends_with(b"\n")
            && let Err(e) = std::str::from_utf8(&buf)
            && e.error_len().is_none()
            && e.valid_up_to() > 0
        {
            carry = buf.split_off(e.valid_up_to());
        }
        let end = buf
            .iter()
            .rposition(|b| !matches!(b, b'\n' | b'\r'))
            .map_or(0, |i| i + 1);
        let line = String::from_utf8_lossy(&buf[..end]).into_owned();
        let Some(generation) = generation else {
            // A build's output: slowed down, never cut.
            queue.room_for(&line).await;
            queue.offer(line);
            if ended {
                break;
            }
            continue;
        };
        if let Some(w) = &words {
            w.note(&line);
        }
        let now = Instant::now();
        let taken = words
            .as_ref()
            .is_some_and(|w| w.copied.lock().is_ok_and(|mut b| b.take(now)));
        if let Some(skipped) = shown.line(now, taken) {
            if skipped > 0 {
                tracing::info!(target: "worker", generation, "[gen {generation}] ({skipped} lines not copied here; worker.log has them)");
            }
            let copied = without_timestamp(&line);
            tracing::info!(target: "worker", generation, "[gen {generation}] {copied}");
        }
        queue.offer(line);
        if ended {
            break;
        }
    }
    if let Some(generation) = generation
        && shown.skipped > 0
    {
        tracing::info!(target: "worker", generation, "[gen {generation}] ({} lines not copied here; worker.log has them)", shown.skipped);
    }
}

/// A worker's line as copied into `batond`'s log: without the RFC 3339
/// timestamp it starts with, if it does (tracing's and most loggers' text
/// format), since `batond`'s own line, or the journal, has one already.
/// worker.log keeps the line as it came.
fn without_timestamp(line: &str) -> &str {
    fn digits(b: &[u8]) -> bool {
        !b.is_empty() && b.iter().all(u8::is_ascii_digit)
    }
    let Some((first, rest)) = line.split_once(|c: char| c.is_ascii_whitespace()) else {
        return line;
    };
    let rest = rest.trim_start();
    let b = first.as_bytes();
    // YYYY-MM-DDTHH:MM:SS, then .fraction, then Z or +HH:MM / -HH:MM.
    let date_time = b.len() > 19
        && digits(&b[0..4])
        && b[4] == b'-'
        && digits(&b[5..7])
        && b[7] == b'-'
        && digits(&b[8..10])
        && matches!(b[10], b'T' | b't')
        && digits(&b[11..13])
        && b[13] == b':'
        && digits(&b[14..16])
        && b[16] == b':'
        && digits(&b[17..19]);
    if !date_time || rest.is_empty() {
        return line;
    }
    let mut zone = &b[19..];
    if let Some(fraction) = zone.strip_prefix(b".") {
        let n = fraction.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 {
            return line;
        }
        zone = &fraction[n..];
    }
    let zoned = matches!(zone, b"Z" | b"z")
        || (zone.len() == 6
            && matches!(zone[0], b'+' | b'-')
            && digits(&zone[1..3])
            && zone[3] == b':'
            && digits(&zone[4..6]));
    if zoned { rest } else { line }
}

/// Worker output lines copied into `batond`'s own log, per worker process
/// (its stdout and stderr together): bursts of [`COPIED_BURST`], then this
/// many a second; past that, lines go to `worker.log` only and the log
/// says how many it skipped. Formatting a log line costs far more than
/// queueing it for `worker.log`, so a worker that floods its output would
/// otherwise take the runtime thread's time from traffic. And under
/// systemd the log goes to the journal, which takes 10,000 messages per
/// 30 s from a unit by default and drops the rest, `batond`'s own
/// included, until the 30 s are over: a chatty worker leaves most of that
/// to `batond`. Each process has its own budget, so one that floods does
/// not take the lines of another (a failing candidate's last words).
const COPIED_LINES_PER_S: u32 = 50;
/// The burst of [`COPIED_LINES_PER_S`]: a worker's start-up and a crash's
/// last words are copied whole.
const COPIED_BURST: u32 = 1000;
/// How often, at most, a stream's skipped lines are noted in the log.
const SKIPPED_NOTE_EVERY: Duration = Duration::from_secs(1);

/// A token bucket: `per_s` tokens a second, bursts of `burst`.
#[derive(Debug)]
struct Tokens {
    per_s: f64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl Default for Tokens {
    fn default() -> Self {
        Tokens::new(COPIED_LINES_PER_S, COPIED_BURST)
    }
}

impl Tokens {
    const fn new(per_s: u32, burst: u32) -> Self {
        Self {
            per_s: per_s as f64,
            burst: burst as f64,
            tokens: burst as f64,
            last: None,
        }
    }

    /// One token at `now`, if there is one.
    fn take(&mut self, now: Instant) -> bool {
        if let Some(last) = self.last {
            let refill = now.saturating_duration_since(last).as_secs_f64() * self.per_s;
            self.tokens = (self.tokens + refill).min(self.burst);
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One stream's lines as copied into `batond`'s log: how many were not,
/// and when that was last said.
#[derive(Default)]
struct Copied {
    /// Lines not copied since the last note.
    skipped: u64,
    noted: Option<Instant>,
}

impl Copied {
    /// A line at `now`, `taken` when the budget had room for it: `None`
    /// when it is not copied; else `Some(n)`: copied, after a note of the
    /// `n` lines skipped before it (0: no note). A note comes at most once
    /// per [`SKIPPED_NOTE_EVERY`], so a flood costs one line per copied
    /// line, not two.
    fn line(&mut self, now: Instant, taken: bool) -> Option<u64> {
        if !taken {
            self.skipped += 1;
            return None;
        }
        if self.skipped > 0
            && self
                .noted
                .is_none_or(|t| now.saturating_duration_since(t) >= SKIPPED_NOTE_EVERY)
        {
            self.noted = Some(now);
            return Some(std::mem::take(&mut self.skipped));
        }
        Some(0)
    }
}

/// Bytes of output (with [`LINE_COST`] per line) that may wait for
/// `worker.log` or `build.log` before lines are dropped: a burst of many
/// megabytes, far more than a pipe (64 KiB) holds, so only a disk that
/// falls seconds behind loses lines. The memory is taken only while lines
/// wait.
pub const LOG_QUEUE_BYTES: usize = 8 << 20;

/// What a queued line costs beyond its text: the `String` and the
/// channel's slot.
const LINE_COST: usize = 64;

/// The way from [`pump`] to [`write_log`]: a queue bounded in bytes (both
/// of a generation's streams share the count) that is never waited on. A
/// line that finds it full (the disk is slow) is counted, and the count
/// goes into the file in its place once there is room.
struct LogQueue {
    /// None once the log file has failed.
    tx: Option<mpsc::UnboundedSender<String>>,
    /// Bytes queued and not yet taken by [`write_log`].
    queued: Arc<AtomicUsize>,
    limit: usize,
    dropped: u64,
    /// The file's name, for the note on dropped lines.
    file: &'static str,
}

impl LogQueue {
    /// A task writing the log at `path` (opened as `file`, rotated past
    /// `max_bytes`) and the queue to it, which holds up to `limit` bytes.
    /// The task ends once every queue to it is dropped, with what it
    /// could not write.
    fn spawn(
        file: std::io::Result<tokio::fs::File>,
        path: PathBuf,
        max_bytes: u64,
        limit: usize,
        name: &'static str,
    ) -> (LogQueue, tokio::task::JoinHandle<Option<Unwritten>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let writer = tokio::spawn(write_log(file, path, max_bytes, rx, queued.clone()));
        (LogQueue::new(tx, queued, limit, name), writer)
    }

    /// One more queue to the same writer (a process's stderr beside its
    /// stdout): the bytes queued count for both, dropped lines each its own.
    fn another(&self) -> LogQueue {
        LogQueue {
            tx: self.tx.clone(),
            queued: self.queued.clone(),
            limit: self.limit,
            dropped: 0,
            file: self.file,
        }
    }

    fn new(
        tx: mpsc::UnboundedSender<String>,
        queued: Arc<AtomicUsize>,
        limit: usize,
        file: &'static str,
    ) -> Self {
        LogQueue {
            tx: Some(tx),
            queued,
            limit,
            dropped: 0,
            file,
        }
    }

    fn offer(&mut self, line: String) {
        if self.dropped > 0 {
            let note = format!(
                "[batond: {} lines dropped here: {} was not written fast enough]",
                self.dropped, self.file
            );
            if !self.send(note) {
                self.dropped += 1;
                return;
            }
            self.dropped = 0;
        }
        if !self.send(line) {
            self.dropped += 1;
        }
    }

    /// Waits until `line` fits in the queue (or the log file has failed):
    /// for a build, whose output is slowed down rather than cut. The build
    /// then blocks on its full pipe until `build.log` has caught up.
    async fn room_for(&self, line: &str) {
        let cost = line.len() + LINE_COST;
        while self.tx.as_ref().is_some_and(|tx| !tx.is_closed())
            && self.queued.load(Ordering::Relaxed) + cost > self.limit
            // A line larger than the whole queue waits for an empty one.
            && self.queued.load(Ordering::Relaxed) > 0
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Queues `line` if there is room; false when it does not fit. Once
    /// the log file has failed (`write_log` ended) lines are let go and
    /// not counted: batond's own log still gets a worker's lines.
    fn send(&mut self, line: String) -> bool {
        let Some(tx) = &self.tx else { return true };
        if tx.is_closed() {
            self.tx = None;
            return true;
        }
        let cost = line.len() + LINE_COST;
        if self.queued.fetch_add(cost, Ordering::Relaxed) + cost > self.limit {
            self.queued.fetch_sub(cost, Ordering::Relaxed);
            return false;
        }
        if tx.send(line).is_err() {
            self.queued.fetch_sub(cost, Ordering::Relaxed);
            self.tx = None;
        }
        true
    }
}

/// Where a rotated log goes: `worker.log` -> `worker.log.1`.
pub fn rotated(log: &Path) -> PathBuf {
    let mut older = log.to_path_buf().into_os_string();
    older.push(".1");
    PathBuf::from(older)
}

/// Size at which `build.log` is rotated (to `build.log.1`): a build's
/// errors are at its end.
pub const BUILD_LOG_MAX_BYTES: u64 = 16 << 20;

/// Size at which `worker.log` is rotated: it becomes `worker.log.1`
/// (replacing the one before) and a new `worker.log` starts. So a worker
/// that floods its output takes at most twice this much disk per
/// generation.
pub const WORKER_LOG_MAX_BYTES: u64 = 64 << 20;

/// After a log could not be rotated, the next try waits this long: every
/// line meanwhile is lost (and counted), not written past the size limit.
const ROTATE_RETRY: Duration = Duration::from_secs(10);

/// Writes the lines from `rx` to `file` (open for append at `path`),
/// rotating it before a line would take it past `max_bytes`.
///
/// A write that fails (a full disk) loses the lines it held, not the log:
/// the next lines are written as soon as the file takes them again, after
/// a line that says how many were lost and why. Returns, when lines were
/// lost, what to say of them in a failure's reason.
async fn write_log(
    file: std::io::Result<tokio::fs::File>,
    path: PathBuf,
    max_bytes: u64,
    mut rx: mpsc::UnboundedReceiver<String>,
    queued: Arc<AtomicUsize>,
) -> Option<Unwritten> {
    let file = match file {
        Ok(f) => f,
        Err(e) => {
            // No file: the lines are counted, as lines a full disk took.
            let mut lost = 0u64;
            while let Some(line) = rx.recv().await {
                queued.fetch_sub(line.len() + LINE_COST, Ordering::Relaxed);
                lost += 1;
            }
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            return (lost > 0).then(|| Unwritten {
                summary: format!("{lost} line(s) not written to {name}: {e}"),
                quote: None,
            });
        }
    };
    let mut log = RotatingLog {
        written: file.metadata().await.map_or(0, |m| m.len()),
        file,
        path,
        max_bytes,
        buf: Vec::new(),
        lost: 0,
        lost_total: 0,
        error: None,
        quote: None,
        rotate_failed: None,
        cut_line: false,
    };
    while let Some(line) = rx.recv().await {
        let mut next = Some(line);
        // Batch whatever else is already queued into one write.
        while let Some(line) = next.take() {
            log.push(&line).await;
            queued.fetch_sub(line.len() + LINE_COST, Ordering::Relaxed);
            if log.buf.len() < 1 << 20 {
                next = rx.try_recv().ok();
            }
        }
        log.write().await;
    }
    (log.lost_total > 0).then(|| {
        let name = log.path.file_name().unwrap_or_default().to_string_lossy();
        let why = log.error.map(|e| e.to_string()).unwrap_or_default();
        Unwritten {
            summary: format!("{} line(s) not written to {name}: {why}", log.lost_total),
            quote: log.quote.take(),
        }
    })
}

/// What a log lost (see [`write_log`]).
#[derive(Debug)]
struct Unwritten {
    /// How many lines, of which file, and why.
    summary: String,
    /// The line among them worth quoting (see [`quotable`]).
    quote: Option<String>,
}

/// `worker.log` (or `build.log`) with its write buffer and size, and what
/// it could not write.
struct RotatingLog {
    file: tokio::fs::File,
    path: PathBuf,
    max_bytes: u64,
    /// Bytes in the file.
    written: u64,
    /// Bytes not yet written.
    buf: Vec<u8>,
    /// Lines lost since the file last took a write, and in all.
    lost: u64,
    lost_total: u64,
    /// Why the last ones were lost.
    error: Option<std::io::Error>,
    /// The line worth quoting among those lost (see [`quotable`]).
    quote: Option<String>,
    /// When a rotation last failed, and why.
    rotate_failed: Option<(Instant, String)>,
    /// The last write stopped part of the way through a line.
    cut_line: bool,
}

impl RotatingLog {
    /// Adds a line, rotating first when it would not fit; a line that
    /// cannot be kept (the log cannot be rotated) is counted as lost.
    async fn push(&mut self, line: &str) {
        let held = self.written + self.buf.len() as u64;
        if held > 0 && held + line.len() as u64 + 1 > self.max_bytes {
            self.write().await;
            if let Err(e) = self.rotate().await {
                self.buf.extend_from_slice(line.as_bytes());
                self.buf.push(b'\n');
                self.lose_buffer(e);
                return;
            }
        }
        self.buf.extend_from_slice(line.as_bytes());
        self.buf.push(b'\n');
    }

    /// Writes the buffer, after a note of the lines lost before it if any;
    /// if the file does not take it, its lines are lost.
    async fn write(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let note = (self.lost > 0).then(|| {
            let why = self
                .error
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default();
            // After a write cut off in the middle of a line, the note
            // starts a line of its own.
            let start = if self.cut_line { "\n" } else { "" };
            format!(
                "{start}[batond: {} line(s) could not be written here: {why}]\n",
                self.lost
            )
        });
        let wrote = async {
            if let Some(n) = &note {
                self.file.write_all(n.as_bytes()).await?;
            }
            self.file.write_all(&self.buf).await?;
            // tokio's file writes in the background: an error (a full
            // disk) shows only here, on the write it belongs to.
            self.file.flush().await
        }
        .await;
        match wrote {
            Ok(()) => {
                self.written += (note.map_or(0, |n| n.len()) + self.buf.len()) as u64;
                self.buf.clear();
                self.cut_line = false;
                if self.lost > 0 {
                    tracing::info!(path = %self.path.display(), lost = self.lost, "the log is written again");
                    self.lost = 0;
                }
            }
            Err(e) => {
                // Part of it may be in the file (a disk that filled up
                // during the write): the file's size says.
                if let Ok(m) = self.file.metadata().await
                    && m.len() > self.written
                {
                    self.written = m.len();
                    self.cut_line = true;
                }
                self.lose_buffer(e);
            }
        }
    }

    /// Drops what the buffer holds, counting its lines and keeping the
    /// one worth quoting; warns once per spell of losses.
    fn lose_buffer(&mut self, e: std::io::Error) {
        let dropped = self.buf.iter().filter(|&&b| b == b'\n').count() as u64;
        if let Some(q) = quotable(&String::from_utf8_lossy(&self.buf))
            && (is_error_line(&q) || !self.quote.as_deref().is_some_and(is_error_line))
        {
            self.quote = Some(q);
        }
        self.buf.clear();
        if self.lost == 0 {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot write the log; its lines are lost until it can be written again");
        }
        self.lost += dropped;
        self.lost_total += dropped;
        self.error = Some(e);
    }

    /// `worker.log` becomes `worker.log.1` (replacing the one before). After
    /// a failure, not tried again for [`ROTATE_RETRY`].
    async fn rotate(&mut self) -> std::io::Result<()> {
        if let Some((at, why)) = &self.rotate_failed
            && at.elapsed() < ROTATE_RETRY
        {
            return Err(std::io::Error::other(why.clone()));
        }
        let older = rotated(&self.path);
        // The new file is made under another name and renamed over the
        // log, whose file stays on as `.1` (a second link): `worker.log`
        // is there at every moment, for `batonctl logs` and `tail -F`.
        // A name of its own: two instances of a generation write the same
        // log, each through its own writer, and may rotate at once.
        static FRESH: AtomicUsize = AtomicUsize::new(0);
        let mut fresh = self.path.clone().into_os_string();
        fresh.push(format!(".new{}", FRESH.fetch_add(1, Ordering::Relaxed)));
        let fresh = PathBuf::from(fresh);
        let rotated = async {
            let f = tokio::fs::File::create(&fresh).await?;
            match tokio::fs::remove_file(&older).await {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            if tokio::fs::hard_link(&self.path, &older).await.is_err() {
                // A file system without hard links: moved, then the new
                // one is put in its place.
                tokio::fs::rename(&self.path, &older).await?;
            }
            tokio::fs::rename(&fresh, &self.path).await?;
            Ok(f)
        }
        .await;
        if rotated.is_err() {
            let _ = tokio::fs::remove_file(&fresh).await;
        }
        match rotated {
            Ok(f) => {
                self.file = f;
                self.written = 0;
                self.rotate_failed = None;
                Ok(())
            }
            Err(e) => {
                let why = format!("it cannot be rotated: {e}");
                self.rotate_failed = Some((Instant::now(), why.clone()));
                Err(std::io::Error::new(e.kind(), why))
            }
        }
    }
}

/// `arg` with each placeholder in `values` replaced in one pass: what a
/// value brings in (a snapshot path with `{port}` in a folder name) is
/// never read for placeholders itself.
fn fill_placeholders(arg: &str, values: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    'scan: while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        for (name, value) in values {
            if let Some(after) = rest.strip_prefix(name) {
                out.push_str(value);
                rest = after;
                continue 'scan;
            }
        }
        out.push('{');
        rest = &rest[1..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workers_own_timestamp_is_left_out_of_batonds_log() {
        for (line, shown) in [
            (
                "2026-11-27T22:40:01.123456Z  INFO media_worker: call started",
                "INFO media_worker: call started",
            ),
            ("2026-11-27T22:40:01Z WARN x", "WARN x"),
            ("2026-11-27T22:40:01.5+01:00 hello", "hello"),
            ("2026-11-27t22:40:01-05:30\tthere", "there"),
            // Not a timestamp, or nothing after it: left as it is.
            (
                "2026-11-27 22:40:01 INFO spaced",
                "2026-11-27 22:40:01 INFO spaced",
            ),
            (
                "2026-11-27T22:40:01. no fraction",
                "2026-11-27T22:40:01. no fraction",
            ),
            ("2026-11-27T22:40:01 no zone", "2026-11-27T22:40:01 no zone"),
            (
                "2026-11-27T22:40:01+0100 short zone",
                "2026-11-27T22:40:01+0100 short zone",
            ),
            ("2026-11-27T22:40:01Z", "2026-11-27T22:40:01Z"),
            ("2026-11-27T22:40:01Z   ", "2026-11-27T22:40:01Z   "),
            (
                "{\"timestamp\":\"2026-11-27T22:40:01Z\"}",
                "{\"timestamp\":\"2026-11-27T22:40:01Z\"}",
            ),
            ("listening on fd 3", "listening on fd 3"),
            ("", ""),
            ("2026-1é-27T22:40:01Z x", "2026-1é-27T22:40:01Z x"),
        ] {
            assert_eq!(without_timestamp(line), shown, "{line:?}");
        }
    }

    /// An artifact written to while it is copied gives no snapshot (the
    /// copy would be neither build); one left alone copies whole, with
    /// its digest.
    #[test]
    fn an_artifact_written_during_its_copy_is_refused() {
        use std::io::Write;
        let dir = tempfile::tempdir().expect("tempdir");
        let artifact = dir.path().join("app");
        std::fs::write(&artifact, vec![7u8; 8 << 20]).expect("write");
        let snap = dir.path().join("snap");
        std::fs::create_dir(&snap).expect("mkdir");
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (dest, digest) =
            copy_and_hash(&artifact, &snap, &snap.join("tmp"), &stop).expect("a whole copy");
        assert_eq!(std::fs::read(&dest).expect("read").len(), 8 << 20);
        assert_eq!(digest, hex::encode(Sha256::digest(vec![7u8; 8 << 20])));
        // A writer appending all the time, from before the copy starts
        // until it ends.
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let writer = {
            let (done, artifact) = (done.clone(), artifact.clone());
            std::thread::spawn(move || {
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&artifact)
                    .expect("open");
                f.write_all(b"x").expect("append");
                let _ = ready_tx.send(());
                while !done.load(Ordering::Relaxed) {
                    f.write_all(b"x").expect("append");
                }
            })
        };
        ready_rx.recv().expect("writer started");
        let got = copy_and_hash(&artifact, &snap, &snap.join("tmp"), &stop);
        done.store(true, Ordering::Relaxed);
        writer.join().expect("writer");
        let err = got.expect_err("a torn copy");
        assert!(err.contains("was written to while it was copied"), "{err}");
        assert!(!snap.join("tmp").exists());
    }

    #[test]
    fn placeholders_are_filled_once() {
        let values = [("{artifact}", "/s/st{port}/gen-0001/w"), ("{port}", "8081")];
        assert_eq!(
            fill_placeholders("{artifact}", &values),
            "/s/st{port}/gen-0001/w"
        );
        assert_eq!(
            fill_placeholders("--listen=:{port} {x} {", &values),
            "--listen=:8081 {x} {"
        );
        assert_eq!(
            fill_placeholders("{{artifact}}", &values),
            "{/s/st{port}/gen-0001/w}"
        );
    }

    /// What `tail_lines` cuts from a file holding `text`.
    fn tail(text: &[u8], lines: usize, max_bytes: u64) -> Vec<u8> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        std::fs::write(&path, text).expect("write");
        let mut f = std::fs::File::open(&path).expect("open");
        let (start, end, _) = tail_lines(&mut f, lines, max_bytes).expect("tail");
        assert_eq!(end, text.len() as u64);
        text[usize::try_from(start).expect("start")..].to_vec()
    }

    #[test]
    fn the_tail_of_a_log_is_found_from_its_end() {
        assert_eq!(tail(b"a\nb\nc\n", 2, 1 << 20), b"b\nc\n");
        assert_eq!(tail(b"a\nb\nc", 2, 1 << 20), b"b\nc", "no final newline");
        assert_eq!(
            tail(b"a\nb\n", 5, 1 << 20),
            b"a\nb\n",
            "fewer lines than asked"
        );
        assert_eq!(tail(b"a\nb\n", 0, 1 << 20), b"");
        assert_eq!(tail(b"", 3, 1 << 20), b"");
        assert_eq!(tail(b"\n\n\n", 2, 1 << 20), b"\n\n", "empty lines count");
        // Lines longer than the 16 KiB it reads at a time.
        let long = |c: u8| {
            let mut l = vec![c; 40_000];
            l.push(b'\n');
            l
        };
        let text = [long(b'x'), long(b'y'), long(b'z')].concat();
        assert_eq!(tail(&text, 2, 1 << 20), [long(b'y'), long(b'z')].concat());
        // Never more than `max_bytes` back.
        assert_eq!(tail(&text, 3, 1000).len(), 1000);
    }

    #[tokio::test]
    async fn worker_output_that_is_not_utf8_or_has_no_newline_is_kept_in_bounded_lines() {
        let mut input = b"one\r\n\xff\xfebin\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', MAX_LINE + 10));
        input.extend_from_slice(b"\nlast, no newline");
        let lines = pumped(&input).await;
        assert_eq!(lines.len(), 5, "{lines:?}");
        assert_eq!(lines[0], "one");
        assert_eq!(lines[1], "\u{fffd}\u{fffd}bin");
        assert_eq!(lines[2].len(), MAX_LINE);
        assert_eq!(lines[3], "x".repeat(10));
        assert_eq!(lines[4], "last, no newline");
    }

    /// The lines `pump` makes of a worker's output `input`.
    async fn pumped(input: &[u8]) -> Vec<String> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        pump(
            input,
            LogQueue::new(tx, queued, LOG_QUEUE_BYTES, "worker.log"),
            Some((1, Arc::new(LastWords::default()))),
        )
        .await;
        let mut lines = Vec::new();
        while let Ok(l) = rx.try_recv() {
            lines.push(l);
        }
        lines
    }

    #[tokio::test]
    async fn a_long_line_is_split_between_characters_never_inside_one() {
        // "a" then two-byte characters: a 16 KiB piece ends mid-character.
        let line = format!("a{}", "é".repeat(10_000));
        let input = format!("{line}\nnext\n");
        let lines = pumped(input.as_bytes()).await;
        assert_eq!(
            lines.len(),
            3,
            "{:?}",
            lines.iter().map(String::len).collect::<Vec<_>>()
        );
        assert!(lines.iter().all(|l| !l.contains('\u{fffd}')));
        assert!(lines[0].len() <= MAX_LINE);
        assert_eq!(lines[..2].concat(), line);
        assert_eq!(lines[2], "next");
    }

    /// A log writer on `name` in `dir` (rotated at `max_bytes`) and its
    /// queue (`limit` bytes), as a worker's or a build's pump has them.
    async fn log_writer(
        dir: &Path,
        name: &'static str,
        max_bytes: u64,
        limit: usize,
    ) -> (
        PathBuf,
        LogQueue,
        tokio::task::JoinHandle<Option<Unwritten>>,
    ) {
        let path = dir.join(name);
        let file = tokio::fs::File::create(&path).await.expect("create");
        let (queue, writer) = LogQueue::spawn(Ok(file), path.clone(), max_bytes, limit, name);
        (path, queue, writer)
    }

    /// `worker.log` is there at every moment of a rotation: it is never
    /// moved away (a reader between the move and a new file's creation
    /// found none), only replaced by a rename onto it.
    #[tokio::test]
    async fn a_rotating_log_never_goes_missing() {
        use notify::{EventKind, RecursiveMode, Watcher, event::ModifyKind, event::RenameMode};
        let dir = tempfile::tempdir().expect("tempdir");
        let (events_tx, events) = std::sync::mpsc::channel();
        let mut watcher = notify::recommended_watcher(events_tx).expect("watcher");
        watcher
            .watch(dir.path(), RecursiveMode::NonRecursive)
            .expect("watch");
        let (path, mut q, writer) =
            log_writer(dir.path(), "worker.log", 1000, LOG_QUEUE_BYTES).await;
        for i in 0..100 {
            q.offer(format!("line {i:03} {}", "x".repeat(90)));
        }
        drop(q);
        writer.await.expect("writer");
        let mut rotations = 0;
        while let Ok(e) = events.recv_timeout(Duration::from_millis(500)) {
            let e = e.expect("event");
            let gone = match e.kind {
                EventKind::Remove(_) => e.paths.first() == Some(&path),
                EventKind::Modify(ModifyKind::Name(RenameMode::From | RenameMode::Both)) => {
                    e.paths.first() == Some(&path)
                }
                _ => false,
            };
            assert!(!gone, "worker.log went away: {e:?}");
            if matches!(e.kind, EventKind::Modify(ModifyKind::Name(_)))
                && e.paths.last() == Some(&path)
            {
                rotations += 1;
            }
        }
        assert!(rotations >= 5, "{rotations} rotations seen");
        let older = std::fs::read_to_string(dir.path().join("worker.log.1")).expect("worker.log.1");
        assert!(older.ends_with('\n') && !older.is_empty(), "{older}");
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("dir")
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().contains(".new"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    /// A build that writes faster than `build.log` is written waits for
    /// it: every line is kept (a worker's lines past the queue are dropped
    /// and counted instead; a worker is never held up).
    #[tokio::test]
    async fn a_builds_output_is_slowed_down_never_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Room for a few lines only.
        let (path, queue, writer) = log_writer(
            dir.path(),
            "build.log",
            BUILD_LOG_MAX_BYTES,
            4 * (LINE_COST + 12),
        )
        .await;
        let input: String = (0..2_000).map(|i| format!("line {i:05}\n")).collect();
        pump(input.as_bytes(), queue, None).await;
        assert!(writer.await.expect("writer").is_none(), "lines unwritten");
        let text = std::fs::read_to_string(&path).expect("build.log");
        assert!(!text.contains("[batond:"), "lines were dropped");
        assert_eq!(text.lines().count(), 2_000);
        assert_eq!(text.lines().last(), Some("line 01999"));
    }

    #[tokio::test]
    async fn worker_log_is_rotated_at_its_size_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, mut q, writer) =
            log_writer(dir.path(), "worker.log", 1000, LOG_QUEUE_BYTES).await;
        for i in 0..30 {
            q.offer(format!("line {i:03} {}", "x".repeat(90)));
        }
        assert_eq!(q.dropped, 0);
        drop(q);
        writer.await.expect("writer");
        let now = std::fs::read_to_string(&path).expect("worker.log");
        let older = std::fs::read_to_string(dir.path().join("worker.log.1")).expect("worker.log.1");
        assert!(
            now.len() <= 1000 && older.len() <= 1000,
            "{} {}",
            now.len(),
            older.len()
        );
        // The newest lines are in worker.log, the ones before in .1, none
        // torn.
        assert!(now.ends_with(&format!("line 029 {}\n", "x".repeat(90))));
        for text in [&now, &older] {
            assert!(text.lines().all(|l| l.len() == 99), "{text}");
        }
    }

    /// A log on a full disk (`/dev/full` refuses every write with ENOSPC)
    /// loses its lines, counted, and says so; the queue keeps draining,
    /// so the worker never blocks on it.
    #[tokio::test]
    async fn a_log_that_cannot_be_written_counts_what_it_lost() {
        let Ok(full) = std::fs::OpenOptions::new().append(true).open("/dev/full") else {
            return; // no /dev/full here
        };
        let (mut q, writer) = LogQueue::spawn(
            Ok(tokio::fs::File::from_std(full)),
            PathBuf::from("/dev/full"),
            1 << 20,
            LOG_QUEUE_BYTES,
            "build.log",
        );
        let queued = q.queued.clone();
        for i in 0..20 {
            q.offer(if i == 7 {
                "error: the one to quote".to_string()
            } else {
                format!("line {i}")
            });
            tokio::task::yield_now().await;
        }
        drop(q);
        let told = writer.await.expect("writer").expect("lines were lost");
        assert!(
            told.summary.starts_with("20 line(s) not written to full: ")
                && told.summary.contains("No space left"),
            "{told:?}"
        );
        assert_eq!(told.quote.as_deref(), Some("error: the one to quote"));
        assert_eq!(queued.load(Ordering::Relaxed), 0, "the queue drained");
    }

    /// A log that cannot be rotated (its folder was removed) loses the
    /// lines past its size limit, counted, instead of growing past it.
    #[tokio::test]
    async fn a_log_that_cannot_be_rotated_loses_what_does_not_fit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sub = dir.path().join("gen-0001");
        std::fs::create_dir(&sub).expect("mkdir");
        let path = sub.join("worker.log");
        let file = tokio::fs::File::create(&path).await.expect("create");
        let (mut q, writer) =
            LogQueue::spawn(Ok(file), path.clone(), 1000, LOG_QUEUE_BYTES, "worker.log");
        let queued = q.queued.clone();
        let line = |i: usize| format!("line {i:03} {}", "x".repeat(90));
        for i in 0..5 {
            q.offer(line(i));
        }
        for _ in 0..500 {
            if queued.load(Ordering::Relaxed) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        std::fs::remove_dir_all(&sub).expect("rm");
        for i in 5..30 {
            q.offer(line(i));
        }
        drop(q);
        let told = writer.await.expect("writer").expect("lines were lost");
        // 10 lines of 100 bytes fit; the 20 after them could not.
        assert!(
            told.summary
                .starts_with("20 line(s) not written to worker.log: ")
                && told.summary.contains("cannot be rotated"),
            "{told:?}"
        );
        assert_eq!(told.quote.as_deref(), Some(line(29).as_str()));
    }

    #[test]
    fn worker_lines_copied_to_the_daemon_log_are_limited_per_second() {
        let t0 = Instant::now();
        let mut b = Tokens::new(3, 3);
        let taken: Vec<_> = (0..5).map(|_| b.take(t0)).collect();
        assert_eq!(taken, [true, true, true, false, false]);
        // A third of a second later one more fits.
        let t1 = t0 + Duration::from_millis(340);
        assert!(b.take(t1));
        assert!(!b.take(t1));
        // Quiet for long: a full burst again, no more.
        let t2 = t1 + Duration::from_secs(60);
        let taken: Vec<_> = (0..4).map(|_| b.take(t2)).collect();
        assert_eq!(taken, [true, true, true, false]);
        // A burst of its own size, then its rate.
        let mut b = Tokens::new(10, 100);
        assert_eq!((0..150).filter(|_| b.take(t0)).count(), 100);
        let t3 = t0 + Duration::from_secs(2);
        assert_eq!((0..150).filter(|_| b.take(t3)).count(), 20);
    }

    fn build_quote_of(text: &str) -> Option<String> {
        let mut errors = BuildErrors::default();
        for line in text.lines() {
            errors.line(line);
        }
        errors.quote()
    }

    #[test]
    fn a_failed_builds_first_error_is_quoted_with_its_place() {
        let cargo = "   Compiling baton v0.1.0 (/src)
warning: unused variable: `error`
 --> src/a.rs:2:9
  |
2 |     let error: u32 = 5;
  |         ^^^^^ help: prefix it with an underscore: `_error`
error: expected `,`, found `+`
   --> src/worker/mod.rs:240:47
    |
240 |     info!(\"listening\" +++ ;
    |                       ^ expected `,`
error[E0425]: cannot find value `y` in this scope
 --> src/b.rs:3:1
error: could not compile `baton` (lib) due to 2 previous errors
";
        assert_eq!(
            build_quote_of(cargo).as_deref(),
            Some("error: expected `,`, found `+` at src/worker/mod.rs:240:47 (and 1 more error)")
        );
        // The first of many, however far back.
        let many: String = (1..=400)
            .map(|i| {
                format!(
                    "error[E0425]: number {i}\n --> src/x.rs:{i}:1\n{}\n",
                    "x".repeat(300)
                )
            })
            .collect();
        assert_eq!(
            build_quote_of(&many).as_deref(),
            Some("error[E0425]: number 1 at src/x.rs:1:1 (and 399 more errors)")
        );
        // No error line but the summary: the summary.
        assert_eq!(
            build_quote_of("x\nerror: could not compile `a`\nafter\n").as_deref(),
            Some("error: could not compile `a`")
        );
        // No error at all: the last line.
        assert_eq!(build_quote_of("a\nstopped\n").as_deref(), Some("stopped"));
        // gcc's shape names its place itself; make's summary is no error.
        assert_eq!(
            build_quote_of("cc -c x.c\nx.c:3:1: error: expected ';'\nmake: *** [all] Error 1\n")
                .as_deref(),
            Some("x.c:3:1: error: expected ';'")
        );
        // A line that only mentions the word is none.
        assert!(!is_build_error("2 |     let error: u32 = 5;"));
        assert!(!is_build_error("note: see error: below"));
        assert!(is_build_error("main.c:1: fatal error: x.h: No such file"));
    }

    #[test]
    fn skipped_lines_are_noted_once_a_second_at_most() {
        let t0 = Instant::now();
        let mut c = Copied::default();
        assert_eq!(c.line(t0, true), Some(0));
        assert_eq!(c.line(t0, false), None);
        assert_eq!(c.line(t0, false), None);
        // The next line copied says what was skipped...
        assert_eq!(c.line(t0, true), Some(2));
        // ...and in a flood, where lines are skipped between every two
        // copied ones, the next note waits a second and counts them all.
        let mut at = t0;
        for _ in 0..9 {
            at += Duration::from_millis(100);
            assert_eq!(c.line(at, false), None);
            assert_eq!(c.line(at, true), Some(0));
        }
        at += Duration::from_millis(100);
        assert_eq!(c.line(at, false), None);
        assert_eq!(c.line(at, true), Some(10));
    }

    #[tokio::test]
    async fn a_full_worker_log_queue_drops_lines_and_says_how_many() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        // Room for three one-byte lines, or a note and one line.
        let line = 1 + LINE_COST;
        let mut q = LogQueue::new(tx, queued.clone(), 3 * line + 10, "worker.log");
        for l in ["a", "b", "c", "d", "e"] {
            q.offer(l.to_string());
        }
        for l in ["a", "b", "c"] {
            assert_eq!(rx.recv().await.as_deref(), Some(l));
        }
        assert!(rx.try_recv().is_err(), "d and e did not fit");
        // What the writer does once it has taken the three lines.
        assert_eq!(queued.fetch_sub(3 * line, Ordering::Relaxed), 3 * line);
        q.offer("f".to_string());
        assert_eq!(
            rx.recv().await.as_deref(),
            Some("[batond: 2 lines dropped here: worker.log was not written fast enough]")
        );
        assert_eq!(rx.recv().await.as_deref(), Some("f"));
        // The file failed: lines are no longer queued, and nothing blocks.
        drop(rx);
        q.offer("g".to_string());
        assert!(q.tx.is_none());
        q.offer("h".to_string());
    }
}
