//! The control socket: HTTP/1.1 over a Unix socket (mode 0660).
//!
//! | route | what |
//! | --- | --- |
//! | `GET /v1/status` | [`Status`](super::api::Status) as JSON |
//! | `POST /v1/deploy[?wait=1]` | build and deploy now |
//! | `POST /v1/restart[?wait=1]` | fresh process of the active snapshot |
//! | `POST /v1/reload` | re-read the config file |
//! | `GET /v1/logs?generation=N&kind=worker\|build&lines=K` | a log's tail |
//! | `GET /v1/events` | NDJSON stream of [`Event`](super::api::Event)s |
//! | `GET /metrics` | Prometheus text |
//!
//! Mutating calls are allowed only to root and to the daemon's own user,
//! checked on the connection with `SO_PEERCRED`.

use std::convert::Infallible;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use crate::control::api::{GenState, Status};
use crate::proxy::BoxError;

/// The body of control API responses (some stream, some do not).
type ProxyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;
use crate::supervisor::Job;
use crate::worker_proc::gen_dir;

/// Why the control socket could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("control socket {}: {source}", path.display())]
pub struct ControlError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// Binds the control socket at `path` (replacing a stale one) with mode 0660.
///
/// # Errors
/// [`ControlError`] when the folder or socket cannot be made, or when a live
/// daemon already answers on it.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let err = |source| ControlError {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(err)?;
    // One daemon at a time from the look at what is there to the link:
    // two that found the same stale socket would otherwise each remove
    // what the other had just put in its place.
    let folder = std::fs::File::open(dir).map_err(err)?;
    let _held = nix::fcntl::Flock::lock(folder, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| err(e.into()))?;
    // A path longer than a socket address holds is reached through the
    // folder (see `crate::endpoint`).
    let unix = crate::endpoint::UnixPath::new(path).map_err(err)?;
    let in_use = || {
        std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "another batond is answering on it",
        )
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(unix.addr()).is_ok() {
                return Err(err(in_use()));
            }
            // A socket nobody answers on: a daemon's that did not clean up.
            std::fs::remove_file(path).map_err(err)?;
        }
        // Never removed: it is not a socket a daemon left.
        Ok(_) => {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket; not replacing it",
            )));
        }
        Err(_) => {}
    }
    // Bound in a private folder beside it (its own name short, so any
    // path length still works), given its mode, then linked into place:
    // never reachable at `path` with the wider mode a umask leaves. The
    // folder's name is new each time: one a killed daemon left, which
    // this one may not be able to remove, is never in the way.
    let base = path.file_name().unwrap_or_default().to_string_lossy();
    let mut made = None;
    for _ in 0..4 {
        let private = path.with_file_name(format!(
            ".{base}.{}.{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        match std::fs::DirBuilder::new().mode(0o700).create(&private) {
            Ok(()) => {
                made = Some(private);
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(err(e)),
        }
    }
    let Some(private) = made else {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "no private folder could be made beside it",
        )));
    };
    let fresh = private.join("s");
    let placed = (|| {
        let listener = UnixListener::bind(crate::endpoint::UnixPath::new(&fresh)?.addr())?;
        std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o660))?;
        std::fs::hard_link(&fresh, path).map_err(|e| {
            // Not another batond (they wait for the lock): something else
            // made the path meanwhile.
            if e.kind() == std::io::ErrorKind::AlreadyExists
                && std::os::unix::net::UnixStream::connect(unix.addr()).is_ok()
            {
                in_use()
            } else {
                e
            }
        })?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    placed.map_err(err)
}

/// Removes the control socket at `path` at the daemon's stop, once it has
/// stopped listening, unless someone answers on it: then the path holds
/// another daemon's socket (made after someone removed this one's), which
/// must stay.
pub fn remove_unless_answered(path: &Path) {
    let answered = crate::endpoint::UnixPath::new(path)
        .is_ok_and(|u| std::os::unix::net::UnixStream::connect(u.addr()).is_ok());
    if answered {
        tracing::warn!(
            "control socket {} is another batond's now; left in place",
            path.display()
        );
    } else {
        let _ = std::fs::remove_file(path);
    }
}

