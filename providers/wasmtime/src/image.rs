//! Wasm images: pulled from OCI registries, stored content-addressed, indexed by reference.
//!
//! Start at [`ImageStore::pull`]. Two kinds of image hold a module:
//! - Wasm artifacts: a layer of one of [`WASM_LAYER_TYPES`] is the module itself;
//! - ordinary OCI (or Docker v2) images: tar(.gz) layers ([`TAR_LAYER_TYPES`]) and an image
//!   config whose `config.Entrypoint[0]` names the module's path in the root filesystem. The
//!   layers are read from the top one down ([`find_in_layers`], whiteouts honoured) until the
//!   path is found; the file must be Wasm. The image's Entrypoint and Cmd are kept as the
//!   container's default argv ([`with_image_defaults`]).
//!
//! Either way the module is stored like a Wasm layer. Layout under `<root>/images/`:
//! - `blobs/sha256/<hex>`: the module, named by its own sha256 (for a Wasm layer, the layer
//!   digest, written only after it was verified);
//! - `index.json`: reference -> manifest digest, module digest, size, entrypoint and cmd
//!   (replaced atomically), so `image_status` survives an agent restart;
//! - `last-used.json`: reference -> when it was last pulled or used (unix milliseconds), for image
//!   garbage collection; a reference missing from it counts as used when the store opened;
//! - `trash/`: what a removal is deleting. [`ImageStore::remove`] first drops the reference from
//!   the index, then renames the blob into `trash/` and deletes it there; opening the store
//!   empties `trash/` and deletes blobs (and temporary files) no index entry names, so a removal
//!   interrupted at any point leaves a consistent store.
//!
//! The OCI decisions (which layer, which platform of an index, digest checks, plain http or not,
//! which credentials, which file of which layer) are small pure functions, tested without a
//! registry. [`RegistryOptions`] adds CA certificates and plain-http registries to the defaults.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::{ImageIndexEntry, OciDescriptor, OciImageManifest, OciManifest};
use oci_client::secrets::RegistryAuth as OciAuth;
use oci_client::{Client, Reference};
use provider_api::{ImageInfo, ProviderError, RegistryAuth};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Layer media types that hold a Wasm module or component.
pub const WASM_LAYER_TYPES: &[&str] = &["application/wasm", "application/vnd.wasm.content.layer.v1+wasm", "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm"];

/// Layer media types of ordinary OCI and Docker images: tar archives, plain or gzip-compressed.
pub const TAR_LAYER_TYPES: &[&str] = &["application/vnd.oci.image.layer.v1.tar", "application/vnd.oci.image.layer.v1.tar+gzip", "application/vnd.docker.image.rootfs.diff.tar.gzip"];

/// Config media types of ordinary OCI and Docker images (they carry `config.Entrypoint`).
pub const IMAGE_CONFIG_TYPES: &[&str] = &["application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json"];

/// The first bytes of every Wasm module and component.
const WASM_MAGIC: &[u8] = b"\0asm";

/// How many symbolic links resolving an entrypoint may follow: Linux's own limit (MAXSYMLINKS
/// is 40), so an image that works in a container resolves here too, and a loop ends.
const MAX_SYMLINKS: usize = 40;

/// An image config larger than this is refused: real ones are a few KiB, and the whole document
/// is parsed in memory.
const MAX_CONFIG_BYTES: usize = 4 << 20;

/// Platform `os` values of an image index entry this provider runs.
const WASM_OSES: &[&str] = &["wasip1", "wasip2", "wasi"];

/// How the store reaches registries, beyond the defaults (https with the built-in web PKI
/// roots; plain http only for loopback registries).
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Extra CA certificates (DER) trusted for registries' TLS (`--registry-ca-file`).
    pub extra_ca_certificates: Vec<Vec<u8>>,
    /// Registries (`host[:port]`) spoken to over plain http besides loopback ones.
    pub insecure_registries: Vec<String>,
}

/// A registry CA file that cannot be used. Not retryable: the file has to be fixed.
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct CaFileError {
    pub path: PathBuf,
    pub reason: String,
}

impl RegistryOptions {
    /// Adds every certificate of the PEM bundle `pem` (read from `source`, named in errors).
    /// A bundle without a certificate is an error: the file is surely not what was meant.
    pub fn add_ca_pem(&mut self, source: &Path, pem: &[u8]) -> Result<(), CaFileError> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::CertificateDer;
        let error = |reason: String| CaFileError { path: source.to_path_buf(), reason };
        let mut found = Vec::new();
        for cert in CertificateDer::pem_slice_iter(pem) {
            found.push(cert.map_err(|e| error(format!("bad PEM: {e}")))?.as_ref().to_vec());
        }
        if found.is_empty() {
            return Err(error("no PEM certificate in it".into()));
        }
        self.extra_ca_certificates.extend(found);
        Ok(())
    }

    /// Reads the PEM bundle at `path` (see [`RegistryOptions::add_ca_pem`]).
    pub fn add_ca_file(&mut self, path: &Path) -> Result<(), CaFileError> {
        let pem = std::fs::read(path).map_err(|e| CaFileError { path: path.to_path_buf(), reason: e.to_string() })?;
        self.add_ca_pem(path, &pem)
    }

    /// The oci-client configuration with `protocol` and the extra CAs.
    fn client_config(&self, protocol: ClientProtocol) -> ClientConfig {
        ClientConfig {
            protocol,
            extra_root_certificates: self.extra_ca_certificates.iter().map(|der| Certificate { encoding: CertificateEncoding::Der, data: der.clone() }).collect(),
            ..Default::default()
        }
    }
}

/// What the index records for one pulled reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredImage {
    /// The manifest digest the reference resolved to (of the index, for a multi-platform image).
    pub manifest_digest: String,
    /// `sha256:<hex>` of the module: the Wasm layer's digest, or the module file's own for an
    /// ordinary OCI image.
    pub layer_digest: String,
    pub size: u64,
    /// The image config's `Entrypoint` (ordinary OCI images only): the container's argv[0..]
    /// when the pod gives no `command`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    /// The image config's `Cmd`: the default arguments when the pod gives neither `command`
    /// nor `args`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
}

/// The pod's `command` and `args` with the image's defaults filled in, as Kubernetes does:
/// `command` replaces the Entrypoint (and then Cmd is not used), `args` replaces Cmd.
pub fn with_image_defaults(image: &StoredImage, command: Vec<String>, args: Vec<String>) -> (Vec<String>, Vec<String>) {
    if !command.is_empty() {
        return (command, args);
    }
    let args = if args.is_empty() { image.cmd.clone() } else { args };
    (image.entrypoint.clone(), args)
}

/// The local image store; one per provider.
pub struct ImageStore {
    dir: PathBuf,
    registries: RegistryOptions,
    /// reference (canonical form) -> image. Held only for map access and the small index write.
    index: Mutex<BTreeMap<String, StoredImage>>,
    /// reference (canonical form) -> last use, unix milliseconds (see `last-used.json`).
    last_used: Mutex<BTreeMap<String, u64>>,
    /// When the store was opened: the last use of a reference it has no record of.
    opened_at: u64,
}

