//! One Media Streams call: a single task that reads Twilio's messages,
//! runs the pipeline, and paces outbound audio.
//!
//! Pacing: a per-call clock `next_play_at` is the instant at which the next
//! outbound frame would start playing at the caller. A frame is sent when it
//! would finish playing within `pacing_lead` (so at most that much audio is
//! ever buffered at Twilio, and a `clear` cuts quickly); an idle gap resets
//! the clock to now. Every outbound frame is exactly 160 bytes of raw mu-law.
//!
//! Robustness: malformed or unknown messages, binary frames, media before
//! `start` and a wrong streamSid are logged and skipped; an oversized frame
//! closes with 1009; nothing here panics, and every exit path writes the
//! call record and logs `WS_STOP`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::error::{Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tracing::{debug, info, warn};

use super::AppState;
use super::pipeline::{Dialog, SttError, Vad, VadEvent};
use super::record::{self, CallRecord, TranscriptEntry, rfc3339};
use crate::twilio::audio::{FRAME_BYTES, SAMPLE_RATE_HZ};
use crate::twilio::messages::{
    MarkBody, MessageError, OutboundMedia, ServerMessage, TwilioMessage,
};
use crate::twilio::mulaw;

/// Log `MEDIA_TX` every this many outbound frames (one second of audio).
const MEDIA_TX_EVERY_FRAMES: u64 = 50;
/// How long a socket without `start` is given to show one it already
/// holds, when the start deadline's timer fired [`STALLED`] or more late
/// (the worker was stopped or starved meanwhile; see `serve`).
const START_RECHECK: Duration = Duration::from_millis(250);
/// A timer this late means the process did not run: tokio's timers fire
/// within a millisecond or two of their time otherwise.
const STALLED: Duration = Duration::from_millis(50);

/// Audio kept before speech start, so the echo includes the onset.
const PREROLL_SAMPLES: usize = 800;
/// A write that makes no progress this long means the peer stopped reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a finished call waits for its transcriptions.
const STT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long we wait for the peer's close reply.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Protocol warnings logged per call; later ones are only counted.
const LOGGED_WARNINGS: u64 = 20;
/// Transcriptions one call may have running or waiting for a slot. Past
/// that (a caller whose audio comes faster than it can be transcribed) an
/// utterance is not transcribed: each waiting job holds a copy of its
/// audio, and the slots are shared with every other call.
const MAX_STT_JOBS: usize = 4;

/// Something queued for the caller.
enum Out {
    /// Audio (length a multiple of 160) and how much of it went out.
    Audio { data: Arc<[u8]>, pos: usize },
    /// A mark, sent once all audio before it went out.
    Mark(String),
}

/// Most marks a call keeps waiting for (a reply each): a peer that never
/// echoes them must not grow the call's memory.
const MAX_MARKS_OUT: usize = 64;

/// How many pings go unanswered before a call is closed: the tick that
/// would send the next one is `pong_timeout` or more after the oldest
/// (two at least: one late tick after a stall must not end a call).
fn pings_before_timeout(period: Duration, pong_timeout: Duration) -> u64 {
    let period = period.as_millis().max(1);
    u64::try_from(pong_timeout.as_millis().div_ceil(period))
        .unwrap_or(u64::MAX)
        .max(2)
}