/// How often [`serve`] checks that its socket is still in the filesystem.
const SOCKET_CHECK: std::time::Duration = std::time::Duration::from_secs(2);

/// Serves the control API on `listener` (bound at `path`) until `token` is
/// cancelled. A socket file someone removed (a `rm -rf` of the state dir)
/// is made again within [`SOCKET_CHECK`], so `batonctl` reaches the daemon
/// again without a restart.
pub async fn serve(
    mut listener: UnixListener,
    path: PathBuf,
    job: Job,
    state_dir: PathBuf,
    token: CancellationToken,
) {
    let me = nix::unistd::geteuid().as_raw();
    let mut check = tokio::time::interval(SOCKET_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut complained = false;
    // Failed accepts since the last warning, and when that was.
    let (mut failed, mut warned) = (0u64, None::<tokio::time::Instant>);
    loop {
        let stream = tokio::select! {
            _ = check.tick() => {
                if tokio::fs::symlink_metadata(&path).await.is_err() {
                    match bind(&path) {
                        Ok(l) => {
                            tracing::warn!("control socket {} was removed; made again", path.display());
                            listener = l;
                            complained = false;
                        }
                        Err(e) if !complained => {
                            tracing::error!("control socket {} was removed and cannot be made again: {e}", path.display());
                            complained = true;
                        }
                        Err(_) => {}
                    }
                }
                continue;
            }
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and friends: said once a second with a count,
                    // as the public listener does, not at every try.
                    failed += 1;
                    if warned.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1)) {
                        tracing::warn!(error = %e, failed, "control accept failed; retrying every 50 ms");
                        warned = Some(tokio::time::Instant::now());
                        failed = 0;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = token.cancelled() => return,
        };
        let peer_uid = stream.peer_cred().ok().map(|c| c.uid());
        let trusted = peer_uid.is_some_and(|u| u == 0 || u == me);
        let job = job.clone();
        let state_dir = state_dir.clone();
        let token = token.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let job = job.clone();
                let state_dir = state_dir.clone();
                let token = token.clone();
                async move { Ok::<_, Infallible>(route(req, &job, &state_dir, trusted, token).await) }
            });
            // A client that sends half a request (or nothing) is not kept:
            // a request head has 10 s to arrive. A request whose sender
            // closed its side after it is still read and routed (half
            // close): one `batonctl` gave up on must reach `route`, which
            // says so and drops it, instead of vanishing with the
            // connection.
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .half_close(true)
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A query parameter, percent-decoded (`?kind=%62uild` is `build`), as any
/// HTTP client may encode it.
fn query(req: &Request<Incoming>, key: &str) -> Option<String> {
    form_urlencoded::parse(req.uri().query()?.as_bytes())
        .find_map(|(k, v)| (k == key).then(|| v.into_owned()))
}

fn flag(req: &Request<Incoming>, key: &str) -> bool {
    query(req, key).is_some_and(|v| v.is_empty() || v == "1" || v == "true")
}

