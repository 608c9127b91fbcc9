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
    // The main thread's event loop: the daemon's own work, and the client
    // connections too with `threads = 1` (the least memory: one malloc
    // arena); above 1 the connections go to front threads, each with an
    // event loop of its own (see `baton::runtime`).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name(baton::sched::RUNTIME_THREAD)
        .build()
        .context("tokio runtime")?;
    let front = baton::runtime::FrontThreads::start(cfg.daemon.threads, cfg.daemon.spread_threads)
        .context("front threads")?;
    let handles = front.handles();
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
        baton::daemon::run(
            listener,
            handles,
            cfg,
            overrides,
            shim,
            CancellationToken::new(),
        )
        .await?;
        Ok(ExitCode::SUCCESS)
    });
    // Blocking work still running (a reload stuck reading a config file on
    // a hung file system, say) must not keep the daemon from exiting.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    drop(front);
    result
}
