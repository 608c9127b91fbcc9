//! `batond` supervising the real `media-worker` in `artifact` mode: calls
//! pinned across a cutover, drain timeout, a stale binary rejected, and a
//! real `cargo build` after a source edit.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::support::*;

pub const MEDIA_WORKER: &str = env!("CARGO_BIN_EXE_media-worker");

const WORKER_TOML: &str = r#"bind_address = "127.0.0.1"
greeting_text = "Hello from the test."
data_dir = "../data"
tts = "tone"
ping_interval_ms = 500
shutdown_grace_ms = 2000
"#;

/// A project whose "build" copies the prebuilt media-worker and appends a
/// few random bytes, which changes its digest like a real rebuild would.
pub fn media_project(drain_timeout_s: u64) -> Project {
    let p = Project::new();
    p.write("src/main.rs", "// the worker's source (watched)\n");
    p.write("etc/media-worker.toml", WORKER_TOML);
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
paths = ["src", "etc/media-worker.toml"]
debounce_ms = 100

[build]
command = ["sh", "-c", "mkdir -p build && cp '{MEDIA_WORKER}' build/mw.tmp && head -c 32 /dev/urandom >> build/mw.tmp && mv build/mw.tmp build/media-worker"]
artifact = "build/media-worker"

[worker]
command = ["{{artifact}}", "--config", "etc/media-worker.toml"]
signature = "artifact"
start_timeout_s = 20
health_interval_ms = 500
drain_timeout_s = {drain_timeout_s}
stop_timeout_s = 5
"#
        ),
    );
    p
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a Media Streams call through batond, offering the subprotocol, and
/// sends `connected` + `start`. Returns the socket and the 101's headers.
pub async fn open_call(addr: std::net::SocketAddr, call: &str) -> (Ws, http::HeaderMap) {
    let mut req = format!("ws://{addr}/ws/twilio-media")
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "sec-websocket-protocol",
        http::HeaderValue::from_static("audio.twilio.com"),
    );
    let (mut ws, resp) = tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(req))
        .await
        .expect("handshake timed out")
        .expect("handshake");
    let headers = resp.headers().clone();
    let stream_sid = format!("MZ{call}");
    let msgs = [
        serde_json::json!({"event":"connected","protocol":"Call","version":"1.0.0"}),
        serde_json::json!({"event":"start","sequenceNumber":"1","streamSid":stream_sid,
            "start":{"accountSid":"AC1","streamSid":stream_sid,"callSid":format!("CA{call}"),
            "tracks":["inbound"],"customParameters":{},
            "mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}}),
    ];
    for m in msgs {
        ws.send(Message::text(m.to_string())).await.expect("send");
    }
    (ws, headers)
}

/// Reads until a text message with `event == want` arrives (bounded).
pub async fn recv_event(ws: &mut Ws, want: &str) -> serde_json::Value {
    tokio::time::timeout(PATIENCE, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    let v: serde_json::Value = serde_json::from_str(&t).expect("json");
                    if v["event"] == want {
                        return v;
                    }
                }
                Some(Ok(_)) => {}
                other => panic!("call ended while waiting for {want}: {other:?}"),
            }
        }
    })
    .await
    .expect("timed out waiting for an event")
}

/// Sends a ping through the proxy and waits for the worker's pong.
pub async fn ping_pong(ws: &mut Ws) {
    ws.send(Message::Ping(b"still there?".to_vec().into()))
        .await
        .expect("ping");
    tokio::time::timeout(PATIENCE, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Pong(p))) if &p[..] == b"still there?" => return,
                Some(Ok(_)) => {}
                other => panic!("call ended while waiting for pong: {other:?}"),
            }
        }
    })
    .await
    .expect("no pong");
}

