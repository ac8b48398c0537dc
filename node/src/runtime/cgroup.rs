//! The runtime process's own memory cgroup: the kernel's line behind the Wasm limits, so guests
//! together can never take the memory the agent (heartbeat, kubelet API) needs.
//!
//! The runtime places itself, at start-up, in a child of the memory cgroup it was started in,
//! named after its root dir, with `memory.limit_in_bytes` (cgroup v1) or `memory.max` (v2) set.
//! A host that does not let it (no write access, cgroup v2 with processes in the parent) gets
//! one warning line and the runtime runs on without it; a systemd unit's `MemoryMax=` is then
//! the way (deploy/systemd/wasm-kubelet-runtime.service).

use std::path::{Path, PathBuf};

/// Bytes the runtime needs besides its guests' memories: the engine, compiled code, image
/// and HTTP buffers, WASI contexts. 256 MiB covers the thousands of pods of a busy node (about
/// 30 KiB of host memory each) with room for a few large compiled modules.
pub const RUNTIME_OVERHEAD: u64 = 256 << 20;

/// Where the runtime went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The cgroup directory.
    pub dir: PathBuf,
    /// The limit written, in bytes.
    pub limit: u64,
}

/// Moves this process into `<its memory cgroup>/<name>` (or stays, when it already is there:
/// a runtime restarted in place) with a memory limit of `limit` bytes.
pub fn place_self(name: &str, limit: u64) -> Result<Placement, String> {
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("reading /proc/self/cgroup: {e}"))?;
    let (version, path) = memory_cgroup(&own).ok_or("no memory cgroup in /proc/self/cgroup")?;
    let root = match version {
        Version::V1 => Path::new("/sys/fs/cgroup/memory"),
        Version::V2 => Path::new("/sys/fs/cgroup"),
    };
    let current = root.join(path.trim_start_matches('/'));
    let dir = if current.file_name().is_some_and(|n| n == name) {
        current
    } else {
        current.join(name)
    };
    if let Err(e) = std::fs::create_dir(&dir) {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(format!("creating {}: {e}", dir.display()));
        }
    }
    let limit_file = match version {
        Version::V1 => "memory.limit_in_bytes",
        Version::V2 => {
            // cgroup v2 gives a child the memory controller only through its parent.
            let parent = dir.parent().unwrap_or(root);
            let _ = std::fs::write(parent.join("cgroup.subtree_control"), "+memory");
            "memory.max"
        }
    };
    std::fs::write(dir.join(limit_file), limit.to_string())
        .map_err(|e| format!("writing {}: {e}", dir.join(limit_file).display()))?;
    std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
        .map_err(|e| format!("joining {}: {e}", dir.display()))?;
    Ok(Placement { dir, limit })
}

/// The cgroup name for the runtime of `root_dir`: one per node, so runtimes of nodes sharing a
/// host (tests) each get their own limit.
pub fn name_for(root_dir: &Path) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(root_dir.as_os_str().as_encoded_bytes());
    format!(
        "wasm-kubelet-runtime-{}",
        digest[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

/// The memory cgroup's path in `/proc/self/cgroup` text: the v1 `memory` line, else the v2
/// `0::` line.
fn memory_cgroup(text: &str) -> Option<(Version, &str)> {
    let mut v2 = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if controllers.split(',').any(|c| c == "memory") {
            return Some((Version::V1, path));
        }
        if id == "0" && controllers.is_empty() {
            v2 = Some((Version::V2, path));
        }
    }
    v2
}

/// The memory limit of the cgroup `pid` is in (v1 or v2), for tests and tools.
pub fn limit_of(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let (version, path) = memory_cgroup(&text)?;
    let file = match version {
        Version::V1 => Path::new("/sys/fs/cgroup/memory")
            .join(path.trim_start_matches('/'))
            .join("memory.limit_in_bytes"),
        Version::V2 => Path::new("/sys/fs/cgroup")
            .join(path.trim_start_matches('/'))
            .join("memory.max"),
    };
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_line_of_v1_wins_over_the_unified_one() {
        let text = "9:name=systemd:/\n4:memory:/process_api/abc\n1:cpu:/\n0::/\n";
        assert_eq!(memory_cgroup(text), Some((Version::V1, "/process_api/abc")));
        assert_eq!(
            memory_cgroup("0::/system.slice/x.service\n"),
            Some((Version::V2, "/system.slice/x.service"))
        );
        assert_eq!(memory_cgroup("1:cpu,cpuacct:/\n"), None);
        assert_eq!(
            memory_cgroup("5:cpu,memory:/a\n"),
            Some((Version::V1, "/a"))
        );
    }

    #[test]
    fn names_differ_per_root_dir_and_are_stable() {
        let a = name_for(Path::new("/var/lib/wasm-kubelet"));
        assert_eq!(a, name_for(Path::new("/var/lib/wasm-kubelet")));
        assert_ne!(a, name_for(Path::new("/tmp/node-2")));
        assert!(
            a.starts_with("wasm-kubelet-runtime-") && a.len() == "wasm-kubelet-runtime-".len() + 8
        );
    }
}