async fn route(
    req: Request<Incoming>,
    job: &Job,
    state_dir: &Path,
    trusted: bool,
    token: CancellationToken,
) -> Response<ProxyBody> {
    // Only the calls that change something are checked: a POST to a
    // read-only route or to none gets its 405 or 404 from anyone.
    let mutating = changes_something(req.method(), req.uri().path());
    if mutating && !trusted {
        return json_error(
            StatusCode::FORBIDDEN,
            "only root or the daemon's user may change the daemon",
        );
    }
    // A change read after its sender gave up (batond was stopped or busy
    // meanwhile) is not carried out: `batonctl` has already said it got
    // no answer, and a retry must not make it two.
    let deadline = match req.headers().get(super::client::DEADLINE_HEADER) {
        None => None,
        Some(v) => match v.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()) {
            Some(ms) => Some(ms),
            None => {
                return json_error(
                    StatusCode::BAD_REQUEST,
                    &format!(
                        "{}: not a time (milliseconds since the epoch)",
                        super::client::DEADLINE_HEADER
                    ),
                );
            }
        },
    };
    if mutating
        && let Some(deadline) = deadline
        && super::client::epoch_ms(std::time::Duration::ZERO) > deadline
    {
        tracing::warn!(
            path = req.uri().path(),
            "a control request read after its sender had given up waiting; not carried out"
        );
        return json_error(
            StatusCode::REQUEST_TIMEOUT,
            "the request reached batond after its sender had given up waiting: not carried out",
        );
    }
    // HEAD is GET without the body (hyper leaves it out).
    let method = if req.method() == Method::HEAD {
        Method::GET
    } else {
        req.method().clone()
    };
    match (&method, req.uri().path()) {
        (&Method::GET, "/v1/status") => match job.status().await {
            Some(s) => json(StatusCode::OK, &s),
            None => json_error(StatusCode::SERVICE_UNAVAILABLE, "batond is stopping"),
        },
        (&Method::POST, "/v1/deploy") => {
            let wait = flag(&req, "wait");
            let o = job.deploy("ctl", wait).await;
            let code = if o.succeeded() {
                if wait {
                    StatusCode::OK
                } else {
                    StatusCode::ACCEPTED
                }
            } else {
                StatusCode::CONFLICT
            };
            json(code, &o)
        }
        (&Method::POST, "/v1/restart") => {
            let wait = flag(&req, "wait");
            let o = job.restart(wait).await;
            let code = if o.succeeded() {
                if wait {
                    StatusCode::OK
                } else {
                    StatusCode::ACCEPTED
                }
            } else {
                StatusCode::CONFLICT
            };
            json(code, &o)
        }
        (&Method::POST, "/v1/reload") => match job.reload().await {
            Ok(r) => json(
                StatusCode::OK,
                &serde_json::json!({"reloaded": true, "kept": r.kept, "advice": r.advice}),
            ),
            Err(e) => json_error(StatusCode::UNPROCESSABLE_ENTITY, &e),
        },
        (&Method::GET, "/v1/logs") => logs(&req, job, state_dir).await,
        (&Method::GET, "/v1/events") => events(job, token),
        (&Method::GET, "/metrics") => match job.status().await {
            Some(s) => metrics(&s, job),
            None => json_error(StatusCode::SERVICE_UNAVAILABLE, "batond is stopping"),
        },
        (_, path) => match allowed(path) {
            Some(allow) => {
                let mut r = json_error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    &format!("{path} takes {allow}, not {}", req.method()),
                );
                r.headers_mut()
                    .insert(http::header::ALLOW, http::HeaderValue::from_static(allow));
                r
            }
            None => json_error(StatusCode::NOT_FOUND, "no such route"),
        },
    }
}

/// A call that changes the daemon (only root and the daemon's user may).
fn changes_something(method: &Method, path: &str) -> bool {
    method == Method::POST && allowed(path) == Some("POST")
}

/// The methods a route takes (for a 405's `Allow`), `None` for no route.
fn allowed(path: &str) -> Option<&'static str> {
    match path {
        "/v1/status" | "/v1/logs" | "/v1/events" | "/metrics" => Some("GET, HEAD"),
        "/v1/deploy" | "/v1/restart" | "/v1/reload" => Some("POST"),
        _ => None,
    }
}

