//! Facts about the host, measured from /proc and statvfs: what the Node reports as capacity,
//! nodeInfo and the inputs of its pressure conditions; and [`Allocatable`], what of the
//! capacity pods may request.

use std::path::Path;

use crate::config::{EvictionSignal, EvictionThreshold, Reserved};

/// What the machine has. Measured once at start-up and again each status interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capacity {
    pub cpus: u32,
    pub memory_bytes: u64,
    /// Size of the filesystem holding --root-dir.
    pub ephemeral_storage_bytes: u64,
}

/// What is free right now: the eviction signals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Available {
    pub memory_bytes: u64,
    pub nodefs_bytes: u64,
    pub nodefs_inodes: u64,
    pub nodefs_inodes_total: u64,
    pub pids: u64,
    pub pids_max: u64,
}

/// What pods may request in total: capacity less the reserved resources and the hard eviction
/// thresholds, as the kubelet computes it (`GetNodeAllocatableAbsolute`, floored at zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocatable {
    pub milli_cpu: u64,
    pub memory_bytes: u64,
    pub ephemeral_storage_bytes: u64,
}

impl Allocatable {
    /// `capacity − system_reserved − kube_reserved − hard eviction threshold`: memory less the
    /// `memory.available` threshold, ephemeral storage less `nodefs.available` (percentages of
    /// capacity); CPU has no eviction threshold.
    pub fn compute(
        capacity: &Capacity,
        system: &Reserved,
        kube: &Reserved,
        eviction_hard: &[EvictionThreshold],
    ) -> Self {
        let threshold = |signal: EvictionSignal, total: u64| {
            eviction_hard
                .iter()
                .find(|t| t.signal == signal)
                .map_or(0, |t| t.limit.absolute(total))
        };
        let memory_eviction = threshold(EvictionSignal::MemoryAvailable, capacity.memory_bytes);
        let storage_eviction = threshold(
            EvictionSignal::NodefsAvailable,
            capacity.ephemeral_storage_bytes,
        );
        Allocatable {
            milli_cpu: (u64::from(capacity.cpus) * 1000)
                .saturating_sub(system.milli_cpu)
                .saturating_sub(kube.milli_cpu),
            memory_bytes: capacity
                .memory_bytes
                .saturating_sub(system.memory)
                .saturating_sub(kube.memory)
                .saturating_sub(memory_eviction),
            ephemeral_storage_bytes: capacity
                .ephemeral_storage_bytes
                .saturating_sub(system.ephemeral_storage)
                .saturating_sub(kube.ephemeral_storage)
                .saturating_sub(storage_eviction),
        }
    }

    /// The CPU quantity as the kubelet writes it: whole cores (`2`) or millicores (`1900m`).
    pub fn cpu_quantity(&self) -> String {
        if self.milli_cpu.is_multiple_of(1000) {
            (self.milli_cpu / 1000).to_string()
        } else {
            format!("{}m", self.milli_cpu)
        }
    }
}

/// Identity of the host for `status.nodeInfo`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostInfo {
    pub machine_id: String,
    pub system_uuid: String,
    pub boot_id: String,
    pub kernel_version: String,
    pub os_image: String,
    /// GOARCH spelling (amd64, arm64), as Kubernetes reports it.
    pub architecture: String,
}

/// A measurement that failed; the message names the file or call.
#[derive(Debug, thiserror::Error)]
#[error("cannot measure {what}: {source}")]
pub struct MeasureError {
    what: String,
    #[source]
    source: std::io::Error,
}

fn read(path: &str) -> Result<String, MeasureError> {
    std::fs::read_to_string(path).map_err(|source| MeasureError {
        what: path.into(),
        source,
    })
}

/// A `Key:   1234 kB` line of /proc/meminfo, in bytes.
fn meminfo_field(meminfo: &str, key: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kib * 1024)
    })
}

struct FsStats {
    size: u64,
    available: u64,
    inodes: u64,
    inodes_free: u64,
}

fn statvfs(path: &Path) -> Result<FsStats, MeasureError> {
    use std::os::unix::ffi::OsStrExt;
    let err = |source| MeasureError {
        what: format!("the filesystem of {}", path.display()),
        source,
    };
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "path has a NUL byte",
        ))
    })?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is a valid NUL-terminated string and st a properly sized out-parameter.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut st) } != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    let frsize = st.f_frsize as u64;
    Ok(FsStats {
        size: st.f_blocks as u64 * frsize,
        available: st.f_bavail as u64 * frsize,
        inodes: st.f_files as u64,
        inodes_free: st.f_ffree as u64,
    })
}

/// CPUs this process may run on (the kubelet counts online CPUs the same way through cAdvisor).
fn cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

