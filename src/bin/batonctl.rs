//! `batonctl`: the operator's CLI over `batond`'s control socket.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use baton::control::api::{DeployOutcome, Event, GenerationInfo, Status};
use baton::control::client;
use clap::{Parser, Subcommand};
use http::{Method, StatusCode};
use http_body_util::BodyExt;

/// Control a running batond.
///
/// Exit codes: 0 done; 1 refused or failed (a deploy rejected or failed,
/// a reload refused, an error answer); 3 `status` of a unit with no worker
/// serving; 69 batond could not be reached (nothing was asked); 75 batond
/// was asked but its answer never came or broke off (the outcome is
/// unknown: `batonctl status` shows it); 2 a wrong command line.
#[derive(Debug, Parser)]
#[command(name = "batonctl", version)]
struct Cli {
    /// The control socket (default: `$BATON_CONTROL_SOCKET` when set and
    /// not empty, else `daemon.control_socket` of --config).
    #[arg(long, short, global = true)]
    socket: Option<PathBuf>,
    /// The daemon's config file, to find the control socket (default:
    /// `$BATON_CONFIG` when set and not empty, as for batond, else
    /// `etc/baton.toml`).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Seconds batond has to answer (with --wait: a status check first, and
    /// the answer then comes when the deploy is done; for `events`: to start
    /// the stream).
    #[arg(long, default_value_t = 30.0, global = true, value_parser = parse_timeout)]
    timeout: f64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Show the active, candidate, draining and past generations; exit 0
    /// when a worker is serving, 3 when none is (starting, restarting,
    /// failed, stopping), as `systemctl status` does.
    Status {
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Build and deploy now.
    Deploy {
        /// Wait for the outcome; exit 1 when the deploy is rejected or fails.
        #[arg(long)]
        wait: bool,
    },
    /// Start a fresh process of the active build and cut over to it (with
    /// nothing ever built, a restart is a deploy).
    Restart {
        /// Wait for the outcome; exit 1 when it fails.
        #[arg(long)]
        wait: bool,
    },
    /// Re-read the config file (like SIGHUP); exit 1 when it is refused.
    Reload,
    /// Print a generation's worker or build log.
    Logs {
        /// The generation (default: for the worker log the active one,
        /// else the newest that ran; for the build log the newest build).
        #[arg(long, short)]
        generation: Option<u64>,
        /// The build log instead of the worker log.
        #[arg(long)]
        build: bool,
        /// How many lines from the end.
        #[arg(long, short = 'n', default_value_t = 100)]
        lines: usize,
    },
    /// Follow the daemon's events.
    Events {
        /// Print the raw JSON lines.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("batonctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    let from_config = cli.socket.is_none() && socket_from_env().is_none();
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            // A closed output pipe (batonctl events | head) is not an
            // error; a control connection that closed is one.
            if output_closed(&e) {
                return ExitCode::SUCCESS;
            }
            eprintln!("batonctl: {}", baton::logging::error_text(&e));
            let code = exit_code(&e);
            // The path the file names now: a running batond keeps the
            // socket it started with when a reload changes it.
            if from_config
                && e.chain().any(|c| {
                    matches!(
                        c.downcast_ref::<client::ClientError>(),
                        Some(client::ClientError::Connect { source, .. })
                            if source.kind() == std::io::ErrorKind::NotFound
                    )
                })
            {
                eprintln!(
                    "batonctl: that is the path the config file names: is batond running? One started \
                     with another control_socket or state_dir (a reload does not move it) listens on \
                     its own; pass --socket"
                );
            }
            code
        }
    }
}

/// Nothing was asked (69, `EX_UNAVAILABLE`), or the answer never came
/// or broke off (75, `EX_TEMPFAIL`: what was asked may still be done), or
/// 1.
fn exit_code(e: &anyhow::Error) -> ExitCode {
    if e.chain().any(|c| c.downcast_ref::<NotAsked>().is_some()) {
        return ExitCode::from(69);
    }
    for c in e.chain() {
        if c.downcast_ref::<Unanswered>().is_some() {
            return ExitCode::from(75);
        }
        match c.downcast_ref::<client::ClientError>() {
            Some(client::ClientError::Connect { .. }) => return ExitCode::from(69),
            Some(client::ClientError::Http(_) | client::ClientError::Timeout { .. }) => {
                return ExitCode::from(75);
            }
            _ => {}
        }
    }
    ExitCode::FAILURE
}

