//! Child processes: spawned in their own process group, tied to the daemon's
//! life, stopped with SIGTERM then SIGKILL, always reaped.
//!
//! Two things a plain `Command` cannot do without `unsafe` code in the child
//! between fork and exec: set a parent-death signal and put the listening
//! socket at fd 3 with `LISTEN_PID` equal to the child's own pid. Baton does
//! both in an exec shim instead: the daemon runs its own executable with
//! [`SHIM_ARG`]; the shim (already the child process) sets
//! `PR_SET_PDEATHSIG`, checks that its parent is still the daemon, moves the
//! socket it received as stdin to fd 3, and `exec`s the real command with
//! `LISTEN_FDS=1` and `LISTEN_PID` set to its own pid (which `exec` keeps).
//! std's `exec` also resets the signal state (no signal blocked, SIGPIPE
//! not ignored), and the shim gives any other signal batond was started
//! with ignored its default action back, as systemd does for a service.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// The first argument that turns `batond` into the exec shim.
pub const SHIM_ARG: &str = "__baton-exec";

/// Environment the daemon never passes on: it belongs to the daemon's own
/// systemd unit (socket activation, notify socket, watchdog).
pub const PRIVATE_ENV: &[&str] = &[
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// Environment `batond` sets for each worker it hands a socket to, as that
/// worker needs it; never inherited from `batond`'s own environment (a
/// `PORT` of batond's would send a Unix-socket worker to the wrong port).
pub const WORKER_ENV: &[&str] = &[
    "PORT",
    "BATON_SOCKET",
    "BATON_SIGNATURE",
    "BATON_GENERATION",
];

/// Why a child could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The command list was empty.
    #[error("empty command")]
    Empty,
    /// `fork`/`exec` of the shim failed.
    #[error("cannot start `{program}`: {source}")]
    Io {
        /// The program that was being started.
        program: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// What to start.
#[derive(Debug)]
pub struct Spec {
    /// argv; `argv[0]` is looked up in `PATH` by the shim.
    pub argv: Vec<String>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// Working folder.
    pub cwd: PathBuf,
    /// A listening socket to hand over as fd 3 (`LISTEN_FDS=1`).
    pub listener: Option<OwnedFd>,
    /// Where stdout goes.
    pub stdout: Stdio,
    /// Where stderr goes.
    pub stderr: Stdio,
    /// Added to batond's nice value for the program (0: none).
    pub nice: u8,
}

/// A running child that leads its own process group.
#[derive(Debug)]
pub struct Child {
    inner: tokio::process::Child,
    pid: i32,
}

impl Child {
    /// Starts `spec` through the exec shim in a new process group.
    ///
    /// # Errors
    /// [`SpawnError`] when the command is empty or cannot be started.
    pub fn spawn(shim: &Path, spec: Spec) -> Result<Child, SpawnError> {
        if spec.argv.is_empty() {
            return Err(SpawnError::Empty);
        }
        let mut cmd = tokio::process::Command::new(shim);
        cmd.arg(SHIM_ARG)
            .arg(std::process::id().to_string())
            .arg(if spec.listener.is_some() { "fd" } else { "-" })
            .arg(spec.nice.to_string())
            .arg("--")
            .args(&spec.argv)
            .current_dir(&spec.cwd)
            .process_group(0)
            .stdout(spec.stdout)
            .stderr(spec.stderr)
            .kill_on_drop(false);
        for k in PRIVATE_ENV {
            cmd.env_remove(k);
        }
        if spec.listener.is_some() {
            for k in WORKER_ENV {
                cmd.env_remove(k);
            }
        }
        cmd.envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        match spec.listener {
            Some(fd) => cmd.stdin(Stdio::from(fd)),
            None => cmd.stdin(Stdio::null()),
        };
        let inner = cmd.spawn().map_err(|source| SpawnError::Io {
            program: spec.argv[0].clone(),
            source,
        })?;
        let pid = inner
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .unwrap_or_default();
        Ok(Child { inner, pid })
    }

    /// The child's pid, which is also its process group id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Takes the child's stdout pipe, if it was piped.
    pub fn take_stdout(&mut self) -> Option<tokio::process::ChildStdout> {
        self.inner.stdout.take()
    }

    /// Takes the child's stderr pipe, if it was piped.
    pub fn take_stderr(&mut self) -> Option<tokio::process::ChildStderr> {
        self.inner.stderr.take()
    }

    /// Waits for the child to exit and reaps it; then kills whatever is left
    /// of its process group.
    ///
    /// # Errors
    /// The I/O error of `waitpid`.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        let status = self.inner.wait().await?;
        signal_group(self.pid, Signal::SIGKILL);
        Ok(status)
    }

    /// Waits for the child to exit and reaps it; the rest of its group is
    /// not touched (see [`end_group_by`]).
    ///
    /// # Errors
    /// The I/O error of `waitpid`.
    pub async fn wait_leader(&mut self) -> std::io::Result<ExitStatus> {
        self.inner.wait().await
    }

    /// The child's exit status if it has already exited (then reaped),
    /// without waiting. What is left of its group is not touched.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.inner.try_wait().ok().flatten()
    }

    /// Sends `sig` to the child's whole process group.
    pub fn signal(&self, sig: Signal) {
        signal_group(self.pid, sig);
    }
}

