//! The voice pipeline behind small engine traits: VAD -> STT -> dialog -> TTS.
//!
//! Each call owns its own [`Vad`], [`Stt`] and [`Dialog`] (they keep
//! per-call state); the [`Tts`] and the pre-rendered greeting are shared.
//! The engines in this file are the honest minimum until real ones land:
//! - [`EnergyVad`]: mean-amplitude speech detection with end-of-utterance;
//! - [`NoStt`]: there is no speech recogniser, and it says so (no fake
//!   transcripts);
//! - [`EchoDialog`]: replies with the caller's own utterance;
//! - [`EspeakTts`] (espeak-ng when installed) or [`ToneTts`].

use std::process::{Command, Stdio};
use std::sync::Arc;

use super::config::{Config, TtsChoice, VadConfig};
use crate::twilio::audio::{self, SAMPLE_RATE_HZ};
use crate::twilio::mulaw;

/// What the VAD saw in a block of audio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VadEvent {
    /// Nothing changed.
    None,
    /// Speech began (after `start_ms` of voiced audio).
    SpeechStart,
    /// The utterance ended (pause or length cap).
    SpeechEnd,
}

/// Voice activity detection; per call.
pub trait Vad: Send {
    /// Feeds one block of 8 kHz PCM.
    fn process(&mut self, pcm: &[i16]) -> VadEvent;
    /// True while inside an utterance.
    fn in_speech(&self) -> bool;
}

/// Speech to text; per call.
pub trait Stt: Send {
    /// Engine name for logs, `/version` and records.
    fn name(&self) -> &'static str;
    /// Feeds utterance audio as it arrives; may return a partial transcript.
    fn partial(&mut self, pcm: &[i16]) -> Option<String>;
    /// The final transcript of the utterance, `None` when there is none.
    fn finish(&mut self, utterance: &[i16]) -> Option<String>;
}

/// What to say back.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    /// Text to synthesise, if any.
    pub text: Option<String>,
    /// Ready 8 kHz audio, if any (played as is; takes precedence).
    pub audio: Option<Vec<i16>>,
    /// Where the reply came from, for logs.
    pub source: &'static str,
}

/// The conversation logic; per call.
pub trait Dialog: Send {
    /// Engine name.
    fn name(&self) -> &'static str;
    /// The reply to one finished utterance.
    fn reply(&mut self, utterance: &[i16], transcript: Option<&str>) -> Reply;
}

/// Text to speech; shared between calls.
pub trait Tts: Send + Sync {
    /// Engine name.
    fn name(&self) -> &'static str;
    /// Renders text to 8 kHz mono PCM.
    ///
    /// # Errors
    /// [`TtsError`] when the engine fails.
    fn synthesize(&self, text: &str) -> Result<Vec<i16>, TtsError>;
}

/// A TTS engine failure.
#[derive(Debug, thiserror::Error)]
pub enum TtsError {
    /// The engine program could not be run.
    #[error("running {program}: {source}")]
    Spawn {
        /// The program.
        program: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The engine ran but its output was not usable.
    #[error("{0}")]
    Output(String),
}

// === impl EnergyVad ===

/// Energy VAD: a block is voiced when its mean absolute amplitude passes a
/// threshold; speech starts after `start_ms` voiced and ends after
/// `end_silence_ms` unvoiced.
#[derive(Debug)]
pub struct EnergyVad {
    cfg: VadConfig,
    speaking: bool,
    voiced_ms: u64,
    silence_ms: u64,
    utterance_ms: u64,
}

impl EnergyVad {
    /// A VAD in the silent state.
    pub fn new(cfg: VadConfig) -> Self {
        Self {
            cfg,
            speaking: false,
            voiced_ms: 0,
            silence_ms: 0,
            utterance_ms: 0,
        }
    }
}

impl Vad for EnergyVad {
    fn process(&mut self, pcm: &[i16]) -> VadEvent {
        let block_ms = pcm.len() as u64 * 1000 / u64::from(SAMPLE_RATE_HZ);
        let voiced = audio::mean_abs(pcm) >= self.cfg.threshold;
        if self.speaking {
            self.utterance_ms += block_ms;
            self.silence_ms = if voiced {
                0
            } else {
                self.silence_ms + block_ms
            };
            if self.silence_ms >= self.cfg.end_silence_ms
                || self.utterance_ms >= self.cfg.max_utterance_ms
            {
                self.speaking = false;
                self.voiced_ms = 0;
                self.silence_ms = 0;
                return VadEvent::SpeechEnd;
            }
        } else {
            self.voiced_ms = if voiced { self.voiced_ms + block_ms } else { 0 };
            if self.voiced_ms >= self.cfg.start_ms.max(1) {
                self.speaking = true;
                self.utterance_ms = self.voiced_ms;
                self.silence_ms = 0;
                return VadEvent::SpeechStart;
            }
        }
        VadEvent::None
    }

