//! One simulated Twilio call (see the module doc of [`crate::callsim`]).

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::{Error as WsError, ProtocolError, SubProtocolError};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::rxstamp::{RxStamped, RxTime};
use super::{Options, Prepared};
use crate::twilio::audio::{self, FRAME_BYTES};
use crate::twilio::messages::{MessageError, ServerMessage};
use crate::twilio::{mulaw, signature};

/// Frames sent per wake-up in fast mode (keeps reads interleaved).
const FAST_BATCH_FRAMES: usize = 25;
/// Silence frames sent after the audio in fast mode.
const FAST_TRAILING_SILENCE_FRAMES: usize = 50;
/// Inbound frames at the start of each reply that ride the pacing lead and
/// so are not counted for jitter.
const JITTER_SKIP_FRAMES: usize = 6;
/// A gap longer than this starts a new reply segment.
const SEGMENT_GAP: Duration = Duration::from_millis(300);
/// How long we wait for the server to close after our `stop`.
const STOP_CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// Wake-up when nothing is scheduled (defensive; should not happen).
const IDLE_WAKE: Duration = Duration::from_millis(250);
/// Cap on the silence inserted in a recording for one idle gap.
const MAX_RECORDED_GAP: Duration = Duration::from_secs(5);

/// What one call saw.
#[derive(Debug, Clone, Serialize, Default)]
pub struct CallReport {
    /// Call number within the run.
    pub index: usize,
    /// The callSid we sent.
    pub call_sid: String,
    /// The streamSid we sent.
    pub stream_sid: String,
    /// TCP connect + WebSocket handshake.
    pub handshake_ms: Option<f64>,
    /// Whether we offered `audio.twilio.com`.
    pub subprotocol_offered: bool,
    /// Whether the 101 echoed it.
    pub subprotocol_echoed: bool,
    /// `X-App-Signature` of the 101.
    pub app_signature: Option<String>,
    /// Media messages we sent.
    pub frames_out: u64,
    /// Media messages we received.
    pub frames_in: u64,
    /// Audio bytes received.
    pub bytes_in: u64,
    /// Received media whose payload was not 160 bytes.
    pub frames_in_not_160: u64,
    /// Marks received, in order.
    pub marks_received: Vec<String>,
    /// Marks we echoed, in order.
    pub marks_echoed: Vec<String>,
    /// `clear` messages received.
    pub clears: u64,
    /// Start -> first media received.
    pub greeting_latency_ms: Option<f64>,
    /// End of the first caller utterance -> first reply media after it.
    pub first_reply_ms: Option<f64>,
    /// The same for every utterance that got a reply.
    pub reply_latencies_ms: Vec<f64>,
    /// Most audio the server had buffered ahead of playout.
    pub max_lead_ms: f64,
    /// Pacing jitter p50 (|inter-arrival - 20 ms|, steady state).
    pub jitter_p50_ms: Option<f64>,
    /// Pacing jitter p99.
    pub jitter_p99_ms: Option<f64>,
    /// Pacing jitter max.
    pub jitter_max_ms: Option<f64>,
    /// Raw jitter samples (µs), for the run's aggregate; not serialised.
    #[serde(skip)]
    pub jitter_samples_us: Vec<u32>,
    /// Close code the server sent, if any.
    pub close_code: Option<u16>,
    /// Close reason the server sent.
    pub close_reason: Option<String>,
    /// Call length.
    pub duration_ms: f64,
    /// WAV of what the caller heard.
    pub recording: Option<String>,
    /// Things Twilio would reject.
    pub violations: Vec<String>,
    /// Other failures (refused handshake, timeout, I/O).
    pub errors: Vec<String>,
}

impl CallReport {
    /// An empty report for call `index`.
    pub fn new(index: usize) -> Self {
        Self {
            index,
            ..Self::default()
        }
    }

