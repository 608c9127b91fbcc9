//! End-to-end tests: one test binary that spawns the real `batond`,
//! `batonctl`, `media-worker` and `callsim` binaries on loopback.

mod cutover;
mod daemon;
mod support;
mod system;
mod worker;
