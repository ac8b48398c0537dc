//! A pod's network, IPC and UTS namespaces without a pause process.
//!
//! A dedicated OS thread unshares the namespaces, sets the pod's hostname, bind-mounts its own
//! `/proc/thread-self/ns/{net,ipc,uts}` onto files under `<root>/<pod uid>/ns/` and exits. The
//! bind mounts keep the namespaces alive with no process in them; every container of the pod
//! joins them by path (the OCI spec's `linux.namespaces[].path`). The calling thread (a tokio
//! worker) never changes namespace.
//!
//! The directory holds, once complete, `spec.json`, written last: a directory without it is a
//! half-created (or half-removed) state that `open` and `create` clean up.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{io_err, PodNetError, Result};
use crate::names;

/// Whether a pod gets a namespace of its own or uses the node's (`hostNetwork`, `hostIPC`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sharing {
    /// A new namespace for the pod, shared by its containers.
    Pod,
    /// The node's namespace: nothing is created, containers do not set a path for this kind.
    Host,
}

/// What to create for a pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceSpec {
    /// The pod's hostname (`spec.hostname`, else the pod name, at most 63 characters). Set in
    /// the pod's UTS namespace; unused when `network` is `Host`.
    pub hostname: String,
    /// The network namespace; `Host` for `hostNetwork: true`. The UTS namespace follows it,
    /// as in Kubernetes: a host-network pod sees the node's hostname.
    pub network: Sharing,
    /// The IPC namespace; `Host` for `hostIPC: true`.
    pub ipc: Sharing,
}

impl NamespaceSpec {
    /// A pod with its own network, IPC and UTS namespaces.
    pub fn pod(hostname: impl Into<String>) -> Self {
        NamespaceSpec {
            hostname: hostname.into(),
            network: Sharing::Pod,
            ipc: Sharing::Pod,
        }
    }

    fn kinds(&self) -> Vec<Kind> {
        let mut kinds = Vec::new();
        if self.network == Sharing::Pod {
            kinds.push(Kind::Net);
            kinds.push(Kind::Uts);
        }
        if self.ipc == Sharing::Pod {
            kinds.push(Kind::Ipc);
        }
        kinds
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Net,
    Ipc,
    Uts,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Net, Kind::Ipc, Kind::Uts];

    fn file(self) -> &'static str {
        match self {
            Kind::Net => "net",
            Kind::Ipc => "ipc",
            Kind::Uts => "uts",
        }
    }

    fn clone_flag(self) -> libc::c_int {
        match self {
            Kind::Net => libc::CLONE_NEWNET,
            Kind::Ipc => libc::CLONE_NEWIPC,
            Kind::Uts => libc::CLONE_NEWUTS,
        }
    }
}

/// The paths a container's OCI spec joins (`linux.namespaces[{type, path}]`). `None`: the
/// node's namespace of that kind (leave the entry out of the spec).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespacePaths {
    pub network: Option<PathBuf>,
    pub ipc: Option<PathBuf>,
    pub uts: Option<PathBuf>,
}

/// A pod's pinned namespaces. Dropping the handle leaves them pinned (an agent restart finds
/// them with `open`); `remove` releases them.
#[derive(Debug)]
pub struct PodNamespaces {
    uid: String,
    dir: PathBuf,
    spec: NamespaceSpec,
}

const SPEC_FILE: &str = "spec.json";
/// statfs(2) f_type of nsfs, the file system of /proc/*/ns/* (linux/magic.h NSFS_MAGIC).
const NSFS_MAGIC: i64 = 0x6e73_6673;

impl PodNamespaces {
    /// Creates and pins the namespaces `spec` asks for under `root/<pod_uid>/ns/`. A leftover
    /// half-created state there is cleaned first; a complete one is `AlreadyExists`.
    pub fn create(root: &Path, pod_uid: &str, spec: &NamespaceSpec) -> Result<PodNamespaces> {
        names::pod_uid(pod_uid)?;
        if spec.network == Sharing::Pod {
            names::hostname(&spec.hostname)?;
        }
        let dir = ns_dir(root, pod_uid);
        if let Some(existing) = Self::open(root, pod_uid)? {
            return Err(PodNetError::AlreadyExists {
                uid: pod_uid.to_owned(),
                path: existing.dir,
            });
        }
        fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        let made = PodNamespaces {
            uid: pod_uid.to_owned(),
            dir,
            spec: spec.clone(),
        };
        if let Err(e) = made.pin() {
            if let Err(clean) = made.remove() {
                tracing::warn!(pod_uid, error = %clean, "cleaning up half-created namespaces");
            }
            return Err(e);
        }
        tracing::debug!(pod_uid, dir = %made.dir.display(), "pod namespaces pinned");
        Ok(made)
    }

