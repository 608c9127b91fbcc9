//! WebSocket load for `bench/run`: N Media Streams connections (subprotocol
//! `audio.twilio.com`, `connected` + `start`), each sending a silent 20 ms
//! `media` message and a numbered WebSocket ping every `--interval-ms`, until
//! `--stop-file` appears or `--max-s` passes. Every ping must come back as a
//! pong on the same connection (TCP keeps order, so a pong also proves the
//! media sent before it got through). Prints one JSON line:
//! connections opened and dropped, messages sent, echoed and lost, round
//! trip p50/p99, and the pacing jitter of the worker's outbound media
//! (|inter-arrival - 20 ms|, steady state, per call).
//!
//! `cargo run --release --example wsload -- --url ws://127.0.0.1:P/ws/twilio-media --conns 100`

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use base64::Engine as _;
use clap::Parser;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

#[derive(Parser, Debug, Clone)]
struct Args {
    /// ws://127.0.0.1:PORT/ws/twilio-media
    #[arg(long)]
    url: String,
    /// Connections.
    #[arg(long, default_value_t = 100)]
    conns: usize,
    /// Message period per connection.
    #[arg(long, default_value_t = 20)]
    interval_ms: u64,
    /// Spread the connection starts over this long.
    #[arg(long, default_value_t = 1000)]
    ramp_ms: u64,
    /// Written (empty) once every connection is open (or failed to).
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Stop when this file exists.
    #[arg(long)]
    stop_file: Option<PathBuf>,
    /// Stop after this long at the latest.
    #[arg(long, default_value_t = 300)]
    max_s: u64,
}

/// Inbound media frames at the start of a reply ride the pacing lead.
const JITTER_SKIP_FRAMES: usize = 6;
/// A gap longer than this starts a new reply segment.
const SEGMENT_GAP: Duration = Duration::from_millis(300);
const FRAME: Duration = Duration::from_millis(20);

#[derive(Default)]
struct Report {
    opened: bool,
    dropped: bool,
    sent: u64,
    echoed: u64,
    media_in: u64,
    rtt_us: Vec<u32>,
    jitter_us: Vec<u32>,
    error: Option<String>,
}

async fn one(i: usize, args: Args, mut stop: tokio::sync::watch::Receiver<bool>) -> Report {
    let mut r = Report::default();
    if let Err(e) = run(i, &args, &mut stop, &mut r).await {
        r.error = Some(format!("conn {i}: {e:#}"));
        if r.opened {
            r.dropped = true;
        }
    }
    r
}