/// How a call loop ended.
enum End {
    /// Twilio sent `stop`: we close normally.
    Stop,
    /// The peer closed (or the TCP connection ended).
    PeerClosed(&'static str),
    /// We close with this code.
    Close(CloseCode, &'static str),
}

/// How much more speech an utterance needs before the next partial
/// transcript is attempted.
const PARTIAL_EVERY_SAMPLES: usize = SAMPLE_RATE_HZ as usize; // 1 s

/// A finished transcription.
struct SttDone {
    /// A partial transcript of an utterance still in progress.
    partial: bool,
    /// Utterance number.
    n: u64,
    /// Utterance length.
    utterance_ms: u64,
    /// The result.
    result: Result<Option<String>, SttError>,
}

/// Per-call state; owned by the call's task only.
struct Call {
    state: Arc<AppState>,
    opened: Instant,
    rec: CallRecord,
    started: bool,
    /// Media of a track other than `inbound` came (and was skipped).
    other_track_seen: bool,
    /// The highest `sequenceNumber` seen so far.
    last_seq: Option<u64>,
    stream_sid: String,
    call_sid: String,
    vad: Box<dyn Vad>,
    stt_jobs: tokio::task::JoinSet<SttDone>,
    /// Utterance length at which the next partial is due.
    next_partial: usize,
    /// A partial transcription of this call is running.
    partial_running: bool,
    /// The last utterance whose final transcript was logged.
    finals_logged: u64,
    dialog: Box<dyn Dialog>,
    in_bytes: Vec<u8>,
    pcm: Vec<i16>,
    preroll: VecDeque<i16>,
    /// How much audio the pre-roll keeps, and an utterance starts with:
    /// `PREROLL_SAMPLES`, or the voiced run that starts an utterance
    /// (`vad.start_ms`) if longer, so that none of the speech is left out.
    preroll_max: usize,
    /// Samples since an utterance was cut at `max_utterance_ms`, until the
    /// next starts: that one takes those of the pre-roll (the rest is in
    /// the one cut).
    since_cut: Option<usize>,
    utterance: Vec<i16>,
    queue: VecDeque<Out>,
    next_play_at: Instant,
    b64_out: String,
    ping_seq: u64,
    /// The latest ping the peer answered.
    ping_answered: u64,
    ping_sent: Option<(u64, Instant)>,
    pending_clear: bool,
    /// Marks sent whose echo has not come (name, when sent): until it
    /// comes (or `mark_timeout`), the reply before it may still be playing
    /// at the caller, and caller speech is a barge-in.
    marks_out: VecDeque<(String, Instant)>,
    /// Marks a `clear` cut short: their echo says they were cleared, not
    /// played.
    marks_cut: VecDeque<String>,
    /// The stream has no inbound track: a `<Start>` stream, one-way, on
    /// which nothing may be sent back.
    listen_only: bool,
    /// Whether marks tell what plays: until a mark goes unanswered past
    /// `mark_timeout` with no echo ever seen (a peer that does not echo
    /// them), after which what was sent does.
    marks_heeded: bool,
    /// Utterances whose final transcription is running or waiting for a
    /// slot (number, length in ms): those the call's end leaves behind are
    /// counted as skipped.
    finals_pending: Vec<(u64, u64)>,
}

/// Serves one upgraded WebSocket until the call ends, then writes its
/// record. `slot` is the call's place under `max_calls`, given back when
/// the connection ends; the wait for its transcriptions takes one of as
/// many `finishing_slots` (none free: no wait), so the audio ended calls
/// hold stays bounded too. Never panics; errors are logged with the
/// call's sids.
pub async fn run_call<S>(
    mut ws: WebSocketStream<S>,
    state: Arc<AppState>,
    conn_id: u64,
    peer: super::Peer,
    subprotocol: bool,
    slot: tokio::sync::OwnedSemaphorePermit,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    state.calls_connected.fetch_add(1, Ordering::Relaxed);
    let (vad, dialog) = state.engines.new_call();
    let preroll_max =
        PREROLL_SAMPLES.max((state.cfg.vad.start_ms * u64::from(SAMPLE_RATE_HZ) / 1000) as usize);
    let now = Instant::now();
    let mut call = Call {
        rec: CallRecord {
            conn_id,
            subprotocol,
            started_at: rfc3339(SystemTime::now()),
            stt_engine: state.engines.stt.name().to_string(),
            ..CallRecord::default()
        },
        state,
        opened: now,
        started: false,
        other_track_seen: false,
        last_seq: None,
        stream_sid: String::new(),
        call_sid: String::new(),
        vad,
        stt_jobs: tokio::task::JoinSet::new(),
        next_partial: PARTIAL_EVERY_SAMPLES,
        partial_running: false,
        finals_logged: 0,
        dialog,
        in_bytes: Vec::with_capacity(FRAME_BYTES * 2),
        pcm: Vec::with_capacity(FRAME_BYTES * 2),
        preroll: VecDeque::with_capacity(PREROLL_SAMPLES + FRAME_BYTES),
        preroll_max,
        since_cut: None,
        utterance: Vec::new(),
        queue: VecDeque::new(),
        next_play_at: now,
        b64_out: String::with_capacity(256),
        ping_seq: 0,
        ping_answered: 0,
        ping_sent: None,
        pending_clear: false,
        marks_out: VecDeque::new(),
        marks_cut: VecDeque::new(),
        listen_only: false,
        marks_heeded: true,
        finals_pending: Vec::new(),
    };
    debug!(conn = conn_id, peer = %peer, subprotocol, "websocket open");
    let end = call.serve(&mut ws).await;
    // The caller hung up (or the stream stopped) in the middle of speech:
    // that speech is an utterance too, transcribed for the record (no
    // reply: nobody is listening any more).
    call.flush_utterance();
    let reason = match end {
        End::Stop => {
            close(&mut ws, CloseCode::Normal, "stream stopped").await;
            "stop"
        }
        End::PeerClosed(why) => {
            if why == "client_close" {
                reply_close(&mut ws).await;
            }
            why
        }
        End::Close(code, why) => {
            close(&mut ws, code, why).await;
            why
        }
    };
    // The call has ended: its end is logged and recorded now, and its
    // connection closed, before the wait for its transcriptions.
    call.ended(reason);
    drop(ws);
    call.state.calls_connected.fetch_sub(1, Ordering::Relaxed);
    let finishing = Arc::clone(&call.state.finishing_slots).try_acquire_owned();
    drop(slot);
    call.finish(finishing.is_ok()).await;
    drop(finishing);
}

async fn close<S>(ws: &mut WebSocketStream<S>, code: CloseCode, why: &'static str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let frame = CloseFrame {
        code,
        reason: why.into(),
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        if ws.close(Some(frame)).await.is_ok() {
            // Read until the peer's close reply (or EOF) completes the handshake.
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
}

/// Completes a close the caller started: tungstenite has queued the reply
/// frame on reading the caller's; it goes out on the next flush, which must
/// happen before the socket is dropped (RFC 6455 §5.5.1), within
/// `CLOSE_TIMEOUT`.
async fn reply_close<S>(ws: &mut WebSocketStream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        let _ = ws.flush().await;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

impl Call {
    fn t_ms(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    fn warn_skip(&mut self, what: &'static str, detail: String) {
        self.rec.protocol_warnings += 1;
        let t = self.t_ms();
        let detail = super::record::bounded(detail);
        // A caller that sends nothing but bad messages gets a few lines in
        // the log, not one per message; the record counts them all.
        if self.rec.protocol_warnings <= LOGGED_WARNINGS {
            warn!(
                event = "WS_PROTOCOL_WARNING",
                callSid = %self.call_sid,
                streamSid = %self.stream_sid,
                what,
                detail = %detail,
                "call warning: {what}"
            );
            if self.rec.protocol_warnings == LOGGED_WARNINGS {
                warn!(callSid = %self.call_sid, streamSid = %self.stream_sid, "further warnings of this call are counted in its record, not logged");
            }
        }
        self.rec
            .push_event(t, "warning", format!("{what}: {detail}"));
    }

    /// Twilio numbers its messages 1, 2, 3, ... (`start` is 1): a jump
    /// means messages were lost on the way, and one that goes back means
    /// they came out of order. Either is counted in the record and logged
    /// (the first few of a call); the message itself is handled as usual.
    fn check_sequence(&mut self, seq: u64, event: &'static str) {
        // Saturating: the counter is the caller's text, up to u64::MAX.
        let expected = self.last_seq.map_or(1, |last| last.saturating_add(1));
        if seq != expected {
            self.rec.sequence_gaps += 1;
            let missing = seq.saturating_sub(expected);
            self.rec.messages_missing = self.rec.messages_missing.saturating_add(missing);
            if self.rec.sequence_gaps <= LOGGED_WARNINGS {
                warn!(
                    event = "WS_SEQUENCE_GAP",
                    callSid = %self.call_sid,
                    streamSid = %self.stream_sid,
                    expected,
                    got = seq,
                    missing,
                    twilio_event = event,
                    "call warning: sequenceNumber {seq} where {expected} was due"
                );
            }
            let t = self.t_ms();
            self.rec
                .push_event(t, "sequence_gap", format!("{event} {seq}, {expected} due"));
        }
        self.last_seq = Some(self.last_seq.map_or(seq, |last| last.max(seq)));
    }

    async fn serve<S>(&mut self, ws: &mut WebSocketStream<S>) -> End
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let period = self.state.cfg.ping_interval;
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // Built once and re-polled: a fresh `cancelled()` per iteration would
        // lock the shared token 100 times a second per call, and a fresh
        // `Sleep` would re-register the timer on every inbound frame.
        let cancel = self.state.calls_cancel.clone();
        let cancelled = cancel.cancelled();
        tokio::pin!(cancelled);
        // Outbound frames wait on the shared 1 ms pacing grid (see `pacer`).
        let mut pacer = self.state.pacer.sleep();
        let mut armed: Option<Instant> = None;
        // Twilio sends `start` right after `connected`; a socket that has
        // not sent it by then is no call, and must not hold a slot (or a
        // draining worker) until it hangs up.
        // Time this process did not run (stopped, starved) is not the
        // caller's: when the deadline's timer fires late, the socket gets
        // one more look (a `start` sent in time may sit unread in it)
        // before the close.
        let start_timeout = self.state.cfg.start_timeout;
        let start_deadline = self.opened + start_timeout;
        let no_start = tokio::time::sleep_until(start_deadline.into());
        tokio::pin!(no_start);
        let mut start_overdue = false;
        loop {
            let deadline = self.send_deadline();
            if deadline != armed {
                if let Some(d) = deadline {
                    pacer.reset(d);
                }
                armed = deadline;
            }
            tokio::select! {
                msg = ws.next() => {
                    let flow = match msg {
                        None => return End::PeerClosed("eof"),
                        Some(Ok(m)) => self.on_message(m).await,
                        Some(Err(e)) => return self.on_ws_error(e),
                    };
                    match flow {
                        Ok(None) => {}
                        Ok(Some(end)) => return end,
                        Err(e) => return self.on_ws_error(e),
                    }
                    // Inbound may have queued a clear (barge-in) or a reply.
                    match tokio::time::timeout(WRITE_TIMEOUT, self.flush_control(ws)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return self.on_ws_error(e),
                        Err(_) => return self.write_stalled(),
                    }
                }
                () = &mut pacer, if armed.is_some() => {
                    armed = None;
                    match tokio::time::timeout(WRITE_TIMEOUT, self.pump(ws)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return self.on_ws_error(e),
                        Err(_) => return self.write_stalled(),
                    }
                }
                _ = ping.tick() => {
                    // A dead peer (no FIN, no RST) is found by its pings
                    // going unanswered rather than by TCP's 15-minute
                    // timeout: the call is closed at the first tick
                    // `pong_timeout` or more after the oldest ping without
                    // a pong, counted in ticks, not read off the clock, so
                    // a tick's own lateness cannot put it off by a whole
                    // interval. Time this process did not run (stopped,
                    // starved) is not the peer's: the ticks missed meanwhile
                    // are not made up (`Delay`), and its pong may sit
                    // unread in the socket (after SIGCONT the runtime's
                    // first look at the sockets comes back empty, EINTR),
                    // so one late tick is never enough.
                    let unanswered = self.ping_seq - self.ping_answered;
                    if unanswered >= pings_before_timeout(period, self.state.cfg.pong_timeout) {
                        self.warn_skip("pong timeout", format!("no pong for {:?}", self.state.cfg.pong_timeout));
                        return End::Close(CloseCode::Away, "pong timeout");
                    }
                    self.ping_seq += 1;
                    self.ping_sent = Some((self.ping_seq, Instant::now()));
                    let payload = Bytes::copy_from_slice(&self.ping_seq.to_be_bytes());
                    match tokio::time::timeout(WRITE_TIMEOUT, ws.send(Message::Ping(payload))).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return self.on_ws_error(e),
                        Err(_) => return self.write_stalled(),
                    }
                }
                Some(done) = self.stt_jobs.join_next(), if !self.stt_jobs.is_empty() => {
                    self.on_stt_done(done);
                }
                () = &mut no_start, if !self.started => {
                    // A timer that fires late says this process did not
                    // run for a while: then the socket gets its look.
                    let late = Instant::now().saturating_duration_since(start_deadline);
                    if !start_overdue && late >= STALLED {
                        start_overdue = true;
                        no_start.as_mut().reset(tokio::time::Instant::now() + START_RECHECK);
                        continue;
                    }
                    self.warn_skip("no start", format!("no start message within {start_timeout:?}"));
                    return End::Close(CloseCode::Policy, "no start message");
                }
                () = &mut cancelled => return End::Close(CloseCode::Away, "server shutting down"),
            }
        }
    }

    /// The peer stopped reading: our writes have not drained for
    /// [`WRITE_TIMEOUT`].
    fn write_stalled(&mut self) -> End {
        self.warn_skip(
            "write stalled",
            format!("no progress for {WRITE_TIMEOUT:?}"),
        );
        End::PeerClosed("write stalled")
    }

    fn on_ws_error(&mut self, e: WsError) -> End {
        match e {
            WsError::Capacity(c) => {
                self.warn_skip("oversized message", c.to_string());
                End::Close(CloseCode::Size, "message too big")
            }
            WsError::Utf8(detail) => {
                self.warn_skip("invalid utf-8", detail);
                End::Close(CloseCode::Invalid, "invalid utf-8")
            }
            WsError::ConnectionClosed | WsError::AlreadyClosed => End::PeerClosed("client_close"),
            WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
                End::PeerClosed("reset")
            }
            WsError::Protocol(p) => {
                self.warn_skip("websocket protocol error", p.to_string());
                End::Close(CloseCode::Protocol, "protocol error")
            }
            other => {
                debug!(callSid = %self.call_sid, error = %other, "websocket error");
                End::PeerClosed("io_error")
            }
        }
    }

    /// Handles one inbound message; `Some(End)` ends the call.
    async fn on_message(&mut self, msg: Message) -> Result<Option<End>, WsError> {
        match msg {
            Message::Text(text) => Ok(self.on_text(text.as_str()).await),
            Message::Binary(b) => {
                self.warn_skip("binary frame", format!("{} bytes", b.len()));
                Ok(None)
            }
            Message::Pong(data) => {
                // Only an answer to a ping of ours, not answered before,
                // shows the peer reads the call: an unsolicited pong (a
                // heartbeat, RFC 6455 §5.5.3) from a peer that reads
                // nothing must not keep the call open.
                let answered = <[u8; 8]>::try_from(data.as_ref())
                    .ok()
                    .map(u64::from_be_bytes)
                    .filter(|n| *n > self.ping_answered && *n <= self.ping_seq);
                if let Some(n) = answered {
                    self.ping_answered = n;
                }
                if let Some((seq, sent)) = self.ping_sent
                    && data.as_ref() == seq.to_be_bytes()
                {
                    self.ping_sent = None;
                    let rtt_ms = sent.elapsed().as_secs_f64() * 1000.0;
                    self.rec.last_rtt_ms = Some(rtt_ms);
                    info!(
                        event = "PING_PONG",
                        callSid = %self.call_sid,
                        streamSid = %self.stream_sid,
                        rtt_ms,
                        "PING_PONG"
                    );
                }
                Ok(None)
            }
            // tungstenite answers pings itself.
            Message::Ping(_) | Message::Frame(_) => Ok(None),
            Message::Close(_) => Ok(Some(End::PeerClosed("client_close"))),
        }
    }

    async fn on_text(&mut self, text: &str) -> Option<End> {
        let msg = match TwilioMessage::parse(text) {
            Ok(m) => m,
            Err(MessageError::UnknownEvent(ev)) => {
                self.warn_skip("unknown event", ev);
                return None;
            }
            Err(MessageError::Malformed(e)) => {
                self.warn_skip("malformed message", e.to_string());
                return None;
            }
        };
        let seq = msg.sequence_number().and_then(|s| s.parse::<u64>().ok());
        if let (true, Some(sid)) = (self.started, msg.stream_sid())
            && sid != self.stream_sid
            && !matches!(msg, TwilioMessage::Start { .. })
        {
            // Skipped, but a number that is the one due takes its place
            // (it was not lost); any other is not this stream's to judge
            // by (one stray high number would make every later message a
            // gap).
            let due = self.last_seq.map_or(1, |last| last.saturating_add(1));
            if seq == Some(due) {
                self.last_seq = seq;
            }
            self.warn_skip("wrong streamSid", sid.to_string());
            return None;
        }
        // A `start` without a number is the first message all the same.
        match seq {
            Some(seq) => self.check_sequence(seq, msg.event()),
            None if matches!(msg, TwilioMessage::Start { .. }) && self.last_seq.is_none() => {
                self.last_seq = Some(1);
            }
            None => {}
        }
        let t = self.t_ms();
        match msg {
            TwilioMessage::Connected { protocol, version } => {
                debug!(protocol, version, "connected");
                self.rec.push_event(t, "connected", "");
            }
            TwilioMessage::Start {
                stream_sid, start, ..
            } => {
                if self.started {
                    self.warn_skip("duplicate start", stream_sid);
                    return None;
                }
                self.started = true;
                // The streamSid goes back in every outbound message as it
                // came; what is kept of the rest is bounded like any text
                // the caller sends (a real SID has 34 characters).
                self.rec.stream_sid = Some(record::bounded(stream_sid.as_str()));
                self.stream_sid = stream_sid;
                self.call_sid = record::bounded(start.call_sid);
                self.rec.call_sid = Some(self.call_sid.clone());
                self.rec.account_sid = Some(record::bounded(start.account_sid));
                self.rec.custom_parameters = start
                    .custom_parameters
                    .into_iter()
                    .take(record::MAX_EVENTS)
                    .map(|(k, v)| {
                        let b = |t| record::bounded_to(t, record::MAX_PARAMETER);
                        (b(k), b(v))
                    })
                    .collect();
                info!(
                    event = "WS_START",
                    callSid = %self.call_sid,
                    streamSid = %self.stream_sid,
                    subprotocol = self.rec.subprotocol,
                    params = ?self.rec.custom_parameters,
                    "WS_START"
                );
                self.rec.push_event(t, "start", "");
                let fmt = &start.media_format;
                if fmt.encoding != "audio/x-mulaw" || fmt.sample_rate != 8000 || fmt.channels != 1 {
                    // We decode as mu-law 8 kHz mono regardless: say so.
                    let detail =
                        format!("{} {} Hz x{}", fmt.encoding, fmt.sample_rate, fmt.channels);
                    self.warn_skip("unexpected mediaFormat", detail);
                }
                // A stream without the caller's track is a `<Start><Stream
                // track="outbound_track">` (`<Connect>` takes the inbound
                // track only): one-way, nothing may be sent back on it
                // (Twilio: 31951). Any stream with the inbound track is
                // answered: Twilio's one-way inbound stream cannot be told
                // from a `<Connect>` one by its `start`, and bidirectional
                // bridges (sipgate's) announce both tracks.
                if !start.tracks.is_empty() && !start.tracks.iter().any(|t| t == "inbound") {
                    self.listen_only = true;
                    info!(callSid = %self.call_sid, streamSid = %self.stream_sid, "a stream without the inbound track (a one-way <Start> stream): nothing is sent back");
                    let tracks = record::bounded(format!("tracks {:?}", start.tracks));
                    self.rec.push_event(t, "listen_only", tracks);
                }
                let greeting = Arc::clone(&self.state.engines.greeting);
                self.enqueue_reply(greeting, "greeting", "greeting".into());
            }
            TwilioMessage::Media { media, .. } => {
                if !self.started {
                    self.warn_skip("media before start", String::new());
                    return None;
                }
                // The caller is the inbound track; the outbound one (a
                // both-tracks `<Start>` stream) is what the call plays to
                // the caller: fed to the VAD it would be taken for the
                // caller's speech. Said once, then skipped.
                if media.track != "inbound" {
                    if !self.other_track_seen {
                        self.other_track_seen = true;
                        self.warn_skip(
                            "media of a track other than inbound (skipped)",
                            media.track.into_owned(),
                        );
                    }
                    return None;
                }
                self.in_bytes.clear();
                if let Err(e) = base64::engine::general_purpose::STANDARD
                    .decode_vec(media.payload.as_bytes(), &mut self.in_bytes)
                {
                    self.warn_skip("bad media payload", e.to_string());
                    return None;
                }
                self.rec.frames_in += 1;
                self.rec.bytes_in += self.in_bytes.len() as u64;
                self.pcm.clear();
                mulaw::decode_into(&self.in_bytes, &mut self.pcm);
                self.on_audio().await;
            }
            TwilioMessage::Dtmf { dtmf, .. } => {
                // A digit is one character; the caller's text is bounded all the same.
                let digit = record::bounded(dtmf.digit);
                info!(event = "DTMF", callSid = %self.call_sid, streamSid = %self.stream_sid, digit = %digit, "DTMF");
                self.rec.push_event(t, "dtmf", digit);
            }
            TwilioMessage::Mark { mark, .. } => self.on_mark_echo(mark.name),
            TwilioMessage::Stop { .. } => {
                if !self.started {
                    self.warn_skip("stop before start", String::new());
                }
                self.rec.push_event(t, "stop", "");
                return Some(End::Stop);
            }
        }
        None
    }

    /// Runs the decoded inbound PCM through VAD -> STT -> dialog.
    async fn on_audio(&mut self) {
        let pcm = std::mem::take(&mut self.pcm);
        for block in pcm.chunks(FRAME_BYTES) {
            let mut cut_here = false;
            match self.vad.process(block) {
                VadEvent::SpeechStart => {
                    self.utterance.clear();
                    self.next_partial = PARTIAL_EVERY_SAMPLES;
                    let keep = self
                        .since_cut
                        .take()
                        .unwrap_or(self.preroll_max)
                        .min(self.preroll.len());
                    self.utterance
                        .extend(self.preroll.iter().skip(self.preroll.len() - keep));
                    self.utterance.extend_from_slice(block);
                    let t = self.t_ms();
                    self.rec.push_event(t, "speech_start", "");
                    if self.is_playing() {
                        self.barge_in();
                    }
                }
                VadEvent::None if self.vad.in_speech() => {
                    self.utterance.extend_from_slice(block);
                    if self.utterance.len() >= self.next_partial {
                        self.next_partial = self.utterance.len() + PARTIAL_EVERY_SAMPLES;
                        self.start_partial();
                    }
                }
                VadEvent::SpeechEnd {
                    trailing_silence_ms,
                    cut,
                } => {
                    self.utterance.extend_from_slice(block);
                    self.end_of_utterance(trailing_silence_ms).await;
                    cut_here = cut;
                }
                VadEvent::None => {}
            }
            self.preroll.extend(block.iter());
            while self.preroll.len() > self.preroll_max {
                self.preroll.pop_front();
            }
            self.since_cut = if cut_here {
                Some(0)
            } else {
                self.since_cut.map(|n| n.saturating_add(block.len()))
            };
        }
        self.pcm = pcm;
    }

    /// Transcribes the utterance so far in the background, when the engine
    /// transcribes, no partial of this call is running yet, and a
    /// transcription slot is free right now (partials never queue: finals
    /// come first).
    fn start_partial(&mut self) {
        let stt = Arc::clone(&self.state.engines.stt);
        if !stt.available() || self.partial_running {
            return;
        }
        let Ok(permit) = Arc::clone(&self.state.engines.stt_slots).try_acquire_owned() else {
            return;
        };
        self.partial_running = true;
        let n = self.rec.utterances + 1;
        let pcm = self.utterance.clone();
        let utterance_ms = samples_ms(pcm.len());
        self.stt_jobs.spawn(async move {
            let result = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                stt.transcribe(&pcm)
            })
            .await
            .unwrap_or_else(|e| Err(SttError::Failed(format!("stt task: {e}"))));
            SttDone {
                partial: true,
                n,
                utterance_ms,
                result,
            }
        });
    }

