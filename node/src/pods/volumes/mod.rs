//! Volumes, materialised before containers start, then preopened into each container that
//! mounts them (a WASI preopen is a directory, so every volume is one).
//!
//! Supported: emptyDir (disk, or `medium: Memory` on tmpfs sized by `sizeLimit`), configMap,
//! secret, downwardAPI, projected (serviceAccountToken, configMap, secret, downwardAPI sources:
//! the `kube-api-access-*` volume every API-created pod carries), hostPath (every `type`,
//! checked as the kubelet checks it: [`host_path`]) and persistentVolumeClaim bound to a
//! `local` or `hostPath` PersistentVolume. The directories live in
//! `<pod dir>/volumes/kubernetes.io~<kind>/<name>`, as the kubelet's do.
//!
//! configMap, secret, downwardAPI and projected content is written the kubelet's way
//! ([`atomic_writer`]: a timestamped directory behind a `..data` symlink swapped atomically),
//! and [`materialize`] is called again every `--sync-frequency` so a changed ConfigMap, Secret
//! or pod label reaches running pods; unchanged content is not rewritten. Secret, projected and
//! downwardAPI volumes sit on tmpfs where the host lets the agent mount ([`mount`]), as the
//! kubelet keeps them in memory. A service-account token is requested through the TokenRequest
//! API, bound to the pod, and refreshed at 80 % of its lifetime (at most every 24 h).
//!
//! [`mount::teardown`] unmounts and removes a pod's directory when the pod goes, and
//! [`mount::remove_orphans`] removes the directories of pods that are gone at start-up.

pub mod atomic_writer;
pub mod host_path;
pub mod mount;

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, DownwardAPIVolumeFile, KeyToPath, PersistentVolume, PersistentVolumeClaim, Pod,
    Secret, ServiceAccount, Volume, VolumeMount,
};
use k8s_openapi::chrono::Utc;
use kube::api::PostParams;
use kube::Api;
use tokio::time::Instant;
use tracing::info;

use super::beneath;
use atomic_writer::{FileProjection, Payload};
pub use mount::Medium;

/// A volume that could not be set up; the pod waits in ContainerCreating with a FailedMount event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("MountVolume.SetUp failed for volume \"{volume}\" : {reason}")]
pub struct VolumeError {
    pub volume: String,
    pub reason: String,
}

/// A volume ready to be mounted. Public for readers outside the worker (the eviction manager
/// measures emptyDir use against `size_limit`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Materialized {
    /// The directory preopened for the guest.
    pub host_path: PathBuf,
    /// configMap, secret, downwardAPI and projected volumes are always read-only; a PVC is when
    /// the pod's claim reference says so.
    pub read_only: bool,
    /// The kubelet's plugin name: `empty-dir`, `configmap`, `secret`, `downward-api`,
    /// `projected`, `host-path`, `persistentvolumeclaim`.
    pub kind: &'static str,
    /// Where the files are: on tmpfs (`Memory`) or on the root dir's filesystem.
    pub medium: Medium,
    /// An emptyDir's `sizeLimit` in bytes.
    pub size_limit: Option<u64>,
}

/// The result of setting up a pod's volumes; handed back to [`materialize`] on the next
/// resync, which keeps what is set up once (emptyDir, hostPath, PVC) and tokens still fresh.
#[derive(Debug, Default, Clone)]
pub struct PodVolumes {
    pub by_name: HashMap<String, Materialized>,
    /// When a token inside must be refreshed.
    pub refresh_in: Option<Duration>,
    tokens: HashMap<String, CachedToken>,
}

impl PodVolumes {
    pub fn get(&self, name: &str) -> Option<&Materialized> {
        self.by_name.get(name)
    }
}

#[derive(Debug, Clone)]
struct CachedToken {
    token: Vec<u8>,
    refresh_at: Instant,
}

/// Tokens are refreshed at this share of their lifetime.
const TOKEN_REFRESH_AT: f64 = 0.8;
/// ...and at least this often.
const TOKEN_REFRESH_MAX: Duration = Duration::from_secs(24 * 3600);
/// The kube-api-access default; the API server may extend it.
const DEFAULT_TOKEN_SECONDS: i64 = 3607;
/// The API server's default for defaultMode and an item's mode (0644).
const DEFAULT_MODE: u32 = 0o644;

