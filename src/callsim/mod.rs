//! `callsim`: plays the Twilio side of Media Streams calls, so the worker
//! can be tested (and benchmarked) without Twilio.
//!
//! Per call it offers the `audio.twilio.com` subprotocol (optionally not),
//! sends `connected`, `start` (with customParameters), the audio as 20 ms
//! mu-law `media` messages in real time (or as fast as possible with
//! `fast`), keeps sending silence like a live line, and `stop` once the
//! replies have played. It plays received audio at 8000 bytes/s, echoes each
//! `mark` when the audio before it has played, and on `clear` drops its
//! buffer and echoes the pending marks, as Twilio does. Anything Twilio
//! would reject (binary frames, bad JSON, unknown events, a wrong streamSid,
//! file header bytes in a payload) is a protocol violation.
//!
//! One task per call; the audio is encoded and base64'd once and shared, so
//! a thousand calls fit in one process.
//!
//! - [`call`]: one simulated call;
//! - [`rxstamp`]: kernel receive timestamps, by which frames are timed;
//! - [`webhook`]: the webhook + TwiML check (`callsim webhook`).

pub mod call;
pub mod rxstamp;
pub mod webhook;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde::Serialize;

use crate::twilio::audio::{self, FRAME_BYTES};

pub use call::CallReport;

/// What a simulation run needs.
#[derive(Debug, Clone)]
pub struct Options {
    /// `ws://host:port/ws/twilio-media`.
    pub url: String,
    /// The caller's audio, 8 kHz mono PCM (see [`load_audio`]).
    pub audio: Vec<i16>,
    /// Concurrent calls.
    pub calls: usize,
    /// Spread call starts over this long (avoids a SYN storm at 1000 calls).
    pub ramp: Duration,
    /// Where to write what each call heard (`call-N.wav`).
    pub record_dir: Option<PathBuf>,
    /// Send the caller audio as fast as possible instead of in real time.
    pub fast: bool,
    /// Offer `Sec-WebSocket-Protocol: audio.twilio.com`.
    pub offer_subprotocol: bool,
    /// Sign the upgrade with this Twilio auth token.
    pub auth_token: Option<String>,
    /// The URL to sign (the public `wss://` URL); defaults to `url`.
    pub signature_url: Option<String>,
    /// `customParameters` of the `start` message.
    pub params: BTreeMap<String, String>,
    /// Quiet time after the audio, with no reply playing, before `stop`.
    pub linger: Duration,
    /// Hard cap per call.
    pub max_call: Duration,
    /// Energy threshold of the caller-utterance detector (first-reply
    /// latency is measured from the end of each utterance).
    pub speech_threshold: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            url: String::new(),
            audio: Vec::new(),
            calls: 1,
            ramp: Duration::ZERO,
            record_dir: None,
            fast: false,
            offer_subprotocol: true,
            auth_token: None,
            signature_url: None,
            params: BTreeMap::new(),
            linger: Duration::from_millis(1000),
            max_call: Duration::from_secs(120),
            speech_threshold: 400,
        }
    }
}

/// Errors that stop the whole run (per-call failures are in the reports).
#[derive(Debug, thiserror::Error)]
pub enum CallsimError {
    /// The audio file could not be used.
    #[error("audio {path}: {source}")]
    Audio {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: audio::AudioError,
    },
    /// The audio file could not be opened.
    #[error("audio {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A webhook request failed outright.
    #[error("webhook: {0}")]
    Webhook(String),
}

