//! Typed Media Streams messages (TWILIO.md sections 3 and 4).
//!
//! [`TwilioMessage`] is what Twilio (or `callsim`) sends to the server;
//! [`ServerMessage`] is what the server sends back. Numbers that Twilio sends
//! as JSON strings (`sequenceNumber`, `chunk`, `timestamp`) stay strings on
//! the wire; typed accessors parse them. Payloads borrow from the frame text
//! where possible so the per-frame path does not copy base64 around.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A message from Twilio to the server, tagged by its `event` field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum TwilioMessage<'a> {
    /// First message on the socket; carries no sequence number or streamSid.
    Connected {
        /// Always `"Call"`.
        protocol: String,
        /// Protocol version, `"1.0.0"`.
        version: String,
    },
    /// Stream metadata; sent once, right after `connected`. Fields that
    /// Twilio always sends but the server can do without (the counter,
    /// the account, the format, which is always mu-law 8 kHz mono) may be
    /// missing: a `start` without them still starts the call, rather than
    /// leave the caller in silence.
    Start {
        /// Message counter as a decimal string, from "1".
        #[serde(rename = "sequenceNumber", default)]
        sequence_number: String,
        /// The stream these messages belong to.
        #[serde(rename = "streamSid")]
        stream_sid: String,
        /// The call and stream description.
        start: StartMeta,
    },
    /// A chunk of caller audio (the hot path: fields borrow from the frame).
    Media {
        /// Message counter as a decimal string.
        #[serde(rename = "sequenceNumber", borrow)]
        sequence_number: Cow<'a, str>,
        /// The stream these messages belong to.
        #[serde(rename = "streamSid", borrow)]
        stream_sid: Cow<'a, str>,
        /// The audio and its position.
        #[serde(borrow)]
        media: InboundMedia<'a>,
    },
    /// A key press (bidirectional streams only).
    Dtmf {
        /// Message counter as a decimal string.
        #[serde(rename = "sequenceNumber")]
        sequence_number: String,
        /// The stream these messages belong to.
        #[serde(rename = "streamSid")]
        stream_sid: String,
        /// The digit and its track.
        dtmf: Dtmf,
    },
    /// Echo of a mark the server sent, once its audio has played (or was
    /// cleared).
    Mark {
        /// Message counter as a decimal string (kept without one, as a
        /// `start` or `stop` is).
        #[serde(rename = "sequenceNumber", default)]
        sequence_number: String,
        /// The stream these messages belong to.
        #[serde(rename = "streamSid")]
        stream_sid: String,
        /// The mark's name.
        mark: MarkBody,
    },
    /// The stream ended (the call hung up or the stream was stopped); a
    /// `stop` without its counter or `stop` object still ends it.
    Stop {
        /// Message counter as a decimal string.
        #[serde(rename = "sequenceNumber", default)]
        sequence_number: String,
        /// The stream these messages belong to.
        #[serde(rename = "streamSid")]
        stream_sid: String,
        /// Which call stopped.
        #[serde(default)]
        stop: StopMeta,
    },
}

/// The `start` object: who is calling and in what format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StartMeta {
    /// The stream's id (`MZ...`), repeated from the envelope.
    pub stream_sid: String,
    /// The account (`AC...`).
    #[serde(default)]
    pub account_sid: String,
    /// The call (`CA...`).
    pub call_sid: String,
    /// Tracks carried, e.g. `["inbound"]`.
    #[serde(default)]
    pub tracks: Vec<String>,
    /// The `<Parameter>` pairs of the TwiML.
    #[serde(default)]
    pub custom_parameters: BTreeMap<String, String>,
    /// Audio format; always mu-law 8 kHz mono on Twilio.
    #[serde(default)]
    pub media_format: MediaFormat,
}

/// Audio format of a stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MediaFormat {
    /// `"audio/x-mulaw"`.
    pub encoding: String,
    /// 8000.
    pub sample_rate: u32,
    /// 1.
    pub channels: u32,
}