impl ImageStore {
    /// Opens the store under `<root>/images`, reading its index if there is one; pulls reach
    /// registries as `registries` says.
    pub fn open(root: &Path, registries: RegistryOptions) -> Result<Self, ProviderError> {
        let dir = root.join("images");
        std::fs::create_dir_all(dir.join("blobs/sha256")).map_err(|e| ProviderError::Setup(format!("creating {}: {e}", dir.display())))?;
        let index_path = dir.join("index.json");
        let index = match std::fs::read(&index_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %index_path.display(), error = %e, "image index unreadable; starting empty (images will be pulled again)");
                BTreeMap::new()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(ProviderError::Setup(format!("reading {}: {e}", index_path.display()))),
        };
        let last_used: BTreeMap<String, u64> = std::fs::read(dir.join("last-used.json")).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        let store = Self { dir, registries, index: Mutex::new(index), last_used: Mutex::new(last_used), opened_at: unix_now() };
        store.sweep();
        Ok(store)
    }

    /// The directory of the store (on the image filesystem).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Finishes removals a crash interrupted: empties `trash/` and deletes blobs no index entry
    /// names and temporary files a crashed write left.
    fn sweep(&self) {
        let trash = self.dir.join("trash");
        if trash.exists() {
            if let Err(e) = std::fs::remove_dir_all(&trash) {
                tracing::warn!(path = %trash.display(), error = %e, "cannot empty the image trash");
            }
        }
        let named: std::collections::HashSet<String> =
            self.index.lock().unwrap_or_else(|e| e.into_inner()).values().filter_map(|i| sha256_hex(&i.layer_digest).ok().map(str::to_string)).collect();
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().contains(".tmp.") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let blobs = self.dir.join("blobs/sha256");
        for entry in std::fs::read_dir(&blobs).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !named.contains(&name) {
                tracing::info!(blob = %name, "deleting a blob no image names (an interrupted pull or removal)");
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Every stored reference with its image and last use (unix milliseconds).
    pub fn list(&self) -> Vec<(String, StoredImage, u64)> {
        let index = self.index.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let used = self.last_used.lock().unwrap_or_else(|e| e.into_inner()).clone();
        index.into_iter().map(|(reference, image)| {
            let at = used.get(&reference).copied().unwrap_or(self.opened_at);
            (reference, image, at)
        }).collect()
    }

    /// Records that `reference` was used now (a pull, a container created from it). Best
    /// effort: a failed write is logged and the time is kept in memory. The file is replaced
    /// atomically (under the lock, so writers never share the temporary file) but not synced:
    /// this runs on every container start. A host crash may lose the last updates; the image
    /// then counts as used at its last recorded use (without one, when the store opened), and
    /// an image a container uses is never collected whatever its time says.
    pub fn touch(&self, reference: &str) {
        let mut used = self.last_used.lock().unwrap_or_else(|e| e.into_inner());
        used.insert(canonical(reference), unix_now());
        let path = self.dir.join("last-used.json");
        let tmp = self.dir.join(format!("last-used.json.tmp.{}", std::process::id()));
        let written = serde_json::to_vec(&*used).map_err(std::io::Error::other).and_then(|bytes| std::fs::write(&tmp, bytes)).and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "cannot record image use");
        }
    }

    /// Removes `reference` from the store. Returns the module digest and the bytes freed when
    /// its blob went too (no other reference shares it), else `None` and 0.
    pub fn remove(&self, reference: &str) -> Result<(Option<String>, u64), ProviderError> {
        let key = canonical(reference);
        let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        let Some(image) = index.remove(&key) else { return Err(ProviderError::NotFound(format!("image {reference}"))) };
        let path = self.dir.join("index.json");
        let bytes = serde_json::to_vec_pretty(&*index).map_err(|e| ProviderError::Io(format!("encoding the image index: {e}")))?;
        if let Err(e) = write_atomically(&path, &bytes) {
            index.insert(key, image);
            return Err(ProviderError::Io(format!("writing {}: {e}", path.display())));
        }
        let shared = index.values().any(|i| i.layer_digest == image.layer_digest);
        drop(index);
        self.last_used.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
        if shared {
            return Ok((None, 0));
        }
        let blob = self.blob_path(&image.layer_digest).map_err(ProviderError::Io)?;
        let freed = std::fs::metadata(&blob).map(|m| m.len()).unwrap_or(0);
        self.discard(&blob);
        Ok((Some(image.layer_digest), freed))
    }

    /// Renames `path` into `trash/` (atomic: the file is gone from where readers look) and
    /// deletes it there.
    pub fn discard(&self, path: &Path) {
        let trash = self.dir.join("trash");
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let target = trash.join(format!("{}.{}.{n}", path.file_name().unwrap_or_default().to_string_lossy(), std::process::id()));
        let moved = std::fs::create_dir_all(&trash).and_then(|()| std::fs::rename(path, &target));
        match moved {
            Ok(()) => {
                let _ = std::fs::remove_file(&target);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot move into the trash; deleting in place");
                let _ = std::fs::remove_file(path);
            }
        }
    }

    /// The image if it was pulled and its layer is still on disk.
    pub fn get(&self, reference: &str) -> Option<StoredImage> {
        let key = canonical(reference);
        let image = self.index.lock().unwrap_or_else(|e| e.into_inner()).get(&key).cloned()?;
        self.blob_path(&image.layer_digest).ok().filter(|p| p.is_file()).map(|_| image)
    }

    /// Where the blob of `digest` (`sha256:<hex>`) lives.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, String> {
        Ok(self.dir.join("blobs/sha256").join(sha256_hex(digest)?))
    }

    /// Pulls `reference`: manifest (through an index if need be), then the Wasm layer unless the
    /// store already holds it, verified against its digest; for an ordinary OCI image, the
    /// module its entrypoint names (see [`ImageStore::pull_entrypoint_module`]).
    pub async fn pull(&self, reference: &str, auth: &[RegistryAuth]) -> Result<ImageInfo, ProviderError> {
        let parsed: Reference = reference.parse().map_err(|e| ProviderError::Pull(format!("invalid image reference {reference:?}: {e}")))?;
        let registry = parsed.resolve_registry().to_string();
        let credentials = credentials_for(parsed.registry(), auth);
        let pull_err = |what: &str, e: OciDistributionError| ProviderError::Pull(format!("pulling {reference}: {what}: {}", provider_api::one_line(&e)));

        let (client, (manifest, manifest_digest)) = self.connect(&parsed, &registry, &credentials, reference).await?;
        let (manifest, manifest_ref) = match manifest {
            OciManifest::Image(m) => (m, parsed.clone()),
            OciManifest::ImageIndex(index) => {
                let entry = choose_platform(&index.manifests).ok_or_else(|| {
                    let found: Vec<String> = index.manifests.iter().map(platform_name).collect();
                    ProviderError::UnsupportedImage(format!("image {reference} is an index without a Wasm platform (wasip1, wasip2, wasi or arch wasm); it has: {}", found.join(", ")))
                })?;
                let entry_ref = parsed.clone_with_digest(entry.digest.clone());
                match client.pull_manifest(&entry_ref, &credentials).await.map_err(|e| pull_err("fetching the platform manifest", e))? {
                    (OciManifest::Image(m), _) => (m, entry_ref),
                    (OciManifest::ImageIndex(_), _) => return Err(ProviderError::UnsupportedImage(format!("image {reference}: the index entry {} is itself an index", entry.digest))),
                }
            }
        };
        let layer = match select_wasm_layer(&manifest) {
            Ok(layer) => layer,
            Err(_) if IMAGE_CONFIG_TYPES.contains(&manifest.config.media_type.as_str()) => {
                let stored = self.pull_entrypoint_module(&client, &manifest_ref, reference, &manifest, &manifest_digest).await?;
                let size = stored.size;
                self.record(reference, stored)?;
                tracing::info!(reference, digest = %manifest_digest, size, "image pulled (module from the image's entrypoint)");
                return Ok(ImageInfo { reference: reference.to_string(), digest: manifest_digest, size });
            }
            Err(found) => {
                return Err(ProviderError::UnsupportedImage(format!(
                    "image {reference} holds no Wasm layer (config media type {}, layer media types: {found}); expected a layer of {}, or an image config ({}) with layers of {}",
                    manifest.config.media_type,
                    WASM_LAYER_TYPES.join(", "),
                    IMAGE_CONFIG_TYPES.join(", "),
                    TAR_LAYER_TYPES.join(", ")
                )))
            }
        };
        let blob = self.blob_path(&layer.digest).map_err(|e| ProviderError::Pull(format!("pulling {reference}: layer {e}")))?;

        let size = if let Ok(meta) = std::fs::metadata(&blob) {
            tracing::debug!(reference, digest = %layer.digest, "layer already stored");
            meta.len()
        } else {
            let mut bytes = Vec::with_capacity(usize::try_from(layer.size).unwrap_or(0).min(64 << 20));
            client.pull_blob(&manifest_ref, layer, &mut bytes).await.map_err(|e| pull_err(&format!("fetching layer {}", layer.digest), e))?;
            verify_digest(&layer.digest, &bytes).map_err(|e| ProviderError::Pull(format!("pulling {reference}: {e}")))?;
            write_atomically(&blob, &bytes).map_err(|e| ProviderError::Io(format!("storing layer of {reference} at {}: {e}", blob.display())))?;
            bytes.len() as u64
        };
        let stored = StoredImage { manifest_digest: manifest_digest.clone(), layer_digest: layer.digest.clone(), size, entrypoint: Vec::new(), cmd: Vec::new() };
        self.record(reference, stored)?;
        tracing::info!(reference, digest = %manifest_digest, size, "image pulled");
        Ok(ImageInfo { reference: reference.to_string(), digest: manifest_digest, size })
    }

    /// Fetches the manifest over https. A registry that may speak plain http (loopback, or
    /// listed in [`RegistryOptions::insecure_registries`]) is asked again over http when https
    /// fails below HTTP (no TLS there), as Docker does for insecure registries; the client that
    /// worked goes on with the pull.
    async fn connect(&self, image: &Reference, registry: &str, credentials: &OciAuth, reference: &str) -> Result<(Client, (OciManifest, String)), ProviderError> {
        let fetch_err = |e: &OciDistributionError| format!("pulling {reference}: fetching the manifest: {}", provider_api::one_line(e));
        let https = self.client(reference, ClientProtocol::Https)?;
        match https.pull_manifest(image, credentials).await {
            Ok(found) => Ok((https, found)),
            Err(OciDistributionError::RequestError(e)) if may_use_plain_http(registry, &self.registries.insecure_registries) => {
                let over_https = provider_api::one_line(&e);
                tracing::debug!(registry, error = %over_https, "https failed below HTTP; trying plain http");
                let http = self.client(reference, ClientProtocol::HttpsExcept(vec![registry.to_string()]))?;
                match http.pull_manifest(image, credentials).await {
                    Ok(found) => Ok((http, found)),
                    Err(e) => Err(ProviderError::Pull(format!("{} (over https first: {over_https})", fetch_err(&e)))),
                }
            }
            Err(e) => Err(ProviderError::Pull(fetch_err(&e))),
        }
    }

    fn client(&self, reference: &str, protocol: ClientProtocol) -> Result<Client, ProviderError> {
        Client::try_from(self.registries.client_config(protocol)).map_err(|e| ProviderError::Setup(format!("pulling {reference}: the registry client cannot be set up: {}", provider_api::one_line(&e))))
    }

    /// The module of an ordinary OCI image: the file its config's `Entrypoint[0]` names, read
    /// from the layers top down (fetched one at a time, only as far down as needed) and stored
    /// under its own digest. An image already pulled by manifest digest is not fetched again.
    async fn pull_entrypoint_module(&self, client: &Client, image: &Reference, reference: &str, manifest: &OciImageManifest, manifest_digest: &str) -> Result<StoredImage, ProviderError> {
        let unsupported = |e: EntrypointError| ProviderError::UnsupportedImage(format!("image {reference}: {e}"));
        if let Some(layer) = manifest.layers.iter().find(|l| !TAR_LAYER_TYPES.contains(&l.media_type.as_str())) {
            return Err(ProviderError::UnsupportedImage(format!("image {reference}: layer {} has media type {}; expected one of {}", layer.digest, layer.media_type, TAR_LAYER_TYPES.join(", "))));
        }
        if let Some(known) = self.by_manifest_digest(manifest_digest) {
            tracing::debug!(reference, digest = manifest_digest, "image already stored under another reference");
            return Ok(known);
        }
        let config = self.fetch_blob(client, image, reference, &manifest.config, "config", MAX_CONFIG_BYTES).await?;
        let defaults = ContainerDefaults::parse(&config).map_err(unsupported)?;
        let path = defaults.program().map_err(unsupported)?;

        let mut search = EntrypointSearch::new(&path, manifest.layers.len()).map_err(unsupported)?;
        let mut fetched: Vec<Option<std::sync::Arc<Vec<u8>>>> = vec![None; manifest.layers.len()];
        let module = loop {
            let i = search.next_layer();
            let (Some(descriptor), Some(slot)) = (manifest.layers.get(i), fetched.get_mut(i)) else {
                return Err(ProviderError::Pull(format!("pulling {reference}: layer {i} out of range")));
            };
            let layer = match slot {
                Some(bytes) => bytes.clone(),
                None => slot.insert(std::sync::Arc::new(self.fetch_blob(client, image, reference, descriptor, "layer", usize::MAX).await?)).clone(),
            };
            // Reading a tar archive is CPU work on a possibly large buffer: off the async threads.
            let (returned, step) = tokio::task::spawn_blocking(move || {
                let step = search.feed(i, &layer);
                (search, step)
            })
            .await
            .map_err(|e| ProviderError::Pull(format!("pulling {reference}: reading layer {}: {e}", descriptor.digest)))?;
            search = returned;
            match step {
                Ok(Some(module)) => break module,
                Ok(None) => continue,
                Err(e @ EntrypointError::Layer { .. }) => return Err(ProviderError::Pull(format!("pulling {reference}: {e}"))),
                Err(e) => return Err(unsupported(e)),
            }
        };

        let digest = format!("sha256:{}", to_hex(&Sha256::digest(&module)));
        let blob = self.blob_path(&digest).map_err(|e| ProviderError::Io(format!("pulling {reference}: module {e}")))?;
        if !blob.is_file() {
            write_atomically(&blob, &module).map_err(|e| ProviderError::Io(format!("storing the module of {reference} at {}: {e}", blob.display())))?;
        }
        tracing::debug!(reference, path = %path, module = %digest, "module read from the image's layers");
        Ok(StoredImage { manifest_digest: manifest_digest.to_string(), layer_digest: digest, size: module.len() as u64, entrypoint: defaults.entrypoint, cmd: defaults.cmd })
    }

    /// Fetches one blob of `image` into memory, refusing one larger than `max` bytes by its
    /// descriptor, and checks its digest.
    async fn fetch_blob(&self, client: &Client, image: &Reference, reference: &str, descriptor: &OciDescriptor, what: &str, max: usize) -> Result<Vec<u8>, ProviderError> {
        let size = usize::try_from(descriptor.size).unwrap_or(usize::MAX);
        if size > max {
            return Err(ProviderError::UnsupportedImage(format!("image {reference}: the {what} {} is {} bytes, more than the {max} allowed", descriptor.digest, descriptor.size)));
        }
        // The capacity is a hint only: the descriptor's size is the registry's word.
        let mut bytes = Vec::with_capacity(size.min(64 << 20));
        client.pull_blob(image, descriptor, &mut bytes).await.map_err(|e| ProviderError::Pull(format!("pulling {reference}: fetching {what} {}: {}", descriptor.digest, provider_api::one_line(&e))))?;
        verify_digest(&descriptor.digest, &bytes).map_err(|e| ProviderError::Pull(format!("pulling {reference}: {what}: {e}")))?;
        Ok(bytes)
    }

    /// An image recorded under any reference with this manifest digest whose module is still
    /// on disk (the manifest digest fixes the config and every layer).
    fn by_manifest_digest(&self, manifest_digest: &str) -> Option<StoredImage> {
        let index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        let image = index.values().find(|i| i.manifest_digest == manifest_digest && !i.entrypoint.is_empty())?.clone();
        drop(index);
        self.blob_path(&image.layer_digest).ok().filter(|p| p.is_file()).map(|_| image)
    }

    /// Stores `wasm` as the single layer of `reference`, as a pull would (tests use it in place
    /// of a registry).
    #[cfg(test)]
    pub(crate) fn import(&self, reference: &str, wasm: &[u8]) -> Result<StoredImage, ProviderError> {
        let layer_digest = format!("sha256:{}", to_hex(&Sha256::digest(wasm)));
        let blob = self.blob_path(&layer_digest).map_err(ProviderError::Io)?;
        write_atomically(&blob, wasm).map_err(|e| ProviderError::Io(e.to_string()))?;
        let image = StoredImage { manifest_digest: format!("sha256:{}", to_hex(&Sha256::digest(layer_digest.as_bytes()))), layer_digest, size: wasm.len() as u64, entrypoint: Vec::new(), cmd: Vec::new() };
        self.record(reference, image.clone())?;
        Ok(image)
    }

    fn record(&self, reference: &str, image: StoredImage) -> Result<(), ProviderError> {
        let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        index.insert(canonical(reference), image);
        let path = self.dir.join("index.json");
        let bytes = serde_json::to_vec_pretty(&*index).map_err(|e| ProviderError::Io(format!("encoding the image index: {e}")))?;
        write_atomically(&path, &bytes).map_err(|e| ProviderError::Io(format!("writing {}: {e}", path.display())))
    }
}

