//! media-worker configuration: a TOML file plus a few environment values.
//!
//! Two stages, as the house style asks: [`FileConfig`] is what the file may
//! say (unknown keys are refused, so a typo is an error and not a silent
//! default); [`Config`] is the validated form `run` uses. The binary reads
//! the environment and hands it in through [`EnvOverrides`], so the library
//! never reaches for process-global state.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Where `X-App-Signature` comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SignatureMode {
    /// SHA-256 of our own executable: a stale binary cannot present the
    /// digest of a new build. The default.
    #[default]
    Artifact,
    /// Echo `BATON_SIGNATURE` (for interpreted workers; opt-in only, since an
    /// old binary could otherwise borrow the new build's value).
    Env,
}

/// Which engine renders text to speech (the greeting, for now).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TtsChoice {
    /// espeak-ng when it runs, else the tone.
    #[default]
    Auto,
    /// espeak-ng or fail at start-up.
    EspeakNg,
    /// A generated chime; no external program.
    Tone,
}

/// Which speech recogniser transcribes utterances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SttChoice {
    /// No transcripts (logged honestly as `engine=none`). The default: a
    /// recogniser per utterance is far too heavy for the 1000-call bench.
    #[default]
    None,
    /// PocketSphinx when installed, else none.
    Auto,
    /// PocketSphinx or fail at start-up.
    Pocketsphinx,
}

/// Energy VAD knobs, in the file's `[vad]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VadConfig {
    /// Mean absolute amplitude (16-bit scale) above which a block is speech.
    pub threshold: u32,
    /// Speech must last this long before it counts (filters clicks).
    pub start_ms: u64,
    /// Silence this long ends an utterance.
    pub end_silence_ms: u64,
    /// An utterance is cut here even without a pause.
    pub max_utterance_ms: u64,
}

impl Default for VadConfig {
    fn default() -> Self {
        Self {
            threshold: 400,
            start_ms: 60,
            end_silence_ms: 400,
            max_utterance_ms: 10_000,
        }
    }
}

/// The file as written; every key optional.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// Address to bind when no socket is inherited (the port is `PORT`).
    pub bind_address: String,
    /// Public base URL Twilio uses (`https://host`), for TwiML and
    /// signature checks; otherwise derived from forwarded headers.
    pub public_url: Option<String>,
    /// Twilio auth token; enables signature checks. Env
    /// `TWILIO_AUTH_TOKEN` overrides it.
    pub auth_token: Option<String>,
    /// What the greeting says.
    pub greeting_text: String,
    /// Where call records go (relative paths are relative to the config
    /// file's directory).
    pub data_dir: String,
    /// `artifact` (default) or `env`.
    pub signature_mode: SignatureMode,
    /// `auto`, `espeak-ng` or `tone`.
    pub tts: TtsChoice,
    /// `none`, `auto` or `pocketsphinx`.
    pub stt: SttChoice,
    /// Transcriptions running at once, over all calls.
    pub stt_concurrency: usize,
    /// A speech engine run (espeak-ng, pocketsphinx) that takes longer is
    /// killed and counts as failed.
    pub engine_timeout_ms: u64,
    /// WebSocket ping period.
    pub ping_interval_ms: u64,
    /// A call whose pings go unanswered this long is closed (dead peer);
    /// time this process did not run does not count.
    pub pong_timeout_ms: u64,
    /// A WebSocket that sends no `start` this long after the upgrade is
    /// closed with 1008 (Twilio sends it right after `connected`): a stray
    /// or broken client would otherwise hold a call slot, and a draining
    /// worker, until it hangs up.
    pub start_timeout_ms: u64,
    /// How long open calls may go on after SIGTERM (below batond's
    /// default `worker.stop_timeout_s`, so their 1001 goes out before a
    /// SIGKILL).
    pub shutdown_grace_ms: u64,
    /// An HTTP connection that sends no complete request head for this
    /// long (idle, or a head half sent) is closed.
    pub header_timeout_ms: u64,
    /// Largest inbound WebSocket message; larger closes with 1009.
    pub max_message_bytes: usize,
    /// Calls (Media Streams WebSockets) served at once; an upgrade past
    /// it is refused with 503, so that a flood of streams cannot take the
    /// worker's memory and descriptors. The default is the benchmark's
    /// largest load; how many calls keep their pacing depends on the host.
    pub max_calls: usize,
    /// How far outbound audio may run ahead of real time (at least one
    /// frame, 20 ms).
    pub pacing_lead_ms: u64,
    /// How long a reply counts as still playing at the caller after its
    /// `mark` was sent, when Twilio has not echoed the mark (which it does
    /// once the audio before it has played): a mark whose echo is lost
    /// must not keep the call "speaking" for good.
    pub mark_timeout_ms: u64,
    /// Energy VAD.
    pub vad: VadConfig,
    /// `SCHED_FIFO` priority of the threads that move frames (the runtime
    /// and the pacer); 0 (the default) is normal scheduling. The speech
    /// engines keep normal scheduling. See `baton::sched`.
    pub realtime_priority: u8,
}