/// Sets up every volume of the pod (under `pod_dir/volumes/` where it has a directory there).
/// `previous` is the last successful result, for a resync; `node_allocatable` (millicores,
/// bytes) sizes tmpfs volumes without a `sizeLimit` and answers resourceFieldRefs to limits a
/// container does not set.
pub async fn materialize(
    client: Option<&kube::Client>,
    pod: &Pod,
    pod_dir: &Path,
    previous: Option<&PodVolumes>,
    node_allocatable: (u64, u64),
) -> Result<PodVolumes, VolumeError> {
    let node_memory = node_allocatable.1;
    let mut out = PodVolumes::default();
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    for volume in pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .into_iter()
        .flatten()
    {
        let fail = |reason: String| VolumeError {
            volume: volume.name.clone(),
            reason,
        };
        let kind = kind_of(volume).ok_or_else(|| {
            fail(format!(
                "volume type {} is not supported by this node",
                type_name(volume)
            ))
        })?;
        check_paths(volume).map_err(fail)?;
        // Set up once: emptyDir, hostPath and PVC keep what the first setup made.
        if matches!(kind, "empty-dir" | "host-path" | "persistentvolumeclaim") {
            if let Some(done) = previous
                .and_then(|p| p.get(&volume.name))
                .filter(|m| m.kind == kind)
            {
                out.by_name.insert(volume.name.clone(), done.clone());
                continue;
            }
        }
        let dir = super::layout::volume_dir(pod_dir, kind, &volume.name);
        let materialized = match kind {
            "host-path" => {
                let hp = volume.host_path.as_ref().expect("kind_of checked it");
                host_path::check_type(&hp.path, hp.type_.as_deref()).map_err(fail)?;
                host_path::require_directory(&hp.path).map_err(fail)?;
                Materialized {
                    host_path: PathBuf::from(&hp.path),
                    read_only: false,
                    kind,
                    medium: Medium::Disk,
                    size_limit: None,
                }
            }
            "persistentvolumeclaim" => {
                let claim = volume
                    .persistent_volume_claim
                    .as_ref()
                    .expect("kind_of checked it");
                let path = claim_path(client, &namespace, &claim.claim_name)
                    .await
                    .map_err(fail)?;
                host_path::require_directory(&path).map_err(fail)?;
                Materialized {
                    host_path: PathBuf::from(path),
                    read_only: claim.read_only.unwrap_or(false),
                    kind,
                    medium: Medium::Disk,
                    size_limit: None,
                }
            }
            "empty-dir" => {
                let ed = volume.empty_dir.as_ref().expect("kind_of checked it");
                let size_limit = ed
                    .size_limit
                    .as_ref()
                    .map(|q| crate::quantity::bytes(&q.0))
                    .transpose()
                    .map_err(|e| fail(format!("sizeLimit: {e}")))?;
                create_dir(&dir).map_err(fail)?;
                let medium = match ed.medium.as_deref().unwrap_or("") {
                    "" => Medium::Disk,
                    "Memory" => {
                        on_tmpfs(&dir, size_limit.unwrap_or(node_memory), 0o777, &volume.name)
                    }
                    other => {
                        return Err(fail(format!(
                        "emptyDir medium {other:?} is not supported by this node (\"\" or Memory)"
                    )))
                    }
                };
                Materialized {
                    host_path: dir,
                    read_only: false,
                    kind,
                    medium,
                    size_limit,
                }
            }
            _ => {
                create_dir(&dir).map_err(fail)?;
                // As the kubelet: secrets, tokens and pod metadata in memory, configMaps on disk.
                let medium = match previous.and_then(|p| p.get(&volume.name)) {
                    Some(done) => done.medium,
                    None if kind == "configmap" => Medium::Disk,
                    None => on_tmpfs(&dir, node_memory, 0o755, &volume.name),
                };
                let (payload, tokens) = contents(
                    client,
                    pod,
                    volume,
                    previous.map(|p| &p.tokens),
                    node_allocatable,
                )
                .await
                .map_err(fail)?;
                out.tokens.extend(tokens);
                atomic_writer::write(&dir, &payload).map_err(fail)?;
                Materialized {
                    host_path: dir,
                    read_only: true,
                    kind,
                    medium,
                    size_limit: None,
                }
            }
        };
        out.by_name.insert(volume.name.clone(), materialized);
    }
    let now = Instant::now();
    out.refresh_in = out
        .tokens
        .values()
        .map(|t| t.refresh_at.saturating_duration_since(now))
        .min();
    Ok(out)
}

fn create_dir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))
}

/// Mounts a tmpfs on `dir`, or says once why the volume stays on disk.
fn on_tmpfs(dir: &Path, size: u64, mode: u32, volume: &str) -> Medium {
    match mount::mount_tmpfs(dir, size, mode) {
        Ok(()) => Medium::Memory,
        Err(e) => {
            info!(volume, error = %e, "tmpfs not available; the volume stays on disk");
            Medium::Disk
        }
    }
}

fn kind_of(v: &Volume) -> Option<&'static str> {
    if v.empty_dir.is_some() {
        Some("empty-dir")
    } else if v.config_map.is_some() {
        Some("configmap")
    } else if v.secret.is_some() {
        Some("secret")
    } else if v.downward_api.is_some() {
        Some("downward-api")
    } else if v.projected.is_some() {
        Some("projected")
    } else if v.host_path.is_some() {
        Some("host-path")
    } else if v.persistent_volume_claim.is_some() {
        Some("persistentvolumeclaim")
    } else {
        None
    }
}

/// Whether this node can materialise the volume (admission uses it).
pub fn supported(v: &Volume) -> bool {
    kind_of(v).is_some()
}

/// The volume's type as the API spells it (`nfs`, `csi`, `ephemeral`...), for messages.
pub fn type_name(v: &Volume) -> String {
    let value = serde_json::to_value(v).unwrap_or_default();
    value
        .as_object()
        .and_then(|o| o.keys().find(|k| *k != "name").cloned())
        .unwrap_or_else(|| "(none)".into())
}