    /// An utterance has ended (`trailing_silence_ms` of unvoiced audio at
    /// its end): transcribes it and answers it.
    async fn end_of_utterance(&mut self, trailing_silence_ms: u64) {
        let mut utt = std::mem::take(&mut self.utterance);
        // Drop most of the trailing pause that ended the utterance.
        let pause =
            (trailing_silence_ms.saturating_sub(100) * u64::from(SAMPLE_RATE_HZ) / 1000) as usize;
        utt.truncate(utt.len().saturating_sub(pause));
        let n = self.transcribe_final(&utt);
        self.reply_to(&utt, n).await;
    }

    /// The utterance under way when the call ended, transcribed (not
    /// answered).
    fn flush_utterance(&mut self) {
        if !self.vad.in_speech() || self.utterance.is_empty() {
            return;
        }
        let utt = std::mem::take(&mut self.utterance);
        if self.state.calls_cancel.is_cancelled() {
            // Closed because the worker is stopping: its transcriptions
            // are not waited for, so none is started.
            let utterance_ms = samples_ms(utt.len());
            self.rec.utterances += 1;
            let n = self.rec.utterances;
            self.skip(n, utterance_ms, "the worker was stopping");
            return;
        }
        self.transcribe_final(&utt);
    }

    /// Utterance `n` is not transcribed (`why`): counted, an event, and a
    /// transcript entry without text.
    fn skip(&mut self, n: u64, utterance_ms: u64, why: &str) {
        self.rec.stt_skipped += 1;
        let t = self.t_ms();
        self.rec
            .push_event(t, "stt_skipped", format!("utterance {n}: {why}"));
        self.rec.push_transcript(TranscriptEntry {
            t_ms: t,
            utterance: n,
            utterance_ms,
            text: None,
        });
    }