/// (bytes allocated, files) under `path`, as `du` counts them.
pub fn tree_usage(path: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else { return (0, 0) };
    let mut total = (meta.blocks() * 512, 1);
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
            let (bytes, files) = tree_usage(&entry.path());
            total = (total.0 + bytes, total.1 + files);
        }
    }
    total
}

/// Milliseconds: two images used within a second still have an order.
fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The key a reference is indexed under: `127.0.0.1:5000/hello:v1` and `hello` (docker.io
/// library, latest) each have one canonical form.
fn canonical(reference: &str) -> String {
    reference.parse::<Reference>().map(|r| r.whole()).unwrap_or_else(|_| reference.to_string())
}

/// Writes `bytes` to a temporary sibling, syncs it and renames it over `path`.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    // Unique per call, so two concurrent writers of the same path (two pulls of one image)
    // never share a temporary file; the last rename wins with identical content.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp.{}.{n}", std::process::id()));
    let tmp = path.with_file_name(name);
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Why an ordinary OCI image yields no module. All but [`EntrypointError::Layer`] are about the
/// image itself and not retryable (UnsupportedImage); `Layer` is a broken download or archive.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntrypointError {
    /// The image config cannot be parsed.
    #[error("image config unreadable: {0}")]
    Config(String),
    /// No `config.Entrypoint`: nothing names the module.
    #[error("the image config has no Entrypoint (Cmd: {cmd:?}); the module to run is the file Entrypoint[0] names")]
    NoEntrypoint { cmd: Vec<String> },
    /// `Entrypoint[0]` is not a usable path.
    #[error("the entrypoint {0:?} is not a path in the image")]
    BadPath(String),
    /// No layer holds the path.
    #[error("the entrypoint {path} is in none of the image's {layers} layers")]
    NotFound { path: String, layers: usize },
    /// A whiteout in a layer deleted the path (or a directory above it).
    #[error("the entrypoint {path} was deleted by the whiteout {whiteout} in layer {layer}")]
    Deleted { path: String, layer: usize, whiteout: String },
    /// The path is a directory, device or the like.
    #[error("the entrypoint {path} is a {kind} in layer {layer}, not a file")]
    NotAFile { path: String, layer: usize, kind: String },
    /// Symbolic links that loop or chain too deep.
    #[error("the entrypoint {path} passes through more than {MAX_SYMLINKS} links")]
    TooManyLinks { path: String },
    /// The file is there but is not a Wasm module or component.
    #[error("the entrypoint {path} is not WebAssembly: {found}")]
    NotWasm { path: String, found: String },
    /// A layer is not a readable (gzip-compressed) tar archive.
    #[error("layer {layer} is not a readable tar archive: {reason}")]
    Layer { layer: usize, reason: String },
}

