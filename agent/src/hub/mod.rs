//! The Hugging Face Hub protocol, both sides of it.
//!
//! - [`client`]: what the agent downloads with (revision → commit, tree listing, `resolve`).
//! - [`server`]: `modelcache-agent serve-hub`, a read-only HF-compatible hub serving repos from a
//!   directory: the test double of every whole-system test, and a hub for air-gapped clusters.
//! - [`wire`]: the JSON and header shapes both sides agree on.

pub mod catalog;
pub mod client;
pub mod error;
pub mod server;
pub mod wire;

pub use client::HubClient;
pub use error::HubError;
