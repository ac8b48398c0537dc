//! Static pods: the file source (`--pod-manifest-path`, rescanned every
//! `--file-check-frequency`), the URL source (`--manifest-url`, fetched every
//! `--http-check-frequency`), and [`merge`], which joins them with the API-server source into
//! the one desired set the pod manager sees.
//!
//! ```text
//! watch_dir ──StaticSet("file")──┐
//! watch_url ──StaticSet("http")──┼──> merge ──PodChange──> manager
//! source::watch_pods ─PodChange──┘      └── mirror pods ──> mirror::run (creates/deletes them)
//! ```
//!
//! A static pod is named and annotated as the kubelet does (`pkg/kubelet/config/common.go`):
//! `<name>-<node>`, namespace `default` when unset, `spec.nodeName` = this node, a UID hashed
//! from the defaulted pod and its source (a changed file is a new pod), the
//! `kubernetes.io/config.{source,hash,seen}` annotations and a NoExecute toleration. Each
//! source sends its whole set after every scan that changed it; a manifest that cannot be read
//! or parsed keeps that file's (or URL's) last good pods and is logged once per change.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ObjectReference, Pod, PodStatus, Toleration};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::source::PodChange;
use super::status::{PodKey, StatusSender, StatusUpdate};
use crate::events::EventSink;

pub const ANNOTATION_SOURCE: &str = "kubernetes.io/config.source";
pub const ANNOTATION_HASH: &str = "kubernetes.io/config.hash";
pub const ANNOTATION_SEEN: &str = "kubernetes.io/config.seen";
pub const ANNOTATION_MIRROR: &str = "kubernetes.io/config.mirror";

/// How long one fetch of `--manifest-url` may take before it counts as unreachable.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// A manifest larger than this is refused (the kubelet reads whatever it is given; a bound
/// keeps a wrong URL from filling memory).
const MAX_MANIFEST_BYTES: usize = 10 * 1024 * 1024;

/// Why a manifest gave no pods. Not retryable until the manifest changes.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("not valid YAML or JSON: {0}")]
    Syntax(String),
    #[error("kind {0:?}: a static pod manifest holds a Pod or a List of Pods")]
    Kind(String),
    #[error("not a valid Pod: {0}")]
    Decode(String),
    #[error("pod {pod:?}: {reason}")]
    Invalid { pod: String, reason: String },
    #[error("no pods in the manifest")]
    Empty,
}

/// Where a static pod came from: part of its UID, and its `config.source` annotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    File(PathBuf),
    Url(String),
}

impl Origin {
    fn source_name(&self) -> &'static str {
        match self {
            Origin::File(_) => "file",
            Origin::Url(_) => "http",
        }
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::File(p) => write!(f, "{}", p.display()),
            Origin::Url(u) => f.write_str(u),
        }
    }
}

/// Parses a manifest: one pod, a `kind: List` (or `PodList`), or several YAML documents; JSON
/// is YAML too. Every pod is checked, defaulted and named for `node`; any error rejects the
/// whole manifest (its last good state is kept by the caller).
pub fn parse_manifest(text: &str, origin: &Origin, node: &str) -> Result<Vec<Pod>, ManifestError> {
    use serde::Deserialize;
    let mut pods = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let value = serde_yaml::Value::deserialize(document)
            .map_err(|e| ManifestError::Syntax(one_line(&e)))?;
        if value.is_null() {
            continue; // an empty document (`---` at the end)
        }
        let value: serde_json::Value =
            serde_json::to_value(value).map_err(|e| ManifestError::Syntax(one_line(&e)))?;
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or_default()
            .to_string();
        match kind.as_str() {
            "Pod" => pods.push(decode_pod(value)?),
            "List" | "PodList" => {
                for item in value
                    .get("items")
                    .and_then(|i| i.as_array())
                    .into_iter()
                    .flatten()
                {
                    let item_kind = item.get("kind").and_then(|k| k.as_str()).unwrap_or("Pod");
                    if item_kind != "Pod" {
                        return Err(ManifestError::Kind(item_kind.to_string()));
                    }
                    pods.push(decode_pod(item.clone())?);
                }
            }
            _ => return Err(ManifestError::Kind(kind)),
        }
    }
    if pods.is_empty() {
        return Err(ManifestError::Empty);
    }
    let mut names = HashSet::new();
    for pod in &mut pods {
        validate(pod)?;
        apply_defaults(pod, origin, node);
        let key = (pod.metadata.namespace.clone(), pod.metadata.name.clone());
        if !names.insert(key) {
            return Err(ManifestError::Invalid {
                pod: pod.metadata.name.clone().unwrap_or_default(),
                reason: "defined twice in the manifest".into(),
            });
        }
    }
    Ok(pods)
}

fn decode_pod(mut value: serde_json::Value) -> Result<Pod, ManifestError> {
    if let Some(api_version) = value.get("apiVersion").and_then(|v| v.as_str()) {
        if api_version != "v1" {
            return Err(ManifestError::Decode(format!(
                "apiVersion {api_version:?}: static pods are v1"
            )));
        }
    }
    // Decoding fills apiVersion/kind back in; a list item may leave them out.
    if let Some(object) = value.as_object_mut() {
        object.insert("apiVersion".into(), "v1".into());
        object.insert("kind".into(), "Pod".into());
    }
    serde_json::from_value(value).map_err(|e| ManifestError::Decode(one_line(&e)))
}

/// What the API server's validation would refuse and the worker cannot run.
fn validate(pod: &Pod) -> Result<(), ManifestError> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let invalid = |reason: String| ManifestError::Invalid {
        pod: name.clone(),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("metadata.name is required".into()));
    }
    if !is_dns_subdomain(&name) {
        return Err(invalid(
            "metadata.name must be a lowercase RFC 1123 subdomain".into(),
        ));
    }
    if let Some(ns) = &pod.metadata.namespace {
        if !ns.is_empty() && !is_dns_subdomain(ns) {
            return Err(invalid(format!(
                "metadata.namespace {ns:?} is not a valid name"
            )));
        }
    }
    let Some(spec) = &pod.spec else {
        return Err(invalid("spec is required".into()));
    };
    if spec.containers.is_empty() {
        return Err(invalid("spec.containers must not be empty".into()));
    }
    let mut seen = HashSet::new();
    for c in spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
    {
        if c.name.is_empty() {
            return Err(invalid("every container needs a name".into()));
        }
        if !seen.insert(c.name.as_str()) {
            return Err(invalid(format!(
                "container name {:?} is used twice",
                c.name
            )));
        }
        if c.image.as_deref().unwrap_or_default().is_empty() {
            return Err(invalid(format!("container {:?} has no image", c.name)));
        }
    }
    if let Some(policy) = spec.restart_policy.as_deref() {
        if !matches!(policy, "Always" | "OnFailure" | "Never") {
            return Err(invalid(format!(
                "restartPolicy {policy:?} is not Always, OnFailure or Never"
            )));
        }
    }
    validate_names_and_paths(spec).map_err(invalid)
}

