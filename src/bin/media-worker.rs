//! `media-worker`: the Twilio Media Streams worker that `batond` supervises.
//!
//! Thin: parses flags, starts tracing, reads the environment (`LISTEN_FDS`,
//! `PORT`, `TWILIO_AUTH_TOKEN`, `BATON_SIGNATURE`), builds the config, takes
//! or binds the listener, turns SIGTERM/SIGINT into a cancellation, and
//! calls [`baton::worker::run`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use baton::worker::Listener;
use baton::worker::config::{Config, EnvOverrides};
use clap::{Parser, ValueEnum};
use tokio_util::sync::CancellationToken;

/// Default port when `PORT` is unset and no socket is inherited.
const DEFAULT_PORT: u16 = 8081;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Twilio Media Streams worker.
#[derive(Debug, Parser)]
#[command(name = "media-worker", version)]
struct Cli {
    /// TOML config file (see etc/media-worker.toml); defaults apply without it.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Override the config's data_dir (call records).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Validate the config, print the resolved signature, and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("media-worker: {}", baton::logging::error_text(&e));
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Through a writer thread: a call's thread never waits on stderr (see
    // `baton::logging`).
    let (writer, guard) = baton::logging::stderr();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.with_ansi(false).init(),
        LogFormat::Json => builder.json().flatten_event(false).init(),
    }
    guard
}

fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    // Flushes the queued log lines when `run` returns.
    let _log = init_tracing(cli.log_format);
    let env = EnvOverrides {
        twilio_auth_token: std::env::var("TWILIO_AUTH_TOKEN").ok(),
        baton_signature: std::env::var("BATON_SIGNATURE").ok(),
    };
    let mut cfg = Config::load(cli.config.as_deref(), &env)?;
    if let Some(dir) = cli.data_dir {
        cfg.data_dir = dir;
    }
    if cli.check {
        println!("config ok; signature {}", cfg.app_signature);
        return Ok(ExitCode::SUCCESS);
    }
    // Workers and blocking-pool threads told apart by name (`top -H`, and
    // `realtime_priority` covers the workers only): the runtime starts its
    // workers first, when it is built.
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let started = std::sync::atomic::AtomicUsize::new(0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name_fn(move || {
            let n = started.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n < workers {
                "rt-worker"
            } else {
                "rt-blocking"
            }
            .to_string()
        })
        .enable_all()
        .build()
        .context("building tokio runtime")?;
    let result = rt.block_on(async move {
        let listener = take_listener(&cfg).await?;
        let token = CancellationToken::new();
        tokio::spawn(cancel_on_signal(token.clone()));
        baton::worker::run(listener, cfg, token).await?;
        Ok(ExitCode::SUCCESS)
    });
    // A speech engine still running on the blocking pool (its call was
    // closed at shutdown, and its transcription dropped) does not hold
    // the exit up to `engine_timeout_ms`: the engine is in this process's
    // group, which the supervisor stops with it.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

/// The inherited socket (`LISTEN_FDS`: TCP, or a Unix socket from
/// `batond`), else `bind_address:$PORT`.
async fn take_listener(cfg: &Config) -> anyhow::Result<Listener> {
    let mut fds = listenfd::ListenFd::from_env();
    match fds.take_tcp_listener(0) {
        Ok(Some(l)) => {
            baton::systemd::ensure_listening(&l)?;
            l.set_nonblocking(true)
                .context("setting inherited socket non-blocking")?;
            return Ok(Listener::Tcp(
                tokio::net::TcpListener::from_std(l).context("registering inherited socket")?,
            ));
        }
        // batond handed over a Unix socket, but it did not reach this
        // process (a wrapper that forked instead of exec'ing, say): binding
        // a port of our own would only end in batond's start timeout.
        Ok(None) if std::env::var_os("BATON_SOCKET").is_some() => {
            anyhow::bail!(
                "BATON_SOCKET is set, so batond handed this worker a Unix socket, but none was \
                 inherited (LISTEN_FDS/LISTEN_PID missing or naming another process: does a \
                 wrapper start the worker without exec?)"
            );
        }
        Ok(None) => {}
        // Not TCP: a Unix socket is the other kind batond hands over (the
        // fd stays in place when it is not TCP).
        Err(tcp_err) => {
            let l = fds
                .take_unix_listener(0)
                .with_context(|| {
                    format!("inherited socket (LISTEN_FDS) is neither TCP ({tcp_err}) nor a Unix stream socket")
                })?
                .context("inherited socket (LISTEN_FDS) vanished")?;
            baton::systemd::ensure_listening(&l)?;
            l.set_nonblocking(true)
                .context("setting inherited socket non-blocking")?;
            return Ok(Listener::Unix(
                tokio::net::UnixListener::from_std(l).context("registering inherited socket")?,
            ));
        }
    }
    let port = match std::env::var("PORT") {
        Ok(p) => p
            .trim()
            .parse::<u16>()
            .with_context(|| format!("PORT={p:?}"))?,
        Err(_) => DEFAULT_PORT,
    };
    let addr = SocketAddr::new(cfg.bind_address, port);
    Ok(Listener::Tcp(
        tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?,
    ))
}

async fn cancel_on_signal(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            tracing::warn!("cannot install signal handlers");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = int.recv() => tracing::info!("SIGINT: draining"),
    }
    token.cancel();
}
