//! Which volume uses which snapshot at which target path, kept in `pins.json` so that a restart
//! of the agent forgets no pin. Written atomically after every change.
//!
//! A pin is keyed by volume id *and* target path: kubelet publishes one persistent volume at one
//! target per pod, so a ReadOnlyMany PVC used by two pods on a node has two pins, and the first
//! pod's unpublish leaves the second one's pin in place.

use super::{Result, Snapshot, Store, write_atomic};
use crate::mounts::MountedDir;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

/// How old a pin must be before a missing mount drops it: the CSI plugin pins, then mounts.
pub const PIN_SETTLE_SECONDS: u64 = 120;

/// What [`Pins::reconcile`] changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciled {
    /// Volumes whose pin was dropped: their target is no longer mounted.
    pub dropped: Vec<String>,
    /// Volume ids (`recovered:<target>`) of pins made for mounts that had none.
    pub recovered: Vec<String>,
}

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
    /// When the pin was made, in Unix seconds (0 in pins written before this was recorded).
    #[serde(default)]
    pub pinned_at: u64,
}

impl PinRecord {
    /// True when this pin holds the given snapshot.
    pub fn holds(&self, snap: &super::Snapshot) -> bool {
        self.kind == snap.kind.singular()
            && self.repo == snap.repo.as_str()
            && snap.commit == self.commit.as_str()
            && self.filter == snap.filter
    }
}

/// One pin as `pins.json` holds it: the volume id beside its record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PinEntry {
    volume_id: String,
    #[serde(flatten)]
    record: PinRecord,
}

/// `pins.json`: a list of pins; files written before pins were keyed by target are a map from
/// volume id to record, and still load.
#[derive(Deserialize)]
#[serde(untagged)]
enum PinsFile {
    List(Vec<PinEntry>),
    ByVolume(BTreeMap<String, PinRecord>),
}

/// The volume id of a pin made by reconciliation for a mount that had none.
pub fn recovered_volume_id(target_path: &str) -> String {
    format!("recovered:{target_path}")
}

/// All pins, by volume id and target path.
#[derive(Debug)]
pub struct Pins {
    path: PathBuf,
    by_volume: BTreeMap<(String, String), PinRecord>,
}

