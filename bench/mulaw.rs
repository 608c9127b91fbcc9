//! mu-law codec throughput: `baton::twilio::mulaw::{encode_into, decode_into}`
//! over a 1 MiB buffer, repeated for about a second each. Prints one JSON
//! line: mu-law bytes per second for encode, decode, and the round trip
//! (encode then decode of the same bytes). Run by `bench/run`; by hand:
//! `cargo bench --bench mulaw`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use baton::twilio::mulaw::{decode_into, encode_into};

const SAMPLES: usize = 1 << 20;
const BUDGET: Duration = Duration::from_millis(1000);

/// Runs `f` (which processes `SAMPLES` mu-law bytes) until `BUDGET` is spent;
/// returns bytes per second of the best of ten slices.
fn rate(mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f(); // warm up
    }
    let mut best = f64::MAX;
    let start = Instant::now();
    let mut slices = 0;
    while slices < 10 || (start.elapsed() < BUDGET && slices < 10_000) {
        let t = Instant::now();
        for _ in 0..4 {
            f();
        }
        best = best.min(t.elapsed().as_secs_f64() / 4.0);
        slices += 1;
    }
    SAMPLES as f64 / best
}

fn main() {
    // A deterministic, speech-like-range signal (LCG noise plus a ramp), so
    // every segment of the table is hit.
    let mut x: u32 = 0x1234_5678;
    let pcm: Vec<i16> = (0..SAMPLES)
        .map(|i| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            ((x >> 16) as i16) / 2 + (i % 2048) as i16
        })
        .collect();
    let mut codes: Vec<u8> = Vec::with_capacity(SAMPLES);
    let mut back: Vec<i16> = Vec::with_capacity(SAMPLES);
    encode_into(&pcm, &mut codes);

    let encode = rate(|| {
        codes.clear();
        encode_into(black_box(&pcm), &mut codes);
        black_box(&codes);
    });
    let decode = rate(|| {
        back.clear();
        decode_into(black_box(&codes), &mut back);
        black_box(&back);
    });
    let round_trip = rate(|| {
        codes.clear();
        encode_into(black_box(&pcm), &mut codes);
        back.clear();
        decode_into(black_box(&codes), &mut back);
        black_box(&back);
    });
    // Sanity: the round trip keeps the signal close (mu-law error bound).
    let worst = pcm
        .iter()
        .zip(&back)
        .map(|(a, b)| (i32::from(*a) - i32::from(*b)).abs())
        .max()
        .unwrap_or(0);
    assert!(worst <= 1100, "round trip error {worst}");
    println!(
        "{{\"encode_bps\":{encode:.0},\"decode_bps\":{decode:.0},\"roundtrip_bps\":{round_trip:.0},\"samples\":{SAMPLES}}}"
    );
}
