//! Baton: a systemd-style supervisor that rebuilds a worker when its source
//! changes and cuts traffic over only to a worker that proves it is the new
//! build, plus the Twilio Media Streams worker it supervises.
//!
//! # Layout
//! - [`twilio`]: Media Streams messages, `X-Twilio-Signature`, G.711 mu-law
//!   and 8 kHz framing (pure code shared by the worker and callsim).
//! - [`worker`]: the `media-worker` server (webhooks, Media Streams, pipeline).
//! - [`callsim`]: the Twilio-side call simulator library behind `callsim`.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![warn(missing_docs, clippy::unwrap_used)]

pub mod callsim;
pub mod twilio;
pub mod worker;
