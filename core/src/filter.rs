//! Which files of a repo a volume wants: huggingface_hub's `allow_patterns` / `ignore_patterns`
//! (fnmatch: `*` also matches `/`; a pattern ending in `/` means everything below it). A file is
//! taken when it matches an include pattern (or there are none) and no exclude pattern.
//!
//! A filter is part of a snapshot's identity: the same commit with another filter is another
//! snapshot (sharing blobs). [`FileFilter::key`] names it in the store.

use crate::repo::InvalidInput;
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use sha2::{Digest, Sha256};

/// Include and exclude patterns, compiled.
#[derive(Debug, Clone, Default)]
pub struct FileFilter {
    include: Vec<String>,
    exclude: Vec<String>,
    include_set: Option<GlobSet>,
    exclude_set: Option<GlobSet>,
}

impl PartialEq for FileFilter {
    fn eq(&self, other: &Self) -> bool {
        (&self.include, &self.exclude) == (&other.include, &other.exclude)
    }
}

impl Eq for FileFilter {}

impl std::hash::Hash for FileFilter {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (&self.include, &self.exclude).hash(state);
    }
}

/// The most patterns a filter holds, include and exclude together. huggingface_hub users write
/// a handful; the bound keeps compiling and matching cheap whatever a pod spec says.
pub const MAX_PATTERNS: usize = 64;

/// The longest pattern, in bytes.
pub const MAX_PATTERN_BYTES: usize = 256;

fn compile(
    what: &'static str,
    patterns: &[String],
) -> Result<(Vec<String>, Option<GlobSet>), InvalidInput> {
    if let Some(long) = patterns.iter().find(|p| p.len() > MAX_PATTERN_BYTES) {
        return Err(InvalidInput {
            what,
            value: crate::repo::clip_to(long, 64),
            reason: "is longer than 256 bytes (MAX_PATTERN_BYTES), the longest pattern a volume may set",
        });
    }
    let mut normalized: Vec<String> = patterns
        .iter()
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
        .map(|p| {
            if p.ends_with('/') {
                format!("{p}*")
            } else {
                p.to_owned()
            }
        })
        .collect();
    normalized.sort();
    normalized.dedup();
    if normalized.is_empty() {
        return Ok((normalized, None));
    }
    let mut set = GlobSetBuilder::new();
    for p in &normalized {
        let glob = GlobBuilder::new(p)
            .literal_separator(false)
            .backslash_escape(true)
            .build()
            .map_err(|_| InvalidInput {
                what,
                value: crate::repo::clip_to(p, 64),
                reason: "is not a valid glob pattern (fnmatch syntax: *, ?, [abc])",
            })?;
        set.add(glob);
    }
    let set = set.build().map_err(|_| InvalidInput {
        what,
        value: crate::repo::clip_to(&normalized.join(","), 64),
        reason: "cannot be compiled",
    })?;
    Ok((normalized, Some(set)))
}

impl FileFilter {
    /// Compiles include and exclude patterns; empty lists mean "everything" and "nothing".
    pub fn new(include: &[String], exclude: &[String]) -> Result<Self, InvalidInput> {
        let count = include.len() + exclude.len();
        if count > MAX_PATTERNS {
            return Err(InvalidInput {
                what: "include/exclude",
                value: format!("{count} patterns"),
                reason: "are more than 64 (MAX_PATTERNS), the most a volume may set",
            });
        }
        let (include, include_set) = compile("include pattern", include)?;
        let (exclude, exclude_set) = compile("exclude pattern", exclude)?;
        Ok(FileFilter {
            include,
            exclude,
            include_set,
            exclude_set,
        })
    }

    /// Splits comma-separated pattern lists, as volume attributes write them.
    pub fn from_lists(include: &str, exclude: &str) -> Result<Self, InvalidInput> {
        let split = |s: &str| s.split(',').map(str::to_owned).collect::<Vec<_>>();
        FileFilter::new(&split(include), &split(exclude))
    }

    /// True when the filter takes every file.
    pub fn is_all(&self) -> bool {
        self.include.is_empty() && self.exclude.is_empty()
    }