    /// No violation and no error.
    pub fn is_ok(&self) -> bool {
        self.violations.is_empty() && self.errors.is_empty()
    }

    /// One human-readable line.
    pub fn line(&self) -> String {
        let ms = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |x| format!("{x:.1}"));
        let mut s = format!(
            "call {} {}: handshake {} ms, subprotocol {}, frames out {} in {}, marks {}/{} echoed, clears {}, greeting {} ms, first reply {} ms, jitter p50/p99/max {}/{}/{} ms, lead max {:.0} ms, close {}",
            self.index,
            self.call_sid,
            ms(self.handshake_ms),
            match (self.subprotocol_offered, self.subprotocol_echoed) {
                (true, true) => "echoed",
                (true, false) => "NOT echoed",
                (false, false) => "not offered",
                (false, true) => "echoed unasked",
            },
            self.frames_out,
            self.frames_in,
            self.marks_echoed.len(),
            self.marks_received.len(),
            self.clears,
            ms(self.greeting_latency_ms),
            ms(self.first_reply_ms),
            ms(self.jitter_p50_ms),
            ms(self.jitter_p99_ms),
            ms(self.jitter_max_ms),
            self.max_lead_ms,
            self.close_code
                .map_or_else(|| "-".into(), |c| c.to_string()),
        );
        for v in &self.violations {
            let _ = write!(s, "\n  VIOLATION: {v}");
        }
        for e in &self.errors {
            let _ = write!(s, "\n  ERROR: {e}");
        }
        s
    }
}

type Ws = WebSocketStream<RxStamped>;

/// Runs call `index` to the end; never panics, always returns a report.
pub async fn run_call(index: usize, opts: &Options, prepared: &Prepared) -> CallReport {
    let mut rep = CallReport::new(index);
    rep.subprotocol_offered = opts.offer_subprotocol;
    rep.call_sid = format!("CA{:032x}", rand::random::<u128>());
    rep.stream_sid = format!("MZ{:032x}", rand::random::<u128>());
    let begun = Instant::now();
    match tokio::time::timeout(opts.max_call, call_inner(&mut rep, opts, prepared)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => rep.errors.push(e),
        Err(_) => rep
            .errors
            .push(format!("call exceeded {:?}", opts.max_call)),
    }
    rep.duration_ms = begun.elapsed().as_secs_f64() * 1000.0;
    rep
}

async fn connect(rep: &mut CallReport, opts: &Options) -> Result<(Ws, RxTime), String> {
    let mut req = opts
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("bad url {}: {e}", opts.url))?;
    if opts.offer_subprotocol {
        req.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("audio.twilio.com"),
        );
    }
    if let Some(token) = &opts.auth_token {
        let url = opts.signature_url.as_deref().unwrap_or(&opts.url);
        let sig = signature::compute(token, url, &[]);
        let v = HeaderValue::from_str(&sig).map_err(|e| e.to_string())?;
        req.headers_mut().insert("x-twilio-signature", v);
    }
    // A small read buffer: tungstenite zero-fills the free part of it before
    // every read (128 KiB by default), and these messages are small.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .max_message_size(Some(1 << 20));
    let t0 = Instant::now();
    let uri = req.uri();
    if uri.scheme_str() != Some("ws") {
        return Err(format!("{}: only ws:// URLs are supported", opts.url));
    }
    let host = uri.host().unwrap_or_default();
    let port = uri.port_u16().unwrap_or(80);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let stream = TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("connect {}: {e}", opts.url))?;
    let _ = stream.set_nodelay(true);
    // Frames are timed by their kernel receive time (see `rxstamp`).
    let (stream, rx) = RxStamped::new(stream).map_err(|e| format!("receive timestamps: {e}"))?;
    let result = tokio_tungstenite::client_async_with_config(req, stream, Some(config)).await;
    match result {
        Ok((ws, resp)) => {
            rep.handshake_ms = Some(t0.elapsed().as_secs_f64() * 1000.0);
            rep.subprotocol_echoed = resp
                .headers()
                .get("sec-websocket-protocol")
                .is_some_and(|v| v.as_bytes() == b"audio.twilio.com");
            rep.app_signature = resp
                .headers()
                .get("x-app-signature")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            if rep.app_signature.is_none() {
                rep.violations.push("101 without X-App-Signature".into());
            }
            Ok((ws, rx))
        }
        Err(WsError::Protocol(ProtocolError::SecWebSocketSubProtocolError(e))) => {
            let what = match e {
                SubProtocolError::NoSubProtocol => "offered audio.twilio.com, 101 echoed none",
                SubProtocolError::ServerSentSubProtocolNoneRequested => {
                    "101 sent a subprotocol that was not offered"
                }
                SubProtocolError::InvalidSubProtocol => "101 echoed a different subprotocol",
            };
            rep.violations.push(what.into());
            Err(format!("handshake failed: {what}"))
        }
        Err(WsError::Http(resp)) => Err(format!("handshake refused: HTTP {}", resp.status())),
        Err(e) => Err(format!("connect {}: {e}", opts.url)),
    }
}