    /// The namespaces pinned for this pod by an earlier `create` (before an agent restart), or
    /// `None` when there are none. A half-created state, or files whose mounts are gone (a
    /// node reboot), is cleaned and gives `None`.
    pub fn open(root: &Path, pod_uid: &str) -> Result<Option<PodNamespaces>> {
        names::pod_uid(pod_uid)?;
        let dir = ns_dir(root, pod_uid);
        if !dir.exists() {
            return Ok(None);
        }
        let spec_path = dir.join(SPEC_FILE);
        let spec = match fs::read(&spec_path) {
            Ok(bytes) => serde_json::from_slice::<NamespaceSpec>(&bytes).ok(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err("read", spec_path)(e)),
        };
        let found = spec.map(|spec| PodNamespaces {
            uid: pod_uid.to_owned(),
            dir: dir.clone(),
            spec,
        });
        if let Some(found) = found {
            let mut complete = true;
            for kind in found.spec.kinds() {
                complete &= is_nsfs(&found.dir.join(kind.file()))?;
            }
            if complete {
                return Ok(Some(found));
            }
        }
        tracing::info!(pod_uid, dir = %dir.display(), "cleaning up incomplete pod namespaces");
        PodNamespaces {
            uid: pod_uid.to_owned(),
            dir,
            spec: NamespaceSpec::pod("x"),
        }
        .remove()?;
        Ok(None)
    }

    /// Unpins and deletes the namespaces (the kernel frees each one when its last process
    /// leaves). Idempotent. Call it after the pod's containers are gone and after the CNI DEL.
    pub fn remove(&self) -> Result<()> {
        // spec.json first: a crash part-way leaves a state `open` recognises as incomplete.
        remove_file_if_exists(&self.dir.join(SPEC_FILE))?;
        for kind in Kind::ALL {
            let path = self.dir.join(kind.file());
            unmount_all(&path)?;
            remove_file_if_exists(&path)?;
        }
        remove_file_if_exists(&self.dir.join(format!("{SPEC_FILE}.tmp")))?;
        match fs::remove_dir(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove directory", &self.dir)(e)),
        }
        // The pod's directory under the root, if nothing else lives there.
        if let Some(parent) = self.dir.parent() {
            let _ = fs::remove_dir(parent);
        }
        Ok(())
    }

    /// The paths a container joins.
    pub fn paths(&self) -> NamespacePaths {
        let kinds = self.spec.kinds();
        let path = |kind: Kind| kinds.contains(&kind).then(|| self.dir.join(kind.file()));
        NamespacePaths {
            network: path(Kind::Net),
            ipc: path(Kind::Ipc),
            uts: path(Kind::Uts),
        }
    }

    /// The pod's network namespace path, the CNI_NETNS of its network; `None` for host network.
    pub fn netns_path(&self) -> Option<PathBuf> {
        self.paths().network
    }

    pub fn pod_uid(&self) -> &str {
        &self.uid
    }

    pub fn spec(&self) -> &NamespaceSpec {
        &self.spec
    }

    fn pin(&self) -> Result<()> {
        let kinds = self.spec.kinds();
        let mut targets = Vec::new();
        for kind in &kinds {
            let path = self.dir.join(kind.file());
            // The mount point: an empty file, as `ip netns add` makes.
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(io_err("create mount point", &path))?;
            targets.push((*kind, cstring(&path)?));
        }
        if !kinds.is_empty() {
            let hostname = (self.spec.network == Sharing::Pod).then(|| self.spec.hostname.clone());
            // A thread of its own: unshare(2) changes the calling thread's namespaces, and the
            // thread ends right after, so no other work ever runs inside them by accident.
            std::thread::Builder::new()
                .name("pod-namespaces".into())
                .spawn(move || unshare_and_pin(&targets, hostname.as_deref()))
                .map_err(|source| PodNetError::Namespace {
                    op: "spawn thread",
                    source,
                })?
                .join()
                .map_err(|_| PodNetError::Namespace {
                    op: "namespace thread",
                    source: io::Error::other("panicked"),
                })??;
        }
        let spec_path = self.dir.join(SPEC_FILE);
        let tmp = self.dir.join(format!("{SPEC_FILE}.tmp"));
        let json = serde_json::to_vec(&self.spec).expect("a NamespaceSpec always serializes");
        fs::write(&tmp, json).map_err(io_err("write", &tmp))?;
        fs::rename(&tmp, &spec_path).map_err(io_err("rename", &spec_path))?;
        Ok(())
    }
}