    /// True when the repo path is taken.
    pub fn admits(&self, path: &str) -> bool {
        let included = self.include_set.as_ref().is_none_or(|s| s.is_match(path));
        let excluded = self.exclude_set.as_ref().is_some_and(|s| s.is_match(path));
        included && !excluded
    }

    /// The include patterns, normalized and sorted.
    pub fn include(&self) -> &[String] {
        &self.include
    }

    /// The exclude patterns, normalized and sorted.
    pub fn exclude(&self) -> &[String] {
        &self.exclude
    }

    /// A short name for the filter, for snapshot directories; None for "every file".
    pub fn key(&self) -> Option<String> {
        if self.is_all() {
            return None;
        }
        let mut h = Sha256::new();
        for p in &self.include {
            h.update(b"+");
            h.update(p.as_bytes());
            h.update(b"\0");
        }
        for p in &self.exclude {
            h.update(b"-");
            h.update(p.as_bytes());
            h.update(b"\0");
        }
        Some(hex::encode(&h.finalize()[..8]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(include: &str, exclude: &str) -> FileFilter {
        FileFilter::from_lists(include, exclude).unwrap()
    }

    #[test]
    fn pattern_count_and_length_are_bounded_and_errors_stay_short() {
        let many: Vec<String> = (0..=MAX_PATTERNS).map(|i| format!("f{i}.json")).collect();
        let err = FileFilter::new(&many, &[]).unwrap_err();
        assert!(err.to_string().contains(&MAX_PATTERNS.to_string()), "{err}");
        let (half, rest) = many.split_at(MAX_PATTERNS / 2 + 1);
        assert!(
            FileFilter::new(half, rest).is_err(),
            "include and exclude count together"
        );
        FileFilter::new(&many[..MAX_PATTERNS], &[]).unwrap();
        let long = "a".repeat(MAX_PATTERN_BYTES + 1);
        let err = FileFilter::new(&[], &[long]).unwrap_err();
        assert!(
            err.to_string().contains(&MAX_PATTERN_BYTES.to_string()),
            "{err}"
        );
        assert!(err.to_string().len() < 300, "{}", err.to_string().len());
        FileFilter::new(&["a".repeat(MAX_PATTERN_BYTES)], &[]).unwrap();
        let bad = format!("[{}", "x".repeat(200));
        assert!(FileFilter::new(&[bad], &[]).unwrap_err().to_string().len() < 300);
    }

    #[test]
    fn huggingface_hub_semantics() {
        let all = f("", "");
        assert!(all.is_all() && all.admits("anything/at/all") && all.key().is_none());
        let st = f("*.safetensors, *.json", "");
        assert!(st.admits("model.safetensors"));
        assert!(
            st.admits("sub/dir/model-00001.safetensors"),
            "fnmatch * crosses /"
        );
        assert!(st.admits("config.json"));
        assert!(!st.admits("pytorch_model.bin"));
        let no_onnx = f("", "onnx/,*.bin");
        assert!(
            !no_onnx.admits("onnx/model.onnx"),
            "a trailing / means everything below"
        );
        assert!(!no_onnx.admits("pytorch_model.bin"));
        assert!(no_onnx.admits("model.safetensors"));
        let both = f("*.json", "tokenizer*");
        assert!(both.admits("config.json") && !both.admits("tokenizer.json"));
        assert!(f("model-0000?.safetensors", "").admits("model-00001.safetensors"));
    }

    #[test]
    fn keys_ignore_order_spacing_and_duplicates() {
        assert_eq!(
            f("*.json,*.txt", "").key(),
            f(" *.txt , *.json,*.json", "").key()
        );
        assert_ne!(f("*.json", "").key(), f("", "*.json").key());
        assert_eq!(f("*.json", ""), f("*.json,", ""));
        assert_eq!(f("a", "").key().unwrap().len(), 16);
    }

    #[test]
    fn bad_patterns_are_refused() {
        let err = FileFilter::from_lists("[unclosed", "").unwrap_err();
        assert_eq!(err.what, "include pattern");
        assert!(FileFilter::from_lists("", "a{b").is_err());
    }
}
