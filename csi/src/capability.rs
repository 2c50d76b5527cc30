//! Volume capabilities: what a CO may ask of a modelcache volume. Always a filesystem (mount)
//! volume; always read-only in fact, because the store is shared.

use crate::error::{Error, Result};
use csi::volume_capability::{AccessType, access_mode::Mode};
use modelcache_proto::csi_v1 as csi;

/// Access modes that only read: what StorageClass PVCs must ask for (ReadOnlyMany, or
/// ReadWriteOncePod-style single-node readers).
pub const READER_MODES: &[Mode] = &[Mode::SingleNodeReaderOnly, Mode::MultiNodeReaderOnly];

/// Checks one capability. `readers_only` refuses writer access modes (CreateVolume and
/// ValidateVolumeCapabilities); NodePublishVolume accepts them and mounts read-only anyway, since
/// an inline volume's access mode is chosen by kubelet, not the user.
pub fn check(field: &str, cap: Option<&csi::VolumeCapability>, readers_only: bool) -> Result<()> {
    let cap = cap.ok_or_else(|| Error::InvalidArgument(format!("{field} is required")))?;
    match &cap.access_type {
        Some(AccessType::Mount(_)) => {}
        Some(AccessType::Block(_)) => {
            return Err(Error::InvalidArgument(format!(
                "{field}: block volumes are not supported; use a filesystem volume"
            )));
        }
        None => {
            return Err(Error::InvalidArgument(format!(
                "{field}.access_type is required (mount)"
            )));
        }
    }
    let mode = cap
        .access_mode
        .as_ref()
        .and_then(|m| Mode::try_from(m.mode).ok())
        .unwrap_or(Mode::Unknown);
    if mode == Mode::Unknown {
        return Err(Error::InvalidArgument(format!(
            "{field}.access_mode is required"
        )));
    }
    if readers_only && !READER_MODES.contains(&mode) {
        return Err(Error::InvalidArgument(format!(
            "{field}.access_mode {}: modelcache volumes are read-only; use accessModes: [ReadOnlyMany]",
            mode.as_str_name()
        )));
    }
    Ok(())
}

/// Checks a list of capabilities, which must not be empty.
pub fn check_all(field: &str, caps: &[csi::VolumeCapability], readers_only: bool) -> Result<()> {
    if caps.is_empty() {
        return Err(Error::InvalidArgument(format!("{field} is required")));
    }
    for (i, cap) in caps.iter().enumerate() {
        check(&format!("{field}[{i}]"), Some(cap), readers_only)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use csi::volume_capability::{AccessMode, BlockVolume, MountVolume};

    fn cap(access: Option<AccessType>, mode: Mode) -> csi::VolumeCapability {
        csi::VolumeCapability {
            access_type: access,
            access_mode: Some(AccessMode { mode: mode as i32 }),
        }
    }

    #[test]
    fn capabilities() {
        let mount = || Some(AccessType::Mount(MountVolume::default()));
        check("c", Some(&cap(mount(), Mode::MultiNodeReaderOnly)), true).unwrap();
        check("c", Some(&cap(mount(), Mode::SingleNodeWriter)), false).unwrap();
        let err = check("c", Some(&cap(mount(), Mode::SingleNodeWriter)), true).unwrap_err();
        assert!(err.to_string().contains("SINGLE_NODE_WRITER"), "{err}");
        let block = Some(AccessType::Block(BlockVolume {}));
        assert!(check("c", Some(&cap(block, Mode::MultiNodeReaderOnly)), false).is_err());
        assert!(check("c", Some(&cap(None, Mode::MultiNodeReaderOnly)), false).is_err());
        assert!(check("c", Some(&cap(mount(), Mode::Unknown)), false).is_err());
        assert!(check("c", None, false).is_err());
        assert!(
            check_all("caps", &[], true)
                .unwrap_err()
                .to_string()
                .contains("caps is required")
        );
        let err = check_all(
            "caps",
            &[
                cap(mount(), Mode::MultiNodeReaderOnly),
                cap(mount(), Mode::MultiNodeMultiWriter),
            ],
            true,
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("caps[1].access_mode"), "{err}");
    }
}