async fn version_pid(addr: std::net::SocketAddr) -> u64 {
    let (code, _, body) = http_get(addr, "/version").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    v["pid"].as_u64().expect("pid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_stays_on_its_worker_across_a_cutover_then_the_old_one_stops() {
    let p = media_project(60);
    let d = Daemon::start(&p).await;
    let s = d.wait_active(1).await;
    let g1 = s.active.expect("active");
    let (mut ws, headers) = open_call(d.addr, "1").await;
    assert_eq!(headers["sec-websocket-protocol"], "audio.twilio.com");
    assert_eq!(
        headers["x-app-signature"].to_str().ok(),
        g1.signature.as_deref(),
        "the 101 carries the worker's signature"
    );
    // The greeting arrives as media.
    let m = recv_event(&mut ws, "media").await;
    assert_eq!(m["streamSid"], "MZ1");

    p.append("src/main.rs", "// v2\n");
    let s = d.wait_active(2).await;
    let draining = s.draining.first().expect("gen 1 draining");
    assert_eq!(draining.id, 1);
    assert_eq!(draining.connections, 1, "the call is pinned to gen 1");
    // New requests reach the new worker; the call still talks to the old one.
    let new_pid = version_pid(d.addr).await;
    assert_eq!(Some(new_pid as u32), s.active.as_ref().and_then(|a| a.pid));
    ping_pong(&mut ws).await;
    assert!(alive(g1.pid.expect("pid")));
    // Hang up: the old generation stops.
    ws.close(None).await.expect("close");
    drop(ws);
    d.wait_history(1, "stopped").await;
    assert!(wait_gone(g1.pid.expect("pid")).await);
    assert!(d.log_shows("stopped after draining").await);
}

/// The environment a process started with.
fn environ(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .expect("environ")
        .split(|b| *b == 0)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}

/// `worker.socket = "port"`: a worker that binds `$PORT` itself (no
/// `LISTEN_FDS`) starts, serves and is cut over like any other; its port
/// stays reserved while it runs and is free once it is gone. With the
/// default `tcp`, the same worker finds the port taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_binds_its_port_itself_runs_with_socket_port() {
    let p = Project::python("socket = \"port\"", "");
    let d = Daemon::start(&p).await;
    let s = d.wait_active(1).await;
    let g1 = s.active.expect("active");
    let port1 = g1.port.expect("a port");
    let env = environ(g1.pid.expect("pid"));
    assert!(env.contains(&format!("PORT={port1}")), "{env:?}");
    assert!(!env.iter().any(|v| v.starts_with("LISTEN_FDS=")), "{env:?}");
    assert!(
        d.log_shows("bound 127.0.0.1").await,
        "the worker bound it: {}",
        d.log()
    );
    assert_eq!(whoami(d.addr).await.0, 1);
    // Nobody else may have it while the worker runs.
    assert!(std::net::TcpListener::bind(("127.0.0.1", port1)).is_err());
    p.append("src/pyworker.py", "\n# v2\n");
    let s = d.wait_active(2).await;
    assert_ne!(s.active.and_then(|a| a.port), Some(port1));
    assert_eq!(whoami(d.addr).await.0, 2);
    d.wait_history(1, "stopped").await;
    let mut free = false;
    for _ in 0..100 {
        if std::net::TcpListener::bind(("127.0.0.1", port1)).is_ok() {
            free = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(free, "port {port1} still held after its worker stopped");
    // The same worker made to ignore the socket it is given, under `tcp`:
    // the port is taken, and the deploy says so.
    let cfg = read(&p.path("etc/baton.toml"))
        .replace("socket = \"port\"", "socket = \"tcp\"")
        .replace(
            "command = [\"python3\", \"{artifact}\"]",
            "command = [\"env\", \"-u\", \"LISTEN_FDS\", \"python3\", \"{artifact}\"]",
        );
    p.write("etc/baton.toml", &cfg);
    let s = d
        .wait_for("the reload's deploy rejected", |s| {
            s.history
                .iter()
                .any(|h| h.id > 2 && h.state == baton::control::api::GenState::Rejected)
        })
        .await;
    let g = s.history.iter().find(|h| h.id > 2).expect("rejected");
    let why = g.reason.clone().unwrap_or_default();
    assert!(why.contains("Address already in use"), "{why}");
    assert_eq!(whoami(d.addr).await.0, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_on_a_unix_socket_serves_calls_across_a_cutover() {
    use std::os::unix::fs::FileTypeExt;
    let p = media_project(60);
    p.edit(
        "etc/baton.toml",
        "signature = \"artifact\"\n",
        "signature = \"artifact\"\nsocket = \"unix\"\n",
    );
    // batond's own PORT (its unit may have one) must not reach the worker.
    let d = Daemon::start_env(&p, &[], &[("PORT", "1234")]).await;
    let s = d.wait_active(1).await;
    let g1 = s.active.expect("active");
    assert_eq!(g1.port, None, "no TCP port: {g1:?}");
    let sock1 = std::path::PathBuf::from(g1.socket.clone().expect("socket path"));
    assert!(sock1.starts_with(&g1.dir), "{sock1:?} in {}", g1.dir);
    assert!(
        std::fs::metadata(&sock1)
            .expect("socket")
            .file_type()
            .is_socket()
    );
    let env = environ(g1.pid.expect("pid"));
    assert!(
        env.contains(&format!("BATON_SOCKET={}", sock1.display())),
        "{env:?}"
    );
    assert!(!env.iter().any(|v| v.starts_with("PORT=")), "{env:?}");
    assert!(
        d.log().contains(&format!("on unix:{}", sock1.display())),
        "the cutover names the socket"
    );
    let out = d.ctl(&["status"]).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("socket {}", sock1.display())),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // HTTP and a call go through batond to the worker on its Unix socket.
    let (code, headers, body) = d.get("/healthz").await;
    assert_eq!((code, body.as_str()), (StatusCode::OK, "ok"));
    assert_eq!(
        headers["x-app-signature"].to_str().ok(),
        g1.signature.as_deref()
    );
    let (mut ws, headers) = open_call(d.addr, "1").await;
    assert_eq!(headers["sec-websocket-protocol"], "audio.twilio.com");
    let m = recv_event(&mut ws, "media").await;
    assert_eq!(m["streamSid"], "MZ1");

    // The worker's lines reach batond's log without their own timestamp
    // (batond's line has one); worker.log keeps them whole.
    let log = d.log();
    let copied: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split_once("[gen 1] ").map(|(_, rest)| rest))
        .collect();
    assert!(!copied.is_empty(), "no worker line copied: {log}");
    assert!(
        copied
            .iter()
            .all(|rest| !rest.starts_with(|c: char| c.is_ascii_digit())),
        "{copied:#?}"
    );
    let kept = std::fs::read_to_string(std::path::Path::new(&g1.dir).join("worker.log"))
        .expect("worker.log");
    assert!(
        kept.lines().next().is_some_and(|l| l.starts_with("20")),
        "worker.log keeps the worker's timestamps: {kept}"
    );

    // A new build gets a socket of its own; the call stays on the old one.
    p.append("src/main.rs", "// v2\n");
    let s = d.wait_active(2).await;
    let g2 = s.active.expect("active");
    let sock2 = g2.socket.clone().expect("socket path");
    assert_ne!(sock1.display().to_string(), sock2);
    assert_eq!(s.draining.first().map(|g| g.connections), Some(1));
    assert_eq!(Some(version_pid(d.addr).await as u32), g2.pid);
    ping_pong(&mut ws).await;
    ws.close(None).await.expect("close");
    drop(ws);
    d.wait_history(1, "stopped").await;
    assert!(wait_gone(g1.pid.expect("pid")).await);
    assert!(
        !sock1.exists(),
        "the stopped worker's socket file is removed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_sockets_work_in_a_state_dir_deeper_than_a_socket_path_holds() {
    let p = media_project(60);
    let deep = format!("state/{}/{}", "d".repeat(60), "e".repeat(60));
    p.edit(
        "etc/baton.toml",
        "state_dir = \"state\"\n",
        &format!("state_dir = \"{deep}\"\n"),
    );
    p.edit(
        "etc/baton.toml",
        "signature = \"artifact\"\n",
        "signature = \"artifact\"\nsocket = \"unix\"\n",
    );
    let mut d = Daemon::start(&p).await;
    // The control socket is there too (state_dir/control.sock), for the
    // status calls and batonctl alike.
    d.socket = p.path(&format!("{deep}/control.sock"));
    assert!(d.socket.as_os_str().len() > 107);
    let g1 = d.wait_active(1).await.active.expect("active");
    let out = d.ctl(&["status"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sock = g1.socket.clone().expect("socket path");
    assert!(sock.len() > 107, "{sock}");
    assert!(sock.starts_with(&g1.dir), "{sock} in {}", g1.dir);
    assert!(g1.dir.contains(&"e".repeat(60)), "{}", g1.dir);
    let (code, headers, _) = d.get("/healthz").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        headers["x-app-signature"].to_str().ok(),
        g1.signature.as_deref()
    );
    let (mut ws, _) = open_call(d.addr, "1").await;
    recv_event(&mut ws, "media").await;
    ws.close(None).await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_a_failed_redeploy_starts_the_worker_as_it_was_proven() {
    let p = media_project(60);
    let d = Daemon::start(&p).await;
    let g1 = d.wait_active(1).await.active.expect("active");
    assert!(g1.port.is_some(), "{g1:?}");
    // A reload to a Unix socket whose deploy fails: generation 1 keeps
    // serving, still on its TCP port.
    // (One save: two would reload twice.)
    let cfg = read(&p.path("etc/baton.toml"))
        .replace(
            "signature = \"artifact\"\n",
            "signature = \"artifact\"\nsocket = \"unix\"\n",
        )
        .replace(
            "artifact = \"build/media-worker\"",
            "artifact = \"build/not-made\"",
        );
    p.write("etc/baton.toml", &cfg);
    d.wait_history(2, "failed").await;
    // Generation 1 crashes: its fresh process starts the way generation 1
    // was proven (a TCP port), not the way the failed deploy would have.
    let pid = g1.pid.expect("pid");
    sigkill(pid);
    let s = d
        .wait_for("restarted", |s| {
            s.active
                .as_ref()
                .is_some_and(|a| a.id == 1 && a.restarts == 1 && a.pid.is_some_and(|p| p != pid))
        })
        .await;
    let a = s.active.expect("active");
    assert!(a.port.is_some() && a.socket.is_none(), "{a:?}");
    let (code, _, _) = d.get("/healthz").await;
    assert_eq!(code, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_ends_calls_left_on_the_old_worker() {
    let p = media_project(1);
    let d = Daemon::start(&p).await;
    let s = d.wait_active(1).await;
    let pid1 = s.active.and_then(|a| a.pid).expect("pid");
    let (mut ws, _) = open_call(d.addr, "2").await;
    recv_event(&mut ws, "media").await;
    p.append("src/main.rs", "// v2\n");
    d.wait_active(2).await;
    // The worker was stopped at the drain timeout, and the call stayed
    // connected until the worker closed it (1001, after its own
    // `shutdown_grace_ms`): the caller gets a close frame, not a cut.
    assert_eq!(close_code(&mut ws).await, Some(CloseCode::Away));
    let g1 = d.wait_history(1, "stopped").await;
    let why = g1.reason.unwrap_or_default();
    assert!(why.contains("drain timeout with 1 connection(s)"), "{why}");
    assert!(wait_gone(pid1).await);
    assert!(d.log_shows("drain timeout").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_worker_that_dies_says_so_in_its_history() {
    let p = media_project(60);
    let d = Daemon::start(&p).await;
    let pid1 = d.active_pid(1).await;
    let (mut ws, _) = open_call(d.addr, "4").await;
    recv_event(&mut ws, "media").await;
    p.append("src/main.rs", "// v2\n");
    d.wait_active(2).await;
    sigkill(pid1);
    assert_eq!(close_code(&mut ws).await, None);
    let g1 = d.wait_history(1, "stopped").await;
    let why = g1.reason.unwrap_or_default();
    assert_eq!(why, "exited with status signal SIGKILL while draining");
    // (The log line may come a moment after the status: waited for.)
    let said = format!("(pid {pid1}) exited while draining (signal SIGKILL)");
    assert!(d.log_shows(&said).await, "{}", d.log());
    // The active generation is not touched.
    let (code, _, _) = d.get("/healthz").await;
    assert_eq!(code, StatusCode::OK);
}

/// Reads a call until it ends: the close frame's code, or None when the
/// connection ended without one.
pub async fn close_code(ws: &mut Ws) -> Option<CloseCode> {
    tokio::time::timeout(PATIENCE, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(f))) => return f.map(|f| f.code),
                Some(Ok(_)) => {}
                None | Some(Err(_)) => return None,
            }
        }
    })
    .await
    .expect("the call did not end")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_daemon_shows_its_calls_and_lets_the_worker_close_them() {
    let p = media_project(60);
    p.edit(
        "etc/baton.toml",
        "shutdown_timeout_s = 5",
        "shutdown_timeout_s = 8",
    );
    let mut d = Daemon::start(&p).await;
    let pid1 = d.active_pid(1).await;
    // A call on a generation that drains, and one on the active one.
    let (mut old, _) = open_call(d.addr, "old").await;
    recv_event(&mut old, "media").await;
    d.deploy().await;
    let pid = d.active_pid(2).await;
    let (mut ws, _) = open_call(d.addr, "stop").await;
    recv_event(&mut ws, "media").await;
    let batond = nix::unistd::Pid::from_raw(d.child.id().expect("pid") as i32);
    nix::sys::signal::kill(batond, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    // While it waits for the calls (`shutdown_timeout_s`), the control
    // socket answers, and says what is left, as it changes: the draining
    // worker dies, and is gone from the status, with why in the history.
    sigkill(pid1);
    let s = d
        .wait_for("the dead draining worker gone", |s| s.draining.is_empty())
        .await;
    let g1 = s.history.iter().find(|g| g.id == 1).expect("generation 1");
    assert_eq!(
        g1.reason.as_deref(),
        Some("exited with status signal SIGKILL while draining")
    );
    // (Exit 3: a stopping daemon takes no new work, as `systemctl status`
    // says of a unit that is deactivating.)
    let out = d.ctl(&["--timeout", "3", "status", "--json"]).await;
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    assert_eq!(s["state"], "stopping", "{s}");
    assert_eq!(s["active"]["connections"], 1, "{s}");
    for args in [&["deploy"][..], &["deploy", "--wait"], &["restart"]] {
        let out = d.ctl(&[&["--timeout", "3"][..], args].concat()).await;
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("batond is stopping"), "{args:?}: {err}");
    }
    // A second signal changes nothing, and the log says so.
    nix::sys::signal::kill(batond, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    // The call goes on meanwhile...
    ping_pong(&mut ws).await;
    // ...and at the timeout the worker gets SIGTERM and closes it itself.
    assert_eq!(close_code(&mut ws).await, Some(CloseCode::Away));
    assert!(d.log_shows("already stopping").await, "{}", d.log());
    // The log says what the timeout left open.
    assert!(
        d.log()
            .contains("stopping the workers with 1 connection(s) and 0 request(s) open"),
        "{}",
        d.log()
    );
    let status = tokio::time::timeout(PATIENCE, d.child.wait())
        .await
        .expect("batond did not stop")
        .expect("wait");
    assert!(status.success(), "{status:?}");
    assert!(wait_gone(pid).await, "worker {pid} outlived batond");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_command_running_an_older_binary_is_rejected() {
    let p = media_project(60);
    let d = Daemon::start(&p).await;
    let s = d.wait_active(1).await;
    let g1 = s.active.expect("active");
    // An "old build" left in place: the exact failure Baton exists for.
    std::fs::create_dir_all(p.path("old")).expect("mkdir");
    std::fs::copy(MEDIA_WORKER, p.path("old/media-worker")).expect("copy");
    let cfg = read(&p.path("etc/baton.toml")).replace(
        r#"command = ["{artifact}", "#,
        r#"command = ["old/media-worker", "#,
    );
    p.write("etc/baton.toml", &cfg);
    let g2 = d.wait_history(2, "rejected").await;
    let reason = g2.reason.expect("reason");
    let want = g2.signature.expect("signature");
    let old = baton::digest::sha256_file(&p.path("old/media-worker")).expect("hash");
    assert_eq!(
        reason,
        format!(
            "signature mismatch: want {} got {}",
            baton::probe::short(&want),
            baton::probe::short(&old)
        )
    );
    // Traffic never moved.
    let (code, headers, _) = d.get("/healthz").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        headers["x-app-signature"].to_str().ok(),
        g1.signature.as_deref()
    );
    let s = d.status().await;
    assert_eq!(s.active.map(|a| a.id), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_cargo_build_after_a_source_edit_is_cut_over() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let p = Project::new();
    for f in ["Cargo.toml", "Cargo.lock", "clippy.toml"] {
        std::fs::copy(root.join(f), p.path(f)).expect("copy manifest");
    }
    copy_tree(&root.join("src"), &p.path("src"));
    p.write("etc/media-worker.toml", WORKER_TOML);
    // A shared target dir keeps later runs incremental.
    let target = root.join("target/e2e-cargo");
    p.write(
        "etc/baton.toml",
        &format!(
            r#"[daemon]
root = ".."
listen = "127.0.0.1:0"
state_dir = "state"

[watch]
paths = ["src"]
debounce_ms = 200

[build]
command = ["cargo", "build", "--quiet", "--target-dir", "{}", "--bin", "media-worker"]
artifact = "{}/debug/media-worker"
timeout_s = 1200

[worker]
command = ["{{artifact}}", "--config", "etc/media-worker.toml"]
start_timeout_s = 30
"#,
            target.display(),
            target.display()
        ),
    );
    let d = Daemon::start(&p).await;
    let slow = Duration::from_secs(1200);
    let s = d
        .wait_for_long("first cargo build", slow, |s| s.active.is_some())
        .await;
    let g1 = s.active.expect("active");
    assert_eq!(g1.id, 1, "{:?}", s.history);
    // Edit the worker's source: every line number below moves, so the
    // binary (its panic locations) changes.
    let lib = read(&p.path("src/worker/mod.rs"));
    p.write(
        "src/worker/mod.rs",
        &format!("// edited by the test\n{lib}"),
    );
    let s = d
        .wait_for_long("second cargo build", slow, |s| {
            s.active.as_ref().is_some_and(|a| a.id == 2)
        })
        .await;
    let g2 = s.active.expect("active");
    assert_ne!(g1.signature, g2.signature);
    assert!(g2.build_ms.is_some_and(|ms| ms > 0));
    let (_, headers, _) = d.get("/healthz").await;
    assert_eq!(
        headers["x-app-signature"].to_str().ok(),
        g2.signature.as_deref()
    );
}

fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let dest = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).expect("copy");
        }
    }
}

/// What a worker wrote to an upgraded connection just before it exited
/// reaches the client: the tunnel is relayed to the end of the worker's
/// stream (for a bounded time), not cut the moment the exit is seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_connection_gets_what_its_worker_wrote_before_it_exited() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const N: usize = 8 << 20;
    let p = Project::python("", "");
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    // A small receive buffer (no autotuning): most of what the worker
    // wrote waits in batond's buffers when it exits.
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(64 << 10).expect("SO_RCVBUF");
    let mut s = sock.connect(d.addr).await.expect("connect");
    s.write_all(
        format!(
            "GET /flood?to=x-flood&bytes={N} HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: x-flood\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    // A slow reader (64 KiB every 10 ms): the worker has written it all
    // and exited long before the last of it is read.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let (mut head, mut got) = (Vec::new(), 0usize);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = tokio::time::timeout_at(deadline, s.read(&mut buf))
            .await
            .expect("the tunnel ended in time")
            .expect("read");
        if n == 0 {
            break;
        }
        if got == 0 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            head.extend_from_slice(&buf[..n]);
            if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                assert!(head.starts_with(b"HTTP/1.1 101"), "{head:?}");
                got = head.len() - end - 4;
            }
            continue;
        }
        got += n;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(got, N, "bytes after the 101");
    // The worker did exit (and was started again).
    d.wait_for("restarted", |s| {
        s.active.as_ref().is_some_and(|a| a.restarts >= 1)
    })
    .await;
}

/// The history keeps the generations that ended last, not the highest
/// numbers: one that drained long after newer ones stopped is the news,
/// and its folder (with its worker.log) stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_keeps_what_ended_last() {
    let p = Project::python("", "");
    p.edit(
        "etc/baton.toml",
        "shutdown_timeout_s = 5",
        "shutdown_timeout_s = 5\nhistory = 1",
    );
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    // A request that keeps generation 1 draining for a while.
    let addr = d.addr;
    let slow = tokio::spawn(async move { http_get(addr, "/slow?ms=2500").await });
    d.wait_for("the request in flight", |s| {
        s.active.as_ref().is_some_and(|a| a.requests_in_flight == 1)
    })
    .await;
    d.deploy().await;
    d.deploy().await;
    // Generation 2 stopped at once (nothing on it); 1 ends with its request.
    let (code, _, body) = slow.await.expect("slow request");
    assert_eq!((code, body.as_str()), (StatusCode::OK, "slow 1"));
    let s = d
        .wait_for("generation 1 over", |s| {
            s.draining.is_empty() && s.history.iter().any(|h| h.id == 1)
        })
        .await;
    let ids: Vec<u64> = s.history.iter().map(|h| h.id).collect();
    assert_eq!(ids, vec![1], "{:?}", s.history);
    assert!(p.path("state/gen-0001/worker.log").exists());
    assert!(!p.path("state/gen-0002").exists());
}

/// `baton_draining_generations` counts generations, not processes: after
/// a restart, the old process of the active generation that keeps its
/// call is no generation draining; after a deploy, that generation is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_generations_are_counted_as_generations() {
    let p = media_project(60);
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    let (mut ws, _) = open_call(d.addr, "kept").await;
    recv_event(&mut ws, "media").await;
    let draining = async || {
        let (_, text) = baton::control::client::call_text(&d.socket, http::Method::GET, "/metrics")
            .await
            .expect("metrics");
        text.lines()
            .find_map(|l| l.strip_prefix("baton_draining_generations "))
            .and_then(|v| v.parse::<u64>().ok())
            .expect("the metric")
    };
    let out = d.ctl(&["restart", "--wait"]).await;
    assert!(out.status.success(), "{out:?}");
    let s = d.status().await;
    assert_eq!(s.draining.len(), 1, "the old process keeps its call");
    // Each process shows when it took traffic.
    let (old, new) = (&s.draining[0], s.active.as_ref().expect("active"));
    assert!(
        old.cutover_at.is_some() && old.cutover_at < new.cutover_at,
        "{old:?} {new:?}"
    );
    assert_eq!(draining().await, 0);
    d.deploy().await;
    assert_eq!(draining().await, 1);
}