/// Sends `sig` to process group `pgid`, ignoring "no such group".
pub fn signal_group(pgid: i32, sig: Signal) {
    if pgid > 1 {
        let _ = killpg(Pid::from_raw(pgid), sig);
    }
}

/// How often a group that was sent SIGTERM is looked at to see whether
/// all of it has exited.
const GROUP_POLL: Duration = Duration::from_millis(50);

/// Whether process group `pgid` still has a live process. A zombie does
/// not count: it has exited, and waits only for its parent to reap it
/// (one that never does, or `batond` as PID 1 in a container, which the
/// orphans of a worker's group are given to).
fn group_alive(pgid: i32) -> bool {
    if pgid <= 1 || matches!(killpg(Pid::from_raw(pgid), None), Err(nix::Error::ESRCH)) {
        return false;
    }
    group_members(pgid).iter().any(|m| m.state != 'Z')
}

/// Waits until process group `pgid` has no live process or `deadline` has
/// passed; true when it has none.
async fn group_gone_by(pgid: i32, deadline: tokio::time::Instant) -> bool {
    loop {
        if !group_alive(pgid) {
            return true;
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return false;
        }
        tokio::time::sleep(GROUP_POLL.min(deadline - now)).await;
    }
}

/// Ends what is left of process group `pgid` once its leader has exited,
/// as systemd ends a unit's remaining processes: SIGTERM (unless a stop
/// sent it already: `term_sent`), then SIGKILL to those still there at
/// `deadline`. Returns whether SIGKILL was sent.
pub async fn end_group_by(pgid: i32, deadline: tokio::time::Instant, term_sent: bool) -> bool {
    if !group_alive(pgid) {
        return false;
    }
    if !term_sent {
        signal_group(pgid, Signal::SIGTERM);
    }
    if group_gone_by(pgid, deadline).await {
        return false;
    }
    signal_group(pgid, Signal::SIGKILL);
    true
}

/// The groups whose leader has exited and whose rest is being ended (see
/// [`end_group_by`]): `batond` waits for them before it exits, which would
/// otherwise leave them running.
pub fn ending_groups() -> &'static tokio_util::task::TaskTracker {
    static ENDING: std::sync::OnceLock<tokio_util::task::TaskTracker> = std::sync::OnceLock::new();
    ENDING.get_or_init(tokio_util::task::TaskTracker::new)
}

/// Stops a child's process group leader: SIGTERM to the whole group,
/// SIGKILL to it when the leader has not exited by `deadline`, then reaps
/// the leader. Returns its exit status and whether SIGKILL was sent. The
/// rest of the group is left to [`end_group_by`], with the same deadline.
pub async fn stop_leader(
    child: &mut Child,
    deadline: tokio::time::Instant,
) -> Option<(ExitStatus, bool)> {
    child.signal(Signal::SIGTERM);
    match tokio::time::timeout_at(deadline, child.inner.wait()).await {
        Ok(r) => r.ok().map(|s| (s, false)),
        Err(_) => {
            child.signal(Signal::SIGKILL);
            child.wait().await.ok().map(|s| (s, true))
        }
    }
}