    /// Counts an utterance and transcribes it in the background (or counts
    /// it skipped); returns its number.
    fn transcribe_final(&mut self, utt: &[i16]) -> u64 {
        let utterance_ms = samples_ms(utt.len());
        self.rec.utterances += 1;
        let n = self.rec.utterances;
        let stt = Arc::clone(&self.state.engines.stt);
        if stt.available() && self.stt_jobs.len() >= MAX_STT_JOBS {
            if self.rec.stt_skipped == 0 {
                warn!(callSid = %self.call_sid, streamSid = %self.stream_sid, waiting = self.stt_jobs.len(), "transcriptions fall behind this call's speech; utterances are not transcribed until they catch up");
            }
            let why = format!(
                "transcriptions fell behind ({} running or waiting)",
                self.stt_jobs.len()
            );
            self.skip(n, utterance_ms, &why);
        } else if stt.available() {
            // Transcribe off the call loop, a few at a time process-wide, so
            // pacing and pings go on meanwhile; STT_FINAL lands later.
            // The slot is held by the transcription itself: a job dropped
            // at the call's end leaves it taken until the engine is done.
            let slots = Arc::clone(&self.state.engines.stt_slots);
            let pcm = utt.to_vec();
            self.finals_pending.push((n, utterance_ms));
            self.stt_jobs.spawn(async move {
                let result = match slots.acquire_owned().await {
                    Ok(permit) => tokio::task::spawn_blocking(move || {
                        let _permit = permit;
                        stt.transcribe(&pcm)
                    })
                    .await
                    .unwrap_or_else(|e| Err(SttError::Failed(format!("stt task: {e}")))),
                    Err(e) => Err(SttError::Failed(e.to_string())),
                };
                SttDone {
                    partial: false,
                    n,
                    utterance_ms,
                    result,
                }
            });
        } else {
            self.on_stt_done(Ok(SttDone {
                partial: false,
                n,
                utterance_ms,
                result: Ok(None),
            }));
        }
        n
    }

