//! `batond`: parse the command line, build a validated config, bind (or
//! inherit) the public listener, and call [`baton::daemon::run`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use baton::config::{Config, ConfigError, Overrides};
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// sysexits' EX_CONFIG: the configuration is wrong.
const EXIT_CONFIG: u8 = 78;

/// The Baton supervisor daemon.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The config file.
    #[arg(long, short, default_value = "etc/baton.toml", env = "BATON_CONFIG")]
    config: PathBuf,
    /// Validate the config and exit: 0 when valid, 78 with the errors.
    #[arg(long)]
    check: bool,
    /// Override `daemon.listen`.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Override `daemon.control_socket`.
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// Override `daemon.state_dir`.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == baton::process::SHIM_ARG) {
        // The exec shim: only returns on failure.
        let Err(e) = baton::process::shim_exec(&args[2..]);
        eprintln!("batond exec: {e}");
        return ExitCode::from(127);
    }
    let cli = Cli::parse();
    // Flushes the queued log lines when main returns.
    let _log = init_tracing(cli.log_json);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("batond: {}", baton::logging::error_text(&e));
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(json: bool) -> tracing_appender::non_blocking::WorkerGuard {
    use tracing_subscriber::prelude::*;
    // `Targets` rather than `EnvFilter`: the same `target=level` syntax
    // without a regex engine in the daemon's memory.
    let filter: tracing_subscriber::filter::Targets = std::env::var("BATON_LOG")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            tracing_subscriber::filter::Targets::new()
                .with_default(tracing_subscriber::filter::LevelFilter::INFO)
        });
    // Through a writer thread: a stalled stderr reader must not stop the
    // proxy (see `baton::logging`).
    let (writer, guard) = baton::logging::stderr();
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(baton::logging::ansi());
    if json {
        tracing_subscriber::registry()
            .with(fmt.json().with_filter(filter))
            .init();
    } else {
        tracing_subscriber::registry()
            .with(fmt.with_filter(filter))
            .init();
    }
    guard
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let overrides = Overrides {
        listen: cli.listen,
        control_socket: cli.control_socket,
        state_dir: cli.state_dir,
    };
    let cfg = match Config::load(&cli.config, &overrides) {
        Ok(cfg) => cfg,
        Err(e @ ConfigError::Invalid { .. }) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    if cli.check {
        println!("{}: ok", cfg.file.display());
        return Ok(ExitCode::SUCCESS);
    }
    let shim = std::env::current_exe().context("cannot find batond's own executable")?;
    // One thread serves the proxy as fast as nginx's one worker process on
    // this kind of machine, with one malloc arena and no cross-thread wakeups.
    let rt = match cfg.daemon.threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    }
    .context("tokio runtime")?;
    let result = rt.block_on(async move {
        let listener =
            match baton::systemd::inherited_listener().context("inherited socket (LISTEN_FDS)")? {
                Some(l) => l,
                None => tokio::net::TcpListener::bind(cfg.daemon.listen)
                    .await
                    .with_context(|| format!("cannot listen on {}", cfg.daemon.listen))?,
            };
        baton::daemon::run(listener, cfg, overrides, shim, CancellationToken::new()).await?;
        Ok(ExitCode::SUCCESS)
    });
    // Blocking work still running (a reload stuck reading a config file on
    // a hung file system, say) must not keep the daemon from exiting.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    result
}
