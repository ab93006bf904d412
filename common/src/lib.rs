//! Plumbing shared by tollgate's binaries (not a contract crate: contracts live in
//! `tollgate-schemas`):
//!
//! - [`cli`]: exit codes and the runtime of the binaries' `main`s;
//! - [`config`]: TOML files with environment overrides, errors that name the key;
//! - [`kafka`]: the consumer-group client of the pipeline stages;
//! - [`logging`]: `tracing` subscriber set-up;
//! - [`shutdown`]: SIGTERM/SIGINT as a future;
//! - [`backoff`]: capped exponential backoff for retries;
//! - [`time`]: UTC minutes, months and RFC 3339 timestamps on Unix seconds;
//! - [`tls`] (feature `tls`): the rustls client configuration of outgoing HTTPS;
//! - [`admin`] (feature `admin`): the `/healthz` and `/metrics` port of ingest and the aggregator.

#[cfg(feature = "admin")]
pub mod admin;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod kafka;
pub mod logging;
pub mod shutdown;
pub mod time;
#[cfg(feature = "tls")]
pub mod tls;
