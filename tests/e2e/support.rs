//! Shared test support: a real `batond` in a temp dir, its control socket,
//! a small HTTP client, and bounded waits (never sleeps for readiness).

#![allow(dead_code)]

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton::control::api::Status;
use baton::control::client;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Patience for anything that involves starting processes.
pub const PATIENCE: Duration = Duration::from_secs(30);

pub const BATOND: &str = env!("CARGO_BIN_EXE_batond");
pub const BATONCTL: &str = env!("CARGO_BIN_EXE_batonctl");

/// The Python worker fixture.
pub fn pyworker_source() -> &'static str {
    include_str!("fixtures/pyworker.py")
}

/// A project folder for a daemon: `etc/baton.toml`, `src/`, `state/`.
pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    pub fn new() -> Project {
        let dir = tempfile::Builder::new()
            .prefix("baton-e2e-")
            .tempdir()
            .expect("tempdir");
        std::fs::create_dir_all(dir.path().join("etc")).expect("etc");
        std::fs::create_dir_all(dir.path().join("src")).expect("src");
        Project { dir }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, text: &str) {
        let p = self.path(rel);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        std::fs::write(p, text).expect("write");
    }

    /// Replaces `from` with `to` in a file, which must contain `from`.
    pub fn edit(&self, rel: &str, from: &str, to: &str) {
        let text = read(&self.path(rel));
        assert!(text.contains(from), "{rel} has no `{from}`");
        self.write(rel, &text.replacen(from, to, 1));
    }

    pub fn append(&self, rel: &str, text: &str) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.path(rel))
            .expect("open for append");
        f.write_all(text.as_bytes()).expect("append");
    }

    /// A project whose worker is the Python fixture in `env` mode, with no
    /// build step (the script is the artifact).
    pub fn python(extra_worker: &str, extra: &str) -> Project {
        let p = Project::new();
        p.write("src/pyworker.py", pyworker_source());
        p.write(
            "etc/baton.toml",
            &format!(
                r#"[daemon]
root = ".."
listen = "127.0.0.1:0"
state_dir = "state"
hold_timeout_ms = 5000
shutdown_timeout_s = 5

[watch]
paths = ["src"]
debounce_ms = 100

[build]
command = []
artifact = "src/pyworker.py"

[worker]
command = ["python3", "{{artifact}}"]
signature = "env"
start_timeout_s = 10
health_interval_ms = 300
drain_timeout_s = 10
stop_timeout_s = 2
{extra_worker}
{extra}
"#
            ),
        );
        p
    }
}

/// A running `batond`.
pub struct Daemon {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    log: Arc<Mutex<String>>,
}

impl Daemon {
    /// Starts `batond -c etc/baton.toml` in `project` and waits until it
    /// says where it listens.
    pub async fn start(project: &Project) -> Daemon {
        Self::start_with(project, &[]).await
    }

    pub async fn start_with(project: &Project, args: &[&str]) -> Daemon {
        Self::start_env(project, args, &[]).await
    }