/// Every item path of the volume, checked before anything is read: a path that escapes the
/// volume (or would hit `..data`) is refused with the kubelet's message.
fn check_paths(v: &Volume) -> Result<(), String> {
    let mut paths: Vec<&str> = Vec::new();
    fn items(items: &Option<Vec<KeyToPath>>) -> Vec<&str> {
        items.iter().flatten().map(|i| i.path.as_str()).collect()
    }
    if let Some(cm) = &v.config_map {
        paths.extend(items(&cm.items));
    }
    if let Some(s) = &v.secret {
        paths.extend(items(&s.items));
    }
    if let Some(d) = &v.downward_api {
        paths.extend(d.items.iter().flatten().map(|i| i.path.as_str()));
    }
    for source in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
        if let Some(cm) = &source.config_map {
            paths.extend(items(&cm.items));
        }
        if let Some(s) = &source.secret {
            paths.extend(items(&s.items));
        }
        if let Some(d) = &source.downward_api {
            paths.extend(d.items.iter().flatten().map(|i| i.path.as_str()));
        }
        if let Some(t) = &source.service_account_token {
            paths.push(t.path.as_str());
        }
        if source.cluster_trust_bundle.is_some() {
            return Err("projected source clusterTrustBundle is not supported: this node does not read certificates.k8s.io ClusterTrustBundles".into());
        }
    }
    paths.into_iter().try_for_each(atomic_writer::validate_path)
}

/// The mode bits of an API mode field (decimal in JSON, e.g. 420 = 0644).
fn mode(item: Option<i32>, default: Option<i32>) -> u32 {
    item.or(default)
        .map_or(DEFAULT_MODE, |m| (m as u32) & 0o7777)
}

/// The files of a configMap, secret, downwardAPI or projected volume, and the tokens in it.
async fn contents(
    client: Option<&kube::Client>,
    pod: &Pod,
    v: &Volume,
    cached: Option<&HashMap<String, CachedToken>>,
    node_allocatable: (u64, u64),
) -> Result<(Payload, Vec<(String, CachedToken)>), String> {
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let mut files = Payload::new();
    let mut tokens = Vec::new();
    if let Some(cm) = &v.config_map {
        if let Some(data) =
            config_map(client, &namespace, &cm.name, cm.optional.unwrap_or(false)).await?
        {
            project(
                &mut files,
                data,
                cm.items.as_deref(),
                cm.default_mode,
                cm.optional.unwrap_or(false),
                "configmap",
                &cm.name,
            )?;
        }
    }
    if let Some(s) = &v.secret {
        let name = s.secret_name.clone().unwrap_or_default();
        if let Some(data) = secret(client, &namespace, &name, s.optional.unwrap_or(false)).await? {
            project(
                &mut files,
                data,
                s.items.as_deref(),
                s.default_mode,
                s.optional.unwrap_or(false),
                "secret",
                &name,
            )?;
        }
    }
    if let Some(d) = &v.downward_api {
        downward(
            &mut files,
            pod,
            d.items.as_deref().unwrap_or_default(),
            d.default_mode,
            node_allocatable,
        )?;
    }
    if let Some(p) = &v.projected {
        let default_mode = p.default_mode;
        // The sources are independent API reads (a token request, the CA configmap): fetch them
        // at once, since pod start-up waits for the slowest.
        let sources = p.sources.iter().flatten().map(|source| async {
            let mut files = Payload::new();
            let mut token = None;
            if let Some(cm) = &source.config_map {
                if let Some(data) =
                    config_map(client, &namespace, &cm.name, cm.optional.unwrap_or(false)).await?
                {
                    project(
                        &mut files,
                        data,
                        cm.items.as_deref(),
                        default_mode,
                        cm.optional.unwrap_or(false),
                        "configmap",
                        &cm.name,
                    )?;
                }
            }
            if let Some(s) = &source.secret {
                if let Some(data) =
                    secret(client, &namespace, &s.name, s.optional.unwrap_or(false)).await?
                {
                    project(
                        &mut files,
                        data,
                        s.items.as_deref(),
                        default_mode,
                        s.optional.unwrap_or(false),
                        "secret",
                        &s.name,
                    )?;
                }
            }
            if let Some(d) = &source.downward_api {
                downward(
                    &mut files,
                    pod,
                    d.items.as_deref().unwrap_or_default(),
                    default_mode,
                    node_allocatable,
                )?;
            }
            if let Some(t) = &source.service_account_token {
                let key = format!("{}/{}", v.name, t.path);
                let fresh = cached
                    .and_then(|c| c.get(&key))
                    .filter(|c| c.refresh_at > Instant::now())
                    .cloned();
                let cached = match fresh {
                    Some(c) => c,
                    None => {
                        let client = client
                            .ok_or("no API server to request a service account token from")?;
                        let (token, lifetime) =
                            request_token(client, pod, t.audience.clone(), t.expiration_seconds)
                                .await?;
                        CachedToken {
                            token: token.into_bytes(),
                            refresh_at: Instant::now()
                                + lifetime.mul_f64(TOKEN_REFRESH_AT).min(TOKEN_REFRESH_MAX),
                        }
                    }
                };
                files.insert(
                    t.path.clone(),
                    FileProjection {
                        data: cached.token.clone(),
                        mode: mode(None, default_mode),
                    },
                );
                token = Some((key, cached));
            }
            Ok::<_, String>((files, token))
        });
        for result in futures::future::join_all(sources).await {
            let (source_files, token) = result?;
            files.extend(source_files);
            tokens.extend(token);
        }
    }
    Ok((files, tokens))
}