/// Runs on the dedicated thread: new namespaces, the hostname, one bind mount per kind.
fn unshare_and_pin(targets: &[(Kind, CString)], hostname: Option<&str>) -> Result<()> {
    let flags = targets
        .iter()
        .fold(0, |flags, (kind, _)| flags | kind.clone_flag());
    // SAFETY: unshare(2) takes flags only; it affects this thread, which exits after pinning.
    if unsafe { libc::unshare(flags) } != 0 {
        return Err(PodNetError::Namespace {
            op: "unshare",
            source: io::Error::last_os_error(),
        });
    }
    if let Some(hostname) = hostname {
        // SAFETY: a valid pointer and its length; the UTS namespace is this thread's new one.
        let rc = unsafe { libc::sethostname(hostname.as_ptr().cast(), hostname.len()) };
        if rc != 0 {
            return Err(PodNetError::Namespace {
                op: "sethostname",
                source: io::Error::last_os_error(),
            });
        }
    }
    for (kind, target) in targets {
        let source = CString::new(format!("/proc/thread-self/ns/{}", kind.file()))
            .expect("no NUL in a constant path");
        // SAFETY: NUL-terminated strings that live across the call; no data argument.
        let rc = unsafe {
            libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(PodNetError::Namespace {
                op: "bind mount of the namespace",
                source: io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

fn ns_dir(root: &Path, pod_uid: &str) -> PathBuf {
    root.join(pod_uid).join("ns")
}

fn cstring(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| PodNetError::Invalid {
        what: "path",
        value: path.display().to_string(),
        reason: "contains NUL",
    })
}

/// Whether `path` is a pinned namespace (a bind mount of an nsfs file).
fn is_nsfs(path: &Path) -> Result<bool> {
    let c = cstring(path)?;
    // SAFETY: a zeroed statfs is a valid out-buffer; `c` is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::NotFound {
            return Ok(false);
        }
        return Err(io_err("statfs", path)(e));
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between architectures
    Ok(st.f_type as i64 == NSFS_MAGIC)
}

/// Detaches every mount stacked on `path`; nothing mounted (or no file) is fine.
fn unmount_all(path: &Path) -> Result<()> {
    let c = cstring(path)?;
    // A bound on stacked mounts: create() mounts once per file; more than a few is a bug elsewhere,
    // and the loop must not spin if the kernel keeps answering success.
    for _ in 0..16 {
        // SAFETY: `c` is NUL-terminated; MNT_DETACH takes no other argument.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                // EINVAL: not a mount point (any more); ENOENT: no file.
                Some(libc::EINVAL) | Some(libc::ENOENT) => Ok(()),
                _ => Err(io_err("unmount", path)(e)),
            };
        }
    }
    Ok(())
}

fn remove_file_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_the_spec() {
        let dir = PathBuf::from("/r/uid/ns");
        let pod = PodNamespaces {
            uid: "uid".into(),
            dir: dir.clone(),
            spec: NamespaceSpec::pod("h"),
        };
        assert_eq!(
            pod.paths(),
            NamespacePaths {
                network: Some(dir.join("net")),
                ipc: Some(dir.join("ipc")),
                uts: Some(dir.join("uts")),
            }
        );
        let host = PodNamespaces {
            uid: "uid".into(),
            dir: dir.clone(),
            spec: NamespaceSpec {
                hostname: "h".into(),
                network: Sharing::Host,
                ipc: Sharing::Pod,
            },
        };
        assert_eq!(
            host.paths(),
            NamespacePaths {
                network: None,
                ipc: Some(dir.join("ipc")),
                uts: None
            }
        );
    }

    #[test]
    fn a_hostile_uid_names_no_path() {
        let root = Path::new("/nonexistent-root");
        for uid in ["../escape", "a/b", ".."] {
            assert!(matches!(
                PodNamespaces::create(root, uid, &NamespaceSpec::pod("h")),
                Err(PodNetError::Invalid { .. })
            ));
            assert!(matches!(
                PodNamespaces::open(root, uid),
                Err(PodNetError::Invalid { .. })
            ));
        }
    }
}
