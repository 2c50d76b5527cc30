//! Wire contracts of modelcache, generated from `proto/` at build time.
//!
//! - [`csi::v1`]: the Container Storage Interface v1 services kubelet and the CSI sidecars call
//!   (package `csi.v1`, the spec's field numbers).
//! - [`modelcache::v1`]: the node agent's API, which the CSI node plugin calls.

#![allow(missing_docs)] // generated code

/// Container Storage Interface.
pub mod csi {
    /// CSI spec v1.
    pub mod v1 {
        tonic::include_proto!("csi.v1");
    }
}

/// modelcache's own APIs.
pub mod modelcache {
    /// Version 1 of the node agent API.
    pub mod v1 {
        tonic::include_proto!("modelcache.v1");
    }
}

pub use csi::v1 as csi_v1;
pub use modelcache::v1 as agent_v1;