/// The host directory a volumeMount preopens: the volume, or its `subPath` /
/// `subPathExpr` (`$(VAR)` expanded from the container's env, as the kubelet does) inside it.
///
/// The guest owns the volume's inside, so the sub-directory is resolved and made beneath the
/// volume ([`beneath::create_dir_all`]: a symlink may lead elsewhere inside it, never out, and
/// nothing is created outside), then pinned: the directory opened is bind-mounted at
/// `pin_at` (the kubelet's `<pod dir>/volume-subpaths/<volume>/<container>/<index>`), so the
/// provider's later open of that path reaches the very directory checked, whatever the
/// guest renames meanwhile. Where the host refuses the mount (no CAP_SYS_ADMIN) the checked
/// directory's path is used. Errors carry the kubelet's wording, without host paths.
pub fn sub_path(
    volume: &Materialized,
    vm: &VolumeMount,
    env: &[(String, String)],
    container: &str,
    pin_at: &Path,
) -> Result<PathBuf, String> {
    let sub = match (
        vm.sub_path.as_deref().filter(|s| !s.is_empty()),
        vm.sub_path_expr.as_deref().filter(|s| !s.is_empty()),
    ) {
        (Some(sub), _) => sub.to_string(),
        (None, Some(expr)) => super::env::expand(expr, env),
        (None, None) => return Ok(volume.host_path.clone()),
    };
    let rel = Path::new(&sub);
    if rel.is_absolute() {
        return Err(format!(
            "error SubPath `{sub}` must not be an absolute path"
        ));
    }
    if rel.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!(
            "unable to provision SubPath `{sub}`: must not contain '..'"
        ));
    }
    let root = &volume.host_path;
    let prepare_failed = |e: &dyn std::fmt::Display| {
        // As the kubelet: the detail (host paths) goes to the log, not to the pod's status.
        tracing::warn!(volume_mount = %vm.name, container, sub_path = %sub, error = %e, "preparing a subPath");
        format!(
            "failed to prepare subPath for volumeMount \"{}\" of container \"{container}\"",
            vm.name
        )
    };
    let root_fd = beneath::open_root(root).map_err(|e| prepare_failed(&e))?;
    let dir = match beneath::open_at(
        &root_fd,
        root,
        rel,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY,
        0,
    ) {
        Ok(fd) => fd,
        Err(e) if e.is_not_found() && volume.read_only => {
            return Err(format!(
                "subPath {sub:?} of volumeMount {} does not exist in the read-only volume",
                vm.name
            ));
        }
        Err(e) if e.is_not_found() => {
            // The kubelet's SafeMakeDir, with the volume's own permission bits.
            let mode = rustix::fs::fstat(&root_fd)
                .map(|s| s.st_mode & 0o7777)
                .unwrap_or(0o755);
            beneath::create_dir_all(root, rel, mode).map_err(|e| {
                tracing::warn!(volume_mount = %vm.name, container, sub_path = %sub, error = %e, "creating a subPath");
                format!("failed to create subPath directory for volumeMount \"{}\" of container \"{container}\"", vm.name)
            })?
        }
        Err(beneath::Error::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOTDIR) => {
            return Err(format!("subPath {sub:?} of volumeMount {} is not a directory: WebAssembly guests get volumes as WASI preopened directories", vm.name));
        }
        Err(e) => return Err(prepare_failed(&e)),
    };
    if !beneath::is_dir(&dir) {
        return Err(format!("subPath {sub:?} of volumeMount {} is not a directory: WebAssembly guests get volumes as WASI preopened directories", vm.name));
    }
    match mount::bind_fd(&dir, pin_at) {
        Ok(()) => Ok(pin_at.to_path_buf()),
        Err(e) => {
            tracing::debug!(error = %e, "cannot pin the subPath with a bind mount; using the checked directory's path");
            std::fs::read_link(format!(
                "/proc/self/fd/{}",
                std::os::fd::AsRawFd::as_raw_fd(&dir)
            ))
            .map_err(|e| prepare_failed(&e))
        }
    }
}

/// The UIDs of the pods this node has at start-up: its static pods and the pods bound to it in
/// the API server. `None` (logged) when a source cannot be read: nothing may then be removed on
/// a guess.
pub async fn pods_to_keep(
    config: &crate::config::Config,
    client: Option<&kube::Client>,
) -> Option<std::collections::HashSet<String>> {
    let url = config
        .manifest_url
        .as_deref()
        .map(|u| (u, config.manifest_url_header.as_slice()));
    let Some(mut keep) = super::static_source::current_uids(
        config.pod_manifest_path.as_deref(),
        url,
        &config.node_name,
    )
    .await
    else {
        tracing::warn!(
            "a static pod source cannot be read; leaving orphaned pods alone until the next start"
        );
        return None;
    };
    if let Some(client) = client {
        let params =
            kube::api::ListParams::default().fields(&format!("spec.nodeName={}", config.node_name));
        match Api::<Pod>::all(client.clone()).list(&params).await {
            Ok(list) => keep.extend(list.items.into_iter().filter_map(|p| p.metadata.uid)),
            Err(e) => {
                tracing::warn!(error = %crate::config::one_line(&e), "listing this node's pods; leaving orphaned pods alone until the next start");
                return None;
            }
        }
    }
    Some(keep)
}

