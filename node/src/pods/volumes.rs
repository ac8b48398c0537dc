//! Volumes, materialised as directories in the pod directory before containers start, then
//! preopened into each container that mounts them.
//!
//! Supported here: emptyDir, configMap, secret, downwardAPI and projected (serviceAccountToken,
//! configMap, secret, downwardAPI sources) — the last is the `kube-api-access-*` volume every
//! API-created pod carries. Files are written to a temporary name and renamed into place, so a
//! reader never sees half a file. A service-account token is requested through the TokenRequest
//! API, bound to the pod, and refreshed at 80 % of its lifetime (at most every 24 h), as the
//! kubelet does.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, DownwardAPIVolumeFile, KeyToPath, Pod, Secret, ServiceAccount, Volume};
use k8s_openapi::chrono::Utc;
use kube::api::PostParams;
use kube::Api;

/// A volume that could not be set up; the pod waits in ContainerCreating with a FailedMount event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("MountVolume.SetUp failed for volume \"{volume}\" : {reason}")]
pub struct VolumeError {
    pub volume: String,
    pub reason: String,
}

/// A volume ready to be mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Materialized {
    pub host_path: PathBuf,
    /// configMap, secret, downwardAPI and projected volumes are always read-only.
    pub read_only: bool,
}

/// The result of setting up a pod's volumes.
#[derive(Debug, Default)]
pub struct PodVolumes {
    pub by_name: HashMap<String, Materialized>,
    /// When a token inside must be refreshed.
    pub refresh_in: Option<Duration>,
}

/// Tokens are refreshed at this share of their lifetime.
const TOKEN_REFRESH_AT: f64 = 0.8;
/// ...and at least this often.
const TOKEN_REFRESH_MAX: Duration = Duration::from_secs(24 * 3600);
/// The kube-api-access default; the API server may extend it.
const DEFAULT_TOKEN_SECONDS: i64 = 3607;

/// Creates every volume of the pod under `pod_dir/volumes/`.
pub async fn materialize(client: Option<&kube::Client>, pod: &Pod, pod_dir: &Path) -> Result<PodVolumes, VolumeError> {
    let mut out = PodVolumes::default();
    for volume in pod.spec.as_ref().and_then(|s| s.volumes.as_ref()).into_iter().flatten() {
        let fail = |reason: String| VolumeError { volume: volume.name.clone(), reason };
        let (kind, read_only) = kind_of(volume).ok_or_else(|| fail("unsupported volume type".into()))?;
        let dir = pod_dir.join("volumes").join(format!("kubernetes.io~{kind}")).join(&volume.name);
        std::fs::create_dir_all(&dir).map_err(|e| fail(format!("creating {}: {e}", dir.display())))?;
        let files = match kind {
            "empty-dir" => BTreeMap::new(),
            _ => {
                let (files, refresh) = contents(client, pod, volume).await.map_err(fail)?;
                if let Some(r) = refresh {
                    out.refresh_in = Some(out.refresh_in.map_or(r, |o| o.min(r)));
                }
                files
            }
        };
        for (path, bytes) in files {
            write_atomically(&dir, &path, &bytes).map_err(fail)?;
        }
        out.by_name.insert(volume.name.clone(), Materialized { host_path: dir, read_only });
    }
    Ok(out)
}

fn kind_of(v: &Volume) -> Option<(&'static str, bool)> {
    if v.empty_dir.is_some() {
        Some(("empty-dir", false))
    } else if v.config_map.is_some() {
        Some(("configmap", true))
    } else if v.secret.is_some() {
        Some(("secret", true))
    } else if v.downward_api.is_some() {
        Some(("downward-api", true))
    } else if v.projected.is_some() {
        Some(("projected", true))
    } else {
        None
    }
}

/// Whether this node can materialise the volume (admission uses it).
pub fn supported(v: &Volume) -> bool {
    kind_of(v).is_some()
}

type Files = BTreeMap<String, Vec<u8>>;

