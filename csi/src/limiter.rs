//! One operation per volume at a time: a second caller gets ABORTED and kubelet retries.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// The set of volumes with an operation in flight.
#[derive(Debug, Default, Clone)]
pub struct VolumeLocks(Arc<Mutex<HashSet<String>>>);

/// Held while an operation runs on a volume; released on drop.
#[derive(Debug)]
pub struct VolumeGuard {
    locks: VolumeLocks,
    volume_id: String,
}

impl VolumeLocks {
    /// Takes the volume, or None if an operation on it is in flight.
    pub fn try_lock(&self, volume_id: &str) -> Option<VolumeGuard> {
        let mut set = self.0.lock().expect("volume locks");
        set.insert(volume_id.to_owned()).then(|| VolumeGuard {
            locks: self.clone(),
            volume_id: volume_id.to_owned(),
        })
    }
}

impl Drop for VolumeGuard {
    fn drop(&mut self) {
        self.locks
            .0
            .lock()
            .expect("volume locks")
            .remove(&self.volume_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_operation_per_volume() {
        let locks = VolumeLocks::default();
        let a = locks.try_lock("v1").unwrap();
        assert!(locks.try_lock("v1").is_none());
        let _b = locks.try_lock("v2").unwrap();
        drop(a);
        assert!(locks.try_lock("v1").is_some());
    }
}
