//! G.711 mu-law codec, bit-exact with the ITU-T G.191 reference
//! (`ulaw_compress` / `ulaw_expand`).
//!
//! Twilio carries audio as 8 kHz mono mu-law. Encoding uses a 16 KiB table
//! indexed by the 14-bit linear value (the reference drops the two low bits
//! first, so the table is exact), decoding a 256-entry table; both are built
//! at compile time so the hot path is one load per sample.

/// The mu-law code for digital silence (linear 0), used to pad frames.
pub const SILENCE: u8 = 0xFF;

/// One mu-law sample to linear 16-bit PCM, as `ulaw_expand` does.
const fn expand(code: u8) -> i16 {
    let negative = code < 0x80;
    let inverted = !code;
    let exponent = ((inverted >> 4) & 0x07) as i32;
    let mantissa = (inverted & 0x0F) as i32;
    let step = 4 << (exponent + 1);
    let magnitude = (0x80 << exponent) + step * mantissa + step / 2 - 4 * 33;
    if negative {
        -magnitude as i16
    } else {
        magnitude as i16
    }
}

/// One 14-bit linear sample (the 16-bit sample shifted right by two) to
/// mu-law, as `ulaw_compress` does.
const fn compress14(x14: i32) -> u8 {
    // The reference takes the one's complement of negative values.
    let mut absno = if x14 < 0 { !x14 + 33 } else { x14 + 33 };
    if absno > 0x1FFF {
        absno = 0x1FFF;
    }
    let mut i = absno >> 6;
    let mut segno = 1;
    while i != 0 {
        segno += 1;
        i >>= 1;
    }
    let high = 0x0008 - segno;
    let low = 0x000F - ((absno >> segno) & 0x000F);
    let code = ((high << 4) | low) as u8;
    if x14 >= 0 { code | 0x80 } else { code }
}

const DECODE_TABLE: [i16; 256] = {
    let mut t = [0i16; 256];
    let mut c = 0;
    while c < 256 {
        t[c] = expand(c as u8);
        c += 1;
    }
    t
};

const ENCODE_TABLE: [u8; 16384] = {
    let mut t = [0u8; 16384];
    let mut i = 0;
    while i < 16384 {
        // Index = 14-bit value reinterpreted as unsigned (two's complement).
        let x14 = if i >= 8192 {
            i as i32 - 16384
        } else {
            i as i32
        };
        t[i] = compress14(x14);
        i += 1;
    }
    t
};

/// Decodes one mu-law code to linear 16-bit PCM.
#[inline]
pub fn decode(code: u8) -> i16 {
    DECODE_TABLE[code as usize]
}

/// Encodes one linear 16-bit PCM sample to mu-law.
#[inline]
pub fn encode(sample: i16) -> u8 {
    ENCODE_TABLE[((sample >> 2) as u16 & 0x3FFF) as usize]
}

/// Decodes a buffer of mu-law codes, appending PCM to `out` (no
/// reallocation when `out` already has capacity: the hot path per frame).
pub fn decode_into(codes: &[u8], out: &mut Vec<i16>) {
    out.extend(codes.iter().map(|&c| decode(c)));
}

/// Encodes a buffer of PCM samples, appending mu-law codes to `out`.
pub fn encode_into(pcm: &[i16], out: &mut Vec<u8>) {
    out.extend(pcm.iter().map(|&s| encode(s)));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ITU-T G.711 Table 2a (mu-law): for each segment, the decoder output
    /// of the first step and the step size, in the 14-bit domain of the
    /// standard. Independent of the formulas above on purpose.
    const ITU_SEGMENTS: [(i32, i32); 8] = [
        (0, 2),
        (33, 4),
        (99, 8),
        (231, 16),
        (495, 32),
        (1023, 64),
        (2079, 128),
        (4191, 256),
    ];

    fn itu_decode(code: u8) -> i16 {
        // Codes are transmitted inverted; bit 7 set = positive.
        let positive = code & 0x80 != 0;
        let segment = ((!code >> 4) & 0x07) as usize;
        let step_index = (!code & 0x0F) as i32;
        let (first, step) = ITU_SEGMENTS[segment];
        let value14 = first + step * step_index;
        // 14-bit to 16-bit: times four.
        let value = (value14 * 4) as i16;
        if positive { value } else { -value }
    }

    #[test]
    fn all_256_codes_decode_to_the_itu_values() {
        for c in 0..=255u8 {
            assert_eq!(decode(c), itu_decode(c), "code {c:#04x}");
        }
    }

    #[test]
    fn known_decode_values() {
        assert_eq!(decode(0x00), -32124);
        assert_eq!(decode(0x80), 32124);
        assert_eq!(decode(0xFF), 0);
        assert_eq!(decode(0x7F), 0);
        assert_eq!(decode(0xFE), 8);
        assert_eq!(decode(0x7E), -8);
        assert_eq!(decode(0xEF), 132);
    }

    #[test]
    fn known_encode_values() {
        assert_eq!(encode(0), 0xFF);
        assert_eq!(encode(-1), 0x7F);
        assert_eq!(encode(i16::MAX), 0x80);
        assert_eq!(encode(i16::MIN), 0x00);
        assert_eq!(encode(8), 0xFE);
        assert_eq!(encode(-8), 0x7E);
        assert_eq!(encode(1000), 0xCE);
    }

    #[test]
    fn encode_decode_round_trips_every_code() {
        for c in 0..=255u8 {
            let expected = if c == 0x7F { 0xFF } else { c };
            assert_eq!(encode(decode(c)), expected, "code {c:#04x}");
        }
    }

    #[test]
    fn encode_is_monotonic_and_error_is_bounded() {
        let mut prev = decode(encode(i16::MIN));
        for s in (i16::MIN..=i16::MAX).step_by(7) {
            let back = decode(encode(s));
            assert!(back >= prev, "not monotonic at {s}");
            prev = back;
            let err = (i32::from(back) - i32::from(s)).abs();
            // Largest quantisation step is 1024 (256 in 14-bit), plus clipping.
            assert!(
                err <= 1024 || s.unsigned_abs() > 32124,
                "error {err} at {s}"
            );
        }
    }

    #[test]
    fn buffer_helpers_match_scalar() {
        let pcm: Vec<i16> = (0..320).map(|i| (i * 97 - 15000) as i16).collect();
        let mut codes = Vec::new();
        encode_into(&pcm, &mut codes);
        let mut back = Vec::new();
        decode_into(&codes, &mut back);
        for (i, s) in pcm.iter().enumerate() {
            assert_eq!(codes[i], encode(*s));
            assert_eq!(back[i], decode(codes[i]));
        }
    }
}
