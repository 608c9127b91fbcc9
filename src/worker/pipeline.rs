//! The voice pipeline behind small engine traits: VAD -> STT -> dialog -> TTS.
//!
//! Each call owns its own [`Vad`] and [`Dialog`] (they keep per-call
//! state); the [`Stt`], the [`Tts`] and the pre-rendered greeting are shared.
//! The engines in this file are the honest minimum until real ones land:
//! - [`EnergyVad`]: mean-amplitude speech detection with end-of-utterance;
//! - [`NoStt`]: no speech recogniser, and it says so (no fake transcripts);
//!   [`PocketsphinxStt`] when configured and installed;
//! - [`EchoDialog`]: replies with the caller's own utterance;
//! - [`EspeakTts`] (espeak-ng when installed) or [`ToneTts`].

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::config::{Config, SttChoice, TtsChoice, VadConfig};
use crate::twilio::audio::{self, SAMPLE_RATE_HZ};
use crate::twilio::mulaw;

/// What the VAD saw in a block of audio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VadEvent {
    /// Nothing changed.
    None,
    /// Speech began (after `start_ms` of voiced audio).
    SpeechStart,
    /// The utterance ended: after a pause (`cut` false; the last
    /// `trailing_silence_ms` of it are that pause), or at the length cap
    /// (`cut` true). Speech that goes on after a cut starts the next
    /// utterance as any speech does (after `start_ms` of it); the audio
    /// since the cut belongs to that one.
    SpeechEnd {
        /// The unvoiced audio at the end of the utterance.
        trailing_silence_ms: u64,
        /// Ended by `max_utterance_ms`, not by a pause.
        cut: bool,
    },
}

/// Voice activity detection; per call.
pub trait Vad: Send {
    /// Feeds one block of 8 kHz PCM.
    fn process(&mut self, pcm: &[i16]) -> VadEvent;
    /// True while inside an utterance.
    fn in_speech(&self) -> bool;
}

/// Speech to text; shared between calls.
///
/// Recognisers are slow and may block, so the call runs [`Stt::transcribe`]
/// on the blocking pool (a few at a time, see [`Engines::stt_slots`]) and
/// keeps pacing audio meanwhile; the transcript is logged as `STT_FINAL`
/// when it lands. Engines that can stream partial results report them
/// through [`Stt::partial`] (`STT_PARTIAL`); the file-based ones here cannot.
pub trait Stt: Send + Sync {
    /// Engine name for logs, `/version` and records (`none` = no engine).
    fn name(&self) -> &'static str;
    /// Whether this engine transcribes at all (false for [`NoStt`]).
    fn available(&self) -> bool;
    /// The transcript of one finished utterance (8 kHz PCM); `Ok(None)`
    /// when nothing was recognised. Blocking.
    ///
    /// # Errors
    /// [`SttError`] when the engine fails.
    fn transcribe(&self, utterance: &[i16]) -> Result<Option<String>, SttError>;
}