/// Stops a child: SIGTERM to its group, SIGKILL after `grace`, then reaps.
/// The rest of the group has the same `grace`, counted from the SIGTERM,
/// whether the child itself exits at once or not (systemd's
/// `TimeoutStopSec` for a unit's processes). Returns the child's exit
/// status and whether SIGKILL was sent to it.
pub async fn stop(child: &mut Child, grace: Duration) -> Option<(ExitStatus, bool)> {
    let deadline = tokio::time::Instant::now() + grace;
    let stopped = stop_leader(child, deadline).await;
    end_group_by(child.pid, deadline, true).await;
    stopped
}

/// Whether a child that [`stop`] ended (`killed`: it sent SIGKILL) ended
/// because of it: it exited, or died of SIGTERM or of the SIGKILL sent. A
/// child that died of another signal meanwhile (a crash, a `kill -9` from
/// elsewhere, one that came just before the stop) was not stopped.
pub fn stopped_by_us(status: ExitStatus, killed: bool) -> bool {
    use std::os::unix::process::ExitStatusExt;
    match status.signal() {
        None => true,
        Some(s) if s == Signal::SIGTERM as i32 => true,
        Some(s) => killed && s == Signal::SIGKILL as i32,
    }
}

/// Describes an exit status the way an operator reads it.
pub fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        format!("code {code}")
    } else if let Some(sig) = status.signal() {
        match Signal::try_from(sig) {
            Ok(s) => format!("signal {}", s.as_str()),
            Err(_) => format!("signal {sig}"),
        }
    } else {
        status.to_string()
    }
}

/// The folder under the state dir that holds one [`GroupRecord`] per
/// process group the daemon has running (builds and workers).
pub const GROUPS_DIR: &str = "groups";
/// Where daemons before the `groups` folder recorded a running build.
const LEGACY_BUILD_RECORD: &str = "build.pgid";

/// A record of a running child's process group, kept as a file in the state
/// dir so that the next daemon can kill what is left of it after a `kill -9`
/// of this one: the child itself dies with the daemon (parent-death
/// signal), what it started in its group does not.
#[derive(Debug, Clone)]
pub struct GroupRecord {
    path: PathBuf,
}

impl GroupRecord {
    /// Records `pgid` (what it is, e.g. `worker of generation 3`) with its
    /// leader's start time and session, which tell a reused pid apart.
    pub fn write(state_dir: &Path, pgid: i32, what: &str) -> GroupRecord {
        let dir = state_dir.join(GROUPS_DIR);
        let path = dir.join(pgid.to_string());
        let session = nix::unistd::getsid(None).map_or(0, Pid::as_raw);
        let content = format!(
            "{pgid} {} {session} {what}\n",
            start_time(pgid).unwrap_or_default()
        );
        let written = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, content));
        if let Err(e) = written {
            // A half-written record is worse than none: it is ignored.
            let _ = std::fs::remove_file(&path);
            tracing::warn!(
                pgid,
                "cannot record the process group of the {what} in {}: {e}; if batond is killed, what the group leaves is not cleaned up at its next start",
                path.display()
            );
        }
        GroupRecord { path }
    }

    /// Removes the record: the group is gone.
    pub fn clear(self) {
        let _ = std::fs::remove_file(&self.path);
    }

    /// Kills every process group recorded in `state_dir` by a daemon that
    /// did not clean up after itself, and removes the records. Returns what
    /// was killed: the pgid and what it was.
    ///
    /// A group is killed when its leader is still the process recorded
    /// (same start time), or when the leader is gone and every member is
    /// one it could have left: in the daemon's session (the children's,
    /// unless they left it) and started after the leader. A pid is not
    /// handed out again while a process group of that number has members,
    /// so such a group is a reused one only if the recorded one died out
    /// and its number came round again, which the session and start times
    /// tell. A pid now used by another process is left alone, and named
    /// in what is returned beside the groups killed.
    pub fn reap_stale(state_dir: &Path) -> Reaped {
        let mut files = vec![state_dir.join(LEGACY_BUILD_RECORD)];
        if let Ok(dir) = std::fs::read_dir(state_dir.join(GROUPS_DIR)) {
            files.extend(dir.flatten().map(|e| e.path()));
        }
        let mut reaped = Reaped::default();
        for path in files {
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let _ = std::fs::remove_file(&path);
            let mut it = text.trim_end().splitn(4, ' ');
            let Some(pgid) = it.next().and_then(|p| p.parse::<i32>().ok()) else {
                tracing::warn!(
                    "ignored {}: not a process group record ({:?})",
                    path.display(),
                    text.chars().take(60).collect::<String>()
                );
                continue;
            };
            let started = it.next().and_then(|t| t.parse::<u64>().ok());
            let session = it.next().and_then(|t| t.parse::<i32>().ok());
            let what = it.next().unwrap_or("build").to_string();
            if pgid <= 1 {
                continue;
            }
            let ours = match start_time(pgid) {
                Some(now) => started == Some(now),
                None => match (started, session) {
                    (Some(started), Some(session)) => {
                        !Path::new(&format!("/proc/{pgid}")).exists()
                            && group_members(pgid)
                                .iter()
                                .all(|m| m.session == session && m.started >= started)
                    }
                    _ => false,
                },
            };
            // A leader that a running batond is the parent of belongs to
            // that daemon, not to one that died (its state dir's lock
            // was removed, and a second daemon started on the same dir).
            if let Some(owner) = live_daemon_parent(pgid) {
                tracing::warn!(
                    pgid,
                    "the {what} recorded in {} belongs to the running batond {owner}; left alone",
                    path.display()
                );
                continue;
            }
            if ours {
                if killpg(Pid::from_raw(pgid), Signal::SIGKILL).is_ok() {
                    reaped.killed.push((pgid, what));
                }
            } else if group_alive(pgid) {
                reaped.left.push((pgid, what));
            }
        }
        reaped
    }
}