impl Default for FileConfig {
    fn default() -> Self {
        Self {
            bind_address: "127.0.0.1".into(),
            public_url: None,
            auth_token: None,
            greeting_text:
                "Hello, you are connected to Baton. Say something and I will say it back.".into(),
            data_dir: "data".into(),
            signature_mode: SignatureMode::Artifact,
            tts: TtsChoice::Auto,
            stt: SttChoice::None,
            stt_concurrency: 2,
            engine_timeout_ms: 15_000,
            ping_interval_ms: 5_000,
            pong_timeout_ms: 15_000,
            start_timeout_ms: 10_000,
            shutdown_grace_ms: 8_000,
            header_timeout_ms: 30_000,
            max_message_bytes: 64 * 1024,
            max_calls: 1000,
            pacing_lead_ms: 100,
            mark_timeout_ms: 2000,
            vad: VadConfig::default(),
            realtime_priority: 0,
        }
    }
}

/// Values the binary read from the environment.
#[derive(Debug, Clone, Default)]
pub struct EnvOverrides {
    /// `TWILIO_AUTH_TOKEN`.
    pub twilio_auth_token: Option<String>,
    /// `BATON_SIGNATURE` (used only in `env` signature mode).
    pub baton_signature: Option<String>,
}

/// The validated configuration `run` uses.
#[derive(Debug, Clone)]
pub struct Config {
    /// Bind address for the binary's fallback bind.
    pub bind_address: IpAddr,
    /// Public base URL without a trailing slash (`https://host[/prefix]`).
    pub public_url: Option<String>,
    /// Twilio auth token; `None` disables signature checks.
    pub auth_token: Option<String>,
    /// Greeting text.
    pub greeting_text: String,
    /// Call records directory.
    pub data_dir: PathBuf,
    /// How the signature was chosen.
    pub signature_mode: SignatureMode,
    /// The value sent as `X-App-Signature`.
    pub app_signature: String,
    /// TTS engine choice.
    pub tts: TtsChoice,
    /// STT engine choice.
    pub stt: SttChoice,
    /// Transcriptions running at once.
    pub stt_concurrency: usize,
    /// Longest speech engine run before it is killed.
    pub engine_timeout: Duration,
    /// WebSocket ping period.
    pub ping_interval: Duration,
    /// Unanswered-ping limit.
    pub pong_timeout: Duration,
    /// Longest wait for `start` on a new WebSocket.
    pub start_timeout: Duration,
    /// Grace for open calls on shutdown.
    pub shutdown_grace: Duration,
    /// Longest wait for a request head on an HTTP connection.
    pub header_timeout: Duration,
    /// Max inbound WebSocket message size.
    pub max_message_bytes: usize,
    /// Calls served at once.
    pub max_calls: usize,
    /// Outbound pacing lead.
    pub pacing_lead: Duration,
    /// See [`FileConfig::mark_timeout_ms`].
    pub mark_timeout: Duration,
    /// Energy VAD knobs.
    pub vad: VadConfig,
    /// `SCHED_FIFO` priority of the runtime and pacer threads (0: normal).
    pub realtime_priority: u8,
}

