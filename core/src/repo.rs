//! What a volume names: a repository on a hub, a revision of it, and the paths of its files.
//! Everything here is validated on construction, so the rest of the agent never sees a repo id,
//! revision or file path that could escape the store or confuse a URL.

use std::fmt;
use std::path::{Path, PathBuf};

/// A value from a volume, a hub or a command line that modelcache refuses, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?} {reason}")]
pub struct InvalidInput {
    /// What the value is ("repo id", "revision", "file path").
    pub what: &'static str,
    /// The value, as given.
    pub value: String,
    /// Why it is refused, phrased to tell the user what to write instead.
    pub reason: &'static str,
}

fn invalid(what: &'static str, value: &str, reason: &'static str) -> InvalidInput {
    InvalidInput {
        what,
        value: clip_to(value, 300),
        reason,
    }
}

/// `value`'s first `max` characters, with `…` when there were more: for echoing what a user
/// (or an attacker) wrote into a message.
pub fn clip_to(value: &str, max: usize) -> String {
    match value.char_indices().nth(max) {
        Some((end, _)) => format!("{}…", &value[..end]),
        None => value.to_owned(),
    }
}

/// The longest message a gRPC status carries: past it, a client's header limit (8 KiB in many)
/// would turn the answer into a transport error.
pub const MAX_MESSAGE: usize = 1024;

/// `text`, cut to [`MAX_MESSAGE`] bytes on a character boundary, saying how much was cut. For
/// every message and echoed value that reaches gRPC.
pub fn clip(text: &str) -> String {
    if text.len() <= MAX_MESSAGE {
        return text.to_owned();
    }
    let mut end = MAX_MESSAGE;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes more)", &text[..end], text.len() - end)
}

/// Whether a repository holds a model or a dataset; the hub's URLs differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RepoKind {
    /// A model repository (`/api/models/…`, `/{repo}/resolve/…`).
    Model,
    /// A dataset repository (`/api/datasets/…`, `/datasets/{repo}/resolve/…`).
    Dataset,
}

impl RepoKind {
    /// The plural used in `/api/{plural}/…` and in the hub server's root directory.
    pub fn plural(self) -> &'static str {
        match self {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
        }
    }

    /// The prefix of `resolve` URLs: empty for models, `datasets/` for datasets.
    pub fn url_prefix(self) -> &'static str {
        match self {
            RepoKind::Model => "",
            RepoKind::Dataset => "datasets/",
        }
    }

    /// The singular: `model` or `dataset`.
    pub fn singular(self) -> &'static str {
        match self {
            RepoKind::Model => "model",
            RepoKind::Dataset => "dataset",
        }
    }
}

/// The folder huggingface_hub keeps a repo in inside an `HF_HUB_CACHE`: `models--org--name`,
/// `datasets--org--name`. The store uses the same names for its own areas.
pub fn cache_folder(kind: RepoKind, repo: &RepoId) -> String {
    format!("{}--{}", kind.plural(), repo.flat())
}

/// A repository id `org/name`, validated as huggingface_hub's `validate_repo_id` does.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoId(String);

impl RepoId {
    /// Parses `org/name`. Both parts are required, made of letters, digits, `-`, `_` and `.`,
    /// without `--` or `..`, not starting or ending with `-` or `.`, 96 characters at most.
    pub fn parse(s: &str) -> Result<Self, InvalidInput> {
        const WHAT: &str = "repo id";
        if s.is_empty() {
            return Err(invalid(WHAT, s, "is empty: write it as org/name"));
        }
        if s.len() > 96 {
            return Err(invalid(WHAT, s, "is longer than 96 characters"));
        }
        let Some((org, name)) = s.split_once('/') else {
            return Err(invalid(WHAT, s, "must be org/name, e.g. Qwen/Qwen3-0.6B"));
        };
        for part in [org, name] {
            if part.is_empty() || part.contains('/') {
                return Err(invalid(WHAT, s, "must be org/name, e.g. Qwen/Qwen3-0.6B"));
            }
            if !part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            {
                return Err(invalid(
                    WHAT,
                    s,
                    "may hold only letters, digits, '-', '_' and '.'",
                ));
            }
            if part.starts_with(['-', '.']) || part.ends_with(['-', '.']) {
                return Err(invalid(
                    WHAT,
                    s,
                    "may not start or end a part with '-' or '.'",
                ));
            }
        }
        if s.contains("--") || s.contains("..") {
            return Err(invalid(WHAT, s, "may not contain '--' or '..'"));
        }
        Ok(RepoId(s.to_owned()))
    }