    pub async fn start_env(project: &Project, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let mut child = tokio::process::Command::new(BATOND)
            .arg("--config")
            .arg(project.path("etc/baton.toml"))
            .args(args)
            .envs(env.iter().copied())
            .env("BATON_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn batond");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let log = log.clone();
            tokio::spawn(async move {
                let mut tx = Some(tx);
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(rest) = line.split("batond listening on ").nth(1)
                        && let Some(tx) = tx.take()
                    {
                        let addr = rest.split(';').next().unwrap_or("").trim().to_string();
                        let _ = tx.send(addr);
                    }
                    let mut l = log.lock().expect("log lock");
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        let addr: SocketAddr = match tokio::time::timeout(PATIENCE, rx).await {
            Ok(Ok(a)) => a.parse().expect("listen address"),
            _ => panic!(
                "batond did not report its address; log:\n{}",
                log.lock().expect("log")
            ),
        };
        Daemon {
            child,
            addr,
            socket: project.path("state/control.sock"),
            state_dir: project.path("state"),
            log,
        }
    }

    /// Starts `batond` with `stderr` as given (not read by the test) and
    /// waits until its control socket answers; the address comes from the
    /// status. [`Daemon::log`] is empty.
    pub async fn start_stderr(project: &Project, stderr: Stdio) -> Daemon {
        Self::start_wrapped(project, &[], stderr).await
    }

    /// As [`Daemon::start_stderr`], with batond run by `wrapper` (a program
    /// and its arguments that exec it, such as `prlimit`).
    pub async fn start_wrapped(project: &Project, wrapper: &[&str], stderr: Stdio) -> Daemon {
        let (program, before) = match wrapper.split_first() {
            Some((p, rest)) => (*p, rest.iter().copied().chain([BATOND]).collect()),
            None => (BATOND, Vec::new()),
        };
        let child = tokio::process::Command::new(program)
            .args(before)
            .arg("--config")
            .arg(project.path("etc/baton.toml"))
            .env("BATON_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn batond");
        let socket = project.path("state/control.sock");
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let listen = loop {
            if let Ok(Ok((StatusCode::OK, body))) = tokio::time::timeout(
                Duration::from_secs(5),
                client::call_text(&socket, Method::GET, "/v1/status"),
            )
            .await
            {
                let s: Status = serde_json::from_str(&body).expect("status json");
                break s.listen;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "batond's control socket did not answer"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        Daemon {
            child,
            addr: listen.parse().expect("listen address"),
            socket,
            state_dir: project.path("state"),
            log: Arc::default(),
        }
    }

    /// Whether batond's log shows `needle` within `PATIENCE` (its stderr
    /// is read by a task of its own, a moment behind).
    pub async fn log_shows(&self, needle: &str) -> bool {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while !self.log().contains(needle) {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        true
    }

    /// The first line of batond's log that contains `needle`, waited for
    /// as `log_shows` does; panics with the log when none comes.
    pub async fn log_line(&self, needle: &str) -> String {
        assert!(
            self.log_shows(needle).await,
            "no {needle:?} in:\n{}",
            self.log()
        );
        self.log()
            .lines()
            .find(|l| l.contains(needle))
            .expect("shown")
            .to_string()
    }

    pub fn log(&self) -> String {
        self.log.lock().expect("log lock").clone()
    }

    pub async fn status(&self) -> Status {
        let (code, body) = tokio::time::timeout(
            PATIENCE,
            client::call_text(&self.socket, Method::GET, "/v1/status"),
        )
        .await
        .expect("batond did not answer a status call")
        .expect("status call");
        assert_eq!(code, StatusCode::OK, "{body}");
        serde_json::from_str(&body).expect("status json")
    }

    /// Polls the status until `pred` holds (bounded by `PATIENCE`).
    pub async fn wait_for(&self, what: &str, pred: impl Fn(&Status) -> bool) -> Status {
        self.wait_for_long(what, PATIENCE, pred).await
    }

    /// Polls the status until `pred` holds, bounded by `patience`.
    pub async fn wait_for_long(
        &self,
        what: &str,
        patience: Duration,
        pred: impl Fn(&Status) -> bool,
    ) -> Status {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let s = self.status().await;
            if pred(&s) {
                return s;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; status:\n{}\nlog:\n{}",
                    serde_json::to_string_pretty(&s).unwrap_or_default(),
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until generation `g` is active.
    pub async fn wait_active(&self, g: u64) -> Status {
        self.wait_for(&format!("generation {g} active"), |s| {
            s.active
                .as_ref()
                .is_some_and(|a| a.id == g && a.state == baton::control::api::GenState::Active)
                && s.candidate.is_none()
        })
        .await
    }

    /// Waits until generation `g` is in the history with `state`.
    /// The pid of the active worker once generation `g` is active.
    pub async fn active_pid(&self, g: u64) -> u32 {
        self.wait_active(g)
            .await
            .active
            .and_then(|a| a.pid)
            .expect("the active worker's pid")
    }

    pub async fn wait_history(&self, g: u64, state: &str) -> baton::control::api::GenerationInfo {
        let s = self
            .wait_for(&format!("generation {g} {state}"), |s| {
                s.history
                    .iter()
                    .any(|h| h.id == g && h.state.as_str() == state)
            })
            .await;
        s.history
            .into_iter()
            .find(|h| h.id == g)
            .expect("generation in history")
    }

    pub async fn get(&self, path: &str) -> (StatusCode, HeaderMap, String) {
        http_get(self.addr, path).await
    }

    pub async fn ctl(&self, args: &[&str]) -> std::process::Output {
        batonctl([OsStr::new("--socket"), self.socket.as_os_str()], args).await
    }

    /// `batonctl deploy --wait`, which must succeed.
    pub async fn deploy(&self) {
        let out = self.ctl(&["deploy", "--wait"]).await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// SIGTERM and wait for a clean exit.
    pub async fn stop(mut self) -> std::process::ExitStatus {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("batond did not stop")
            .expect("wait")
    }
}

/// One HTTP/1.1 GET on a fresh connection.
pub async fn http_get(addr: SocketAddr, path: &str) -> (StatusCode, HeaderMap, String) {
    tokio::time::timeout(PATIENCE, async {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let req = Request::get(path)
            .header(http::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())
            .expect("request");
        let resp = send.send_request(req).await.expect("response");
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        (
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&body).into_owned(),
        )
    })
    .await
    .expect("GET timed out")
}

/// One client connection to batond, kept alive across requests: all of
/// them are served by the same front thread, and so may use the same
/// worker connections (each front thread keeps its own idle ones).
pub struct KeepAlive {
    addr: SocketAddr,
    send: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl KeepAlive {
    pub async fn connect(addr: SocketAddr) -> KeepAlive {
        let stream = tokio::time::timeout(PATIENCE, tokio::net::TcpStream::connect(addr))
            .await
            .expect("connect timed out")
            .expect("connect");
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        KeepAlive { addr, send }
    }

    /// Sends a request with `body` (none for an empty one) and reads the
    /// whole answer.
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        body: &'static [u8],
    ) -> (StatusCode, HeaderMap, String) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, self.addr.to_string())
            .body(Full::new(Bytes::from_static(body)))
            .expect("request");
        tokio::time::timeout(PATIENCE, async {
            self.send.ready().await.expect("connection kept open");
            let resp = self.send.send_request(req).await.expect("response");
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.expect("body").to_bytes();
            (
                parts.status,
                parts.headers,
                String::from_utf8_lossy(&body).into_owned(),
            )
        })
        .await
        .expect("request timed out")
    }

    /// `/whoami`'s answer.
    pub async fn whoami(&mut self) -> serde_json::Value {
        let (code, _, body) = self.request(Method::GET, "/whoami", b"").await;
        assert_eq!(code, StatusCode::OK, "{body}");
        serde_json::from_str(&body).expect("whoami json")
    }
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Waits until `pid` is gone (bounded).
/// Kills `pid` with SIGKILL (a crash, as the kernel would deliver it).
pub fn sigkill(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
}

/// Runs a second `batond` on `project`'s config (its own listener and
/// control socket `socket`) that is expected to refuse to start; its
/// output.
pub async fn second_batond(project: &Project, socket: &Path) -> std::process::Output {
    tokio::time::timeout(
        PATIENCE,
        tokio::process::Command::new(BATOND)
            .arg("--config")
            .arg(project.path("etc/baton.toml"))
            .args(["--listen", "127.0.0.1:0", "--control-socket"])
            .arg(socket)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the second batond did not exit")
    .expect("run batond")
}

/// `batonctl` with `before` (how it finds the daemon) and then `args`,
/// within `PATIENCE`.
pub async fn batonctl<'a>(
    before: impl IntoIterator<Item = &'a OsStr>,
    args: &[&str],
) -> std::process::Output {
    tokio::time::timeout(
        PATIENCE,
        tokio::process::Command::new(BATONCTL)
            .args(before)
            .args(args)
            .output(),
    )
    .await
    .expect("batonctl timed out")
    .expect("batonctl runs")
}

pub async fn wait_gone(pid: u32) -> bool {
    for _ in 0..600 {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// The `generation` a pyworker reports on `/whoami`.
pub async fn whoami(addr: SocketAddr) -> (u64, u32, serde_json::Value) {
    let (code, _, body) = http_get(addr, "/whoami").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("whoami json");
    let g = v["generation"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("generation");
    let pid = v["pid"].as_u64().expect("pid") as u32;
    (g, pid, v)
}

/// `batond --check` on the project's `etc/baton.toml`.
pub fn batond_check(project: &Project) -> std::process::Output {
    std::process::Command::new(BATOND)
        .args(["--check", "--config"])
        .arg(project.path("etc/baton.toml"))
        .output()
        .expect("run batond --check")
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Whether processes here may use real-time scheduling (root,
/// `CAP_SYS_NICE` or an `RLIMIT_RTPRIO` of at least 10).
pub fn realtime_allowed() -> bool {
    std::process::Command::new("chrt")
        .args(["--fifo", "10", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Each thread of `pid`: its name, whether it is `SCHED_FIFO`, and its
/// real-time priority.
pub fn thread_policies(pid: u32) -> Vec<(String, bool, u32)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let name = read(&entry.path().join("comm")).trim_end().to_string();
        if let Ok(p) = baton::sched::policy_of(pid, tid) {
            out.push((name, p.fifo, u32::from(p.priority)));
        }
    }
    out
}

/// Each thread of `pid`: its name and the CPUs it may run on (its
/// `Cpus_allowed_list`), the main thread first.
pub fn thread_cpus(pid: u32) -> Vec<(String, Vec<usize>)> {
    let mut tids: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|t| t.parse().ok()))
                .collect()
        })
        .unwrap_or_default();
    tids.sort_unstable_by_key(|&t| (t != pid, t));
    let mut out = Vec::new();
    for tid in tids {
        let dir = format!("/proc/{pid}/task/{tid}");
        let name = read(Path::new(&format!("{dir}/comm")))
            .trim_end()
            .to_string();
        let status = read(Path::new(&format!("{dir}/status")));
        let Some(list) = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        else {
            continue;
        };
        let mut cpus = Vec::new();
        for part in list.trim().split(',') {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
                cpus.extend(a..=b);
            }
        }
        out.push((name, cpus));
    }
    out
}

/// Sends `request` as written on a new connection and reads until the
/// server closes it (bounded).
pub async fn raw_request(addr: SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tokio::time::timeout(PATIENCE, async {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(request.as_bytes()).await.expect("write");
        let mut out = Vec::new();
        // What the server sent before it closed: a server that refuses a
        // request it has not read in full may reset the connection after
        // its answer.
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
    .expect("raw request timed out")
}

/// Reads the pipe `read_end` until `needle` shows up in what came through
/// (true), or the pipe ends or `PATIENCE` passes (false). On a thread of
/// its own: the read blocks.
pub async fn pipe_shows(read_end: std::os::fd::OwnedFd, needle: &'static str) -> bool {
    use std::io::Read;
    let reader = std::thread::spawn(move || {
        let mut f = std::fs::File::from(read_end);
        let mut seen = Vec::new();
        let mut buf = [0u8; 1 << 16];
        while let Ok(n) = f.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&seen).contains(needle) {
                return true;
            }
        }
        false
    });
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !reader.is_finished() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    reader.is_finished() && reader.join().unwrap_or(false)
}

/// Starts `program --config cfg` on `listener`, handed over as fd 3 with
/// `LISTEN_FDS=1` and `LISTEN_PID` by batond's exec shim (what batond does
/// for a worker, and systemd's socket activation for batond): the address
/// is known without reading the log. With `envs`, stderr to `stderr`.
pub fn spawn_on_listener(
    program: &str,
    cfg: &Path,
    listener: std::net::TcpListener,
    envs: &[(&str, &str)],
    stderr: Stdio,
) -> tokio::process::Child {
    tokio::process::Command::new(BATOND)
        .arg(baton::process::SHIM_ARG)
        .arg(std::process::id().to_string())
        .arg("fd")
        .arg("0")
        .arg("--")
        .arg(program)
        .arg("--config")
        .arg(cfg)
        .envs(envs.iter().copied())
        .env_remove("BATON_SOCKET")
        .env_remove("BATON_SIGNATURE")
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(listener)))
        .stdout(Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {program}: {e}"))
}