async fn logs(req: &Request<Incoming>, job: &Job, state_dir: &Path) -> Response<ProxyBody> {
    let kind = query(req, "kind").unwrap_or_else(|| "worker".into());
    if kind != "worker" && kind != "build" {
        return json_error(
            StatusCode::BAD_REQUEST,
            &format!("kind must be `worker` or `build`, not `{kind}`"),
        );
    }
    let lines: usize = match query(req, "lines").map(|l| l.parse().map_err(|_| l)) {
        None => 100,
        Some(Ok(n)) => n,
        Some(Err(l)) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                &format!("lines must be a whole number, not `{l}`"),
            );
        }
    };
    let generation = match query(req, "generation").map(|g| g.parse::<u64>().map_err(|_| g)) {
        Some(Ok(g)) => g,
        Some(Err(g)) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                &format!("generation must be a whole number, not `{g}`"),
            );
        }
        None => {
            let Some(s) = job.status().await else {
                return json_error(StatusCode::SERVICE_UNAVAILABLE, "batond is stopping");
            };
            // The build log: the newest build (the one running, or the
            // one that just failed beside the active worker). The worker
            // log: the active worker's, else the newest that ran (a
            // failed build has none).
            let all = || {
                s.candidate
                    .iter()
                    .chain(s.active.as_ref())
                    .chain(s.draining.iter())
                    .chain(s.history.iter())
            };
            let pick = if kind == "build" {
                all().map(|g| g.id).max()
            } else {
                s.active.as_ref().map(|g| g.id).or_else(|| {
                    all()
                        .map(|g| g.id)
                        .filter(|&id| gen_dir(state_dir, id).join("worker.log").exists())
                        .max()
                })
            };
            match pick {
                Some(g) => g,
                None if kind == "worker" && (s.candidate.is_some() || !s.history.is_empty()) => {
                    return json_error(
                        StatusCode::NOT_FOUND,
                        "no generation has run a worker yet (see `batonctl logs --build`)",
                    );
                }
                None => return json_error(StatusCode::NOT_FOUND, "no generation yet"),
            }
        }
    };
    let path = gen_dir(state_dir, generation).join(format!("{kind}.log"));
    // Where the last `lines` lines start (looking back at most 8 MiB),
    // found on the blocking pool; from there the file is streamed as it
    // is read. Never the whole tail in memory: a buffer of megabytes,
    // once freed, would stay in batond's heap for good.
    // Right after a rotation the log holds few lines: the rest of those
    // asked for come from the one before (`worker.log.1`), within the
    // same 8 MiB.
    let opened = tokio::task::spawn_blocking(move || {
        use std::io::{Seek, SeekFrom};
        const MAX: u64 = 8 << 20;
        let mut f = std::fs::File::open(&path)?;
        let (start, end, got) = crate::worker_proc::tail_lines(&mut f, lines, MAX)?;
        f.seek(SeekFrom::Start(start))?;
        let mut parts = Vec::new();
        if got < lines
            && start == 0
            && end < MAX
            && let Ok(mut old) = std::fs::File::open(crate::worker_proc::rotated(&path))
        {
            let (s1, e1, _) = crate::worker_proc::tail_lines(&mut old, lines - got, MAX - end)?;
            old.seek(SeekFrom::Start(s1))?;
            parts.push((old, e1 - s1));
        }
        parts.push((f, end - start));
        Ok::<_, std::io::Error>(parts)
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    match opened {
        Ok(parts) => {
            let mut resp = Response::new(stream_files(parts));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            resp
        }
        // A generation pruned from the history (or never made) has no
        // folder at all: said so, not as a missing file.
        Err(_) if !gen_dir(state_dir, generation).is_dir() => json_error(
            StatusCode::NOT_FOUND,
            &format!(
                "no generation {generation} is kept (see `batonctl status` for those there are)"
            ),
        ),
        Err(e) => json_error(
            StatusCode::NOT_FOUND,
            &format!("generation {generation} has no {kind} log: {e}"),
        ),
    }
}

/// A body of the given parts of files (each the next `len` bytes of its
/// file), one after another, read 16 KiB at a time as the client takes
/// them.
fn stream_files(parts: Vec<(std::fs::File, u64)>) -> ProxyBody {
    use tokio::io::AsyncReadExt;
    let readers: std::collections::VecDeque<_> = parts
        .into_iter()
        .map(|(file, len)| tokio::fs::File::from_std(file).take(len))
        .collect();
    let stream = futures_util::stream::unfold(Some(readers), |readers| async move {
        let mut readers = readers?;
        loop {
            let reader = readers.front_mut()?;
            let mut buf = bytes::BytesMut::with_capacity(16 * 1024);
            match reader.read_buf(&mut buf).await {
                Ok(0) => {
                    readers.pop_front();
                }
                Ok(_) => return Some((Ok(Frame::data(buf.freeze())), Some(readers))),
                Err(e) => return Some((Err(BoxError::from(e)), None)),
            }
        }
    });
    StreamBody::new(stream).boxed_unsync()
}

/// One NDJSON line of the events stream, or `None` once the bus is gone.
/// A reader that fell behind (the bus keeps the last 1,024) is told how
/// many events it missed, in an `events_lost` event, rather than seeing
/// a gap it cannot tell from quiet.
fn event_line(
    ev: Result<crate::control::api::Event, tokio::sync::broadcast::error::RecvError>,
) -> Option<Bytes> {
    use tokio::sync::broadcast::error::RecvError;
    let ev = match ev {
        Ok(ev) => ev,
        Err(RecvError::Lagged(n)) => crate::control::api::Event {
            ts: crate::control::api::timestamp(std::time::SystemTime::now()),
            kind: "events_lost".into(),
            generation: None,
            message: format!("{n} event(s) were not sent: this reader fell behind"),
        },
        Err(RecvError::Closed) => return None,
    };
    let mut line = serde_json::to_vec(&ev).unwrap_or_default();
    line.push(b'\n');
    Some(Bytes::from(line))
}

fn events(job: &Job, token: CancellationToken) -> Response<ProxyBody> {
    let rx = job.events.subscribe();
    let stream = futures_util::stream::unfold((rx, token), |(mut rx, token)| async move {
        let ev = tokio::select! {
            r = rx.recv() => r,
            () = token.cancelled() => return None,
        };
        let line = event_line(ev)?;
        Some((Ok(Frame::data(line)), (rx, token)))
    });
    let mut resp = Response::new(StreamBody::new(stream.boxed()).boxed_unsync());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/x-ndjson"),
    );
    resp
}