/// A speech recogniser failure.
#[derive(Debug, thiserror::Error)]
pub enum SttError {
    /// The engine program could not be run or its input written.
    #[error("running {program}: {source}")]
    Io {
        /// The program.
        program: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The engine ran but failed.
    #[error("{0}")]
    Failed(String),
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
    voiced_us: u64,
    silence_us: u64,
    utterance_us: u64,
}

impl EnergyVad {
    /// A VAD in the silent state.
    pub fn new(cfg: VadConfig) -> Self {
        Self {
            cfg,
            speaking: false,
            voiced_us: 0,
            silence_us: 0,
            utterance_us: 0,
        }
    }
}

impl Vad for EnergyVad {
    fn process(&mut self, pcm: &[i16]) -> VadEvent {
        // Counted in microseconds (exact at 8 kHz): blocks of any size add
        // up to the time they are, so a start takes `start_ms` of audio
        // and no more (the pre-roll is sized by it).
        let block_us = pcm.len() as u64 * 1_000_000 / u64::from(SAMPLE_RATE_HZ);
        let voiced = audio::mean_abs(pcm) >= self.cfg.threshold;
        if self.speaking {
            self.utterance_us += block_us;
            self.silence_us = if voiced {
                0
            } else {
                self.silence_us + block_us
            };
            let trailing_silence_ms = self.silence_us / 1000;
            if self.silence_us >= self.cfg.end_silence_ms * 1000 {
                self.speaking = false;
                self.voiced_us = 0;
                self.silence_us = 0;
                return VadEvent::SpeechEnd {
                    trailing_silence_ms,
                    cut: false,
                };
            }
            if self.utterance_us >= self.cfg.max_utterance_ms * 1000 {
                self.speaking = false;
                self.voiced_us = 0;
                self.silence_us = 0;
                return VadEvent::SpeechEnd {
                    trailing_silence_ms,
                    cut: true,
                };
            }
        } else {
            self.voiced_us = if voiced { self.voiced_us + block_us } else { 0 };
            if self.voiced_us >= self.cfg.start_ms.max(1) * 1000 {
                self.speaking = true;
                self.utterance_us = self.voiced_us;
                self.silence_us = 0;
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

/// No recogniser configured: nothing is transcribed, and the call logs
/// `transcribed=false` with engine `none` (no fake transcripts).
#[derive(Debug, Default)]
pub struct NoStt;

impl Stt for NoStt {
    fn name(&self) -> &'static str {
        "none"
    }
    fn available(&self) -> bool {
        false
    }
    fn transcribe(&self, _utterance: &[i16]) -> Result<Option<String>, SttError> {
        Ok(None)
    }
}

/// Removes scratch files (`utt-*.wav`) older than `stale`: a worker
/// stopped in the middle of a transcription leaves its file behind. A
/// file in use is younger than the engine's time limit (the engine is
/// killed then, and the file removed), whichever worker made it: workers
/// sharing `data_dir` (generations, or containers, whose process ids say
/// nothing of each other) keep theirs.
fn sweep_scratch(dir: &std::path::Path, stale: Duration) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut removed = 0u64;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let ours = name
            .to_str()
            .is_some_and(|n| n.starts_with("utt-") && n.ends_with(".wav"));
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > stale));
        if ours && old && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::info!(removed, dir = %dir.display(), "removed scratch files left by stopped workers");
    }
}

// === impl PocketsphinxStt ===

/// CMU PocketSphinx (Debian `pocketsphinx` + `pocketsphinx-en-us`) run as
/// `pocketsphinx_continuous -infile` on each utterance, upsampled to the
/// 16 kHz its US-English model expects. Accuracy on telephone audio is
/// modest; it is here so the pipeline runs on a real recogniser.
#[derive(Debug)]
pub struct PocketsphinxStt {
    /// Where utterance WAVs are written for the recogniser.
    scratch_dir: std::path::PathBuf,
    /// Names scratch files uniquely within the process.
    counter: std::sync::atomic::AtomicU64,
    /// A run that takes longer is killed.
    timeout: Duration,
}

/// The recogniser program.
pub const POCKETSPHINX_PROGRAM: &str = "pocketsphinx_continuous";

impl PocketsphinxStt {
    /// An engine writing scratch files under `scratch_dir`, killing a run
    /// after `timeout`.
    pub fn new(scratch_dir: std::path::PathBuf, timeout: Duration) -> Self {
        Self {
            scratch_dir,
            counter: std::sync::atomic::AtomicU64::new(0),
            timeout,
        }
    }

    /// Checks that the program runs (used by `stt = "auto"` and at start-up),
    /// within `timeout`.
    pub fn probe(timeout: Duration) -> bool {
        run_bounded(
            Command::new(POCKETSPHINX_PROGRAM)
                .arg("-h")
                .stdin(Stdio::null())
                .stderr(Stdio::null()),
            timeout,
        )
        .is_ok_and(|r| r.is_some())
    }
}

