//! Demo parts of the local pipeline, also used by the tests:
//! - [`upstream`]: an echo server standing in for the user's services;
//! - [`traffic`]: a traffic generator that plays several consumers, bad keys and bursts,
//!   and tallies what the client saw.

pub mod traffic;
pub mod upstream;