/// Capacity of the machine, with ephemeral storage measured on the filesystem of `root_dir`.
pub fn capacity(root_dir: &Path) -> Result<Capacity, MeasureError> {
    let meminfo = read("/proc/meminfo")?;
    let memory_bytes = meminfo_field(&meminfo, "MemTotal").unwrap_or(0);
    let fs = statvfs(root_dir)?;
    Ok(Capacity {
        cpus: cpus(),
        memory_bytes,
        ephemeral_storage_bytes: fs.size,
    })
}

/// The free resources the pressure conditions are computed from.
pub fn available(root_dir: &Path) -> Result<Available, MeasureError> {
    let meminfo = read("/proc/meminfo")?;
    let memory_bytes = meminfo_field(&meminfo, "MemAvailable").unwrap_or(0);
    let fs = statvfs(root_dir)?;
    let pids_max: u64 = read("/proc/sys/kernel/pid_max")?
        .trim()
        .parse()
        .unwrap_or(u64::from(u32::MAX));
    let running = read("/proc/loadavg")?
        .split_whitespace()
        .nth(3)
        .and_then(|field| field.split_once('/'))
        .and_then(|(_, total)| total.parse::<u64>().ok())
        .unwrap_or(0);
    Ok(Available {
        memory_bytes,
        nodefs_bytes: fs.available,
        nodefs_inodes: fs.inodes_free,
        nodefs_inodes_total: fs.inodes,
        pids: pids_max.saturating_sub(running),
        pids_max,
    })
}

/// Host identity for nodeInfo. Missing files give empty fields, as the kubelet leaves them.
pub fn host_info() -> HostInfo {
    let first_line = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let os_image = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                l.strip_prefix("PRETTY_NAME=")
                    .map(|v| v.trim_matches('"').to_string())
            })
        })
        .unwrap_or_else(|| "Linux".into());
    let architecture = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
    .to_string();
    HostInfo {
        machine_id: first_line("/etc/machine-id"),
        system_uuid: first_line("/sys/class/dmi/id/product_uuid"),
        boot_id: first_line("/proc/sys/kernel/random/boot_id"),
        kernel_version: first_line("/proc/sys/kernel/osrelease"),
        os_image,
        architecture,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ThresholdValue;

    #[test]
    fn meminfo_lines_parse_to_bytes() {
        let text =
            "MemTotal:       24523456 kB\nMemFree:        1000 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(meminfo_field(text, "MemTotal"), Some(24523456 * 1024));
        assert_eq!(meminfo_field(text, "MemAvailable"), Some(2048 * 1024));
        assert_eq!(meminfo_field(text, "Mem"), None);
    }

    #[test]
    fn this_machine_measures() {
        let c = capacity(Path::new("/")).unwrap();
        assert!(c.cpus >= 1);
        assert!(c.memory_bytes > 0 && c.ephemeral_storage_bytes > 0);
        let a = available(Path::new("/")).unwrap();
        assert!(a.memory_bytes <= c.memory_bytes);
        assert!(a.pids <= a.pids_max);
    }

    #[test]
    fn allocatable_is_capacity_less_reserved_and_hard_eviction() {
        let capacity = Capacity {
            cpus: 2,
            memory_bytes: 8 << 30,
            ephemeral_storage_bytes: 100 << 30,
        };
        let system = Reserved {
            milli_cpu: 100,
            memory: 1 << 30,
            ephemeral_storage: 1 << 30,
            pid: 0,
        };
        let kube = Reserved {
            milli_cpu: 150,
            memory: 512 << 20,
            ..Default::default()
        };
        let hard = [
            EvictionThreshold {
                signal: EvictionSignal::MemoryAvailable,
                limit: ThresholdValue::Quantity(100 << 20),
            },
            EvictionThreshold {
                signal: EvictionSignal::NodefsAvailable,
                limit: ThresholdValue::Percent(10.0),
            },
        ];
        let a = Allocatable::compute(&capacity, &system, &kube, &hard);
        assert_eq!(a.milli_cpu, 1750);
        assert_eq!(a.cpu_quantity(), "1750m");
        assert_eq!(
            a.memory_bytes,
            (8 << 30) - (1 << 30) - (512 << 20) - (100 << 20)
        );
        assert_eq!(
            a.ephemeral_storage_bytes,
            (100u64 << 30) - (1 << 30) - (10 << 30)
        );
        // More reserved than there is: zero, never an underflow.
        let greedy = Reserved {
            milli_cpu: 5000,
            memory: 16 << 30,
            ..Default::default()
        };
        let a = Allocatable::compute(&capacity, &greedy, &Reserved::default(), &[]);
        assert_eq!(
            (a.milli_cpu, a.memory_bytes, a.cpu_quantity().as_str()),
            (0, 0, "0")
        );
    }

    #[test]
    fn missing_root_dir_is_a_named_error() {
        let e = capacity(Path::new("/nonexistent/wasm-kubelet"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/wasm-kubelet"), "{e}");
    }
}
