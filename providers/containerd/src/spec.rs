//! The OCI runtime spec of a container, built from its [`ContainerConfig`] and its image.
//!
//! What it grants is deliberately narrow, as runc's own default spec (`runc spec`): the
//! capabilities AUDIT_WRITE, KILL and NET_BIND_SERVICE only, `noNewPrivileges`, the kernel's
//! sensitive /proc and /sys paths masked or read-only, its own PID, IPC, UTS, mount and network
//! namespaces (or the pod's, joined by path, see [`SandboxNamespaces`]), and never an
//! `oomScoreAdj` (these hosts refuse a negative one, and a positive one is the kubelet's QoS
//! policy, not this provider's).

use std::path::{Path, PathBuf};

use provider_api::{ContainerConfig, ProviderError};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::image::ImageConfig;

/// The most processes (threads included) one container may have: a fork bomb in a hostile
/// container must not exhaust the node's PIDs. 4096 is far above what a real service runs
/// (the kubelet's podPidsLimit is off by default; a node operator's budget would replace this).
pub const PIDS_LIMIT: i64 = 4096;
/// CFS period, as the kubelet sets it: 100 ms.
pub const CPU_PERIOD_US: u64 = 100_000;
/// The smallest `cpu.shares` the kernel takes (and the kubelet gives a pod without requests).
const MIN_SHARES: u64 = 2;
/// Directories the runtime mounts itself in every container: a volume is never bound over one.
const RUNTIME_DIRS: &[&str] = &[
    "/dev",
    "/dev/pts",
    "/dev/shm",
    "/dev/mqueue",
    "/proc",
    "/sys",
];

/// Which namespace of one kind a container runs in.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Namespace {
    /// A new one of its own (without a pod network: loopback only).
    #[default]
    Private,
    /// The pod's, pinned at this path (a bind-mounted /proc/<pid>/ns/<kind>).
    Join(PathBuf),
    /// The node's own (`hostNetwork`, `hostIPC`): the spec leaves the kind out.
    Node,
}

/// The pod's namespaces its containers run in: the seam for pod networking. providers/podnet
/// pins a pod's network, IPC and UTS namespaces (`PodNamespaces`, `NamespacePaths`) and
/// attaches the network (`PodNetwork`); its `NamespacePaths` maps here as `Some(path)` ->
/// [`Namespace::Join`] and `None` (the node's) -> [`Namespace::Node`]. Every container of the
/// pod then joins them by path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxNamespaces {
    pub network: Namespace,
    pub ipc: Namespace,
    pub uts: Namespace,
}

/// The argv of the container: the pod's `command` replaces the image's Entrypoint (and then
/// Cmd is not used), `args` replaces Cmd, as Kubernetes does.
pub fn argv(config: &ContainerConfig, image: &ImageConfig) -> Vec<String> {
    let run = &image.config;
    if !config.command.is_empty() {
        let mut argv = config.command.clone();
        argv.extend(config.args.iter().cloned());
        return argv;
    }
    let mut argv = run.entrypoint.clone().unwrap_or_default();
    if config.args.is_empty() {
        argv.extend(run.cmd.clone().unwrap_or_default());
    } else {
        argv.extend(config.args.iter().cloned());
    }
    argv
}

/// The environment: the image's, then the pod's (a later entry of a name wins), PATH defaulted.
pub fn env(config: &ContainerConfig, image: &ImageConfig) -> Vec<String> {
    let mut vars: Vec<(String, String)> = Vec::new();
    let mut set = |name: &str, value: &str| {
        if let Some(existing) = vars.iter_mut().find(|(n, _)| n == name) {
            existing.1 = value.to_string();
        } else {
            vars.push((name.to_string(), value.to_string()));
        }
    };
    for entry in image.config.env.iter().flatten() {
        let (name, value) = entry.split_once('=').unwrap_or((entry.as_str(), ""));
        set(name, value);
    }
    for (name, value) in &config.env {
        set(name, value);
    }
    if !vars.iter().any(|(n, _)| n == "PATH") {
        vars.insert(
            0,
            (
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            ),
        );
    }
    vars.into_iter().map(|(n, v)| format!("{n}={v}")).collect()
}

/// The image's `User` as uid/gid; only numeric users (`uid` or `uid:gid`) and root are
/// supported (names would need the image's /etc/passwd).
fn user(config: &ContainerConfig, image: &ImageConfig) -> Result<(u32, u32), ProviderError> {
    let user = image.config.user.as_deref().unwrap_or("").trim();
    if user.is_empty() || user == "root" {
        return Ok((0, 0));
    }
    let (uid, gid) = user.split_once(':').unwrap_or((user, "0"));
    match (uid.parse(), gid.parse()) {
        (Ok(uid), Ok(gid)) => Ok((uid, gid)),
        _ => Err(ProviderError::Create(format!(
            "container {}: the image's user {user:?} is not numeric (uid[:gid]); named users are not supported yet",
            config.name
        ))),
    }
}