    fn in_speech(&self) -> bool {
        self.speaking
    }
}

// === impl NoStt ===

/// No recogniser installed: partials and finals are always `None`, and the
/// call logs `transcribed=false` with engine `none`.
#[derive(Debug, Default)]
pub struct NoStt;

impl Stt for NoStt {
    fn name(&self) -> &'static str {
        "none"
    }
    fn partial(&mut self, _pcm: &[i16]) -> Option<String> {
        None
    }
    fn finish(&mut self, _utterance: &[i16]) -> Option<String> {
        None
    }
}

// === impl EchoDialog ===

/// Plays the caller's utterance back, so a call is audibly alive.
#[derive(Debug, Default)]
pub struct EchoDialog;

impl Dialog for EchoDialog {
    fn name(&self) -> &'static str {
        "echo"
    }
    fn reply(&mut self, utterance: &[i16], _transcript: Option<&str>) -> Reply {
        Reply {
            text: None,
            audio: Some(utterance.to_vec()),
            source: "echo",
        }
    }
}

// === impl EspeakTts ===

/// espeak-ng as a subprocess (`--stdout` WAV), resampled to 8 kHz.
#[derive(Debug, Default)]
pub struct EspeakTts;

impl Tts for EspeakTts {
    fn name(&self) -> &'static str {
        "espeak-ng"
    }
    fn synthesize(&self, text: &str) -> Result<Vec<i16>, TtsError> {
        let out = Command::new("espeak-ng")
            .args(["--stdout", "-s", "165", "--", text])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .map_err(|source| TtsError::Spawn {
                program: "espeak-ng",
                source,
            })?;
        if !out.status.success() {
            return Err(TtsError::Output(format!("espeak-ng exited {}", out.status)));
        }
        let (rate, pcm) = parse_streamed_wav(&out.stdout)
            .ok_or_else(|| TtsError::Output("espeak-ng output is not 16-bit PCM WAV".into()))?;
        if audio::mean_abs(&pcm) == 0 {
            return Err(TtsError::Output("espeak-ng produced silence".into()));
        }
        Ok(audio::resample_linear(&pcm, rate, SAMPLE_RATE_HZ))
    }
}

/// Parses a mono 16-bit WAV written to a pipe: the size fields may be
/// placeholders, so the data runs to the end of the bytes.
fn parse_streamed_wav(bytes: &[u8]) -> Option<(u32, Vec<i16>)> {
    if bytes.len() < 12 || &bytes[..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
        return None;
    }
    let mut pos = 12;
    let mut rate = None;
    while pos + 8 <= bytes.len() {
        let id = &bytes[pos..pos + 4];
        let size = u32::from_le_bytes(bytes[pos + 4..pos + 8].try_into().ok()?) as usize;
        let body = pos + 8;
        if id == b"fmt " {
            let fmt = bytes.get(body..body + 16)?;
            let channels = u16::from_le_bytes([fmt[2], fmt[3]]);
            let bits = u16::from_le_bytes([fmt[14], fmt[15]]);
            if channels != 1 || bits != 16 {
                return None;
            }
            rate = Some(u32::from_le_bytes([fmt[4], fmt[5], fmt[6], fmt[7]]));
        } else if id == b"data" {
            let data = &bytes[body..];
            let pcm = data
                .chunks_exact(2)
                .map(|c| i16::from_le_bytes([c[0], c[1]]))
                .collect();
            return Some((rate?, pcm));
        }
        pos = body.checked_add(size)?;
    }
    None
}

// === impl ToneTts ===

/// A three-note chime whose length grows with the text; used when no speech
/// synthesiser is installed, so the greeting is a real sound, not silence.
#[derive(Debug, Default)]
pub struct ToneTts;

impl Tts for ToneTts {
    fn name(&self) -> &'static str {
        "tone"
    }
    fn synthesize(&self, text: &str) -> Result<Vec<i16>, TtsError> {
        let note_ms = (text.len() as u64 * 4).clamp(200, 600);
        let mut pcm = Vec::new();
        for freq in [523.25, 659.25, 783.99] {
            pcm.extend(audio::tone(freq, note_ms, 9000));
            pcm.extend(std::iter::repeat_n(0i16, 400)); // 50 ms gap
        }
        Ok(pcm)
    }
}