/// The files of a non-empty volume, and when its token must be refreshed.
async fn contents(client: Option<&kube::Client>, pod: &Pod, v: &Volume) -> Result<(Files, Option<Duration>), String> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let mut files = Files::new();
    let mut refresh = None;
    if let Some(cm) = &v.config_map {
        if let Some(data) = config_map(client, &namespace, &cm.name, cm.optional.unwrap_or(false)).await? {
            project(&mut files, data, cm.items.as_deref(), cm.optional.unwrap_or(false), "configmap", &cm.name)?;
        }
    }
    if let Some(s) = &v.secret {
        let name = s.secret_name.clone().unwrap_or_default();
        if let Some(data) = secret(client, &namespace, &name, s.optional.unwrap_or(false)).await? {
            project(&mut files, data, s.items.as_deref(), s.optional.unwrap_or(false), "secret", &name)?;
        }
    }
    if let Some(d) = &v.downward_api {
        downward(&mut files, pod, d.items.as_deref().unwrap_or_default())?;
    }
    if let Some(p) = &v.projected {
        // The sources are independent API reads (a token request, the CA configmap): fetch them
        // at once, since pod start-up waits for the slowest.
        let sources = p.sources.iter().flatten().map(|source| async {
            let mut files = Files::new();
            let mut refresh = None;
            if let Some(cm) = &source.config_map {
                if let Some(data) = config_map(client, &namespace, &cm.name, cm.optional.unwrap_or(false)).await? {
                    project(&mut files, data, cm.items.as_deref(), cm.optional.unwrap_or(false), "configmap", &cm.name)?;
                }
            }
            if let Some(s) = &source.secret {
                if let Some(data) = secret(client, &namespace, &s.name, s.optional.unwrap_or(false)).await? {
                    project(&mut files, data, s.items.as_deref(), s.optional.unwrap_or(false), "secret", &s.name)?;
                }
            }
            if let Some(d) = &source.downward_api {
                downward(&mut files, pod, d.items.as_deref().unwrap_or_default())?;
            }
            if let Some(t) = &source.service_account_token {
                let client = client.ok_or("no API server to request a service account token from")?;
                let (token, lifetime) = request_token(client, pod, t.audience.clone(), t.expiration_seconds).await?;
                files.insert(t.path.clone(), token.into_bytes());
                refresh = Some(lifetime.mul_f64(TOKEN_REFRESH_AT).min(TOKEN_REFRESH_MAX));
            }
            Ok::<_, String>((files, refresh))
        });
        for result in futures::future::join_all(sources).await {
            let (source_files, source_refresh) = result?;
            files.extend(source_files);
            if let Some(r) = source_refresh {
                refresh = Some(refresh.map_or(r, |o: Duration| o.min(r)));
            }
        }
    }
    Ok((files, refresh))
}

/// A ConfigMap's data and binaryData; `Ok(None)` when it is missing and `optional`.
pub(super) async fn config_map(client: Option<&kube::Client>, ns: &str, name: &str, optional: bool) -> Result<Option<BTreeMap<String, Vec<u8>>>, String> {
    let client = client.ok_or("no API server to read configmaps from")?;
    match Api::<ConfigMap>::namespaced(client.clone(), ns).get_opt(name).await {
        Ok(Some(cm)) => {
            let mut data: BTreeMap<String, Vec<u8>> = cm.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.into_bytes())).collect();
            data.extend(cm.binary_data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)));
            Ok(Some(data))
        }
        Ok(None) if optional => Ok(None),
        Ok(None) => Err(format!("configmap \"{name}\" not found")),
        Err(e) => Err(format!("reading configmap \"{name}\": {}", crate::config::one_line(&e))),
    }
}

/// A Secret's data and stringData; `Ok(None)` when it is missing and `optional`.
pub(super) async fn secret(client: Option<&kube::Client>, ns: &str, name: &str, optional: bool) -> Result<Option<BTreeMap<String, Vec<u8>>>, String> {
    let client = client.ok_or("no API server to read secrets from")?;
    match Api::<Secret>::namespaced(client.clone(), ns).get_opt(name).await {
        Ok(Some(s)) => {
            let mut data: BTreeMap<String, Vec<u8>> = s.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
            data.extend(s.string_data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.into_bytes())));
            Ok(Some(data))
        }
        Ok(None) if optional => Ok(None),
        Ok(None) => Err(format!("secret \"{name}\" not found")),
        Err(e) => Err(format!("reading secret \"{name}\": {}", crate::config::one_line(&e))),
    }
}

