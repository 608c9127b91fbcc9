//! Baton: a systemd-style supervisor that rebuilds a worker when its source
//! changes and cuts traffic over only to a worker that proves it is the new
//! build, plus the Twilio Media Streams worker it supervises.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![warn(missing_docs, clippy::unwrap_used)]
