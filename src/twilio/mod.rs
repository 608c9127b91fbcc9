//! Twilio-side vocabulary shared by `media-worker` and `callsim`.
//!
//! Everything here is pure (no I/O, no clocks) so that both ends of a call
//! agree on the wire format and can be unit-tested against the published
//! facts in `TWILIO.md`:
//! - [`messages`]: typed Media Streams JSON messages in both directions;
//! - [`signature`]: the `X-Twilio-Signature` algorithm (HMAC-SHA1);
//! - [`mulaw`]: the G.711 mu-law codec, bit-exact with the ITU reference;
//! - [`audio`]: 8 kHz framing, resampling and WAV helpers.

pub mod audio;
pub mod messages;
pub mod mulaw;
pub mod signature;
