//! The modelcache CSI plugin. In node mode kubelet calls it to publish a volume; it asks the node
//! agent for the model's snapshot and bind-mounts it read-only at the pod's target path. In
//! controller mode external-provisioner calls it to create StorageClass-backed volumes.
//!
//! Modules: [`identity`], [`node`] and [`controller`] (the CSI services), [`attributes`] (volume
//! attributes), [`capability`] (volume capabilities),
//! [`agent`] (the agent behind a trait), [`mounter`] (the syscall boundary), [`limiter`] (one
//! operation per volume), [`error`] (the one error → gRPC status map).

pub mod agent;
pub mod attributes;
pub mod capability;
pub mod cli;
pub mod controller;
pub mod error;
pub mod identity;
pub mod limiter;
pub mod mounter;
pub mod node;
pub mod routes;