/// Keys to files: every key, or only `items` (key -> path).
fn project(files: &mut Files, data: BTreeMap<String, Vec<u8>>, items: Option<&[KeyToPath]>, optional: bool, kind: &str, name: &str) -> Result<(), String> {
    match items {
        None => files.extend(data),
        Some(items) => {
            for item in items {
                match data.get(&item.key) {
                    Some(bytes) => {
                        files.insert(item.path.clone(), bytes.clone());
                    }
                    None if optional => {}
                    None => return Err(format!("configured to use key {} of {kind} \"{name}\", which does not exist", item.key)),
                }
            }
        }
    }
    Ok(())
}

fn downward(files: &mut Files, pod: &Pod, items: &[DownwardAPIVolumeFile]) -> Result<(), String> {
    let m = &pod.metadata;
    let render_map = |map: &Option<BTreeMap<String, String>>| -> String {
        map.iter().flatten().map(|(k, v)| format!("{k}={v:?}\n")).collect()
    };
    for item in items {
        let Some(field) = &item.field_ref else {
            return Err(format!("downwardAPI item {}: only fieldRef is supported", item.path));
        };
        let value = match field.field_path.as_str() {
            "metadata.name" => m.name.clone().unwrap_or_default(),
            "metadata.namespace" => m.namespace.clone().unwrap_or_default(),
            "metadata.uid" => m.uid.clone().unwrap_or_default(),
            "metadata.labels" => render_map(&m.labels),
            "metadata.annotations" => render_map(&m.annotations),
            other => return Err(format!("downwardAPI fieldRef {other} is not supported")),
        };
        files.insert(item.path.clone(), value.into_bytes());
    }
    Ok(())
}

/// A token for the pod's service account, bound to the pod; returns it and its lifetime.
async fn request_token(client: &kube::Client, pod: &Pod, audience: Option<String>, seconds: Option<i64>) -> Result<(String, Duration), String> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let account = pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into());
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
        .map_err(|e| format!("requesting a token for service account \"{account}\": {}", crate::config::one_line(&e)))?;
    let status = response.status.ok_or("the TokenRequest came back without a token")?;
    let lifetime = (status.expiration_timestamp.0 - Utc::now()).to_std().unwrap_or(Duration::from_secs(60));
    Ok((status.token, lifetime))
}

/// Writes `dir/relative` via a temporary file and a rename. `relative` must stay inside `dir`.
fn write_atomically(dir: &Path, relative: &str, bytes: &[u8]) -> Result<(), String> {
    let rel = Path::new(relative);
    if rel.is_absolute() || rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(format!("path {relative:?} must be relative and stay inside the volume"));
    }
    let target = dir.join(rel);
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
    }
    let tmp = target.with_file_name(format!(".{}.tmp", target.file_name().and_then(|n| n.to_str()).unwrap_or("file")));
    std::fs::write(&tmp, bytes).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &target).map_err(|e| format!("renaming into {}: {e}", target.display()))
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
        let v = materialize(None, &pod, &dir).await.unwrap();
        assert!(!v.by_name["scratch"].read_only);
        let info = &v.by_name["info"];
        assert!(info.read_only);
        assert_eq!(std::fs::read_to_string(info.host_path.join("name")).unwrap(), "p");
        assert_eq!(std::fs::read_to_string(info.host_path.join("meta/labels")).unwrap(), "app=\"x\"\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_configmap_volume_without_an_api_server_is_a_named_error() {
        let dir = std::env::temp_dir().join(format!("wk-volumes-cm-{}", std::process::id()));
        let pod = pod(serde_json::json!([{"name": "cfg", "configMap": {"name": "settings"}}]));
        let e = materialize(None, &pod, &dir).await.unwrap_err();
        assert_eq!(e.volume, "cfg");
        assert!(e.to_string().starts_with("MountVolume.SetUp failed for volume \"cfg\""));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn paths_may_not_escape_the_volume() {
        let dir = std::env::temp_dir();
        assert!(write_atomically(&dir, "../evil", b"x").is_err());
        assert!(write_atomically(&dir, "/etc/passwd", b"x").is_err());
    }
}