// === impl Engines ===

/// Shared engines plus the greeting, rendered once at start-up.
pub struct Engines {
    /// The TTS in use.
    pub tts: Arc<dyn Tts>,
    /// The greeting as mu-law, shared by every call without copying.
    pub greeting: Arc<[u8]>,
    /// VAD knobs for new calls.
    pub vad: VadConfig,
}

impl std::fmt::Debug for Engines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engines")
            .field("tts", &self.tts.name())
            .field("greeting_bytes", &self.greeting.len())
            .finish()
    }
}

impl Engines {
    /// Picks the TTS and renders the greeting (blocking: call it from
    /// `spawn_blocking`).
    ///
    /// # Errors
    /// [`TtsError`] when `tts = "espeak-ng"` was asked for and fails.
    pub fn build(cfg: &Config) -> Result<Self, TtsError> {
        let (tts, pcm): (Arc<dyn Tts>, Vec<i16>) = match cfg.tts {
            TtsChoice::Tone => (Arc::new(ToneTts), ToneTts.synthesize(&cfg.greeting_text)?),
            TtsChoice::EspeakNg => (
                Arc::new(EspeakTts),
                EspeakTts.synthesize(&cfg.greeting_text)?,
            ),
            TtsChoice::Auto => match EspeakTts.synthesize(&cfg.greeting_text) {
                Ok(pcm) => (Arc::new(EspeakTts), pcm),
                Err(e) => {
                    tracing::info!(error = %e, "espeak-ng unavailable; greeting is a tone");
                    (Arc::new(ToneTts), ToneTts.synthesize(&cfg.greeting_text)?)
                }
            },
        };
        let mut greeting = Vec::with_capacity(pcm.len());
        mulaw::encode_into(&pcm, &mut greeting);
        Ok(Self {
            tts,
            greeting: greeting.into(),
            vad: cfg.vad.clone(),
        })
    }

    /// Fresh per-call engines.
    pub fn new_call(&self) -> (Box<dyn Vad>, Box<dyn Stt>, Box<dyn Dialog>) {
        (
            Box::new(EnergyVad::new(self.vad.clone())),
            Box::new(NoStt),
            Box::new(EchoDialog),
        )
    }

    /// Names of the engines in use, for `/version`.
    pub fn names(&self) -> serde_json::Value {
        serde_json::json!({
            "vad": "energy",
            "stt": NoStt.name(),
            "dialog": EchoDialog.name(),
            "tts": self.tts.name(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vad_finds_start_and_end() {
        let mut vad = EnergyVad::new(VadConfig::default());
        let speech = audio::tone(300.0, 20, 8000);
        let silence = vec![0i16; 160];
        assert_eq!(vad.process(&silence), VadEvent::None);
        let mut events = Vec::new();
        for _ in 0..20 {
            events.push(vad.process(&speech));
        }
        assert_eq!(
            events
                .iter()
                .filter(|e| **e == VadEvent::SpeechStart)
                .count(),
            1
        );
        assert!(vad.in_speech());
        let mut ended = false;
        for _ in 0..25 {
            ended |= vad.process(&silence) == VadEvent::SpeechEnd;
        }
        assert!(ended);
        assert!(!vad.in_speech());
    }

    #[test]
    fn tone_greeting_is_not_silence() {
        let pcm = ToneTts.synthesize("hello there").expect("tone");
        assert!(pcm.len() > 4000);
        assert!(audio::mean_abs(&pcm) > 1000);
    }

    #[test]
    fn streamed_wav_with_bogus_sizes_parses() {
        let mut w = Vec::new();
        w.extend_from_slice(b"RIFF\xff\xff\xff\x7fWAVEfmt ");
        w.extend_from_slice(&16u32.to_le_bytes());
        w.extend_from_slice(&1u16.to_le_bytes());
        w.extend_from_slice(&1u16.to_le_bytes());
        w.extend_from_slice(&22050u32.to_le_bytes());
        w.extend_from_slice(&44100u32.to_le_bytes());
        w.extend_from_slice(&2u16.to_le_bytes());
        w.extend_from_slice(&16u16.to_le_bytes());
        w.extend_from_slice(b"data\xff\xff\xff\x7f");
        w.extend_from_slice(&1000i16.to_le_bytes());
        w.extend_from_slice(&(-1000i16).to_le_bytes());
        assert_eq!(parse_streamed_wav(&w), Some((22050, vec![1000, -1000])));
        assert_eq!(parse_streamed_wav(b"nope"), None);
    }
}