/// What [`GroupRecord::reap_stale`] did with the records a daemon left:
/// each as its process group and what it was (`worker of generation 3`).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reaped {
    /// Groups killed: what was left of them.
    pub killed: Vec<(i32, String)>,
    /// Groups left alone: their number now belongs to other processes.
    pub left: Vec<(i32, String)>,
}

/// The start time of `pid` in clock ticks since boot (field 22 of
/// `/proc/PID/stat`).
fn start_time(pid: i32) -> Option<u64> {
    stat_of(pid).map(|s| s.started)
}

/// What `/proc/PID/stat` says of a process that matters here.
#[derive(Debug, Clone, Copy)]
struct Stat {
    /// `R`, `S`, `Z` (a zombie), ...
    state: char,
    ppid: i32,
    pgrp: i32,
    session: i32,
    started: u64,
}

fn stat_of(pid: i32) -> Option<Stat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command in parentheses: state, ppid, pgrp, session, ...
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
    Some(Stat {
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        pgrp: fields.get(2)?.parse().ok()?,
        session: fields.get(3)?.parse().ok()?,
        started: fields.get(19)?.parse().ok()?,
    })
}

/// The pid of the running `batond` (not this one) that `pid` is a child of,
/// if it is: a parent that holds a state dir's `batond.lock` open, under
/// whatever name it runs.
fn live_daemon_parent(pid: i32) -> Option<i32> {
    let ppid = stat_of(pid)?.ppid;
    let own = i32::try_from(std::process::id()).ok()?;
    if ppid < 1 || ppid == own {
        return None;
    }
    let holds_lock = open_files(u32::try_from(ppid).ok()?)
        .iter()
        .any(|(_, file)| file.ends_with("batond.lock"));
    holds_lock.then_some(ppid)
}

/// The files process `pid` has open: each descriptor's `/proc` link (which
/// reaches the open file itself, removed or not) and the path it names
/// (without the " (deleted)" of a removed one). Empty when `/proc` does
/// not show them (another user's process).
pub fn open_files(pid: u32) -> Vec<(PathBuf, PathBuf)> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    fds.flatten()
        .filter_map(|fd| {
            let target = std::fs::read_link(fd.path()).ok()?;
            let t = target.to_string_lossy();
            let named = PathBuf::from(t.strip_suffix(" (deleted)").unwrap_or(&t));
            Some((fd.path(), named))
        })
        .collect()
}

