//! `batond`: parse the command line, build a validated config, bind (or
//! inherit) the public listener, and call [`baton::daemon::run`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use baton::config::{Config, ConfigError, Overrides};
use tokio_util::sync::CancellationToken;

/// sysexits' EX_CONFIG: the configuration is wrong.
const EXIT_CONFIG: u8 = 78;

/// What a wrong command line exits with (as clap, which batonctl uses).
const EXIT_USAGE: u8 = 2;

const HELP: &str = "The Baton supervisor daemon

Usage: batond [OPTIONS]

Options:
  -c, --config <CONFIG>                  The config file [env: BATON_CONFIG] [default: etc/baton.toml]
      --check                            Validate the config and exit: 0 when valid, 78 with the errors
      --listen <LISTEN>                  Override `daemon.listen`
      --control-socket <CONTROL_SOCKET>  Override `daemon.control_socket`
      --state-dir <STATE_DIR>            Override `daemon.state_dir`
      --log-json                         Log as JSON lines instead of text
  -h, --help                             Print help
  -V, --version                          Print version
";

/// The command line. Read with lexopt rather than clap: the daemon runs
/// for months, and clap's code would stay in its resident set for a parse
/// done once (batonctl, run once and gone, keeps clap).
#[derive(Debug)]
struct Cli {
    config: PathBuf,
    check: bool,
    listen: Option<SocketAddr>,
    control_socket: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    log_json: bool,
}

/// A command line to run, or what to print and exit with.
enum Parsed {
    Run(Cli),
    Exit(String, u8),
}

fn parse_cli(args: impl IntoIterator<Item = std::ffi::OsString>) -> Result<Parsed, lexopt::Error> {
    use lexopt::prelude::*;
    let mut cli = Cli {
        config: std::env::var_os("BATON_CONFIG")
            .filter(|c| !c.is_empty())
            .map_or_else(|| PathBuf::from("etc/baton.toml"), PathBuf::from),
        check: false,
        listen: None,
        control_socket: None,
        state_dir: None,
        log_json: false,
    };
    let mut parser = lexopt::Parser::from_args(args);
    while let Some(arg) = parser.next()? {
        match arg {
            Short('c') | Long("config") => cli.config = parser.value()?.into(),
            Long("check") => cli.check = true,
            Long("listen") => {
                let v = parser.value()?;
                let v = v.to_string_lossy();
                let addr = v.parse().map_err(|e| {
                    lexopt::Error::from(format!("--listen `{v}` is not an IP address and port (names are not looked up): {e}"))
                })?;
                cli.listen = Some(addr);
            }
            Long("control-socket") => cli.control_socket = Some(parser.value()?.into()),
            Long("state-dir") => cli.state_dir = Some(parser.value()?.into()),
            Long("log-json") => cli.log_json = true,
            Short('h') | Long("help") => return Ok(Parsed::Exit(HELP.into(), 0)),
            Short('V') | Long("version") => {
                let version = format!("batond {}\n", env!("CARGO_PKG_VERSION"));
                return Ok(Parsed::Exit(version, 0));
            }
            _ => return Err(arg.unexpected()),
        }
    }
    Ok(Parsed::Run(cli))
}

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == baton::process::SHIM_ARG) {
        // The exec shim: only returns on failure.
        let Err(e) = baton::process::shim_exec(&args[2..]);
        eprintln!("batond exec: {e}");
        return ExitCode::from(127);
    }
    baton::process::fresh_start();
    let cli = match parse_cli(args.into_iter().skip(1)) {
        Ok(Parsed::Run(cli)) => cli,
        Ok(Parsed::Exit(text, code)) => {
            print!("{text}");
            return ExitCode::from(code);
        }
        Err(e) => {
            eprintln!("batond: {e}\n\nUsage: batond [OPTIONS]; see batond --help");
            return ExitCode::from(EXIT_USAGE);
        }
    };
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
    // notify warns of watches of folders gone that it no longer has, at
    // every folder replaced: batond's own lines say what matters. Kept
    // quiet unless BATON_LOG names notify itself.
    let spec = std::env::var("BATON_LOG").ok();
    let quiet_notify = !spec.as_deref().is_some_and(|s| s.contains("notify"));
    let mut filter: tracing_subscriber::filter::Targets =
        spec.and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            tracing_subscriber::filter::Targets::new()
                .with_default(tracing_subscriber::filter::LevelFilter::INFO)
        });
    if quiet_notify {
        filter = filter.with_target("notify", tracing_subscriber::filter::LevelFilter::ERROR);
    }
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

/// Keeps each runtime thread to CPUs of its own (`daemon.spread_threads`).
/// The runtime's threads are the ones its build started (`before` is the
/// list from just before): nothing has run on it yet, so no blocking-pool
/// thread exists. Logged; on failure the threads run where the kernel
/// puts them.
fn spread_runtime_threads(before: &[u32], threads: usize) {
    let started: Vec<u32> = baton::sched::thread_ids()
        .unwrap_or_default()
        .into_iter()
        .filter(|t| !before.contains(t))
        .collect();
    if started.len() != threads {
        tracing::warn!(
            threads,
            found = started.len(),
            "spread_threads not applied: the runtime's {threads} threads could not be told from the others"
        );
        return;
    }
    match baton::sched::spread(&started) {
        Ok(shares) if shares.is_empty() => tracing::info!(
            threads,
            "spread_threads: fewer CPUs than runtime threads; they run where the kernel puts them"
        ),
        Ok(shares) => {
            let said: Vec<String> = shares.iter().map(|s| cpu_list(s)).collect();
            tracing::info!(
                "runtime threads kept to CPUs of their own: {}",
                said.join("; ")
            );
        }
        Err(e) => tracing::warn!(error = %e, "spread_threads not applied: {e}"),
    }
}

/// `[0, 2, 4]` as "CPU 0, 2, 4".
fn cpu_list(cpus: &[usize]) -> String {
    let list: Vec<String> = cpus.iter().map(usize::to_string).collect();
    format!("CPU {}", list.join(", "))
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let overrides = Overrides {
        listen: cli.listen,
        control_socket: cli.control_socket,
        state_dir: cli.state_dir,
    };
    let mut cfg = match Config::load(&cli.config, &overrides) {
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
        // What batond would warn of at start, where the check is read.
        for advice in cfg.advice() {
            println!("note: {advice}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    // The shim is this very executable, as it runs: `/proc/self/exe` stays
    // it when the file is replaced (an upgrade, a `cargo build` of batond
    // itself), where its path would then name another program.
    let shim = match std::path::Path::new("/proc/self/exe") {
        p if p.exists() => p.to_path_buf(),
        _ => std::env::current_exe().context("cannot find batond's own executable")?,
    };
    // One thread is the least memory (one malloc arena, no cross-thread
    // wakeups); with a second, the proxy's work goes to whichever CPU is
    // free while clients and the worker share them (the default on two
    // CPUs or more; see README, Benchmark).
    let before = baton::sched::thread_ids().unwrap_or_default();
    let rt = match cfg.daemon.threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .thread_name(baton::sched::RUNTIME_THREAD)
            .on_thread_start(baton::sched::unpin_this_thread)
            .enable_all()
            .build(),
    }
    .context("tokio runtime")?;
    if cfg.daemon.threads > 1 && cfg.daemon.spread_threads {
        spread_runtime_threads(&before, cfg.daemon.threads);
    }
    let result = rt.block_on(async move {
        let listener =
            match baton::systemd::inherited_listener().context("inherited socket (LISTEN_FDS)")? {
                Some(l) => {
                    cfg.daemon.socket_activated = true;
                    l
                }
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