impl Pins {
    /// Loads `pins.json` from the store root; a missing file is no pins. A corrupt file is an
    /// error: dropping pins silently could let a mounted model be evicted.
    pub fn load(store_root: &std::path::Path) -> std::io::Result<Self> {
        let path = store_root.join("pins.json");
        let file = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::other(format!(
                    "{} is corrupt ({e}); move it aside and restart the agent to rebuild pins from the mount table",
                    path.display()
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => PinsFile::List(Vec::new()),
            Err(e) => return Err(e),
        };
        let by_volume = match file {
            PinsFile::List(entries) => entries
                .into_iter()
                .map(|e| ((e.volume_id, e.record.target_path.clone()), e.record))
                .collect(),
            PinsFile::ByVolume(map) => map
                .into_iter()
                .map(|(v, r)| ((v, r.target_path.clone()), r))
                .collect(),
        };
        Ok(Pins { path, by_volume })
    }

    /// Pins a snapshot for a volume at `record.target_path` (replacing the pin the volume had
    /// at that target).
    pub fn pin(&mut self, volume_id: &str, record: PinRecord) -> Result<()> {
        let key = (volume_id.to_owned(), record.target_path.clone());
        if self.by_volume.get(&key) == Some(&record) {
            return Ok(());
        }
        let before = self.by_volume.insert(key.clone(), record);
        let saved = self.save();
        if saved.is_err() {
            // Memory keeps what the file holds: a retry writes again.
            match before {
                Some(r) => self.by_volume.insert(key, r),
                None => self.by_volume.remove(&key),
            };
        }
        saved
    }

    /// Removes a volume's pin at `target_path`, and the pin reconciliation recovered for that
    /// target, if any; true if there was one. The volume's pins at other targets stay.
    pub fn unpin(&mut self, volume_id: &str, target_path: &str) -> Result<bool> {
        let mine = self
            .by_volume
            .remove(&(volume_id.to_owned(), target_path.to_owned()));
        let recovered = self
            .by_volume
            .remove(&(recovered_volume_id(target_path), target_path.to_owned()));
        if mine.is_none() && recovered.is_none() {
            return Ok(false);
        }
        if let Err(e) = self.save() {
            let key = |v: String| (v, target_path.to_owned());
            if let Some(r) = mine {
                self.by_volume.insert(key(volume_id.to_owned()), r);
            }
            if let Some(r) = recovered {
                self.by_volume
                    .insert(key(recovered_volume_id(target_path)), r);
            }
            return Err(e);
        }
        Ok(true)
    }

    /// Volume ids pinning a snapshot, each once.
    pub fn volumes_of(&self, snap: &super::Snapshot) -> Vec<String> {
        let mut volumes: Vec<String> = self
            .by_volume
            .iter()
            .filter(|(_, r)| r.holds(snap))
            .map(|((v, _), _)| v.clone())
            .collect();
        volumes.dedup();
        volumes
    }

    /// How many volumes have a pin.
    pub fn len(&self) -> usize {
        self.by_volume.len()
    }

    /// True when no volume has a pin.
    pub fn is_empty(&self) -> bool {
        self.by_volume.is_empty()
    }

    /// A volume's pin at `target_path`, or the one reconciliation recovered for that target.
    pub fn get(&self, volume_id: &str, target_path: &str) -> Option<&PinRecord> {
        let target = target_path.to_owned();
        self.by_volume
            .get(&(volume_id.to_owned(), target.clone()))
            .or_else(|| {
                self.by_volume
                    .get(&(recovered_volume_id(target_path), target))
            })
    }

    /// Makes the pins agree with what is mounted, as after a crash or a lost `pins.json`:
    ///
    /// - a pin older than [`PIN_SETTLE_SECONDS`] whose target is no longer a mount point is
    ///   dropped (its volume went while nobody listened): no pin leaks for ever;
    /// - a mount point showing a snapshot or one of its views without a pin gets one, with the
    ///   volume id `recovered:<target>`, dropped in turn once the target is unmounted: no
    ///   mounted snapshot is ever left unpinned.
    pub fn reconcile(
        &mut self,
        store: &Store,
        mounted: &[MountedDir],
        now: u64,
    ) -> Result<Reconciled> {
        use std::os::unix::fs::MetadataExt;
        let mut shows: HashMap<(u64, u64), Snapshot> = HashMap::new();
        for snap in store.list_snapshots()? {
            for dir in store.shown_dirs(&snap) {
                if let Ok(m) = std::fs::metadata(&dir) {
                    shows.insert((m.dev(), m.ino()), snap.clone());
                }
            }
        }
        let targets: HashMap<&str, &MountedDir> = mounted
            .iter()
            .filter_map(|m| Some((m.path.to_str()?, m)))
            .collect();
        let mut done = Reconciled::default();
        self.by_volume.retain(|(volume, _), pin| {
            let settled = now.saturating_sub(pin.pinned_at) >= PIN_SETTLE_SECONDS;
            let keep = targets.contains_key(pin.target_path.as_str()) || !settled;
            if !keep {
                done.dropped.push(volume.clone());
            }
            keep
        });
        for m in mounted {
            let Some(snap) = shows.get(&(m.dev, m.ino)) else {
                continue;
            };
            let target = m.path.display().to_string();
            if self.by_volume.values().any(|p| p.target_path == target) {
                continue;
            }
            let volume = recovered_volume_id(&target);
            self.by_volume.insert(
                (volume.clone(), target.clone()),
                PinRecord {
                    kind: snap.kind.singular().to_owned(),
                    repo: snap.repo.to_string(),
                    commit: snap.commit.to_string(),
                    target_path: target,
                    pod: None,
                    filter: snap.filter.clone(),
                    pinned_at: now,
                },
            );
            done.recovered.push(volume);
        }
        if !done.dropped.is_empty() || !done.recovered.is_empty() {
            self.save()?;
        }
        Ok(done)
    }

    fn save(&self) -> Result<()> {
        let entries: Vec<PinEntry> = self
            .by_volume
            .iter()
            .map(|((volume_id, _), record)| PinEntry {
                volume_id: volume_id.clone(),
                record: record.clone(),
            })
            .collect();
        let bytes = serde_json::to_vec_pretty(&entries).expect("pins serialize");
        write_atomic(&self.path, &bytes)
    }
}
