//! Volume capabilities: what a CO may ask of a modelcache volume. Always a filesystem (mount)
//! volume, in any access mode; always mounted read-only, because the store is shared. Writer
//! modes are accepted because kubelet picks an inline volume's mode, and many PVC templates say
//! `ReadWriteOnce` out of habit: the volume context says `csi.modelcache.dev/mount: read-only`.

use crate::error::{Error, Result};
use csi::volume_capability::{AccessType, access_mode::Mode};
use modelcache_proto::csi_v1 as csi;

/// Checks one capability: a mount volume with an access mode.
pub fn check(field: &str, cap: Option<&csi::VolumeCapability>) -> Result<()> {
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
    Ok(())
}

/// Checks a list of capabilities, which must not be empty.
pub fn check_all(field: &str, caps: &[csi::VolumeCapability]) -> Result<()> {
    if caps.is_empty() {
        return Err(Error::InvalidArgument(format!("{field} is required")));
    }
    for (i, cap) in caps.iter().enumerate() {
        check(&format!("{field}[{i}]"), Some(cap))?;
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
        for mode in [
            Mode::MultiNodeReaderOnly,
            Mode::SingleNodeReaderOnly,
            Mode::SingleNodeWriter,
            Mode::MultiNodeMultiWriter,
        ] {
            check("c", Some(&cap(mount(), mode))).unwrap();
        }
        let block = Some(AccessType::Block(BlockVolume {}));
        assert!(check("c", Some(&cap(block, Mode::MultiNodeReaderOnly))).is_err());
        assert!(check("c", Some(&cap(None, Mode::MultiNodeReaderOnly))).is_err());
        assert!(check("c", Some(&cap(mount(), Mode::Unknown))).is_err());
        assert!(check("c", None).is_err());
        assert!(
            check_all("caps", &[])
                .unwrap_err()
                .to_string()
                .contains("caps is required")
        );
        let err = check_all(
            "caps",
            &[
                cap(mount(), Mode::MultiNodeReaderOnly),
                cap(
                    Some(AccessType::Block(BlockVolume {})),
                    Mode::MultiNodeReaderOnly,
                ),
            ],
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("caps[1]"), "{err}");
    }
}