/// A configuration that cannot be used, with enough location to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is invalid or has an unknown key or a wrong type.
    #[error("{path}:{line}:{column}: key `{key}`: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// Dotted key at fault (best effort).
        key: String,
        /// The parser's message.
        message: String,
    },
    /// Parsed, but a value is not acceptable.
    #[error("{path}: key `{key}`: {message}")]
    Invalid {
        /// The file (or `<defaults>`).
        path: PathBuf,
        /// The key.
        key: &'static str,
        /// Why.
        message: String,
    },
    /// `env` signature mode without `BATON_SIGNATURE`, or our own
    /// executable could not be hashed.
    #[error("signature: {0}")]
    Signature(String),
}

impl Config {
    /// Loads the file (or defaults when `path` is `None`), applies the
    /// environment values and resolves the signature.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, line, column and key at fault.
    pub fn load(path: Option<&Path>, env: &EnvOverrides) -> Result<Self, ConfigError> {
        let (file, origin, base_dir) = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Io {
                    path: p.to_path_buf(),
                    source,
                })?;
                let dir = p
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| PathBuf::from("."));
                (parse_file(&text, p)?, p.to_path_buf(), dir)
            }
            None => (
                FileConfig::default(),
                PathBuf::from("<defaults>"),
                PathBuf::from("."),
            ),
        };
        Self::from_file(file, &origin, &base_dir, env)
    }

    /// Validates a parsed file; see [`Config::load`].
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] or [`ConfigError::Signature`].
    pub fn from_file(
        file: FileConfig,
        origin: &Path,
        base_dir: &Path,
        env: &EnvOverrides,
    ) -> Result<Self, ConfigError> {
        let invalid = |key: &'static str, message: String| ConfigError::Invalid {
            path: origin.to_path_buf(),
            key,
            message,
        };
        let bind_address: IpAddr = file
            .bind_address
            .parse()
            .map_err(|e| invalid("bind_address", format!("{e}")))?;
        let public_url = match file.public_url.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(u) => {
                let ok = (u.starts_with("https://") || u.starts_with("http://"))
                    && !u.contains('?')
                    && u.split_once("://")
                        .is_some_and(|(_, rest)| !rest.is_empty());
                if !ok {
                    return Err(invalid(
                        "public_url",
                        format!("{u:?} is not an http(s) base URL without a query"),
                    ));
                }
                Some(u.trim_end_matches('/').to_string())
            }
        };
        // An empty TWILIO_AUTH_TOKEN (`Environment=TWILIO_AUTH_TOKEN=`) is
        // unset, not a way to turn off the file's token.
        let auth_token = env
            .twilio_auth_token
            .clone()
            .filter(|t| !t.is_empty())
            .or(file.auth_token)
            .filter(|t| !t.is_empty());
        if file.ping_interval_ms == 0 {
            return Err(invalid("ping_interval_ms", "must be > 0".into()));
        }
        if file.header_timeout_ms == 0 {
            return Err(invalid("header_timeout_ms", "must be > 0".into()));
        }
        if file.engine_timeout_ms == 0 {
            return Err(invalid("engine_timeout_ms", "must be > 0".into()));
        }
        if file.start_timeout_ms == 0 {
            return Err(invalid("start_timeout_ms", "must be > 0".into()));
        }
        if file.pong_timeout_ms <= file.ping_interval_ms {
            return Err(invalid(
                "pong_timeout_ms",
                "must be longer than ping_interval_ms".into(),
            ));
        }
        if file.pacing_lead_ms < 20 {
            return Err(invalid(
                "pacing_lead_ms",
                "must be at least 20 (one frame of audio)".into(),
            ));
        }
        if file.mark_timeout_ms == 0 {
            return Err(invalid("mark_timeout_ms", "must be > 0".into()));
        }
        if file.max_message_bytes < 1024 {
            return Err(invalid("max_message_bytes", "must be >= 1024".into()));
        }
        if file.max_calls == 0 || file.max_calls > 1_000_000 {
            return Err(invalid(
                "max_calls",
                "must be > 0 and at most 1000000".into(),
            ));
        }
        if file.realtime_priority > crate::sched::MAX_PRIORITY {
            return Err(invalid(
                "realtime_priority",
                "must be between 0 (normal scheduling) and 99".into(),
            ));
        }
        if file.vad.end_silence_ms == 0 || file.vad.max_utterance_ms == 0 {
            return Err(invalid("vad", "durations must be > 0".into()));
        }
        let data_dir = {
            let d = PathBuf::from(&file.data_dir);
            if d.is_absolute() { d } else { base_dir.join(d) }
        };
        let app_signature = match file.signature_mode {
            SignatureMode::Artifact => self_digest()
                .map_err(|e| ConfigError::Signature(format!("hashing own executable: {e}")))?,
            SignatureMode::Env => env
                .baton_signature
                .clone()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| {
                    ConfigError::Signature(
                        "signature_mode = \"env\" but BATON_SIGNATURE is not set".into(),
                    )
                })?,
        };
        Ok(Self {
            bind_address,
            public_url,
            auth_token,
            greeting_text: file.greeting_text,
            data_dir,
            signature_mode: file.signature_mode,
            app_signature,
            tts: file.tts,
            stt: file.stt,
            stt_concurrency: file.stt_concurrency,
            engine_timeout: Duration::from_millis(file.engine_timeout_ms),
            ping_interval: Duration::from_millis(file.ping_interval_ms),
            pong_timeout: Duration::from_millis(file.pong_timeout_ms),
            start_timeout: Duration::from_millis(file.start_timeout_ms),
            shutdown_grace: Duration::from_millis(file.shutdown_grace_ms),
            header_timeout: Duration::from_millis(file.header_timeout_ms),
            max_message_bytes: file.max_message_bytes,
            max_calls: file.max_calls,
            pacing_lead: Duration::from_millis(file.pacing_lead_ms),
            mark_timeout: Duration::from_millis(file.mark_timeout_ms),
            vad: file.vad,
            realtime_priority: file.realtime_priority,
        })
    }
}