    /// Answers utterance `n` (the dialog's reply, spoken).
    async fn reply_to(&mut self, utt: &[i16], n: u64) {
        // Echo needs no transcript, so it does not wait for one.
        let reply = self.dialog.reply(utt, None);
        let pcm = match (reply.audio, reply.text) {
            (Some(a), _) => a,
            (None, Some(say)) => {
                let tts = Arc::clone(&self.state.engines.tts);
                match tokio::task::spawn_blocking(move || tts.synthesize(&say)).await {
                    Ok(Ok(p)) => p,
                    Ok(Err(e)) => {
                        warn!(callSid = %self.call_sid, error = %e, "tts failed");
                        return;
                    }
                    Err(e) => {
                        warn!(callSid = %self.call_sid, error = %e, "tts task failed");
                        return;
                    }
                }
            }
            (None, None) => return,
        };
        let mut encoded = Vec::with_capacity(pcm.len() + FRAME_BYTES);
        mulaw::encode_into(&pcm, &mut encoded);
        self.enqueue_reply(encoded.into(), reply.source, format!("utt-{n}"));
    }

    /// Logs a transcription result and adds it to the record.
    fn on_stt_done(&mut self, done: Result<SttDone, tokio::task::JoinError>) {
        let SttDone {
            partial,
            n,
            utterance_ms,
            result,
        } = match done {
            Ok(d) => d,
            Err(e) => {
                warn!(callSid = %self.call_sid, error = %e, "stt job failed");
                return;
            }
        };
        let engine = self.state.engines.stt.name();
        let text = match result {
            Ok(t) => t,
            Err(e) => {
                warn!(callSid = %self.call_sid, streamSid = %self.stream_sid, engine, error = %e, "stt failed");
                None
            }
        };
        if partial {
            self.partial_running = false;
            // A partial that lands after its utterance's final says nothing new.
            if n > self.finals_logged {
                info!(
                    event = "STT_PARTIAL",
                    callSid = %self.call_sid,
                    streamSid = %self.stream_sid,
                    engine,
                    utterance = n,
                    text = text.as_deref().unwrap_or(""),
                    heard_ms = utterance_ms,
                    "STT_PARTIAL"
                );
                let t = self.t_ms();
                self.rec
                    .push_event(t, "stt_partial", text.unwrap_or_default());
            }
            return;
        }
        self.finals_pending.retain(|(m, _)| *m != n);
        self.finals_logged = self.finals_logged.max(n);
        info!(
            event = "STT_FINAL",
            callSid = %self.call_sid,
            streamSid = %self.stream_sid,
            engine,
            utterance = n,
            transcribed = text.is_some(),
            text = text.as_deref().unwrap_or(""),
            utterance_ms,
            "STT_FINAL"
        );
        let t = self.t_ms();
        self.rec
            .push_event(t, "stt_final", text.clone().unwrap_or_default());
        self.rec.push_transcript(TranscriptEntry {
            t_ms: t,
            utterance: n,
            utterance_ms,
            text,
        });
    }

