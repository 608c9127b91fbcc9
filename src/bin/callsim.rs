//! `callsim`: a Twilio-side Media Streams call simulator.
//!
//! Thin: parses flags, starts tracing, loads the WAV, and calls
//! [`baton::callsim::run`] (or [`baton::callsim::webhook::run`] for
//! `callsim webhook`), then prints per-call lines or a JSON summary. Exits 1
//! when any call saw a protocol violation or an error.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use baton::callsim::{self, Options, webhook};
use clap::{Args, Parser, Subcommand};

/// Plays the Twilio side of Media Streams calls against a worker.
#[derive(Debug, Parser)]
#[command(name = "callsim", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    call: CallArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Post the Twilio webhooks and check the TwiML.
    Webhook(WebhookArgs),
}

#[derive(Debug, Args)]
struct CallArgs {
    /// WebSocket URL, e.g. ws://127.0.0.1:8081/ws/twilio-media.
    #[arg(long)]
    url: Option<String>,
    /// Caller audio (any WAV; resampled to 8 kHz mono).
    #[arg(long)]
    audio: Option<PathBuf>,
    /// Concurrent calls.
    #[arg(long, default_value_t = 1)]
    calls: usize,
    /// Spread call starts over this many milliseconds.
    #[arg(long, default_value_t = 0)]
    ramp_ms: u64,
    /// Write what each call heard to DIR/call-N.wav.
    #[arg(long)]
    record_dir: Option<PathBuf>,
    /// Send the caller audio as fast as possible (not real time).
    #[arg(long)]
    fast: bool,
    /// Do not offer the audio.twilio.com subprotocol.
    #[arg(long)]
    no_subprotocol: bool,
    /// Sign the upgrade with this Twilio auth token.
    #[arg(long)]
    auth_token: Option<String>,
    /// Public URL to sign (default: --url), e.g. wss://voice.example.com/ws/twilio-media.
    #[arg(long)]
    signature_url: Option<String>,
    /// customParameters entry NAME=VALUE (repeatable).
    #[arg(long = "param", value_name = "NAME=VALUE")]
    params: Vec<String>,
    /// Quiet time after the audio and replies before sending stop.
    #[arg(long, default_value_t = 1000)]
    linger_ms: u64,
    /// Give up on a call after this many seconds.
    #[arg(long, default_value_t = 120)]
    max_call_secs: u64,
    /// Print a JSON summary (with per-call reports) instead of lines.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct WebhookArgs {
    /// Worker base URL, e.g. http://127.0.0.1:8081.
    #[arg(long)]
    base: String,
    /// Public base URL that Twilio signs (default: --base); the requests
    /// then carry X-Forwarded-Proto and -Host for it, as a TLS proxy's do.
    #[arg(long)]
    public_url: Option<String>,
    /// Sign the webhooks with this Twilio auth token.
    #[arg(long)]
    auth_token: Option<String>,
    /// CallSid to post.
    #[arg(long, default_value = "CA0123456789abcdef0123456789abcdef")]
    call_sid: String,
    /// Accept ws:// stream URLs (local worker without TLS).
    #[arg(long)]
    allow_insecure_ws: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("callsim: {}", baton::logging::error_text(&e));
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building tokio runtime")?;
    match cli.command {
        Some(Command::Webhook(args)) => rt.block_on(run_webhook(args)),
        None => rt.block_on(run_calls(cli.call)),
    }
}

async fn run_webhook(args: WebhookArgs) -> anyhow::Result<ExitCode> {
    let opts = webhook::WebhookOptions {
        base: args.base,
        public_url: args.public_url,
        auth_token: args.auth_token,
        call_sid: args.call_sid,
        allow_insecure_ws: args.allow_insecure_ws,
    };
    let rep = webhook::run(&opts).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        println!(
            "incoming_call {} stream_url {} action {} stream_status {} stream_ended {}",
            rep.incoming_call_status,
            rep.stream_url.as_deref().unwrap_or("-"),
            rep.connect_action.as_deref().unwrap_or("-"),
            rep.stream_status_status,
            rep.stream_ended_status,
        );
        for p in &rep.problems {
            println!("  PROBLEM: {p}");
        }
    }
    Ok(if rep.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn run_calls(args: CallArgs) -> anyhow::Result<ExitCode> {
    let Some(url) = args.url else {
        bail!("--url is required (or use `callsim webhook`)");
    };
    let Some(audio_path) = args.audio else {
        bail!("--audio is required");
    };
    let audio = callsim::load_audio(&audio_path)?;
    if let Some(dir) = &args.record_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut params = BTreeMap::new();
    for p in &args.params {
        let (k, v) = p
            .split_once('=')
            .with_context(|| format!("--param {p:?} is not NAME=VALUE"))?;
        params.insert(k.to_string(), v.to_string());
    }
    let opts = Options {
        url,
        audio,
        calls: args.calls,
        ramp: Duration::from_millis(args.ramp_ms),
        record_dir: args.record_dir,
        fast: args.fast,
        offer_subprotocol: !args.no_subprotocol,
        auth_token: args.auth_token,
        signature_url: args.signature_url,
        params,
        linger: Duration::from_millis(args.linger_ms),
        max_call: Duration::from_secs(args.max_call_secs),
        ..Options::default()
    };
    let summary = callsim::run(opts).await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        for r in &summary.reports {
            println!("{}", r.line());
        }
        let ms = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |x| format!("{x:.2}"));
        println!(
            "summary: {} calls, {} ok, {} with violations, {} with errors; frames out {} in {}; first reply p50/p99 {}/{} ms; jitter p50/p99/max {}/{}/{} ms",
            summary.calls,
            summary.ok,
            summary.with_violations,
            summary.with_errors,
            summary.frames_out,
            summary.frames_in,
            ms(summary.first_reply_p50_ms),
            ms(summary.first_reply_p99_ms),
            ms(summary.jitter_p50_ms),
            ms(summary.jitter_p99_ms),
            ms(summary.jitter_max_ms),
        );
    }
    Ok(if summary.ok == summary.calls {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