    /// The id as written, `org/name`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id as one path segment, `org--name`, unique because ids never hold `--`.
    pub fn flat(&self) -> String {
        self.0.replace('/', "--")
    }
}

impl fmt::Display for RepoId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A branch, tag or commit, validated with git's ref-name rules.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Revision(String);

/// The revision a volume gets when it names none.
pub const DEFAULT_REVISION: &str = "main";

impl Revision {
    /// Parses a branch, a tag (`v1.0`, `refs/pr/3`) or a 40-hex commit.
    pub fn parse(s: &str) -> Result<Self, InvalidInput> {
        const WHAT: &str = "revision";
        const REASON: &str = "is not a branch, tag or 40-hex commit";
        if s.is_empty() || s.len() > 255 {
            return Err(invalid(WHAT, s, REASON));
        }
        let bad_char = s
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || "~^:?*[\\".contains(c));
        if bad_char
            || s.contains("..")
            || s.contains("//")
            || s.contains("@{")
            || s.starts_with(['/', '.', '-'])
            || s.ends_with(['/', '.'])
            || s.ends_with(".lock")
            || s.split('/').any(|c| c.starts_with('.'))
        {
            return Err(invalid(WHAT, s, REASON));
        }
        Ok(Revision(s.to_owned()))
    }

    /// `main`.
    pub fn main() -> Self {
        Revision(DEFAULT_REVISION.to_owned())
    }

    /// The revision as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when the revision is a full commit id, which needs no lookup.
    pub fn is_commit(&self) -> bool {
        is_commit_id(&self.0)
    }
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// True for a 40-character lowercase hex commit id.
pub fn is_commit_id(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A commit id: 40 lowercase hex digits, checked on construction, so it is safe as a directory
/// name and in a URL.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Commit(String);

impl Commit {
    /// Parses a 40-hex commit id.
    pub fn parse(s: &str) -> Result<Self, InvalidInput> {
        if is_commit_id(s) {
            Ok(Commit(s.to_owned()))
        } else {
            Err(invalid("commit", s, "is not a 40-hex commit"))
        }
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Its first 12 digits, as people write a commit.
    pub fn short(&self) -> &str {
        &self.0[..12]
    }
}

impl fmt::Display for Commit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::ops::Deref for Commit {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for Commit {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for Commit {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl PartialEq<String> for Commit {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

impl PartialEq<Commit> for str {
    fn eq(&self, other: &Commit) -> bool {
        self == other.0
    }
}

impl PartialEq<Commit> for String {
    fn eq(&self, other: &Commit) -> bool {
        *self == other.0
    }
}

impl From<Commit> for String {
    fn from(c: Commit) -> String {
        c.0
    }
}

/// A repository at a revision: what a volume asks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModelRef {
    /// Model or dataset.
    pub kind: RepoKind,
    /// `org/name`.
    pub repo: RepoId,
    /// Branch, tag or commit.
    pub revision: Revision,
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.kind == RepoKind::Dataset {
            f.write_str("datasets/")?;
        }
        write!(f, "{}@{}", self.repo, self.revision)
    }
}

/// A file path inside a repository, as a hub's tree lists it, that is safe to join to a directory:
/// relative, `/`-separated, with no `.`, `..` or empty component, no NUL, backslash or control
/// character.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoPath(String);

impl RepoPath {
    /// Validates a path from a hub; anything that could escape the snapshot is refused.
    pub fn parse(s: &str) -> Result<Self, InvalidInput> {
        const WHAT: &str = "file path";
        if s.is_empty() || s.len() > 4096 {
            return Err(invalid(WHAT, s, "is empty or longer than 4096 bytes"));
        }
        if s.starts_with('/') {
            return Err(invalid(WHAT, s, "is absolute"));
        }
        if s.chars().any(|c| c == '\\' || c.is_control()) {
            return Err(invalid(
                WHAT,
                s,
                "holds a backslash, NUL or control character",
            ));
        }
        for part in s.split('/') {
            if part.is_empty() || part == "." || part == ".." {
                return Err(invalid(WHAT, s, "has an empty, '.' or '..' component"));
            }
            if part.len() > 255 {
                return Err(invalid(WHAT, s, "has a component longer than 255 bytes"));
            }
        }
        Ok(RepoPath(s.to_owned()))
    }

    /// The path as the hub wrote it.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `dir` joined with this path; stays below `dir` by construction.
    pub fn under(&self, dir: &Path) -> PathBuf {
        dir.join(&self.0)
    }
}

impl fmt::Display for RepoPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        for ok in [
            "Qwen/Qwen3-0.6B",
            "sentence-transformers/all-MiniLM-L6-v2",
            "a/b",
        ] {
            assert_eq!(RepoId::parse(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "", "gpt2", "a/b/c", "/a", "a/", "a/../b", "a/b--c", "a/.b", "a/b-", "a/b c", "a/b\0",
            "a\\b/c",
        ] {
            assert!(RepoId::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(RepoId::parse(&format!("a/{}", "x".repeat(95))).is_err());
        assert_eq!(RepoId::parse("org/name").unwrap().flat(), "org--name");
    }

    #[test]
    fn revisions() {
        for ok in ["main", "v1.0", "refs/pr/3", "feature/x-y", &"a".repeat(40)] {
            Revision::parse(ok).unwrap();
        }
        for bad in [
            "",
            "ma in",
            "../x",
            "a..b",
            "a//b",
            "/main",
            "main/",
            "x.lock",
            "a~1",
            "a^",
            "a:b",
            "a\nb",
            "-x",
            "refs/.hidden",
        ] {
            assert!(Revision::parse(bad).is_err(), "{bad:?} accepted");
        }
        let e = Revision::parse("ma in").unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"revision "ma in" is not a branch, tag or 40-hex commit"#
        );
        assert!(
            Revision::parse(&"0123456789abcdef".repeat(3)[..40])
                .unwrap()
                .is_commit()
        );
        assert!(!Revision::parse(&"A".repeat(40)).unwrap().is_commit());
    }

    #[test]
    fn repo_paths() {
        for ok in [
            "config.json",
            "1_Pooling/config.json",
            "a/b/c.safetensors",
            "..x",
            "x..",
        ] {
            RepoPath::parse(ok).unwrap();
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "./a",
            "a/.",
            "a\\b",
            "a\0b",
            "a\nb",
            "a/",
        ] {
            assert!(RepoPath::parse(bad).is_err(), "{bad:?} accepted");
        }
        let dir = Path::new("/store/snap");
        assert_eq!(
            RepoPath::parse("a/b").unwrap().under(dir),
            PathBuf::from("/store/snap/a/b")
        );
    }

    #[test]
    fn commits_are_40_lowercase_hex() {
        let c = Commit::parse(&"a1".repeat(20)).unwrap();
        assert_eq!((c.short(), c.as_str().len()), ("a1a1a1a1a1a1", 40));
        for bad in [
            "",
            "main",
            &"A".repeat(40),
            &"a".repeat(39),
            &"a".repeat(41),
            "../x",
        ] {
            assert!(Commit::parse(bad).is_err(), "{bad:?}");
        }
    }
}