/// The processes in process group `pgid` now.
fn group_members(pgid: i32) -> Vec<Stat> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(stat_of)
        .filter(|s| s.pgrp == pgid)
        .collect()
}

// === the shim ===

/// Why the shim could not exec.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// The shim was called with the wrong arguments.
    #[error("usage: {SHIM_ARG} PARENT_PID fd|- NICE -- PROGRAM [ARGS...]")]
    Usage,
    /// The daemon died before the shim could tie itself to it.
    #[error("parent {0} is gone")]
    Orphan(i32),
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: &'static str,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// The program could not be executed.
    #[error("{}: {source}", program.display())]
    Exec {
        /// The program, as the command names it.
        program: PathBuf,
        /// Why not.
        #[source]
        source: std::io::Error,
    },
}

fn sys(what: &'static str) -> impl FnOnce(nix::Error) -> ShimError {
    move |source| ShimError::Sys { what, source }
}

/// Runs the shim: `args` are the arguments after [`SHIM_ARG`]. Only returns
/// on failure; on success the process image is replaced.
///
/// # Errors
/// [`ShimError`] when the arguments are wrong or a system call fails.
pub fn shim_exec(args: &[OsString]) -> Result<std::convert::Infallible, ShimError> {
    let [parent, fd_mode, nice, sep, argv @ ..] = args else {
        return Err(ShimError::Usage);
    };
    if sep != "--" || argv.is_empty() {
        return Err(ShimError::Usage);
    }
    let parent: i32 = parent
        .to_str()
        .and_then(|s| s.parse().ok())
        .ok_or(ShimError::Usage)?;
    let nice: i32 = nice
        .to_str()
        .and_then(|s| s.parse().ok())
        .ok_or(ShimError::Usage)?;
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(sys("prctl(PR_SET_PDEATHSIG)"))?;
    if nix::unistd::getppid().as_raw() != parent {
        return Err(ShimError::Orphan(parent));
    }
    // std's exec, not execvpe: it also gives the program the signal state
    // a fresh process expects, as systemd does for a service. This shim is
    // a Rust program, whose runtime ignores SIGPIPE; without the reset the
    // worker would inherit that (a shell pipeline in it would no longer
    // end when its reader does), and any blocked signals.
    default_ignored_signals();
    // Before the exec, so the program and all it starts inherit it. The
    // shim has one thread, and Linux keeps a nice value per thread.
    if nice != 0 {
        rustix::process::nice(nice).map_err(|e| ShimError::Sys {
            what: "nice",
            source: nix::Error::from_raw(e.raw_os_error()),
        })?;
    }
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]).env_clear();
    for (k, v) in std::env::vars_os() {
        if !PRIVATE_ENV.iter().any(|p| k == *p) {
            cmd.env(k, v);
        }
    }
    if fd_mode == "fd" {
        let stdin = std::io::stdin();
        let fd = nix::fcntl::fcntl(&stdin, nix::fcntl::FcntlArg::F_DUPFD(3))
            .map_err(sys("fcntl(F_DUPFD)"))?;
        if fd != 3 {
            return Err(ShimError::Sys {
                what: "listening socket did not land on fd 3",
                source: nix::Error::EBADF,
            });
        }
        cmd.stdin(std::process::Stdio::null())
            .env("LISTEN_FDS", "1")
            .env("LISTEN_PID", std::process::id().to_string())
            .env("LISTEN_FDNAMES", "http");
    }
    let source = cmd.exec();
    Err(ShimError::Exec {
        program: PathBuf::from(cmd.get_program()),
        source,
    })
}

/// Gives every signal this process ignores its default action back in the
/// program it `exec`s: batond started from a shell with `&` ignores SIGINT
/// and SIGQUIT, under `nohup` SIGHUP, and `exec` keeps an ignored signal
/// ignored. It resets a caught one to its default, though, so each ignored
/// signal gets a handler (signal-hook's, no unsafe code here) until the
/// `exec`. Best effort: a signal that cannot be caught stays as it is.
fn default_ignored_signals() {
    static CAUGHT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return;
    };
    let Some(ignored) = status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    else {
        return;
    };
    for bit in 0..64 {
        let sig = bit + 1;
        if ignored & (1 << bit) != 0 && !signal_hook::consts::FORBIDDEN.contains(&sig) {
            let _ = signal_hook::flag::register(sig, &CAUGHT);
        }
    }
}