async fn run(
    i: usize,
    args: &Args,
    stop: &mut tokio::sync::watch::Receiver<bool>,
    r: &mut Report,
) -> anyhow::Result<()> {
    let mut req = args.url.as_str().into_client_request()?;
    req.headers_mut().insert(
        "sec-websocket-protocol",
        http::HeaderValue::from_static("audio.twilio.com"),
    );
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        // A small read buffer, as in callsim: tungstenite zero-fills it.
        tokio_tungstenite::connect_async_with_config(
            req,
            Some(
                tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
                    .read_buffer_size(4096),
            ),
            true,
        ),
    )
    .await
    .context("handshake timed out")??;
    r.opened = true;
    let sid = format!("MZbench{i}");
    let start = serde_json::json!({"event":"start","sequenceNumber":"1","streamSid":sid,
        "start":{"accountSid":"ACbench","streamSid":sid,"callSid":format!("CAbench{i}"),
        "tracks":["inbound"],"customParameters":{},
        "mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}});
    ws.send(Message::text(
        r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#,
    ))
    .await?;
    ws.send(Message::text(start.to_string())).await?;
    let payload = base64::engine::general_purpose::STANDARD.encode([0xFFu8; 160]);

    let mut sent_at: std::collections::VecDeque<(u64, Instant)> = Default::default();
    let mut tick = tokio::time::interval(Duration::from_millis(args.interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_media: Option<Instant> = None;
    let mut in_segment = 0usize;
    let mut seq = 0u64;
    let mut stopping = *stop.borrow();
    let mut drain_deadline: Option<tokio::time::Instant> = None;

    let mut on_msg = |m: Message,
                      r: &mut Report,
                      sent_at: &mut std::collections::VecDeque<(u64, Instant)>|
     -> anyhow::Result<bool> {
        match m {
            Message::Pong(p) => {
                let n = u64::from_be_bytes(p.as_ref().try_into().context("pong payload")?);
                while let Some(&(s, t)) = sent_at.front() {
                    if s > n {
                        break;
                    }
                    sent_at.pop_front();
                    if s == n {
                        r.echoed += 1;
                        r.rtt_us
                            .push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    }
                }
            }
            Message::Text(t) if t.as_str().contains("\"event\":\"media\"") => {
                r.media_in += 1;
                let now = Instant::now();
                match last_media {
                    Some(prev) if now - prev <= SEGMENT_GAP => {
                        in_segment += 1;
                        if in_segment > JITTER_SKIP_FRAMES {
                            let d = (now - prev).as_micros() as i64 - FRAME.as_micros() as i64;
                            r.jitter_us
                                .push(d.unsigned_abs().min(u32::MAX as u64) as u32);
                        }
                    }
                    _ => in_segment = 0,
                }
                last_media = Some(now);
            }
            Message::Close(_) => return Ok(false),
            _ => {}
        }
        Ok(true)
    };

    loop {
        if let Some(d) = drain_deadline
            && (sent_at.is_empty() || tokio::time::Instant::now() >= d)
        {
            break;
        }
        tokio::select! {
            _ = tick.tick(), if !stopping => {
                seq += 1;
                let media = format!(
                    r#"{{"event":"media","sequenceNumber":"{}","streamSid":"{sid}","media":{{"track":"inbound","chunk":"{}","timestamp":"{}","payload":"{payload}"}}}}"#,
                    seq + 1, seq, seq * 20
                );
                ws.send(Message::text(media)).await.context("send media")?;
                ws.send(Message::Ping(seq.to_be_bytes().to_vec().into())).await.context("send ping")?;
                sent_at.push_back((seq, Instant::now()));
                r.sent += 1;
            }
            _ = stop.changed(), if !stopping => {
                stopping = true;
                drain_deadline = Some(tokio::time::Instant::now() + Duration::from_secs(3));
            }
            _ = tokio::time::sleep(Duration::from_millis(50)), if drain_deadline.is_some() => {}
            m = ws.next() => match m {
                None => anyhow::bail!("connection ended"),
                Some(Err(e)) => return Err(e).context("read"),
                Some(Ok(m)) => if !on_msg(m, r, &mut sent_at)? {
                    anyhow::bail!("server closed the connection");
                },
            },
        }
    }
    let _ = ws
        .send(Message::text(format!(
            r#"{{"event":"stop","sequenceNumber":"{}","streamSid":"{sid}","stop":{{"accountSid":"ACbench","callSid":"CAbench{i}"}}}}"#,
            seq + 2
        )))
        .await;
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    Ok(())
}

fn pct(v: &mut [u32], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    f64::from(v[i]) / 1000.0
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let gap = Duration::from_millis(args.ramp_ms) / args.conns.max(1) as u32;
    for i in 0..args.conns {
        tasks.spawn(one(i, args.clone(), stop_rx.clone()));
        tokio::time::sleep(gap).await;
    }
    // Ready once the handshakes had their time (bounded by their timeout).
    tokio::time::sleep(Duration::from_millis(500)).await;
    if let Some(f) = &args.ready_file {
        std::fs::write(f, b"")?;
    }
    let deadline = Instant::now() + Duration::from_secs(args.max_s);
    let mut reports = Vec::new();
    loop {
        if Instant::now() >= deadline || args.stop_file.as_ref().is_some_and(|f| f.exists()) {
            let _ = stop_tx.send(true);
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            Some(r) = tasks.join_next() => reports.push(r?),
        }
    }
    while let Some(r) = tokio::time::timeout(Duration::from_secs(10), tasks.join_next())
        .await
        .ok()
        .flatten()
    {
        reports.push(r?);
    }
    let opened = reports.iter().filter(|r| r.opened).count();
    let dropped = reports.iter().filter(|r| r.dropped).count() + (args.conns - reports.len());
    let sent: u64 = reports.iter().map(|r| r.sent).sum();
    let echoed: u64 = reports.iter().map(|r| r.echoed).sum();
    let media_in: u64 = reports.iter().map(|r| r.media_in).sum();
    let mut rtt: Vec<u32> = reports
        .iter()
        .flat_map(|r| r.rtt_us.iter().copied())
        .collect();
    let mut jit: Vec<u32> = reports
        .iter()
        .flat_map(|r| r.jitter_us.iter().copied())
        .collect();
    let errors: Vec<&str> = reports
        .iter()
        .filter_map(|r| r.error.as_deref())
        .take(5)
        .collect();
    let out = serde_json::json!({
        "conns": args.conns,
        "opened": opened,
        "dropped": dropped,
        "sent": sent,
        "echoed": echoed,
        "lost": sent - echoed,
        "media_in": media_in,
        "rtt_p50_ms": pct(&mut rtt, 0.5),
        "rtt_p99_ms": pct(&mut rtt, 0.99),
        "jitter_samples": jit.len(),
        "jitter_p50_ms": pct(&mut jit, 0.5),
        "jitter_p99_ms": pct(&mut jit, 0.99),
        "errors": errors,
    });
    println!("{out}");
    Ok(())
}
