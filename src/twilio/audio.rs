//! 8 kHz mono framing, resampling and WAV helpers.
//!
//! Twilio plays and sends 8 kHz mono mu-law; we move it in 20 ms frames of
//! 160 bytes. Everything that enters the system at another rate (a WAV file,
//! espeak-ng's 22 kHz output) goes through [`resample`] once, at load
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

/// Zero crossings of the resampling filter's sinc on each side: its
/// length, and so how steep its cut is.
const SINC_ZEROS: f64 = 16.0;
/// Where the filter cuts, as a fraction of the lower Nyquist rate: the
/// rest is its transition band, above which it stops (with the Blackman
/// window, about 74 dB down).
const PASSBAND: f64 = 0.92;
/// Points per input sample at which the filter is tabulated.
const TABLE_STEPS: f64 = 128.0;

/// Band-limited resampling: a windowed-sinc filter (Blackman window)
/// below the lower of the two Nyquist rates, evaluated at each output
/// sample's position. Going down (espeak-ng's 22 kHz speech to the phone's
/// 8 kHz) what lies above the new Nyquist rate is filtered out, where
/// interpolating between neighbours would fold it back into the band as
/// hiss (a 6 kHz fricative into 2 kHz); going up it interpolates without
/// images. Run once per clip or utterance, never per frame.
pub fn resample(input: &[i16], from_hz: u32, to_hz: u32) -> Vec<i16> {
    if from_hz == to_hz || input.is_empty() || from_hz == 0 || to_hz == 0 {
        return input.to_vec();
    }
    let out_len = (input.len() as u64 * u64::from(to_hz) / u64::from(from_hz)) as usize;
    let step = f64::from(from_hz) / f64::from(to_hz);
    // The cut-off in cycles per input sample (0.5 is the input's Nyquist
    // rate), and the filter's half-width in input samples.
    let cutoff = 0.5 * PASSBAND * (1.0 / step).min(1.0);
    let half = SINC_ZEROS / (2.0 * cutoff);
    // The filter, tabulated once at TABLE_STEPS points per input sample
    // (from 0 to `half`; it is even) and read with linear interpolation:
    // three transcendental functions per tap would cost more than the rest
    // of the work together.
    let points = (half * TABLE_STEPS).ceil() as usize + 2;
    let table: Vec<f64> = (0..points)
        .map(|j| sinc_tap(j as f64 / TABLE_STEPS, cutoff, half))
        .collect();
    let tap = |t: f64| {
        let x = t.abs() * TABLE_STEPS;
        let j = x as usize;
        if j + 1 >= points {
            return 0.0;
        }
        let frac = x - j as f64;
        table[j] + (table[j + 1] - table[j]) * frac
    };
    let last = input.len() as isize - 1;
    (0..out_len)
        .map(|i| {
            let pos = i as f64 * step;
            let first = ((pos - half).ceil() as isize).max(0);
            let end = ((pos + half).floor() as isize).min(last);
            let mut acc = 0.0;
            for k in first..=end {
                acc += f64::from(input[k as usize]) * tap(pos - k as f64);
            }
            acc.round().clamp(f64::from(i16::MIN), f64::from(i16::MAX)) as i16
        })
        .collect()
}

/// The filter's weight for a sample `t` input samples away: a low-pass
/// sinc at `cutoff`, under a Blackman window `half` samples wide (zero
/// beyond it).
fn sinc_tap(t: f64, cutoff: f64, half: f64) -> f64 {
    use std::f64::consts::PI;
    if t.abs() >= half {
        return 0.0;
    }
    let x = 2.0 * cutoff * t;
    let sinc = if x.abs() < 1e-9 {
        1.0
    } else {
        (PI * x).sin() / (PI * x)
    };
    let u = t / half;
    let window = 0.42 + 0.5 * (PI * u).cos() + 0.08 * (2.0 * PI * u).cos();
    2.0 * cutoff * sinc * window
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
    Ok(resample(&mono, spec.sample_rate, SAMPLE_RATE_HZ))
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
        assert_eq!(resample(&x, 16000, 8000).len(), 800);
        assert_eq!(resample(&x, 8000, 16000).len(), 3200);
        assert_eq!(resample(&x, 8000, 8000), x);
    }

    /// A tone of `freq` Hz at `rate`, one second, amplitude 8000.
    fn sine(freq: f64, rate: u32) -> Vec<i16> {
        (0..rate)
            .map(|i| {
                let t = f64::from(i) / f64::from(rate);
                (8000.0 * (2.0 * std::f64::consts::PI * freq * t).sin()) as i16
            })
            .collect()
    }

    /// Root mean square away from the edges (where the filter sees zeros).
    fn rms(x: &[i16]) -> f64 {
        let mid = &x[x.len() / 10..x.len() * 9 / 10];
        (mid.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / mid.len() as f64).sqrt()
    }

    #[test]
    fn resampling_down_filters_out_what_the_new_rate_cannot_hold() {
        // espeak-ng's rate to the phone's: 6 kHz is above 4 kHz and must
        // go, not come back as 2 kHz; speech frequencies pass.
        let high = sine(6000.0, 22050);
        let gone = resample(&high, 22050, 8000);
        assert!(
            rms(&gone) < rms(&high) * 0.01,
            "{} of {}",
            rms(&gone),
            rms(&high)
        );
        for f in [300.0, 1000.0, 3000.0] {
            let x = sine(f, 22050);
            let y = resample(&x, 22050, 8000);
            let ratio = rms(&y) / rms(&x);
            assert!((0.97..1.03).contains(&ratio), "{f} Hz: {ratio}");
        }
    }

    #[test]
    fn resampling_up_keeps_the_tone_and_adds_no_image() {
        // 8 kHz to 16 kHz (for the recogniser): a 1 kHz tone stays one,
        // with no 7 kHz image beside it.
        let x = sine(1000.0, 8000);
        let y = resample(&x, 8000, 16000);
        let ratio = rms(&y) / rms(&x);
        assert!((0.97..1.03).contains(&ratio), "{ratio}");
        let expected: Vec<i16> = sine(1000.0, 16000);
        let err: Vec<i16> = y.iter().zip(&expected).map(|(a, b)| a - b).collect();
        assert!(rms(&err) < rms(&x) * 0.01, "{}", rms(&err));
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