/// Start-up cleanup: removes the pod directories (unmounting their tmpfs) of pods that no
/// source holds any more, as the kubelet's HandlePodCleanups does once its sources are ready.
/// The sources are read once here, before any worker runs; when one cannot be read, nothing
/// is removed (a directory of a pod that still exists holds its emptyDir data).
pub async fn remove_orphaned_pod_dirs(
    config: &crate::config::Config,
    keep: &std::collections::HashSet<String>,
) {
    let pods_dir = super::layout::pods_dir(&config.root_dir);
    if !pods_dir.exists() {
        return;
    }
    for (uid, result) in mount::remove_orphans(&pods_dir, keep) {
        match result {
            Ok(()) => info!(%uid, "removed the directory of an orphaned pod"),
            Err(e) => tracing::warn!(%uid, error = %e, "removing the directory of an orphaned pod"),
        }
    }
}

/// The PersistentVolume path behind a claim: the claim must be Bound, and its volume a `local`
/// or `hostPath` one (the node can reach nothing else).
async fn claim_path(
    client: Option<&kube::Client>,
    ns: &str,
    claim: &str,
) -> Result<String, String> {
    let client = client.ok_or("no API server to read persistentvolumeclaims from")?;
    let pvc = match Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
        .get_opt(claim)
        .await
    {
        Ok(Some(pvc)) => pvc,
        Ok(None) => {
            return Err(format!(
                "error processing PVC {ns}/{claim}: persistentvolumeclaim \"{claim}\" not found"
            ))
        }
        Err(e) => {
            return Err(format!(
                "error processing PVC {ns}/{claim}: {}",
                crate::config::one_line(&e)
            ))
        }
    };
    let bound = pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
    let volume_name = pvc
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.clone())
        .filter(|n| !n.is_empty());
    let Some(volume_name) = volume_name.filter(|_| bound) else {
        return Err(format!(
            "error processing PVC {ns}/{claim}: PVC is not bound"
        ));
    };
    let pv = match Api::<PersistentVolume>::all(client.clone())
        .get_opt(&volume_name)
        .await
    {
        Ok(Some(pv)) => pv,
        Ok(None) => {
            return Err(format!(
                "error processing PVC {ns}/{claim}: persistentvolume \"{volume_name}\" not found"
            ))
        }
        Err(e) => {
            return Err(format!(
                "error processing PVC {ns}/{claim}: reading persistentvolume \"{volume_name}\": {}",
                crate::config::one_line(&e)
            ))
        }
    };
    let spec = pv.spec.unwrap_or_default();
    if let Some(local) = spec.local {
        return Ok(local.path);
    }
    if let Some(hp) = spec.host_path {
        host_path::check_type(&hp.path, hp.type_.as_deref())?;
        return Ok(hp.path);
    }
    Err(format!("persistentvolume \"{volume_name}\" is neither a local nor a hostPath volume, the only kinds this node can mount"))
}

/// A ConfigMap's data and binaryData; `Ok(None)` when it is missing and `optional`.
pub(super) async fn config_map(
    client: Option<&kube::Client>,
    ns: &str,
    name: &str,
    optional: bool,
) -> Result<Option<BTreeMap<String, Vec<u8>>>, String> {
    let client = client.ok_or("no API server to read configmaps from")?;
    match Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
    {
        Ok(Some(cm)) => {
            let mut data: BTreeMap<String, Vec<u8>> = cm
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect();
            data.extend(
                cm.binary_data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0)),
            );
            Ok(Some(data))
        }
        Ok(None) if optional => Ok(None),
        Ok(None) => Err(format!("configmap \"{name}\" not found")),
        Err(e) => Err(format!(
            "reading configmap \"{name}\": {}",
            crate::config::one_line(&e)
        )),
    }
}

/// A Secret's data and stringData; `Ok(None)` when it is missing and `optional`.
pub(super) async fn secret(
    client: Option<&kube::Client>,
    ns: &str,
    name: &str,
    optional: bool,
) -> Result<Option<BTreeMap<String, Vec<u8>>>, String> {
    let client = client.ok_or("no API server to read secrets from")?;
    match Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
    {
        Ok(Some(s)) => {
            let mut data: BTreeMap<String, Vec<u8>> = s
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect();
            data.extend(
                s.string_data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes())),
            );
            Ok(Some(data))
        }
        Ok(None) if optional => Ok(None),
        Ok(None) => Err(format!("secret \"{name}\" not found")),
        Err(e) => Err(format!(
            "reading secret \"{name}\": {}",
            crate::config::one_line(&e)
        )),
    }
}

