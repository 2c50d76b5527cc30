//! Conversions between the agent API's wire messages and the domain types. Every value coming
//! off the wire is validated here, once, for both ends of the socket.

use crate::filter::FileFilter;
use crate::layout::Layout;
use crate::repo::{InvalidInput, ModelRef, RepoId, RepoKind, Revision};
use modelcache_proto::agent_v1 as pb;

/// Converts the wire model reference, validating every field.
pub fn model_from_proto(m: Option<pb::ModelRef>) -> Result<(ModelRef, FileFilter), InvalidInput> {
    let m = m.ok_or(InvalidInput {
        what: "field",
        value: "model".into(),
        reason: "is required",
    })?;
    let kind = match pb::RepoKind::try_from(m.kind) {
        Ok(pb::RepoKind::Dataset) => RepoKind::Dataset,
        _ => RepoKind::Model,
    };
    let revision = if m.revision.is_empty() {
        Revision::main()
    } else {
        Revision::parse(&m.revision)?
    };
    let filter = FileFilter::new(&m.include, &m.exclude)?;
    let model = ModelRef {
        kind,
        repo: RepoId::parse(&m.repo)?,
        revision,
    };
    Ok((model, filter))
}

/// The wire form of a model reference and file filter.
pub fn model_to_proto(m: &ModelRef, filter: &FileFilter) -> pb::ModelRef {
    pb::ModelRef {
        kind: kind_to_proto(m.kind) as i32,
        repo: m.repo.to_string(),
        revision: m.revision.to_string(),
        include: filter.include().to_vec(),
        exclude: filter.exclude().to_vec(),
    }
}

/// The wire form of a repo kind.
pub fn kind_to_proto(k: RepoKind) -> pb::RepoKind {
    match k {
        RepoKind::Model => pb::RepoKind::Model,
        RepoKind::Dataset => pb::RepoKind::Dataset,
    }
}

/// The wire form of a layout.
pub fn layout_to_proto(l: Layout) -> pb::Layout {
    match l {
        Layout::Snapshot => pb::Layout::Snapshot,
        Layout::HfCache => pb::Layout::HfCache,
    }
}

/// The layout a wire value names; an unknown value is refused.
pub fn layout_from_proto(v: i32) -> Result<Layout, InvalidInput> {
    match pb::Layout::try_from(v) {
        Ok(pb::Layout::HfCache) => Ok(Layout::HfCache),
        Ok(pb::Layout::Snapshot) => Ok(Layout::Snapshot),
        Err(_) => Err(InvalidInput {
            what: "layout",
            value: v.to_string(),
            reason: "is not one this agent knows (snapshot, hf-cache)",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_refs_are_validated_and_round_trip() {
        let m = |repo: &str, rev: &str| {
            model_from_proto(Some(pb::ModelRef {
                kind: pb::RepoKind::Dataset as i32,
                repo: repo.into(),
                revision: rev.into(),
                ..Default::default()
            }))
        };
        let (ok, all) = m("o/r", "").unwrap();
        assert_eq!((ok.kind, ok.revision.as_str()), (RepoKind::Dataset, "main"));
        assert!(all.is_all());
        assert!(m("o/../r", "main").is_err());
        assert!(m("o/r", "../x").is_err());
        let missing = model_from_proto(None).unwrap_err();
        assert_eq!(missing.to_string(), "field \"model\" is required");
        let filter = FileFilter::from_lists("*.json", "tok*").unwrap();
        let back = model_from_proto(Some(model_to_proto(&ok, &filter))).unwrap();
        assert_eq!(back, (ok, filter));
        let mut bad = model_to_proto(&back.0, &back.1);
        bad.include = vec!["[x".into()];
        assert!(model_from_proto(Some(bad)).is_err());
    }

    #[test]
    fn layouts_round_trip_and_unknown_is_refused() {
        for l in [Layout::Snapshot, Layout::HfCache] {
            assert_eq!(layout_from_proto(layout_to_proto(l) as i32).unwrap(), l);
        }
        assert!(layout_from_proto(7).is_err());
    }
}
