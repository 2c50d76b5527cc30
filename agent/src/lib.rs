//! The modelcache node agent: fills a per-node, content-deduplicated model store from a
//! Hugging Face–compatible hub, verifying every byte, and serves the agent API the CSI node
//! plugin calls to ensure and pin models.
//!
//! Modules, one concern each: [`store`] (blobs, snapshots, pins), [`fetch`] (hub → store),
//! [`node`] (the core every front end uses), [`grpc`] (the agent API over it). The names a volume uses and the process plumbing shared with the
//! CSI plugin live in `modelcache-core`; the hub client (and the test hub) in `modelcache-hub`.

pub mod admin;
pub mod caches;
pub mod cli;
pub mod cluster;
pub mod events;
pub mod evict;
pub mod fetch;
pub mod grpc;
pub mod labels;
pub mod metrics;
pub mod mounts;
pub mod node;
pub mod peers;
pub mod prewarm;
pub mod progress;
pub mod shared_cache;
pub mod store;
