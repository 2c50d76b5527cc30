//! Which volume uses which snapshot, kept in `pins.json` so that a restart of the agent forgets
//! no pin. Written atomically after every change.

use super::{Result, write_atomic};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// One volume's pin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinRecord {
    /// `model` or `dataset`.
    pub kind: String,
    /// `org/name`.
    pub repo: String,
    /// The pinned commit.
    pub commit: String,
    /// Where the volume is mounted.
    pub target_path: String,
    /// `namespace/name` of the pod the volume belongs to, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The snapshot's filter key, when it holds only some files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
}

impl PinRecord {
    /// True when this pin holds the given snapshot.
    pub fn holds(&self, snap: &super::Snapshot) -> bool {
        self.kind == snap.kind.singular()
            && self.repo == snap.repo.as_str()
            && self.commit == snap.commit
            && self.filter == snap.filter
    }
}

/// All pins, by volume id.
#[derive(Debug)]
pub struct Pins {
    path: PathBuf,
    by_volume: BTreeMap<String, PinRecord>,
}

impl Pins {
    /// Loads `pins.json` from the store root; a missing file is no pins. A corrupt file is an
    /// error: dropping pins silently could let a mounted model be evicted.
    pub fn load(store_root: &std::path::Path) -> std::io::Result<Self> {
        let path = store_root.join("pins.json");
        let by_volume = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::other(format!(
                    "{} is corrupt ({e}); move it aside and restart the agent to rebuild pins from the mount table",
                    path.display()
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e),
        };
        Ok(Pins { path, by_volume })
    }

    /// Pins a snapshot for a volume (replacing the volume's previous pin).
    pub fn pin(&mut self, volume_id: &str, record: PinRecord) -> Result<()> {
        if self.by_volume.get(volume_id) == Some(&record) {
            return Ok(());
        }
        self.by_volume.insert(volume_id.to_owned(), record);
        self.save()
    }

    /// Removes a volume's pin; true if there was one.
    pub fn unpin(&mut self, volume_id: &str) -> Result<bool> {
        if self.by_volume.remove(volume_id).is_none() {
            return Ok(false);
        }
        self.save()?;
        Ok(true)
    }

    /// Volume ids pinning a snapshot.
    pub fn volumes_of(&self, snap: &super::Snapshot) -> Vec<String> {
        self.by_volume
            .iter()
            .filter(|(_, r)| r.holds(snap))
            .map(|(v, _)| v.clone())
            .collect()
    }

    /// A volume's pin.
    pub fn get(&self, volume_id: &str) -> Option<&PinRecord> {
        self.by_volume.get(volume_id)
    }

    fn save(&self) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(&self.by_volume).expect("pins serialize");
        write_atomic(&self.path, &bytes)
    }
}