fn metrics(s: &Status, job: &Job) -> Response<ProxyBody> {
    use std::fmt::Write;
    let m = &job.proxy.metrics;
    let live = || s.active.iter().chain(&s.draining);
    let count = |state| s.history.iter().filter(|g| g.state == state).count() as u64;
    let rows: [(&str, &str, &str, u64); 21] = [
        (
            "baton_requests_total",
            "counter",
            "Requests received on the public listener.",
            m.requests.load(Ordering::Relaxed),
        ),
        (
            "baton_bad_gateway_total",
            "counter",
            "502 responses made by the proxy.",
            m.bad_gateway.load(Ordering::Relaxed),
        ),
        (
            "baton_cut_responses_total",
            "counter",
            "Responses the worker broke off after their head (the client got a cut body).",
            m.cut_responses.load(Ordering::Relaxed),
        ),
        (
            "baton_gateway_timeout_total",
            "counter",
            "504 responses made by the proxy (no answer from the worker within the idle timeout).",
            m.gateway_timeout.load(Ordering::Relaxed),
        ),
        (
            "baton_unavailable_total",
            "counter",
            "503 responses made by the proxy (no healthy worker, or batond short of descriptors, within the hold time).",
            m.unavailable.load(Ordering::Relaxed),
        ),
        (
            "baton_upgrades_total",
            "counter",
            "Upgraded (WebSocket) connections proxied.",
            m.upgrades.load(Ordering::Relaxed),
        ),
        (
            "baton_connections_total",
            "counter",
            "Client connections accepted.",
            m.connections.load(Ordering::Relaxed),
        ),
        (
            "baton_malformed_requests_total",
            "counter",
            "Requests refused before any handler saw them: not HTTP/1.x, or a head over the limits (400, 414 or 431; an HTTP/2 preface gets no answer).",
            m.malformed.load(Ordering::Relaxed),
        ),
        (
            "baton_deploys_active_total",
            "counter",
            "Deploys that ended with their generation serving.",
            s.totals.deploys_active,
        ),
        (
            "baton_deploys_rejected_total",
            "counter",
            "Deploys whose worker did not prove itself (healthz, signature, exit, start timeout).",
            s.totals.deploys_rejected,
        ),
        (
            "baton_deploys_failed_total",
            "counter",
            "Deploys whose build failed, whose worker batond could not start, or that batond's stop cut short.",
            s.totals.deploys_failed,
        ),
        (
            "baton_worker_restarts_total",
            "counter",
            "Workers started again from their generation's snapshot (after a crash, replacing a sick one, or by batonctl restart).",
            s.totals.restarts,
        ),
        (
            "baton_uptime_seconds",
            "gauge",
            "Seconds since the daemon started.",
            s.uptime_s,
        ),
        (
            "baton_active_generation",
            "gauge",
            "The generation serving new traffic (0: none).",
            s.active
                .as_ref()
                .filter(|g| g.state == GenState::Active)
                .map_or(0, |g| g.id),
        ),
        (
            "baton_draining_generations",
            "gauge",
            "Generations draining (an old process of the active generation, after a restart, is no generation draining).",
            {
                let active = s.active.as_ref().map(|a| a.id);
                let mut ids: Vec<u64> = s
                    .draining
                    .iter()
                    .map(|g| g.id)
                    .filter(|id| Some(*id) != active)
                    .collect();
                ids.sort_unstable();
                ids.dedup();
                ids.len() as u64
            },
        ),
        (
            "baton_requests_in_flight",
            "gauge",
            "HTTP requests in flight to workers.",
            live().map(|g| g.requests_in_flight).sum(),
        ),
        (
            "baton_open_connections",
            "gauge",
            "Upgraded connections open to workers.",
            live().map(|g| g.connections).sum(),
        ),
        (
            "baton_history_rejected",
            "gauge",
            "Rejected generations in the kept history.",
            count(GenState::Rejected),
        ),
        (
            "baton_history_failed",
            "gauge",
            "Failed generations in the kept history.",
            count(GenState::Failed),
        ),
        (
            "baton_log_lines_dropped_total",
            "counter",
            "Log lines dropped because stderr did not take them in time.",
            crate::logging::dropped_lines(),
        ),
        (
            "baton_unit_failed",
            "gauge",
            "1 when the unit is failed: the start limit was hit, or the first deploy failed (until a deploy works).",
            u64::from(s.state == "failed"),
        ),
    ];
    let mut out = String::new();
    for (name, kind, help, v) in rows {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
        );
    }
    let mut resp = Response::new(full(out));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