    /// Queues audio (padded to whole frames) followed by its mark.
    fn enqueue_reply(&mut self, audio: Arc<[u8]>, source: &'static str, mark: String) {
        let audio: Arc<[u8]> = if audio.len().is_multiple_of(FRAME_BYTES) {
            audio
        } else {
            let mut v = audio.to_vec();
            v.resize(v.len().div_ceil(FRAME_BYTES) * FRAME_BYTES, mulaw::SILENCE);
            v.into()
        };
        let len_ms = samples_ms(audio.len());
        info!(
            event = "TTS_LEN_ms",
            callSid = %self.call_sid,
            streamSid = %self.stream_sid,
            source,
            len_ms,
            mark = %mark,
            "TTS_LEN_ms"
        );
        let t = self.t_ms();
        if self.listen_only {
            self.rec.push_event(
                t,
                "reply",
                format!("{source} {len_ms} ms, not sent: a one-way stream"),
            );
            return;
        }
        self.rec
            .push_event(t, "reply", format!("{source} {len_ms} ms"));
        if !audio.is_empty() {
            self.queue.push_back(Out::Audio {
                data: audio,
                pos: 0,
            });
        }
        self.queue.push_back(Out::Mark(mark));
    }

    /// True while audio is queued here or still playing at the caller: sent
    /// within the pacing lead, or before a mark Twilio has not echoed yet
    /// (it echoes one once the audio before it has played), for at most
    /// `mark_timeout` after the mark was sent.
    fn is_playing(&mut self) -> bool {
        let now = Instant::now();
        let timeout = self.state.cfg.mark_timeout;
        let overdue = self
            .marks_out
            .front()
            .map(|(_, sent)| *sent + timeout)
            .filter(|due| now >= *due);
        if let Some(due) = overdue
            && self.marks_heeded
            && self.rec.marks_echoed.is_empty()
            && self.rec.marks_cleared.is_empty()
        {
            // A peer that echoes no marks would otherwise have every
            // reply "play" for `mark_timeout` after it was sent.
            self.marks_heeded = false;
            info!(callSid = %self.call_sid, streamSid = %self.stream_sid, "no mark was echoed within mark_timeout_ms: whether a reply plays follows what was sent from now on");
            // (Recorded when the wait ran out, not when it was noticed.)
            let t = u64::try_from(due.saturating_duration_since(self.opened).as_millis())
                .unwrap_or(u64::MAX);
            self.rec
                .push_event(t, "marks_not_echoed", "playing follows what was sent");
        }
        self.queue.iter().any(|o| matches!(o, Out::Audio { .. }))
            || self.next_play_at > now
            || self.marks_playing(now).next().is_some()
    }