/// Simulated playout at the caller.
struct Playout {
    /// When the buffered audio finishes playing.
    buffer_end: Instant,
    /// Marks waiting for their audio to play.
    pending: VecDeque<(Instant, String)>,
    /// What the caller heard (mu-law), when recording.
    recording: Option<Vec<u8>>,
    /// Whether any media arrived yet (no leading silence in the recording).
    heard_any: bool,
}

async fn call_inner(
    rep: &mut CallReport,
    opts: &Options,
    prepared: &Prepared,
) -> Result<(), String> {
    let (mut ws, rx_time) = connect(rep, opts).await?;
    let sid = rep.stream_sid.clone();
    let call_sid = rep.call_sid.clone();
    let account = "AC00000000000000000000000000000000";
    let start = serde_json::json!({
        "event": "start",
        "sequenceNumber": "1",
        "streamSid": sid,
        "start": {
            "accountSid": account,
            "streamSid": sid,
            "callSid": call_sid,
            "tracks": ["inbound"],
            "customParameters": opts.params,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        }
    });
    let io = |e: WsError| format!("websocket: {e}");
    ws.feed(Message::Text(
        r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#.into(),
    ))
    .await
    .map_err(io)?;
    ws.feed(Message::Text(start.to_string().into()))
        .await
        .map_err(io)?;
    ws.flush().await.map_err(io)?;

    let t_start = Instant::now();
    let mut seq: u64 = 1;
    let mut next_frame: usize = 0;
    let total = prepared.frames_b64.len();
    let trailing = if opts.fast {
        FAST_TRAILING_SILENCE_FRAMES
    } else {
        usize::MAX
    };
    let mut next_send = t_start;
    let mut audio_done_at: Option<Instant> = None;
    let mut last_activity = Instant::now();
    let mut utterance_end_times: Vec<Instant> = Vec::new();
    let mut next_utt = 0usize;
    let mut reply_starts: Vec<Instant> = Vec::new();
    let mut last_media: Option<Instant> = None;
    // Kernel receive time (ns) of the last media frame, for the jitter.
    let mut last_media_rx: Option<u64> = None;
    let mut segment_frames = 0usize;
    let mut new_segment = true;
    let mut play = Playout {
        buffer_end: t_start,
        pending: VecDeque::new(),
        recording: opts.record_dir.as_ref().map(|_| Vec::new()),
        heard_any: false,
    };
    let mut payload_buf: Vec<u8> = Vec::with_capacity(FRAME_BYTES * 2);
    let mut line = String::with_capacity(512);
    let mut stop_sent = false;
    let mut stop_deadline: Option<Instant> = None;
    // One timer, reset only when the next wake-up changes.
    let timer = tokio::time::sleep_until(tokio::time::Instant::now());
    tokio::pin!(timer);
    let mut armed: Option<Instant> = None;

    loop {
        let now = Instant::now();
        // Echo marks whose audio has played.
        let mut echoed = false;
        while play.pending.front().is_some_and(|(t, _)| *t <= now) {
            if let Some((_, name)) = play.pending.pop_front() {
                seq += 1;
                ws.feed(mark_text(seq, &sid, &name)).await.map_err(io)?;
                rep.marks_echoed.push(name);
                echoed = true;
            }
        }
        if echoed {
            ws.flush().await.map_err(io)?;
        }
        // Send caller audio (then line silence) that is due.
        let sending = !stop_sent && next_frame < total.saturating_add(trailing);
        if sending && next_send <= now {
            let batch = if opts.fast { FAST_BATCH_FRAMES } else { 1 };
            for _ in 0..batch {
                if next_frame >= total.saturating_add(trailing) {
                    break;
                }
                let payload = prepared
                    .frames_b64
                    .get(next_frame)
                    .unwrap_or(&prepared.silence_b64);
                seq += 1;
                line.clear();
                let _ = write!(
                    line,
                    r#"{{"event":"media","sequenceNumber":"{seq}","media":{{"track":"inbound","chunk":"{}","timestamp":"{}","payload":"{payload}"}},"streamSid":"{sid}"}}"#,
                    next_frame + 1,
                    next_frame as u64 * 20,
                );
                ws.feed(Message::Text(line.as_str().into()))
                    .await
                    .map_err(io)?;
                rep.frames_out += 1;
                next_frame += 1;
                if prepared.utterance_ends.get(next_utt) == Some(&next_frame) {
                    utterance_end_times.push(Instant::now());
                    next_utt += 1;
                }
                if next_frame == total {
                    audio_done_at = Some(Instant::now());
                    last_activity = Instant::now();
                }
            }
            ws.flush().await.map_err(io)?;
            next_send = if opts.fast {
                Instant::now()
            } else {
                next_send + Duration::from_millis(20)
            };
            if total == 0 && audio_done_at.is_none() {
                audio_done_at = Some(Instant::now());
            }
            continue;
        }
        if total == 0 && audio_done_at.is_none() {
            audio_done_at = Some(now);
        }
        // Done? Audio sent, replies played, marks echoed, quiet for `linger`.
        if !stop_sent
            && let Some(done) = audio_done_at
            && play.buffer_end <= now
            && play.pending.is_empty()
            && now.duration_since(done) >= opts.linger
            && now.duration_since(last_activity) >= opts.linger
        {
            seq += 1;
            let stop = format!(
                r#"{{"event":"stop","sequenceNumber":"{seq}","streamSid":"{sid}","stop":{{"accountSid":"{account}","callSid":"{call_sid}"}}}}"#
            );
            ws.send(Message::Text(stop.into())).await.map_err(io)?;
            stop_sent = true;
            stop_deadline = Some(Instant::now() + STOP_CLOSE_TIMEOUT);
        }
        // Wait for the next message or the next timer.
        let mut wake: Option<Instant> = None;
        let mut consider = |t: Instant| wake = Some(wake.map_or(t, |w: Instant| w.min(t)));
        if sending {
            consider(next_send);
        }
        if let Some((t, _)) = play.pending.front() {
            consider(*t);
        }
        if let (false, Some(done)) = (stop_sent, audio_done_at) {
            // When the stop condition can next become true.
            consider(
                (done + opts.linger)
                    .max(last_activity + opts.linger)
                    .max(play.buffer_end),
            );
        }
        if let Some(d) = stop_deadline {
            consider(d);
        }
        let wake = wake.unwrap_or(now + IDLE_WAKE);
        if armed != Some(wake) {
            timer.as_mut().reset(wake.into());
            armed = Some(wake);
        }
        tokio::select! {
            msg = ws.next() => {
                let Some(msg) = msg else {
                    if stop_sent { break; }
                    return Err("server closed the connection before stop".into());
                };
                let msg = match msg {
                    Ok(m) => m,
                    Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => break,
                    Err(e) => {
                        if stop_sent { break; }
                        return Err(format!("websocket: {e}"));
                    }
                };
                let now = Instant::now();
                if matches!(msg, Message::Text(_)) {
                    last_activity = now;
                }
                match msg {
                    Message::Text(text) => match ServerMessage::parse(text.as_str()) {
                        Err(MessageError::UnknownEvent(ev)) => rep.violations.push(format!("unknown event {ev:?}")),
                        Err(MessageError::Malformed(e)) => rep.violations.push(format!("bad JSON: {e}")),
                        Ok(m) => {
                            if m.stream_sid() != sid {
                                rep.violations.push(format!("wrong streamSid {:?}", m.stream_sid()));
                                continue;
                            }
                            match m {
                                ServerMessage::Media { media, .. } => {
                                    payload_buf.clear();
                                    if let Err(e) = base64::engine::general_purpose::STANDARD
                                        .decode_vec(media.payload.as_bytes(), &mut payload_buf)
                                    {
                                        rep.violations.push(format!("payload is not base64: {e}"));
                                        continue;
                                    }
                                    if audio::looks_like_file_header(&payload_buf) {
                                        rep.violations.push("file header bytes (RIFF) in media payload".into());
                                    }
                                    rep.frames_in += 1;
                                    rep.bytes_in += payload_buf.len() as u64;
                                    if payload_buf.len() != FRAME_BYTES {
                                        rep.frames_in_not_160 += 1;
                                    }
                                    if rep.greeting_latency_ms.is_none() {
                                        rep.greeting_latency_ms = Some(now.duration_since(t_start).as_secs_f64() * 1000.0);
                                    }
                                    // Segment / jitter bookkeeping.
                                    let rx_at = rx_time.get();
                                    match last_media {
                                        Some(prev) if !new_segment && now.duration_since(prev) < SEGMENT_GAP => {
                                            segment_frames += 1;
                                            if segment_frames >= JITTER_SKIP_FRAMES {
                                                // The gap between the frames' arrivals,
                                                // else between their reads.
                                                let gap_us = match (rx_at, last_media_rx) {
                                                    (Some(a), Some(b)) => (a.saturating_sub(b) / 1000) as i64,
                                                    _ => now.duration_since(prev).as_micros() as i64,
                                                };
                                                rep.jitter_samples_us.push((gap_us - 20_000).unsigned_abs() as u32);
                                            }
                                        }
                                        _ => {
                                            segment_frames = 0;
                                            new_segment = false;
                                            reply_starts.push(now);
                                        }
                                    }
                                    last_media = Some(now);
                                    last_media_rx = rx_at;
                                    // Playout.
                                    if play.buffer_end < now {
                                        if let Some(rec) = play.recording.as_mut()
                                            && play.heard_any
                                        {
                                            let gap = now.duration_since(play.buffer_end).min(MAX_RECORDED_GAP);
                                            let n = (gap.as_micros() / 125) as usize;
                                            rec.resize(rec.len() + n, mulaw::SILENCE);
                                        }
                                        play.buffer_end = now;
                                    }
                                    play.heard_any = true;
                                    play.buffer_end += Duration::from_micros(payload_buf.len() as u64 * 125);
                                    let lead = play.buffer_end.duration_since(now).as_secs_f64() * 1000.0;
                                    rep.max_lead_ms = rep.max_lead_ms.max(lead);
                                    if let Some(rec) = play.recording.as_mut() {
                                        rec.extend_from_slice(&payload_buf);
                                    }
                                }
                                ServerMessage::Mark { mark, .. } => {
                                    rep.marks_received.push(mark.name.clone());
                                    new_segment = true;
                                    if play.buffer_end <= now {
                                        seq += 1;
                                        ws.send(mark_text(seq, &sid, &mark.name)).await.map_err(io)?;
                                        rep.marks_echoed.push(mark.name);
                                    } else {
                                        play.pending.push_back((play.buffer_end, mark.name));
                                    }
                                }
                                ServerMessage::Clear { .. } => {
                                    rep.clears += 1;
                                    new_segment = true;
                                    if let Some(rec) = play.recording.as_mut() && play.buffer_end > now {
                                        let unplayed = (play.buffer_end.duration_since(now).as_micros() / 125) as usize;
                                        rec.truncate(rec.len().saturating_sub(unplayed));
                                    }
                                    play.buffer_end = now;
                                    while let Some((_, name)) = play.pending.pop_front() {
                                        seq += 1;
                                        ws.feed(mark_text(seq, &sid, &name)).await.map_err(io)?;
                                        rep.marks_echoed.push(name);
                                    }
                                    ws.flush().await.map_err(io)?;
                                }
                            }
                        }
                    },
                    Message::Binary(b) => rep.violations.push(format!("binary frame ({} bytes)", b.len())),
                    Message::Close(frame) => {
                        if let Some(f) = frame {
                            rep.close_code = Some(u16::from(f.code));
                            rep.close_reason = Some(f.reason.to_string());
                        }
                        if !stop_sent {
                            rep.errors.push("server closed the stream before stop".into());
                        }
                        // Let tungstenite send the close reply.
                        let _ = tokio::time::timeout(Duration::from_secs(1), async {
                            while let Some(Ok(_)) = ws.next().await {}
                        }).await;
                        break;
                    }
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                }
            }
            () = &mut timer => {
                armed = None;
                if stop_deadline.is_some_and(|d| Instant::now() >= d) {
                    // The server did not close after stop; close ourselves.
                    let _ = ws.close(None).await;
                    break;
                }
            }
        }
    }

    // Latencies: end of each utterance -> first reply segment after it.
    for end in &utterance_end_times {
        if let Some(start) = reply_starts.iter().find(|s| *s >= end) {
            rep.reply_latencies_ms
                .push(start.duration_since(*end).as_secs_f64() * 1000.0);
        }
    }
    rep.first_reply_ms = utterance_end_times.first().and_then(|end| {
        reply_starts
            .iter()
            .find(|s| *s >= end)
            .map(|s| s.duration_since(*end).as_secs_f64() * 1000.0)
    });
    let mut j = rep.jitter_samples_us.clone();
    j.sort_unstable();
    if !j.is_empty() {
        let at = |p: f64| f64::from(j[((j.len() - 1) as f64 * p).round() as usize]) / 1000.0;
        rep.jitter_p50_ms = Some(at(0.5));
        rep.jitter_p99_ms = Some(at(0.99));
        rep.jitter_max_ms = Some(at(1.0));
    }
    if let (Some(dir), Some(rec)) = (&opts.record_dir, play.recording.take()) {
        let path = dir.join(format!("call-{}.wav", rep.index));
        let mut pcm = Vec::with_capacity(rec.len());
        mulaw::decode_into(&rec, &mut pcm);
        let written = std::fs::File::create(&path)
            .map_err(|e| e.to_string())
            .and_then(|f| {
                audio::write_wav_8k_mono(std::io::BufWriter::new(f), &pcm)
                    .map_err(|e| e.to_string())
            });
        match written {
            Ok(()) => rep.recording = Some(path.display().to_string()),
            Err(e) => rep.errors.push(format!("writing {}: {e}", path.display())),
        }
    }
    Ok(())
}

fn mark_text(seq: u64, sid: &str, name: &str) -> Message {
    let v = serde_json::json!({
        "event": "mark",
        "sequenceNumber": seq.to_string(),
        "streamSid": sid,
        "mark": {"name": name},
    });
    Message::Text(v.to_string().into())
}