impl Default for MediaFormat {
    fn default() -> Self {
        Self {
            encoding: "audio/x-mulaw".into(),
            sample_rate: 8000,
            channels: 1,
        }
    }
}

/// The `media` object of an inbound media message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InboundMedia<'a> {
    /// `"inbound"` (or `"outbound"` on a both-tracks stream).
    #[serde(borrow)]
    pub track: Cow<'a, str>,
    /// Chunk counter as a decimal string, from "1".
    #[serde(borrow)]
    pub chunk: Cow<'a, str>,
    /// Milliseconds since the stream started, as a decimal string.
    #[serde(borrow)]
    pub timestamp: Cow<'a, str>,
    /// Base64 raw mu-law.
    #[serde(borrow)]
    pub payload: Cow<'a, str>,
}

impl InboundMedia<'_> {
    /// The timestamp as a number, when it parses.
    pub fn timestamp_ms(&self) -> Option<u64> {
        self.timestamp.parse().ok()
    }
}

/// The `dtmf` object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dtmf {
    /// `"inbound_track"`.
    pub track: String,
    /// The key pressed.
    pub digit: String,
}

/// The `mark` object, both directions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MarkBody {
    /// Name chosen by the server.
    pub name: String,
}

/// The `stop` object.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StopMeta {
    /// The account.
    pub account_sid: String,
    /// The call.
    pub call_sid: String,
}

/// A message from the server to Twilio (bidirectional streams only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum ServerMessage<'a> {
    /// Audio to play: base64 raw mu-law, no file header.
    Media {
        /// Must equal the stream's sid.
        #[serde(rename = "streamSid")]
        stream_sid: Cow<'a, str>,
        /// The payload.
        #[serde(borrow)]
        media: OutboundMedia<'a>,
    },
    /// Ask Twilio to echo this name once the audio queued before it played.
    Mark {
        /// Must equal the stream's sid.
        #[serde(rename = "streamSid")]
        stream_sid: Cow<'a, str>,
        /// The mark's name.
        mark: MarkBody,
    },
    /// Drop all buffered audio (barge-in); Twilio echoes pending marks.
    Clear {
        /// Must equal the stream's sid.
        #[serde(rename = "streamSid")]
        stream_sid: Cow<'a, str>,
    },
}

/// The `media` object of an outbound media message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboundMedia<'a> {
    /// Base64 raw mu-law 8 kHz mono.
    #[serde(borrow)]
    pub payload: Cow<'a, str>,
}

/// Only the `event` field, to tell an unknown event from a malformed one.
#[derive(Debug, Deserialize)]
pub struct EventProbe {
    /// The `event` field, whatever it says.
    pub event: String,
}

/// Why a text frame was not a valid message.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    /// Valid JSON with an `event` this side does not know.
    #[error("unknown event {0:?}")]
    UnknownEvent(String),
    /// Not JSON, or a known event with missing/ill-typed fields.
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Which events each direction knows, to classify parse failures.
const TWILIO_EVENTS: [&str; 6] = ["connected", "start", "media", "dtmf", "mark", "stop"];
const SERVER_EVENTS: [&str; 3] = ["media", "mark", "clear"];

impl<'a> TwilioMessage<'a> {
    /// Parses one text frame, telling unknown events from malformed ones.
    ///
    /// # Errors
    /// [`MessageError`] when the text is not a message Twilio sends.
    pub fn parse(text: &'a str) -> Result<Self, MessageError> {
        serde_json::from_str(text).map_err(|e| classify(text, e, &TWILIO_EVENTS))
    }

    /// The streamSid of the envelope, if the message has one.
    pub fn stream_sid(&self) -> Option<&str> {
        match self {
            Self::Connected { .. } => None,
            Self::Media { stream_sid, .. } => Some(stream_sid),
            Self::Start { stream_sid, .. }
            | Self::Dtmf { stream_sid, .. }
            | Self::Mark { stream_sid, .. }
            | Self::Stop { stream_sid, .. } => Some(stream_sid),
        }
    }

