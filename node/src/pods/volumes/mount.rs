//! tmpfs for memory-backed volumes (secret, projected, downwardAPI, emptyDir `medium: Memory`),
//! and tearing a pod directory down: unmount what is mounted under it, then remove it.
//!
//! Mounting needs CAP_SYS_ADMIN; where the host refuses, the volume stays on disk and the
//! caller logs it once (the kubelet fails the mount instead, but a Wasm node often runs
//! unprivileged, and the content is what the pod needs).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Where a volume's files live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Medium {
    Disk,
    Memory,
}

/// Mounts a tmpfs of `size_bytes` with root directory `mode` on `dir`. Does nothing when `dir`
/// is already a mount point (a resync, or an agent restart).
pub fn mount_tmpfs(dir: &Path, size_bytes: u64, mode: u32) -> Result<(), String> {
    if is_mount_point(dir) {
        return Ok(());
    }
    let target = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| format!("{}: a path with a NUL byte", dir.display()))?;
    let options =
        CString::new(format!("size={size_bytes},mode={mode:o}")).expect("no NUL in the options");
    let fstype = CString::new("tmpfs").expect("no NUL");
    // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            options.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(format!(
            "mounting tmpfs on {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Bind-mounts the directory open at `dir` onto `target` (made when missing; a mount already
/// there is replaced), through `/proc/self/fd`: what is mounted is the directory that fd
/// holds, however its path changes afterwards. The kubelet pins subPaths this way.
pub fn bind_fd(dir: &impl std::os::fd::AsRawFd, target: &Path) -> Result<(), String> {
    std::fs::create_dir_all(target).map_err(|e| format!("creating {}: {e}", target.display()))?;
    let c_target = CString::new(target.as_os_str().as_bytes())
        .map_err(|_| format!("{}: a path with a NUL byte", target.display()))?;
    if is_mount_point(target) {
        // SAFETY: umount2(2) with a NUL-terminated path that outlives the call.
        unsafe { libc::umount2(c_target.as_ptr(), libc::MNT_DETACH) };
    }
    let source = CString::new(format!("/proc/self/fd/{}", dir.as_raw_fd())).expect("no NUL");
    // SAFETY: mount(2) with NUL-terminated strings that outlive the call; no data argument.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            c_target.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(format!(
            "bind-mounting onto {}: {}",
            target.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Whether `dir` is a mount point of this process's mount namespace.
pub fn is_mount_point(dir: &Path) -> bool {
    let Ok(canonical) = std::fs::canonicalize(dir) else {
        return false;
    };
    mount_points().contains(&canonical)
}

/// Every mount point, from /proc/self/mountinfo (field 5, with its octal escapes undone).
fn mount_points() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .collect()
}

fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            out.push(
                ((bytes[i + 1] - b'0') << 6) | ((bytes[i + 2] - b'0') << 3) | (bytes[i + 3] - b'0'),
            );
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts everything mounted under `pod_dir` (deepest first), then removes the directory.
/// A mount that will not go is left, with its directory, and named in the error.
pub fn teardown(pod_dir: &Path) -> Result<(), String> {
    let Ok(root) = std::fs::canonicalize(pod_dir) else {
        return Ok(());
    };
    let mut under: Vec<PathBuf> = mount_points()
        .into_iter()
        .filter(|m| m.starts_with(&root))
        .collect();
    under.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    under.dedup();
    for m in &under {
        let target = CString::new(m.as_os_str().as_bytes())
            .map_err(|_| format!("{}: a path with a NUL byte", m.display()))?;
        // SAFETY: umount2(2) with a NUL-terminated path that outlives the call.
        let rc = unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        if rc != 0 {
            return Err(format!(
                "unmounting {}: {}",
                m.display(),
                std::io::Error::last_os_error()
            ));
        }
    }
    std::fs::remove_dir_all(&root).map_err(|e| format!("removing {}: {e}", root.display()))
}

/// Removes the pod directories under `pods_dir` whose name (a pod UID) is not in `keep`;
/// returns the UIDs removed. For start-up, after the pod sources have been listed.
pub fn remove_orphans(
    pods_dir: &Path,
    keep: &std::collections::HashSet<String>,
) -> Vec<(String, Result<(), String>)> {
    let Ok(entries) = std::fs::read_dir(pods_dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let uid = entry.file_name().to_string_lossy().into_owned();
        if keep.contains(&uid) || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        out.push((uid, teardown(&entry.path())));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/a\040b/c"), "/a b/c");
        assert_eq!(unescape("/plain"), "/plain");
    }

    #[test]
    fn tmpfs_is_mounted_and_torn_down_where_the_host_allows() {
        let pod = std::env::temp_dir().join(format!("wk-mount-{}", std::process::id()));
        let dir = pod.join("volumes/kubernetes.io~secret/s");
        std::fs::create_dir_all(&dir).unwrap();
        match mount_tmpfs(&dir, 1 << 20, 0o755) {
            Ok(()) => {
                assert!(is_mount_point(&dir));
                mount_tmpfs(&dir, 1 << 20, 0o755).unwrap(); // idempotent
                std::fs::write(dir.join("k"), "v").unwrap();
            }
            // An unprivileged test run cannot mount; teardown still removes the directory.
            Err(e) => eprintln!("skipping the mount part: {e}"),
        }
        teardown(&pod).unwrap();
        assert!(!pod.exists());
        assert!(!is_mount_point(&dir));
    }

    #[test]
    fn orphans_are_removed_and_current_pods_kept() {
        let pods = std::env::temp_dir().join(format!("wk-orphans-{}", std::process::id()));
        std::fs::create_dir_all(pods.join("uid-keep/volumes")).unwrap();
        std::fs::create_dir_all(pods.join("uid-gone/volumes")).unwrap();
        let keep = ["uid-keep".to_string()].into_iter().collect();
        let removed = remove_orphans(&pods, &keep);
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].0, "uid-gone");
        assert!(pods.join("uid-keep").exists() && !pods.join("uid-gone").exists());
        let _ = std::fs::remove_dir_all(&pods);
    }
}