impl Stt for PocketsphinxStt {
    fn name(&self) -> &'static str {
        "pocketsphinx"
    }
    fn available(&self) -> bool {
        true
    }
    fn transcribe(&self, utterance: &[i16]) -> Result<Option<String>, SttError> {
        let io = |source| SttError::Io {
            program: POCKETSPHINX_PROGRAM,
            source,
        };
        std::fs::create_dir_all(&self.scratch_dir).map_err(io)?;
        let n = self
            .counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // The random part keeps workers that share `data_dir` from another
        // PID namespace (a container) off each other's files.
        let path = self.scratch_dir.join(format!(
            "utt-{}-{n}-{:016x}.wav",
            std::process::id(),
            rand::random::<u64>()
        ));
        // Pad with silence: the recogniser's own VAD needs some on each side.
        let mut pcm16 = vec![0i16; 3200];
        pcm16.extend(audio::resample(utterance, SAMPLE_RATE_HZ, 16_000));
        pcm16.extend(std::iter::repeat_n(0i16, 3200));
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: 16_000,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let written = (|| -> Result<(), hound::Error> {
            let mut w = hound::WavWriter::create(&path, spec)?;
            for &s in &pcm16 {
                w.write_sample(s)?;
            }
            w.finalize()
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&path);
            return Err(SttError::Failed(format!("writing {}: {e}", path.display())));
        }
        let out = run_bounded(
            Command::new(POCKETSPHINX_PROGRAM)
                .arg("-infile")
                .arg(&path)
                .args(["-logfn", "/dev/null"])
                .stdin(Stdio::null())
                .stderr(Stdio::null()),
            self.timeout,
        );
        let _ = std::fs::remove_file(&path);
        let Some(out) = out.map_err(io)? else {
            return Err(SttError::Failed(format!(
                "{POCKETSPHINX_PROGRAM} did not finish within {:?}; killed",
                self.timeout
            )));
        };
        if !out.status.success() {
            return Err(SttError::Failed(format!(
                "{POCKETSPHINX_PROGRAM} exited {}",
                out.status
            )));
        }
        let text = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        Ok((!text.is_empty()).then_some(text))
    }
}

/// Runs `cmd` to its end with stdout captured, or kills (and reaps) it
/// once `limit` has passed: `Ok(None)`. A hung engine must not hold a
/// call, a transcription slot or start-up for ever. Runs on the blocking
/// pool, like every engine call: it waits.
///
/// # Errors
/// The program could not be started.
fn run_bounded(cmd: &mut Command, limit: Duration) -> std::io::Result<Option<Output>> {
    // The engine stays in the worker's process group, so that stopping the
    // worker (batond signals the whole group) stops it too.
    let mut child = cmd.stdout(Stdio::piped()).spawn()?;
    // Read on a thread of its own: output larger than a pipe holds (a WAV)
    // would otherwise stop the program before it exits.
    let (out_tx, out_rx) = std::sync::mpsc::sync_channel(1);
    if let Some(mut out) = child.stdout.take() {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = out.read_to_end(&mut buf);
            let _ = out_tx.send(buf);
        });
    }
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // A process the engine started may still hold its output open: wait
    // for the end of it briefly, not for ever.
    let stdout = out_rx
        .recv_timeout(Duration::from_secs(1))
        .unwrap_or_default();
    Ok(status.map(|status| Output {
        status,
        stdout,
        stderr: Vec::new(),
    }))
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
#[derive(Debug)]
pub struct EspeakTts {
    /// A run that takes longer is killed.
    pub timeout: Duration,
}

impl Tts for EspeakTts {
    fn name(&self) -> &'static str {
        "espeak-ng"
    }
    fn synthesize(&self, text: &str) -> Result<Vec<i16>, TtsError> {
        let out = run_bounded(
            Command::new("espeak-ng")
                .args(["--stdout", "-s", "165", "--", text])
                .stdin(Stdio::null())
                .stderr(Stdio::null()),
            self.timeout,
        )
        .map_err(|source| TtsError::Spawn {
            program: "espeak-ng",
            source,
        })?
        .ok_or_else(|| {
            TtsError::Output(format!(
                "espeak-ng did not finish within {:?}; killed",
                self.timeout
            ))
        })?;
        if !out.status.success() {
            return Err(TtsError::Output(format!("espeak-ng exited {}", out.status)));
        }
        let (rate, pcm) = parse_streamed_wav(&out.stdout)
            .ok_or_else(|| TtsError::Output("espeak-ng output is not 16-bit PCM WAV".into()))?;
        if audio::mean_abs(&pcm) == 0 {
            return Err(TtsError::Output("espeak-ng produced silence".into()));
        }
        Ok(audio::resample(&pcm, rate, SAMPLE_RATE_HZ))
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
    /// The STT in use ([`NoStt`] when none is configured or installed).
    pub stt: Arc<dyn Stt>,
    /// Bounds concurrent transcriptions (recognisers are CPU-heavy; a
    /// thousand calls must not start a thousand of them).
    pub stt_slots: Arc<tokio::sync::Semaphore>,
    /// The greeting as mu-law, shared by every call without copying.
    pub greeting: Arc<[u8]>,
    /// VAD knobs for new calls.
    pub vad: VadConfig,
}

