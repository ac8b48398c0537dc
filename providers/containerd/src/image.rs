//! Images pulled through containerd: resolved and fetched with oci-client (containerd 1.6 has
//! no transfer service), each blob written into containerd's content store with its expected
//! digest (containerd verifies it on commit), the image record created, and the layers unpacked
//! into the overlayfs snapshotter under their chain IDs (Snapshots.Prepare, Diff.Apply,
//! Snapshots.Commit).
//!
//! Garbage-collection references are containerd's own labels: the manifest names its config and
//! layers (`containerd.io/gc.ref.content.*`), the config names the top snapshot
//! (`containerd.io/gc.ref.snapshot.overlayfs`), and the whole pull runs under a lease that
//! expires by itself, so removing the image record lets containerd collect everything.

use std::collections::HashMap;

use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    ApplyRequest, CreateImageRequest, CreateRequest as CreateLeaseRequest,
    DeleteRequest as DeleteLeaseRequest, GetImageRequest, Image, InfoRequest, ReadContentRequest,
    UpdateImageRequest, WriteAction, WriteContentRequest,
};
use containerd_client::types::{Descriptor, Mount};
use futures::{SinkExt, StreamExt};
use oci_client::client::ClientProtocol;
use oci_client::secrets::RegistryAuth as OciAuth;
use oci_client::Reference;
use provider_api::{ProviderError, RegistryAuth};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::client::{is_already_exists, is_not_found, status_error, Client, SNAPSHOTTER};

/// The label on an image record holding the bytes its blobs take (what image GC frees).
pub const SIZE_LABEL: &str = "wasm-kubelet/size";
/// The label on an image record holding its last use, unix milliseconds.
pub const LAST_USED_LABEL: &str = "wasm-kubelet/last-used";

/// The most bytes a manifest, an index or an image config may have; read whole into memory.
/// 4 MiB is containerd's own limit for manifests (`MaxManifestSize`).
const MAX_METADATA_SIZE: usize = 4 * 1024 * 1024;

const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

use provider_api::registries::oci::{client_config, reference_on};
pub use provider_api::registries::{Endpoint, RegistryOptions};

/// The oci-client for `endpoint` with `protocol`: its CAs, its `skip_verify`.
fn client_for(endpoint: &Endpoint, protocol: ClientProtocol) -> oci_client::Client {
    oci_client::Client::new(client_config(endpoint, protocol))
}

/// The manifest (bytes, the registry's digest) from the first of the registry's hosts that has
/// it ([`RegistryOptions::endpoints`]: hosts.toml mirrors, then the server), with the client and
/// the reference on that host that fetch the rest of the image. A mirror is sent only the pod's
/// credentials for its own host. On each host: https first; plain http for an `http://` host,
/// or after https failed for a registry named insecure.
async fn connect(
    registries: &RegistryOptions,
    image: &Reference,
    auth: &[RegistryAuth],
    reference: &str,
) -> Result<(oci_client::Client, Reference, OciAuth, Vec<u8>, String), ProviderError> {
    let endpoints = registries.endpoints(image.registry(), image.digest().is_some());
    let mut failed_mirrors = Vec::new();
    let mut last = None;
    for endpoint in &endpoints {
        let on_host = reference_on(endpoint, image);
        let credentials = if endpoint.mirror {
            credentials_for(&endpoint.host, auth)
        } else {
            credentials_for(image.resolve_registry(), auth)
        };
        let protocol = if endpoint.plain_http {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        };
        let oci = client_for(endpoint, protocol);
        let error = match oci
            .pull_manifest_raw(&on_host, &credentials, MANIFEST_TYPES)
            .await
        {
            Ok((bytes, digest)) => return Ok((oci, on_host, credentials, bytes, digest)),
            Err(e) if endpoint.http_fallback => {
                let registry = on_host.resolve_registry().to_string();
                let http = client_for(endpoint, ClientProtocol::HttpsExcept(vec![registry]));
                match http
                    .pull_manifest_raw(&on_host, &credentials, MANIFEST_TYPES)
                    .await
                {
                    Ok((bytes, digest)) => return Ok((http, on_host, credentials, bytes, digest)),
                    Err(e2) => format!(
                        "{} (over https first: {})",
                        provider_api::one_line(&e2),
                        provider_api::one_line(&e)
                    ),
                }
            }
            Err(e) => provider_api::one_line(&e),
        };
        if endpoint.mirror {
            tracing::debug!(reference, mirror = %endpoint.host, error, "mirror failed; trying the next host");
            failed_mirrors.push(format!("{}: {error}", endpoint.host));
            last = Some(error);
        } else {
            last = Some(error);
            break;
        }
    }
    let mut message = match last {
        Some(error) => format!("pulling {reference}: fetching the manifest: {error}"),
        None => format!(
            "pulling {reference}: no host of {} may resolve and pull (see the registry config dir's capabilities)",
            image.registry()
        ),
    };
    if !failed_mirrors.is_empty() && endpoints.last().is_some_and(|e| !e.mirror) {
        message.push_str(&format!(
            " (mirrors tried first: {})",
            failed_mirrors.join("; ")
        ));
    }
    Err(ProviderError::Pull(message))
}

