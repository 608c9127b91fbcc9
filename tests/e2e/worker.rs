//! media-worker and callsim, end to end: the real binaries on 127.0.0.1
//! with ephemeral ports, a temp dir per test, every wait bounded, and no
//! sleeps for readiness (the worker prints `listening on ADDR`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const MEDIA_WORKER: &str = env!("CARGO_BIN_EXE_media-worker");
const CALLSIM: &str = env!("CARGO_BIN_EXE_callsim");
/// Upper bound for anything that starts a process or runs a call.
const PATIENCE: Duration = Duration::from_secs(60);

// === support ===

/// How a test reaches the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// media-worker on its own, bound by itself on `PORT=0`.
    Direct,
    /// media-worker supervised by batond (socket handed over with
    /// `LISTEN_FDS`), reached through batond's proxy.
    Batond,
}

/// Declares a test twice: against the worker directly and through batond.
macro_rules! both {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn direct() {
                super::$name(super::Mode::Direct).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn through_batond() {
                super::$name(super::Mode::Batond).await
            }
        }
    };
}

/// A running media-worker with its temp dir and captured JSON logs.
struct Worker {
    child: tokio::process::Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
    lines: Arc<Mutex<Vec<String>>>,
    line_count: watch::Receiver<usize>,
}

impl Worker {
    /// Starts media-worker with `extra` appended to a test config.
    async fn start(extra: &str, envs: &[(&str, &str)]) -> Worker {
        Self::start_in(Mode::Direct, extra, envs).await
    }

    /// Starts media-worker directly or behind batond.
    async fn start_in(mode: Mode, extra: &str, envs: &[(&str, &str)]) -> Worker {
        let dir = tempfile::Builder::new()
            .prefix("baton-worker-e2e-")
            .tempdir()
            .expect("tempdir");
        let cfg = dir.path().join("media-worker.toml");
        std::fs::write(
            &cfg,
            format!("data_dir = \"data\"\nping_interval_ms = 200\ntts = \"tone\"\n{extra}\n"),
        )
        .expect("write config");
        if mode == Mode::Batond {
            return Self::behind_batond(dir, &cfg, envs).await;
        }
        let mut cmd = tokio::process::Command::new(MEDIA_WORKER);
        cmd.arg("--config")
            .arg(&cfg)
            .args(["--log-format", "json"])
            .env("PORT", "0")
            .env("RUST_LOG", "info")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("TWILIO_AUTH_TOKEN")
            .env_remove("BATON_SIGNATURE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn media-worker");
        let stderr = child.stderr.take().expect("stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, mut line_count) = watch::channel(0usize);
        let sink = Arc::clone(&lines);
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let n = {
                    let mut l = sink.lock().expect("log lock");
                    l.push(line);
                    l.len()
                };
                let _ = tx.send(n);
            }
        });
        let addr = tokio::time::timeout(PATIENCE, async {
            loop {
                let found = lines
                    .lock()
                    .expect("log lock")
                    .iter()
                    .find_map(|l| parse_listening(l));
                if let Some(a) = found {
                    return a;
                }
                if line_count.changed().await.is_err() {
                    panic!(
                        "media-worker exited before listening: {:?}",
                        lines.lock().expect("lock")
                    );
                }
            }
        })
        .await
        .expect("media-worker did not print `listening on`");
        Worker {
            child,
            addr,
            dir,
            lines,
            line_count,
        }
    }

    /// batond runs the worker binary as it is (no build step) with the test
    /// config; the worker's JSON log is read from the generation's
    /// `worker.log`, and `addr` is batond's public address.
    async fn behind_batond(dir: tempfile::TempDir, cfg: &Path, envs: &[(&str, &str)]) -> Worker {
        let baton = dir.path().join("baton.toml");
        std::fs::write(
            &baton,
            format!(
                r#"[daemon]
listen = "127.0.0.1:0"
state_dir = "state"
[build]
command = []
artifact = "{MEDIA_WORKER}"
[worker]
command = ["{{artifact}}", "--config", "{}", "--log-format", "json"]
env = {{ RUST_LOG = "info" }}
drain_timeout_s = 5
stop_timeout_s = 5
"#,
                cfg.display()
            ),
        )
        .expect("write baton.toml");
        let mut cmd = tokio::process::Command::new(crate::support::BATOND);
        cmd.arg("--config")
            .arg(&baton)
            .env("NO_COLOR", "1")
            .env_remove("TWILIO_AUTH_TOKEN")
            .env_remove("BATON_SIGNATURE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn batond");
        let stderr = child.stderr.take().expect("stderr");
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut addr_tx = Some(addr_tx);
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if let Some(rest) = line.split("batond listening on ").nth(1)
                    && let Some(tx) = addr_tx.take()
                {
                    let _ = tx.send(rest.split(';').next().unwrap_or("").trim().to_string());
                }
            }
        });
        let addr: SocketAddr = tokio::time::timeout(PATIENCE, addr_rx)
            .await
            .expect("batond did not report its address")
            .expect("batond exited")
            .parse()
            .expect("address");
        // Wait for the worker to be proven and active.
        let socket = dir.path().join("state/control.sock");
        let log = dir.path().join("state/gen-0001/worker.log");
        tokio::time::timeout(PATIENCE, async {
            loop {
                if let Ok((_, body)) =
                    baton::control::client::call_text(&socket, http::Method::GET, "/v1/status")
                        .await
                    && serde_json::from_str::<Value>(&body)
                        .is_ok_and(|v| v["active"]["state"] == "active")
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("worker not active behind batond");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, line_count) = watch::channel(0usize);
        let sink = Arc::clone(&lines);
        // Tail worker.log until the test ends (the sender is dropped with it).
        tokio::spawn(async move {
            let mut seen = 0usize;
            loop {
                if tx.is_closed() {
                    return;
                }
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let all: Vec<&str> = text.lines().collect();
                // Only whole lines: the last one may still be being written.
                let complete = if text.ends_with('\n') {
                    all.len()
                } else {
                    all.len().saturating_sub(1)
                };
                if complete > seen {
                    let n = {
                        let mut l = sink.lock().expect("log lock");
                        l.extend(all[seen..complete].iter().map(|s| s.to_string()));
                        l.len()
                    };
                    seen = complete;
                    let _ = tx.send(n);
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        });
        Worker {
            child,
            addr,
            dir,
            lines,
            line_count,
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn ws_url(&self) -> String {
        format!("ws://{}/ws/twilio-media", self.addr)
    }

    /// JSON log events whose message (or `event` field) is `name`.
    fn events(&self, name: &str) -> Vec<Value> {
        self.lines
            .lock()
            .expect("log lock")
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["fields"]["message"] == name || v["fields"]["event"] == name)
            .collect()
    }

    /// Waits until a log event satisfies `pred`.
    async fn wait_event(&mut self, name: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let found = tokio::time::timeout(PATIENCE, async {
            loop {
                if let Some(v) = self.events(name).into_iter().find(|v| pred(v)) {
                    return v;
                }
                if self.line_count.changed().await.is_err() {
                    panic!("worker log ended while waiting for {name}");
                }
            }
        })
        .await;
        found.unwrap_or_else(|_| {
            panic!(
                "no {name} event in time; log: {:#?}",
                self.lines.lock().expect("lock")
            )
        })
    }

    /// The call records written so far.
    fn records(&self) -> Vec<Value> {
        let dir = self.data().join("calls");
        let Ok(rd) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        rd.filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .map(|e| {
                serde_json::from_slice(&std::fs::read(e.path()).expect("read record"))
                    .expect("record json")
            })
            .collect()
    }

    /// Waits until at least `n` call records exist.
    async fn wait_records(&mut self, n: usize) -> Vec<Value> {
        tokio::time::timeout(PATIENCE, async {
            loop {
                let r = self.records();
                if r.len() >= n {
                    return r;
                }
                // Records are written right after WS_STOP is logged.
                let _ = tokio::time::timeout(Duration::from_millis(200), self.line_count.changed())
                    .await;
            }
        })
        .await
        .expect("call records not written in time")
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = self.child.id().expect("worker pid") as i32;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).expect("kill");
    }

    async fn wait_exit(&mut self) -> std::process::ExitStatus {
        tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("worker did not exit in time")
            .expect("wait")
    }
}

/// `... listening on 127.0.0.1:1234 ...` -> the address.
fn parse_listening(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("listening on ")? + "listening on ".len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']')))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// A minimal HTTP/1.1 exchange (Connection: close) to see exact headers.
struct HttpResponse {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    tokio::time::timeout(PATIENCE, async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await.expect("write");
        s.write_all(body).await.expect("write body");
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.expect("read");
        parse_http(&buf)
    })
    .await
    .expect("http request timed out")
}

fn parse_http(buf: &[u8]) -> HttpResponse {
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of headers");
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .expect("status line")
        .split(' ')
        .nth(1)
        .expect("code")
        .parse()
        .expect("status");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    HttpResponse {
        status,
        headers,
        body: buf[split + 4..].to_vec(),
    }
}

/// Raw upgrade request; returns the response head only.
async fn raw_upgrade(addr: SocketAddr, extra: &[(&str, &str)]) -> HttpResponse {
    raw_handshake(addr, "HTTP/1.1", &["dGhlIHNhbXBsZSBub25jZQ=="], extra).await
}

/// A raw upgrade request in `version` with these `Sec-WebSocket-Key`
/// lines; returns the response head only.
async fn raw_handshake(
    addr: SocketAddr,
    version: &str,
    keys: &[&str],
    extra: &[(&str, &str)],
) -> HttpResponse {
    tokio::time::timeout(PATIENCE, async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let mut req = format!(
            "GET /ws/twilio-media {version}\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        );
        for k in keys {
            req.push_str(&format!("Sec-WebSocket-Key: {k}\r\n"));
        }
        for (k, v) in extra {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut chunk).await.expect("read");
            assert!(n > 0, "connection closed during handshake");
            buf.extend_from_slice(&chunk[..n]);
        }
        parse_http(&buf)
    })
    .await
    .expect("upgrade timed out")
}

fn sha256_file(path: &str) -> String {
    baton::digest::sha256_file(Path::new(path)).expect("read binary")
}

/// Caller audio: 200 ms silence, 600 ms "speech", 2 s pause, 600 ms
/// "speech", 300 ms silence; 16 kHz so callsim has to resample.
fn write_caller_wav(dir: &Path) -> PathBuf {
    let path = dir.join("caller.wav");
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 16_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(&path, spec).expect("wav");
    let mut put = |ms: u32, freq: f64| {
        for i in 0..(16 * ms) {
            let s = if freq > 0.0 {
                (8000.0 * (2.0 * std::f64::consts::PI * freq * f64::from(i) / 16_000.0).sin())
                    as i16
            } else {
                0
            };
            w.write_sample(s).expect("sample");
        }
    };
    put(200, 0.0);
    put(600, 300.0);
    put(2000, 0.0);
    put(600, 450.0);
    put(300, 0.0);
    w.finalize().expect("finalize");
    path
}

/// Runs callsim with `args`; returns (exit success, stdout JSON or text).
async fn callsim(args: &[&str]) -> (bool, String) {
    let out = tokio::time::timeout(
        PATIENCE * 2,
        tokio::process::Command::new(CALLSIM)
            .args(args)
            .env_remove("TWILIO_AUTH_TOKEN")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("callsim timed out")
    .expect("run callsim");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        eprintln!("callsim stderr: {}", String::from_utf8_lossy(&out.stderr));
    }
    (out.status.success(), stdout)
}

type Client = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn ws_connect(url: &str) -> Client {
    let mut req = url.into_client_request().expect("request");
    req.headers_mut().insert(
        "sec-websocket-protocol",
        "audio.twilio.com".parse().expect("hv"),
    );
    let (ws, _) = tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(req))
        .await
        .expect("ws connect timed out")
        .expect("ws connect");
    ws
}