/// The part of an OCI/Docker image config this provider reads: the container defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerDefaults {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: String,
}

impl ContainerDefaults {
    /// Reads `config.Entrypoint`, `config.Cmd` and `config.WorkingDir` (each may be absent or
    /// null) from an image config document.
    pub fn parse(document: &[u8]) -> Result<Self, EntrypointError> {
        #[derive(Deserialize)]
        struct File {
            config: Option<Defaults>,
        }
        #[derive(Deserialize)]
        struct Defaults {
            #[serde(rename = "Entrypoint")]
            entrypoint: Option<Vec<String>>,
            #[serde(rename = "Cmd")]
            cmd: Option<Vec<String>>,
            #[serde(rename = "WorkingDir")]
            working_dir: Option<String>,
        }
        let file: File = serde_json::from_slice(document).map_err(|e| EntrypointError::Config(e.to_string()))?;
        let defaults = file.config.map(|d| ContainerDefaults { entrypoint: d.entrypoint.unwrap_or_default(), cmd: d.cmd.unwrap_or_default(), working_dir: d.working_dir.unwrap_or_default() });
        Ok(defaults.unwrap_or_default())
    }

    /// The module's path in the root filesystem (normalised, no leading `/`): `Entrypoint[0]`,
    /// relative to `WorkingDir` (else `/`) when it is not absolute.
    pub fn program(&self) -> Result<String, EntrypointError> {
        let first = self.entrypoint.first().filter(|p| !p.is_empty()).ok_or_else(|| EntrypointError::NoEntrypoint { cmd: self.cmd.clone() })?;
        let full = if first.starts_with('/') { first.clone() } else { format!("{}/{first}", self.working_dir) };
        normalise_path(&full).filter(|p| !p.is_empty()).ok_or_else(|| EntrypointError::BadPath(first.clone()))
    }
}