/// The parts of an image manifest used here.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub config: OciDescriptor,
    #[serde(default)]
    pub layers: Vec<OciDescriptor>,
    #[serde(default)]
    pub manifests: Vec<OciDescriptor>,
    #[serde(default)]
    pub media_type: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OciDescriptor {
    pub media_type: String,
    pub digest: String,
    pub size: i64,
    #[serde(default)]
    pub platform: Option<Platform>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
}

/// An index: only its entries.
#[derive(Debug, Deserialize)]
struct Index {
    manifests: Vec<OciDescriptor>,
}

/// The parts of an image config a container needs.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub config: RunConfig,
    pub rootfs: RootFs,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// An image as a container is made from it.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    /// The digest of what the reference names (an index or a manifest).
    pub digest: String,
    pub config: ImageConfig,
    /// The chain ID of the image's whole root filesystem (the snapshot containers start from).
    pub top_chain_id: String,
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in hash {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The chain IDs of layers with these diff IDs (OCI image spec: ChainID(L0) = DiffID(L0),
/// ChainID(L0..n) = sha256(ChainID(L0..n-1) + " " + DiffID(Ln))).
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff in diff_ids {
        let next = match out.last() {
            None => diff.clone(),
            Some(parent) => sha256_digest(format!("{parent} {diff}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// The canonical name of a reference (`busybox` -> `docker.io/library/busybox:latest`), as
/// image records are named; an unparsable reference is InvalidImageName.
pub fn canonical(reference: &str) -> Result<Reference, ProviderError> {
    reference.parse::<Reference>().map_err(|e| {
        ProviderError::InvalidImageName(format!("invalid image name {reference:?}: {e}"))
    })
}

/// Basic credentials whose registry matches `registry` (Docker Hub's aliases count as one).
pub fn credentials_for(registry: &str, auth: &[RegistryAuth]) -> OciAuth {
    let want = normalise_registry(registry);
    auth.iter()
        .find(|a| normalise_registry(&a.registry) == want)
        .map(|a| OciAuth::Basic(a.username.clone(), a.password.clone()))
        .unwrap_or(OciAuth::Anonymous)
}

fn normalise_registry(registry: &str) -> String {
    let r = registry.trim();
    let r = r
        .strip_prefix("https://")
        .or_else(|| r.strip_prefix("http://"))
        .unwrap_or(r);
    let host = r.split('/').next().unwrap_or("").to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".into(),
        _ => host,
    }
}

/// The host's architecture as OCI platforms name it.
fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn layer_supported(media_type: &str) -> bool {
    matches!(
        media_type,
        "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
    )
}

fn config_supported(media_type: &str) -> bool {
    matches!(
        media_type,
        "application/vnd.oci.image.config.v1+json"
            | "application/vnd.docker.container.image.v1+json"
    )
}

fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a pull produced.
pub struct Pulled {
    pub name: String,
    pub digest: String,
    pub size: u64,
}

/// A lease that keeps what is made under it from containerd's garbage collection until it is
/// deleted, or an hour has passed (an agent that dies mid-pull leaks nothing for long).
pub struct Lease {
    client: Client,
    pub id: String,
}

impl Lease {
    pub async fn create(client: &Client) -> Result<Self, ProviderError> {
        let expire = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1);
        let labels = HashMap::from([("containerd.io/gc.expire".to_string(), expire.to_string())]);
        let lease = client
            .leases()
            .create(client.req(CreateLeaseRequest {
                id: format!("wasm-kubelet-{}", crate::random_id()),
                labels,
            }))
            .await
            .map_err(|e| status_error("creating a containerd lease", e))?
            .into_inner()
            .lease
            .map(|l| l.id)
            .unwrap_or_default();
        Ok(Self {
            client: client.clone(),
            id: lease,
        })
    }

    pub async fn delete(self) {
        let result = self
            .client
            .leases()
            .delete(self.client.req(DeleteLeaseRequest {
                id: self.id.clone(),
                sync: false,
            }))
            .await;
        if let Err(e) = result {
            tracing::debug!(lease = self.id, error = %e.message(), "deleting a lease failed; it expires by itself");
        }
    }
}

/// Pulls `reference` into containerd.
pub async fn pull(
    client: &Client,
    registries: &RegistryOptions,
    reference: &str,
    auth: &[RegistryAuth],
) -> Result<Pulled, ProviderError> {
    let parsed = canonical(reference)?;
    let name = parsed.whole();
    let pull_error = |what: &str, e: &dyn std::error::Error| {
        ProviderError::Pull(format!(
            "pulling {reference}: {what}: {}",
            provider_api::one_line(e)
        ))
    };
    // The rest of the image comes from the host that answered, as the reference on it.
    let (oci, parsed, credentials, top_bytes, top_digest) =
        connect(registries, &parsed, auth, reference).await?;
    if top_bytes.len() > MAX_METADATA_SIZE {
        return Err(ProviderError::Pull(format!(
            "pulling {reference}: the manifest has {} bytes, more than the {MAX_METADATA_SIZE} allowed",
            top_bytes.len()
        )));
    }
    // The digest is ours to check: the one a pinned reference names, of the bytes received.
    let actual = sha256_digest(&top_bytes);
    if let Some(pinned) = parsed.digest() {
        if pinned != actual {
            return Err(ProviderError::Pull(format!(
                "pulling {reference}: the registry sent a manifest with digest {actual}"
            )));
        }
    } else if top_digest != actual {
        tracing::debug!(
            reference,
            header = top_digest,
            actual,
            "registry digest header differs; using the content's"
        );
    }
    let top: serde_json::Value = serde_json::from_slice(&top_bytes)
        .map_err(|e| ProviderError::Pull(format!("pulling {reference}: bad manifest: {e}")))?;
    let top_type = top
        .get("mediaType")
        .and_then(|t| t.as_str())
        .unwrap_or(if top.get("manifests").is_some() {
            "application/vnd.oci.image.index.v1+json"
        } else {
            "application/vnd.oci.image.manifest.v1+json"
        })
        .to_string();

    let lease = Lease::create(client).await?;
    let result = async {
        // An index: the entry for linux and this host's architecture.
        let (manifest_bytes, manifest_desc, index) = if top.get("manifests").is_some() {
            let index: Index = serde_json::from_slice(&top_bytes)
                .map_err(|e| ProviderError::Pull(format!("pulling {reference}: bad index: {e}")))?;
            let entry = index
                .manifests
                .iter()
                .find(|m| {
                    m.platform.as_ref().is_some_and(|p| {
                        p.os == "linux" && p.architecture == host_architecture()
                    })
                })
                .cloned()
                .ok_or_else(|| {
                    ProviderError::UnsupportedImage(format!(
                        "image {reference} has no linux/{} manifest",
                        host_architecture()
                    ))
                })?;
            let (bytes, _) = oci
                .pull_manifest_raw(
                    &parsed.clone_with_digest(entry.digest.clone()),
                    &credentials,
                    MANIFEST_TYPES,
                )
                .await
                .map_err(|e| pull_error("fetching the platform manifest", &e))?;
            if bytes.len() > MAX_METADATA_SIZE || sha256_digest(&bytes) != entry.digest {
                return Err(ProviderError::Pull(format!(
                    "pulling {reference}: the platform manifest does not match its digest {}",
                    entry.digest
                )));
            }
            (bytes, entry, Some(index))
        } else {
            let desc = OciDescriptor {
                media_type: top_type.clone(),
                digest: actual.clone(),
                size: top_bytes.len() as i64,
                platform: None,
            };
            (top_bytes.clone(), desc, None)
        };
        let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
            .map_err(|e| ProviderError::Pull(format!("pulling {reference}: bad manifest: {e}")))?;
        if !config_supported(&manifest.config.media_type) {
            return Err(ProviderError::UnsupportedImage(format!(
                "image {reference} is not a Linux container image (config media type {})",
                manifest.config.media_type
            )));
        }
        if let Some(layer) = manifest.layers.iter().find(|l| !layer_supported(&l.media_type)) {
            return Err(ProviderError::UnsupportedImage(format!(
                "image {reference} has a layer of media type {}, not a tar layer",
                layer.media_type
            )));
        }
        // The config, whole (it is small and parsed here).
        if manifest.config.size < 0 || manifest.config.size as usize > MAX_METADATA_SIZE {
            return Err(ProviderError::Pull(format!(
                "pulling {reference}: the image config has {} bytes, more than the {MAX_METADATA_SIZE} allowed",
                manifest.config.size
            )));
        }
        let mut config_bytes = Vec::new();
        oci.pull_blob(&parsed, &oci_desc(&manifest.config), &mut config_bytes)
            .await
            .map_err(|e| pull_error("fetching the image config", &e))?;
        if sha256_digest(&config_bytes) != manifest.config.digest {
            return Err(ProviderError::Pull(format!(
                "pulling {reference}: the image config does not match its digest {}",
                manifest.config.digest
            )));
        }
        let config: ImageConfig = serde_json::from_slice(&config_bytes).map_err(|e| {
            ProviderError::Pull(format!("pulling {reference}: bad image config: {e}"))
        })?;
        if config.rootfs.diff_ids.len() != manifest.layers.len() {
            return Err(ProviderError::Pull(format!(
                "pulling {reference}: the config lists {} layers, the manifest {}",
                config.rootfs.diff_ids.len(),
                manifest.layers.len()
            )));
        }
        let chains = chain_ids(&config.rootfs.diff_ids);

        // Layers, streamed into the content store (containerd checks each digest on commit).
        for layer in &manifest.layers {
            if content_exists(client, &layer.digest).await? {
                continue;
            }
            let blob = oci
                .pull_blob_stream(&parsed, &oci_desc(layer))
                .await
                .map_err(|e| pull_error(&format!("fetching layer {}", layer.digest), &e))?;
            write_content(
                client,
                &lease.id,
                &layer.digest,
                layer.size,
                blob.stream,
                HashMap::new(),
            )
            .await
            .map_err(|e| match e {
                ProviderError::Io(m) => ProviderError::Pull(format!("pulling {reference}: {m}")),
                other => other,
            })?;
        }
        let mut config_labels = HashMap::new();
        if let Some(top) = chains.last() {
            config_labels.insert(
                format!("containerd.io/gc.ref.snapshot.{SNAPSHOTTER}"),
                top.clone(),
            );
        }
        write_bytes(client, &lease.id, &manifest.config.digest, &config_bytes, config_labels)
            .await?;
        let mut manifest_labels = HashMap::from([(
            "containerd.io/gc.ref.content.config".to_string(),
            manifest.config.digest.clone(),
        )]);
        for (i, layer) in manifest.layers.iter().enumerate() {
            manifest_labels.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                layer.digest.clone(),
            );
        }
        write_bytes(client, &lease.id, &manifest_desc.digest, &manifest_bytes, manifest_labels)
            .await?;
        if index.is_some() {
            let labels = HashMap::from([(
                "containerd.io/gc.ref.content.m.0".to_string(),
                manifest_desc.digest.clone(),
            )]);
            write_bytes(client, &lease.id, &actual, &top_bytes, labels).await?;
        }

        unpack(client, &lease.id, &manifest.layers, &config.rootfs.diff_ids, &chains).await?;

        let size = manifest.layers.iter().map(|l| l.size.max(0) as u64).sum::<u64>()
            + config_bytes.len() as u64
            + manifest_bytes.len() as u64
            + if index.is_some() { top_bytes.len() as u64 } else { 0 };
        let image = Image {
            name: name.clone(),
            labels: HashMap::from([
                (SIZE_LABEL.to_string(), size.to_string()),
                (LAST_USED_LABEL.to_string(), unix_millis().to_string()),
            ]),
            target: Some(Descriptor {
                media_type: top_type.clone(),
                digest: actual.clone(),
                size: top_bytes.len() as i64,
                annotations: HashMap::new(),
            }),
            ..Default::default()
        };
        let created = client
            .images()
            .create(client.req_leased(
                CreateImageRequest {
                    image: Some(image.clone()),
                    ..Default::default()
                },
                Some(&lease.id),
            ))
            .await;
        match created {
            Ok(_) => {}
            Err(e) if is_already_exists(&e) => {
                client
                    .images()
                    .update(client.req(UpdateImageRequest {
                        image: Some(image),
                        ..Default::default()
                    }))
                    .await
                    .map_err(|e| status_error("updating the image record", e))?;
            }
            Err(e) => return Err(status_error("creating the image record", e)),
        }
        Ok(Pulled {
            name: name.clone(),
            digest: actual.clone(),
            size,
        })
    }
    .await;
    lease.delete().await;
    result
}

fn oci_desc(d: &OciDescriptor) -> oci_client::manifest::OciDescriptor {
    oci_client::manifest::OciDescriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size,
        ..Default::default()
    }
}

async fn content_exists(client: &Client, digest: &str) -> Result<bool, ProviderError> {
    match client
        .content()
        .info(client.req(InfoRequest {
            digest: digest.to_string(),
        }))
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if is_not_found(&e) => Ok(false),
        Err(e) => Err(status_error(&format!("asking containerd for {digest}"), e)),
    }
}

async fn write_bytes(
    client: &Client,
    lease: &str,
    digest: &str,
    bytes: &[u8],
    labels: HashMap<String, String>,
) -> Result<(), ProviderError> {
    let data = bytes::Bytes::copy_from_slice(bytes);
    let stream = futures::stream::iter([Ok::<_, std::io::Error>(data)]).boxed();
    write_content(client, lease, digest, bytes.len() as i64, stream, labels).await
}

/// Writes a blob into containerd's content store under its expected digest: containerd
/// refuses the commit when what was written does not hash to it.
async fn write_content(
    client: &Client,
    lease: &str,
    digest: &str,
    size: i64,
    mut data: futures::stream::BoxStream<'static, Result<bytes::Bytes, std::io::Error>>,
    labels: HashMap<String, String>,
) -> Result<(), ProviderError> {
    // One ref per write: containerd locks a ref while it is written, so two pulls of the same
    // blob at once do not fail each other (the second commit finds it exists).
    let write_ref = format!("wasm-kubelet-{digest}-{}", crate::random_id());
    // 16 messages in flight: enough to keep the socket busy, little memory held.
    let (mut tx, rx) = futures::channel::mpsc::channel::<WriteContentRequest>(16);
    let feed = {
        let (write_ref, digest) = (write_ref.clone(), digest.to_string());
        async move {
            let mut offset = 0i64;
            while let Some(chunk) = data.next().await {
                let chunk = chunk.map_err(|e| {
                    ProviderError::Pull(format!("reading {digest} from the registry: {e}"))
                })?;
                let len = chunk.len() as i64;
                let msg = WriteContentRequest {
                    action: WriteAction::Write as i32,
                    r#ref: write_ref.clone(),
                    total: size,
                    expected: digest.clone(),
                    offset,
                    data: chunk.to_vec(),
                    labels: HashMap::new(),
                };
                offset += len;
                if tx.send(msg).await.is_err() {
                    // containerd ended the call; its status says why.
                    return Ok(());
                }
            }
            let _ = tx
                .send(WriteContentRequest {
                    action: WriteAction::Commit as i32,
                    r#ref: write_ref,
                    total: size,
                    expected: digest.clone(),
                    offset,
                    data: Vec::new(),
                    labels,
                })
                .await;
            Ok::<(), ProviderError>(())
        }
    };
    let mut content = client.content();
    let call = async {
        let mut responses = content
            .write(client.req_leased(rx, Some(lease)))
            .await?
            .into_inner();
        while responses.message().await?.is_some() {}
        Ok::<(), containerd_client::tonic::Status>(())
    };
    let (fed, written) = tokio::join!(feed, call);
    fed?;
    match written {
        Ok(()) => Ok(()),
        Err(e) if is_already_exists(&e) => Ok(()),
        Err(e) => Err(status_error(
            &format!("writing {digest} into containerd"),
            e,
        )),
    }
}

/// Unpacks `layers` into the snapshotter, each committed under its chain ID (skipped when that
/// snapshot exists already).
async fn unpack(
    client: &Client,
    lease: &str,
    layers: &[OciDescriptor],
    diff_ids: &[String],
    chains: &[String],
) -> Result<(), ProviderError> {
    for (i, layer) in layers.iter().enumerate() {
        let chain = &chains[i];
        let exists = client
            .snapshots()
            .stat(client.req(StatSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: chain.clone(),
            }))
            .await;
        match exists {
            Ok(_) => continue,
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(status_error(&format!("asking for snapshot {chain}"), e)),
        }
        let parent = if i == 0 {
            String::new()
        } else {
            chains[i - 1].clone()
        };
        let key = format!("extract-{}-{chain}", crate::random_id());
        let mounts = client
            .snapshots()
            .prepare(client.req_leased(
                PrepareSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: key.clone(),
                    parent,
                    labels: HashMap::new(),
                },
                Some(lease),
            ))
            .await
            .map_err(|e| {
                status_error(&format!("preparing snapshot for layer {}", layer.digest), e)
            })?
            .into_inner()
            .mounts;
        let applied = apply_and_commit(client, lease, layer, &key, chain, mounts).await;
        if applied.is_err() {
            let _ = client
                .snapshots()
                .remove(client.req(RemoveSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: key.clone(),
                }))
                .await;
        }
        let applied_digest = applied?;
        if let Some(digest) = applied_digest {
            if digest != diff_ids[i] {
                return Err(ProviderError::Pull(format!(
                    "layer {} unpacks to {digest}, not the {} its image config names",
                    layer.digest, diff_ids[i]
                )));
            }
        }
    }
    Ok(())
}