    /// The message counter as Twilio sent it (`None` for `connected`,
    /// which has none, and for an empty one).
    pub fn sequence_number(&self) -> Option<&str> {
        let seq: &str = match self {
            Self::Connected { .. } => return None,
            Self::Media {
                sequence_number, ..
            } => sequence_number,
            Self::Start {
                sequence_number, ..
            }
            | Self::Dtmf {
                sequence_number, ..
            }
            | Self::Mark {
                sequence_number, ..
            }
            | Self::Stop {
                sequence_number, ..
            } => sequence_number,
        };
        (!seq.is_empty()).then_some(seq)
    }

    /// The event name, for logs.
    pub fn event(&self) -> &'static str {
        match self {
            Self::Connected { .. } => "connected",
            Self::Start { .. } => "start",
            Self::Media { .. } => "media",
            Self::Dtmf { .. } => "dtmf",
            Self::Mark { .. } => "mark",
            Self::Stop { .. } => "stop",
        }
    }
}

impl<'a> ServerMessage<'a> {
    /// Parses one text frame from the server.
    ///
    /// # Errors
    /// [`MessageError`] when the text is not a message a server may send.
    pub fn parse(text: &'a str) -> Result<Self, MessageError> {
        serde_json::from_str(text).map_err(|e| classify(text, e, &SERVER_EVENTS))
    }

    /// The streamSid the message claims.
    pub fn stream_sid(&self) -> &str {
        match self {
            Self::Media { stream_sid, .. }
            | Self::Mark { stream_sid, .. }
            | Self::Clear { stream_sid } => stream_sid,
        }
    }
}

fn classify(text: &str, err: serde_json::Error, known: &[&str]) -> MessageError {
    match serde_json::from_str::<EventProbe>(text) {
        Ok(p) if !known.contains(&p.event.as_str()) => MessageError::UnknownEvent(p.event),
        _ => MessageError::Malformed(err),
    }
}