fn connected_msg() -> Message {
    Message::Text(r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#.into())
}

fn start_msg(stream_sid: &str, call_sid: &str) -> Message {
    Message::Text(
        serde_json::json!({
            "event": "start", "sequenceNumber": "1", "streamSid": stream_sid,
            "start": {"accountSid": "AC1", "streamSid": stream_sid, "callSid": call_sid,
                      "tracks": ["inbound"], "customParameters": {"k": "v"},
                      "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}
        })
        .to_string()
        .into(),
    )
}

fn media_msg(stream_sid: &str, seq: u64) -> Message {
    Message::Text(
        serde_json::json!({
            "event": "media", "sequenceNumber": seq.to_string(), "streamSid": stream_sid,
            "media": {"track": "inbound", "chunk": seq.to_string(), "timestamp": seq.saturating_mul(20).to_string(),
                      "payload": "//////////////////////////////////////////8="}
        })
        .to_string()
        .into(),
    )
}

fn stop_msg(stream_sid: &str, call_sid: &str) -> Message {
    Message::Text(
        serde_json::json!({"event": "stop", "sequenceNumber": "99", "streamSid": stream_sid,
                           "stop": {"accountSid": "AC1", "callSid": call_sid}})
        .to_string()
        .into(),
    )
}

/// Reads until a server media message arrives (the call is alive).
async fn expect_media(ws: &mut Client) -> Value {
    expect_event(ws, "media").await
}

/// Reads until a server message of `event` arrives, skipping the others.
async fn expect_event(ws: &mut Client, event: &str) -> Value {
    tokio::time::timeout(PATIENCE, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).expect("server JSON");
                    if v["event"] == event {
                        return v;
                    }
                }
                Some(Ok(_)) => {}
                other => panic!("stream ended while waiting for {event}: {other:?}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {event} from the server"))
}

/// Twilio's echo of mark `name`.
fn mark_msg(stream_sid: &str, seq: u64, name: &str) -> Message {
    Message::Text(
        serde_json::json!({"event": "mark", "sequenceNumber": seq.to_string(),
                           "streamSid": stream_sid, "mark": {"name": name}})
        .to_string()
        .into(),
    )
}

/// Reads until the server closes; returns the close code (None = no frame).
async fn expect_close(ws: &mut Client) -> Option<CloseCode> {
    tokio::time::timeout(PATIENCE, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(f))) => return f.map(|f| f.code),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return None,
            }
        }
    })
    .await
    .expect("server did not close")
}

// === tests ===

#[tokio::test]
async fn worker_healthz_version_and_app_signature() {
    let w = Worker::start("", &[("BATON_SIGNATURE", "borrowed")]).await;
    let want = sha256_file(MEDIA_WORKER);

    let r = http(w.addr, "GET", "/healthz", &[], b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"ok");
    // Artifact mode: the digest of the binary file, never BATON_SIGNATURE.
    assert_eq!(r.headers.get("x-app-signature"), Some(&want));

    let r = http(w.addr, "GET", "/version", &[], b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers.get("x-app-signature"), Some(&want));
    let v: Value = serde_json::from_slice(&r.body).expect("version JSON");
    assert_eq!(v["signature"], want.as_str());
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["pid"], w.child.id().expect("pid"));
    assert!(v["started_at"].as_str().is_some_and(|s| s.ends_with('Z')));
    assert_eq!(v["engines"]["stt"], "none");
    assert_eq!(v["engines"]["dialog"], "echo");

    for (method, path, status) in [
        ("GET", "/nope", 404),
        ("POST", "/healthz", 405),
        ("GET", "/webhook/stream_status", 405),
    ] {
        let r = http(w.addr, method, path, &[], b"").await;
        assert_eq!(r.status, status, "{method} {path}");
        assert_eq!(
            r.headers.get("x-app-signature"),
            Some(&want),
            "{method} {path}"
        );
    }
    // A plain GET on the WebSocket path is not an upgrade.
    let r = http(w.addr, "GET", "/ws/twilio-media", &[], b"").await;
    assert_eq!(r.status, 426);
    assert_eq!(r.headers.get("x-app-signature"), Some(&want));
    // RFC 9110 §15.5.22: a 426 says what to upgrade to.
    assert_eq!(
        r.headers.get("upgrade").map(String::as_str),
        Some("websocket")
    );
}

#[tokio::test]
async fn worker_env_signature_mode_echoes_baton_signature() {
    let w = Worker::start("signature_mode = \"env\"", &[("BATON_SIGNATURE", "abc123")]).await;
    let r = http(w.addr, "GET", "/healthz", &[], b"").await;
    assert_eq!(
        r.headers.get("x-app-signature").map(String::as_str),
        Some("abc123")
    );
}

both!(worker_handshake_echoes_subprotocol_only_when_offered);
async fn worker_handshake_echoes_subprotocol_only_when_offered(mode: Mode) {
    let w = Worker::start_in(mode, "", &[]).await;
    let want = sha256_file(MEDIA_WORKER);
    // RFC 6455 section 1.3 sample key.
    let accept = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

    let r = raw_upgrade(w.addr, &[("Sec-WebSocket-Protocol", "audio.twilio.com")]).await;
    assert_eq!(r.status, 101);
    assert_eq!(
        r.headers.get("sec-websocket-protocol").map(String::as_str),
        Some("audio.twilio.com")
    );
    assert_eq!(
        r.headers.get("sec-websocket-accept").map(String::as_str),
        Some(accept)
    );
    assert_eq!(r.headers.get("x-app-signature"), Some(&want));

    let r = raw_upgrade(
        w.addr,
        &[("Sec-WebSocket-Protocol", "chat, audio.twilio.com")],
    )
    .await;
    assert_eq!(r.status, 101);
    assert_eq!(
        r.headers.get("sec-websocket-protocol").map(String::as_str),
        Some("audio.twilio.com")
    );

    let r = raw_upgrade(w.addr, &[]).await;
    assert_eq!(r.status, 101);
    assert!(
        !r.headers.contains_key("sec-websocket-protocol"),
        "{:?}",
        r.headers
    );
    assert_eq!(r.headers.get("x-app-signature"), Some(&want));

    let r = raw_upgrade(w.addr, &[("Sec-WebSocket-Protocol", "chat")]).await;
    assert_eq!(r.status, 101);
    assert!(!r.headers.contains_key("sec-websocket-protocol"));

    // No 101 for a handshake that cannot be one: HTTP/1.0 (its Upgrade is
    // ignored, RFC 9110 §7.8), a key that is not the base64 of 16 bytes,
    // two keys (RFC 6455 §4.2.1).
    let twilio = [("Sec-WebSocket-Protocol", "audio.twilio.com")];
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let r = raw_handshake(w.addr, "HTTP/1.0", &[key], &twilio).await;
    assert_eq!(r.status, 426, "HTTP/1.0: {:?}", r.headers);
    for keys in [
        &["abc"][..],
        &["!!!!!!!!!!!!!!!!!!!!!!=="],
        &[key, key],
        &[],
    ] {
        let r = raw_handshake(w.addr, "HTTP/1.1", keys, &twilio).await;
        assert_eq!(r.status, 400, "keys {keys:?}: {:?}", r.headers);
    }

    // And through a real client, both ways, in callsim.
    let dir = tempfile::tempdir().expect("tempdir");
    let wav = write_caller_wav(dir.path());
    let wav = wav.to_str().expect("path");
    let url = w.ws_url();
    for extra in [&[][..], &["--no-subprotocol"][..]] {
        let mut args = vec![
            "--url",
            &url,
            "--audio",
            wav,
            "--fast",
            "--linger-ms",
            "200",
            "--json",
        ];
        args.extend_from_slice(extra);
        let (ok, out) = callsim(&args).await;
        assert!(ok, "{out}");
        let v: Value = serde_json::from_str(&out).expect("summary");
        let rep = &v["reports"][0];
        assert_eq!(rep["subprotocol_echoed"], extra.is_empty(), "{rep}");
        assert_eq!(rep["app_signature"], want.as_str());
    }
}

/// Outbound audio runs at most `pacing_lead_ms` ahead of real time, as
/// the caller's playout buffer sees it: the first burst fills the lead
/// and no frame goes past it.
#[tokio::test]
async fn worker_audio_runs_no_further_ahead_than_the_pacing_lead() {
    let w = Worker::start("pacing_lead_ms = 200", &[]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let wav = write_caller_wav(dir.path());
    let url = w.ws_url();
    let args = [
        "--url",
        &url,
        "--audio",
        wav.to_str().expect("path"),
        "--fast",
        "--linger-ms",
        "200",
        "--json",
    ];
    let (ok, out) = callsim(&args).await;
    assert!(ok, "{out}");
    let v: Value = serde_json::from_str(&out).expect("summary");
    let lead = v["reports"][0]["max_lead_ms"]
        .as_f64()
        .expect("max_lead_ms");
    // A frame (20 ms) past the lead would show as 220 ms; the slack below
    // that is for the clock readings alone (the two processes' reads of
    // it, on a loaded host 5 ms apart at times: 205.2 ms was seen).
    assert!((100.0..=212.0).contains(&lead), "max lead {lead} ms");
}

both!(callsim_checks_a_worker_behind_a_tls_proxy_as_twilio_reaches_it);
/// `callsim webhook --public-url` against a worker that takes its public
/// URL from the headers of the TLS proxy in front (no `public_url` in its
/// config): callsim sends those headers as the proxy would, so the
/// signatures check out (it used to sign the public URL but send none,
/// and got 403 from a worker set up right).
async fn callsim_checks_a_worker_behind_a_tls_proxy_as_twilio_reaches_it(mode: Mode) {
    let w = Worker::start_in(mode, "", &[("TWILIO_AUTH_TOKEN", "secret")]).await;
    let base = format!("http://{}", w.addr);
    let (ok, out, v) = signed_webhooks(&base, "secret").await;
    assert!(ok, "{out}");
    assert_eq!(v["incoming_call_status"], 200, "{out}");
    assert_eq!(v["stream_status_status"], 204, "{out}");
    assert_eq!(v["stream_url"], "wss://voice.example.com/ws/twilio-media");
}

/// `callsim webhook` at `base`, signed with `token` for the public URL
/// `https://voice.example.com`: whether it passed, its output, its report.
async fn signed_webhooks(base: &str, token: &str) -> (bool, String, Value) {
    let (ok, out) = callsim(&[
        "webhook",
        "--base",
        base,
        "--public-url",
        "https://voice.example.com",
        "--auth-token",
        token,
        "--json",
    ])
    .await;
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("report: {e}: {out}"));
    (ok, out, v)
}

both!(worker_webhooks_answer_twiml_that_parses_as_xml);
async fn worker_webhooks_answer_twiml_that_parses_as_xml(mode: Mode) {
    let w = Worker::start_in(mode, "", &[]).await;
    let base = format!("http://{}", w.addr);
    let (ok, out) = callsim(&["webhook", "--base", &base, "--allow-insecure-ws", "--json"]).await;
    assert!(ok, "{out}");
    let v: Value = serde_json::from_str(&out).expect("report");
    assert_eq!(v["incoming_call_status"], 200);
    assert_eq!(v["stream_status_status"], 204);
    assert_eq!(v["stream_ended_status"], 204);
    assert_eq!(v["stream_url"], format!("ws://{}/ws/twilio-media", w.addr));

    // Behind a TLS proxy: scheme and host from X-Forwarded-*; values escaped.
    let body = "CallSid=CA%26%3C%22x&From=%2B14155550100";
    let r = http(
        w.addr,
        "POST",
        "/webhook/incoming_call",
        &[
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "voice.example.com, inner.proxy"),
        ],
        body.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(
        r.headers
            .get("content-type")
            .is_some_and(|c| c.starts_with("text/xml"))
    );
    let xml = String::from_utf8(r.body).expect("utf-8");
    let doc = roxmltree::Document::parse(&xml).expect("TwiML is XML");
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "Response");
    let connect = root
        .children()
        .find(|n| n.has_tag_name("Connect"))
        .expect("<Connect>");
    assert_eq!(
        connect.attribute("action"),
        Some("https://voice.example.com/webhook/stream_ended")
    );
    let stream = connect
        .children()
        .find(|n| n.has_tag_name("Stream"))
        .expect("<Stream>");
    assert_eq!(
        stream.attribute("url"),
        Some("wss://voice.example.com/ws/twilio-media")
    );
    assert_eq!(
        stream.attribute("statusCallback"),
        Some("https://voice.example.com/webhook/stream_status")
    );
    assert_eq!(stream.attribute("statusCallbackMethod"), Some("POST"));
    let param = stream
        .children()
        .find(|n| n.has_tag_name("Parameter"))
        .expect("<Parameter>");
    assert_eq!(param.attribute("name"), Some("callSid"));
    assert_eq!(param.attribute("value"), Some("CA&<\"x"));

    let r = http(
        w.addr,
        "POST",
        "/webhook/stream_status",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        b"StreamEvent=stream-stopped&CallSid=CA9",
    )
    .await;
    assert_eq!(r.status, 204);
}