async fn apply_and_commit(
    client: &Client,
    lease: &str,
    layer: &OciDescriptor,
    key: &str,
    chain: &str,
    mounts: Vec<Mount>,
) -> Result<Option<String>, ProviderError> {
    let applied = client
        .diff()
        .apply(client.req_leased(
            ApplyRequest {
                diff: Some(Descriptor {
                    media_type: layer.media_type.clone(),
                    digest: layer.digest.clone(),
                    size: layer.size,
                    annotations: HashMap::new(),
                }),
                mounts,
                ..Default::default()
            },
            Some(lease),
        ))
        .await
        .map_err(|e| status_error(&format!("unpacking layer {}", layer.digest), e))?
        .into_inner()
        .applied
        .map(|d| d.digest);
    let committed = client
        .snapshots()
        .commit(client.req_leased(
            CommitSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                name: chain.to_string(),
                key: key.to_string(),
                labels: HashMap::new(),
            },
            Some(lease),
        ))
        .await;
    match committed {
        Ok(_) => Ok(applied),
        // Another pull unpacked the same layer meanwhile: ours is not needed.
        Err(e) if is_already_exists(&e) => {
            let _ = client
                .snapshots()
                .remove(client.req(RemoveSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: key.to_string(),
                }))
                .await;
            Ok(applied)
        }
        Err(e) => Err(status_error(&format!("committing snapshot {chain}"), e)),
    }
}