/// Serialises a server message to JSON text.
///
/// # Errors
/// Only if serde_json fails, which it does not for these types.
pub fn to_text(msg: &ServerMessage<'_>) -> Result<String, serde_json::Error> {
    serde_json::to_string(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_or_stop_short_of_what_the_server_can_do_without_still_parses() {
        let start =
            r#"{"event":"start","start":{"streamSid":"MZ1","callSid":"CA1"},"streamSid":"MZ1"}"#;
        match TwilioMessage::parse(start) {
            Ok(TwilioMessage::Start { start, .. }) => {
                assert_eq!(start.call_sid, "CA1");
                assert_eq!(start.media_format, MediaFormat::default());
            }
            other => panic!("{other:?}"),
        }
        let stop = r#"{"event":"stop","streamSid":"MZ1"}"#;
        assert!(matches!(
            TwilioMessage::parse(stop),
            Ok(TwilioMessage::Stop { .. })
        ));
        // What it cannot do without is still an error: the call's id.
        let start = r#"{"event":"start","start":{"streamSid":"MZ1"},"streamSid":"MZ1"}"#;
        assert!(TwilioMessage::parse(start).is_err());
    }

    #[test]
    fn parses_the_documented_examples() {
        let connected = r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#;
        assert!(matches!(
            TwilioMessage::parse(connected),
            Ok(TwilioMessage::Connected { .. })
        ));
        let start = r#"{"event":"start","sequenceNumber":"1","start":{"accountSid":"AC1","streamSid":"MZ1","callSid":"CA1","tracks":["inbound"],"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1},"customParameters":{"session":"abc"}},"streamSid":"MZ1"}"#;
        match TwilioMessage::parse(start) {
            Ok(TwilioMessage::Start {
                start,
                sequence_number,
                ..
            }) => {
                assert_eq!(sequence_number, "1");
                assert_eq!(start.call_sid, "CA1");
                assert_eq!(
                    start.custom_parameters.get("session").map(String::as_str),
                    Some("abc")
                );
                assert_eq!(start.media_format, MediaFormat::default());
            }
            other => panic!("unexpected {other:?}"),
        }
        let media = r#"{"event":"media","sequenceNumber":"2","media":{"track":"inbound","chunk":"1","timestamp":"5","payload":"/////w=="},"streamSid":"MZ1"}"#;
        match TwilioMessage::parse(media) {
            Ok(TwilioMessage::Media { media, .. }) => {
                assert_eq!(media.timestamp_ms(), Some(5));
                assert!(matches!(media.payload, Cow::Borrowed(_)));
            }
            other => panic!("unexpected {other:?}"),
        }
        let dtmf = r#"{"event":"dtmf","streamSid":"MZ1","sequenceNumber":"7","dtmf":{"track":"inbound_track","digit":"1"}}"#;
        assert!(matches!(
            TwilioMessage::parse(dtmf),
            Ok(TwilioMessage::Dtmf { .. })
        ));
        let stop = r#"{"event":"stop","sequenceNumber":"10","stop":{"accountSid":"AC1","callSid":"CA1"},"streamSid":"MZ1"}"#;
        let parsed = TwilioMessage::parse(stop).ok();
        assert_eq!(parsed.as_ref().and_then(|m| m.stream_sid()), Some("MZ1"));
    }

    #[test]
    fn numbers_stay_strings_on_round_trip() {
        let msg = TwilioMessage::Media {
            sequence_number: "42".into(),
            stream_sid: "MZ9".into(),
            media: InboundMedia {
                track: "inbound".into(),
                chunk: "41".into(),
                timestamp: "800".into(),
                payload: Cow::Borrowed("AAAA"),
            },
        };
        let text = serde_json::to_string(&msg).unwrap_or_default();
        assert!(text.contains(r#""sequenceNumber":"42""#), "{text}");
        assert!(text.contains(r#""chunk":"41""#), "{text}");
        assert!(text.contains(r#""timestamp":"800""#), "{text}");
        assert_eq!(TwilioMessage::parse(&text).ok(), Some(msg));
        // A number where a string belongs is malformed.
        let bad = text.replace(r#""42""#, "42");
        assert!(matches!(
            TwilioMessage::parse(&bad),
            Err(MessageError::Malformed(_))
        ));
    }

    #[test]
    fn server_messages_round_trip() {
        let msgs = [
            ServerMessage::Media {
                stream_sid: "MZ1".into(),
                media: OutboundMedia {
                    payload: "//8=".into(),
                },
            },
            ServerMessage::Mark {
                stream_sid: "MZ1".into(),
                mark: MarkBody {
                    name: "utt-3".into(),
                },
            },
            ServerMessage::Clear {
                stream_sid: "MZ1".into(),
            },
        ];
        for m in msgs {
            let text = to_text(&m).unwrap_or_default();
            assert_eq!(ServerMessage::parse(&text).ok(), Some(m));
        }
        let text = r#"{"event":"clear","streamSid":"MZ1"}"#;
        assert!(matches!(
            ServerMessage::parse(text),
            Ok(ServerMessage::Clear { .. })
        ));
    }

    #[test]
    fn unknown_and_malformed_are_told_apart() {
        assert!(matches!(
            TwilioMessage::parse(r#"{"event":"hangup","streamSid":"MZ1"}"#),
            Err(MessageError::UnknownEvent(e)) if e == "hangup"
        ));
        assert!(matches!(
            TwilioMessage::parse("{not json"),
            Err(MessageError::Malformed(_))
        ));
        assert!(matches!(
            TwilioMessage::parse(r#"{"event":"media","streamSid":"MZ1"}"#),
            Err(MessageError::Malformed(_))
        ));
        assert!(matches!(
            ServerMessage::parse(r#"{"event":"start","streamSid":"MZ1"}"#),
            Err(MessageError::UnknownEvent(_))
        ));
    }
}