impl std::fmt::Debug for Engines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engines")
            .field("tts", &self.tts.name())
            .field("stt", &self.stt.name())
            .field("greeting_bytes", &self.greeting.len())
            .finish()
    }
}

impl Engines {
    /// Picks the engines and renders the greeting (blocking: call it from
    /// `spawn_blocking`).
    ///
    /// # Errors
    /// [`EngineError`] when an engine that was asked for by name fails.
    pub fn build(cfg: &Config) -> Result<Self, EngineError> {
        let espeak = EspeakTts {
            timeout: cfg.engine_timeout,
        };
        let (tts, pcm): (Arc<dyn Tts>, Vec<i16>) = match cfg.tts {
            TtsChoice::Tone => (Arc::new(ToneTts), ToneTts.synthesize(&cfg.greeting_text)?),
            TtsChoice::EspeakNg => {
                let pcm = espeak.synthesize(&cfg.greeting_text)?;
                (Arc::new(espeak), pcm)
            }
            TtsChoice::Auto => match espeak.synthesize(&cfg.greeting_text) {
                Ok(pcm) => (Arc::new(espeak), pcm),
                Err(e) => {
                    tracing::info!(error = %e, "espeak-ng unavailable; greeting is a tone");
                    (Arc::new(ToneTts), ToneTts.synthesize(&cfg.greeting_text)?)
                }
            },
        };
        let scratch = cfg.data_dir.join("tmp");
        sweep_scratch(&scratch, cfg.engine_timeout + Duration::from_secs(60));
        let stt: Arc<dyn Stt> = match cfg.stt {
            SttChoice::None => Arc::new(NoStt),
            SttChoice::Pocketsphinx => {
                if !PocketsphinxStt::probe(cfg.engine_timeout) {
                    return Err(EngineError::Missing(POCKETSPHINX_PROGRAM));
                }
                Arc::new(PocketsphinxStt::new(scratch, cfg.engine_timeout))
            }
            SttChoice::Auto => {
                if PocketsphinxStt::probe(cfg.engine_timeout) {
                    Arc::new(PocketsphinxStt::new(scratch, cfg.engine_timeout))
                } else {
                    tracing::info!("no speech recogniser installed; transcripts are off");
                    Arc::new(NoStt)
                }
            }
        };
        let mut greeting = Vec::with_capacity(pcm.len());
        mulaw::encode_into(&pcm, &mut greeting);
        Ok(Self {
            tts,
            stt,
            stt_slots: Arc::new(tokio::sync::Semaphore::new(cfg.stt_concurrency.max(1))),
            greeting: greeting.into(),
            vad: cfg.vad.clone(),
        })
    }

    /// Fresh per-call engines.
    pub fn new_call(&self) -> (Box<dyn Vad>, Box<dyn Dialog>) {
        (
            Box::new(EnergyVad::new(self.vad.clone())),
            Box::new(EchoDialog),
        )
    }

    /// Names of the engines in use, for `/version`.
    pub fn names(&self) -> serde_json::Value {
        serde_json::json!({
            "vad": "energy",
            "stt": self.stt.name(),
            "dialog": EchoDialog.name(),
            "tts": self.tts.name(),
        })
    }
}