/// Reads a small blob (a manifest, an index, a config) from the content store.
pub async fn read_content(client: &Client, digest: &str) -> Result<Vec<u8>, ProviderError> {
    let mut stream = client
        .content()
        .read(client.req(ReadContentRequest {
            digest: digest.to_string(),
            offset: 0,
            size: 0,
        }))
        .await
        .map_err(|e| status_error(&format!("reading {digest} from containerd"), e))?
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = stream
        .message()
        .await
        .map_err(|e| status_error(&format!("reading {digest} from containerd"), e))?
    {
        out.extend_from_slice(&chunk.data);
        if out.len() > MAX_METADATA_SIZE {
            return Err(ProviderError::Io(format!(
                "{digest} is larger than {MAX_METADATA_SIZE} bytes"
            )));
        }
    }
    Ok(out)
}

/// The image record named `name` (canonical), if containerd has it.
pub async fn get_image(client: &Client, name: &str) -> Result<Option<Image>, ProviderError> {
    match client
        .images()
        .get(client.req(GetImageRequest {
            name: name.to_string(),
        }))
        .await
    {
        Ok(reply) => Ok(reply.into_inner().image),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(status_error(
            &format!("asking containerd for image {name}"),
            e,
        )),
    }
}

/// What a container needs of the image `reference`: its config and top snapshot.
pub async fn resolve(client: &Client, reference: &str) -> Result<ResolvedImage, ProviderError> {
    let name = canonical(reference)?.whole();
    let image = get_image(client, &name)
        .await?
        .ok_or_else(|| ProviderError::ImageNotPresent(reference.to_string()))?;
    let target = image
        .target
        .ok_or_else(|| ProviderError::ImageNotPresent(reference.to_string()))?;
    let top = read_content(client, &target.digest).await?;
    let top_json: serde_json::Value = serde_json::from_slice(&top)
        .map_err(|e| ProviderError::Create(format!("image {reference}: bad manifest: {e}")))?;
    let manifest_bytes = if top_json.get("manifests").is_some() {
        let index: Index = serde_json::from_slice(&top)
            .map_err(|e| ProviderError::Create(format!("image {reference}: bad index: {e}")))?;
        let entry = index
            .manifests
            .iter()
            .find(|m| {
                m.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == host_architecture())
            })
            .ok_or_else(|| {
                ProviderError::Create(format!("image {reference}: no manifest for this platform"))
            })?;
        read_content(client, &entry.digest).await?
    } else {
        top
    };
    let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| ProviderError::Create(format!("image {reference}: bad manifest: {e}")))?;
    let config_bytes = read_content(client, &manifest.config.digest).await?;
    let config: ImageConfig = serde_json::from_slice(&config_bytes)
        .map_err(|e| ProviderError::Create(format!("image {reference}: bad config: {e}")))?;
    let top_chain_id = chain_ids(&config.rootfs.diff_ids)
        .pop()
        .ok_or_else(|| ProviderError::Create(format!("image {reference} has no layers")))?;
    Ok(ResolvedImage {
        digest: target.digest,
        config,
        top_chain_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_image_spec() {
        let a = "sha256:aa".to_string();
        let b = "sha256:bb".to_string();
        let chains = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(chains[0], a);
        assert_eq!(chains[1], sha256_digest(b"sha256:aa sha256:bb"));
    }

    #[test]
    fn credentials_match_the_registry_only() {
        let auth = vec![RegistryAuth {
            registry: "https://127.0.0.1:5443/".into(),
            username: "u".into(),
            password: "p".into(),
        }];
        assert!(matches!(
            credentials_for("127.0.0.1:5443", &auth),
            OciAuth::Basic(..)
        ));
        assert!(matches!(
            credentials_for("127.0.0.1:5000", &auth),
            OciAuth::Anonymous
        ));
    }
}