both!(worker_checks_twilio_signatures_on_webhooks_and_upgrade);
async fn worker_checks_twilio_signatures_on_webhooks_and_upgrade(mode: Mode) {
    // Token from the environment (overrides the file), public URL from config.
    let mut w = Worker::start_in(
        mode,
        "auth_token = \"from-file\"\npublic_url = \"https://voice.example.com\"",
        &[("TWILIO_AUTH_TOKEN", "secret")],
    )
    .await;
    let want = sha256_file(MEDIA_WORKER);
    let base = format!("http://{}", w.addr);

    let (ok, out, v) = signed_webhooks(&base, "secret").await;
    assert!(ok, "{out}");
    assert_eq!(v["stream_url"], "wss://voice.example.com/ws/twilio-media");

    for token in ["from-file", "wrong"] {
        let (ok, out, v) = signed_webhooks(&base, token).await;
        assert!(!ok, "{out}");
        assert_eq!(v["incoming_call_status"], 403);
        assert_eq!(v["stream_status_status"], 403);
    }
    // Unsigned, or signed over the wrong URL: 403, still signed by us.
    let r = post_stream_ended(w.addr, None).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.headers.get("x-app-signature"), Some(&want));
    let r = post_stream_ended(w.addr, Some(&format!("{base}/webhook/stream_ended"))).await;
    assert_eq!(r.status, 403);
    let r = post_stream_ended(
        w.addr,
        Some("https://voice.example.com/webhook/stream_ended"),
    )
    .await;
    assert_eq!(r.status, 204);

    // A voice URL set to GET in Twilio's console: the parameters are in
    // the query, and the whole URL is signed.
    let path = "/webhook/incoming_call?CallSid=CAget&From=%2B15550100";
    let sig = baton::twilio::signature::compute(
        "secret",
        &format!("https://voice.example.com{path}"),
        &[],
    );
    let r = http(w.addr, "GET", path, &[("X-Twilio-Signature", &sig)], b"").await;
    assert_eq!(r.status, 200);
    let twiml = String::from_utf8_lossy(&r.body);
    assert!(
        twiml.contains("<Connect") && twiml.contains("CAget"),
        "{twiml}"
    );
    let r = http(w.addr, "GET", path, &[], b"").await;
    assert_eq!(r.status, 403);

    // The upgrade is signed on the wss:// URL.
    let r = raw_upgrade(w.addr, &[]).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.headers.get("x-app-signature"), Some(&want));
    let https_sig = baton::twilio::signature::compute(
        "secret",
        "https://voice.example.com/ws/twilio-media",
        &[],
    );
    let r = raw_upgrade(w.addr, &[("X-Twilio-Signature", &https_sig)]).await;
    assert_eq!(
        r.status, 403,
        "an https:// signature must not open the wss:// endpoint"
    );
    let wss_sig =
        baton::twilio::signature::compute("secret", "wss://voice.example.com/ws/twilio-media", &[]);
    let r = raw_upgrade(w.addr, &[("X-Twilio-Signature", &wss_sig)]).await;
    assert_eq!(r.status, 101);

    let dir = tempfile::tempdir().expect("tempdir");
    let wav = write_caller_wav(dir.path());
    let wav = wav.to_str().expect("path");
    let url = w.ws_url();
    let (ok, out) = callsim(&[
        "--url",
        &url,
        "--audio",
        wav,
        "--fast",
        "--linger-ms",
        "200",
        "--auth-token",
        "secret",
        "--signature-url",
        "wss://voice.example.com/ws/twilio-media",
        "--json",
    ])
    .await;
    assert!(ok, "{out}");
    let (ok, out) = callsim(&["--url", &url, "--audio", wav, "--fast", "--json"]).await;
    assert!(!ok);
    let v: Value = serde_json::from_str(&out).expect("summary");
    assert!(
        v["reports"][0]["errors"][0]
            .as_str()
            .is_some_and(|e| e.contains("403")),
        "{v}"
    );
    // The server is still fine.
    w.wait_event("WS_STOP", |_| true).await;
    assert_eq!(http(w.addr, "GET", "/healthz", &[], b"").await.status, 200);
}

/// Behind a proxy that names the WebSocket scheme (`X-Forwarded-Proto:
/// wss`, as Traefik's forwarder sends on an upgrade over TLS), the URL
/// Twilio signed is still the `wss://` one.
#[tokio::test]
async fn an_upgrade_forwarded_as_wss_is_checked_on_the_wss_url() {
    let w = Worker::start("", &[("TWILIO_AUTH_TOKEN", "secret")]).await;
    let sig =
        baton::twilio::signature::compute("secret", "wss://voice.example.com/ws/twilio-media", &[]);
    for (proto, want) in [("wss", 101), ("https", 101), ("WSS", 101), ("ws", 403)] {
        let r = raw_upgrade(
            w.addr,
            &[
                ("X-Forwarded-Proto", proto),
                ("X-Forwarded-Host", "voice.example.com"),
                ("X-Twilio-Signature", &sig),
            ],
        )
        .await;
        assert_eq!(r.status, want, "X-Forwarded-Proto: {proto}");
    }
}

/// `max_calls`: an upgrade past it is refused with 503 (counted in
/// `/version`), the calls in progress go on, and a slot that frees up is
/// taken again.
#[tokio::test]
async fn calls_past_max_calls_are_refused_and_a_freed_slot_is_used_again() {
    let mut w = Worker::start("max_calls = 2", &[]).await;
    let mut a = ws_connect(&w.ws_url()).await;
    a.send(start_msg("MZa", "CAa")).await.expect("send");
    let mut b = ws_connect(&w.ws_url()).await;
    b.send(start_msg("MZb", "CAb")).await.expect("send");
    let r = raw_upgrade(w.addr, &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.headers.get("retry-after").map(String::as_str), Some("1"));
    let v: Value = serde_json::from_slice(&http(w.addr, "GET", "/version", &[], b"").await.body)
        .expect("json");
    assert_eq!(v["calls_refused"], 1, "{v}");
    assert_eq!(v["max_calls"], 2, "{v}");
    // The two calls are unharmed.
    assert_eq!(expect_media(&mut a).await["streamSid"], "MZa");
    assert_eq!(expect_media(&mut b).await["streamSid"], "MZb");
    a.send(stop_msg("MZa", "CAa")).await.expect("send");
    assert_eq!(expect_close(&mut a).await, Some(CloseCode::Normal));
    w.wait_records(1).await;
    // The slot is free once the call's task has ended (just after its
    // record): bounded retries.
    let mut status = 0;
    for _ in 0..50 {
        status = raw_upgrade(w.addr, &[]).await.status;
        if status == 101 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, 101);
    b.send(stop_msg("MZb", "CAb")).await.expect("send");
    assert_eq!(expect_close(&mut b).await, Some(CloseCode::Normal));
}

/// `POST /webhook/stream_ended` with `CallSid=CA1`, signed with the token
/// `secret` over `signed_url` when there is one.
async fn post_stream_ended(addr: SocketAddr, signed_url: Option<&str>) -> HttpResponse {
    let sig = signed_url.map(|url| {
        baton::twilio::signature::compute("secret", url, &[("CallSid".into(), "CA1".into())])
    });
    let mut headers = vec![("Content-Type", "application/x-www-form-urlencoded")];
    if let Some(sig) = &sig {
        headers.push(("X-Twilio-Signature", sig));
    }
    http(
        addr,
        "POST",
        "/webhook/stream_ended",
        &headers,
        b"CallSid=CA1",
    )
    .await
}

both!(worker_full_call_greeting_echo_marks_clear_stop_and_record);
async fn worker_full_call_greeting_echo_marks_clear_stop_and_record(mode: Mode) {
    let mut w = Worker::start_in(mode, "", &[]).await;
    let wav = write_caller_wav(w.dir.path());
    let rec_dir = w.dir.path().join("heard");
    let url = w.ws_url();
    let (ok, out) = callsim(&[
        "--url",
        &url,
        "--audio",
        wav.to_str().expect("path"),
        "--record-dir",
        rec_dir.to_str().expect("path"),
        "--param",
        "session=abc",
        "--json",
    ])
    .await;
    assert!(ok, "{out}");
    let v: Value = serde_json::from_str(&out).expect("summary");
    let rep = &v["reports"][0];
    assert_eq!(rep["subprotocol_echoed"], true);
    assert_eq!(rep["violations"].as_array().map(Vec::len), Some(0), "{rep}");
    assert_eq!(rep["frames_in_not_160"], 0);
    // Greeting heard, then cut by the first utterance (barge-in -> clear).
    assert!(rep["greeting_latency_ms"].is_number(), "{rep}");
    assert!(rep["clears"].as_u64() >= Some(1), "{rep}");
    // Both utterances echoed, each followed by a mark that was echoed back.
    let marks: Vec<&str> = rep["marks_received"]
        .as_array()
        .expect("marks")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        marks.contains(&"utt-1") && marks.contains(&"utt-2"),
        "{rep}"
    );
    assert_eq!(rep["marks_echoed"], rep["marks_received"]);
    assert!(rep["first_reply_ms"].is_number(), "{rep}");
    assert_eq!(rep["close_code"], 1000);
    // What the caller heard is real sound.
    let heard = hound::WavReader::open(rec_dir.join("call-0.wav")).expect("recording");
    let samples: Vec<i16> = heard.into_samples::<i16>().map(Result::unwrap).collect();
    assert!(
        samples.iter().any(|s| s.unsigned_abs() > 2000),
        "recording is silent"
    );

    let call_sid = rep["call_sid"].as_str().expect("sid").to_string();
    let records = w.wait_records(1).await;
    let r = &records[0];
    assert_eq!(r["call_sid"], call_sid.as_str());
    assert_eq!(r["stream_sid"], rep["stream_sid"]);
    assert_eq!(r["custom_parameters"]["session"], "abc");
    assert_eq!(r["end_reason"], "stop");
    assert_eq!(r["utterances"], 2);
    assert_eq!(r["stt_engine"], "none");
    assert!(
        r["transcript"]
            .as_array()
            .is_some_and(|t| t.len() == 2 && t.iter().all(|e| e["text"].is_null()))
    );
    assert!(r["clears"].as_u64() >= Some(1));
    assert_eq!(r["frames_in"], rep["frames_out"]);
    assert_eq!(r["frames_out"], rep["frames_in"]);
    assert_eq!(r["marks_echoed"], rep["marks_echoed"]);

    // One structured event each, carrying the call's sids.
    for name in [
        "WS_START",
        "STT_FINAL",
        "TTS_LEN_ms",
        "MEDIA_TX",
        "PING_PONG",
        "BARGE_IN",
        "WS_STOP",
    ] {
        let ev = w
            .wait_event(name, |e| e["fields"]["callSid"] == call_sid.as_str())
            .await;
        assert_eq!(ev["fields"]["streamSid"], rep["stream_sid"], "{name}");
    }
    let stt = w.events("STT_FINAL");
    assert!(
        stt.iter()
            .all(|e| e["fields"]["transcribed"] == false && e["fields"]["engine"] == "none")
    );
    let stop = w.wait_event("WS_STOP", |_| true).await;
    assert!(stop["fields"]["duration_ms"].is_number());
    assert_eq!(stop["fields"]["frames_in"], rep["frames_out"]);
}

both!(worker_serves_fifty_concurrent_calls);
async fn worker_serves_fifty_concurrent_calls(mode: Mode) {
    let mut w = Worker::start_in(mode, "", &[]).await;
    let wav = write_caller_wav(w.dir.path());
    let url = w.ws_url();
    let (ok, out) = callsim(&[
        "--url",
        &url,
        "--audio",
        wav.to_str().expect("path"),
        "--calls",
        "50",
        "--fast",
        "--linger-ms",
        "300",
        "--json",
    ])
    .await;
    assert!(ok, "{out}");
    let v: Value = serde_json::from_str(&out).expect("summary");
    assert_eq!(v["calls"], 50);
    assert_eq!(v["ok"], 50, "{v}");
    let records = w.wait_records(50).await;
    assert_eq!(records.len(), 50);
    assert!(
        records
            .iter()
            .all(|r| r["end_reason"] == "stop" && r["utterances"] == 2)
    );
    assert_eq!(http(w.addr, "GET", "/healthz", &[], b"").await.status, 200);
}

