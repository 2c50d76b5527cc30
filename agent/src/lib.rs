//! The modelcache node agent: fills a per-node, content-deduplicated model store from a
//! Hugging Face–compatible hub, verifying every byte, and serves the agent API the CSI node
//! plugin calls to ensure and pin models.
//!
//! Modules, one concern each: [`repo`] (validated names), [`hash`] (the Hub's content hashes),
//! [`hub`] (protocol client and test/air-gap server), [`store`] (blobs, snapshots, pins),
//! [`fetch`] (hub → store), [`api`] (the gRPC service), and the runtime pieces shared with the
//! CSI plugin: [`transport`], [`shutdown`], [`telemetry`].

pub mod access;
pub mod admin;
pub mod api;
pub mod cli;
pub mod cluster;
pub mod events;
pub mod evict;
pub mod fetch;
pub mod filter;
pub mod hash;
pub mod hub;
pub mod labels;
pub mod metrics;
pub mod mounts;
pub mod prewarm;
pub mod progress;
pub mod repo;
pub mod shared_cache;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod transport;