fn full(s: String) -> ProxyBody {
    Full::new(Bytes::from(s))
        .map_err(|e: Infallible| match e {})
        .boxed_unsync()
}

fn json<T: serde::Serialize>(code: StatusCode, v: &T) -> Response<ProxyBody> {
    let mut body = serde_json::to_string_pretty(v).unwrap_or_else(|_| "{}".into());
    body.push('\n');
    let mut resp = Response::new(full(body));
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn json_error(code: StatusCode, msg: &str) -> Response<ProxyBody> {
    json(code, &serde_json::json!({ "error": msg }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only the routes that change something ask who is calling: a POST
    /// elsewhere gets its 405 or 404 from anyone.
    #[test]
    fn only_changes_need_trust() {
        for path in ["/v1/deploy", "/v1/restart", "/v1/reload"] {
            assert!(changes_something(&Method::POST, path), "{path}");
            assert!(!changes_something(&Method::GET, path), "{path}");
        }
        for path in ["/v1/status", "/v1/logs", "/v1/events", "/metrics", "/nope"] {
            assert!(!changes_something(&Method::POST, path), "{path}");
        }
    }

    #[tokio::test]
    async fn an_events_reader_that_fell_behind_is_told_how_many_it_missed() {
        let bus = crate::events::Events::default();
        let mut rx = bus.subscribe();
        for i in 0..1030 {
            bus.emit("restart", Some(1), format!("event {i}"));
        }
        // The bus keeps 1,024: the first 6 are gone for this reader.
        let line = event_line(rx.recv().await).expect("a line");
        let v: serde_json::Value = serde_json::from_slice(&line).expect("json");
        assert_eq!(v["kind"], "events_lost", "{v}");
        assert!(
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("6 event(s)")),
            "{v}"
        );
        // Then the stream goes on with the oldest one kept.
        let line = event_line(rx.recv().await).expect("a line");
        let v: serde_json::Value = serde_json::from_slice(&line).expect("json");
        assert_eq!(v["message"], "event 6", "{v}");
        drop(bus);
    }
}
