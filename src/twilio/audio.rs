//! 8 kHz mono framing, resampling and WAV helpers.
//!
//! Twilio plays and sends 8 kHz mono mu-law; we move it in 20 ms frames of
//! 160 bytes. Everything that enters the system at another rate (a WAV file,
//! espeak-ng's 22 kHz output) goes through [`resample_linear`] once, at load
//! time, never per frame.

use std::io::{Read, Seek, Write};

use super::mulaw;

/// Twilio's sample rate.
pub const SAMPLE_RATE_HZ: u32 = 8000;
/// Frame length in milliseconds.
pub const FRAME_MS: u64 = 20;
/// Bytes (= samples) in one 20 ms mu-law frame.
pub const FRAME_BYTES: usize = 160;

/// Errors reading or writing audio files.
#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    /// The WAV container could not be read or written.
    #[error("wav: {0}")]
    Wav(#[from] hound::Error),
    /// The file has no audio in it.
    #[error("wav file has no samples")]
    Empty,
}

/// Linear-interpolation resampler; good enough for telephone-band audio
/// and cheap, which matters more here than filter quality.
pub fn resample_linear(input: &[i16], from_hz: u32, to_hz: u32) -> Vec<i16> {
    if from_hz == to_hz || input.is_empty() || from_hz == 0 || to_hz == 0 {
        return input.to_vec();
    }
    let out_len = (input.len() as u64 * u64::from(to_hz) / u64::from(from_hz)) as usize;
    let step = f64::from(from_hz) / f64::from(to_hz);
    let last = input.len() - 1;
    (0..out_len)
        .map(|i| {
            let pos = i as f64 * step;
            let idx = pos as usize;
            if idx >= last {
                return input[last];
            }
            let frac = pos - idx as f64;
            let a = f64::from(input[idx]);
            let b = f64::from(input[idx + 1]);
            (a + (b - a) * frac).round() as i16
        })
        .collect()
}

/// Reads any PCM/float WAV, mixes to mono and resamples to 8 kHz.
///
/// # Errors
/// [`AudioError`] when the file is not a readable WAV or holds no samples.
pub fn read_wav_8k_mono<R: Read>(reader: R) -> Result<Vec<i16>, AudioError> {
    let mut wav = hound::WavReader::new(reader)?;
    let spec = wav.spec();
    let channels = usize::from(spec.channels.max(1));
    let interleaved: Vec<i16> = match spec.sample_format {
        hound::SampleFormat::Int => {
            let shift = i32::from(spec.bits_per_sample) - 16;
            wav.samples::<i32>()
                .map(|s| {
                    s.map(|v| {
                        if shift >= 0 {
                            (v >> shift) as i16
                        } else {
                            (v << -shift) as i16
                        }
                    })
                })
                .collect::<Result<_, _>>()?
        }
        hound::SampleFormat::Float => wav
            .samples::<f32>()
            .map(|s| s.map(|v| (v.clamp(-1.0, 1.0) * 32767.0) as i16))
            .collect::<Result<_, _>>()?,
    };
    if interleaved.is_empty() {
        return Err(AudioError::Empty);
    }
    let mono: Vec<i16> = interleaved
        .chunks(channels)
        .map(|c| (c.iter().map(|&s| i32::from(s)).sum::<i32>() / c.len() as i32) as i16)
        .collect();
    Ok(resample_linear(&mono, spec.sample_rate, SAMPLE_RATE_HZ))
}

/// Writes 8 kHz mono 16-bit PCM as a WAV file.
///
/// # Errors
/// [`AudioError::Wav`] on I/O failure.
pub fn write_wav_8k_mono<W: Write + Seek>(writer: W, pcm: &[i16]) -> Result<(), AudioError> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: SAMPLE_RATE_HZ,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::new(writer, spec)?;
    for &s in pcm {
        w.write_sample(s)?;
    }
    w.finalize()?;
    Ok(())
}

/// Encodes 8 kHz PCM to mu-law frames of exactly [`FRAME_BYTES`], padding
/// the last one with mu-law silence.
pub fn to_mulaw_frames(pcm: &[i16]) -> Vec<[u8; FRAME_BYTES]> {
    pcm.chunks(FRAME_BYTES)
        .map(|chunk| {
            let mut frame = [mulaw::SILENCE; FRAME_BYTES];
            for (dst, &s) in frame.iter_mut().zip(chunk) {
                *dst = mulaw::encode(s);
            }
            frame
        })
        .collect()
}

/// Mean absolute amplitude of a block, the energy measure both the VAD and
/// callsim's utterance detector use.
pub fn mean_abs(pcm: &[i16]) -> u32 {
    if pcm.is_empty() {
        return 0;
    }
    (pcm.iter()
        .map(|&s| u64::from(s.unsigned_abs()))
        .sum::<u64>()
        / pcm.len() as u64) as u32
}

/// A sine tone, for the fallback greeting and for tests.
pub fn tone(freq_hz: f64, ms: u64, amplitude: i16) -> Vec<i16> {
    let n = (u64::from(SAMPLE_RATE_HZ) * ms / 1000) as usize;
    (0..n)
        .map(|i| {
            let t = i as f64 / f64::from(SAMPLE_RATE_HZ);
            (f64::from(amplitude) * (2.0 * std::f64::consts::PI * freq_hz * t).sin()) as i16
        })
        .collect()
}

/// True when a payload starts like a RIFF/WAV header: the mistake that makes
/// Twilio play noise (error 31924).
pub fn looks_like_file_header(payload: &[u8]) -> bool {
    payload.starts_with(b"RIFF") || payload.starts_with(b"RIFX") || payload.starts_with(b"RF64")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resample_halves_and_doubles_length() {
        let x: Vec<i16> = (0..1600).map(|i| i as i16).collect();
        assert_eq!(resample_linear(&x, 16000, 8000).len(), 800);
        assert_eq!(resample_linear(&x, 8000, 16000).len(), 3200);
        assert_eq!(resample_linear(&x, 8000, 8000), x);
    }

    #[test]
    fn frames_are_160_bytes_and_padded_with_silence() {
        let frames = to_mulaw_frames(&tone(440.0, 30, 8000));
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[1][100], mulaw::SILENCE);
        assert_ne!(frames[0], [mulaw::SILENCE; FRAME_BYTES]);
    }

    #[test]
    fn wav_round_trip_through_44k_stereo() {
        let mut buf = std::io::Cursor::new(Vec::new());
        let spec = hound::WavSpec {
            channels: 2,
            sample_rate: 44100,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        {
            let mut w = hound::WavWriter::new(&mut buf, spec).expect("writer");
            for i in 0..44100 {
                let s = ((i % 100) * 100) as i16;
                w.write_sample(s).expect("sample");
                w.write_sample(s).expect("sample");
            }
            w.finalize().expect("finalize");
        }
        buf.set_position(0);
        let pcm = read_wav_8k_mono(buf).expect("read");
        assert_eq!(pcm.len(), 8000);
    }

    #[test]
    fn riff_is_detected() {
        assert!(looks_like_file_header(b"RIFF\x24\x00\x00\x00WAVE"));
        assert!(!looks_like_file_header(&[0xFF; 160]));
    }
}