/// Loads a WAV file as 8 kHz mono PCM.
///
/// # Errors
/// [`CallsimError`] when the file cannot be read or is not a WAV.
pub fn load_audio(path: &std::path::Path) -> Result<Vec<i16>, CallsimError> {
    let f = std::fs::File::open(path).map_err(|source| CallsimError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    audio::read_wav_8k_mono(std::io::BufReader::new(f)).map_err(|source| CallsimError::Audio {
        path: path.to_path_buf(),
        source,
    })
}

/// The caller audio prepared once for all calls.
#[derive(Debug)]
pub struct Prepared {
    /// Base64 of each 160-byte mu-law frame.
    pub frames_b64: Vec<String>,
    /// Base64 of one frame of mu-law silence.
    pub silence_b64: String,
    /// Frame indexes at which a caller utterance has just ended (the first
    /// frame after its last voiced frame).
    pub utterance_ends: Vec<usize>,
}

impl Prepared {
    /// Encodes the audio and finds the utterance ends.
    pub fn new(pcm: &[i16], speech_threshold: u32) -> Self {
        let b64 = base64::engine::general_purpose::STANDARD;
        let frames_b64 = audio::to_mulaw_frames(pcm)
            .iter()
            .map(|f| b64.encode(f))
            .collect();
        let voiced: Vec<bool> = pcm
            .chunks(FRAME_BYTES)
            .map(|c| audio::mean_abs(c) >= speech_threshold)
            .collect();
        // An utterance ends at a voiced frame followed by >= 300 ms unvoiced
        // (or the end of the audio).
        let mut utterance_ends = Vec::new();
        let mut i = 0;
        while i < voiced.len() {
            if voiced[i] {
                let mut j = i + 1;
                while j < voiced.len() && (j - i) <= 15 && !voiced[j] {
                    j += 1;
                }
                if j >= voiced.len() || (j - i) > 15 {
                    utterance_ends.push(i + 1);
                }
                i = if j > i + 1 { j } else { i + 1 };
            } else {
                i += 1;
            }
        }
        Self {
            frames_b64,
            silence_b64: b64.encode([crate::twilio::mulaw::SILENCE; FRAME_BYTES]),
            utterance_ends,
        }
    }
}

/// Aggregate over all calls.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Calls attempted.
    pub calls: usize,
    /// Calls with no error and no violation.
    pub ok: usize,
    /// Calls with at least one protocol violation.
    pub with_violations: usize,
    /// Calls with another error (handshake refused, timeout, ...).
    pub with_errors: usize,
    /// Frames sent / received over all calls.
    pub frames_out: u64,
    /// Frames received over all calls.
    pub frames_in: u64,
    /// Median first-reply latency over calls that had one.
    pub first_reply_p50_ms: Option<f64>,
    /// 99th percentile of the same.
    pub first_reply_p99_ms: Option<f64>,
    /// Outbound pacing jitter (|gap - 20 ms|) over all calls, p50.
    pub jitter_p50_ms: Option<f64>,
    /// Same, p99.
    pub jitter_p99_ms: Option<f64>,
    /// Same, max.
    pub jitter_max_ms: Option<f64>,
    /// Per-call reports.
    pub reports: Vec<CallReport>,
}

/// Runs `opts.calls` concurrent calls and gathers their reports.
pub async fn run(opts: Options) -> Summary {
    let prepared = Arc::new(Prepared::new(&opts.audio, opts.speech_threshold));
    let opts = Arc::new(opts);
    let mut tasks = tokio::task::JoinSet::new();
    let n = opts.calls.max(1);
    for i in 0..n {
        let (o, p) = (Arc::clone(&opts), Arc::clone(&prepared));
        let delay = opts.ramp.mul_f64(i as f64 / n as f64);
        tasks.spawn(async move {
            tokio::time::sleep(delay).await;
            call::run_call(i, &o, &p).await
        });
    }
    let mut reports = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(rep) => reports.push(rep),
            Err(e) => {
                let mut rep = CallReport::new(usize::MAX);
                rep.errors.push(format!("call task failed: {e}"));
                reports.push(rep);
            }
        }
    }
    reports.sort_by_key(|r| r.index);
    summarize(reports)
}

fn summarize(reports: Vec<CallReport>) -> Summary {
    let mut latencies: Vec<f64> = reports.iter().filter_map(|r| r.first_reply_ms).collect();
    latencies.sort_by(f64::total_cmp);
    let mut jitter: Vec<u32> = reports
        .iter()
        .flat_map(|r| r.jitter_samples_us.iter().copied())
        .collect();
    jitter.sort_unstable();
    let pct_us = |v: &[u32], p: f64| -> Option<f64> {
        (!v.is_empty()).then(|| f64::from(v[((v.len() - 1) as f64 * p).round() as usize]) / 1000.0)
    };
    let pct = |v: &[f64], p: f64| -> Option<f64> {
        (!v.is_empty()).then(|| v[((v.len() - 1) as f64 * p).round() as usize])
    };
    Summary {
        calls: reports.len(),
        ok: reports.iter().filter(|r| r.is_ok()).count(),
        with_violations: reports.iter().filter(|r| !r.violations.is_empty()).count(),
        with_errors: reports.iter().filter(|r| !r.errors.is_empty()).count(),
        frames_out: reports.iter().map(|r| r.frames_out).sum(),
        frames_in: reports.iter().map(|r| r.frames_in).sum(),
        first_reply_p50_ms: pct(&latencies, 0.5),
        first_reply_p99_ms: pct(&latencies, 0.99),
        jitter_p50_ms: pct_us(&jitter, 0.5),
        jitter_p99_ms: pct_us(&jitter, 0.99),
        jitter_max_ms: jitter.last().map(|&m| f64::from(m) / 1000.0),
        reports,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utterance_ends_are_found() {
        let mut pcm = vec![0i16; 1600];
        pcm.extend(audio::tone(300.0, 400, 8000));
        pcm.extend(vec![0i16; 8000]);
        pcm.extend(audio::tone(300.0, 200, 8000));
        let p = Prepared::new(&pcm, 400);
        assert_eq!(p.utterance_ends, vec![30, 90]);
        assert_eq!(p.frames_b64.len(), 90);
    }
}