/// SHA-256 (lowercase hex) of the running executable, the `artifact`
/// signature.
///
/// # Errors
/// I/O errors locating or reading the executable.
pub fn self_digest() -> std::io::Result<String> {
    let path = std::env::current_exe().or_else(|_| std::fs::read_link("/proc/self/exe"))?;
    // /proc/self/exe keeps working even if the file was replaced on disk.
    let f = std::fs::File::open("/proc/self/exe").or_else(|_| std::fs::File::open(&path))?;
    crate::digest::sha256_reader(f)
}

/// Parses the TOML text, turning errors into file:line:column + key.
///
/// # Errors
/// [`ConfigError::Parse`].
pub fn parse_file(text: &str, path: &Path) -> Result<FileConfig, ConfigError> {
    toml::from_str::<FileConfig>(text).map_err(|e| {
        let offset = e.span().map(|s| s.start).unwrap_or(0).min(text.len());
        let (line, column) = crate::config::line_col(text, offset);
        ConfigError::Parse {
            path: path.to_path_buf(),
            line,
            column,
            key: crate::config::key_at(text, offset).unwrap_or_default(),
            message: e.message().trim().to_string(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_err(text: &str) -> ConfigError {
        match parse_file(text, Path::new("w.toml")) {
            Err(e) => e,
            Ok(c) => panic!("parsed: {c:?}"),
        }
    }

    #[test]
    fn unknown_key_names_file_line_column_and_key() {
        let e = parse_err("greeting_text = \"hi\"\n\nping_intervall_ms = 5\n");
        let msg = e.to_string();
        assert!(
            msg.starts_with("w.toml:3:1: key `ping_intervall_ms`"),
            "{msg}"
        );
    }

    #[test]
    fn wrong_type_in_table_names_dotted_key() {
        let e = parse_err("[vad]\nthreshold = \"loud\"\n");
        match e {
            ConfigError::Parse {
                line, column, key, ..
            } => {
                assert_eq!((line, column), (2, 13));
                assert_eq!(key, "vad.threshold");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_key_is_named_however_the_file_spells_its_tables() {
        let key = |text: &str| match parse_err(text) {
            ConfigError::Parse {
                line, column, key, ..
            } => (line, column, key),
            other => panic!("{other:?}"),
        };
        // An unknown table after a known one is itself the key.
        assert_eq!(
            key("[vad]\nthreshold = 500\n\n[vadd]\nx = 1\n"),
            (4, 2, "vadd".to_string())
        );
        // A wrong type inside an inline table, and under a dotted key.
        assert_eq!(
            key("vad = { threshold = \"x\" }\n"),
            (1, 21, "vad.threshold".to_string())
        );
        assert_eq!(
            key("greeting_text = \"hi\"\nvad.start_ms = \"soon\"\n"),
            (2, 16, "vad.start_ms".to_string())
        );
    }

    #[test]
    fn defaults_parse_and_validate() {
        let file = parse_file("", Path::new("w.toml")).expect("empty file");
        let env = EnvOverrides {
            twilio_auth_token: Some("tok".into()),
            baton_signature: Some("ignored".into()),
        };
        let cfg =
            Config::from_file(file, Path::new("w.toml"), Path::new("/x"), &env).expect("valid");
        assert_eq!(cfg.auth_token.as_deref(), Some("tok"));
        assert_eq!(cfg.data_dir, PathBuf::from("/x/data"));
        // Artifact mode ignores BATON_SIGNATURE.
        assert_ne!(cfg.app_signature, "ignored");
        assert_eq!(cfg.app_signature.len(), 64);
    }

    #[test]
    fn env_mode_uses_baton_signature() {
        let file = parse_file("signature_mode = \"env\"", Path::new("w.toml")).expect("parse");
        let env = EnvOverrides {
            twilio_auth_token: None,
            baton_signature: Some("abc".into()),
        };
        let cfg =
            Config::from_file(file.clone(), Path::new("w"), Path::new("."), &env).expect("valid");
        assert_eq!(cfg.app_signature, "abc");
        assert!(
            Config::from_file(
                file,
                Path::new("w"),
                Path::new("."),
                &EnvOverrides::default()
            )
            .is_err()
        );
    }

    #[test]
    fn an_empty_auth_token_in_the_environment_keeps_the_files() {
        let file = parse_file("auth_token = \"12345\"", Path::new("w.toml")).expect("parse");
        let token = |env: Option<&str>| {
            let env = EnvOverrides {
                twilio_auth_token: env.map(str::to_string),
                baton_signature: None,
            };
            Config::from_file(file.clone(), Path::new("w"), Path::new("."), &env)
                .expect("valid")
                .auth_token
        };
        assert_eq!(token(None).as_deref(), Some("12345"));
        assert_eq!(token(Some("")).as_deref(), Some("12345"));
        assert_eq!(token(Some("other")).as_deref(), Some("other"));
    }

    #[test]
    fn bad_public_url_is_refused() {
        let file = parse_file("public_url = \"ftp://x\"", Path::new("w.toml")).expect("parse");
        let e = Config::from_file(
            file,
            Path::new("w"),
            Path::new("."),
            &EnvOverrides::default(),
        );
        assert!(matches!(
            e,
            Err(ConfigError::Invalid {
                key: "public_url",
                ..
            })
        ));
    }
}
