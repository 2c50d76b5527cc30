//! Loop devices, for cache volumes: a cache is an ext4 image in the store, attached to a loop
//! device and mounted.
//!
//! - A device already attached to the same image (after a restart of the plugin, say) is found
//!   ([`find`]) and reused, never a second one: two filesystems over one image would corrupt it.
//! - New devices are attached with autoclear ([`attach`]): a device detaches when its last user
//!   (the mount, or the descriptor [`attach`] returns) goes.
//!
//! This is the workspace's only unsafe code: three ioctls of `<linux/loop.h>`, each allowed
//! where it is made, with the argument the kernel reads.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

const LOOP_SET_FD: nix::libc::c_ulong = 0x4C00;
const LOOP_CLR_FD: nix::libc::c_ulong = 0x4C01;
const LOOP_SET_STATUS64: nix::libc::c_ulong = 0x4C04;
const LOOP_CTL_GET_FREE: nix::libc::c_ulong = 0x4C82;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_NAME_SIZE: usize = 64;

/// `struct loop_info64` of `<linux/loop.h>`, laid out as C lays it out.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

// The kernel's size of the struct: a layout mistake fails the build.
const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);

fn check(r: nix::libc::c_int) -> io::Result<nix::libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// An ioctl whose argument is an integer (or none).
fn ioctl_int(file: &File, request: nix::libc::c_ulong, arg: nix::libc::c_ulong) -> io::Result<i32> {
    #[allow(unsafe_code)]
    // SAFETY: `file` is an open descriptor for the call's length; the three requests used with
    // this function (GET_FREE, SET_FD, CLR_FD) read an integer argument by value and write no
    // memory of this process.
    let r = unsafe { nix::libc::ioctl(file.as_raw_fd(), request, arg) };
    check(r)
}

/// LOOP_SET_STATUS64.
fn set_status(file: &File, info: &LoopInfo64) -> io::Result<()> {
    #[allow(unsafe_code)]
    // SAFETY: `info` is a live, properly laid out `loop_info64` (repr(C), size asserted above)
    // that the kernel only reads during the call.
    let r = unsafe {
        nix::libc::ioctl(
            file.as_raw_fd(),
            LOOP_SET_STATUS64,
            info as *const LoopInfo64,
        )
    };
    check(r).map(drop)
}

/// The loop device attached to `image` now, if any: the one whose backing file is `image`'s
/// path, as `/sys/block/loop*/loop/backing_file` shows it.
pub fn find(image: &Path) -> io::Result<Option<PathBuf>> {
    let want = std::fs::canonicalize(image)?;
    let entries = match std::fs::read_dir("/sys/block") {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str().filter(|n| n.starts_with("loop")) else {
            continue;
        };
        // Only attached devices have a backing file.
        let Ok(backing) = std::fs::read(entry.path().join("loop/backing_file")) else {
            continue;
        };
        let backing = backing.strip_suffix(b"\n").unwrap_or(&backing);
        if backing == want.as_os_str().as_encoded_bytes() {
            return Ok(Some(PathBuf::from("/dev").join(name)));
        }
    }
    Ok(None)
}

/// A loop device newly attached to `image` (read-write, autoclear), and the device opened:
/// keep it until the device is mounted, or it detaches when dropped.
pub fn attach(image: &Path) -> io::Result<(PathBuf, File)> {
    let image = std::fs::canonicalize(image)?;
    let backing = OpenOptions::new().read(true).write(true).open(&image)?;
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")?;
    // Another process may take the free device between asking and attaching: ask again.
    for _ in 0..16 {
        let n = ioctl_int(&control, LOOP_CTL_GET_FREE, 0)?;
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let device = OpenOptions::new().read(true).write(true).open(&path)?;
        match ioctl_int(
            &device,
            LOOP_SET_FD,
            backing.as_raw_fd() as nix::libc::c_ulong,
        ) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => continue,
            Err(e) => return Err(e),
        }
        let mut info = LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: LO_FLAGS_AUTOCLEAR,
            lo_file_name: [0; LO_NAME_SIZE],
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        };
        let name = image.as_os_str().as_encoded_bytes();
        let len = name.len().min(LO_NAME_SIZE - 1);
        info.lo_file_name[..len].copy_from_slice(&name[..len]);
        if let Err(e) = set_status(&device, &info) {
            // Without autoclear set, closing would leave it attached.
            let _ = ioctl_int(&device, LOOP_CLR_FD, 0);
            return Err(e);
        }
        return Ok((path, device));
    }
    Err(io::Error::other("no free loop device after 16 tries"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sys(dev: &Path, what: &str) -> Option<String> {
        let name = dev.file_name()?.to_str()?;
        std::fs::read_to_string(format!("/sys/block/{name}/loop/{what}"))
            .ok()
            .map(|s| s.trim().to_owned())
    }

    /// Needs root (CI runs as root): attaches a real loop device.
    #[test]
    fn an_attached_image_is_found_autoclears_and_detaches_when_its_last_user_goes() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test attaches a loop device, which needs root"
        );
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(4 << 20)
            .unwrap();
        assert_eq!(find(&image).unwrap(), None);
        let (dev, held) = attach(&image).unwrap();
        assert_eq!(find(&image).unwrap().as_deref(), Some(dev.as_path()));
        assert_eq!(sys(&dev, "autoclear").as_deref(), Some("1"));
        assert_eq!(sys(&dev, "offset").as_deref(), Some("0"));
        assert_eq!(sys(&dev, "sizelimit").as_deref(), Some("0"));
        let canon = std::fs::canonicalize(&image).unwrap();
        assert_eq!(sys(&dev, "backing_file"), Some(canon.display().to_string()));
        drop(held);
        // Autoclear: detached once the last descriptor closed (the kernel does it on release).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while find(&image).unwrap().is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "{} stayed attached",
                dev.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