/// `cpu.shares` for a request in millicores, as the kubelet computes it.
pub fn cpu_shares(request_millicores: Option<u64>) -> u64 {
    match request_millicores {
        None | Some(0) => MIN_SHARES,
        Some(m) => (m.saturating_mul(1024) / 1000).max(MIN_SHARES),
    }
}

/// The runtime spec, as JSON.
pub fn build(
    id: &str,
    hostname: &str,
    config: &ContainerConfig,
    image: &ImageConfig,
    namespaces: &SandboxNamespaces,
    cgroups_path: &str,
) -> Result<Value, ProviderError> {
    let args = argv(config, image);
    if args.is_empty() {
        return Err(ProviderError::Create(format!(
            "container {}: no command (the pod names none and the image has no Entrypoint or Cmd)",
            config.name
        )));
    }
    let (uid, gid) = user(config, image)?;
    let cwd = config
        .working_dir
        .clone()
        .or_else(|| image.config.working_dir.clone())
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| "/".into());
    if !cwd.starts_with('/') {
        return Err(ProviderError::Create(format!(
            "container {}: working directory {cwd:?} is not absolute",
            config.name
        )));
    }
    let caps = json!(["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}),
    ];
    for mount in &config.mounts {
        if !mount.container_path.starts_with('/') {
            return Err(ProviderError::Create(format!(
                "container {}: mount path {:?} is not absolute",
                config.name, mount.container_path
            )));
        }
        if !mount.host_path.is_dir() && !mount.host_path.is_file() {
            return Err(ProviderError::Create(format!(
                "container {}: mount {} at {} does not exist",
                config.name,
                mount.host_path.display(),
                mount.container_path
            )));
        }
        let mut options = vec!["rbind", "rprivate", "nosuid", "nodev"];
        options.push(if mount.read_only { "ro" } else { "rw" });
        // A directory over one the runtime makes (/dev, /proc, /sys) would hide it (the node
        // gives the terminationMessagePath's directory, /dev by default, as the Wasm provider
        // needs): its files are bound one by one instead, as the kubelet binds
        // /dev/termination-log.
        let target = mount.container_path.trim_end_matches('/');
        if mount.host_path.is_dir() && RUNTIME_DIRS.contains(&target) {
            let entries = std::fs::read_dir(&mount.host_path).map_err(|e| {
                ProviderError::Create(format!(
                    "container {}: reading mount {}: {e}",
                    config.name,
                    mount.host_path.display()
                ))
            })?;
            let mut files: Vec<_> = entries
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .map(|e| e.file_name())
                .collect();
            files.sort();
            for name in files {
                mounts.push(json!({
                    "destination": format!("{target}/{}", name.to_string_lossy()),
                    "type": "bind",
                    "source": mount.host_path.join(&name),
                    "options": options,
                }));
            }
            continue;
        }
        mounts.push(json!({
            "destination": mount.container_path,
            "type": "bind",
            "source": mount.host_path,
            "options": options,
        }));
    }
    let mut linux_namespaces = vec![json!({"type": "pid"}), json!({"type": "mount"})];
    for (kind, ns) in [
        ("network", &namespaces.network),
        ("ipc", &namespaces.ipc),
        ("uts", &namespaces.uts),
    ] {
        match ns {
            Namespace::Private => linux_namespaces.push(json!({"type": kind})),
            Namespace::Join(path) => linux_namespaces.push(json!({"type": kind, "path": path})),
            Namespace::Node => {}
        }
    }
    let mut memory = serde_json::Map::new();
    if let Some(limit) = config.memory_limit_bytes {
        memory.insert("limit".into(), json!(limit));
        // No swap beyond the limit, where the kernel accounts swap (cgroup v1 memsw).
        if memsw_supported() {
            memory.insert("swap".into(), json!(limit));
        }
    }
    let mut cpu = serde_json::Map::new();
    cpu.insert(
        "shares".into(),
        json!(cpu_shares(config.cpu_request_millicores)),
    );
    if let Some(limit) = config.cpu_limit_millicores {
        // At least 1 ms per period: the kernel's smallest quota.
        let quota = (limit.saturating_mul(CPU_PERIOD_US) / 1000).max(1000);
        cpu.insert("quota".into(), json!(quota));
        cpu.insert("period".into(), json!(CPU_PERIOD_US));
    }
    let mut spec = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": uid, "gid": gid},
            "args": args,
            "env": env(config, image),
            "cwd": cwd,
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps,
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true,
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": hostname,
        "mounts": mounts,
        "linux": {
            "cgroupsPath": cgroups_path,
            "resources": {
                "devices": [{"allow": false, "access": "rwm"}],
                "memory": memory,
                "cpu": cpu,
                "pids": {"limit": PIDS_LIMIT},
            },
            "namespaces": linux_namespaces,
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                "/proc/scsi",
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
            ],
        },
        "annotations": {"io.wasm-kubelet.container-id": id},
    });
    // runc sets no hostname in the node's UTS namespace (it refuses to).
    if namespaces.uts == Namespace::Node {
        if let Some(obj) = spec.as_object_mut() {
            obj.remove("hostname");
        }
    }
    Ok(spec)
}