    /// The marks sent whose reply may still be playing at `now`.
    fn marks_playing(&self, now: Instant) -> impl Iterator<Item = &String> {
        let timeout = self.state.cfg.mark_timeout;
        self.marks_out
            .iter()
            .filter(move |(_, sent)| self.marks_heeded && now < *sent + timeout)
            .map(|(name, _)| name)
    }

    /// An echoed mark: the audio before it has played (or a `clear`
    /// dropped it). Twilio echoes marks in the order they were sent, so
    /// those before it are over too.
    fn on_mark_echo(&mut self, name: String) {
        let t = self.t_ms();
        if !self.started {
            self.warn_skip("mark before start", name);
            return;
        }
        if let Some(i) = self.marks_cut.iter().position(|n| *n == name) {
            self.marks_cut.drain(..=i);
            self.marks_heeded = true;
            debug!(callSid = %self.call_sid, mark = %name, "mark echoed after a clear");
            self.rec.push_event(t, "mark_cleared", name.clone());
            self.rec.push_mark_cleared(name);
        } else if let Some(i) = self.marks_out.iter().position(|(n, _)| *n == name) {
            self.marks_out.drain(..=i);
            // (A peer that echoes late is heeded again.)
            self.marks_heeded = true;
            // Twilio has played all that was sent: nothing plays now,
            // whatever the send clock says.
            if self.marks_out.is_empty() && self.queue.is_empty() {
                self.next_play_at = self.next_play_at.min(Instant::now());
            }
            debug!(callSid = %self.call_sid, mark = %name, "mark echoed");
            self.rec.push_event(t, "mark_echoed", name.clone());
            self.rec.push_mark_echoed(name);
        } else {
            self.warn_skip("echo of no mark sent (unknown, or echoed twice)", name);
        }
    }

    /// What of the replies under way a barge-in or the call's end cuts:
    /// those queued here (how much of each was sent), and those sent whose
    /// mark has not come back (not heard whole yet).
    fn cut_replies(&self, now: Instant) -> String {
        // Oldest first: those sent, then those queued.
        let mut cut: Vec<String> = self
            .marks_playing(now)
            .map(|name| format!("{name}: sent whole, its mark not echoed yet"))
            .collect();
        let mut audio: Option<(usize, usize)> = None;
        for o in &self.queue {
            match o {
                Out::Audio { data, pos } => audio = Some((*pos, data.len())),
                Out::Mark(name) => cut.push(match audio.take() {
                    Some((sent, len)) => format!(
                        "{name}: {} of {} ms sent",
                        samples_ms(sent),
                        samples_ms(len)
                    ),
                    None => format!("{name}: sent whole, its mark not sent yet"),
                }),
            }
        }
        if cut.is_empty() {
            // Only what the pacing lead let out ahead of real time.
            return "audio sent ahead of real time".into();
        }
        cut.join("; ")
    }

    /// Caller speech over our audio: drop our queue and ask Twilio to drop
    /// its buffer. The `clear` itself goes out in `flush_control`; Twilio
    /// then echoes the marks it holds, which are noted as cleared.
    fn barge_in(&mut self) {
        // One reading of the clock for what is said cut and what is cleared.
        let now = Instant::now();
        let cut = self.cut_replies(now);
        self.queue.clear();
        // Those that may still play are cleared; one past `mark_timeout`
        // counts as played, and its late echo as an echo.
        let timeout = self.state.cfg.mark_timeout;
        let heeded = self.marks_heeded;
        let (cleared, kept): (VecDeque<_>, VecDeque<_>) = self
            .marks_out
            .drain(..)
            .partition(|(_, sent)| heeded && now < *sent + timeout);
        self.marks_out = kept;
        self.marks_cut
            .extend(cleared.into_iter().map(|(name, _)| name));
        // Bounded: a peer that never echoes must not grow it.
        while self.marks_cut.len() > MAX_MARKS_OUT {
            self.marks_cut.pop_front();
        }
        self.next_play_at = Instant::now();
        self.rec.clears += 1;
        let t = self.t_ms();
        self.rec.push_event(t, "barge_in", cut);
        info!(event = "BARGE_IN", callSid = %self.call_sid, streamSid = %self.stream_sid, "BARGE_IN: clear");
        self.pending_clear = true;
    }

    /// When the next queued item is due, `None` when the queue is empty.
    fn send_deadline(&self) -> Option<Instant> {
        let now = Instant::now();
        match self.queue.front()? {
            Out::Mark(_) => Some(now),
            Out::Audio { data, pos } => {
                // When the end of the next frame is within the lead.
                let plays = frame_duration((data.len() - pos).min(FRAME_BYTES));
                Some(
                    (self.next_play_at.max(now) + plays)
                        .checked_sub(self.state.cfg.pacing_lead)
                        .map_or(now, |d| d.max(now)),
                )
            }
        }
    }

