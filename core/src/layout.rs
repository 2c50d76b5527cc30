//! How a volume shows a snapshot's files.

/// How a volume shows its files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Layout {
    /// The repo's files at the mount's root (for `vllm serve /models/x`).
    #[default]
    Snapshot,
    /// An `HF_HUB_CACHE` holding the repo at its commit.
    HfCache,
}

impl Layout {
    /// Parses the volume attribute value.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "snapshot" => Some(Layout::Snapshot),
            "hf-cache" => Some(Layout::HfCache),
            _ => None,
        }
    }
}