/// Whether the memory cgroup accounts swap (cgroup v1 `memory.memsw.*`); runc refuses a swap
/// limit otherwise.
fn memsw_supported() -> bool {
    Path::new("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes").exists()
        || Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
            && !Path::new("/sys/fs/cgroup/memory").exists()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::RunConfig;

    fn config() -> ContainerConfig {
        ContainerConfig {
            name: "c".into(),
            image: "i".into(),
            command: vec![],
            args: vec![],
            env: vec![("A".into(), "pod".into())],
            working_dir: None,
            mounts: vec![],
            log_path: "/tmp/x.log".into(),
            memory_limit_bytes: Some(64 << 20),
            cpu_limit_millicores: Some(250),
            cpu_request_millicores: Some(100),
            attempt: 0,
            network: Default::default(),
            stdin: false,
            stdin_once: false,
            annotations: Default::default(),
        }
    }

    fn image() -> ImageConfig {
        ImageConfig {
            config: RunConfig {
                entrypoint: Some(vec!["/bin/ep".into()]),
                cmd: Some(vec!["default".into()]),
                env: Some(vec!["A=image".into(), "B=image".into()]),
                working_dir: Some("/work".into()),
                user: None,
            },
            rootfs: Default::default(),
        }
    }

    #[test]
    fn command_and_args_replace_the_image_defaults_as_kubernetes_does() {
        let mut c = config();
        assert_eq!(argv(&c, &image()), vec!["/bin/ep", "default"]);
        c.args = vec!["x".into()];
        assert_eq!(argv(&c, &image()), vec!["/bin/ep", "x"]);
        c.command = vec!["/bin/sh".into()];
        assert_eq!(argv(&c, &image()), vec!["/bin/sh", "x"]);
    }

    #[test]
    fn spec_has_limits_shares_no_oom_score_and_narrow_privileges() {
        let spec = build(
            "id",
            "pod",
            &config(),
            &image(),
            &SandboxNamespaces::default(),
            "/x/id",
        )
        .unwrap();
        let res = &spec["linux"]["resources"];
        assert_eq!(res["memory"]["limit"], json!(64u64 << 20));
        assert_eq!(res["cpu"]["quota"], json!(25_000));
        assert_eq!(res["cpu"]["shares"], json!(102));
        assert!(spec["process"].get("oomScoreAdj").is_none());
        assert_eq!(spec["process"]["noNewPrivileges"], json!(true));
        assert_eq!(spec["process"]["cwd"], json!("/work"));
        let env = spec["process"]["env"].as_array().unwrap();
        assert!(env.contains(&json!("A=pod")) && env.contains(&json!("B=image")));
        assert!(!spec["process"]["capabilities"]["bounding"]
            .as_array()
            .unwrap()
            .contains(&json!("CAP_SYS_ADMIN")));
        assert_eq!(cpu_shares(None), 2);
        assert_eq!(res["pids"]["limit"], json!(PIDS_LIMIT));
    }

    #[test]
    fn a_directory_over_dev_is_bound_file_by_file() {
        let dir = std::env::temp_dir().join(format!("ctd-spec-dev-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("termination-log"), b"").unwrap();
        let mut c = config();
        c.mounts = vec![provider_api::Mount {
            host_path: dir.clone(),
            container_path: "/dev".into(),
            read_only: false,
        }];
        let spec = build(
            "id",
            "pod",
            &c,
            &image(),
            &SandboxNamespaces::default(),
            "/x",
        )
        .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let binds: Vec<_> = spec["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["type"] == "bind")
            .map(|m| m["destination"].as_str().unwrap().to_string())
            .collect();
        // runc's own /dev stays (with /dev/null); only the file is bound over it.
        assert_eq!(binds, ["/dev/termination-log"]);
    }

    #[test]
    fn pod_namespaces_are_joined_by_path() {
        let ns = SandboxNamespaces {
            network: Namespace::Join("/run/netns/p".into()),
            ipc: Namespace::Private,
            uts: Namespace::Node,
        };
        let spec = build("id", "pod", &config(), &image(), &ns, "/x/id").unwrap();
        let list = spec["linux"]["namespaces"].as_array().unwrap();
        assert!(list.contains(&json!({"type": "network", "path": "/run/netns/p"})));
        assert!(list.contains(&json!({"type": "ipc"})));
        assert!(list.iter().all(|n| n["type"] != "uts"));
        assert!(spec.get("hostname").is_none());
    }
}