both!(worker_skips_bad_messages_and_keeps_the_call);
async fn worker_skips_bad_messages_and_keeps_the_call(mode: Mode) {
    let mut w = Worker::start_in(mode, "", &[]).await;
    let mut ws = ws_connect(&w.ws_url()).await;
    ws.send(connected_msg()).await.expect("send");
    ws.send(media_msg("MZbad", 1)).await.expect("send"); // before start
    ws.send(Message::Text("{not json".into()))
        .await
        .expect("send");
    ws.send(Message::Text(
        r#"{"event":"hangup","streamSid":"MZ1"}"#.into(),
    ))
    .await
    .expect("send");
    ws.send(Message::Text(
        r#"{"event":"media","streamSid":"MZ1"}"#.into(),
    ))
    .await
    .expect("send");
    ws.send(Message::Binary(vec![0xFF; 160].into()))
        .await
        .expect("send");
    ws.send(start_msg("MZ1", "CAbad")).await.expect("send");
    ws.send(media_msg("MZother", 2)).await.expect("send"); // wrong streamSid
    ws.send(media_msg("MZ1", 3)).await.expect("send");
    // The outbound track (what the caller hears) is no caller speech:
    // skipped, said once.
    for seq in [4, 5] {
        let Message::Text(m) = media_msg("MZ1", seq) else {
            unreachable!()
        };
        let m = m.replace(r#""track":"inbound""#, r#""track":"outbound""#);
        ws.send(Message::Text(m.into())).await.expect("send");
    }
    // A digit is one character: a long one is bounded like any text.
    let digit = "7".repeat(50_000);
    ws.send(Message::Text(
        serde_json::json!({"event": "dtmf", "sequenceNumber": "6", "streamSid": "MZ1",
                           "dtmf": {"track": "inbound_track", "digit": digit}})
        .to_string()
        .into(),
    ))
    .await
    .expect("send");
    // Still alive: the greeting arrives, for our stream.
    let m = expect_media(&mut ws).await;
    assert_eq!(m["streamSid"], "MZ1");
    ws.send(stop_msg("MZ1", "CAbad")).await.expect("send");
    assert_eq!(expect_close(&mut ws).await, Some(CloseCode::Normal));

    let records = w.wait_records(1).await;
    assert_eq!(records[0]["call_sid"], "CAbad");
    assert_eq!(records[0]["protocol_warnings"], 7, "{}", records[0]);
    assert_eq!(records[0]["frames_in"], 1);
    let dtmf = w.events("DTMF");
    let logged = dtmf[0]["fields"]["digit"].as_str().expect("digit");
    assert!(
        logged.len() < 300 && logged.starts_with("777"),
        "{} bytes",
        logged.len()
    );
    let warnings: Vec<String> = w
        .events("WS_PROTOCOL_WARNING")
        .iter()
        .filter_map(|e| e["fields"]["what"].as_str().map(str::to_string))
        .collect();
    for what in [
        "media before start",
        "malformed message",
        "unknown event",
        "binary frame",
        "wrong streamSid",
        "media of a track other than inbound (skipped)",
    ] {
        assert!(
            warnings.iter().any(|x| x == what),
            "{what} not logged: {warnings:?}"
        );
    }
    assert_eq!(http(w.addr, "GET", "/healthz", &[], b"").await.status, 200);
}

both!(worker_counts_sequence_gaps_and_keeps_the_call);
async fn worker_counts_sequence_gaps_and_keeps_the_call(mode: Mode) {
    let mut w = Worker::start_in(mode, "", &[]).await;
    let mut ws = ws_connect(&w.ws_url()).await;
    ws.send(start_msg("MZseq", "CAseq")).await.expect("send");
    // 1 (start), 2, then 3 and 4 lost, 5, 4 late, 6, and stop as 7.
    for seq in [2, 5, 4, 6] {
        ws.send(media_msg("MZseq", seq)).await.expect("send");
    }
    // The call goes on: the greeting plays.
    let m = expect_media(&mut ws).await;
    assert_eq!(m["streamSid"], "MZseq");
    ws.send(Message::Text(
        serde_json::json!({"event": "stop", "sequenceNumber": "7", "streamSid": "MZseq",
                           "stop": {"accountSid": "AC1", "callSid": "CAseq"}})
        .to_string()
        .into(),
    ))
    .await
    .expect("send");
    assert_eq!(expect_close(&mut ws).await, Some(CloseCode::Normal));
    let records = w.wait_records(1).await;
    let r = &records[0];
    assert_eq!(r["frames_in"], 4, "every media message was played: {r}");
    assert_eq!(r["sequence_gaps"], 2, "{r}");
    assert_eq!(r["messages_missing"], 2, "{r}");
    assert_eq!(r["protocol_warnings"], 0, "{r}");
    let gaps: Vec<(u64, u64)> = w
        .events("WS_SEQUENCE_GAP")
        .iter()
        .map(|e| {
            let f = &e["fields"];
            (
                f["got"].as_u64().unwrap_or(0),
                f["expected"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(gaps, vec![(5, 3), (4, 6)]);
    // A counter at the top of its range, and one after it, leave the call
    // (and the worker) alive.
    let mut ws = ws_connect(&w.ws_url()).await;
    ws.send(start_msg("MZmax", "CAmax")).await.expect("send");
    ws.send(media_msg("MZmax", u64::MAX)).await.expect("send");
    ws.send(media_msg("MZmax", 3)).await.expect("send");
    let m = expect_media(&mut ws).await;
    assert_eq!(m["streamSid"], "MZmax");
    ws.send(stop_msg("MZmax", "CAmax")).await.expect("send");
    assert_eq!(expect_close(&mut ws).await, Some(CloseCode::Normal));
    let records = w.wait_records(2).await;
    let r = records
        .iter()
        .find(|r| r["call_sid"] == "CAmax")
        .expect("the second call's record");
    assert_eq!(r["frames_in"], 2, "{r}");
    assert_eq!(r["sequence_gaps"], 3, "{r}");
    // A `start` without a number is message 1 all the same, and a message
    // skipped for its streamSid that has the number due was not lost: no
    // gap.
    let mut ws = ws_connect(&w.ws_url()).await;
    ws.send(Message::Text(
        serde_json::json!({
            "event": "start", "streamSid": "MZnoseq",
            "start": {"accountSid": "AC1", "streamSid": "MZnoseq", "callSid": "CAnoseq",
                      "tracks": ["inbound"], "customParameters": {},
                      "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}
        })
        .to_string()
        .into(),
    ))
    .await
    .expect("send");
    ws.send(media_msg("MZnoseq", 2)).await.expect("send");
    ws.send(media_msg("MZelsewhere", 3)).await.expect("send");
    // Another stream's stray number is not this one's to judge by.
    ws.send(media_msg("MZelsewhere", 1000)).await.expect("send");
    ws.send(media_msg("MZnoseq", 4)).await.expect("send");
    ws.send(Message::Text(
        serde_json::json!({"event": "stop", "sequenceNumber": "5", "streamSid": "MZnoseq",
                           "stop": {"accountSid": "AC1", "callSid": "CAnoseq"}})
        .to_string()
        .into(),
    ))
    .await
    .expect("send");
    assert_eq!(expect_close(&mut ws).await, Some(CloseCode::Normal));
    let records = w.wait_records(3).await;
    let r = records
        .iter()
        .find(|r| r["call_sid"] == "CAnoseq")
        .expect("the third call's record");
    assert_eq!(r["frames_in"], 2, "{r}");
    assert_eq!(r["sequence_gaps"], 0, "{r}");
    assert_eq!(r["messages_missing"], 0, "{r}");
    assert_eq!(r["protocol_warnings"], 2, "only the wrong streamSids: {r}");
    assert_eq!(http(w.addr, "GET", "/healthz", &[], b"").await.status, 200);
}

both!(worker_closes_oversized_frames_cleanly_and_survives);
async fn worker_closes_oversized_frames_cleanly_and_survives(mode: Mode) {
    let mut w = Worker::start_in(mode, "max_message_bytes = 4096", &[]).await;
    let mut ws = ws_connect(&w.ws_url()).await;
    ws.send(start_msg("MZbig", "CAbig")).await.expect("send");
    let _ = expect_media(&mut ws).await;
    let big = format!(r#"{{"event":"media","pad":"{}"}}"#, "x".repeat(100 * 1024));
    // The server may close mid-write; either way it must not crash.
    let _ = ws.send(Message::Text(big.into())).await;
    let code = expect_close(&mut ws).await;
    assert!(matches!(code, Some(CloseCode::Size) | None), "{code:?}");
    let rec = w.wait_records(1).await;
    assert_eq!(rec[0]["end_reason"], "message too big");
    assert_eq!(http(w.addr, "GET", "/healthz", &[], b"").await.status, 200);
    // And a new call works.
    let mut ws = ws_connect(&w.ws_url()).await;
    ws.send(start_msg("MZok", "CAok")).await.expect("send");
    let _ = expect_media(&mut ws).await;
}

/// What a `start` carries is kept in the record bounded like any text the
/// caller sends (256 bytes a field, 2,000 entries a list), while the
/// streamSid goes back in every outbound message exactly as it came.
#[tokio::test]
async fn the_fields_of_a_start_are_bounded_in_the_record() {
    let mut w = Worker::start("", &[]).await;
    let mut ws = ws_connect(&w.ws_url()).await;
    let sid = format!("MZ{}", "s".repeat(400));
    let params: serde_json::Map<String, Value> = (0..2100)
        .map(|i| (format!("k{i:04}"), Value::from("v")))
        .chain([
            ("a_long".to_string(), Value::from("x".repeat(3000))),
            // Under Twilio's 500 characters for the pair: kept whole.
            ("a_session".to_string(), Value::from("t".repeat(480))),
        ])
        .collect();
    let start = serde_json::json!({
        "event": "start", "sequenceNumber": "1", "streamSid": sid,
        "start": {"accountSid": format!("AC{}", "a".repeat(1000)), "streamSid": sid,
                  "callSid": format!("CA{}", "c".repeat(1000)), "tracks": ["inbound"],
                  "customParameters": params,
                  "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}
    });
    ws.send(Message::Text(start.to_string().into()))
        .await
        .expect("send");
    let media = expect_media(&mut ws).await;
    assert_eq!(media["streamSid"].as_str(), Some(sid.as_str()));
    ws.send(stop_msg(&sid, "CA")).await.expect("send");
    let rec = w.wait_records(1).await;
    let r = &rec[0];
    let len = |v: &Value| v.as_str().map_or(usize::MAX, str::len);
    for field in ["call_sid", "stream_sid", "account_sid"] {
        assert!(len(&r[field]) <= 256 + 3, "{field}: {}", r[field]);
    }
    let kept = r["custom_parameters"].as_object().expect("parameters");
    assert_eq!(kept.len(), 2000);
    assert!(kept.iter().all(|(k, v)| k.len() <= 2051 && len(v) <= 2051));
    assert!(kept["a_long"].as_str().is_some_and(|v| v.ends_with('…')));
    assert_eq!(kept["a_session"].as_str().map(str::len), Some(480));
}

both!(worker_handles_calls_without_start);
async fn worker_handles_calls_without_start(mode: Mode) {
    let mut w = Worker::start_in(mode, "", &[]).await;
    // stop without start: closed cleanly.
    let mut ws = ws_connect(&w.ws_url()).await;
    ws.send(connected_msg()).await.expect("send");
    ws.send(stop_msg("MZx", "CAx")).await.expect("send");
    assert_eq!(expect_close(&mut ws).await, Some(CloseCode::Normal));
    // Connect and vanish without a close handshake.
    let ws = ws_connect(&w.ws_url()).await;
    drop(ws);
    let records = w.wait_records(2).await;
    assert!(records.iter().all(|r| r["call_sid"].is_null()));
    assert!(records.iter().any(|r| r["end_reason"] == "stop"));
    assert_eq!(http(w.addr, "GET", "/healthz", &[], b"").await.status, 200);
}

both!(a_socket_that_sends_no_start_in_time_is_closed_with_1008);
/// Twilio sends `start` right after `connected`; a socket that has not by
/// `start_timeout_ms` is closed with 1008 and recorded, while a call that
/// started in time lives on past that moment.
async fn a_socket_that_sends_no_start_in_time_is_closed_with_1008(mode: Mode) {
    let mut w = Worker::start_in(mode, "start_timeout_ms = 800", &[]).await;
    let mut idle = ws_connect(&w.ws_url()).await;
    idle.send(connected_msg()).await.expect("send");
    let mut call = ws_connect(&w.ws_url()).await;
    call.send(start_msg("MZintime", "CAintime"))
        .await
        .expect("send");
    // The idle socket answers the worker's pings (the client library does
    // while it reads), so only the missing `start` can close it.
    let opened = std::time::Instant::now();
    assert_eq!(expect_close(&mut idle).await, Some(CloseCode::Policy));
    assert!(
        opened.elapsed() >= std::time::Duration::from_millis(500),
        "closed before its start_timeout_ms"
    );
    // The call that started is not touched by the same clock.
    call.send(media_msg("MZintime", 2)).await.expect("send");
    expect_media(&mut call).await;
    call.send(stop_msg("MZintime", "CAintime"))
        .await
        .expect("send");
    assert_eq!(expect_close(&mut call).await, Some(CloseCode::Normal));
    let records = w.wait_records(2).await;
    let idle_rec = records
        .iter()
        .find(|r| r["end_reason"] == "no start message")
        .unwrap_or_else(|| panic!("no record of the idle socket: {records:?}"));
    assert!(idle_rec["call_sid"].is_null(), "{idle_rec}");
    assert_eq!(idle_rec["protocol_warnings"], 1, "{idle_rec}");
    assert!(
        records
            .iter()
            .any(|r| r["call_sid"] == "CAintime" && r["end_reason"] == "stop"),
        "{records:?}"
    );
}

#[tokio::test]
async fn worker_sigterm_lets_calls_finish_then_exits() {
    let mut w = Worker::start("shutdown_grace_ms = 30000", &[]).await;
    let mut ws = ws_connect(&w.ws_url()).await;
    ws.send(start_msg("MZterm", "CAterm")).await.expect("send");
    let _ = expect_media(&mut ws).await;
    w.signal(nix::sys::signal::Signal::SIGTERM);
    w.wait_event("shutting down: no longer accepting", |_| true)
        .await;
    // No new connections...
    assert!(
        TcpStream::connect(w.addr).await.is_err(),
        "listener still open after SIGTERM"
    );
    // ...but the open call goes on.
    ws.send(media_msg("MZterm", 2)).await.expect("send");
    let _ = expect_media(&mut ws).await;
    ws.send(stop_msg("MZterm", "CAterm")).await.expect("send");
    assert_eq!(expect_close(&mut ws).await, Some(CloseCode::Normal));
    let status = w.wait_exit().await;
    assert!(status.success(), "{status:?}");
    assert_eq!(w.records().len(), 1);
}

#[tokio::test]
async fn worker_sigterm_closes_calls_after_grace() {
    let mut w = Worker::start("shutdown_grace_ms = 300", &[]).await;
    let mut ws = ws_connect(&w.ws_url()).await;
    ws.send(start_msg("MZg", "CAg")).await.expect("send");
    let _ = expect_media(&mut ws).await;
    w.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(expect_close(&mut ws).await, Some(CloseCode::Away));
    assert!(w.wait_exit().await.success());
    let rec = w.records();
    assert_eq!(rec[0]["end_reason"], "server shutting down");
}

/// `media-worker --check --config CFG`.
async fn worker_check(cfg: impl AsRef<std::ffi::OsStr>) -> std::process::Output {
    tokio::process::Command::new(MEDIA_WORKER)
        .arg("--check")
        .arg("--config")
        .arg(cfg)
        .output()
        .await
        .expect("run media-worker --check")
}

#[tokio::test]
async fn a_worker_told_of_a_unix_socket_it_did_not_inherit_says_so_and_exits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("media-worker.toml");
    std::fs::write(&cfg, "data_dir = \"data\"\ntts = \"tone\"\n").expect("write");
    let out = tokio::time::timeout(
        PATIENCE,
        tokio::process::Command::new(MEDIA_WORKER)
            .arg("--config")
            .arg(&cfg)
            .env("BATON_SOCKET", dir.path().join("worker-1.sock"))
            .env("PORT", "0")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("media-worker did not exit")
    .expect("run media-worker");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("BATON_SOCKET is set"), "{err}");
}

/// HTTP connections that send no complete request head within
/// `header_timeout_ms` are closed: one that sends nothing, one that stops
/// halfway through a head, and a kept-alive one that goes quiet; and a
/// webhook whose body does not come gets 408 and the close.
#[tokio::test]
async fn worker_closes_http_connections_that_send_no_request_in_time() {
    let w = Worker::start("header_timeout_ms = 300", &[]).await;
    let mut body = TcpStream::connect(w.addr).await.expect("connect");
    body.write_all(
        b"POST /webhook/incoming_call HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\nCallSid=CA1",
    )
    .await
    .expect("write");
    let mut buf = Vec::new();
    let read = tokio::time::timeout(PATIENCE, body.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "body: still open");
    let answer = String::from_utf8_lossy(&buf);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let mut idle = TcpStream::connect(w.addr).await.expect("connect");
    let mut half = TcpStream::connect(w.addr).await.expect("connect");
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let mut kept = TcpStream::connect(w.addr).await.expect("connect");
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    for (name, conn) in [
        ("idle", &mut idle),
        ("half", &mut half),
        ("kept", &mut kept),
    ] {
        // Until the worker closes it: EOF (after a 408, or an answer).
        let mut buf = Vec::new();
        let read = tokio::time::timeout(PATIENCE, conn.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "{name}: still open");
    }
    // And it serves on.
    let r = http(w.addr, "GET", "/healthz", &[], b"").await;
    assert_eq!(r.status, 200);
}

/// A TCP socket handed over that was never listened on: the worker says
/// so and exits, instead of looking up while every accept fails.
#[tokio::test]
async fn a_worker_handed_a_socket_that_is_not_listening_says_so_and_exits() {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("media-worker.toml");
    std::fs::write(&cfg, "data_dir = \"data\"\ntts = \"tone\"\n").expect("write");
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .expect("socket");
    let child = crate::support::spawn_on_listener(
        MEDIA_WORKER,
        &cfg,
        std::net::TcpListener::from(fd),
        &[],
        Stdio::piped(),
    );
    let out = tokio::time::timeout(PATIENCE, child.wait_with_output())
        .await
        .expect("media-worker did not exit")
        .expect("wait");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not listening"), "{err}");
}

#[tokio::test]
async fn worker_config_errors_name_file_line_column_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "greeting_text = \"hi\"\n\n[vad]\nthreshold = \"loud\"\n",
    )
    .expect("write");
    let out = worker_check(&cfg).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:4:13: key `vad.threshold`", cfg.display())),
        "{err}"
    );
    std::fs::write(&cfg, "max_calls = 0\n").expect("write");
    let out = worker_check(&cfg).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("max_calls") && err.contains("must be > 0"),
        "{err}"
    );
    std::fs::write(&cfg, "greting_text = \"hi\"\n").expect("write");
    let out = worker_check(&cfg).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:1:1: key `greting_text`", cfg.display())),
        "{err}"
    );
    // The shipped example config works as is.
    let out = worker_check(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/etc/media-worker.toml"
    ))
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `realtime_priority`: the worker's runtime threads and its pacer run at
/// `SCHED_FIFO`, its blocking pool (the speech engines' work) does not;
/// where real-time scheduling is not allowed it says why and serves.
#[tokio::test]
async fn worker_realtime_priority_covers_the_threads_that_move_frames() {
    let w = Worker::start("realtime_priority = 12", &[]).await;
    let pid = w.child.id().expect("pid");
    let said = |what: &str| {
        w.lines
            .lock()
            .expect("log lock")
            .iter()
            .any(|l| l.contains(what))
    };
    let threads = crate::support::thread_policies(pid);
    let pacer = threads.iter().find(|(name, _, _)| name == "pacer");
    if crate::support::realtime_allowed() {
        assert!(said("SCHED_FIFO priority 12 on"), "{threads:?}");
        assert_eq!(
            pacer.map(|(_, fifo, prio)| (*fifo, *prio)),
            Some((true, 12)),
            "{threads:?}"
        );
        let named = |want: &str| -> Vec<(bool, u32)> {
            threads
                .iter()
                .filter(|(name, _, _)| name == want)
                .map(|(_, fifo, prio)| (*fifo, *prio))
                .collect()
        };
        let workers = named("rt-worker");
        assert!(!workers.is_empty(), "{threads:?}");
        assert!(workers.iter().all(|p| *p == (true, 12)), "{threads:?}");
        assert_eq!(named("media-worker"), vec![(true, 12)], "{threads:?}");
        // The blocking pool (file work at start-up, the speech engines'
        // work later) keeps normal scheduling.
        assert!(
            named("rt-blocking").iter().all(|p| *p == (false, 0)),
            "{threads:?}"
        );
    } else {
        assert!(said("realtime_priority not applied"), "{threads:?}");
        assert!(said("SCHED_FIFO priority 12"), "{threads:?}");
        assert_eq!(pacer.map(|(_, fifo, _)| *fifo), Some(false));
    }
    let r = http(w.addr, "GET", "/healthz", &[], b"").await;
    assert_eq!(r.status, 200);
    // Out of range: a config error naming the key.
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("rt.toml");
    std::fs::write(&cfg, "realtime_priority = 100\n").expect("write");
    let out = worker_check(&cfg).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("realtime_priority"), "{err}");
    assert!(err.contains("between 0"), "{err}");
}

/// Only where the Debian recogniser and synthesiser are installed: a spoken
/// word goes through mu-law, the VAD and PocketSphinx into STT_FINAL and the
/// call record.
#[tokio::test]
async fn worker_transcribes_with_pocketsphinx() {
    let have = |p: &str| {
        std::process::Command::new(p)
            .arg("--help")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    };
    // scripts/deps test installs both; a missing engine is a failure.
    assert!(
        have("pocketsphinx_continuous") && have("espeak-ng"),
        "pocketsphinx_continuous and espeak-ng must be installed (scripts/deps test)"
    );
    let mut w = Worker::start("stt = \"pocketsphinx\"", &[]).await;
    let spoken = w.dir.path().join("spoken.wav");
    let st = tokio::process::Command::new("espeak-ng")
        .args(["-s", "140", "-w"])
        .arg(&spoken)
        .arg("hello, this is a longer sentence so that a partial transcript comes first")
        .status()
        .await
        .expect("espeak-ng");
    assert!(st.success());
    // Pad with silence so the VAD sees the end of the utterance.
    let pcm = {
        let r = hound::WavReader::open(&spoken).expect("wav");
        let rate = r.spec().sample_rate;
        let mut pcm = vec![0i16; rate as usize / 2];
        pcm.extend(r.into_samples::<i16>().map(Result::unwrap));
        pcm.extend(vec![0i16; rate as usize * 3 / 2]);
        (rate, pcm)
    };
    let caller = w.dir.path().join("caller.wav");
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: pcm.0,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut wr = hound::WavWriter::create(&caller, spec).expect("wav");
    for s in &pcm.1 {
        wr.write_sample(*s).expect("sample");
    }
    wr.finalize().expect("finalize");

    let url = w.ws_url();
    let (ok, out) = callsim(&[
        "--url",
        &url,
        "--audio",
        caller.to_str().expect("path"),
        "--linger-ms",
        "300",
        "--json",
    ])
    .await;
    assert!(ok, "{out}");
    // In real time the utterance lasts seconds: a partial transcript of
    // the speech so far is logged before the final one.
    let partial = w.wait_event("STT_PARTIAL", |_| true).await;
    assert_eq!(partial["fields"]["engine"], "pocketsphinx");
    assert_eq!(partial["fields"]["utterance"], 1);
    assert!(
        partial["fields"]["heard_ms"]
            .as_u64()
            .is_some_and(|ms| ms >= 1000),
        "{partial}"
    );
    let ev = w.wait_event("STT_FINAL", |_| true).await;
    assert_eq!(ev["fields"]["engine"], "pocketsphinx");
    assert_eq!(ev["fields"]["transcribed"], true, "{ev}");
    assert!(ev["fields"]["text"].as_str().is_some_and(|t| !t.is_empty()));
    let rec = w.wait_records(1).await;
    assert_eq!(rec[0]["stt_engine"], "pocketsphinx");
    assert!(rec[0]["transcript"][0]["text"].is_string(), "{}", rec[0]);
}

#[tokio::test]
async fn worker_closes_calls_whose_peer_stops_answering_pings() {
    let mut w = Worker::start("pong_timeout_ms = 600", &[]).await;
    // A client that completes the handshake, starts, then never reads again
    // (so it never answers a ping).
    let mut s = TcpStream::connect(w.addr).await.expect("connect");
    let req = format!(
        "GET /ws/twilio-media HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        w.addr
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        s,
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    let (mut tx, _rx) = ws.split();
    tx.send(start_msg("MZdead", "CAdead")).await.expect("send");
    // Unsolicited pongs (a heartbeat) from a peer that reads nothing are
    // no answer to the worker's pings: the call ends while they still come
    // (they go on for longer than the wait below).
    let heartbeat = tokio::spawn(async move {
        for _ in 0..400 {
            let hb = Message::Pong(bytes::Bytes::from_static(b"hb"));
            if tx.send(hb).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let stop = w
        .wait_event("WS_STOP", |e| e["fields"]["callSid"] == "CAdead")
        .await;
    assert!(
        !heartbeat.is_finished(),
        "closed only once the heartbeat ended"
    );
    heartbeat.abort();
    assert_eq!(stop["fields"]["reason"], "pong timeout");
    assert_eq!(http(w.addr, "GET", "/healthz", &[], b"").await.status, 200);
}

/// A peer that answers no ping is closed at the first ping tick
/// `pong_timeout_ms` after its first unanswered ping: with pings every
/// 200 ms (the tests' worker config) and 600 ms to answer, three pings go
/// out, then the close (not a fourth ping: a tick's own lateness does not
/// put the close off by an interval).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_gets_the_pings_its_pong_timeout_allows_then_the_close() {
    let w = Worker::start("pong_timeout_ms = 600", &[]).await;
    let mut s = TcpStream::connect(w.addr).await.expect("connect");
    let req = format!(
        "GET /ws/twilio-media HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        w.addr
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.expect("response head");
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{head:?}");
    // `start`, as a masked client frame (a zero mask), written raw: no
    // WebSocket library here to answer the pings behind the test's back.
    let Message::Text(start) = start_msg("MZsilent", "CAsilent") else {
        unreachable!()
    };
    let start = start.as_bytes();
    let mut frame = vec![0x81, 0x80 | 126];
    frame.extend_from_slice(&u16::try_from(start.len()).expect("short").to_be_bytes());
    frame.extend_from_slice(&[0; 4]);
    frame.extend_from_slice(start);
    s.write_all(&frame).await.expect("start");
    let (mut pings, mut close) = (0, None);
    tokio::time::timeout(PATIENCE, async {
        loop {
            let mut h = [0u8; 2];
            if s.read_exact(&mut h).await.is_err() {
                return;
            }
            let mut len = u64::from(h[1] & 0x7f);
            if len == 126 {
                let mut b = [0u8; 2];
                s.read_exact(&mut b).await.expect("length");
                len = u64::from(u16::from_be_bytes(b));
            } else if len == 127 {
                let mut b = [0u8; 8];
                s.read_exact(&mut b).await.expect("length");
                len = u64::from_be_bytes(b);
            }
            let mut payload = vec![0u8; usize::try_from(len).expect("length")];
            s.read_exact(&mut payload).await.expect("payload");
            match h[0] & 0x0f {
                0x9 => pings += 1,
                0x8 => {
                    close = Some(payload);
                    return;
                }
                _ => {}
            }
        }
    })
    .await
    .expect("no close");
    let close = close.expect("the connection ended without a close frame");
    assert_eq!(
        close.get(..2),
        Some(&1001u16.to_be_bytes()[..]),
        "{close:?}"
    );
    assert_eq!(pings, 3);
}

#[tokio::test]
async fn a_worker_that_stalled_reads_the_waiting_pong_before_judging_the_peer() {
    use nix::sys::signal::Signal;
    // Pings every 200 ms (the test config), 600 ms to answer.
    let mut w = Worker::start("pong_timeout_ms = 600", &[]).await;
    let mut ws = ws_connect(&w.ws_url()).await;
    ws.send(start_msg("MZfrz", "CAfrz")).await.expect("send");
    // Each round: a ping arrives, the worker is stopped before it can read
    // the pong, the pong goes out, and the worker resumes well past its
    // pong timeout with the pong waiting in its socket. The peer answered
    // in time: the call must go on. (Which of the overdue ping timer and
    // the readable pong the worker sees first is up to its scheduler, so
    // several rounds.)
    for round in 0..4 {
        tokio::time::timeout(PATIENCE, async {
            loop {
                match ws.next().await {
                    Some(Ok(Message::Ping(_))) => return,
                    Some(Ok(_)) => {}
                    other => panic!("call ended in round {round}: {other:?}"),
                }
            }
        })
        .await
        .expect("no ping");
        w.signal(Signal::SIGSTOP);
        // tungstenite queued the pong when it read the ping.
        ws.flush().await.expect("pong");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        w.signal(Signal::SIGCONT);
    }
    ws.send(media_msg("MZfrz", 2)).await.expect("send");
    ws.send(stop_msg("MZfrz", "CAfrz")).await.expect("send");
    assert_eq!(expect_close(&mut ws).await, Some(CloseCode::Normal));
    let rec = w.wait_records(1).await;
    assert_eq!(rec[0]["end_reason"], "stop", "{}", rec[0]);
}

/// A `start` sent in time while the worker was stopped (SIGSTOP, or
/// starved of CPU) waits in its socket: when the worker runs again past
/// `start_timeout_ms`, it reads it and the call goes on.
#[tokio::test]
async fn a_start_that_came_while_the_worker_was_stopped_counts_as_in_time() {
    use nix::sys::signal::Signal;
    let mut w = Worker::start("start_timeout_ms = 1000", &[]).await;
    for round in 0..3 {
        let sid = format!("MZstall{round}");
        let mut ws = ws_connect(&w.ws_url()).await;
        ws.send(connected_msg()).await.expect("send");
        w.signal(Signal::SIGSTOP);
        tokio::time::sleep(Duration::from_millis(100)).await;
        ws.send(start_msg(&sid, "CAstall")).await.expect("send");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        w.signal(Signal::SIGCONT);
        ws.send(media_msg(&sid, 2)).await.expect("send");
        ws.send(stop_msg(&sid, "CAstall")).await.expect("send");
        assert_eq!(
            expect_close(&mut ws).await,
            Some(CloseCode::Normal),
            "round {round}"
        );
    }
    let recs = w.wait_records(3).await;
    assert!(recs.iter().all(|r| r["end_reason"] == "stop"), "{recs:?}");
}

/// A deliberately broken "worker": callsim must flag what Twilio would
/// reject and exit non-zero.
#[tokio::test]
async fn callsim_flags_protocol_violations() {
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

    // tungstenite's handshake callback type returns a large Err; not ours.
    #[allow(clippy::result_large_err)]
    async fn serve_one(listener: tokio::net::TcpListener, echo_protocol: bool) {
        let (s, _) = listener.accept().await.expect("accept");
        let cb = move |req: &Request, mut resp: Response| {
            if echo_protocol && req.headers().contains_key("sec-websocket-protocol") {
                resp.headers_mut().insert(
                    "sec-websocket-protocol",
                    "audio.twilio.com".parse().expect("hv"),
                );
            }
            Ok(resp)
        };
        let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(s, cb).await else {
            return; // the client refused the handshake
        };
        let mut sid = String::new();
        while let Some(Ok(m)) = ws.next().await {
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(t.as_str()).expect("json");
            if v["event"] == "start" {
                sid = v["streamSid"].as_str().expect("sid").to_string();
                let riff = base64::Engine::encode(
                    &base64::engine::general_purpose::STANDARD,
                    b"RIFF\x24\x00\x00\x00WAVEfmt ",
                );
                let msgs = [
                    Message::Binary(vec![0xFF; 160].into()),
                    Message::Text(serde_json::json!({"event":"media","streamSid":sid,"media":{"payload":riff}}).to_string().into()),
                    Message::Text(serde_json::json!({"event":"media","streamSid":"MZwrong","media":{"payload":"//8="}}).to_string().into()),
                    Message::Text(r#"{"event":"hello"}"#.into()),
                    Message::Text("{oops".into()),
                ];
                for m in msgs {
                    ws.send(m).await.expect("send");
                }
            }
            if v["event"] == "stop" {
                let _ = ws.close(None).await;
                break;
            }
        }
        assert!(!sid.is_empty());
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let wav = write_caller_wav(dir.path());
    let wav = wav.to_str().expect("path");

    // 1. Offered the subprotocol, got none back.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!(
        "ws://{}/ws/twilio-media",
        listener.local_addr().expect("addr")
    );
    let server = tokio::spawn(serve_one(listener, false));
    let (ok, out) = callsim(&["--url", &url, "--audio", wav, "--fast", "--json"]).await;
    assert!(!ok);
    let v: Value = serde_json::from_str(&out).expect("summary");
    assert!(
        v["reports"][0]["violations"][0]
            .as_str()
            .is_some_and(|s| s.contains("echoed none")),
        "{v}"
    );
    let _ = tokio::time::timeout(PATIENCE, server).await;

    // 2. Binary frame, RIFF header in a payload, wrong streamSid, unknown event, bad JSON.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!(
        "ws://{}/ws/twilio-media",
        listener.local_addr().expect("addr")
    );
    let server = tokio::spawn(serve_one(listener, true));
    let (ok, out) = callsim(&[
        "--url",
        &url,
        "--audio",
        wav,
        "--fast",
        "--linger-ms",
        "200",
        "--json",
    ])
    .await;
    assert!(!ok);
    let v: Value = serde_json::from_str(&out).expect("summary");
    let violations: Vec<&str> = v["reports"][0]["violations"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for want in [
        "binary frame",
        "RIFF",
        "wrong streamSid",
        "unknown event",
        "bad JSON",
    ] {
        assert!(
            violations.iter().any(|x| x.contains(want)),
            "{want} not flagged: {violations:?}"
        );
    }
    tokio::time::timeout(PATIENCE, server)
        .await
        .expect("server")
        .expect("server task");
}

/// media-worker's stderr that nobody reads (a stalled journal, a supervisor
/// that stopped reading) does not stop it serving: log lines past a bounded
/// queue are dropped, and the count is logged once stderr takes lines again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_keeps_serving_when_nobody_reads_its_stderr() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("media-worker.toml");
    std::fs::write(&cfg, "data_dir = \"data\"\ntts = \"tone\"\n").expect("config");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (read_end, write_end) = nix::unistd::pipe().expect("pipe");
    // At trace level every connection logs lines of its own (mio's).
    let mut child = crate::support::spawn_on_listener(
        MEDIA_WORKER,
        &cfg,
        listener,
        &[("RUST_LOG", "trace")],
        Stdio::from(write_end),
    );
    // 4,000 connections log some 8,000 lines: more than the pipe (about
    // 600 of them) and the queue (2,048) hold together.
    for i in 0..4000 {
        let r = http(addr, "GET", "/healthz", &[], b"").await;
        assert_eq!(r.status, 200, "request {i}");
    }
    let said = crate::support::pipe_shows(read_end, "log lines in time").await;
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let status = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .expect("media-worker did not stop")
        .expect("wait");
    assert!(said, "media-worker did not report the dropped lines");
    assert!(status.success(), "{status:?}");
}

/// Speech engines that hang (here at start-up: the greeting and the
/// recogniser probe) are killed after `engine_timeout_ms`; with `auto` the
/// worker falls back to the tone greeting and no transcripts, and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_kills_hung_speech_engines_and_falls_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hang = format!(
        "#!/bin/sh\necho $$ >> {}\nexec sleep 600\n",
        dir.path().join("hung.pids").display()
    );
    let (addr, mut child) = worker_with_fake_engines(
        dir.path(),
        &[("espeak-ng", &hang), ("pocketsphinx_continuous", &hang)],
        "data_dir = \"data\"\ntts = \"auto\"\nstt = \"auto\"\nengine_timeout_ms = 300\n",
    );
    let r = http(addr, "GET", "/version", &[], b"").await;
    assert_eq!(r.status, 200);
    let v: Value = serde_json::from_slice(&r.body).expect("version JSON");
    assert_eq!(v["engines"]["tts"], "tone", "{v}");
    assert_eq!(v["engines"]["stt"], "none", "{v}");
    // Both fakes ran, and neither is left running.
    let pids = std::fs::read_to_string(dir.path().join("hung.pids")).expect("pids");
    let pids: Vec<u32> = pids.lines().filter_map(|l| l.parse().ok()).collect();
    assert_eq!(pids.len(), 2, "{pids:?}");
    for pid in pids {
        assert!(
            crate::support::wait_gone(pid).await,
            "hung engine {pid} still runs"
        );
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
}

/// A caller that closes gets a close frame back (RFC 6455 §5.5.1), not a
/// bare end of the connection, and the call record says so; a caller that
/// floods bad messages with huge texts is bounded in the record.
#[tokio::test]
async fn worker_answers_a_callers_close_and_bounds_what_the_caller_sends() {
    let mut w = Worker::start("", &[]).await;
    let mut ws = ws_connect(&w.ws_url()).await;
    ws.send(start_msg("MZclose", "CAclose"))
        .await
        .expect("start");
    let huge = "x".repeat(60_000);
    for _ in 0..50 {
        let mark = serde_json::json!({"event": "mark", "sequenceNumber": "2",
            "streamSid": "MZclose", "mark": {"name": huge}});
        ws.send(Message::Text(mark.to_string().into()))
            .await
            .expect("mark");
        let odd = serde_json::json!({"event": huge, "streamSid": "MZclose"});
        ws.send(Message::Text(odd.to_string().into()))
            .await
            .expect("unknown event");
    }
    ws.send(Message::Close(Some(
        tokio_tungstenite::tungstenite::protocol::CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        },
    )))
    .await
    .expect("close");
    let reply = tokio::time::timeout(PATIENCE, async {
        loop {
            match ws.next().await {
                // Frames the worker sent before it read the close.
                Some(Ok(Message::Close(frame))) => return Ok(frame),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("ended without a close frame".into()),
            }
        }
    })
    .await
    .expect("no answer to the close");
    assert!(reply.is_ok(), "{reply:?}");
    let rec = w.wait_records(1).await.pop().expect("call record");
    assert_eq!(rec["end_reason"], "client_close", "{rec}");
    // Echoes of marks never sent are warnings (bounded like any), not
    // echoes.
    assert_eq!(rec["protocol_warnings"], 100, "{rec}");
    assert_eq!(rec["marks_echoed"], serde_json::json!([]), "{rec}");
    let events = rec["events"].as_array().expect("events");
    assert!(
        events
            .iter()
            .all(|e| e["detail"].as_str().is_none_or(|d| d.len() < 400)),
        "{rec}"
    );
    assert!(
        rec.to_string().len() < 100_000,
        "record of {} bytes",
        rec.to_string().len()
    );
    // The log names the first warnings only.
    w.wait_event("WS_STOP", |_| true).await;
    let logged = w
        .lines
        .lock()
        .expect("log")
        .iter()
        .filter(|l| l.contains("WS_PROTOCOL_WARNING"))
        .count();
    assert_eq!(logged, 20);
}

/// A reply plays at the caller until Twilio echoes its mark, not only
/// while the worker sends it: caller speech after the greeting was all sent
/// but before its mark came back is a barge-in (clear). The record tells
/// marks echoed because they played from those a clear dropped, and what
/// a barge-in or the call's end cut; an echo of no mark sent is a warning.
#[tokio::test]
async fn marks_tell_what_the_caller_heard() {
    let mut w = Worker::start("", &[]).await;
    let mut ws = ws_connect(&w.ws_url()).await;
    let sid = "MZmarks";
    ws.send(start_msg(sid, "CAmarks")).await.expect("start");
    let mut seq = 1;
    // The greeting is sent whole; Twilio still plays it (no echo yet).
    let m = expect_event(&mut ws, "mark").await;
    assert_eq!(m["mark"]["name"], "greeting", "{m}");
    // Well past the pacing lead, the caller speaks over it.
    tokio::time::sleep(Duration::from_millis(400)).await;
    send_audio(&mut ws, sid, &mut seq, 25, 0).await;
    let c = expect_event(&mut ws, "clear").await;
    assert_eq!(c["streamSid"], sid, "{c}");
    // Twilio echoes the marks a clear dropped.
    seq += 1;
    ws.send(mark_msg(sid, seq, "greeting")).await.expect("mark");
    // The utterance ends; its echo is sent, and played.
    send_audio(&mut ws, sid, &mut seq, 0, 30).await;
    let m = expect_event(&mut ws, "mark").await;
    assert_eq!(m["mark"]["name"], "utt-1", "{m}");
    for name in ["utt-1", "utt-1", "bogus"] {
        seq += 1;
        ws.send(mark_msg(sid, seq, name)).await.expect("mark");
    }
    // A second utterance (no barge-in: nothing plays); the stop cuts its
    // reply.
    send_audio(&mut ws, sid, &mut seq, 50, 30).await;
    let _ = expect_media(&mut ws).await;
    ws.send(stop_msg(sid, "CAmarks")).await.expect("stop");
    let rec = w.wait_records(1).await.pop().expect("call record");
    assert_eq!(rec["clears"], 1, "{rec}");
    assert_eq!(
        rec["marks_cleared"],
        serde_json::json!(["greeting"]),
        "{rec}"
    );
    assert_eq!(rec["marks_echoed"], serde_json::json!(["utt-1"]), "{rec}");
    assert_eq!(rec["protocol_warnings"], 2, "{rec}");
    let detail = |kind: &str| -> Vec<String> {
        rec["events"]
            .as_array()
            .expect("events")
            .iter()
            .filter(|e| e["kind"] == kind)
            .map(|e| e["detail"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    assert_eq!(
        detail("barge_in"),
        ["greeting: sent whole, its mark not echoed yet"],
        "{rec}"
    );
    let cut = detail("reply_cut");
    assert!(
        cut.len() == 1 && cut[0].starts_with("utt-2: ") && cut[0].ends_with("ms sent (call ended)"),
        "{rec}"
    );
    assert!(
        detail("warning")
            .iter()
            .all(|d| d.starts_with("echo of no mark sent")),
        "{rec}"
    );
}

/// A stream without the inbound track is a `<Start><Stream
/// track="outbound_track">` (`<Connect>` takes the inbound track only):
/// one-way, so nothing is sent back on it, and the record says so. One that
/// announces both tracks (a bidirectional bridge may) is answered.
#[tokio::test]
async fn nothing_is_sent_back_on_a_one_way_stream() {
    let mut w = Worker::start("", &[]).await;
    let start = |sid: &str, call: &str, tracks: &[&str]| {
        Message::Text(
            serde_json::json!({
                "event": "start", "sequenceNumber": "1", "streamSid": sid,
                "start": {"accountSid": "AC1", "streamSid": sid, "callSid": call,
                          "tracks": tracks,
                          "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}
            })
            .to_string()
            .into(),
        )
    };
    let mut both = ws_connect(&w.ws_url()).await;
    both.send(start("MZboth", "CAboth", &["inbound", "outbound"]))
        .await
        .expect("start");
    let m = expect_media(&mut both).await;
    assert_eq!(m["streamSid"], "MZboth", "{m}");
    let mut ws = ws_connect(&w.ws_url()).await;
    ws.send(start("MZoneway", "CAoneway", &["outbound"]))
        .await
        .expect("start");
    // The greeting is made (and recorded) before the stop.
    w.wait_event("TTS_LEN_ms", |e| e["fields"]["callSid"] == "CAoneway")
        .await;
    ws.send(stop_msg("MZoneway", "CAoneway"))
        .await
        .expect("stop");
    let sent: Vec<Value> = tokio::time::timeout(PATIENCE, async {
        let mut sent = Vec::new();
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Text(t) = m {
                sent.push(serde_json::from_str(t.as_str()).expect("server JSON"));
            }
        }
        sent
    })
    .await
    .expect("the call ends");
    assert!(sent.is_empty(), "{sent:?}");
    // (The both-tracks call is still open: this is the only record.)
    let rec = w.wait_records(1).await.pop().expect("call record");
    assert_eq!(rec["call_sid"], "CAoneway", "{rec}");
    assert_eq!(rec["frames_out"], 0, "{rec}");
    assert_eq!(rec["marks_sent"], serde_json::json!([]), "{rec}");
    let events = rec["events"].as_array().expect("events");
    assert!(events.iter().any(|e| e["kind"] == "listen_only"), "{rec}");
    assert!(
        events
            .iter()
            .filter(|e| e["kind"] == "reply")
            .all(|e| e["detail"]
                .as_str()
                .is_some_and(|d| d.ends_with("not sent: a one-way stream"))),
        "{rec}"
    );
}

/// A peer that echoes no marks (not Twilio) would have every reply count
/// as playing for `mark_timeout_ms` after it was sent, and speech then as
/// a barge-in: once a mark goes unanswered that long with no echo ever
/// seen, what was sent says what plays.
#[tokio::test]
async fn a_peer_that_echoes_no_marks_is_not_barged_in_on_after_each_reply() {
    let mut w = Worker::start("mark_timeout_ms = 1500\n", &[]).await;
    let mut ws = ws_connect(&w.ws_url()).await;
    let sid = "MZnoecho";
    ws.send(start_msg(sid, "CAnoecho")).await.expect("start");
    let mut seq = 1;
    let m = expect_event(&mut ws, "mark").await;
    assert_eq!(m["mark"]["name"], "greeting", "{m}");
    tokio::time::sleep(Duration::from_millis(1600)).await;
    send_audio(&mut ws, sid, &mut seq, 25, 30).await;
    let m = expect_event(&mut ws, "mark").await;
    assert_eq!(m["mark"]["name"], "utt-1", "{m}");
    // Past the pacing lead, well within mark_timeout_ms of utt-1's mark.
    tokio::time::sleep(Duration::from_millis(300)).await;
    send_audio(&mut ws, sid, &mut seq, 25, 30).await;
    let m = expect_event(&mut ws, "mark").await;
    assert_eq!(m["mark"]["name"], "utt-2", "{m}");
    ws.send(stop_msg(sid, "CAnoecho")).await.expect("stop");
    let rec = w.wait_records(1).await.pop().expect("call record");
    assert_eq!(rec["clears"], 0, "{rec}");
    let events = rec["events"].as_array().expect("events");
    assert!(
        events.iter().any(|e| e["kind"] == "marks_not_echoed"),
        "{rec}"
    );
}

/// A call whose speech comes faster than it can be transcribed (here the
/// recogniser hangs until its timeout) has at most a few transcriptions
/// waiting; later utterances are counted as not transcribed, and every
/// utterance is either transcribed (or failed) or counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_caps_the_transcriptions_a_call_has_waiting() {
    const UTTERANCES: u64 = 10;
    let dir = tempfile::tempdir().expect("tempdir");
    let (addr, mut child) = worker_with_fake_engines(
        dir.path(),
        &[(
            "pocketsphinx_continuous",
            "#!/bin/sh\n[ \"$1\" = \"-h\" ] && exit 0\nexec sleep 600\n",
        )],
        "data_dir = \"data\"\ntts = \"tone\"\nstt = \"pocketsphinx\"\nstt_concurrency = 1\nengine_timeout_ms = 500\n",
    );
    let mut ws = ws_connect(&format!("ws://{addr}/ws/twilio-media")).await;
    ws.send(start_msg("MZstt", "CAstt")).await.expect("start");
    let mut seq = 1u64;
    for _ in 0..UTTERANCES {
        send_utterance(&mut ws, "MZstt", &mut seq).await;
    }
    ws.send(stop_msg("MZstt", "CAstt")).await.expect("stop");
    let rec = wait_record(dir.path()).await;
    assert_eq!(rec["utterances"], UTTERANCES, "{rec}");
    let skipped = rec["stt_skipped"].as_u64().expect("stt_skipped");
    assert!(skipped >= 1, "{rec}");
    assert!(UTTERANCES - skipped <= 4, "{rec}");
    // One transcript entry per utterance all the same (those skipped have
    // no text), and an event for each skipped one.
    let numbers: Vec<u64> = rec["transcript"]
        .as_array()
        .expect("transcript")
        .iter()
        .map(|e| e["utterance"].as_u64().expect("utterance"))
        .collect();
    assert_eq!(numbers.len() as u64, UTTERANCES, "{rec}");
    assert!((1..=UTTERANCES).all(|n| numbers.contains(&n)), "{rec}");
    let events = rec["events"].as_array().expect("events");
    let skip_events = events.iter().filter(|e| e["kind"] == "stt_skipped").count() as u64;
    assert_eq!(skip_events, skipped, "{rec}");
    let _ = child.start_kill();
    let _ = child.wait().await;
}

/// A call closed at shutdown while its transcription still runs writes
/// its record before the worker exits, and a speech engine that hangs
/// does not hold the exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_closed_at_shutdown_keeps_its_record_while_a_transcription_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = HangingEngine::new(dir.path());
    let (addr, mut child) = worker_with_fake_engines(
        dir.path(),
        &[("pocketsphinx_continuous", &engine.script())],
        "data_dir = \"data\"\ntts = \"tone\"\nstt = \"pocketsphinx\"\nengine_timeout_ms = 60000\nshutdown_grace_ms = 300\n",
    );
    let mut ws = ws_connect(&format!("ws://{addr}/ws/twilio-media")).await;
    ws.send(start_msg("MZsd", "CAsd")).await.expect("start");
    send_utterance(&mut ws, "MZsd", &mut 1).await;
    assert!(engine.running().await, "the transcription never started");
    let pid = nix::unistd::Pid::from_raw(child.id().expect("pid") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    assert_eq!(expect_close(&mut ws).await, Some(CloseCode::Away));
    let status = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .expect("the worker did not exit")
        .expect("wait");
    assert!(status.success(), "{status:?}");
    let rec: Vec<Value> = std::fs::read_dir(dir.path().join("data/calls"))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .map(|e| serde_json::from_slice(&std::fs::read(e.path()).expect("read")).expect("json"))
        .collect();
    assert_eq!(rec.len(), 1, "no call record");
    assert_eq!(rec[0]["end_reason"], "server shutting down", "{}", rec[0]);
    assert_eq!(rec[0]["utterances"], 1, "{}", rec[0]);
    // The engine outlived the worker (its group is the supervisor's to
    // stop): this test stops it.
    engine.kill();
}

/// A fake recogniser that notes its pid and hangs until the test stops it
/// (it outlives a worker: its group is the supervisor's to stop).
struct HangingEngine {
    started: PathBuf,
}

impl HangingEngine {
    fn new(dir: &Path) -> Self {
        Self {
            started: dir.join("engine-started"),
        }
    }

    fn script(&self) -> String {
        format!(
            "#!/bin/sh\n[ \"$1\" = \"-h\" ] && exit 0\necho $$ > '{}'\nexec sleep 600\n",
            self.started.display()
        )
    }

    /// Whether a run has started, waited for (bounded).
    async fn running(&self) -> bool {
        for _ in 0..200 {
            if std::fs::read_to_string(&self.started).is_ok_and(|p| p.ends_with('\n')) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    fn kill(&self) {
        let pid: i32 = std::fs::read_to_string(&self.started)
            .expect("engine pid")
            .trim()
            .parse()
            .expect("engine pid");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// The record of the call `call_sid` in `dir`/data/calls, waited for
/// (bounded).
async fn wait_record_of(dir: &Path, call_sid: &str) -> Value {
    wait_record_where(dir, |r| r["call_sid"] == call_sid).await
}

/// The first call record in `dir`/data/calls, waited for (bounded).
async fn wait_record(dir: &Path) -> Value {
    wait_record_where(dir, |_| true).await
}

/// A call record in `dir`/data/calls that `pred` takes, waited for
/// (bounded).
async fn wait_record_where(dir: &Path, pred: impl Fn(&Value) -> bool) -> Value {
    let calls = dir.join("data/calls");
    for _ in 0..600 {
        let found = std::fs::read_dir(&calls)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .filter_map(|e| serde_json::from_slice::<Value>(&std::fs::read(e.path()).ok()?).ok())
            .find(|r| pred(r));
        if let Some(r) = found {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no such call record in {}", calls.display());
}

/// A caller who hangs up in the middle of speaking: that speech is an
/// utterance of the call (counted, transcribed for the record), and the
/// call ends when its connection does: `WS_STOP`, `ended_at`, the TCP
/// close and the call's slot come at once, not after its transcription.
/// A transcription still running when the wait for it runs out is in the
/// record as skipped, with an entry of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_ends_mid_speech_keeps_that_speech_and_ends_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = HangingEngine::new(dir.path());
    let (addr, mut child) = worker_with_fake_engines(
        dir.path(),
        &[("pocketsphinx_continuous", &engine.script())],
        "data_dir = \"data\"\ntts = \"tone\"\nstt = \"pocketsphinx\"\nengine_timeout_ms = 60000\nmax_calls = 1\n",
    );
    let mut ws = ws_connect(&format!("ws://{addr}/ws/twilio-media")).await;
    ws.send(start_msg("MZmid", "CAmid")).await.expect("start");
    // 400 ms of speech, no pause after it, then `stop`.
    send_audio(&mut ws, "MZmid", &mut 1, 20, 0).await;
    let stopped = std::time::SystemTime::now();
    ws.send(stop_msg("MZmid", "CAmid")).await.expect("stop");
    assert_eq!(expect_close(&mut ws).await, Some(CloseCode::Normal));
    // The connection ends (EOF) and the slot is free while the
    // transcription of that last speech runs.
    let eof = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match ws.next().await {
                Some(Ok(_)) => {}
                _ => return,
            }
        }
    })
    .await;
    assert!(eof.is_ok(), "the worker kept the connection open");
    assert!(
        engine.running().await,
        "the speech the call ended in was never transcribed"
    );
    let r = http(addr, "GET", "/version", &[], b"").await;
    let v: Value = serde_json::from_slice(&r.body).expect("version JSON");
    assert_eq!(v["calls_active"], 0, "{v}");
    assert!(
        !dir.path().join("data/calls").exists()
            || std::fs::read_dir(dir.path().join("data/calls"))
                .expect("calls")
                .next()
                .is_none(),
        "the record waits for the transcription"
    );
    // The ended call holds no place under `max_calls` (1) meanwhile: the
    // next caller is taken.
    let r = raw_upgrade(addr, &[]).await;
    assert_eq!(r.status, 101, "{:?}", r.status);
    let rec = wait_record_of(dir.path(), "CAmid").await;
    assert_eq!(rec["end_reason"], "stop", "{rec}");
    assert_eq!(rec["utterances"], 1, "{rec}");
    assert_eq!(rec["stt_skipped"], 1, "{rec}");
    let transcript = rec["transcript"].as_array().expect("transcript");
    assert_eq!(transcript.len(), 1, "{rec}");
    assert_eq!(transcript[0]["utterance"], 1, "{rec}");
    assert!(transcript[0]["text"].is_null(), "{rec}");
    assert!(
        transcript[0]["utterance_ms"].as_u64().expect("ms") >= 400,
        "{rec}"
    );
    // `ended_at` is when the call ended, not when the record was written.
    let ended =
        humantime::parse_rfc3339(rec["ended_at"].as_str().expect("ended_at")).expect("rfc3339");
    let after_stop = ended.duration_since(stopped).unwrap_or_default();
    assert!(after_stop < Duration::from_secs(3), "{rec}");
    engine.kill();
    let _ = child.start_kill();
    let _ = child.wait().await;
}

/// Speech longer than `max_utterance_ms` is cut into utterances that
/// hold all of it (no pause is trimmed off at a cut, and the speech after
/// a cut starts the next utterance with what came since the cut). Speech
/// that stops at the cut is answered as any utterance: no second
/// utterance of silence, no barge-in on its own reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speech_cut_at_max_utterance_ms_is_kept_whole() {
    // One call with `speech` frames of tone, then 600 ms of silence: its
    // record.
    async fn call(speech: usize, vad: &str) -> Value {
        let dir = tempfile::tempdir().expect("tempdir");
        let (addr, mut child) = worker_with_fake_engines(
            dir.path(),
            &[],
            &format!("data_dir = \"data\"\ntts = \"tone\"\n[vad]\nmax_utterance_ms = 1000\n{vad}"),
        );
        let mut ws = ws_connect(&format!("ws://{addr}/ws/twilio-media")).await;
        ws.send(start_msg("MZcut", "CAcut")).await.expect("start");
        send_audio(&mut ws, "MZcut", &mut 1, speech, 30).await;
        ws.send(stop_msg("MZcut", "CAcut")).await.expect("stop");
        let rec = wait_record(dir.path()).await;
        let _ = child.start_kill();
        let _ = child.wait().await;
        rec
    }
    let lengths = |rec: &Value| -> Vec<u64> {
        rec["transcript"]
            .as_array()
            .expect("transcript")
            .iter()
            .map(|e| e["utterance_ms"].as_u64().expect("utterance_ms"))
            .collect()
    };
    // 2.5 s without a pause: three utterances, the first two of 1000 ms
    // (the first has the 40 ms before speech was heard), all of the speech
    // in them. The caller talking on past a cut barges in on the reply to
    // what was cut, as any speech would.
    let rec = call(125, "").await;
    let got = lengths(&rec);
    assert_eq!(rec["utterances"], 3, "{rec}");
    assert_eq!(&got[..2], [1000, 1000], "{got:?}");
    assert!(got.iter().sum::<u64>() >= 2500, "{got:?}");
    // 1 s of speech, ending right at the cut: one utterance, answered.
    let rec = call(50, "").await;
    assert_eq!(rec["utterances"], 1, "{rec}");
    assert_eq!(lengths(&rec), [1000], "{rec}");
    // (The speech barges in on the greeting; nothing barges in on the
    // reply.)
    let kinds: Vec<&str> = rec["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["kind"].as_str().unwrap_or_default())
        .collect();
    let reply = kinds.iter().rposition(|k| *k == "reply").expect("a reply");
    assert!(
        !kinds[reply..].contains(&"barge_in") && !kinds[reply..].contains(&"speech_start"),
        "{rec}"
    );
    assert_eq!(rec["clears"], 1, "{rec}");
    // A start that takes longer than the 100 ms pre-roll (`start_ms`
    // 300): the first utterance has all the speech from its onset, and
    // the one after a cut all the audio since the cut.
    let rec = call(160, "start_ms = 300\n").await;
    let got = lengths(&rec);
    assert_eq!(&got[..2], [1000, 1000], "{got:?}");
}

/// One utterance to the worker on `stream_sid`: 200 ms of tone, then
/// 600 ms of silence, in media messages numbered on from `seq`.
async fn send_utterance(ws: &mut Client, stream_sid: &str, seq: &mut u64) {
    send_audio(ws, stream_sid, seq, 10, 30).await;
}

/// `speech` frames of tone then `silence` frames of silence (20 ms each),
/// numbered on from `seq`.
async fn send_audio(
    ws: &mut Client,
    stream_sid: &str,
    seq: &mut u64,
    speech: usize,
    silence: usize,
) {
    use base64::Engine;
    let frame = |pcm: &[i16]| {
        let mut ulaw = Vec::new();
        baton::twilio::mulaw::encode_into(pcm, &mut ulaw);
        base64::engine::general_purpose::STANDARD.encode(ulaw)
    };
    let speech_frame = frame(&baton::twilio::audio::tone(440.0, 20, 8000));
    let silence_frame = frame(&[0i16; 160]);
    let (speech, silence, n_speech, n_silence) = (speech_frame, silence_frame, speech, silence);
    for payload in
        std::iter::repeat_n(&speech, n_speech).chain(std::iter::repeat_n(&silence, n_silence))
    {
        *seq += 1;
        let msg = serde_json::json!({"event": "media", "sequenceNumber": seq.to_string(),
            "streamSid": stream_sid, "media": {"track": "inbound", "chunk": seq.to_string(),
            "timestamp": (*seq * 20).to_string(), "payload": payload}});
        ws.send(Message::Text(msg.to_string().into()))
            .await
            .expect("media");
    }
}

/// media-worker in `dir` with `config`, on a socket handed over (its
/// address returned), with `engines` (program name, shell script) first on
/// its `PATH` in place of the real speech engines.
fn worker_with_fake_engines(
    dir: &Path,
    engines: &[(&str, &str)],
    config: &str,
) -> (SocketAddr, tokio::process::Child) {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("bin");
    std::fs::create_dir(&bin).expect("bin dir");
    for (program, script) in engines {
        let path = bin.join(program);
        std::fs::write(&path, script).expect("fake engine");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let cfg = dir.join("media-worker.toml");
    std::fs::write(&cfg, config).expect("config");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let child = crate::support::spawn_on_listener(
        MEDIA_WORKER,
        &cfg,
        listener,
        &[("PATH", &path)],
        Stdio::null(),
    );
    (addr, child)
}
