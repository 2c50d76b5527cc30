//! The modelcache CSI node plugin. Kubelet calls it to publish a volume; it asks the node agent
//! for the model's snapshot and bind-mounts it read-only at the pod's target path.
//!
//! Modules: [`identity`] and [`node`] (the CSI services), [`attributes`] (volume attributes),
//! [`agent`] (the agent behind a trait), [`mounter`] (the syscall boundary), [`limiter`] (one
//! operation per volume), [`error`] (the one error → gRPC status map).

pub mod agent;
pub mod attributes;
pub mod error;
pub mod identity;
pub mod limiter;
pub mod mounter;
pub mod node;