/// An engine asked for by name cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// TTS failed.
    #[error(transparent)]
    Tts(#[from] TtsError),
    /// The program is not installed.
    #[error("{0} is not installed (Debian: pocketsphinx pocketsphinx-en-us)")]
    Missing(&'static str),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_engine_run_past_its_limit_is_killed() {
        // The sleep is the shell's child and outlives it, holding the
        // output open for a while: the run still ends.
        let r = run_bounded(
            Command::new("sh").args(["-c", "sleep 3; true"]),
            Duration::from_millis(100),
        );
        assert!(matches!(r, Ok(None)), "{r:?}");
    }

    #[test]
    fn an_engine_run_keeps_output_larger_than_a_pipe() {
        let out = run_bounded(
            Command::new("head").args(["-c", "1000000", "/dev/zero"]),
            Duration::from_secs(60),
        )
        .expect("runs")
        .expect("within the limit");
        assert!(out.status.success());
        assert_eq!(out.stdout.len(), 1_000_000);
    }

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
        let mut ended = Vec::new();
        for _ in 0..25 {
            if let VadEvent::SpeechEnd {
                trailing_silence_ms,
                cut,
            } = vad.process(&silence)
            {
                ended.push((trailing_silence_ms, cut));
            }
        }
        assert_eq!(ended, [(VadConfig::default().end_silence_ms, false)]);
        assert!(!vad.in_speech());
    }

    /// Blocks of any size count for the time they are: Twilio's 20 ms
    /// frames, or 1.25 ms ones (10 bytes), start speech after `start_ms`.
    #[test]
    fn vad_times_blocks_of_any_size_exactly() {
        for samples in [160usize, 80, 10] {
            let mut vad = EnergyVad::new(VadConfig::default());
            let speech: Vec<i16> = audio::tone(300.0, 20, 8000)[..samples].to_vec();
            let start = (0..1000)
                .position(|_| vad.process(&speech) == VadEvent::SpeechStart)
                .expect("speech starts");
            let heard_us = (start + 1) * samples * 125;
            assert_eq!(
                heard_us as u64,
                VadConfig::default().start_ms * 1000,
                "{samples}"
            );
        }
    }

    /// Speech longer than `max_utterance_ms` is cut: the cut is no pause
    /// (none of it is counted as one), and speech going on after it starts
    /// the next utterance as speech does.
    #[test]
    fn vad_cuts_long_speech_without_losing_any() {
        let cfg = VadConfig {
            max_utterance_ms: 1000,
            ..VadConfig::default()
        };
        let mut vad = EnergyVad::new(cfg.clone());
        let speech = audio::tone(300.0, 20, 8000);
        let mut events = Vec::new();
        for i in 0..200 {
            match vad.process(&speech) {
                VadEvent::None => {}
                e => events.push((i, e)),
            }
        }
        let start = cfg.start_ms / 20 - 1;
        // A start, a cut 1000 ms of speech later (the voiced blocks that
        // started it count), the next start `start_ms` after the cut, and
        // so on: a cut every 50 blocks.
        let mut want = Vec::new();
        let mut at = start;
        while at < 200 {
            want.push((at, VadEvent::SpeechStart));
            let cut = at + (1000 - cfg.start_ms) / 20;
            if cut < 200 {
                want.push((
                    cut,
                    VadEvent::SpeechEnd {
                        trailing_silence_ms: 0,
                        cut: true,
                    },
                ));
            }
            at = cut + cfg.start_ms / 20;
        }
        assert_eq!(events, want);
        assert_eq!(want[1].0, 1000 / 20 - 1);
        assert_eq!(want[3].0 - want[1].0, 50);
        // Cut in a pause: the utterance ends there, as a pause ends it.
        let mut vad = EnergyVad::new(cfg);
        let silence = vec![0i16; 160];
        let mut ends = Vec::new();
        for i in 0..70 {
            let block = if i < 48 { &speech } else { &silence };
            if let e @ VadEvent::SpeechEnd { .. } = vad.process(block) {
                ends.push(e);
            }
        }
        assert_eq!(
            ends,
            [VadEvent::SpeechEnd {
                trailing_silence_ms: 40,
                cut: true
            }]
        );
        assert!(!vad.in_speech());
    }

    /// A worker stopped mid-transcription leaves its scratch file; the
    /// next one to start removes it once it is older than any
    /// transcription runs, and leaves younger ones alone.
    #[test]
    fn stale_scratch_files_are_swept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stale = dir.path().join("utt-4242-3.wav");
        let live = dir.path().join("utt-4242-4.wav");
        let other = dir.path().join("notes.wav");
        for f in [&stale, &live, &other] {
            std::fs::write(f, b"RIFF").expect("write");
        }
        let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
        for f in [&stale, &other] {
            std::fs::File::options()
                .write(true)
                .open(f)
                .and_then(|f| f.set_modified(hour_ago))
                .expect("set mtime");
        }
        sweep_scratch(dir.path(), Duration::from_secs(120));
        assert!(!stale.exists());
        assert!(live.exists());
        assert!(other.exists());
        // No folder yet: nothing to do.
        sweep_scratch(&dir.path().join("missing"), Duration::from_secs(120));
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