/// Makes the daemon's start what systemd gives a service, whatever started
/// it: every descriptor it inherited above stderr (a shell's `exec 3>file`,
/// a test harness's pipes, a second socket from systemd) is closed at the
/// next `exec`, so none reaches a worker or a build (and fd 3 is free for
/// the worker's socket); and no signal is blocked, so SIGTERM, SIGINT and
/// SIGHUP reach it even when the program that started it had them blocked.
/// Call it first in `main`, before any thread exists (threads inherit the
/// mask) and before anything opens a descriptor meant to be passed on.
pub fn fresh_start() {
    close_fds::set_fds_cloexec(3, &[]);
    let _ = nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    );
}

/// Raises this process's soft limit on open files to its hard limit, as
/// nginx's `worker_rlimit_nofile` or Go's runtime do: every call through
/// the proxy holds two descriptors (the caller's and the worker's), and the
/// usual soft limit (1,024 under systemd) would refuse connections long
/// before 1,000 calls. Children inherit the raised limit. Returns the soft
/// limit before and after, or `None` when it was already the hard limit or
/// could not be read or set.
pub fn raise_fd_limit() -> Option<(u64, u64)> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft >= hard {
        return None;
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).ok()?;
    Some((soft, hard))
}

/// Whether `e` says batond itself ran short of a resource the system
/// gives back as others let go of it: descriptors (its own limit or the
/// system's) or kernel memory. Not the other side's doing: a connection
/// that fails so says nothing of the worker.
pub fn short_of_resources(e: &std::io::Error) -> bool {
    use nix::errno::Errno;
    e.raw_os_error().is_some_and(|n| {
        [Errno::EMFILE, Errno::ENFILE, Errno::ENOMEM, Errno::ENOBUFS].contains(&Errno::from_raw(n))
    })
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};

    use super::*;

    /// Whether `pid` runs (a zombie does not).
    fn running(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| Some(s[s.rfind(')')? + 2..].starts_with(|c| c != 'Z')))
            .unwrap_or(false)
    }

    /// A group whose leader is gone is killed only when its members can be
    /// the recorded group's: in the recorded session, started after the
    /// recorded leader.
    #[test]
    fn a_group_without_its_leader_is_killed_only_when_it_is_the_recorded_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        // The leader starts a member, records the group, then exits.
        let mut leader = Command::new("sh")
            .args(["-c", "sleep 30 & echo $!; read x"])
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("sh");
        let pgid = i32::try_from(leader.id()).expect("pid");
        let mut line = String::new();
        BufReader::new(leader.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("member pid");
        let member: i32 = line.trim().parse().expect("member pid");
        GroupRecord::write(dir.path(), pgid, "worker of generation 1");
        let record = dir.path().join(GROUPS_DIR).join(pgid.to_string());
        let written = std::fs::read_to_string(&record).expect("record");
        drop(leader.stdin.take());
        leader.wait().expect("leader exits");
        assert!(running(member) && !Path::new(&format!("/proc/{pgid}")).exists());
        // Another session: not the recorded group.
        let mut fields: Vec<&str> = written.splitn(4, ' ').collect();
        fields[2] = "1";
        std::fs::write(&record, fields.join(" ")).expect("write");
        let reaped = GroupRecord::reap_stale(dir.path());
        assert!(reaped.killed.is_empty(), "{reaped:?}");
        // ...and said to be left alone.
        assert_eq!(
            reaped.left,
            vec![(pgid, "worker of generation 1".to_string())]
        );
        assert!(running(member), "a group of another session was killed");
        // As recorded: killed.
        std::fs::write(&record, &written).expect("write");
        let reaped = GroupRecord::reap_stale(dir.path());
        assert_eq!(
            reaped.killed,
            vec![(pgid, "worker of generation 1".to_string())]
        );
        assert!(reaped.left.is_empty(), "{reaped:?}");
        let mut gone = false;
        for _ in 0..200 {
            if !running(member) {
                gone = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(gone, "the recorded group's member {member} lives on");
        assert!(!record.exists(), "the record is removed");
    }
}
