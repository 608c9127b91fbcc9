//! The control plane: HTTP over a Unix socket, with its types defined once
//! in [`api`] and used by both [`server`] (in `batond`) and [`client`] (in
//! `batonctl`).

pub mod api;
pub mod client;
pub mod server;