/// Keys to files: every key, or only `items` (key -> path, with an optional mode).
fn project(
    files: &mut Payload,
    data: BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    default_mode: Option<i32>,
    optional: bool,
    kind: &str,
    name: &str,
) -> Result<(), String> {
    match items {
        None => files.extend(data.into_iter().map(|(k, data)| {
            (
                k,
                FileProjection {
                    data,
                    mode: mode(None, default_mode),
                },
            )
        })),
        Some(items) => {
            for item in items {
                match data.get(&item.key) {
                    Some(bytes) => {
                        files.insert(
                            item.path.clone(),
                            FileProjection {
                                data: bytes.clone(),
                                mode: mode(item.mode, default_mode),
                            },
                        );
                    }
                    None if optional => {}
                    None => {
                        return Err(format!(
                            "configured to use key {} of {kind} \"{name}\", which does not exist",
                            item.key
                        ))
                    }
                }
            }
        }
    }
    Ok(())
}

/// downwardAPI items: the pod's name, namespace, uid, labels and annotations (all of them, or
/// one with `metadata.labels['key']`), rendered as the kubelet renders them, and a container's
/// requests or limits (resourceFieldRef, as the env var of the same name computes it).
fn downward(
    files: &mut Payload,
    pod: &Pod,
    items: &[DownwardAPIVolumeFile],
    default_mode: Option<i32>,
    node_allocatable: (u64, u64),
) -> Result<(), String> {
    let m = &pod.metadata;
    let render_map = |map: &Option<BTreeMap<String, String>>| -> String {
        map.iter()
            .flatten()
            .map(|(k, v)| format!("{k}={v:?}\n"))
            .collect()
    };
    let one = |map: &Option<BTreeMap<String, String>>, key: &str| {
        map.as_ref()
            .and_then(|m| m.get(key))
            .cloned()
            .unwrap_or_default()
    };
    for item in items {
        if let Some(r) = &item.resource_field_ref {
            let name = r.container_name.as_deref().unwrap_or_default();
            let spec = pod.spec.as_ref();
            let container = spec
                .into_iter()
                .flat_map(|s| {
                    s.init_containers
                        .iter()
                        .flatten()
                        .chain(s.containers.iter())
                })
                .find(|c| c.name == name)
                .ok_or_else(|| {
                    format!(
                        "downwardAPI item {}: resourceFieldRef names unknown container {name:?}",
                        item.path
                    )
                })?;
            let sources = super::env::Sources {
                node_allocatable,
                ..Default::default()
            };
            let value = super::env::resource_value(
                container,
                &r.resource,
                r.divisor.as_ref().map(|q| q.0.as_str()),
                &sources,
            )
            .map_err(|e| format!("downwardAPI item {}: {}", item.path, e.0))?;
            files.insert(
                item.path.clone(),
                FileProjection {
                    data: value.into_bytes(),
                    mode: mode(item.mode, default_mode),
                },
            );
            continue;
        }
        let Some(field) = &item.field_ref else {
            return Err(format!(
                "downwardAPI item {}: neither fieldRef nor resourceFieldRef",
                item.path
            ));
        };
        let path = field.field_path.as_str();
        let subscript = |prefix: &str| {
            path.strip_prefix(prefix)
                .and_then(|r| r.strip_prefix("['"))
                .and_then(|r| r.strip_suffix("']"))
                .map(str::to_string)
        };
        let value = match path {
            "metadata.name" => m.name.clone().unwrap_or_default(),
            "metadata.namespace" => m.namespace.clone().unwrap_or_default(),
            "metadata.uid" => m.uid.clone().unwrap_or_default(),
            "metadata.labels" => render_map(&m.labels),
            "metadata.annotations" => render_map(&m.annotations),
            _ => match (
                subscript("metadata.labels"),
                subscript("metadata.annotations"),
            ) {
                (Some(key), _) => one(&m.labels, &key),
                (_, Some(key)) => one(&m.annotations, &key),
                _ => return Err(format!("downwardAPI fieldRef {path} is not supported")),
            },
        };
        files.insert(
            item.path.clone(),
            FileProjection {
                data: value.into_bytes(),
                mode: mode(item.mode, default_mode),
            },
        );
    }
    Ok(())
}