/// `path` as a tar entry names it: no leading `/` or `./`, no `.` or empty components, `..`
/// resolved (above the root stays at the root, as in a chroot). `None` for a path that is not
/// valid UTF-8 in a way a tar name could not be either (a NUL byte).
pub fn normalise_path(path: &str) -> Option<String> {
    if path.contains('\0') {
        return None;
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    Some(parts.join("/"))
}

/// The search for the entrypoint file through an image's layers, one layer at a time, so the
/// caller fetches only the layers it needs: ask [`EntrypointSearch::next_layer`], fetch it,
/// [`EntrypointSearch::feed`] it, until the module comes back.
///
/// Layers apply bottom (0) to top, so the search goes top down: the first layer holding the
/// path wins; a whiteout (`.wh.<name>`) of the path or a directory above it, or an opaque
/// whiteout (`.wh..wh..opq`) in a directory above it, hides everything below. A symbolic link
/// restarts the search from the top with its target; a hard link with its target in the same
/// layer. Not handled: a directory above the path that is itself a symbolic link.
#[derive(Debug, Clone)]
pub struct EntrypointSearch {
    path: String,
    layers: usize,
    next: usize,
    links: usize,
}

/// What one layer says about a path.
#[derive(Debug, PartialEq, Eq)]
enum LayerHit {
    File(Vec<u8>),
    SymLink(String),
    HardLink(String),
    /// A directory, device or the like.
    Special(&'static str),
    /// A whiteout hides the path and everything below this layer.
    Hidden(String),
    Absent,
}

impl EntrypointSearch {
    /// Starts at the top layer of `layers` for `path` (normalised, see [`normalise_path`]).
    pub fn new(path: &str, layers: usize) -> Result<Self, EntrypointError> {
        let next = layers.checked_sub(1).ok_or_else(|| EntrypointError::NotFound { path: format!("/{path}"), layers })?;
        Ok(Self { path: path.to_string(), layers, next, links: 0 })
    }

    /// The index of the layer to feed next (0 is the bottom layer).
    pub fn next_layer(&self) -> usize {
        self.next
    }

    /// Reads layer `index` (a tar archive, gzip-compressed or not: told by its first bytes):
    /// `Some(module)` when the search ends there, `None` to feed [`Self::next_layer`].
    pub fn feed(&mut self, index: usize, layer: &[u8]) -> Result<Option<Vec<u8>>, EntrypointError> {
        let shown = format!("/{}", self.path);
        let hit = if layer.starts_with(&[0x1f, 0x8b]) {
            search_layer(flate2::read::GzDecoder::new(layer), &self.path)
        } else {
            search_layer(layer, &self.path)
        }
        .map_err(|reason| EntrypointError::Layer { layer: index, reason })?;
        match hit {
            LayerHit::File(bytes) if bytes.starts_with(WASM_MAGIC) => Ok(Some(bytes)),
            LayerHit::File(bytes) => Err(EntrypointError::NotWasm { path: shown, found: describe_head(&bytes) }),
            LayerHit::Hidden(whiteout) => Err(EntrypointError::Deleted { path: shown, layer: index, whiteout }),
            LayerHit::Absent => match index.checked_sub(1) {
                Some(below) => {
                    self.next = below;
                    Ok(None)
                }
                None => Err(EntrypointError::NotFound { path: shown, layers: self.layers }),
            },
            LayerHit::Special(kind) => Err(EntrypointError::NotAFile { path: shown, layer: index, kind: kind.into() }),
            LayerHit::SymLink(target) | LayerHit::HardLink(target) if target.is_empty() => Err(EntrypointError::NotAFile { path: shown, layer: index, kind: "link to the root directory".into() }),
            LayerHit::SymLink(target) => {
                self.follow(target)?;
                self.next = self.layers - 1;
                Ok(None)
            }
            LayerHit::HardLink(target) => {
                self.follow(target)?;
                self.next = index;
                Ok(None)
            }
        }
    }

    fn follow(&mut self, target: String) -> Result<(), EntrypointError> {
        self.links += 1;
        if self.links > MAX_SYMLINKS {
            return Err(EntrypointError::TooManyLinks { path: format!("/{}", self.path) });
        }
        self.path = target;
        Ok(())
    }
}

/// Scans one tar archive for `path` (see [`EntrypointSearch`]). Errors are the archive's.
fn search_layer(archive: impl std::io::Read, path: &str) -> Result<LayerHit, String> {
    use std::io::Read;
    let mut hidden: Option<String> = None;
    let mut archive = tar::Archive::new(archive);
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| e.to_string())?;
        let raw = entry.path_bytes();
        let Some(name) = std::str::from_utf8(&raw).ok().and_then(normalise_path) else { continue };
        drop(raw);
        let (parent, base) = match name.rsplit_once('/') {
            Some((parent, base)) => (parent.to_string(), base.to_string()),
            None => (String::new(), name.clone()),
        };
        if name == path {
            use tar::EntryType;
            let kind = entry.header().entry_type();
            return match kind {
                EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                    // The capacity is a hint from the header, bounded: the reader ends the read.
                    let mut bytes = Vec::with_capacity(usize::try_from(entry.size()).unwrap_or(0).min(64 << 20));
                    entry.read_to_end(&mut bytes).map_err(|e| format!("reading /{path}: {e}"))?;
                    Ok(LayerHit::File(bytes))
                }
                EntryType::Symlink | EntryType::Link => {
                    let target = entry.link_name_bytes().map(|t| String::from_utf8_lossy(&t).into_owned()).unwrap_or_default();
                    // A symbolic link's relative target is relative to its directory; a hard
                    // link names a path from the archive's root.
                    let joined = if kind == EntryType::Symlink && !target.starts_with('/') { format!("{parent}/{target}") } else { target.clone() };
                    let resolved = normalise_path(&joined).ok_or_else(|| format!("/{path} links to {target:?}"))?;
                    Ok(if kind == EntryType::Symlink { LayerHit::SymLink(resolved) } else { LayerHit::HardLink(resolved) })
                }
                other => Ok(LayerHit::Special(entry_kind(other))),
            };
        }
        if hidden.is_some() {
            continue;
        }
        if base == ".wh..wh..opq" {
            if parent.is_empty() || path.starts_with(&format!("{parent}/")) {
                hidden = Some(format!("/{name}"));
            }
        } else if let Some(deleted) = base.strip_prefix(".wh.") {
            let deleted = if parent.is_empty() { deleted.to_string() } else { format!("{parent}/{deleted}") };
            if path == deleted || path.starts_with(&format!("{deleted}/")) {
                hidden = Some(format!("/{name}"));
            }
        }
    }
    // A whiteout applies to the layers below only: the path in this same layer would have won.
    Ok(hidden.map(LayerHit::Hidden).unwrap_or(LayerHit::Absent))
}

fn entry_kind(kind: tar::EntryType) -> &'static str {
    use tar::EntryType;
    match kind {
        EntryType::Directory => "directory",
        EntryType::Char => "character device",
        EntryType::Block => "block device",
        EntryType::Fifo => "FIFO",
        _ => "special entry",
    }
}

