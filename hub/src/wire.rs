//! The Hub's JSON documents and headers, as huggingface_hub reads them.

use serde::{Deserialize, Serialize};

/// Header carrying the commit a `resolve` request was answered from.
pub const X_REPO_COMMIT: &str = "x-repo-commit";
/// Header carrying the LFS/Xet file's sha256 when `ETag` names a redirect target.
pub const X_LINKED_ETAG: &str = "x-linked-etag";
/// Header carrying the LFS/Xet file's size.
pub const X_LINKED_SIZE: &str = "x-linked-size";
/// Header naming the kind of a hub error (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`,
/// `GatedRepo`).
pub const X_ERROR_CODE: &str = "x-error-code";
/// Header with a human-readable error message.
pub const X_ERROR_MESSAGE: &str = "x-error-message";

/// `GET /api/{models|datasets}/{repo}/revision/{rev}`: the fields modelcache reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RepoInfo {
    /// `org/name`.
    pub id: String,
    /// The commit the revision resolves to.
    pub sha: String,
    /// The files at that commit.
    #[serde(default)]
    pub siblings: Vec<Sibling>,
    /// Whether the repo is private.
    #[serde(default)]
    pub private: bool,
    /// `false`, or how access is granted (`"auto"`, `"manual"`) for a gated repo.
    #[serde(default)]
    pub gated: serde_json::Value,
}

impl RepoInfo {
    /// True when not everyone may read the repo: private or gated.
    pub fn restricted(&self) -> bool {
        self.private
            || !matches!(
                self.gated,
                serde_json::Value::Bool(false) | serde_json::Value::Null
            )
    }
}

/// A file in [`RepoInfo::siblings`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sibling {
    /// Path within the repo.
    pub rfilename: String,
}

/// One entry of `GET /api/…/tree/{rev}?recursive=true`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeEntry {
    /// `file` or `directory`.
    #[serde(rename = "type")]
    pub kind: String,
    /// git object id (blob sha1 for files).
    pub oid: String,
    /// Size in bytes (0 for directories).
    #[serde(default)]
    pub size: u64,
    /// Path within the repo.
    pub path: String,
    /// Present for files stored with LFS (or Xet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lfs: Option<LfsInfo>,
}

impl TreeEntry {
    /// True for files; directories are implied by file paths.
    pub fn is_file(&self) -> bool {
        self.kind == "file"
    }
}

/// The `lfs` object of a tree entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LfsInfo {
    /// sha256 of the file's bytes.
    pub oid: String,
    /// Size of the file's bytes.
    pub size: u64,
    /// Size of the git pointer file.
    #[serde(rename = "pointerSize", default)]
    pub pointer_size: u64,
}
