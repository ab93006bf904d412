//! Demo parts of the local pipeline, also used by the tests:
//! - [`upstream`]: an echo server standing in for the user's services;
//! - [`traffic`]: a traffic generator that plays several consumers, bad keys and bursts,
//!   and tallies what the client saw;
//! - [`webhook`]: receives the demo's SLO alert notifications.

pub mod traffic;
pub mod upstream;
pub mod webhook;