/// What a file that is not Wasm starts with, for the error.
fn describe_head(bytes: &[u8]) -> String {
    let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
    let guess = if bytes.starts_with(b"\x7fELF") {
        " (an ELF executable: a native binary, not a Wasm module)"
    } else if bytes.starts_with(b"#!") {
        " (a script)"
    } else if bytes.is_empty() {
        " (the file is empty)"
    } else {
        ""
    };
    format!("{} bytes starting with [{}]{guess}; a Wasm module starts with 00 61 73 6d", bytes.len(), head.join(" "))
}

/// The first layer holding Wasm, or the list of media types found (for the error).
pub fn select_wasm_layer(manifest: &OciImageManifest) -> Result<&OciDescriptor, String> {
    manifest.layers.iter().find(|l| WASM_LAYER_TYPES.contains(&l.media_type.as_str())).ok_or_else(|| {
        if manifest.layers.is_empty() {
            "none, the manifest has no layers".to_string()
        } else {
            manifest.layers.iter().map(|l| l.media_type.as_str()).collect::<Vec<_>>().join(", ")
        }
    })
}

/// The index entry for a Wasm platform: the first whose `os` is wasip1, wasip2 or wasi, or
/// whose architecture is `wasm`.
pub fn choose_platform(entries: &[ImageIndexEntry]) -> Option<&ImageIndexEntry> {
    entries.iter().find(|e| e.platform.as_ref().is_some_and(|p| WASM_OSES.contains(&p.os.as_str()) || p.architecture == "wasm"))
}

fn platform_name(entry: &ImageIndexEntry) -> String {
    match &entry.platform {
        Some(p) => format!("{}/{}", p.os, p.architecture),
        None => "(no platform)".into(),
    }
}

/// The hex of a `sha256:<64 lowercase hex>` digest; anything else is refused (it also becomes a
/// file name, so nothing else may pass).
pub fn sha256_hex(digest: &str) -> Result<&str, String> {
    let hex = digest.strip_prefix("sha256:").ok_or_else(|| format!("digest {digest:?} is not sha256"))?;
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(hex)
    } else {
        Err(format!("digest {digest:?} is malformed"))
    }
}

/// Lowercase hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks that `bytes` hash to `expected` (`sha256:<hex>`).
pub fn verify_digest(expected: &str, bytes: &[u8]) -> Result<(), String> {
    let want = sha256_hex(expected)?;
    let got = to_hex(&Sha256::digest(bytes));
    if got == want {
        Ok(())
    } else {
        Err(format!("digest mismatch: expected {expected}, got sha256:{got}"))
    }
}

/// Whether plain http may be used (after https failed) for a registry: only on loopback
/// (127.0.0.0/8, ::1, localhost) or when named in `insecure` (`host[:port]`, as
/// [`RegistryOptions::insecure_registries`]).
pub fn may_use_plain_http(registry: &str, insecure: &[String]) -> bool {
    let want = normalise_registry(registry);
    is_loopback_registry(registry) || insecure.iter().any(|i| normalise_registry(i) == want)
}