/// The API server's checks on every name and path the agent turns into a host path (a
/// container's log and termination directories, a volume's directory, a subPath), so a static
/// pod is refused before anything touches the disk: container and volume names are unique DNS
/// labels, every volumeMount names a volume, mountPath is absolute without `..`, subPath and
/// subPathExpr are relative without `..` (validateLocalDescendingPath), a hostPath has no `..`
/// (validatePathNoBacksteps), terminationMessagePath is absolute.
pub fn validate_names_and_paths(spec: &k8s_openapi::api::core::v1::PodSpec) -> Result<(), String> {
    let mut volumes = HashSet::new();
    for v in spec.volumes.iter().flatten() {
        if !is_dns_label(&v.name) {
            return Err(format!(
                "volume name {:?} must be a lowercase RFC 1123 label",
                v.name
            ));
        }
        if !volumes.insert(v.name.as_str()) {
            return Err(format!("volume name {:?} is used twice", v.name));
        }
        if let Some(hp) = &v.host_path {
            if has_backstep(&hp.path) {
                return Err(format!(
                    "volume {:?}: hostPath.path {:?} must not contain '..'",
                    v.name, hp.path
                ));
            }
        }
    }
    for c in spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
    {
        if !is_dns_label(&c.name) {
            return Err(format!(
                "container name {:?} must be a lowercase RFC 1123 label",
                c.name
            ));
        }
        if let Some(path) = c.termination_message_path.as_deref() {
            if !path.starts_with('/') {
                return Err(format!(
                    "container {:?}: terminationMessagePath {path:?} must be an absolute path",
                    c.name
                ));
            }
        }
        let mut mount_paths = HashSet::new();
        for vm in c.volume_mounts.iter().flatten() {
            let at = || format!("container {:?}, volumeMount {:?}", c.name, vm.name);
            if !volumes.contains(vm.name.as_str()) {
                return Err(format!("{}: no volume of that name", at()));
            }
            if !vm.mount_path.starts_with('/') || has_backstep(&vm.mount_path) {
                return Err(format!(
                    "{}: mountPath {:?} must be an absolute path without '..'",
                    at(),
                    vm.mount_path
                ));
            }
            if !mount_paths.insert(vm.mount_path.as_str()) {
                return Err(format!(
                    "{}: mountPath {:?} must be unique",
                    at(),
                    vm.mount_path
                ));
            }
            let sub = vm.sub_path.as_deref().filter(|s| !s.is_empty());
            let expr = vm.sub_path_expr.as_deref().filter(|s| !s.is_empty());
            if sub.is_some() && expr.is_some() {
                return Err(format!(
                    "{}: subPathExpr and subPath are mutually exclusive",
                    at()
                ));
            }
            for (field, path) in [("subPath", sub), ("subPathExpr", expr)] {
                if let Some(path) = path {
                    if path.starts_with('/') || has_backstep(path) {
                        return Err(format!(
                            "{}: {field} {path:?} must be a relative path without '..'",
                            at()
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Whether a `/`-separated path has a `..` element.
fn has_backstep(path: &str) -> bool {
    path.split('/').any(|p| p == "..")
}

/// An RFC 1123 label: at most 63 lowercase alphanumerics or '-', starting and ending alphanumeric.
fn is_dns_label(s: &str) -> bool {
    s.len() <= 63 && !s.contains('.') && is_dns_subdomain(s)
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// The kubelet's treatment of a decoded static pod: the API scheme's defaults first (the
/// ones the worker reads), then the UID hashed from the pod and its source, then name,
/// namespace, node, annotations and the NoExecute toleration.
pub fn apply_defaults(pod: &mut Pod, origin: &Origin, node: &str) {
    let spec = pod.spec.get_or_insert_with(Default::default);
    spec.restart_policy.get_or_insert_with(|| "Always".into());
    // The API server's default grace period.
    spec.termination_grace_period_seconds.get_or_insert(30);
    spec.dns_policy.get_or_insert_with(|| "ClusterFirst".into());
    spec.scheduler_name
        .get_or_insert_with(|| "default-scheduler".into());
    spec.security_context.get_or_insert_with(Default::default);
    spec.enable_service_links.get_or_insert(true);
    for c in spec
        .init_containers
        .iter_mut()
        .flatten()
        .chain(spec.containers.iter_mut())
    {
        c.termination_message_path
            .get_or_insert_with(|| "/dev/termination-log".into());
        c.termination_message_policy
            .get_or_insert_with(|| "File".into());
        let policy = default_pull_policy(c.image.as_deref().unwrap_or_default());
        c.image_pull_policy.get_or_insert_with(|| policy.into());
        for port in c.ports.iter_mut().flatten() {
            port.protocol.get_or_insert_with(|| "TCP".into());
        }
    }

    if pod.metadata.uid.as_deref().unwrap_or_default().is_empty() {
        pod.metadata.uid = Some(static_uid(pod, origin, node));
    }
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    pod.metadata.name = Some(format!("{name}-{node}"));
    if pod
        .metadata
        .namespace
        .as_deref()
        .unwrap_or_default()
        .is_empty()
    {
        pod.metadata.namespace = Some("default".into());
    }
    let spec = pod.spec.get_or_insert_with(Default::default);
    spec.node_name = Some(node.to_string());
    let annotations = pod.metadata.annotations.get_or_insert_with(BTreeMap::new);
    annotations.insert(ANNOTATION_HASH.into(), uid);
    annotations.insert(ANNOTATION_SOURCE.into(), origin.source_name().into());
    // Static pods are not evicted for node problems (the kubelet adds this toleration).
    let tolerations = spec.tolerations.get_or_insert_with(Vec::new);
    let no_execute = Toleration {
        operator: Some("Exists".into()),
        effect: Some("NoExecute".into()),
        ..Default::default()
    };
    if !tolerations.iter().any(|t| {
        t.key.is_none()
            && t.operator.as_deref() == Some("Exists")
            && t.effect.as_deref() == Some("NoExecute")
    }) {
        tolerations.push(no_execute);
    }
    pod.status = None;
}

/// The kubelet's image pull policy default: `Always` for `:latest` or no tag, else
/// `IfNotPresent` (a digest counts as a tag).
fn default_pull_policy(image: &str) -> &'static str {
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') || last.split_once(':').is_some_and(|(_, tag)| tag != "latest") {
        "IfNotPresent"
    } else {
        "Always"
    }
}

/// A UID from the defaulted pod and where it came from, as the kubelet hashes them (it uses
/// MD5 over the Go object; this is SHA-256 over the JSON, cut to the same 32 hex digits).
pub fn static_uid(pod: &Pod, origin: &Origin, node: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(serde_json::to_vec(pod).unwrap_or_default());
    match origin {
        Origin::File(path) => {
            hasher.update(format!("host:{node}"));
            hasher.update(format!("file:{}", path.display()));
        }
        Origin::Url(url) => hasher.update(format!("url:{url}")),
    }
    hasher.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One source's whole set of static pods after a scan.
#[derive(Debug, Clone)]
pub struct StaticSet {
    pub source: &'static str,
    pub pods: Vec<Arc<Pod>>,
}

/// Logs a problem once while it lasts: the same message is not repeated on every rescan.
#[derive(Default)]
struct Complaints {
    current: HashSet<String>,
    this_scan: HashSet<String>,
}

impl Complaints {
    fn warn(&mut self, events: &EventSink, node: &str, message: String) {
        if !self.current.contains(&message) {
            warn!("{message}");
            let node_ref = ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(node.to_string()),
                uid: Some(node.to_string()),
                ..Default::default()
            };
            events.warning(&node_ref, "FailedStaticPod", message.clone());
        }
        self.this_scan.insert(message);
    }
    fn end_scan(&mut self) {
        self.current = std::mem::take(&mut self.this_scan);
    }
}

/// A file's last content and the pods it last gave successfully.
struct FileState {
    content: Vec<u8>,
    good: Vec<Arc<Pod>>,
    error: Option<String>,
}

/// Rescans `path` (a directory of manifests, or one manifest file) every `every` and sends
/// the set whenever it changed (and once after the first scan, even when empty).
pub async fn watch_dir(
    path: PathBuf,
    node: String,
    every: Duration,
    events: EventSink,
    tx: mpsc::UnboundedSender<StaticSet>,
    shutdown: CancellationToken,
) {
    let mut files: BTreeMap<PathBuf, FileState> = BTreeMap::new();
    let mut complaints = Complaints::default();
    let mut last_sent: Option<Vec<Arc<Pod>>> = None;
    loop {
        let pods = scan_dir(&path, &node, &events, &mut files, &mut complaints);
        complaints.end_scan();
        if let Some(pods) = pods {
            if last_sent.as_ref() != Some(&pods) {
                last_sent = Some(pods.clone());
                if tx
                    .send(StaticSet {
                        source: "file",
                        pods,
                    })
                    .is_err()
                {
                    return;
                }
            }
        } else if last_sent.is_none() {
            // The first scan failed: say that the source has nothing (yet).
            last_sent = Some(Vec::new());
            let _ = tx.send(StaticSet {
                source: "file",
                pods: Vec::new(),
            });
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// One scan. `None` when the directory itself cannot be read (the last set stays).
fn scan_dir(
    path: &Path,
    node: &str,
    events: &EventSink,
    files: &mut BTreeMap<PathBuf, FileState>,
    complaints: &mut Complaints,
) -> Option<Vec<Arc<Pod>>> {
    let listed: Vec<PathBuf> = match std::fs::metadata(path) {
        Ok(m) if m.is_file() => vec![path.to_path_buf()],
        Ok(_) => match std::fs::read_dir(path) {
            Ok(entries) => {
                let mut v: Vec<PathBuf> = entries
                    .filter_map(Result::ok)
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_file() || t.is_symlink()))
                    .map(|e| e.path())
                    .collect();
                v.sort();
                v
            }
            Err(e) => {
                complaints.warn(
                    events,
                    node,
                    format!(
                        "static pod path {}: cannot list it: {e}; keeping the last good set",
                        path.display()
                    ),
                );
                return None;
            }
        },
        Err(e) => {
            complaints.warn(
                events,
                node,
                format!(
                    "static pod path {}: {e}; keeping the last good set",
                    path.display()
                ),
            );
            return None;
        }
    };
    files.retain(|p, _| listed.contains(p));
    for file in &listed {
        let content = match std::fs::read(file) {
            Ok(c) => c,
            Err(e) => {
                // Keep what the file gave before (it may be mid-replace).
                complaints.warn(
                    events,
                    node,
                    format!(
                        "static pod manifest {}: cannot read it: {e}; keeping its last good pods",
                        file.display()
                    ),
                );
                continue;
            }
        };
        if let Some(state) = files.get(file) {
            if state.content == content {
                if let Some(error) = &state.error {
                    complaints.warn(events, node, error.clone());
                }
                continue;
            }
        }
        let origin = Origin::File(file.clone());
        let text = String::from_utf8_lossy(&content);
        let previous = files.remove(file).map(|s| s.good).unwrap_or_default();
        let state = match parse_manifest(&text, &origin, node) {
            Ok(pods) => {
                let pods = stamp_seen(pods, &previous);
                FileState {
                    content,
                    good: pods,
                    error: None,
                }
            }
            Err(e) => {
                let message = format!(
                    "static pod manifest {}: {e}; keeping its last good pods ({})",
                    file.display(),
                    previous.len()
                );
                complaints.warn(events, node, message.clone());
                FileState {
                    content,
                    good: previous,
                    error: Some(message),
                }
            }
        };
        files.insert(file.clone(), state);
    }
    let mut names: HashMap<(String, String), &Path> = HashMap::new();
    let mut pods = Vec::new();
    for (file, state) in files.iter() {
        for pod in &state.good {
            let key = (
                pod.metadata.namespace.clone().unwrap_or_default(),
                pod.metadata.name.clone().unwrap_or_default(),
            );
            if let Some(first) = names.get(&key) {
                complaints.warn(
                    events,
                    node,
                    format!("static pod manifest {}: pod {}/{} is already defined by {}; ignoring this one", file.display(), key.0, key.1, first.display()),
                );
                continue;
            }
            names.insert(key, file);
            pods.push(pod.clone());
        }
    }
    Some(pods)
}

/// Fetches `url` every `every` and sends its set whenever it changed. An unreachable URL or a
/// bad manifest keeps the last good set.
pub async fn watch_url(
    url: String,
    headers: Vec<(String, String)>,
    node: String,
    every: Duration,
    events: EventSink,
    tx: mpsc::UnboundedSender<StaticSet>,
    shutdown: CancellationToken,
) {
    let mut complaints = Complaints::default();
    let mut last_body: Option<Vec<u8>> = None;
    let mut last_sent: Option<Vec<Arc<Pod>>> = None;
    loop {
        let fetched = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = tokio::time::timeout(HTTP_TIMEOUT, http_get(&url, &headers)) => r.unwrap_or_else(|_| Err(format!("no answer within {HTTP_TIMEOUT:?}"))),
        };
        match fetched {
            Err(e) => {
                complaints.warn(
                    &events,
                    &node,
                    format!("manifest URL {url}: {e}; keeping the last good set"),
                );
                if last_sent.is_none() {
                    last_sent = Some(Vec::new());
                    let _ = tx.send(StaticSet {
                        source: "http",
                        pods: Vec::new(),
                    });
                }
            }
            Ok(body) if last_body.as_ref() == Some(&body) => {}
            Ok(body) => {
                let origin = Origin::Url(url.clone());
                match parse_manifest(&String::from_utf8_lossy(&body), &origin, &node) {
                    Ok(pods) => {
                        let pods = stamp_seen(pods, last_sent.as_deref().unwrap_or_default());
                        last_body = Some(body);
                        last_sent = Some(pods.clone());
                        if tx
                            .send(StaticSet {
                                source: "http",
                                pods,
                            })
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(e) => {
                        complaints.warn(
                            &events,
                            &node,
                            format!("manifest URL {url}: {e}; keeping the last good set"),
                        );
                        if last_sent.is_none() {
                            last_sent = Some(Vec::new());
                            let _ = tx.send(StaticSet {
                                source: "http",
                                pods: Vec::new(),
                            });
                        }
                    }
                }
            }
        }
        complaints.end_scan();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// The UIDs of the static pods the configured sources define right now, read once without
/// events (start-up cleanup keeps their pod directories). `None` when a source or one of its
/// manifests cannot be read: then nobody can tell which directories are orphans.
pub async fn current_uids(
    dir: Option<&Path>,
    url: Option<(&str, &[(String, String)])>,
    node: &str,
) -> Option<HashSet<String>> {
    let mut uids = HashSet::new();
    if let Some(dir) = dir {
        let mut files = BTreeMap::new();
        let pods = scan_dir(
            dir,
            node,
            &EventSink::disabled(),
            &mut files,
            &mut Complaints::default(),
        )?;
        if files.values().any(|f| f.error.is_some()) {
            return None;
        }
        uids.extend(pods.iter().filter_map(|p| p.metadata.uid.clone()));
    }
    if let Some((url, headers)) = url {
        let body = tokio::time::timeout(HTTP_TIMEOUT, http_get(url, headers))
            .await
            .ok()?
            .ok()?;
        let pods = parse_manifest(
            &String::from_utf8_lossy(&body),
            &Origin::Url(url.to_string()),
            node,
        )
        .ok()?;
        uids.extend(pods.iter().filter_map(|p| p.metadata.uid.clone()));
    }
    Some(uids)
}

/// One GET of the manifest URL on hyper's client (`http_client`), over TCP for `http://` and
/// over TLS for `https://`. The server is verified against the system's trust store
/// (rustls-native-certs; where an admin adds a private CA) and the web PKI roots (webpki-roots,
/// as image pulls trust), with rustls' ring provider as the rest of the agent.
async fn http_get(url: &str, headers: &[(String, String)]) -> Result<Vec<u8>, String> {
    http_get_with(url, headers, &*manifest_tls()?).await
}

/// The TLS client settings for `https://` manifest URLs, made once.
fn manifest_tls() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: std::sync::OnceLock<Result<Arc<rustls::ClientConfig>, String>> =
        std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            let native = rustls_native_certs::load_native_certs();
            let (added, _ignored) = roots.add_parsable_certificates(native.certs);
            if !native.errors.is_empty() {
                debug!(
                    errors = native.errors.len(),
                    added, "some of the system's trusted certificates could not be read"
                );
            }
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS settings: {e}"))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Ok(Arc::new(config))
        })
        .clone()
}

/// [`http_get`] with the TLS settings given: returns the body of a 200, at most
/// [`MAX_MANIFEST_BYTES`] of it. Redirects are not followed.
async fn http_get_with(
    url: &str,
    headers: &[(String, String)],
    tls: &rustls::ClientConfig,
) -> Result<Vec<u8>, String> {
    use http_body_util::BodyExt;
    let uri: http::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err("only http:// and https:// manifest URLs are supported".into());
    }
    let authority = uri
        .authority()
        .map(|a| a.to_string())
        .ok_or("the URL names no host")?;
    let mut request = http::Request::get(uri)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    for (name, value) in headers {
        let invalid = || format!("invalid header {name:?}");
        let name = http::header::HeaderName::from_bytes(name.as_bytes()).map_err(|_| invalid())?;
        request.headers_mut().append(
            name,
            http::header::HeaderValue::from_str(value).map_err(|_| invalid())?,
        );
    }
    // Defaults unless --manifest-url-header names them (Host comes from the URL, as in Go).
    for (name, value) in [
        (http::header::ACCEPT, "*/*"),
        (http::header::USER_AGENT, "wasm-kubelet"),
    ] {
        request
            .headers_mut()
            .entry(name)
            .or_insert(http::header::HeaderValue::from_static(value));
    }
    let response = crate::http_client::one_shot(tls)
        .request(request)
        .await
        .map_err(|e| match crate::http_client::failure(&e) {
            f if f.tls => format!("TLS with {authority}: {f}"),
            f if f.connect => format!("connecting to {authority}: {f}"),
            f => f.message,
        })?;
    if response.status() != http::StatusCode::OK {
        return Err(format!("HTTP status {}", response.status().as_u16()));
    }
    let body = http_body_util::Limited::new(response.into_body(), MAX_MANIFEST_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                format!("the manifest is larger than {MAX_MANIFEST_BYTES} bytes")
            } else {
                format!("reading the response: {e}")
            }
        })?;
    Ok(body.to_bytes().to_vec())
}

/// What [`merge`] tells the mirror pod manager.
#[derive(Debug)]
pub enum MirrorInput {
    /// The whole current set of static pods.
    Static(Vec<Arc<Pod>>),
    /// A mirror pod seen in (or gone from) the API server.
    Observed(PodChange),
}

/// Where [`merge`] sends things.
pub struct MergeOutputs {
    /// The pod manager.
    pub pods: mpsc::UnboundedSender<PodChange>,
    /// The mirror pod manager, with an API server.
    pub mirrors: Option<mpsc::UnboundedSender<MirrorInput>>,
    /// The status manager, told which pods are static before their workers start.
    pub status: Option<StatusSender>,
    /// The current static pods; `None` until every static source has reported once.
    pub statics: watch::Sender<Option<Vec<Arc<Pod>>>>,
    /// Run-once mode: static pods run with restartPolicy Never.
    pub runonce: bool,
}

/// Joins the sources into the one desired set: API-server pods pass through, mirror pods go
/// to the mirror manager instead of the pod manager, and static sets become Upsert/Removed
/// for what changed. `static_sources` is how many static sources will report.
pub async fn merge(
    mut api: Option<mpsc::UnboundedReceiver<PodChange>>,
    mut statics: mpsc::UnboundedReceiver<StaticSet>,
    static_sources: usize,
    out: MergeOutputs,
    shutdown: CancellationToken,
) {
    let mut sets: BTreeMap<&'static str, Vec<Arc<Pod>>> = BTreeMap::new();
    let mut running: HashMap<String, Arc<Pod>> = HashMap::new();
    let mut mirror_uids: HashSet<String> = HashSet::new();
    // No static source (or all stopped): only the API server's pods flow.
    let mut statics_open = true;
    if static_sources == 0 {
        out.statics.send_replace(Some(Vec::new()));
    }
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            change = async { api.as_mut()?.recv().await }, if api.is_some() => {
                let Some(change) = change else {
                    api = None;
                    if !statics_open {
                        return;
                    }
                    continue;
                };
                match change {
                    PodChange::Upsert(pod) if is_mirror(&pod) => {
                        if let Some(uid) = &pod.metadata.uid {
                            mirror_uids.insert(uid.clone());
                        }
                        if let Some(m) = &out.mirrors {
                            let _ = m.send(MirrorInput::Observed(PodChange::Upsert(pod)));
                        }
                    }
                    PodChange::Removed(uid) if mirror_uids.remove(&uid) => {
                        if let Some(m) = &out.mirrors {
                            let _ = m.send(MirrorInput::Observed(PodChange::Removed(uid)));
                        }
                    }
                    other => {
                        let _ = out.pods.send(other);
                    }
                }
            }
            set = statics.recv(), if statics_open => {
                let Some(set) = set else {
                    statics_open = false;
                    if api.is_none() {
                        return;
                    }
                    continue;
                };
                sets.insert(set.source, set.pods);
                // File pods first: a name the file source defines wins over the URL's.
                let mut names = HashSet::new();
                let mut wanted: Vec<Arc<Pod>> = Vec::new();
                for pod in ["file", "http"].iter().filter_map(|s| sets.get(s)).flatten() {
                    let key = (pod.metadata.namespace.clone(), pod.metadata.name.clone());
                    if !names.insert(key) {
                        warn!(pod = %pod.metadata.name.as_deref().unwrap_or(""), "static pod defined by both the manifest path and the manifest URL; running the file's");
                        continue;
                    }
                    let pod = if out.runonce {
                        let mut pod = (**pod).clone();
                        pod.spec.get_or_insert_with(Default::default).restart_policy = Some("Never".into());
                        Arc::new(pod)
                    } else {
                        pod.clone()
                    };
                    wanted.push(pod);
                }
                let wanted_uids: HashSet<String> = wanted.iter().filter_map(|p| p.metadata.uid.clone()).collect();
                for uid in running.keys().filter(|u| !wanted_uids.contains(*u)).cloned().collect::<Vec<_>>() {
                    debug!(%uid, "static pod gone");
                    running.remove(&uid);
                    let _ = out.pods.send(PodChange::Removed(uid));
                }
                for pod in &wanted {
                    let Some(uid) = pod.metadata.uid.clone() else { continue };
                    if running.get(&uid) == Some(pod) {
                        continue;
                    }
                    if !running.contains_key(&uid) {
                        if let Some(status) = &out.status {
                            status.mirror(static_key(pod), None);
                        }
                    }
                    running.insert(uid, pod.clone());
                    let _ = out.pods.send(PodChange::Upsert(pod.clone()));
                }
                if let Some(m) = &out.mirrors {
                    let _ = m.send(MirrorInput::Static(wanted.clone()));
                }
                if sets.len() >= static_sources {
                    out.statics.send_replace(Some(wanted));
                }
            }
        }
    }
}

/// Whether a pod from the API server is a mirror pod (the kubelet's `IsMirrorPod`).
/// Whether `a` and `b` are versions of one static pod (same namespace and name; each from a
/// file or URL source): the kubelet runs at most one of them at a time.
pub fn same_static_pod(a: &Pod, b: &Pod) -> bool {
    let is_static = |p: &Pod| {
        matches!(annotation(p, ANNOTATION_SOURCE), Some("file" | "http")) && !is_mirror(p)
    };
    is_static(a)
        && is_static(b)
        && a.metadata.namespace == b.metadata.namespace
        && a.metadata.name == b.metadata.name
        && a.metadata.uid != b.metadata.uid
}

pub fn is_mirror(pod: &Pod) -> bool {
    annotation(pod, ANNOTATION_MIRROR).is_some()
}

pub fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

/// The status manager's key for a static pod.
pub fn static_key(pod: &Pod) -> PodKey {
    PodKey {
        namespace: pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: pod.metadata.name.clone().unwrap_or_default(),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
    }
}

/// Without an API server pod status stays on the node: this keeps the latest status of each
/// pod, for run-once's summary, and logs changes at debug.
pub async fn local_status(
    mut rx: mpsc::UnboundedReceiver<StatusUpdate>,
    latest: watch::Sender<HashMap<String, (PodKey, PodStatus)>>,
) {
    while let Some(update) = rx.recv().await {
        match update {
            StatusUpdate::Set(key, status) => {
                debug!(pod = %format!("{}/{}", key.namespace, key.name), phase = ?status.phase, "pod status (standalone: kept locally)");
                latest.send_modify(|m| {
                    m.insert(key.uid.clone(), (key, *status));
                });
            }
            StatusUpdate::Forget(key) => {
                latest.send_modify(|m| {
                    m.remove(&key.uid);
                });
            }
            StatusUpdate::Finalize(_) | StatusUpdate::Mirror(..) => {}
        }
    }
}

/// One line of run-once's summary: `<pod> <phase> exit=<code>`, the code being the first
/// non-zero exit code of the pod's containers (0 when all exited 0; `-` when none ran).
pub fn summary_line(name: &str, status: &PodStatus) -> String {
    let phase = status.phase.as_deref().unwrap_or("Unknown");
    let codes: Vec<i32> = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
        .filter_map(|cs| cs.state.as_ref()?.terminated.as_ref().map(|t| t.exit_code))
        .collect();
    let code = codes
        .iter()
        .find(|c| **c != 0)
        .or(codes.first())
        .map(|c| c.to_string())
        .unwrap_or_else(|| "-".into());
    format!("{name} {phase} exit={code}")
}

/// Sets the `kubernetes.io/config.seen` annotation: now for new pods, the time first seen for
/// pods already in `previous` (same UID, so unchanged).
fn stamp_seen(pods: Vec<Pod>, previous: &[Arc<Pod>]) -> Vec<Arc<Pod>> {
    let seen = now_rfc3339();
    pods.into_iter()
        .map(|mut pod| {
            let old_seen = previous
                .iter()
                .find(|p| p.metadata.uid == pod.metadata.uid)
                .and_then(|p| annotation(p, ANNOTATION_SEEN).map(String::from));
            pod.metadata
                .annotations
                .get_or_insert_with(BTreeMap::new)
                .insert(
                    ANNOTATION_SEEN.into(),
                    old_seen.unwrap_or_else(|| seen.clone()),
                );
            Arc::new(pod)
        })
        .collect()
}

fn now_rfc3339() -> String {
    k8s_openapi::chrono::Utc::now().to_rfc3339_opts(k8s_openapi::chrono::SecondsFormat::Nanos, true)
}

fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn origin() -> Origin {
        Origin::File("/etc/kubernetes/manifests/web.yaml".into())
    }

    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  containers:\n  - name: app\n    image: r.example/web:v1\n";

    #[test]
    fn names_namespaces_annotates_and_defaults_like_the_kubelet() {
        let pods = parse_manifest(POD, &origin(), "node-a").unwrap();
        assert_eq!(pods.len(), 1);
        let pod = &pods[0];
        assert_eq!(pod.metadata.name.as_deref(), Some("web-node-a"));
        assert_eq!(pod.metadata.namespace.as_deref(), Some("default"));
        let uid = pod.metadata.uid.clone().unwrap();
        assert_eq!(uid.len(), 32);
        assert_eq!(annotation(pod, ANNOTATION_HASH), Some(uid.as_str()));
        assert_eq!(annotation(pod, ANNOTATION_SOURCE), Some("file"));
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("node-a"));
        assert_eq!(spec.restart_policy.as_deref(), Some("Always"));
        assert_eq!(spec.termination_grace_period_seconds, Some(30));
        assert_eq!(spec.dns_policy.as_deref(), Some("ClusterFirst"));
        assert_eq!(
            spec.containers[0].image_pull_policy.as_deref(),
            Some("IfNotPresent")
        );
        assert_eq!(
            spec.containers[0].termination_message_path.as_deref(),
            Some("/dev/termination-log")
        );
        assert!(spec
            .tolerations
            .as_ref()
            .unwrap()
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.effect.as_deref() == Some("NoExecute")));
        assert!(
            spec.volumes.is_none() && spec.service_account_name.is_none(),
            "no service account token volume"
        );
    }

    #[test]
    fn uid_is_deterministic_and_follows_content_source_and_node() {
        let uid = |text: &str, origin: &Origin, node: &str| {
            parse_manifest(text, origin, node).unwrap()[0]
                .metadata
                .uid
                .clone()
                .unwrap()
        };
        let a = uid(POD, &origin(), "node-a");
        assert_eq!(a, uid(POD, &origin(), "node-a"), "same file, same UID");
        assert_ne!(
            a,
            uid(&POD.replace("web:v1", "web:v2"), &origin(), "node-a"),
            "changed content, new UID"
        );
        assert_ne!(
            a,
            uid(POD, &Origin::File("/other.yaml".into()), "node-a"),
            "other file, new UID"
        );
        assert_ne!(a, uid(POD, &origin(), "node-b"), "other node, new UID");
        assert_ne!(
            a,
            uid(POD, &Origin::Url("http://127.0.0.1/m".into()), "node-a")
        );
        let explicit = POD.replace("name: web\n", "name: web\n  uid: fixed-uid\n");
        assert_eq!(
            uid(&explicit, &origin(), "node-a"),
            "fixed-uid",
            "a UID in the manifest is kept"
        );
    }

    #[test]
    fn json_lists_and_multi_document_files() {
        let json = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"j","namespace":"kube-system"},"spec":{"containers":[{"name":"c","image":"x/y"}]}}"#;
        let pods = parse_manifest(json, &origin(), "n").unwrap();
        assert_eq!(pods[0].metadata.name.as_deref(), Some("j-n"));
        assert_eq!(pods[0].metadata.namespace.as_deref(), Some("kube-system"));
        assert_eq!(
            pods[0].spec.as_ref().unwrap().containers[0]
                .image_pull_policy
                .as_deref(),
            Some("Always"),
            "no tag means latest"
        );
        let list = "apiVersion: v1\nkind: List\nitems:\n- metadata: {name: a}\n  spec: {containers: [{name: c, image: 'x:1'}]}\n- apiVersion: v1\n  kind: Pod\n  metadata: {name: b}\n  spec: {containers: [{name: c, image: 'x:1'}]}\n";
        let names: Vec<_> = parse_manifest(list, &origin(), "n")
            .unwrap()
            .into_iter()
            .map(|p| p.metadata.name.unwrap())
            .collect();
        assert_eq!(names, ["a-n", "b-n"]);
        let multi = format!(
            "{POD}---\n{}\n---\n",
            POD.replace("name: web", "name: web2")
        );
        assert_eq!(parse_manifest(&multi, &origin(), "n").unwrap().len(), 2);
    }

    #[test]
    fn names_and_paths_are_validated_as_the_api_server_does() {
        let pod = |containers: &str, volumes: &str| {
            format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\nspec:\n  containers: {containers}\n  volumes: {volumes}\n")
        };
        let ok_volumes = "[{name: data, emptyDir: {}}]";
        let cases: &[(&str, &str, &str)] = &[
            ("[{name: ../../x, image: i}]", "[]", "must be a lowercase RFC 1123 label"),
            ("[{name: Upper, image: i}]", "[]", "must be a lowercase RFC 1123 label"),
            ("[{name: a.b, image: i}]", "[]", "must be a lowercase RFC 1123 label"),
            ("[{name: c, image: i}, {name: c, image: j}]", "[]", "used twice"),
            ("[{name: c, image: i}]", "[{name: ../../../../escape, emptyDir: {}}]", "must be a lowercase RFC 1123 label"),
            ("[{name: c, image: i}]", "[{name: v, emptyDir: {}}, {name: v, emptyDir: {}}]", "used twice"),
            ("[{name: c, image: i}]", "[{name: v, hostPath: {path: /srv/../etc}}]", "must not contain '..'"),
            ("[{name: c, image: i, volumeMounts: [{name: nope, mountPath: /d}]}]", ok_volumes, "no volume of that name"),
            ("[{name: c, image: i, volumeMounts: [{name: data, mountPath: d}]}]", ok_volumes, "must be an absolute path"),
            ("[{name: c, image: i, volumeMounts: [{name: data, mountPath: /d/../e}]}]", ok_volumes, "without '..'"),
            ("[{name: c, image: i, volumeMounts: [{name: data, mountPath: /d}, {name: data, mountPath: /d}]}]", ok_volumes, "must be unique"),
            ("[{name: c, image: i, volumeMounts: [{name: data, mountPath: /d, subPath: ../up}]}]", ok_volumes, "subPath"),
            ("[{name: c, image: i, volumeMounts: [{name: data, mountPath: /d, subPath: /abs}]}]", ok_volumes, "subPath"),
            ("[{name: c, image: i, volumeMounts: [{name: data, mountPath: /d, subPathExpr: 'a/../../$(X)'}]}]", ok_volumes, "subPathExpr"),
            ("[{name: c, image: i, volumeMounts: [{name: data, mountPath: /d, subPath: a, subPathExpr: b}]}]", ok_volumes, "mutually exclusive"),
            ("[{name: c, image: i, terminationMessagePath: dev/termination-log}]", "[]", "terminationMessagePath"),
        ];
        for (containers, volumes, want) in cases {
            let text = pod(containers, volumes);
            let e = parse_manifest(&text, &origin(), "n")
                .expect_err(&text)
                .to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
        let good = pod("[{name: c, image: i, volumeMounts: [{name: data, mountPath: /d, subPath: a/b}], terminationMessagePath: /tmp/msg}]", ok_volumes);
        parse_manifest(&good, &origin(), "n").unwrap();
    }

    #[test]
    fn malformed_manifests_say_what_is_wrong() {
        let err = |text: &str| {
            parse_manifest(text, &origin(), "n")
                .unwrap_err()
                .to_string()
        };
        assert!(err("kind: Pod\nmetadata: [unclosed").contains("YAML"));
        assert!(err("apiVersion: v1\nkind: Service\nmetadata: {name: s}\n").contains("Service"));
        assert!(
            err("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: []}\n")
                .contains("containers")
        );
        assert!(err("apiVersion: v1\nkind: Pod\nmetadata: {name: Bad_Name}\nspec: {containers: [{name: c, image: x}]}\n").contains("Bad_Name"));
        assert!(err(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c}]}\n"
        )
        .contains("no image"));
        assert!(err(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: {name: c}}\n"
        )
        .contains("not a valid Pod"));
        assert!(err("").contains("no pods"));
        assert!(err(&format!("{POD}---\n{POD}")).contains("twice"));
    }

    #[test]
    fn a_directory_scan_ignores_hidden_files_keeps_last_good_and_drops_duplicates() {
        let dir = std::env::temp_dir().join(format!("static-pods-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("web.yaml"), POD).unwrap();
        std::fs::write(
            dir.join(".hidden.yaml"),
            POD.replace("name: web", "name: hidden"),
        )
        .unwrap();
        std::fs::write(dir.join("zz-dup.yaml"), POD.replace("web:v1", "web:v9")).unwrap();
        std::fs::write(dir.join("bad.yaml"), "kind: Pod\nmetadata: [").unwrap();
        let (mut files, mut complaints, events) = (
            BTreeMap::new(),
            Complaints::default(),
            EventSink::disabled(),
        );
        let pods = scan_dir(&dir, "n", &events, &mut files, &mut complaints).unwrap();
        let names: Vec<_> = pods
            .iter()
            .map(|p| p.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(
            names,
            ["web-n"],
            "hidden ignored, malformed skipped, duplicate dropped"
        );
        assert_eq!(
            pods[0].spec.as_ref().unwrap().containers[0]
                .image
                .as_deref(),
            Some("r.example/web:v1"),
            "the first file by name wins"
        );
        assert!(annotation(&pods[0], ANNOTATION_SEEN).is_some());
        assert_eq!(complaints.this_scan.len(), 2, "{:?}", complaints.this_scan);
        complaints.end_scan();

        // Breaking a good file keeps its last good pod; an unchanged file keeps its seen time.
        std::fs::write(dir.join("web.yaml"), "not: [a pod").unwrap();
        let again = scan_dir(&dir, "n", &events, &mut files, &mut complaints).unwrap();
        assert_eq!(again, pods);
        // Removing the file removes its pods.
        std::fs::remove_file(dir.join("web.yaml")).unwrap();
        let after = scan_dir(&dir, "n", &events, &mut files, &mut complaints).unwrap();
        assert_eq!(after.len(), 1, "the duplicate now runs");
        assert_eq!(
            after[0].spec.as_ref().unwrap().containers[0]
                .image
                .as_deref(),
            Some("r.example/web:v9")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn manifest_url_fetch_with_headers() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap();
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let reply = if req.contains("X-Token: secret") && req.starts_with("GET /pods ") {
                    format!("HTTP/1.0 200 OK\r\nContent-Type: application/yaml\r\n\r\n{POD}")
                } else {
                    "HTTP/1.0 403 Forbidden\r\n\r\n".to_string()
                };
                s.write_all(reply.as_bytes()).await.unwrap();
            }
        });
        let url = format!("http://{addr}/pods");
        let body = http_get(&url, &[("X-Token".into(), "secret".into())])
            .await
            .unwrap();
        assert_eq!(String::from_utf8(body).unwrap(), POD);
        assert!(http_get(&url, &[]).await.unwrap_err().contains("403"));
        assert!(http_get("ftp://127.0.0.1/x", &[])
            .await
            .unwrap_err()
            .contains("https://"));
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(http_get(&format!("http://{closed}/"), &[])
            .await
            .unwrap_err()
            .contains("connecting"));
    }

    /// `https://`: a server whose certificate chains to a trusted CA serves the manifest; one
    /// the client does not trust (the system's and web PKI roots do not hold a self-signed
    /// test CA) is refused.
    #[tokio::test]
    async fn manifest_url_over_https() {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    continue;
                };
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{POD}",
                            POD.len()
                        )
                        .as_bytes(),
                    )
                    .await;
                // Closed without close_notify, as many servers do; Content-Length vouches.
                drop(s);
            }
        });
        let url = format!("https://{addr}/pods");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let trusting = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let body = http_get_with(&url, &[], &trusting).await.unwrap();
        assert_eq!(String::from_utf8(body).unwrap(), POD);
        let refused = http_get(&url, &[]).await.unwrap_err();
        assert!(
            refused.contains("TLS") && refused.contains("certificate"),
            "{refused}"
        );
    }

    #[tokio::test]
    async fn merge_passes_api_pods_diverts_mirrors_and_diffs_static_sets() {
        let (api_tx, api_rx) = mpsc::unbounded_channel();
        let (out_tx, mut out_rx) = mpsc::unbounded_channel();
        let (mirror_tx, mut mirror_rx) = mpsc::unbounded_channel();
        let (static_tx, static_rx) = mpsc::unbounded_channel();
        let (statics_tx, statics_view) = watch::channel(None);
        let outputs = MergeOutputs {
            pods: out_tx,
            mirrors: Some(mirror_tx),
            status: None,
            statics: statics_tx,
            runonce: false,
        };
        let stop = CancellationToken::new();
        tokio::spawn(merge(Some(api_rx), static_rx, 1, outputs, stop.clone()));

        let api_pod: Pod =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "a", "uid": "u-api"}}))
                .unwrap();
        api_tx.send(PodChange::Upsert(Arc::new(api_pod))).unwrap();
        assert!(
            matches!(out_rx.recv().await, Some(PodChange::Upsert(p)) if p.metadata.uid.as_deref() == Some("u-api"))
        );
        let mirror: Pod = serde_json::from_value(serde_json::json!({"metadata": {"name": "web-n", "uid": "u-m", "annotations": {ANNOTATION_MIRROR: "h"}}})).unwrap();
        api_tx.send(PodChange::Upsert(Arc::new(mirror))).unwrap();
        api_tx.send(PodChange::Removed("u-m".into())).unwrap();
        assert!(matches!(
            mirror_rx.recv().await,
            Some(MirrorInput::Observed(PodChange::Upsert(_)))
        ));
        assert!(matches!(
            mirror_rx.recv().await,
            Some(MirrorInput::Observed(PodChange::Removed(_)))
        ));

        let v1 = Arc::new(parse_manifest(POD, &origin(), "n").unwrap().remove(0));
        static_tx
            .send(StaticSet {
                source: "file",
                pods: vec![v1.clone()],
            })
            .unwrap();
        assert!(
            matches!(out_rx.recv().await, Some(PodChange::Upsert(p)) if p.metadata.uid == v1.metadata.uid)
        );
        let v2 = Arc::new(
            parse_manifest(&POD.replace("web:v1", "web:v2"), &origin(), "n")
                .unwrap()
                .remove(0),
        );
        static_tx
            .send(StaticSet {
                source: "file",
                pods: vec![v2.clone()],
            })
            .unwrap();
        assert!(
            matches!(out_rx.recv().await, Some(PodChange::Removed(u)) if Some(u.as_str()) == v1.metadata.uid.as_deref())
        );
        assert!(
            matches!(out_rx.recv().await, Some(PodChange::Upsert(p)) if p.metadata.uid == v2.metadata.uid)
        );
        assert_eq!(statics_view.borrow().as_ref().map(Vec::len), Some(1));

        // With every static source gone, API pods still flow.
        drop(static_tx);
        let later: Pod =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "b", "uid": "u-b"}}))
                .unwrap();
        api_tx.send(PodChange::Upsert(Arc::new(later))).unwrap();
        assert!(
            matches!(out_rx.recv().await, Some(PodChange::Upsert(p)) if p.metadata.uid.as_deref() == Some("u-b"))
        );
        stop.cancel();
    }

    #[test]
    fn summary_names_phase_and_first_failing_code() {
        let status: PodStatus = serde_json::from_value(serde_json::json!({
            "phase": "Failed",
            "containerStatuses": [
                {"name": "a", "image": "", "imageID": "", "ready": false, "restartCount": 0, "state": {"terminated": {"exitCode": 0}}},
                {"name": "b", "image": "", "imageID": "", "ready": false, "restartCount": 0, "state": {"terminated": {"exitCode": 3}}}
            ]
        }))
        .unwrap();
        assert_eq!(summary_line("p-n", &status), "p-n Failed exit=3");
        assert_eq!(
            summary_line("q-n", &PodStatus::default()),
            "q-n Unknown exit=-"
        );
    }
}