/// A token for the pod's service account, bound to the pod; returns it and its lifetime.
async fn request_token(
    client: &kube::Client,
    pod: &Pod,
    audience: Option<String>,
    seconds: Option<i64>,
) -> Result<(String, Duration), String> {
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: audience.into_iter().filter(|a| !a.is_empty()).collect(),
            expiration_seconds: Some(seconds.unwrap_or(DEFAULT_TOKEN_SECONDS)),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    };
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &namespace);
    let response = api
        .create_token_request(&account, &PostParams::default(), &request)
        .await
        .map_err(|e| {
            format!(
                "requesting a token for service account \"{account}\": {}",
                crate::config::one_line(&e)
            )
        })?;
    let status = response
        .status
        .ok_or("the TokenRequest came back without a token")?;
    let lifetime = (status.expiration_timestamp.0 - Utc::now())
        .to_std()
        .unwrap_or(Duration::from_secs(60));
    Ok((status.token, lifetime))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(volumes: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u", "labels": {"app": "x"}},
            "spec": {"containers": [{"name": "c", "image": "i"}], "volumes": volumes}
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn empty_dir_and_downward_api_are_written_without_an_api_server() {
        let dir = std::env::temp_dir().join(format!("wk-volumes-{}", std::process::id()));
        let pod = pod(serde_json::json!([
            {"name": "scratch", "emptyDir": {}},
            {"name": "info", "downwardAPI": {"items": [
                {"path": "name", "fieldRef": {"fieldPath": "metadata.name"}},
                {"path": "meta/labels", "fieldRef": {"fieldPath": "metadata.labels"}}
            ]}}
        ]));
        let v = materialize(None, &pod, &dir, None, (1000, 1 << 20))
            .await
            .unwrap();
        assert!(!v.by_name["scratch"].read_only);
        let info = &v.by_name["info"];
        assert!(info.read_only);
        assert_eq!(
            std::fs::read_to_string(info.host_path.join("name")).unwrap(),
            "p"
        );
        assert_eq!(
            std::fs::read_to_string(info.host_path.join("meta/labels")).unwrap(),
            "app=\"x\"\n"
        );
        assert!(std::fs::symlink_metadata(info.host_path.join("name"))
            .unwrap()
            .file_type()
            .is_symlink());
        // A label change reaches the file on the next resync; the rest is kept.
        let mut changed = pod.clone();
        changed.metadata.labels = Some([("app".to_string(), "y".to_string())].into());
        let again = materialize(None, &changed, &dir, Some(&v), (1000, 1 << 20))
            .await
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(again.by_name["info"].host_path.join("meta/labels")).unwrap(),
            "app=\"y\"\n"
        );
        mount::teardown(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_configmap_volume_without_an_api_server_is_a_named_error() {
        let dir = std::env::temp_dir().join(format!("wk-volumes-cm-{}", std::process::id()));
        let pod = pod(serde_json::json!([{"name": "cfg", "configMap": {"name": "settings"}}]));
        let e = materialize(None, &pod, &dir, None, (1000, 1 << 20))
            .await
            .unwrap_err();
        assert_eq!(e.volume, "cfg");
        assert!(e
            .to_string()
            .starts_with("MountVolume.SetUp failed for volume \"cfg\""));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn item_paths_that_escape_the_volume_are_refused_before_anything_is_read() {
        let dir = std::env::temp_dir().join(format!("wk-volumes-esc-{}", std::process::id()));
        let pod = pod(
            serde_json::json!([{"name": "cfg", "configMap": {"name": "settings", "items": [{"key": "k", "path": "../escape"}]}}]),
        );
        let e = materialize(None, &pod, &dir, None, (1000, 1 << 20))
            .await
            .unwrap_err();
        assert_eq!(e.reason, "invalid path: must not contain '..': ../escape");
        let pod = self::pod(
            serde_json::json!([{"name": "info", "downwardAPI": {"items": [{"path": "/abs", "fieldRef": {"fieldPath": "metadata.name"}}]}}]),
        );
        assert!(materialize(None, &pod, &dir, None, (1000, 1 << 20))
            .await
            .unwrap_err()
            .reason
            .contains("must be relative path"));
        let pod = self::pod(
            serde_json::json!([{"name": "ctb", "projected": {"sources": [{"clusterTrustBundle": {"signerName": "example.com/x", "path": "ca.pem"}}]}}]),
        );
        assert!(materialize(None, &pod, &dir, None, (1000, 1 << 20))
            .await
            .unwrap_err()
            .reason
            .contains("clusterTrustBundle is not supported"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn host_path_types_and_unsupported_volumes_are_named() {
        let dir = std::env::temp_dir().join(format!("wk-volumes-hp-{}", std::process::id()));
        let pod = pod(
            serde_json::json!([{"name": "h", "hostPath": {"path": "/does/not/exist", "type": "Directory"}}]),
        );
        let e = materialize(None, &pod, &dir, None, (1000, 1 << 20))
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "MountVolume.SetUp failed for volume \"h\" : hostPath type check failed: /does/not/exist is not a directory");
        let nfs: Volume = serde_json::from_value(
            serde_json::json!({"name": "n", "nfs": {"server": "s", "path": "/"}}),
        )
        .unwrap();
        assert!(!supported(&nfs));
        assert_eq!(type_name(&nfs), "nfs");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn downward_api_resource_fields_follow_the_env_var_rules() {
        let dir = std::env::temp_dir().join(format!("wk-volumes-res-{}", std::process::id()));
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u"},
            "spec": {
                "containers": [{"name": "c", "image": "i", "resources": {"limits": {"memory": "64Mi"}, "requests": {"cpu": "250m"}}}],
                "volumes": [{"name": "res", "downwardAPI": {"items": [
                    {"path": "mem", "resourceFieldRef": {"containerName": "c", "resource": "limits.memory", "divisor": "1Mi"}},
                    {"path": "cpu", "resourceFieldRef": {"containerName": "c", "resource": "requests.cpu", "divisor": "1m"}},
                    {"path": "cpu-limit", "resourceFieldRef": {"containerName": "c", "resource": "limits.cpu"}},
                ]}}]
            }
        }))
        .unwrap();
        let v = materialize(None, &pod, &dir, None, (2000, 1 << 30))
            .await
            .unwrap();
        let read = |f: &str| std::fs::read_to_string(v.by_name["res"].host_path.join(f)).unwrap();
        assert_eq!(read("mem"), "64");
        assert_eq!(read("cpu"), "250");
        assert_eq!(
            read("cpu-limit"),
            "2",
            "no limit: node allocatable, in cores rounded up"
        );
        mount::teardown(&dir).unwrap();
    }

    #[test]
    fn sub_path_expr_expands_and_escapes_are_refused() {
        let base = std::env::temp_dir().join(format!("wk-volumes-sub-{}", std::process::id()));
        let _ = mount::teardown(&base);
        let root = base.join("vol");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(base.join("host")).unwrap();
        let volume = Materialized {
            host_path: root.clone(),
            read_only: false,
            kind: "empty-dir",
            medium: Medium::Disk,
            size_limit: None,
        };
        let vm = |sub: Option<&str>, expr: Option<&str>| VolumeMount {
            name: "v".into(),
            mount_path: "/m".into(),
            sub_path: sub.map(Into::into),
            sub_path_expr: expr.map(Into::into),
            ..Default::default()
        };
        let env = vec![("POD".to_string(), "web-0".to_string())];
        let pin = base.join("volume-subpaths/v/c/0");
        let made = sub_path(&volume, &vm(None, Some("logs/$(POD)")), &env, "c", &pin).unwrap();
        assert!(root.join("logs/web-0").is_dir(), "created");
        std::fs::write(root.join("logs/web-0/probe"), "x").unwrap();
        assert!(
            made.join("probe").exists(),
            "the path handed out is the subPath: {}",
            made.display()
        );
        assert_eq!(
            sub_path(&volume, &vm(Some("../up"), None), &env, "c", &pin).unwrap_err(),
            "unable to provision SubPath `../up`: must not contain '..'"
        );
        assert_eq!(
            sub_path(&volume, &vm(None, Some("/abs")), &env, "c", &pin).unwrap_err(),
            "error SubPath `/abs` must not be an absolute path"
        );
        // A symlink the guest made cannot take a later container outside the volume, nor make
        // the agent create anything outside it.
        std::os::unix::fs::symlink(base.join("host"), root.join("out")).unwrap();
        std::os::unix::fs::symlink("../host", root.join("rel")).unwrap();
        assert_eq!(
            sub_path(&volume, &vm(Some("out"), None), &env, "c", &pin).unwrap_err(),
            "failed to prepare subPath for volumeMount \"v\" of container \"c\""
        );
        assert!(
            sub_path(&volume, &vm(Some("rel/made"), None), &env, "c", &pin)
                .unwrap_err()
                .starts_with("failed to")
        );
        assert!(sub_path(&volume, &vm(Some("out/made"), None), &env, "c", &pin).is_err());
        assert_eq!(
            std::fs::read_dir(base.join("host")).unwrap().count(),
            0,
            "nothing made outside the volume"
        );
        std::fs::write(root.join("file"), "x").unwrap();
        assert!(sub_path(&volume, &vm(Some("file"), None), &env, "c", &pin)
            .unwrap_err()
            .contains("not a directory"));
        mount::teardown(&base).unwrap();
    }

    #[tokio::test]
    async fn a_resync_reuses_a_fresh_token_and_requests_a_stale_one() {
        let dir = std::env::temp_dir().join(format!("wk-volumes-tok-{}", std::process::id()));
        let pod = pod(
            serde_json::json!([{"name": "api", "projected": {"defaultMode": 0o420, "sources": [{"serviceAccountToken": {"path": "token"}}]}}]),
        );
        let mut previous = PodVolumes::default();
        previous.tokens.insert(
            "api/token".into(),
            CachedToken {
                token: b"cached-jwt".to_vec(),
                refresh_at: Instant::now() + Duration::from_secs(600),
            },
        );
        // No API server: only the cached token can fill the volume.
        let v = materialize(None, &pod, &dir, Some(&previous), (1000, 1 << 20))
            .await
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(v.by_name["api"].host_path.join("token")).unwrap(),
            "cached-jwt"
        );
        let left = v.refresh_in.expect("a refresh is due");
        assert!(
            left <= Duration::from_secs(600) && left > Duration::from_secs(500),
            "{left:?}"
        );
        // Past its refresh point it is requested again (and here, without an API server, fails).
        previous.tokens.insert(
            "api/token".into(),
            CachedToken {
                token: b"cached-jwt".to_vec(),
                refresh_at: Instant::now(),
            },
        );
        let e = materialize(None, &pod, &dir, Some(&previous), (1000, 1 << 20))
            .await
            .unwrap_err();
        assert!(
            e.reason
                .contains("no API server to request a service account token"),
            "{e}"
        );
        mount::teardown(&dir).unwrap();
    }

    #[test]
    fn modes_default_to_0644_and_items_override() {
        assert_eq!(mode(None, None), 0o644);
        assert_eq!(mode(None, Some(0o400)), 0o400);
        assert_eq!(mode(Some(0o600), Some(0o400)), 0o600);
    }
}