/// Whether `host[:port]` names this machine's loopback.
pub fn is_loopback_registry(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else if registry.matches(':').count() > 1 {
        registry // a bare IPv6 address
    } else {
        registry.split(':').next().unwrap_or("")
    };
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Basic credentials whose registry matches `registry` (Docker Hub's aliases count as one);
/// anonymous when none does.
pub fn credentials_for(registry: &str, auth: &[RegistryAuth]) -> OciAuth {
    let want = normalise_registry(registry);
    auth.iter().find(|a| normalise_registry(&a.registry) == want).map(|a| OciAuth::Basic(a.username.clone(), a.password.clone())).unwrap_or(OciAuth::Anonymous)
}

/// `https://index.docker.io/v1/` -> `docker.io`; `127.0.0.1:5000/` -> `127.0.0.1:5000`.
fn normalise_registry(registry: &str) -> String {
    let r = registry.trim();
    let r = r.strip_prefix("https://").or_else(|| r.strip_prefix("http://")).unwrap_or(r);
    let host = r.split('/').next().unwrap_or("").to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".into(),
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    /// A fresh store directory for one test.
    fn store_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("wk-images-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn removal_keeps_a_blob_another_reference_shares_and_discards_the_last() {
        let dir = store_dir("remove");
        let store = ImageStore::open(&dir, RegistryOptions::default()).unwrap();
        let a = store.import("127.0.0.1:5000/a:v1", b"\0asm\x01\0\0\0shared").unwrap();
        store.import("127.0.0.1:5000/b:v1", b"\0asm\x01\0\0\0shared").unwrap();
        let blob = store.blob_path(&a.layer_digest).unwrap();
        assert_eq!(store.remove("127.0.0.1:5000/a:v1").unwrap(), (None, 0));
        assert!(blob.is_file(), "b still needs it");
        let (digest, freed) = store.remove("127.0.0.1:5000/b:v1").unwrap();
        assert_eq!((digest.as_deref(), freed), (Some(a.layer_digest.as_str()), 14));
        assert!(!blob.exists());
        assert!(matches!(store.remove("127.0.0.1:5000/b:v1"), Err(ProviderError::NotFound(_))));
        assert!(store.list().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn opening_finishes_an_interrupted_removal() {
        let dir = store_dir("sweep");
        let store = ImageStore::open(&dir, RegistryOptions::default()).unwrap();
        let kept = store.import("127.0.0.1:5000/kept:v1", b"\0asm\x01\0\0\0kept").unwrap();
        let gone = store.import("127.0.0.1:5000/gone:v1", b"\0asm\x01\0\0\0gone").unwrap();
        store.touch("127.0.0.1:5000/kept:v1");
        // A crash after the index dropped `gone` but before its blob left; and one in the
        // middle of deleting from the trash, and of writing a blob.
        let mut index = store.index.lock().unwrap().clone();
        index.remove(&canonical("127.0.0.1:5000/gone:v1"));
        write_atomically(&dir.join("images/index.json"), &serde_json::to_vec(&index).unwrap()).unwrap();
        std::fs::create_dir_all(dir.join("images/trash")).unwrap();
        std::fs::write(dir.join("images/trash/abc.1.0"), b"half deleted").unwrap();
        std::fs::write(dir.join("images/blobs/sha256/def.tmp.1.0"), b"half written").unwrap();
        std::fs::write(dir.join("images/last-used.json.tmp.1"), b"{").unwrap();
        drop(store);
        // The clock moves on before the restart (last uses are in milliseconds).
        std::thread::sleep(std::time::Duration::from_millis(5));

        let store = ImageStore::open(&dir, RegistryOptions::default()).unwrap();
        assert!(store.get("127.0.0.1:5000/kept:v1").is_some());
        assert!(store.get("127.0.0.1:5000/gone:v1").is_none());
        assert!(!store.blob_path(&gone.layer_digest).unwrap().exists(), "the orphaned blob is deleted");
        assert!(store.blob_path(&kept.layer_digest).unwrap().is_file());
        assert!(!dir.join("images/trash").exists(), "the trash is emptied");
        assert!(!dir.join("images/blobs/sha256/def.tmp.1.0").exists());
        assert!(!dir.join("images/last-used.json.tmp.1").exists());
        let listed = store.list();
        assert_eq!(listed.len(), 1);
        assert!(listed[0].2 < store.opened_at, "the recorded last use survives the restart");
        let _ = std::fs::remove_dir_all(&dir);
    }
    use super::*;
    use oci_client::manifest::Platform;

    fn descriptor(media_type: &str) -> OciDescriptor {
        OciDescriptor { media_type: media_type.into(), digest: format!("sha256:{}", "a".repeat(64)), size: 1, ..Default::default() }
    }

    #[test]
    fn selects_the_wasm_layer_by_media_type() {
        for media_type in WASM_LAYER_TYPES {
            let manifest = OciImageManifest { layers: vec![descriptor("application/vnd.oci.image.config.v1+json"), descriptor(media_type)], ..Default::default() };
            assert_eq!(select_wasm_layer(&manifest).unwrap().media_type, *media_type);
        }
        let container = OciImageManifest { layers: vec![descriptor("application/vnd.oci.image.layer.v1.tar+gzip"), descriptor("application/vnd.docker.image.rootfs.diff.tar.gzip")], ..Default::default() };
        let found = select_wasm_layer(&container).unwrap_err();
        assert!(found.contains("application/vnd.oci.image.layer.v1.tar+gzip") && found.contains("rootfs.diff.tar.gzip"), "{found}");
    }

    fn entry(os: &str, arch: &str, digest: char) -> ImageIndexEntry {
        ImageIndexEntry {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            digest: format!("sha256:{}", digest.to_string().repeat(64)),
            size: 1,
            platform: Some(Platform { architecture: arch.into(), os: os.into(), os_version: None, os_features: None, variant: None, features: None }),
            annotations: None,
        }
    }

    #[test]
    fn chooses_the_wasm_platform_of_an_index() {
        let index = vec![entry("linux", "amd64", 'a'), entry("linux", "arm64", 'b'), entry("wasip1", "wasm32", 'c')];
        assert_eq!(choose_platform(&index).unwrap().digest, format!("sha256:{}", "c".repeat(64)));
        let index = vec![entry("linux", "amd64", 'a'), entry("wasip2", "wasm32", 'd')];
        assert!(choose_platform(&index).unwrap().digest.contains('d'));
        let index = vec![entry("unknown", "wasm", 'e')];
        assert!(choose_platform(&index).is_some());
        assert!(choose_platform(&[entry("linux", "amd64", 'a')]).is_none());
    }

    #[test]
    fn verifies_sha256_digests() {
        // sha256("hello")
        let good = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        assert_eq!(verify_digest(good, b"hello"), Ok(()));
        assert!(verify_digest(good, b"hellO").unwrap_err().contains("mismatch"));
        assert!(verify_digest("sha512:abcd", b"hello").is_err());
        assert!(sha256_hex("sha256:../../etc/passwd").is_err());
        assert!(sha256_hex(&format!("sha256:{}", "A".repeat(64))).is_err());
    }

    #[test]
    fn plain_http_only_on_loopback() {
        for r in ["127.0.0.1:5000", "127.3.2.1", "localhost:5000", "[::1]:5000", "::1", "LOCALHOST"] {
            assert!(is_loopback_registry(r), "{r}");
        }
        for r in ["10.0.0.1:5000", "registry.example.com", "docker.io", "localhost.evil.com:5000", "[::2]:5000"] {
            assert!(!is_loopback_registry(r), "{r}");
        }
        assert!(may_use_plain_http("127.0.0.1:5056", &[]));
        assert!(!may_use_plain_http("ghcr.io", &[]));
        let insecure = vec!["registry.lan:5000".to_string()];
        assert!(may_use_plain_http("registry.lan:5000", &insecure));
        assert!(!may_use_plain_http("registry.lan:5001", &insecure));
    }

    #[test]
    fn credentials_match_the_registry_host() {
        let auth = vec![
            RegistryAuth { registry: "127.0.0.1:5443".into(), username: "u1".into(), password: "p1".into() },
            RegistryAuth { registry: "https://index.docker.io/v1/".into(), username: "u2".into(), password: "p2".into() },
        ];
        assert_eq!(credentials_for("127.0.0.1:5443", &auth), OciAuth::Basic("u1".into(), "p1".into()));
        assert_eq!(credentials_for("docker.io", &auth), OciAuth::Basic("u2".into(), "p2".into()));
        assert_eq!(credentials_for("127.0.0.1:5000", &auth), OciAuth::Anonymous);
    }

    /// One tar entry of a test layer.
    enum E<'a> {
        File(&'a str, &'a [u8]),
        Dir(&'a str),
        Sym(&'a str, &'a str),
        Hard(&'a str, &'a str),
    }

    /// A tar layer, gzip-compressed when `gzip`, built in memory.
    fn layer(entries: &[E], gzip: bool) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for entry in entries {
            let mut header = tar::Header::new_gnu();
            header.set_mode(0o755);
            let (path, data, kind, link): (&str, &[u8], tar::EntryType, Option<&str>) = match entry {
                E::File(path, data) => (path, data, tar::EntryType::Regular, None),
                E::Dir(path) => (path, b"", tar::EntryType::Directory, None),
                E::Sym(path, target) => (path, b"", tar::EntryType::Symlink, Some(target)),
                E::Hard(path, target) => (path, b"", tar::EntryType::Link, Some(target)),
            };
            header.set_entry_type(kind);
            header.set_size(data.len() as u64);
            if let Some(link) = link {
                header.set_link_name(link).unwrap();
            }
            builder.append_data(&mut header, path, data).unwrap();
        }
        let tar = builder.into_inner().unwrap();
        if !gzip {
            return tar;
        }
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        gz.finish().unwrap()
    }

    const MODULE: &[u8] = b"\0asm\x01\0\0\0";
    const OTHER_MODULE: &[u8] = b"\0asm\x01\0\0\0\x00\x01";

    /// Runs a search over `layers` (bottom first); returns the module and the layers read.
    fn find(path: &str, layers: &[Vec<u8>]) -> (Result<Vec<u8>, EntrypointError>, Vec<usize>) {
        let mut read = Vec::new();
        let mut search = match EntrypointSearch::new(path, layers.len()) {
            Ok(s) => s,
            Err(e) => return (Err(e), read),
        };
        loop {
            let i = search.next_layer();
            read.push(i);
            match search.feed(i, &layers[i]) {
                Ok(Some(module)) => return (Ok(module), read),
                Ok(None) => continue,
                Err(e) => return (Err(e), read),
            }
        }
    }

    #[test]
    fn finds_the_entrypoint_in_tar_and_gzip_layers() {
        for gzip in [true, false] {
            let layers = vec![layer(&[E::Dir("app/"), E::File("app/hello.wasm", MODULE)], gzip)];
            assert_eq!(find("app/hello.wasm", &layers).0, Ok(MODULE.to_vec()));
        }
        // Names as tar tools write them: with a leading ./ or /.
        let layers = vec![layer(&[E::File("./app/a.wasm", MODULE)], true)];
        assert_eq!(find("app/a.wasm", &layers).0, Ok(MODULE.to_vec()));
    }

    #[test]
    fn later_layers_win_and_only_needed_layers_are_read() {
        let layers = vec![layer(&[E::File("app/x.wasm", MODULE)], true), layer(&[E::File("etc/other", b"x")], true), layer(&[E::File("app/x.wasm", OTHER_MODULE)], true)];
        assert_eq!(find("app/x.wasm", &layers), (Ok(OTHER_MODULE.to_vec()), vec![2]));
        let layers = vec![layer(&[E::File("app/x.wasm", MODULE)], true), layer(&[E::File("etc/other", b"x")], true)];
        assert_eq!(find("app/x.wasm", &layers), (Ok(MODULE.to_vec()), vec![1, 0]));
    }

    #[test]
    fn whiteouts_hide_lower_layers() {
        let base = layer(&[E::File("app/x.wasm", MODULE)], true);
        for (whiteout, shown) in [("app/.wh.x.wasm", "/app/.wh.x.wasm"), (".wh.app", "/.wh.app"), ("app/.wh..wh..opq", "/app/.wh..wh..opq")] {
            let layers = vec![base.clone(), layer(&[E::File(whiteout, b"")], true)];
            match find("app/x.wasm", &layers).0 {
                Err(EntrypointError::Deleted { layer: 1, whiteout: w, .. }) => assert_eq!(w, shown),
                other => panic!("{whiteout}: {other:?}"),
            }
        }
        // A whiteout of a sibling hides nothing; one in the same layer as the file yields to it.
        let layers = vec![base.clone(), layer(&[E::File("app/.wh.x.wasmy", b"")], true)];
        assert_eq!(find("app/x.wasm", &layers).0, Ok(MODULE.to_vec()));
        let layers = vec![base, layer(&[E::File("app/.wh..wh..opq", b""), E::File("app/x.wasm", OTHER_MODULE)], true)];
        assert_eq!(find("app/x.wasm", &layers).0, Ok(OTHER_MODULE.to_vec()));
    }

    #[test]
    fn links_are_followed_and_loops_end() {
        let layers = vec![layer(&[E::File("opt/app/x.wasm", MODULE)], true), layer(&[E::Sym("bin/app", "../opt/app/x.wasm")], true)];
        assert_eq!(find("bin/app", &layers).0, Ok(MODULE.to_vec()));
        let layers = vec![layer(&[E::File("opt/x.wasm", MODULE), E::Hard("bin/app", "opt/x.wasm")], false)];
        assert_eq!(find("bin/app", &layers).0, Ok(MODULE.to_vec()));
        let layers = vec![layer(&[E::Sym("a", "/b"), E::Sym("b", "a")], true)];
        assert!(matches!(find("a", &layers).0, Err(EntrypointError::TooManyLinks { .. })));
    }

    #[test]
    fn what_is_not_a_wasm_file_is_named() {
        let layers = vec![layer(&[E::File("bin/app", b"\x7fELF\x02\x01\x01\0rest"), E::Dir("app/")], true)];
        let err = find("bin/app", &layers).0.unwrap_err();
        assert!(matches!(err, EntrypointError::NotWasm { .. }) && err.to_string().contains("ELF"), "{err}");
        let err = find("app", &layers).0.unwrap_err();
        assert_eq!(err, EntrypointError::NotAFile { path: "/app".into(), layer: 0, kind: "directory".into() });
        let err = find("app/missing.wasm", &layers).0.unwrap_err();
        assert_eq!(err.to_string(), "the entrypoint /app/missing.wasm is in none of the image's 1 layers");
        assert!(matches!(find("x", &[]).0, Err(EntrypointError::NotFound { layers: 0, .. })));
        // Gzip magic and then garbage: the archive's own error, as a Layer error.
        assert!(matches!(find("x", &[vec![0x1f, 0x8b, 0, 0]]).0, Err(EntrypointError::Layer { layer: 0, .. })));
    }

    #[test]
    fn the_image_config_names_the_program_and_its_defaults() {
        let c = ContainerDefaults::parse(br#"{"architecture":"wasm","config":{"Entrypoint":["/app/hello.wasm","-q"],"Cmd":["world"]}}"#).unwrap();
        assert_eq!((c.program().unwrap(), c.entrypoint.len(), c.cmd.clone()), ("app/hello.wasm".into(), 2, vec!["world".to_string()]));
        let c = ContainerDefaults::parse(br#"{"config":{"Entrypoint":["hello.wasm"],"Cmd":null,"WorkingDir":"/srv/./app"}}"#).unwrap();
        assert_eq!(c.program().unwrap(), "srv/app/hello.wasm");
        assert!(c.cmd.is_empty());
        let err = ContainerDefaults::parse(br#"{"config":{"Cmd":["/app/hello.wasm"]}}"#).unwrap().program().unwrap_err();
        assert!(err.to_string().contains("no Entrypoint") && err.to_string().contains("/app/hello.wasm"), "{err}");
        assert!(matches!(ContainerDefaults::parse(b"{}").unwrap().program(), Err(EntrypointError::NoEntrypoint { .. })));
        assert!(matches!(ContainerDefaults::parse(b"[1]"), Err(EntrypointError::Config(_))));
        assert!(matches!(ContainerDefaults::parse(br#"{"config":{"Entrypoint":["/"]}}"#).unwrap().program(), Err(EntrypointError::BadPath(_))));
        assert_eq!(normalise_path("/a/../../b/./c//d"), Some("b/c/d".into()));
    }

    #[test]
    fn command_and_args_replace_entrypoint_and_cmd() {
        let v = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let image = StoredImage { manifest_digest: String::new(), layer_digest: String::new(), size: 0, entrypoint: v(&["/app/x.wasm", "-q"]), cmd: v(&["world"]) };
        assert_eq!(with_image_defaults(&image, v(&[]), v(&[])), (v(&["/app/x.wasm", "-q"]), v(&["world"])));
        assert_eq!(with_image_defaults(&image, v(&[]), v(&["moon"])), (v(&["/app/x.wasm", "-q"]), v(&["moon"])));
        assert_eq!(with_image_defaults(&image, v(&["tool"]), v(&[])), (v(&["tool"]), v(&[])));
        assert_eq!(with_image_defaults(&image, v(&["tool"]), v(&["a"])), (v(&["tool"]), v(&["a"])));
        // A Wasm artifact has no defaults: the pod's values as given.
        let artifact = StoredImage { entrypoint: vec![], cmd: vec![], ..image };
        assert_eq!(with_image_defaults(&artifact, v(&[]), v(&["a"])), (v(&[]), v(&["a"])));
    }

    #[test]
    fn a_registry_ca_file_must_hold_a_certificate() {
        let mut options = RegistryOptions::default();
        let err = options.add_ca_pem(Path::new("/ca.pem"), b"not a certificate\n").unwrap_err();
        assert_eq!(err.to_string(), "/ca.pem: no PEM certificate in it");
        assert!(options.add_ca_file(Path::new("/nonexistent/ca.pem")).is_err());
        assert!(options.extra_ca_certificates.is_empty());
    }

    #[test]
    fn the_index_survives_a_reopen() {
        let root = std::env::temp_dir().join(format!("wk-images-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let store = ImageStore::open(&root, RegistryOptions::default()).unwrap();
        let digest = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        write_atomically(&store.blob_path(digest).unwrap(), b"hello").unwrap();
        let image = StoredImage { manifest_digest: format!("sha256:{}", "b".repeat(64)), layer_digest: digest.into(), size: 5, entrypoint: vec!["/app/x.wasm".into()], cmd: vec!["-v".into()] };
        store.record("127.0.0.1:5000/hello:v1", image.clone()).unwrap();
        drop(store);
        let store = ImageStore::open(&root, RegistryOptions::default()).unwrap();
        assert_eq!(store.get("127.0.0.1:5000/hello:v1"), Some(image));
        assert_eq!(store.get("127.0.0.1:5000/hello:v2"), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
