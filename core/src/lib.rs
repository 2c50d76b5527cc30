//! What the node agent and the CSI plugin share, and nothing else: the names a volume uses
//! ([`repo`], [`filter`], [`layout`]), the Hub's content hashes ([`hash`]), the wire conversions
//! of those names ([`wire`]), the classes of failure ([`error`]), and the process plumbing both daemons run on ([`transport`],
//! [`shutdown`], [`telemetry`], [`process`]).
//!
//! No Kubernetes client, HTTP client or hub server lives here: the plugin links this crate and
//! `modelcache-proto` only.

pub mod cache;
pub mod error;
pub mod filter;
pub mod hash;
pub mod layout;
pub mod process;
pub mod repo;
pub mod shutdown;
pub mod size;
pub mod telemetry;
pub mod transport;
pub mod wire;

pub use layout::Layout;
