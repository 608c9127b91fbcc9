//! The JSON record each finished call leaves in `<data_dir>/calls/`.
//!
//! Written once, at the end of the call, to a temporary name, synced and
//! renamed, so a reader never sees half a record, and a record that is
//! there survives a power cut.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Most events kept per record; a long call must not grow without bound.
pub const MAX_EVENTS: usize = 2_000;

/// Longest text kept from the caller per field (an event's detail, an
/// echoed mark name): what a caller sends must not grow the record (or the
/// worker's memory) without bound. Longer text is cut, marked with `…`.
pub const MAX_TEXT: usize = 256;

/// Longest `customParameters` name or value kept: Twilio allows a name
/// and value of under 500 characters together, so no real one is cut.
pub const MAX_PARAMETER: usize = 2_048;

/// `text` cut to [`MAX_TEXT`] bytes at a character boundary.
pub fn bounded(text: impl Into<String>) -> String {
    bounded_to(text, MAX_TEXT)
}

/// `text` cut to `max` bytes at a character boundary, marked with `…`.
pub fn bounded_to(text: impl Into<String>, max: usize) -> String {
    let mut text = text.into();
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// One thing that happened during the call.
#[derive(Debug, Clone, Serialize)]
pub struct RecordEvent {
    /// Milliseconds since the WebSocket opened.
    pub t_ms: u64,
    /// What (`start`, `greeting`, `speech_start`, `stt_final`, `reply`,
    /// `mark_sent`, `mark_echoed`, `barge_in`, `dtmf`, `warning`, `stop`...).
    pub kind: &'static str,
    /// Details (mark name, digit, warning text...).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// One utterance's transcript entry.
#[derive(Debug, Clone, Serialize)]
pub struct TranscriptEntry {
    /// Milliseconds since the WebSocket opened, when the transcript landed.
    pub t_ms: u64,
    /// Utterance number (1-based; matches the `utt-N` mark).
    pub utterance: u64,
    /// Utterance length.
    pub utterance_ms: u64,
    /// The recognised text; `None` when no STT engine is installed, the
    /// engine failed, or the utterance was not transcribed (`stt_skipped`).
    pub text: Option<String>,
}

/// The whole record.
#[derive(Debug, Clone, Serialize, Default)]
pub struct CallRecord {
    /// Connection number within this worker process.
    pub conn_id: u64,
    /// `CA...`, when `start` arrived.
    pub call_sid: Option<String>,
    /// `MZ...`, when `start` arrived.
    pub stream_sid: Option<String>,
    /// `AC...`, when `start` arrived.
    pub account_sid: Option<String>,
    /// `<Parameter>` pairs from `start`.
    pub custom_parameters: BTreeMap<String, String>,
    /// Whether the 101 echoed `audio.twilio.com`.
    pub subprotocol: bool,
    /// RFC 3339 UTC.
    pub started_at: String,
    /// RFC 3339 UTC.
    pub ended_at: String,
    /// WebSocket lifetime.
    pub duration_ms: u64,
    /// Why the call ended: `stop`, `client_close` (a close frame),
    /// `reset` (the connection ended without one), `io_error`, `pong
    /// timeout`, `server shutting down`, ...
    pub end_reason: String,
    /// Inbound media messages.
    pub frames_in: u64,
    /// Outbound media messages.
    pub frames_out: u64,
    /// Inbound audio bytes.
    pub bytes_in: u64,
    /// Outbound audio bytes.
    pub bytes_out: u64,
    /// Marks we sent, in order.
    pub marks_sent: Vec<String>,
    /// Marks echoed back once their audio had played, in order.
    pub marks_echoed: Vec<String>,
    /// Marks echoed back because a `clear` emptied Twilio's buffer (a
    /// barge-in): their reply was not heard whole.
    pub marks_cleared: Vec<String>,
    /// `clear` messages sent (barge-ins).
    pub clears: u64,
    /// Utterances detected.
    pub utterances: u64,
    /// Utterances not transcribed: this call's transcriptions had fallen
    /// behind (see `MAX_STT_JOBS` in the call loop), or were still running
    /// when the wait for them at the call's end ran out (10 s, or the
    /// worker's shutdown). Each has a transcript entry without text.
    pub stt_skipped: u64,
    /// STT engine (`none` = no recogniser installed; no transcripts).
    pub stt_engine: String,
    /// One entry per utterance.
    pub transcript: Vec<TranscriptEntry>,
    /// Last ping round trip.
    pub last_rtt_ms: Option<f64>,
    /// Messages logged and skipped (malformed, unknown, binary, ...).
    pub protocol_warnings: u64,
    /// Places where Twilio's `sequenceNumber` did not go up by one (a
    /// message lost or reordered on the way; each is logged as
    /// `WS_SEQUENCE_GAP`, the first few per call).
    pub sequence_gaps: u64,
    /// Messages the counter skipped over, in all (a jump from 5 to 8 is
    /// two).
    pub messages_missing: u64,
    /// Timeline.
    pub events: Vec<RecordEvent>,
}

impl CallRecord {
    /// Appends an event unless the cap is reached; the detail is cut to
    /// [`MAX_TEXT`].
    pub fn push_event(&mut self, t_ms: u64, kind: &'static str, detail: impl Into<String>) {
        if self.events.len() < MAX_EVENTS {
            self.events.push(RecordEvent {
                t_ms,
                kind,
                detail: bounded(detail),
            });
        }
    }

    /// Adds an utterance's entry to the transcript (the first
    /// [`MAX_EVENTS`]; a caller sending faster than real time makes many).
    pub fn push_transcript(&mut self, entry: TranscriptEntry) {
        if self.transcript.len() < MAX_EVENTS {
            self.transcript.push(entry);
        }
    }

    /// Notes a mark the caller echoed (the first [`MAX_EVENTS`], names cut
    /// to [`MAX_TEXT`]).
    pub fn push_mark_echoed(&mut self, name: String) {
        if self.marks_echoed.len() < MAX_EVENTS {
            self.marks_echoed.push(bounded(name));
        }
    }

    /// Notes a mark echoed because of a `clear` (as [`Self::push_mark_echoed`]).
    pub fn push_mark_cleared(&mut self, name: String) {
        if self.marks_cleared.len() < MAX_EVENTS {
            self.marks_cleared.push(bounded(name));
        }
    }

    /// Writes the record atomically; returns its path. Serialised and
    /// written on the blocking pool: a runtime thread also paces other
    /// calls' audio.
    ///
    /// # Errors
    /// I/O or serialisation errors.
    pub async fn write(self, data_dir: &Path) -> std::io::Result<PathBuf> {
        let dir = data_dir.join("calls");
        tokio::task::spawn_blocking(move || self.write_sync(&dir))
            .await
            .map_err(std::io::Error::other)?
    }

    fn write_sync(&self, dir: &Path) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let stem = match (&self.call_sid, &self.stream_sid) {
            (Some(c), Some(s)) => format!("{}_{}", sanitize(c), sanitize(s)),
            _ => format!("conn-{}-{}", std::process::id(), self.conn_id),
        };
        let path = dir.join(format!("{stem}.json"));
        // Two calls that claim the same sids never share a temporary file.
        let tmp = dir.join(format!(
            ".{stem}.{}-{}.json.tmp",
            std::process::id(),
            self.conn_id
        ));
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        let written = (|| {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        // The rename is durable once the folder is synced; the record is
        // in place either way, so a failure here is only told.
        if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
            tracing::warn!(path = %path.display(), error = %e, "call record written, but its folder could not be synced");
        }
        Ok(path)
    }
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect()
}

/// Formats a time as RFC 3339 UTC with milliseconds (no date crate needed).
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn caller_text_is_bounded_in_the_record() {
        let mut rec = CallRecord::default();
        rec.push_event(1, "warning", "é".repeat(1000));
        let d = &rec.events[0].detail;
        assert!(d.len() <= MAX_TEXT + '…'.len_utf8(), "{}", d.len());
        assert!(d.ends_with('…'));
        assert_eq!(bounded("short"), "short");
        for _ in 0..MAX_EVENTS + 10 {
            rec.push_mark_echoed("m".repeat(10_000));
        }
        assert_eq!(rec.marks_echoed.len(), MAX_EVENTS);
        assert!(rec.marks_echoed.iter().all(|m| m.len() <= MAX_TEXT + 3));
        for n in 0..MAX_EVENTS as u64 + 10 {
            rec.push_transcript(TranscriptEntry {
                t_ms: n,
                utterance: n,
                utterance_ms: 1,
                text: None,
            });
        }
        assert_eq!(rec.transcript.len(), MAX_EVENTS);
    }

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_709_210_096_789);
        assert_eq!(rfc3339(t), "2024-02-29T12:34:56.789Z");
    }
}