    /// Sends a pending `clear` (and anything due) right away.
    async fn flush_control<S>(&mut self, ws: &mut WebSocketStream<S>) -> Result<(), WsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        if self.pending_clear {
            self.pending_clear = false;
            let msg = ServerMessage::Clear {
                stream_sid: self.stream_sid.as_str().into(),
            };
            ws.send(server_text(&msg)).await?;
        }
        if self.send_deadline().is_some_and(|d| d <= Instant::now()) {
            self.pump(ws).await?;
        }
        Ok(())
    }

    /// Sends every queued item that is due, then flushes once.
    async fn pump<S>(&mut self, ws: &mut WebSocketStream<S>) -> Result<(), WsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let now = Instant::now();
        let horizon = now + self.state.cfg.pacing_lead;
        let mut sent = false;
        loop {
            let msg = match self.queue.front_mut() {
                None => break,
                Some(Out::Mark(_)) => {
                    let Some(Out::Mark(name)) = self.queue.pop_front() else {
                        break;
                    };
                    let t = self.t_ms();
                    self.rec.push_event(t, "mark_sent", name.clone());
                    // A count at the end of every utterance, besides the
                    // once-a-second one.
                    info!(
                        event = "MEDIA_TX",
                        callSid = %self.call_sid,
                        streamSid = %self.stream_sid,
                        frames_out = self.rec.frames_out,
                        bytes_out = self.rec.bytes_out,
                        mark = %name,
                        "MEDIA_TX"
                    );
                    let msg = server_text(&ServerMessage::Mark {
                        stream_sid: self.stream_sid.as_str().into(),
                        mark: MarkBody { name: name.clone() },
                    });
                    self.marks_out.push_back((name.clone(), Instant::now()));
                    // Bounded: a peer that never echoes must not grow it.
                    if self.marks_out.len() > MAX_MARKS_OUT {
                        self.marks_out.pop_front();
                    }
                    if self.rec.marks_sent.len() < record::MAX_EVENTS {
                        self.rec.marks_sent.push(name);
                    }
                    msg
                }
                Some(Out::Audio { data, pos }) => {
                    // A clock more than a frame behind (a gap in the
                    // audio) starts again from now. Less than that is the
                    // timer waking a little late: the frame goes out at
                    // once, and the clock keeps its pace (a reset at every
                    // frame would lose that lateness each time and play
                    // slower than real time). A reply's first frame that
                    // finds the clock behind starts it from now too: the
                    // audio before it has played out, and a clock left in
                    // the past would send up to a frame beyond the lead.
                    if self.next_play_at + frame_duration(FRAME_BYTES) < now
                        || (*pos == 0 && self.next_play_at < now)
                    {
                        self.next_play_at = now;
                    }
                    let end = (*pos + FRAME_BYTES).min(data.len());
                    let n = end - *pos;
                    let plays = frame_duration(n);
                    // The whole frame plays out within the lead.
                    if self.next_play_at + plays > horizon {
                        break;
                    }
                    self.b64_out.clear();
                    base64::engine::general_purpose::STANDARD
                        .encode_string(&data[*pos..end], &mut self.b64_out);
                    *pos = end;
                    if end >= data.len() {
                        self.queue.pop_front();
                    }
                    self.next_play_at += plays;
                    self.rec.frames_out += 1;
                    self.rec.bytes_out += n as u64;
                    if self.rec.frames_out.is_multiple_of(MEDIA_TX_EVERY_FRAMES) {
                        info!(
                            event = "MEDIA_TX",
                            callSid = %self.call_sid,
                            streamSid = %self.stream_sid,
                            frames_out = self.rec.frames_out,
                            bytes_out = self.rec.bytes_out,
                            "MEDIA_TX"
                        );
                    }
                    server_text(&ServerMessage::Media {
                        stream_sid: self.stream_sid.as_str().into(),
                        media: OutboundMedia {
                            payload: self.b64_out.as_str().into(),
                        },
                    })
                }
            };
            ws.feed(msg).await?;
            sent = true;
        }
        if sent {
            ws.flush().await?;
        }
        Ok(())
    }

    /// The call's connection has closed: its length, end and reason go in
    /// the record, and `WS_STOP` is logged.
    fn ended(&mut self, reason: &'static str) {
        if self.is_playing() {
            let cut = self.cut_replies(Instant::now());
            let t = self.t_ms();
            self.rec
                .push_event(t, "reply_cut", format!("{cut} (call ended)"));
        }
        let duration_ms = self.t_ms();
        self.rec.duration_ms = duration_ms;
        self.rec.ended_at = rfc3339(SystemTime::now());
        self.rec.end_reason = reason.to_string();
        info!(
            event = "WS_STOP",
            callSid = %self.call_sid,
            streamSid = %self.stream_sid,
            reason,
            duration_ms,
            frames_in = self.rec.frames_in,
            frames_out = self.rec.frames_out,
            marks_sent = self.rec.marks_sent.len(),
            marks_echoed = self.rec.marks_echoed.len(),
            clears = self.rec.clears,
            warnings = self.rec.protocol_warnings,
            sequence_gaps = self.rec.sequence_gaps,
            "WS_STOP"
        );
    }

    /// Waits for the call's transcriptions (bounded) and writes the record.
    async fn finish(mut self, wait: bool) {
        // Let transcriptions in flight land in the record (bounded), but
        // not past the worker's own grace: a call closed at shutdown
        // writes its record before the worker exits. Without a finishing
        // slot, no wait.
        let deadline = tokio::time::Instant::now()
            + if wait {
                STT_DRAIN_TIMEOUT
            } else {
                Duration::ZERO
            };
        let shutdown = self.state.calls_cancel.clone();
        while !self.stt_jobs.is_empty() {
            let next = tokio::select! {
                // A result that is ready is taken before the shutdown is.
                biased;
                next = tokio::time::timeout_at(deadline, self.stt_jobs.join_next()) => {
                    next.map_err(|_| if wait { "at call end" } else { "at call end (too many ended calls waiting)" })
                }
                () = shutdown.cancelled() => Err("at shutdown"),
            };
            match next {
                Ok(Some(done)) => self.on_stt_done(done),
                Ok(None) => break,
                Err(when) => {
                    // Those that have finished meanwhile still count.
                    while let Some(done) = self.stt_jobs.try_join_next() {
                        self.on_stt_done(done);
                    }
                    warn!(callSid = %self.call_sid, pending = self.stt_jobs.len(), "transcriptions still running {when}; dropped");
                    self.stt_jobs.abort_all();
                    // Each utterance left without its transcript is in the
                    // record all the same: an entry without text, counted
                    // as skipped.
                    for (n, utterance_ms) in std::mem::take(&mut self.finals_pending) {
                        self.skip(n, utterance_ms, &format!("still transcribing {when}"));
                    }
                    break;
                }
            }
        }
        let rec = std::mem::take(&mut self.rec);
        match rec.write(&self.state.cfg.data_dir).await {
            Ok(path) => debug!(path = %path.display(), "call record written"),
            Err(e) => warn!(callSid = %self.call_sid, error = %e, "writing call record failed"),
        }
    }
}

fn server_text(msg: &ServerMessage<'_>) -> Message {
    // Serialising these plain structs cannot fail; an empty text would be
    // logged by the peer as malformed rather than crash us.
    Message::Text(serde_json::to_string(msg).unwrap_or_default().into())
}

/// How long `n` samples (or mu-law bytes) of 8 kHz audio last, in ms.
fn samples_ms(n: usize) -> u64 {
    n as u64 * 1000 / u64::from(SAMPLE_RATE_HZ)
}

/// How long `bytes` of 8 kHz mu-law play: 125 µs a byte.
fn frame_duration(bytes: usize) -> Duration {
    Duration::from_micros(bytes as u64 * 125)
}