/// A wait for an answer that ended without one.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Unanswered(String);

/// batond did not answer the check made before a change was asked for:
/// the change was not asked for.
#[derive(Debug, thiserror::Error)]
#[error("{0}; the {1} was not asked for")]
struct NotAsked(client::ClientError, &'static str);

/// The error is stdout's pipe closing (`batonctl logs | head`), not the
/// control socket's.
fn output_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<OutputError>()
            .is_some_and(|o| o.0.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// A failed write to stdout (told apart from the control socket's errors).
#[derive(Debug, thiserror::Error)]
#[error("writing to stdout: {0}")]
struct OutputError(std::io::Error);

/// Writes `text` to stdout: an error (a closed pipe, a full disk) comes
/// back to `main`, which says what it was (`print!` would panic).
fn say(text: &str) -> Result<(), OutputError> {
    write_out(&mut std::io::stdout().lock(), text.as_bytes())
}

fn write_out(out: &mut impl std::io::Write, bytes: &[u8]) -> Result<(), OutputError> {
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(OutputError)
}

fn parse_timeout(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 86_400.0 => Ok(v),
        _ => Err(format!(
            "`{s}` is not a number of seconds greater than 0 and at most 86400"
        )),
    }
}

/// `BATON_CONTROL_SOCKET`, unless unset or empty.
fn socket_from_env() -> Option<PathBuf> {
    env_path("BATON_CONTROL_SOCKET")
}

/// A path from the environment, unless unset or empty (`NAME=` in a
/// script means "not set", as for systemd's own variables).
fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn socket_path(cli: &Cli) -> anyhow::Result<PathBuf> {
    if let Some(s) = cli.socket.clone().or_else(socket_from_env) {
        return Ok(s);
    }
    let config = cli
        .config
        .clone()
        .or_else(|| env_path("BATON_CONFIG"))
        .unwrap_or_else(|| PathBuf::from("etc/baton.toml"));
    baton::config::Config::control_socket_of(&config).with_context(|| {
        format!(
            "reading {} to find the control socket (or pass --socket)",
            config.display()
        )
    })
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let socket = socket_path(&cli)?;
    let limit = std::time::Duration::from_secs_f64(cli.timeout);
    let call_text = |method, q: &str| {
        let (socket, q) = (socket.clone(), q.to_string());
        async move { client::call_text_within(&socket, method, &q, limit).await }
    };
    match cli.cmd {
        Cmd::Status { json } => {
            let (code, body) = call_text(Method::GET, "/v1/status").await?;
            check(code, &body)?;
            // `--json` prints what batond said, whatever fields it has (a
            // newer or older batond); only `state` is read for the exit,
            // `systemctl status`'s: 0 when a worker serves, 3 when none does.
            let v: serde_json::Value = serde_json::from_str(&body).context("status JSON")?;
            let running = v["state"] == "running";
            if json {
                say(&body)?;
            } else {
                let s: Status = serde_json::from_value(v).context("status JSON")?;
                say(&render_status(&s))?;
            }
            Ok(if running {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            })
        }
        Cmd::Deploy { wait } => outcome(&socket, "/v1/deploy", wait, limit).await,
        Cmd::Restart { wait } => outcome(&socket, "/v1/restart", wait, limit).await,
        Cmd::Reload => {
            let (code, body) = call_text(Method::POST, "/v1/reload").await?;
            if code.is_success() {
                say("config reloaded; redeploying\n")?;
                // Settings that only change when batond restarts, and
                // advice on the new config.
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                let notes = v["kept"].as_array().into_iter().flatten();
                for k in notes.chain(v["advice"].as_array().into_iter().flatten()) {
                    if let Some(k) = k.as_str() {
                        say(&format!("note: {k}\n"))?;
                    }
                }
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("reload refused: {}", error_text(&body));
                Ok(ExitCode::FAILURE)
            }
        }
        Cmd::Logs {
            generation,
            build,
            lines,
        } => {
            let mut q = format!(
                "/v1/logs?kind={}&lines={lines}",
                if build { "build" } else { "worker" }
            );
            if let Some(g) = generation {
                q.push_str(&format!("&generation={g}"));
            }
            let (code, body) = call_text(Method::GET, &q).await?;
            check(code, &body)?;
            say(&body)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Events { json } => {
            // The stream's head comes at once; its events as they happen.
            let (code, mut body) =
                client::call(&socket, Method::GET, "/v1/events", Some(limit)).await?;
            if !code.is_success() {
                // The error's body is short; a stream that never ends is
                // cut at the timeout.
                let text = tokio::time::timeout(limit, body.collect())
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                    .unwrap_or_default();
                bail!("events: {code}: {}", error_text(&text));
            }
            let mut buf = Vec::new();
            let mut out = std::io::stdout().lock();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| {
                    Unanswered(format!(
                        "the event stream broke off (batond stopped or was killed?): {e}"
                    ))
                })?;
                let Some(data) = frame.data_ref() else {
                    continue;
                };
                buf.extend_from_slice(data);
                while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    if json {
                        write_out(&mut out, &line)?;
                    } else if let Ok(ev) = serde_json::from_slice::<Event>(&line) {
                        // (Not when the message names it already.)
                        let g = ev
                            .generation
                            .filter(|g| !ev.message.starts_with(&format!("generation {g}")))
                            .map(|g| format!(" gen {g}"))
                            .unwrap_or_default();
                        let text = format!("{} {}{g}: {}\n", ev.ts, ev.kind, ev.message);
                        write_out(&mut out, text.as_bytes())?;
                    }
                }
            }
            // batond ended the stream itself: it stopped.
            eprintln!("batonctl: the event stream ended: batond stopped");
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn outcome(
    socket: &std::path::Path,
    path: &str,
    wait: bool,
    limit: std::time::Duration,
) -> anyhow::Result<ExitCode> {
    let (code, body) = if wait {
        // The answer comes when the deploy is done: bounded by its build
        // and start timeouts, not by `limit`. That batond answers at all
        // is checked first, within `limit`.
        let what = if path.ends_with("restart") {
            "restart"
        } else {
            "deploy"
        };
        client::call_text_within(socket, Method::GET, "/v1/status", limit)
            .await
            .map_err(|e| NotAsked(e, what))?;
        let waited = async {
            let (code, body) =
                client::call(socket, Method::POST, &format!("{path}?wait=1"), None).await?;
            Ok::<_, client::ClientError>((code, client::text(body).await?))
        };
        // A connection that breaks now: batond took the request and then
        // went away (stopped, killed) before it answered.
        let waited = async {
            waited.await.map_err(|e| match e {
                client::ClientError::Http(e) => anyhow::Error::new(Unanswered(format!(
                    "batond closed the connection before it answered ({e}): stopped or killed? \
                     The outcome is unknown: `batonctl status` shows it"
                ))),
                e => e.into(),
            })
        };
        // Meanwhile batond must keep answering: one stopped (SIGSTOP) or
        // stuck would otherwise keep this wait open for good.
        let alive = async {
            loop {
                tokio::time::sleep(limit).await;
                if let Err(e) =
                    client::call_text_within(socket, Method::GET, "/v1/status", limit).await
                {
                    return e;
                }
            }
        };
        tokio::select! {
            r = waited => r?,
            e = alive => return Err(Unanswered(format!("{e}; stopped waiting (the deploy may still end: `batonctl status` shows it)")).into()),
        }
    } else {
        client::call_text_within(socket, Method::POST, path, limit).await?
    };
    // 200 done, 202 queued, 409 refused: an outcome; anything else is an
    // error answer (403, a deadline passed, another batond's 404).
    if !matches!(
        code,
        StatusCode::OK | StatusCode::ACCEPTED | StatusCode::CONFLICT
    ) {
        check(code, &body)?;
        bail!("{code}: {}", error_text(&body));
    }
    let o: DeployOutcome =
        serde_json::from_str(&body).with_context(|| format!("answer: {body}"))?;
    let g = o
        .generation
        .map(|g| format!("generation {g}: "))
        .unwrap_or_default();
    match (&o.reason, o.succeeded()) {
        (_, true) if o.outcome == "queued" => {
            say(&format!(
                "{g}queued (`batonctl events` follows it; --wait waits for its outcome)\n"
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        (_, true) => {
            say(&format!("{g}{}\n", o.outcome))?;
            Ok(ExitCode::SUCCESS)
        }
        (Some(r), false) => {
            eprintln!("{g}{}: {r}", o.outcome);
            Ok(ExitCode::FAILURE)
        }
        (None, false) => {
            eprintln!("{g}{}", o.outcome);
            Ok(ExitCode::FAILURE)
        }
    }
}

fn error_text(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| body.trim().to_string())
}

fn check(code: StatusCode, body: &str) -> anyhow::Result<()> {
    if code.is_success() {
        Ok(())
    } else {
        bail!("{code}: {}", error_text(body))
    }
}

fn gen_line(g: &GenerationInfo) -> String {
    let mut s = format!("gen {} {}", g.id, g.state.as_str());
    if let Some(pid) = g.pid {
        s.push_str(&format!(" pid {pid}"));
    }
    if let Some(port) = g.port {
        s.push_str(&format!(" port {port}"));
    }
    if let Some(socket) = &g.socket {
        s.push_str(&format!(" socket {socket}"));
    }
    if let Some(sig) = &g.signature {
        s.push_str(&format!(" sig {}", baton::probe::short(sig)));
    }
    if let Some(b) = g.build_ms {
        s.push_str(&format!(" build {b} ms"));
    }
    if let Some(h) = g.health_ms {
        s.push_str(&format!(" health {h} ms"));
    }
    if let Some(at) = &g.cutover_at {
        s.push_str(&format!(" cut over {at}"));
    }
    if g.restarts > 0 {
        s.push_str(&format!(" restarts {}", g.restarts));
    }
    if g.requests_in_flight > 0 || g.connections > 0 {
        s.push_str(&format!(
            " ({} req, {} conn)",
            g.requests_in_flight, g.connections
        ));
    }
    s.push_str(&format!(" [{}]", g.trigger));
    if let Some(r) = &g.reason {
        s.push_str(&format!(": {r}"));
    }
    s
}

fn render_status(s: &Status) -> String {
    let dot = match s.state.as_str() {
        "running" => "●",
        "failed" => "×",
        _ => "○",
    };
    let mut out = format!(
        "{dot} batond {} — {}\n     Listen: {}\n     Config: {}\n        PID: {}\n     Uptime: {} s\n",
        s.version, s.state, s.listen, s.config_file, s.pid, s.uptime_s
    );
    if let Some(e) = &s.config_error {
        out.push_str(&format!("  Config error (running config kept): {e}\n"));
    }
    match &s.active {
        Some(a) => out.push_str(&format!("     Active: {}\n", gen_line(a))),
        None => out.push_str("     Active: none\n"),
    }
    if let Some(c) = &s.candidate {
        out.push_str(&format!("  Candidate: {}\n", gen_line(c)));
    }
    if let Some(r) = &s.replacing {
        out.push_str(&format!(
            "  Replacing: gen {} with a fresh process (instance {}), starting for {} s [{}]\n",
            r.generation, r.instance, r.since_s, r.reason
        ));
    }
    for d in &s.draining {
        out.push_str(&format!("   Draining: {}\n", gen_line(d)));
    }
    if s.deploy_pending {
        out.push_str("    Pending: one more deploy queued\n");
    }
    let t = &s.totals;
    out.push_str(&format!(
        "    Deploys: {} active, {} rejected, {} failed; {} restarts\n",
        t.deploys_active, t.deploys_rejected, t.deploys_failed, t.restarts
    ));
    if !s.history.is_empty() {
        out.push_str("    History:\n");
        for g in &s.history {
            out.push_str(&format!("      {}\n", gen_line(g)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A closed output pipe ends batonctl quietly; a control connection
    /// closed under a request (EPIPE too) is an error: a deploy that never
    /// reached batond must not look like one that did.
    #[test]
    fn only_a_closed_output_pipe_is_no_error() {
        let pipe = || std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        let out = anyhow::Error::new(OutputError(pipe()));
        assert!(output_closed(&out));
        assert!(output_closed(&out.context("printing the status")));
        let control = anyhow::Error::new(pipe()).context("sending the request");
        assert!(!output_closed(&control));
        let full = anyhow::Error::new(OutputError(std::io::Error::from(
            std::io::ErrorKind::StorageFull,
        )));
        assert!(!output_closed(&full));
    }
}
