//! Baton: a systemd-style supervisor that rebuilds a worker when its source
//! changes and cuts traffic over only to a worker that proves it is the new
//! build, plus the Twilio Media Streams worker it supervises.
//!
//! # Layout
//!
//! | module | role |
//! | --- | --- |
//! | [`config`] | the daemon's TOML config, parsed in two stages, errors with file:line:column |
//! | [`endpoint`] | where a worker listens: a loopback port or a Unix socket, bound by `batond` and handed over; Unix socket paths of any length |
//! | [`digest`] | SHA-256 of files: the build signature |
//! | [`daemon`] | `batond`'s top level: proxy + supervisor + control socket + signals |
//! | [`supervisor`] | the actor that owns generations and moves traffic |
//! | [`worker_proc`] | build, snapshot, start, prove and monitor one worker |
//! | [`process`] | process groups, parent-death signal, the exec shim, stop |
//! | [`probe`] | `/healthz` probes and the signature verdict |
//! | [`pool`] | keep-alive HTTP/1.1 connections to one worker, driven by the task using them; request bodies that survive a refused connect |
//! | [`h1`] | the lean HTTP/1.1 client for bodiless requests to a worker: the head written and the answer parsed in place |
//! | [`router`] | the atomically swapped upstream and its traffic counters |
//! | [`proxy`] | the public HTTP/WebSocket reverse proxy |
//! | [`unixconn`] | a Unix stream socket watched for reading only, and for room only while a write waits (both ends of a worker connection) |
//! | [`tunnel`] | upgraded connections copied both ways with no buffer per connection |
//! | [`headers`] | hop-by-hop and forwarding headers (RFC 9110) |
//! | [`logging`] | stderr logging through a writer thread: a stalled log reader never stalls traffic |
//! | [`watch`] | `notify` watches with ignore globs |
//! | [`events`] | the event bus behind the log and `/v1/events` |
//! | [`control`] | the control socket API, server and client |
//! | [`runtime`] | the main event loop and the front threads, each with its own, that serve client connections |
//! | [`sched`] | real-time scheduling (`SCHED_FIFO`, reset on fork) for the threads that move frames; front threads kept to CPUs of their own |
//! | [`systemd`] | `sd_notify` and socket activation |
//! | [`twilio`] | Media Streams messages, `X-Twilio-Signature`, G.711 mu-law and 8 kHz framing (shared by the worker and callsim) |
//! | [`worker`] | the `media-worker` server (webhooks, Media Streams, pipeline) |
//! | [`callsim`] | the Twilio-side call simulator behind `callsim` |
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![warn(missing_docs, clippy::unwrap_used)]

pub mod callsim;
pub mod config;
pub mod control;
pub mod daemon;
pub mod digest;
pub mod endpoint;
pub mod events;
pub mod h1;
pub mod headers;
pub mod logging;
pub mod pool;
pub mod probe;
pub mod process;
pub mod proxy;
pub mod router;
pub mod runtime;
pub mod sched;
pub mod supervisor;
pub mod systemd;
pub mod tunnel;
pub mod twilio;
pub mod unixconn;
pub mod watch;
pub mod worker;
pub mod worker_proc;
