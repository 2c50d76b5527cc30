//! The Hugging Face Hub protocol, both sides of it.
//!
//! - [`client`]: what the agent downloads with (revision → commit, tree listing, `resolve`). All
//!   HTTP stays inside it.
//! - [`wire`]: the JSON and header shapes both sides agree on; [`error`]: what a hub answered,
//!   classified.
//! - [`server`] and [`served`] (feature `server`): the `modelcache-hub` binary, a read-only
//!   HF-compatible hub serving repos from a directory: the test double of every whole-system
//!   test, and a hub for air-gapped clusters.
//! - [`faults`] (feature `faults`, which tests enable): deliberate misbehaviour of that server.

pub mod client;
pub mod error;
pub mod wire;

#[cfg(feature = "faults")]
pub mod faults;
#[cfg(feature = "server")]
pub mod served;
#[cfg(feature = "server")]
pub mod server;

pub use client::HubClient;
pub use error::HubError;
