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
//! registry. [`RegistryOptions`] (provider_api's, shared with the containerd provider) adds CA
//! certificates, plain-http registries and hosts.toml mirrors to the defaults.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use oci_client::client::ClientProtocol;
use oci_client::errors::OciDistributionError;
use oci_client::manifest::{ImageIndexEntry, OciDescriptor, OciImageManifest, OciManifest};
use oci_client::secrets::RegistryAuth as OciAuth;
use oci_client::RegistryOperation;
use oci_client::{Client, Reference};
use provider_api::{Cause, ImageInfo, ProviderError, RegistryAuth};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Layer media types that hold a Wasm module or component.
pub const WASM_LAYER_TYPES: &[&str] = &[
    "application/wasm",
    "application/vnd.wasm.content.layer.v1+wasm",
    "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm",
];

/// Layer media types of ordinary OCI and Docker images: tar archives, plain or gzip-compressed.
pub const TAR_LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
];

/// Config media types of ordinary OCI and Docker images (they carry `config.Entrypoint`).
pub const IMAGE_CONFIG_TYPES: &[&str] = &[
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];

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

/// A manifest or index larger than this is refused before it is parsed: containerd refuses
/// manifests over 4 MiB too (real ones are a few KiB; even a 1,000-platform index is ~500 KiB),
/// and the whole document is held in memory to be parsed.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;

/// How much of a registry's error body reaches a message (an Event, the pod's status): enough
/// for a registry's JSON error (`{"errors":[{"code":"MANIFEST_UNKNOWN",...}]}` is ~100 bytes),
/// too little to carry a page of whatever answered on that address. The registry is named by the
/// pod; its answer is the outside world's text, and Events are readable by every namespace user.
pub const MAX_ERROR_BODY_BYTES: usize = 256;

/// `--max-module-size` default: 256 MiB. The largest real Wasm programs (CPython or .NET
/// runtimes with their libraries linked in) are ~100 MiB; a module is held in memory to be
/// compiled, and cranelift needs several times that while it compiles, so this bounds what one
/// image can make the agent allocate.
pub const DEFAULT_MAX_MODULE_SIZE: u64 = 256 << 20;

/// `--max-layer-uncompressed-size` default: 1 GiB. A tar layer of an ordinary OCI image is read
/// (streamed, never held whole) until the entrypoint is found; a gzip layer can inflate a
/// thousandfold (a decompression bomb), so reading stops here. 1 GiB leaves room for a whole
/// base filesystem beside the module.
pub const DEFAULT_MAX_LAYER_UNCOMPRESSED_SIZE: u64 = 1 << 30;

/// How often a pull under way logs how many bytes it received (dockershim's 10 s).
const PULL_PROGRESS_INTERVAL: Duration = Duration::from_secs(10);

/// `--image-pull-progress-deadline` default: the kubelet's (1m).
pub const DEFAULT_PULL_PROGRESS_DEADLINE: Duration = Duration::from_secs(60);

use provider_api::registries::oci::{client_config, reference_on};
pub use provider_api::registries::{Endpoint, RegistryConfigError, RegistryOptions};

/// What one pull may cost; [`PullLimits::default`] holds the agent's defaults.
#[derive(Debug, Clone)]
pub struct PullLimits {
    /// The largest module stored (a Wasm layer, or the entrypoint file of an ordinary image),
    /// `--max-module-size`.
    pub max_module_size: u64,
    /// The most bytes one tar layer may inflate to while it is searched,
    /// `--max-layer-uncompressed-size`.
    pub max_layer_uncompressed_size: u64,
    /// A pull that receives nothing for this long is cancelled, `--image-pull-progress-deadline`.
    pub progress_deadline: Duration,
}

impl Default for PullLimits {
    fn default() -> Self {
        Self {
            max_module_size: DEFAULT_MAX_MODULE_SIZE,
            max_layer_uncompressed_size: DEFAULT_MAX_LAYER_UNCOMPRESSED_SIZE,
            progress_deadline: DEFAULT_PULL_PROGRESS_DEADLINE,
        }
    }
}

/// The HTTP client manifests are fetched with: `ca_certificates` trusted besides the web PKI
/// roots, `skip_verify` as a hosts.toml says, and redirects followed only to the same host and
/// port (a registry must not send the agent to another address).
fn manifest_client(
    ca_certificates: &[Vec<u8>],
    skip_verify: bool,
) -> Result<reqwest::Client, reqwest::Error> {
    let mut builder = reqwest::Client::builder()
        .user_agent(concat!("wasm-kubelet/", env!("CARGO_PKG_VERSION")))
        .danger_accept_invalid_certs(skip_verify)
        .redirect(reqwest::redirect::Policy::custom(|attempt| {
            let first = attempt
                .previous()
                .first()
                .map(|u| (u.host_str().map(str::to_string), u.port_or_known_default()));
            let next = (
                attempt.url().host_str().map(str::to_string),
                attempt.url().port_or_known_default(),
            );
            // 10: reqwest's own default limit.
            if attempt.previous().len() > 10 || first != Some(next) {
                attempt.stop()
            } else {
                attempt.follow()
            }
        }));
    for der in ca_certificates {
        builder = builder.add_root_certificate(reqwest::Certificate::from_der(der)?);
    }
    builder.build()
}

/// Where one pull fetches from: the host of the registry's hosts that answered the manifest.
struct Source {
    /// The image reference on that host.
    image: Reference,
    client: Client,
    /// Manifests' HTTP client for that host.
    manifests: reqwest::Client,
    scheme: &'static str,
    credentials: OciAuth,
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
pub fn with_image_defaults(
    image: &StoredImage,
    command: Vec<String>,
    args: Vec<String>,
) -> (Vec<String>, Vec<String>) {
    if !command.is_empty() {
        return (command, args);
    }
    let args = if args.is_empty() {
        image.cmd.clone()
    } else {
        args
    };
    (image.entrypoint.clone(), args)
}

/// The local image store; one per provider.
pub struct ImageStore {
    dir: PathBuf,
    registries: RegistryOptions,
    limits: PullLimits,
    /// Fetches manifests (oci-client reads a manifest whole, with no cap): the same TLS
    /// settings as the registry clients, redirects only within the registry's own host. For a
    /// host with its own CA or `skip_verify` (hosts.toml), a client of its own is made.
    manifests: reqwest::Client,
    /// Pulls under way, by canonical reference: a second pull of the same image waits for the
    /// first and gets its result (single flight).
    inflight: Mutex<HashMap<String, PullOutcome>>,
    /// reference (canonical form) -> image. Held only for map access and the small index write.
    index: Mutex<BTreeMap<String, StoredImage>>,
    /// reference (canonical form) -> last use, unix milliseconds (see `last-used.json`).
    last_used: Mutex<BTreeMap<String, u64>>,
    /// When the store was opened: the last use of a reference it has no record of.
    opened_at: u64,
    /// reference as written -> its canonical form (see [`CanonicalMemo`]).
    canonical: CanonicalMemo,
}

impl ImageStore {
    /// Opens the store under `<root>/images`, reading its index if there is one; pulls reach
    /// registries as `registries` says.
    pub fn open(root: &Path, registries: RegistryOptions) -> Result<Self, ProviderError> {
        let dir = root.join("images");
        std::fs::create_dir_all(dir.join("blobs/sha256"))
            .map_err(|e| ProviderError::Setup(format!("creating {}: {e}", dir.display())))?;
        let index_path = dir.join("index.json");
        let index = match std::fs::read(&index_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %index_path.display(), error = %e, "image index unreadable; starting empty (images will be pulled again)");
                BTreeMap::new()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(ProviderError::Setup(format!("reading {}: {e}", index_path.display()))),
        };
        let last_used: BTreeMap<String, u64> = std::fs::read(dir.join("last-used.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let manifests = manifest_client(&registries.extra_ca_certificates, false).map_err(|e| {
            ProviderError::Setup(format!(
                "the registry client cannot be set up: {}",
                provider_api::one_line(&e)
            ))
        })?;
        let store = Self {
            dir,
            registries,
            limits: PullLimits::default(),
            manifests,
            inflight: Mutex::new(HashMap::new()),
            index: Mutex::new(index),
            last_used: Mutex::new(last_used),
            opened_at: unix_now(),
            canonical: CanonicalMemo::default(),
        };
        store.sweep();
        Ok(store)
    }

    /// The store with these pull limits instead of the defaults.
    pub fn with_limits(mut self, limits: PullLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The directory of the store (on the image filesystem).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Finishes removals a crash interrupted: empties `trash/` and deletes blobs no index entry
    /// names and temporary files a crashed write left.
    fn sweep(&self) {
        for dir in [self.dir.join("trash"), self.dir.join("tmp")] {
            if dir.exists() {
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    tracing::warn!(path = %dir.display(), error = %e, "cannot empty the image store's scratch directory");
                }
            }
        }
        let named: std::collections::HashSet<String> = self
            .index
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter_map(|i| sha256_hex(&i.layer_digest).ok().map(str::to_string))
            .collect();
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
        let used = self
            .last_used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        index
            .into_iter()
            .map(|(reference, image)| {
                let at = used.get(&reference).copied().unwrap_or(self.opened_at);
                (reference, image, at)
            })
            .collect()
    }

    /// Records that `reference` was used now (a pull, a container created from it). Best
    /// effort: a failed write is logged and the time is kept in memory. The file is replaced
    /// atomically (under the lock, so writers never share the temporary file) but not synced:
    /// this runs on every container start. A host crash may lose the last updates; the image
    /// then counts as used at its last recorded use (without one, when the store opened), and
    /// an image a container uses is never collected whatever its time says.
    pub fn touch(&self, reference: &str) {
        let mut used = self.last_used.lock().unwrap_or_else(|e| e.into_inner());
        used.insert(self.canonical.get(reference), unix_now());
        let path = self.dir.join("last-used.json");
        let tmp = self
            .dir
            .join(format!("last-used.json.tmp.{}", std::process::id()));
        let written = serde_json::to_vec(&*used)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "cannot record image use");
        }
    }

    /// Removes `reference` from the store. Returns the module digest and the bytes freed when
    /// its blob went too (no other reference shares it), else `None` and 0.
    pub fn remove(&self, reference: &str) -> Result<(Option<String>, u64), ProviderError> {
        let key = self.canonical.get(reference);
        let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        let Some(image) = index.remove(&key) else {
            return Err(ProviderError::NotFound(format!("image {reference}")));
        };
        let path = self.dir.join("index.json");
        let bytes = serde_json::to_vec_pretty(&*index)
            .map_err(|e| ProviderError::Io(format!("encoding the image index: {e}")))?;
        if let Err(e) = write_atomically(&path, &bytes) {
            index.insert(key, image);
            return Err(ProviderError::Io(format!(
                "writing {}: {e}",
                path.display()
            )));
        }
        let shared = index.values().any(|i| i.layer_digest == image.layer_digest);
        drop(index);
        self.last_used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
        if shared {
            return Ok((None, 0));
        }
        let blob = self
            .blob_path(&image.layer_digest)
            .map_err(ProviderError::Io)?;
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
        let target = trash.join(format!(
            "{}.{}.{n}",
            path.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
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
        let key = self.canonical.get(reference);
        let image = self
            .index
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned()?;
        self.blob_path(&image.layer_digest)
            .ok()
            .filter(|p| p.is_file())
            .map(|_| image)
    }

    /// Where the blob of `digest` (`sha256:<hex>`) lives.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, String> {
        Ok(self.dir.join("blobs/sha256").join(sha256_hex(digest)?))
    }

    /// Pulls `reference`: manifest (through an index if need be), then the Wasm layer unless the
    /// store already holds it, verified against its digest; for an ordinary OCI image, the
    /// module its entrypoint names (see [`ImageStore::pull_entrypoint_module`]).
    ///
    /// One pull per image at a time: a pull of a reference already being pulled waits for that
    /// pull and returns its result. A pull that receives nothing for
    /// [`PullLimits::progress_deadline`] is cancelled.
    pub async fn pull(
        &self,
        reference: &str,
        auth: &[RegistryAuth],
    ) -> Result<ImageInfo, ProviderError> {
        // By reference and the credentials used for its registry: a pull without a pod's
        // secret must not answer a pull with it, nor the other way round.
        let credentials = match reference
            .parse::<Reference>()
            .map(|r| credentials_for(r.registry(), auth))
        {
            Ok(OciAuth::Basic(user, password)) => {
                to_hex(&Sha256::digest(format!("{user}\0{password}").as_bytes()))
            }
            _ => "anonymous".to_string(),
        };
        let key = format!("{} {credentials}", self.canonical.get(reference));
        loop {
            // Decided under the lock, acted on after it is released.
            let role = {
                let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
                match inflight.get(&key) {
                    Some(rx) => Err(rx.clone()),
                    None => {
                        let (tx, rx) = tokio::sync::watch::channel(None);
                        inflight.insert(key.clone(), rx);
                        Ok(tx)
                    }
                }
            };
            let mut waiting = match role {
                Ok(tx) => {
                    // Removed however this pull ends (also when its caller gives up on it).
                    let _leader = InflightEntry {
                        map: &self.inflight,
                        key: &key,
                    };
                    let result = self.pull_with_deadline(reference, auth).await;
                    let _ = tx.send(Some(result.clone()));
                    return result;
                }
                Err(rx) => rx,
            };
            tracing::debug!(
                reference,
                "waiting for the pull of the same image under way"
            );
            let outcome = waiting
                .wait_for(Option::is_some)
                .await
                .map(|result| result.clone());
            match outcome {
                Ok(result) => {
                    let result = result.unwrap_or_else(|| {
                        Err(ProviderError::Pull(format!(
                            "pulling {reference}: the pull waited for ended without a result"
                        )))
                    });
                    return result.map(|info| ImageInfo {
                        reference: reference.to_string(),
                        ..info
                    });
                }
                // The pull waited for was abandoned by its caller: start one.
                Err(_) => continue,
            }
        }
    }

    /// [`ImageStore::pull_once`], cancelled when it makes no progress for the deadline.
    async fn pull_with_deadline(
        &self,
        reference: &str,
        auth: &[RegistryAuth],
    ) -> Result<ImageInfo, ProviderError> {
        let progress = Progress::new();
        let deadline = self.limits.progress_deadline;
        let pull = self.pull_once(reference, auth, &progress);
        tokio::pin!(pull);
        // A long pull says how far it got, as the kubelet's dockershim did every 10 s.
        let mut report = tokio::time::interval_at(
            tokio::time::Instant::now() + PULL_PROGRESS_INTERVAL,
            PULL_PROGRESS_INTERVAL,
        );
        loop {
            tokio::select! {
                result = &mut pull => return result.map_err(bounded),
                () = progress.stalled(deadline) => {
                    // The kubelet's (dockershim's) words for the same event.
                    let message = format!("Cancel pulling image {reference:?} because of no progress for {}, latest progress: \"{} bytes received\"", go_duration(deadline), progress.bytes());
                    tracing::warn!(reference, "{message}");
                    return Err(ProviderError::Pull(message));
                }
                _ = report.tick() => {
                    tracing::info!(reference, bytes = progress.bytes(), elapsed = %go_duration(progress.start.elapsed()), "pulling image: {} bytes received so far", progress.bytes());
                }
            }
        }
    }

    async fn pull_once(
        &self,
        reference: &str,
        auth: &[RegistryAuth],
        progress: &Progress,
    ) -> Result<ImageInfo, ProviderError> {
        let parsed: Reference = reference.parse().map_err(|e| {
            ProviderError::InvalidImageName(format!("couldn't parse image name {reference:?}: {e}"))
        })?;
        let (source, (manifest, manifest_digest)) =
            self.connect(&parsed, auth, reference, progress).await?;
        let client = &source.client;
        let (manifest, manifest_ref) = match manifest {
            OciManifest::Image(m) => (m, source.image.clone()),
            OciManifest::ImageIndex(index) => {
                let entry = choose_platform(&index.manifests).ok_or_else(|| {
                    let found: Vec<String> = index.manifests.iter().take(20).map(platform_name).collect();
                    ProviderError::UnsupportedImage(format!("image {reference} is an index without a Wasm platform (wasip1, wasip2, wasi or arch wasm); it has: {}", found.join(", ")))
                })?;
                let entry_ref = source.image.clone_with_digest(entry.digest.clone());
                match self
                    .fetch_manifest(&source, &entry_ref, progress)
                    .await
                    .map_err(|e| e.into_provider(reference, "fetching the platform manifest"))?
                {
                    (OciManifest::Image(m), _) => (m, entry_ref),
                    (OciManifest::ImageIndex(_), _) => {
                        return Err(ProviderError::UnsupportedImage(format!(
                            "image {reference}: the index entry {} is itself an index",
                            entry.digest
                        )))
                    }
                }
            }
        };
        // A Spin application: its lock file (the config) says which layer is the component.
        let spin_layer = if manifest.config.media_type == SPIN_APP_CONFIG {
            let cap = Cap {
                max: MAX_CONFIG_BYTES as u64,
                flag: "the image config limit (4 MiB)",
            };
            let lock = self
                .fetch_blob_to_memory(
                    client,
                    &manifest_ref,
                    reference,
                    &manifest.config,
                    "Spin application config",
                    cap,
                    progress,
                )
                .await?;
            let layer = select_spin_component(&lock, &manifest).map_err(|why| {
                ProviderError::UnsupportedImage(format!(
                    "image {reference} is a Spin application ({SPIN_APP_CONFIG}); {why}"
                ))
            })?;
            Some(layer)
        } else {
            None
        };
        let layer = match spin_layer.map_or_else(|| select_wasm_layer(&manifest), Ok) {
            Ok(layer) => layer,
            Err(_) if IMAGE_CONFIG_TYPES.contains(&manifest.config.media_type.as_str()) => {
                let stored = self.pull_entrypoint_module(client, &manifest_ref, reference, &manifest, &manifest_digest, progress).await?;
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
        let blob = self
            .blob_path(&layer.digest)
            .map_err(|e| ProviderError::Pull(format!("pulling {reference}: layer {e}")))?;

        let size = if let Ok(meta) = std::fs::metadata(&blob) {
            tracing::debug!(reference, digest = %layer.digest, "layer already stored");
            meta.len()
        } else {
            let cap = Cap {
                max: self.limits.max_module_size,
                flag: "--max-module-size",
            };
            self.fetch_blob_to_file(
                client,
                &manifest_ref,
                reference,
                layer,
                "module layer",
                cap,
                &blob,
                progress,
            )
            .await?
        };
        let stored = StoredImage {
            manifest_digest: manifest_digest.clone(),
            layer_digest: layer.digest.clone(),
            size,
            entrypoint: Vec::new(),
            cmd: Vec::new(),
        };
        self.record(reference, stored)?;
        tracing::info!(reference, digest = %manifest_digest, size, "image pulled");
        Ok(ImageInfo {
            reference: reference.to_string(),
            digest: manifest_digest,
            size,
        })
    }

    /// Fetches the manifest from the first of the registry's hosts that has it
    /// ([`RegistryOptions::endpoints`]: hosts.toml mirrors, then the server; without
    /// configuration, the registry itself); the rest of the image comes from the same host.
    /// A mirror is sent only the pod's credentials for the mirror's own host, never those for
    /// the image's registry.
    async fn connect(
        &self,
        image: &Reference,
        auth: &[RegistryAuth],
        reference: &str,
        progress: &Progress,
    ) -> Result<(Source, (OciManifest, String)), ProviderError> {
        let endpoints = self
            .registries
            .endpoints(image.registry(), image.digest().is_some());
        let mut failed_mirrors = Vec::new();
        let mut last = None;
        for endpoint in &endpoints {
            let on_host = reference_on(endpoint, image);
            let credentials = if endpoint.mirror {
                credentials_for(&endpoint.host, auth)
            } else {
                credentials_for(image.registry(), auth)
            };
            match self
                .connect_to(endpoint, on_host, credentials, reference, progress)
                .await
            {
                Ok(found) => {
                    if endpoint.mirror {
                        tracing::debug!(reference, mirror = %endpoint.host, "pulling from a mirror");
                    }
                    return Ok(found);
                }
                Err(e) if endpoint.mirror => {
                    tracing::debug!(reference, mirror = %endpoint.host, error = %e, "mirror failed; trying the next host");
                    failed_mirrors.push(format!(
                        "{}: {}",
                        endpoint.host,
                        truncate_text(&e.to_string(), 200)
                    ));
                    last = Some(e);
                }
                Err(e) => {
                    last = Some(e);
                    break;
                }
            }
        }
        let mut error = last.unwrap_or_else(|| {
            ProviderError::Pull(format!(
                "pulling {reference}: no host of {} may {} (see the registry config dir's capabilities)",
                image.registry(),
                if image.digest().is_some() { "pull" } else { "resolve and pull" }
            ))
        });
        if !failed_mirrors.is_empty() && endpoints.last().is_some_and(|e| !e.mirror) {
            error = error.with_note(&format!(
                " (mirrors tried first: {})",
                failed_mirrors.join("; ")
            ));
        }
        Err(error)
    }

    /// Fetches the manifest from one host: over https (or plain http for an `http://` host);
    /// a host named in `--insecure-registries` is asked again over plain http when https fails
    /// below HTTP (no TLS there), as Docker does for insecure registries. No other host is ever
    /// spoken to over plain http.
    async fn connect_to(
        &self,
        endpoint: &Endpoint,
        image: Reference,
        credentials: OciAuth,
        reference: &str,
        progress: &Progress,
    ) -> Result<(Source, (OciManifest, String)), ProviderError> {
        let registry = image.resolve_registry().to_string();
        let manifests = if endpoint.skip_verify
            || endpoint.ca_certificates != self.registries.extra_ca_certificates
        {
            manifest_client(&endpoint.ca_certificates, endpoint.skip_verify).map_err(|e| {
                ProviderError::Setup(format!(
                    "pulling {reference}: the registry client cannot be set up: {}",
                    provider_api::one_line(&e)
                ))
            })?
        } else {
            self.manifests.clone()
        };
        let (protocol, scheme) = if endpoint.plain_http {
            (ClientProtocol::Http, "http")
        } else {
            (ClientProtocol::Https, "https")
        };
        let source = Source {
            client: self.client(endpoint, reference, protocol)?,
            image,
            manifests,
            scheme,
            credentials,
        };
        match self.fetch_manifest(&source, &source.image, progress).await {
            Ok(found) => Ok((source, found)),
            Err(ManifestError::Transport(over_https))
                if !endpoint.plain_http && endpoint.http_fallback =>
            {
                tracing::debug!(registry, error = %over_https, "https failed below HTTP; trying plain http (an insecure registry)");
                let source = Source {
                    client: self.client(
                        endpoint,
                        reference,
                        ClientProtocol::HttpsExcept(vec![registry.clone()]),
                    )?,
                    scheme: "http",
                    ..source
                };
                match self.fetch_manifest(&source, &source.image, progress).await {
                    Ok(found) => Ok((source, found)),
                    Err(e) => Err(e
                        .noted(&format!(" (over https first: {over_https})"))
                        .into_provider(reference, "fetching the manifest")),
                }
            }
            Err(e @ ManifestError::Transport(_)) if !endpoint.plain_http => Err(e
                .noted(" (plain http is tried only for registries listed in --insecure-registries or as http:// hosts in --registry-config-dir)")
                .into_provider(reference, "fetching the manifest")),
            Err(e) => Err(e.into_provider(reference, "fetching the manifest")),
        }
    }

    /// Fetches and parses one manifest or index, at most [`MAX_MANIFEST_BYTES`], checked
    /// against the digest the reference or the registry names. oci-client authenticates (its
    /// token dance); the GET is ours, so the body is read with a cap.
    async fn fetch_manifest(
        &self,
        source: &Source,
        image: &Reference,
        progress: &Progress,
    ) -> Result<(OciManifest, String), ManifestError> {
        let (scheme, credentials) = (source.scheme, &source.credentials);
        let token = match source
            .client
            .auth(image, credentials, RegistryOperation::Pull)
            .await
        {
            Ok(token) => token,
            Err(e) => {
                let message = format!("authenticating: {}", registry_error(&e));
                return Err(match classify(&e) {
                    Class::NotFound => ManifestError::NotFound(message),
                    Class::Unauthorized => ManifestError::Unauthorized(message),
                    Class::Transport => ManifestError::Transport(provider_api::one_line(&e)),
                    Class::Other => ManifestError::Registry(message),
                });
            }
        };
        progress.mark(0);
        let registry = image.resolve_registry();
        let tag = image.digest().or(image.tag()).unwrap_or("latest");
        let url = format!(
            "{scheme}://{registry}/v2/{}/manifests/{tag}",
            image.repository()
        );
        let mut request = source
            .manifests
            .get(&url)
            .header(reqwest::header::ACCEPT, MANIFEST_ACCEPT.join(", "));
        request = match (&token, credentials) {
            (Some(token), _) => request.bearer_auth(token),
            (None, OciAuth::Basic(user, password)) => request.basic_auth(user, Some(password)),
            (None, _) => request,
        };
        let mut response = request
            .send()
            .await
            .map_err(|e| ManifestError::Transport(provider_api::one_line(&e)))?;
        progress.mark(0);
        let status = response.status();
        if !status.is_success() {
            let body = read_capped(&mut response, MAX_ERROR_BODY_BYTES as u64, progress)
                .await
                .unwrap_or_default();
            let message = format!(
                "the registry answered {status} for {url}: {}",
                truncate_body(&body)
            );
            return Err(match status {
                reqwest::StatusCode::NOT_FOUND => ManifestError::NotFound(message),
                reqwest::StatusCode::UNAUTHORIZED | reqwest::StatusCode::FORBIDDEN => {
                    ManifestError::Unauthorized(message)
                }
                _ => ManifestError::Registry(message),
            });
        }
        if response
            .content_length()
            .is_some_and(|n| n > MAX_MANIFEST_BYTES)
        {
            return Err(ManifestError::TooLarge(format!(
                "the manifest at {url} is {} bytes, more than the {MAX_MANIFEST_BYTES} allowed",
                response.content_length().unwrap_or(0)
            )));
        }
        let header_digest = response
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = read_capped(&mut response, MAX_MANIFEST_BYTES, progress)
            .await
            .map_err(|e| match e {
                ReadError::TooLarge => ManifestError::TooLarge(format!(
                    "the manifest at {url} is more than the {MAX_MANIFEST_BYTES} bytes allowed"
                )),
                ReadError::Transport(e) => {
                    ManifestError::Registry(format!("reading the manifest at {url}: {e}"))
                }
            })?;
        let digest = format!("sha256:{}", to_hex(&Sha256::digest(&body)));
        for (what, expected) in [
            ("the reference", image.digest().map(str::to_string)),
            ("the registry's Docker-Content-Digest", header_digest),
        ] {
            if let Some(expected) = expected {
                // Only sha256 is checked here (and stored); a digest of another algorithm in the
                // registry's header is not ours to verify.
                if (what == "the reference" || expected.starts_with("sha256:"))
                    && expected != digest
                {
                    return Err(ManifestError::Registry(format!(
                        "the manifest at {url} has digest {digest}, not {expected} as {what} says"
                    )));
                }
            }
        }
        let manifest = parse_manifest(&body, content_type.as_deref())
            .map_err(|e| ManifestError::Registry(format!("the manifest at {url}: {e}")))?;
        Ok((manifest, digest))
    }

    fn client(
        &self,
        endpoint: &Endpoint,
        reference: &str,
        protocol: ClientProtocol,
    ) -> Result<Client, ProviderError> {
        Client::try_from(client_config(endpoint, protocol)).map_err(|e| {
            ProviderError::Setup(format!(
                "pulling {reference}: the registry client cannot be set up: {}",
                provider_api::one_line(&e)
            ))
        })
    }

    /// The module of an ordinary OCI image: the file its config's `Entrypoint[0]` names, read
    /// from the layers top down (fetched one at a time into temporary files, only as far down
    /// as needed, each read streaming with at most [`PullLimits::max_layer_uncompressed_size`]
    /// inflated) and stored under its own digest. An image already pulled by manifest digest is
    /// not fetched again.
    async fn pull_entrypoint_module(
        &self,
        client: &Client,
        image: &Reference,
        reference: &str,
        manifest: &OciImageManifest,
        manifest_digest: &str,
        progress: &Progress,
    ) -> Result<StoredImage, ProviderError> {
        let unsupported =
            |e: EntrypointError| ProviderError::UnsupportedImage(format!("image {reference}: {e}"));
        if let Some(layer) = manifest
            .layers
            .iter()
            .find(|l| !TAR_LAYER_TYPES.contains(&l.media_type.as_str()))
        {
            return Err(ProviderError::UnsupportedImage(format!(
                "image {reference}: layer {} has media type {}; expected one of {}",
                layer.digest,
                layer.media_type,
                TAR_LAYER_TYPES.join(", ")
            )));
        }
        if let Some(known) = self.by_manifest_digest(manifest_digest) {
            tracing::debug!(
                reference,
                digest = manifest_digest,
                "image already stored under another reference"
            );
            return Ok(known);
        }
        let config_cap = Cap {
            max: MAX_CONFIG_BYTES as u64,
            flag: "the image config limit (4 MiB)",
        };
        let config = self
            .fetch_blob_to_memory(
                client,
                image,
                reference,
                &manifest.config,
                "config",
                config_cap,
                progress,
            )
            .await?;
        let defaults = ContainerDefaults::parse(&config).map_err(unsupported)?;
        let path = defaults.program().map_err(unsupported)?;

        let limits = self.limits.clone();
        let mut search = EntrypointSearch::new(&path, manifest.layers.len())
            .map_err(unsupported)?
            .with_limits(limits.max_layer_uncompressed_size, limits.max_module_size);
        let scratch = TempDir::new(self.dir.join("tmp")).map_err(|e| {
            ProviderError::Io(format!(
                "pulling {reference}: creating a scratch directory: {e}"
            ))
        })?;
        let mut fetched: Vec<Option<PathBuf>> = vec![None; manifest.layers.len()];
        // A compressed layer is no bigger than what it inflates to, so the same cap bounds it.
        let layer_cap = Cap {
            max: limits.max_layer_uncompressed_size,
            flag: "--max-layer-uncompressed-size",
        };
        let module = loop {
            let i = search.next_layer();
            let (Some(descriptor), Some(slot)) = (manifest.layers.get(i), fetched.get_mut(i))
            else {
                return Err(ProviderError::Pull(format!(
                    "pulling {reference}: layer {i} out of range"
                )));
            };
            let file = match slot {
                Some(file) => file.clone(),
                None => {
                    let file = scratch.path.join(format!("layer-{i}"));
                    self.fetch_blob_to_file(
                        client, image, reference, descriptor, "layer", layer_cap, &file, progress,
                    )
                    .await?;
                    slot.insert(file).clone()
                }
            };
            // Reading a tar archive is CPU and disk work: off the async threads.
            let (returned, step) = tokio::task::spawn_blocking(move || {
                let step = std::fs::File::open(&file)
                    .map_err(|e| EntrypointError::Layer {
                        layer: i,
                        reason: format!("reopening the downloaded layer: {e}"),
                    })
                    .and_then(|f| search.feed(i, std::io::BufReader::new(f)));
                (search, step)
            })
            .await
            .map_err(|e| {
                ProviderError::Pull(format!(
                    "pulling {reference}: reading layer {}: {e}",
                    descriptor.digest
                ))
            })?;
            search = returned;
            match step {
                Ok(Some(module)) => break module,
                Ok(None) => continue,
                Err(
                    e @ (EntrypointError::Layer { .. }
                    | EntrypointError::LayerTooLarge { .. }
                    | EntrypointError::ModuleTooLarge { .. }),
                ) => return Err(ProviderError::Pull(format!("pulling {reference}: {e}"))),
                Err(e) => return Err(unsupported(e)),
            }
        };
        drop(scratch);

        let digest = format!("sha256:{}", to_hex(&Sha256::digest(&module)));
        let blob = self
            .blob_path(&digest)
            .map_err(|e| ProviderError::Io(format!("pulling {reference}: module {e}")))?;
        if !blob.is_file() {
            write_atomically(&blob, &module).map_err(|e| {
                ProviderError::Io(format!(
                    "storing the module of {reference} at {}: {e}",
                    blob.display()
                ))
            })?;
        }
        tracing::debug!(reference, path = %path, module = %digest, "module read from the image's layers");
        Ok(StoredImage {
            manifest_digest: manifest_digest.to_string(),
            layer_digest: digest,
            size: module.len() as u64,
            entrypoint: defaults.entrypoint,
            cmd: defaults.cmd,
        })
    }

    /// Fetches one blob of `image` into memory (a config: small, capped by `cap`), digest
    /// verified while it streams.
    #[allow(clippy::too_many_arguments)]
    async fn fetch_blob_to_memory(
        &self,
        client: &Client,
        image: &Reference,
        reference: &str,
        descriptor: &OciDescriptor,
        what: &str,
        cap: Cap,
        progress: &Progress,
    ) -> Result<Vec<u8>, ProviderError> {
        let mut sink = BlobSink::new(
            Sink::Memory(Vec::new()),
            descriptor,
            reference,
            what,
            cap,
            progress,
        )?;
        self.stream_blob(client, image, reference, descriptor, what, &mut sink)
            .await?;
        match sink.sink {
            Sink::Memory(bytes) => Ok(bytes),
            Sink::File(..) => unreachable!("a memory sink"),
        }
    }

    /// Streams one blob of `image` into `path` (through a temporary sibling, renamed into place
    /// only when complete and verified; removed on any failure). Refused before downloading
    /// when its descriptor declares more than `cap`; the registry may send no more than it
    /// declared. Returns its size.
    #[allow(clippy::too_many_arguments)]
    async fn fetch_blob_to_file(
        &self,
        client: &Client,
        image: &Reference,
        reference: &str,
        descriptor: &OciDescriptor,
        what: &str,
        cap: Cap,
        path: &Path,
        progress: &Progress,
    ) -> Result<u64, ProviderError> {
        let io_err = |e: std::io::Error| {
            ProviderError::Io(format!(
                "pulling {reference}: writing the {what} to {}: {e}",
                path.display()
            ))
        };
        let tmp = TempFile::beside(path);
        let file = tokio::fs::File::create(&tmp.path).await.map_err(io_err)?;
        let mut sink = BlobSink::new(Sink::File(file), descriptor, reference, what, cap, progress)?;
        self.stream_blob(client, image, reference, descriptor, what, &mut sink)
            .await?;
        let size = sink.written;
        let Sink::File(mut file) = sink.sink else {
            unreachable!("a file sink")
        };
        use tokio::io::AsyncWriteExt;
        file.flush().await.map_err(io_err)?;
        file.sync_all().await.map_err(io_err)?;
        drop(file);
        tmp.persist(path).map_err(io_err)?;
        Ok(size)
    }

    /// `pull_blob` into `sink`; the sink's own refusal (too large, digest) is the error when
    /// there is one. The descriptor's `urls` are dropped: a manifest must not send the agent to
    /// fetch from addresses of its choosing.
    async fn stream_blob(
        &self,
        client: &Client,
        image: &Reference,
        reference: &str,
        descriptor: &OciDescriptor,
        what: &str,
        sink: &mut BlobSink<'_>,
    ) -> Result<(), ProviderError> {
        let descriptor = OciDescriptor {
            urls: None,
            ..descriptor.clone()
        };
        let pulled = client.pull_blob(image, &descriptor, &mut *sink).await;
        if let Some(refusal) = sink.refusal.take() {
            return Err(refusal);
        }
        pulled.map_err(|e| {
            let message = format!(
                "fetching {what} {}: {}",
                descriptor.digest,
                registry_error(&e)
            );
            let (reference, source) = (reference.to_string(), Cause(message));
            match classify(&e) {
                Class::NotFound => ProviderError::ImageNotFound { reference, source },
                Class::Unauthorized => ProviderError::Unauthorized { reference, source },
                Class::Transport => ProviderError::RegistryUnavailable { reference, source },
                Class::Other => ProviderError::Pull(format!("pulling {reference}: {source}")),
            }
        })?;
        sink.finish()
    }

    /// An image recorded under any reference with this manifest digest whose module is still
    /// on disk (the manifest digest fixes the config and every layer).
    fn by_manifest_digest(&self, manifest_digest: &str) -> Option<StoredImage> {
        let index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        let image = index
            .values()
            .find(|i| i.manifest_digest == manifest_digest && !i.entrypoint.is_empty())?
            .clone();
        drop(index);
        self.blob_path(&image.layer_digest)
            .ok()
            .filter(|p| p.is_file())
            .map(|_| image)
    }

    /// Stores `wasm` as the single layer of `reference`, as a pull would (tests use it in place
    /// of a registry; `WasmtimeProvider::import_image` offers it to other crates' tests).
    pub(crate) fn import(
        &self,
        reference: &str,
        wasm: &[u8],
    ) -> Result<StoredImage, ProviderError> {
        let layer_digest = format!("sha256:{}", to_hex(&Sha256::digest(wasm)));
        let blob = self.blob_path(&layer_digest).map_err(ProviderError::Io)?;
        write_atomically(&blob, wasm).map_err(|e| ProviderError::Io(e.to_string()))?;
        let image = StoredImage {
            manifest_digest: format!(
                "sha256:{}",
                to_hex(&Sha256::digest(layer_digest.as_bytes()))
            ),
            layer_digest,
            size: wasm.len() as u64,
            entrypoint: Vec::new(),
            cmd: Vec::new(),
        };
        self.record(reference, image.clone())?;
        Ok(image)
    }

    fn record(&self, reference: &str, image: StoredImage) -> Result<(), ProviderError> {
        let key = self.canonical.get(reference);
        let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        index.insert(key, image);
        let path = self.dir.join("index.json");
        let bytes = serde_json::to_vec_pretty(&*index)
            .map_err(|e| ProviderError::Io(format!("encoding the image index: {e}")))?;
        write_atomically(&path, &bytes)
            .map_err(|e| ProviderError::Io(format!("writing {}: {e}", path.display())))
    }
}

/// The longest pull error message: messages quote the image's own strings (media types,
/// platforms, paths), and they become Events any namespace user reads; the kubelet's own pull
/// errors are a few hundred bytes.
const MAX_PULL_MESSAGE_BYTES: usize = 1024;

/// `e` with its message cut to [`MAX_PULL_MESSAGE_BYTES`].
fn bounded(e: ProviderError) -> ProviderError {
    let cut = |m: String| truncate_text(&m, MAX_PULL_MESSAGE_BYTES);
    match e {
        ProviderError::Pull(m) => ProviderError::Pull(cut(m)),
        ProviderError::ImageNotFound { reference, source } => ProviderError::ImageNotFound {
            reference,
            source: Cause(cut(source.0)),
        },
        ProviderError::Unauthorized { reference, source } => ProviderError::Unauthorized {
            reference,
            source: Cause(cut(source.0)),
        },
        ProviderError::RegistryUnavailable { reference, source } => {
            ProviderError::RegistryUnavailable {
                reference,
                source: Cause(cut(source.0)),
            }
        }
        ProviderError::UnsupportedImage(m) => ProviderError::UnsupportedImage(cut(m)),
        ProviderError::Io(m) => ProviderError::Io(cut(m)),
        ProviderError::Setup(m) => ProviderError::Setup(cut(m)),
        other => other,
    }
}

/// A pull under way as its followers see it: `None` until the leader's result arrives.
type PullOutcome = tokio::sync::watch::Receiver<Option<Result<ImageInfo, ProviderError>>>;

/// Removes a reference from the pulls under way when its leader ends, however it ends.
struct InflightEntry<'a> {
    map: &'a Mutex<HashMap<String, PullOutcome>>,
    key: &'a str,
}

impl Drop for InflightEntry<'_> {
    fn drop(&mut self) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(self.key);
    }
}

/// When a pull last received something, and how much it received (for the progress deadline).
struct Progress {
    start: tokio::time::Instant,
    /// Milliseconds after `start` of the last progress.
    last: AtomicU64,
    bytes: AtomicU64,
}

impl Progress {
    fn new() -> Self {
        Self {
            start: tokio::time::Instant::now(),
            last: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        }
    }

    /// Something arrived (`bytes` of content, or 0 for a response without content yet).
    fn mark(&self, bytes: usize) {
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.last
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Returns once nothing arrived for `deadline`.
    async fn stalled(&self, deadline: Duration) {
        loop {
            let due =
                self.start + Duration::from_millis(self.last.load(Ordering::Relaxed)) + deadline;
            if tokio::time::Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    }
}

/// A duration as Go prints it (`1m0s`, `30s`, `1.5s`, `250ms`), as the kubelet's messages do.
pub fn go_duration(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        return format!("{}ms", d.as_millis());
    }
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let s = if d.subsec_millis() == 0 {
        s.to_string()
    } else {
        format!("{s}.{:03}", d.subsec_millis())
            .trim_end_matches('0')
            .to_string()
    };
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, m) => format!("{m}m{s}s"),
        (h, m) => format!("{h}h{m}m{s}s"),
    }
}

/// The manifest media types asked for (Accept), all this store reads.
const MANIFEST_ACCEPT: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// Why a manifest could not be fetched.
#[derive(Debug)]
enum ManifestError {
    /// Below HTTP (connection refused, a timeout, no TLS there): plain http may be tried for an
    /// insecure registry. Retryable.
    Transport(String),
    /// The registry has no such repository or tag. Retryable (backoff).
    NotFound(String),
    /// The registry refused the credentials or asked for some. Retryable (backoff).
    Unauthorized(String),
    /// The registry answered, but not with a usable manifest. Retryable (backoff).
    Registry(String),
    /// Over [`MAX_MANIFEST_BYTES`]. Retryable only in that the image may be pushed again.
    TooLarge(String),
}

impl ManifestError {
    /// The same error with `note` added to its message.
    fn noted(self, note: &str) -> Self {
        match self {
            Self::Transport(m) => Self::Transport(m + note),
            Self::NotFound(m) => Self::NotFound(m + note),
            Self::Unauthorized(m) => Self::Unauthorized(m + note),
            Self::Registry(m) => Self::Registry(m + note),
            Self::TooLarge(m) => Self::TooLarge(m + note),
        }
    }

    /// The provider's typed error for it.
    fn into_provider(self, reference: &str, what: &str) -> ProviderError {
        let typed = |m: String| (reference.to_string(), Cause(format!("{what}: {m}")));
        match self {
            Self::NotFound(m) => {
                let (reference, source) = typed(m);
                ProviderError::ImageNotFound { reference, source }
            }
            Self::Unauthorized(m) => {
                let (reference, source) = typed(m);
                ProviderError::Unauthorized { reference, source }
            }
            Self::Transport(m) => {
                let (reference, source) = typed(m);
                ProviderError::RegistryUnavailable { reference, source }
            }
            Self::Registry(m) | Self::TooLarge(m) => {
                ProviderError::Pull(format!("pulling {reference}: {what}: {m}"))
            }
        }
    }
}

/// What kind of failure an oci-client error is, for the typed pull errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    NotFound,
    Unauthorized,
    Transport,
    Other,
}

/// How oci-client reports each: HTTP statuses in `ServerError`, the distribution spec's codes
/// in a `RegistryError` envelope (any code of the kind counts), its own authentication errors,
/// and reqwest's errors below HTTP.
fn classify(e: &OciDistributionError) -> Class {
    use oci_client::errors::OciErrorCode as Code;
    match e {
        OciDistributionError::RequestError(_) => Class::Transport,
        OciDistributionError::AuthenticationFailure(_)
        | OciDistributionError::UnauthorizedError { .. } => Class::Unauthorized,
        OciDistributionError::ImageManifestNotFoundError(_) => Class::NotFound,
        OciDistributionError::ServerError { code, .. } => match *code {
            401 | 403 => Class::Unauthorized,
            404 => Class::NotFound,
            _ => Class::Other,
        },
        OciDistributionError::RegistryError { envelope, .. } => {
            let has = |codes: &[Code]| envelope.errors.iter().any(|e| codes.contains(&e.code));
            if has(&[Code::Unauthorized, Code::Denied]) {
                Class::Unauthorized
            } else if has(&[
                Code::ManifestUnknown,
                Code::NameUnknown,
                Code::BlobUnknown,
                Code::NotFound,
            ]) {
                Class::NotFound
            } else {
                Class::Other
            }
        }
        _ => Class::Other,
    }
}

/// Reads a response body, stopping once more than `max` bytes came: the bytes (at most `max`)
/// and whether there was more.
async fn read_at_most(
    response: &mut reqwest::Response,
    max: u64,
    progress: &Progress,
) -> Result<(Vec<u8>, bool), String> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| provider_api::one_line(&e))?
    {
        progress.mark(chunk.len());
        body.extend_from_slice(&chunk);
        if body.len() as u64 > max {
            body.truncate(usize::try_from(max).unwrap_or(usize::MAX));
            return Ok((body, true));
        }
    }
    Ok((body, false))
}

/// A failed read of a capped body.
enum ReadError {
    TooLarge,
    Transport(String),
}

/// The body, refusing one over `max` bytes.
async fn read_capped(
    response: &mut reqwest::Response,
    max: u64,
    progress: &Progress,
) -> Result<Vec<u8>, ReadError> {
    match read_at_most(response, max, progress).await {
        Ok((body, false)) => Ok(body),
        Ok((_, true)) => Err(ReadError::TooLarge),
        Err(e) => Err(ReadError::Transport(e)),
    }
}

/// A registry's error body for a message: at most [`MAX_ERROR_BODY_BYTES`], on one line.
fn truncate_body(body: &[u8]) -> String {
    truncate_text(&String::from_utf8_lossy(body), MAX_ERROR_BODY_BYTES)
}

/// `text` on one line (control characters as spaces), cut to at most `max` bytes at a character
/// boundary, with `…` when cut.
pub fn truncate_text(text: &str, max: usize) -> String {
    let one_line: String = text
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.len() <= max {
        return one_line;
    }
    let mut end = max;
    while !one_line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes, cut)", &one_line[..end], one_line.len())
}

/// An oci-client error for a message, with whatever text the registry (or whatever answered)
/// sent cut to [`MAX_ERROR_BODY_BYTES`].
fn registry_error(e: &OciDistributionError) -> String {
    match e {
        OciDistributionError::ServerError { code, url, message } => format!(
            "the registry answered {code} for {url}: {}",
            truncate_text(message, MAX_ERROR_BODY_BYTES)
        ),
        OciDistributionError::AuthenticationFailure(reason) => format!(
            "authentication failed: {}",
            truncate_text(reason, MAX_ERROR_BODY_BYTES)
        ),
        OciDistributionError::RegistryError { envelope, url } => {
            let errors: Vec<String> = envelope
                .errors
                .iter()
                .map(|e| format!("{:?}: {}", e.code, e.message))
                .collect();
            format!(
                "the registry refused {url}: {}",
                truncate_text(&errors.join("; "), MAX_ERROR_BODY_BYTES)
            )
        }
        // Other errors carry no body, but their text may quote one: bounded all the same.
        other => truncate_text(&provider_api::one_line(other), 4 * MAX_ERROR_BODY_BYTES),
    }
}

/// Parses a manifest or index document (at most [`MAX_MANIFEST_BYTES`], the caller read it
/// capped): schema version 2, a media type this store reads (from the document, else the
/// response's Content-Type). Never panics, whatever the bytes.
pub fn parse_manifest(body: &[u8], content_type: Option<&str>) -> Result<OciManifest, String> {
    #[derive(Deserialize)]
    struct Versioned {
        #[serde(rename = "schemaVersion")]
        schema_version: i64,
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    if body.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(format!(
            "{} bytes, more than the {MAX_MANIFEST_BYTES} allowed",
            body.len()
        ));
    }
    let versioned: Versioned =
        serde_json::from_slice(body).map_err(|e| format!("not a manifest: {e}"))?;
    if versioned.schema_version != 2 {
        return Err(format!(
            "schemaVersion {} is not supported (only 2; Docker schema 1 images are not)",
            versioned.schema_version
        ));
    }
    let header_type = content_type
        .map(|t| t.split(';').next().unwrap_or("").trim().to_string())
        .filter(|t| !t.is_empty() && t != "application/json");
    if let Some(media_type) = versioned.media_type.or(header_type) {
        if !MANIFEST_ACCEPT.contains(&media_type.as_str()) {
            return Err(format!(
                "media type {} is not a manifest or index this agent reads ({})",
                truncate_text(&media_type, 100),
                MANIFEST_ACCEPT.join(", ")
            ));
        }
    }
    serde_json::from_slice(body).map_err(|e| format!("not a manifest or index: {e}"))
}

/// A size limit and the flag (or rule) that sets it, for the refusal message.
#[derive(Debug, Clone, Copy)]
struct Cap {
    max: u64,
    flag: &'static str,
}

/// Where a blob's bytes go.
enum Sink {
    Memory(Vec<u8>),
    File(tokio::fs::File),
}

/// An `AsyncWrite` a blob streams into: hashes what passes, counts it against the size the
/// descriptor declared (never more), marks progress, and keeps why it refused.
struct BlobSink<'a> {
    sink: Sink,
    hasher: Sha256,
    written: u64,
    declared: u64,
    digest: String,
    what: String,
    reference: String,
    progress: &'a Progress,
    refusal: Option<ProviderError>,
}

impl<'a> BlobSink<'a> {
    /// Refuses up front a descriptor that is malformed or declares more than `cap`.
    fn new(
        sink: Sink,
        descriptor: &OciDescriptor,
        reference: &str,
        what: &str,
        cap: Cap,
        progress: &'a Progress,
    ) -> Result<Self, ProviderError> {
        sha256_hex(&descriptor.digest)
            .map_err(|e| ProviderError::Pull(format!("pulling {reference}: the {what} {e}")))?;
        let declared = u64::try_from(descriptor.size).map_err(|_| {
            ProviderError::Pull(format!(
                "pulling {reference}: the {what} {} declares a negative size",
                descriptor.digest
            ))
        })?;
        if declared > cap.max {
            return Err(ProviderError::Pull(format!(
                "pulling {reference}: the {what} {} is {declared} bytes, more than the {} bytes {} allows",
                descriptor.digest, cap.max, cap.flag
            )));
        }
        Ok(Self {
            sink,
            hasher: Sha256::new(),
            written: 0,
            declared,
            digest: descriptor.digest.clone(),
            what: what.into(),
            reference: reference.into(),
            progress,
            refusal: None,
        })
    }

    /// After the last byte: all declared bytes came, and they hash to the digest.
    fn finish(&mut self) -> Result<(), ProviderError> {
        if self.written != self.declared {
            return Err(ProviderError::Pull(format!(
                "pulling {}: the {} {} ended after {} of the {} bytes declared",
                self.reference, self.what, self.digest, self.written, self.declared
            )));
        }
        let got = format!(
            "sha256:{}",
            to_hex(&std::mem::take(&mut self.hasher).finalize())
        );
        if got != self.digest {
            return Err(ProviderError::Pull(format!(
                "pulling {}: the {}: digest mismatch: expected {}, got {got}",
                self.reference, self.what, self.digest
            )));
        }
        Ok(())
    }
}

impl tokio::io::AsyncWrite for BlobSink<'_> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::task::Poll;
        let this = &mut *self;
        if this.written + buf.len() as u64 > this.declared {
            let msg = format!("pulling {}: the registry sent more than the {} bytes the manifest declares for the {} {}", this.reference, this.declared, this.what, this.digest);
            this.refusal = Some(ProviderError::Pull(msg.clone()));
            return Poll::Ready(Err(std::io::Error::other(msg)));
        }
        let n = match &mut this.sink {
            Sink::Memory(bytes) => {
                bytes.extend_from_slice(buf);
                buf.len()
            }
            Sink::File(file) => match std::pin::Pin::new(file).poll_write(cx, buf) {
                Poll::Ready(Ok(n)) => n,
                other => return other,
            },
        };
        this.hasher.update(&buf[..n]);
        this.written += n as u64;
        this.progress.mark(n);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match &mut self.sink {
            Sink::Memory(_) => std::task::Poll::Ready(Ok(())),
            Sink::File(file) => std::pin::Pin::new(file).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match &mut self.sink {
            Sink::Memory(_) => std::task::Poll::Ready(Ok(())),
            Sink::File(file) => std::pin::Pin::new(file).poll_shutdown(cx),
        }
    }
}

/// A temporary sibling of a file being written, removed unless persisted.
struct TempFile {
    path: PathBuf,
    kept: bool,
}

impl TempFile {
    fn beside(path: &Path) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(format!(
            ".tmp.{}.{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        Self {
            path: path.with_file_name(name),
            kept: false,
        }
    }

    /// Renames it to `to`.
    fn persist(mut self, to: &Path) -> std::io::Result<()> {
        std::fs::rename(&self.path, to)?;
        self.kept = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.kept {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A scratch directory under the store (`tmp/`), removed with what is in it when dropped (and
/// by the sweep when the store opens, after a crash).
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn new(parent: PathBuf) -> std::io::Result<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = parent.join(format!(
            "pull.{}.{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path)?;
        Ok(Self { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// (bytes allocated, files) under `path`, as `du` counts them: `path` itself included, symlinks
/// counted and never followed (a link to elsewhere or a loop adds only the link), entries that
/// cannot be read skipped. Blocking: walks the whole tree (callers use `spawn_blocking`).
pub fn tree_usage(path: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    // walkdir yields `path` itself first; it would follow `path` if a link unless told not to.
    walkdir::WalkDir::new(path)
        .follow_links(false)
        .follow_root_links(false)
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.metadata().ok())
        .fold((0, 0), |(bytes, files), meta| {
            (bytes + meta.blocks() * 512, files + 1)
        })
}

/// Milliseconds: two images used within a second still have an order.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The key a reference is indexed under: `127.0.0.1:5000/hello:v1` and `hello` (docker.io
/// library, latest) each have one canonical form.
fn canonical(reference: &str) -> String {
    reference
        .parse::<Reference>()
        .map(|r| r.whole())
        .unwrap_or_else(|_| reference.to_string())
}

/// A memo of [`canonical`]: parsing a reference runs oci-spec's reference regex, whose
/// per-thread caches grew to ~18 MiB in a burst of container starts (every start and every
/// image status asks for its reference's canonical form). A node uses few distinct
/// references, so each is parsed once; the memo is bounded because references come from pod
/// specs (a hostile user may write many): past [`CanonicalMemo::MAX`] entries it starts over.
#[derive(Default)]
struct CanonicalMemo(Mutex<HashMap<String, String>>);

impl CanonicalMemo {
    /// Far above the distinct images a node runs (a 5,000-pod node of a few hundred images),
    /// and at ~200 bytes an entry well under a MiB.
    const MAX: usize = 4096;

    fn get(&self, reference: &str) -> String {
        if let Some(known) = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(reference)
        {
            return known.clone();
        }
        // Parsed outside the lock: the regex is the slow part.
        let form = canonical(reference);
        let mut memo = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if memo.len() >= Self::MAX {
            memo.clear();
        }
        memo.insert(reference.to_string(), form.clone());
        form
    }
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
    Deleted {
        path: String,
        layer: usize,
        whiteout: String,
    },
    /// The path is a directory, device or the like.
    #[error("the entrypoint {path} is a {kind} in layer {layer}, not a file")]
    NotAFile {
        path: String,
        layer: usize,
        kind: String,
    },
    /// Symbolic links that loop or chain too deep.
    #[error("the entrypoint {path} passes through more than {MAX_SYMLINKS} links")]
    TooManyLinks { path: String },
    /// The file is there but is not a Wasm module or component.
    #[error("the entrypoint {path} is not WebAssembly: {found}")]
    NotWasm { path: String, found: String },
    /// A layer is not a readable (gzip-compressed) tar archive.
    #[error("layer {layer} is not a readable tar archive: {reason}")]
    Layer { layer: usize, reason: String },
    /// A layer inflates to more than the limit (a decompression bomb, or just too big).
    #[error("layer {layer} inflates to more than {limit} bytes, the limit --max-layer-uncompressed-size sets")]
    LayerTooLarge { layer: usize, limit: u64 },
    /// The module file is larger than the limit.
    #[error("the entrypoint {path} in layer {layer} is {size} bytes, more than the {limit} bytes --max-module-size allows")]
    ModuleTooLarge {
        path: String,
        layer: usize,
        size: u64,
        limit: u64,
    },
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
        let file: File =
            serde_json::from_slice(document).map_err(|e| EntrypointError::Config(e.to_string()))?;
        let defaults = file.config.map(|d| ContainerDefaults {
            entrypoint: d.entrypoint.unwrap_or_default(),
            cmd: d.cmd.unwrap_or_default(),
            working_dir: d.working_dir.unwrap_or_default(),
        });
        Ok(defaults.unwrap_or_default())
    }

    /// The module's path in the root filesystem (normalised, no leading `/`): `Entrypoint[0]`,
    /// relative to `WorkingDir` (else `/`) when it is not absolute.
    pub fn program(&self) -> Result<String, EntrypointError> {
        let first = self
            .entrypoint
            .first()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| EntrypointError::NoEntrypoint {
                cmd: self.cmd.clone(),
            })?;
        let full = if first.starts_with('/') {
            first.clone()
        } else {
            format!("{}/{first}", self.working_dir)
        };
        normalise_path(&full)
            .filter(|p| !p.is_empty())
            .ok_or_else(|| EntrypointError::BadPath(first.clone()))
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
    /// Most bytes one layer may inflate to while it is read.
    max_uncompressed: u64,
    /// Largest module file taken.
    max_module: u64,
}

/// What one layer says about a path.
#[derive(Debug, PartialEq, Eq)]
enum LayerHit {
    File(Vec<u8>),
    /// A file larger than the module limit (its size in the tar header).
    TooLarge(u64),
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
        let next = layers
            .checked_sub(1)
            .ok_or_else(|| EntrypointError::NotFound {
                path: format!("/{path}"),
                layers,
            })?;
        Ok(Self {
            path: path.to_string(),
            layers,
            next,
            links: 0,
            max_uncompressed: u64::MAX,
            max_module: u64::MAX,
        })
    }

    /// The search with these limits: a layer that inflates to more than `max_uncompressed`
    /// bytes, or a module file over `max_module` bytes, ends it with an error. Without them
    /// nothing is limited.
    pub fn with_limits(mut self, max_uncompressed: u64, max_module: u64) -> Self {
        (self.max_uncompressed, self.max_module) = (max_uncompressed, max_module);
        self
    }

    /// The index of the layer to feed next (0 is the bottom layer).
    pub fn next_layer(&self) -> usize {
        self.next
    }

    /// Reads layer `index` (a tar archive, gzip-compressed or not: told by its first bytes),
    /// streaming, never more than the uncompressed limit: `Some(module)` when the search ends
    /// there, `None` to feed [`Self::next_layer`].
    pub fn feed(
        &mut self,
        index: usize,
        mut layer: impl std::io::Read,
    ) -> Result<Option<Vec<u8>>, EntrypointError> {
        use std::io::Read;
        let shown = format!("/{}", self.path);
        let mut head = [0u8; 2];
        let mut got = 0;
        while got < head.len() {
            match layer.read(&mut head[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(EntrypointError::Layer {
                        layer: index,
                        reason: e.to_string(),
                    })
                }
            }
        }
        let whole = std::io::Cursor::new(head[..got].to_vec()).chain(layer);
        let over = std::cell::Cell::new(false);
        let hit = if head[..got] == [0x1f, 0x8b] {
            search_layer(
                Capped {
                    inner: flate2::read::GzDecoder::new(whole),
                    left: self.max_uncompressed,
                    over: &over,
                },
                &self.path,
                self.max_module,
            )
        } else {
            search_layer(
                Capped {
                    inner: whole,
                    left: self.max_uncompressed,
                    over: &over,
                },
                &self.path,
                self.max_module,
            )
        };
        let hit = match hit {
            Ok(hit) => hit,
            Err(_) if over.get() => {
                return Err(EntrypointError::LayerTooLarge {
                    layer: index,
                    limit: self.max_uncompressed,
                })
            }
            Err(reason) => {
                return Err(EntrypointError::Layer {
                    layer: index,
                    reason,
                })
            }
        };
        match hit {
            LayerHit::TooLarge(size) => Err(EntrypointError::ModuleTooLarge {
                path: shown,
                layer: index,
                size,
                limit: self.max_module,
            }),
            LayerHit::File(bytes) if bytes.starts_with(WASM_MAGIC) => Ok(Some(bytes)),
            LayerHit::File(bytes) => Err(EntrypointError::NotWasm {
                path: shown,
                found: describe_head(&bytes),
            }),
            LayerHit::Hidden(whiteout) => Err(EntrypointError::Deleted {
                path: shown,
                layer: index,
                whiteout,
            }),
            LayerHit::Absent => match index.checked_sub(1) {
                Some(below) => {
                    self.next = below;
                    Ok(None)
                }
                None => Err(EntrypointError::NotFound {
                    path: shown,
                    layers: self.layers,
                }),
            },
            LayerHit::Special(kind) => Err(EntrypointError::NotAFile {
                path: shown,
                layer: index,
                kind: kind.into(),
            }),
            LayerHit::SymLink(target) | LayerHit::HardLink(target) if target.is_empty() => {
                Err(EntrypointError::NotAFile {
                    path: shown,
                    layer: index,
                    kind: "link to the root directory".into(),
                })
            }
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
            return Err(EntrypointError::TooManyLinks {
                path: format!("/{}", self.path),
            });
        }
        self.path = target;
        Ok(())
    }
}

/// A reader that yields at most `left` bytes and then fails, setting `over`, if there is more.
struct Capped<'a, R> {
    inner: R,
    left: u64,
    over: &'a std::cell::Cell<bool>,
}

impl<R: std::io::Read> std::io::Read for Capped<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => {
                    self.over.set(true);
                    Err(std::io::Error::other("the layer inflates past the limit"))
                }
            };
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        Ok(n)
    }
}

/// Scans one tar archive for `path` (see [`EntrypointSearch`]); a file over `max_module`
/// bytes is not read. Errors are the archive's.
fn search_layer(
    archive: impl std::io::Read,
    path: &str,
    max_module: u64,
) -> Result<LayerHit, String> {
    use std::io::Read;
    let mut hidden: Option<String> = None;
    let mut archive = tar::Archive::new(archive);
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let entry = entry.map_err(|e| e.to_string())?;
        let raw = entry.path_bytes();
        let Some(name) = std::str::from_utf8(&raw).ok().and_then(normalise_path) else {
            continue;
        };
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
                    if entry.size() > max_module {
                        return Ok(LayerHit::TooLarge(entry.size()));
                    }
                    // The module is held in memory (at most max_module bytes): it is compiled
                    // from memory anyway. The capacity is a hint from the header, bounded.
                    let mut bytes = Vec::with_capacity(
                        usize::try_from(entry.size()).unwrap_or(0).min(64 << 20),
                    );
                    entry
                        .take(max_module.saturating_add(1))
                        .read_to_end(&mut bytes)
                        .map_err(|e| format!("reading /{path}: {e}"))?;
                    if bytes.len() as u64 > max_module {
                        return Ok(LayerHit::TooLarge(bytes.len() as u64));
                    }
                    Ok(LayerHit::File(bytes))
                }
                EntryType::Symlink | EntryType::Link => {
                    let target = entry
                        .link_name_bytes()
                        .map(|t| String::from_utf8_lossy(&t).into_owned())
                        .unwrap_or_default();
                    // A symbolic link's relative target is relative to its directory; a hard
                    // link names a path from the archive's root.
                    let joined = if kind == EntryType::Symlink && !target.starts_with('/') {
                        format!("{parent}/{target}")
                    } else {
                        target.clone()
                    };
                    let resolved = normalise_path(&joined)
                        .ok_or_else(|| format!("/{path} links to {target:?}"))?;
                    Ok(if kind == EntryType::Symlink {
                        LayerHit::SymLink(resolved)
                    } else {
                        LayerHit::HardLink(resolved)
                    })
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
            let deleted = if parent.is_empty() {
                deleted.to_string()
            } else {
                format!("{parent}/{deleted}")
            };
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
    format!(
        "{} bytes starting with [{}]{guess}; a Wasm module starts with 00 61 73 6d",
        bytes.len(),
        head.join(" ")
    )
}

/// The first layer holding Wasm, or the list of media types found (for the error).
pub fn select_wasm_layer(manifest: &OciImageManifest) -> Result<&OciDescriptor, String> {
    manifest
        .layers
        .iter()
        .find(|l| WASM_LAYER_TYPES.contains(&l.media_type.as_str()))
        .ok_or_else(|| {
            if manifest.layers.is_empty() {
                "none, the manifest has no layers".to_string()
            } else {
                manifest
                    .layers
                    .iter()
                    .map(|l| l.media_type.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        })
}

/// The index entry for a Wasm platform: the first whose `os` is wasip1, wasip2 or wasi, or
/// whose architecture is `wasm`. Docker buildx's attestation manifests (provenance, SBOM:
/// annotation `vnd.docker.reference.type`, platform `unknown/unknown`) are never chosen.
pub fn choose_platform(entries: &[ImageIndexEntry]) -> Option<&ImageIndexEntry> {
    entries.iter().find(|e| {
        let attestation = e
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(DOCKER_REFERENCE_TYPE));
        !attestation
            && e.platform
                .as_ref()
                .is_some_and(|p| WASM_OSES.contains(&p.os.as_str()) || p.architecture == "wasm")
    })
}

/// The annotation Docker buildx puts on an index entry that is an attestation of another
/// entry (`attestation-manifest`), not an image.
const DOCKER_REFERENCE_TYPE: &str = "vnd.docker.reference.type";

/// Config media type of a Spin application artifact (`spin registry push`): the config is the
/// application's lock file (spin.lock JSON), its layers the components' sources and files.
pub const SPIN_APP_CONFIG: &str = "application/vnd.fermyon.spin.application.v1+config";

/// What a Spin application may be to run here: one component, reached by HTTP triggers only,
/// served as a wasi:http component on the pod's declared port.
const SPIN_SUPPORTED: &str = "this node runs a Spin application of exactly one component with \
     only http triggers (the spin executor), no files, variables, config, environment or \
     dependencies, its source a wasi:http component";

/// The layer of a Spin application (`lock`: its config, the spin.lock JSON) this node runs:
/// the source of its one HTTP component. Anything this node cannot honour (several
/// components, other triggers, files, variables, ...) is refused, naming it: running a part of
/// an application silently would serve something the author did not build.
pub fn select_spin_component<'m>(
    lock: &[u8],
    manifest: &'m OciImageManifest,
) -> Result<&'m OciDescriptor, String> {
    use serde_json::Value;
    let refuse = |what: String| format!("{what}; {SPIN_SUPPORTED}");
    let lock: Value = serde_json::from_slice(lock)
        .map_err(|e| refuse(format!("its lock file (the config) is not JSON: {e}")))?;
    let non_empty = |v: Option<&Value>| match v {
        None | Some(Value::Null) => false,
        Some(Value::Object(m)) => !m.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(_) => true,
    };
    let names = |v: Option<&Value>| match v {
        Some(Value::Object(m)) => m.keys().take(5).cloned().collect::<Vec<_>>().join(", "),
        Some(Value::Array(a)) => a
            .iter()
            .take(5)
            .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
            .collect::<Vec<_>>()
            .join(", "),
        _ => String::new(),
    };
    let version = lock.get("spin_lock_version").unwrap_or(&Value::Null);
    if !matches!(version.as_u64(), Some(0 | 1)) {
        return Err(refuse(format!(
            "its lock file has spin_lock_version {version} (this node reads 0 and 1)"
        )));
    }
    for field in ["must_understand", "host_requirements"] {
        if non_empty(lock.get(field)) {
            return Err(refuse(format!(
                "it requires host features ({})",
                names(lock.get(field))
            )));
        }
    }
    if non_empty(lock.get("variables")) {
        return Err(refuse(format!(
            "it declares application variables ({})",
            names(lock.get("variables"))
        )));
    }
    let components = lock
        .get("components")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let component = match components {
        [one] => one,
        [] => return Err(refuse("it has no components".into())),
        many => {
            let ids: Vec<&str> = many
                .iter()
                .take(5)
                .map(|c| c.get("id").and_then(Value::as_str).unwrap_or("?"))
                .collect();
            return Err(refuse(format!(
                "it has {} components ({}{})",
                many.len(),
                ids.join(", "),
                if many.len() > 5 { ", ..." } else { "" }
            )));
        }
    };
    let id = component.get("id").and_then(Value::as_str).unwrap_or("");
    for (field, what) in [
        ("files", "files"),
        ("config", "config values"),
        (
            "env",
            "environment variables (set them in the pod's env instead)",
        ),
        ("dependencies", "component dependencies"),
    ] {
        if non_empty(component.get(field)) {
            return Err(refuse(format!("component {id:?} has {what}")));
        }
    }
    if non_empty(component.get("source").and_then(|s| s.get("dependencies"))) {
        return Err(refuse(format!(
            "component {id:?} has component dependencies"
        )));
    }
    let triggers = lock
        .get("triggers")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    if triggers.is_empty() {
        return Err(refuse("it has no triggers".into()));
    }
    for trigger in triggers {
        let kind = trigger
            .get("trigger_type")
            .and_then(Value::as_str)
            .unwrap_or("(none)");
        let config = trigger.get("trigger_config");
        if kind != "http" {
            return Err(refuse(format!("it has a {kind:?} trigger")));
        }
        let target = config
            .and_then(|c| c.get("component"))
            .and_then(Value::as_str);
        if target != Some(id) {
            return Err(refuse(format!(
                "an http trigger names component {:?}, not {id:?}",
                target.unwrap_or("(none)")
            )));
        }
        let executor = config
            .and_then(|c| c.get("executor"))
            .and_then(|e| e.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("spin");
        if executor != "spin" {
            return Err(refuse(format!(
                "its http trigger uses the {executor:?} executor"
            )));
        }
    }
    // spin.lock flattens the content reference into `source` (`source.digest`); accept the
    // nested form (`source.content.digest`) too.
    let source = component.get("source");
    let digest = source
        .and_then(|s| s.get("digest").or_else(|| s.get("content")?.get("digest")))
        .and_then(Value::as_str)
        .ok_or_else(|| {
            refuse(format!(
                "component {id:?} has no source digest (a lock file not made by spin registry push?)"
            ))
        })?;
    manifest
        .layers
        .iter()
        .find(|l| l.digest == digest && WASM_LAYER_TYPES.contains(&l.media_type.as_str()))
        .ok_or_else(|| {
            refuse(format!(
                "component {id:?}'s source {digest} is not a Wasm layer of the manifest"
            ))
        })
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
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| format!("digest {digest:?} is not sha256"))?;
    if hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
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
        Err(format!(
            "digest mismatch: expected {expected}, got sha256:{got}"
        ))
    }
}

/// Whether plain http may be used (after https failed) for a registry: only when it is named
/// in `insecure` (`host[:port]`, as [`RegistryOptions::insecure_registries`]). Being on
/// loopback is no reason: `127.0.0.1:10248/x:y` would make the agent GET its own ports.
pub fn may_use_plain_http(registry: &str, insecure: &[String]) -> bool {
    let want = normalise_registry(registry);
    insecure.iter().any(|i| normalise_registry(i) == want)
}

/// Basic credentials whose registry matches `registry` (Docker Hub's aliases count as one);
/// anonymous when none does.
pub fn credentials_for(registry: &str, auth: &[RegistryAuth]) -> OciAuth {
    let want = normalise_registry(registry);
    auth.iter()
        .find(|a| normalise_registry(&a.registry) == want)
        .map(|a| OciAuth::Basic(a.username.clone(), a.password.clone()))
        .unwrap_or(OciAuth::Anonymous)
}

/// `https://index.docker.io/v1/` -> `docker.io`; `127.0.0.1:5000/` -> `127.0.0.1:5000`.
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    #[test]
    fn the_canonical_memo_answers_as_the_parse_and_stays_bounded() {
        let memo = CanonicalMemo::default();
        for reference in ["hello", "127.0.0.1:5000/hello:v1", "Not A Reference!"] {
            assert_eq!(memo.get(reference), canonical(reference), "{reference}");
            assert_eq!(
                memo.get(reference),
                canonical(reference),
                "{reference} again"
            );
        }
        assert_eq!(memo.get("hello"), "docker.io/library/hello:latest");
        for i in 0..CanonicalMemo::MAX + 10 {
            memo.get(&format!("127.0.0.1:5000/image{i}:v1"));
        }
        assert!(memo.0.lock().unwrap().len() <= CanonicalMemo::MAX);
        assert_eq!(
            memo.get("127.0.0.1:5000/image1:v1"),
            "127.0.0.1:5000/image1:v1"
        );
    }

    /// A fresh store directory for one test.
    fn store_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("wk-images-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn tree_usage_counts_links_without_following_them() {
        use std::os::unix::fs::symlink;
        let dir = store_dir("usage");
        let tree = dir.join("tree");
        std::fs::create_dir_all(tree.join("a/b")).unwrap();
        std::fs::write(tree.join("a/b/blob"), vec![1u8; 64 * 1024]).unwrap();
        std::fs::create_dir_all(dir.join("outside")).unwrap();
        std::fs::write(dir.join("outside/big"), vec![2u8; 1024 * 1024]).unwrap();
        let (bytes, files) = super::tree_usage(&tree);
        // tree, a, a/b, a/b/blob.
        assert_eq!(files, 4);
        assert!(bytes >= 64 * 1024, "{bytes}");
        // A loop, a link up and a link to a tree outside: each adds itself, none is walked.
        symlink("loop", tree.join("a/loop")).unwrap();
        symlink("..", tree.join("a/b/up")).unwrap();
        symlink(dir.join("outside"), tree.join("out")).unwrap();
        let (linked, linked_files) = super::tree_usage(&tree);
        assert_eq!(linked_files, 7);
        assert!(
            linked < bytes + 1024 * 1024,
            "{linked} counted the linked-to tree"
        );
        // The root itself a link: counted as the link, not followed.
        symlink(&tree, dir.join("alias")).unwrap();
        assert_eq!(super::tree_usage(&dir.join("alias")).1, 1);
        assert_eq!(super::tree_usage(&dir.join("missing")), (0, 0));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn removal_keeps_a_blob_another_reference_shares_and_discards_the_last() {
        let dir = store_dir("remove");
        let store = ImageStore::open(&dir, RegistryOptions::default()).unwrap();
        let a = store
            .import("127.0.0.1:5000/a:v1", b"\0asm\x01\0\0\0shared")
            .unwrap();
        store
            .import("127.0.0.1:5000/b:v1", b"\0asm\x01\0\0\0shared")
            .unwrap();
        let blob = store.blob_path(&a.layer_digest).unwrap();
        assert_eq!(store.remove("127.0.0.1:5000/a:v1").unwrap(), (None, 0));
        assert!(blob.is_file(), "b still needs it");
        let (digest, freed) = store.remove("127.0.0.1:5000/b:v1").unwrap();
        assert_eq!(
            (digest.as_deref(), freed),
            (Some(a.layer_digest.as_str()), 14)
        );
        assert!(!blob.exists());
        assert!(matches!(
            store.remove("127.0.0.1:5000/b:v1"),
            Err(ProviderError::NotFound(_))
        ));
        assert!(store.list().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn opening_finishes_an_interrupted_removal() {
        let dir = store_dir("sweep");
        let store = ImageStore::open(&dir, RegistryOptions::default()).unwrap();
        let kept = store
            .import("127.0.0.1:5000/kept:v1", b"\0asm\x01\0\0\0kept")
            .unwrap();
        let gone = store
            .import("127.0.0.1:5000/gone:v1", b"\0asm\x01\0\0\0gone")
            .unwrap();
        store.touch("127.0.0.1:5000/kept:v1");
        // A crash after the index dropped `gone` but before its blob left; and one in the
        // middle of deleting from the trash, and of writing a blob.
        let mut index = store.index.lock().unwrap().clone();
        index.remove(&canonical("127.0.0.1:5000/gone:v1"));
        write_atomically(
            &dir.join("images/index.json"),
            &serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
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
        assert!(
            !store.blob_path(&gone.layer_digest).unwrap().exists(),
            "the orphaned blob is deleted"
        );
        assert!(store.blob_path(&kept.layer_digest).unwrap().is_file());
        assert!(!dir.join("images/trash").exists(), "the trash is emptied");
        assert!(!dir.join("images/blobs/sha256/def.tmp.1.0").exists());
        assert!(!dir.join("images/last-used.json.tmp.1").exists());
        let listed = store.list();
        assert_eq!(listed.len(), 1);
        assert!(
            listed[0].2 < store.opened_at,
            "the recorded last use survives the restart"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
    use super::*;
    use oci_client::manifest::Platform;

    fn descriptor(media_type: &str) -> OciDescriptor {
        OciDescriptor {
            media_type: media_type.into(),
            digest: format!("sha256:{}", "a".repeat(64)),
            size: 1,
            ..Default::default()
        }
    }

    #[test]
    fn selects_the_wasm_layer_by_media_type() {
        for media_type in WASM_LAYER_TYPES {
            let manifest = OciImageManifest {
                layers: vec![
                    descriptor("application/vnd.oci.image.config.v1+json"),
                    descriptor(media_type),
                ],
                ..Default::default()
            };
            assert_eq!(
                select_wasm_layer(&manifest).unwrap().media_type,
                *media_type
            );
        }
        let container = OciImageManifest {
            layers: vec![
                descriptor("application/vnd.oci.image.layer.v1.tar+gzip"),
                descriptor("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            ],
            ..Default::default()
        };
        let found = select_wasm_layer(&container).unwrap_err();
        assert!(
            found.contains("application/vnd.oci.image.layer.v1.tar+gzip")
                && found.contains("rootfs.diff.tar.gzip"),
            "{found}"
        );
    }

    fn entry(os: &str, arch: &str, digest: char) -> ImageIndexEntry {
        ImageIndexEntry {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            digest: format!("sha256:{}", digest.to_string().repeat(64)),
            size: 1,
            platform: Some(Platform {
                architecture: arch.into(),
                os: os.into(),
                os_version: None,
                os_features: None,
                variant: None,
                features: None,
            }),
            annotations: None,
        }
    }

    #[test]
    fn chooses_the_wasm_platform_of_an_index() {
        let index = vec![
            entry("linux", "amd64", 'a'),
            entry("linux", "arm64", 'b'),
            entry("wasip1", "wasm32", 'c'),
        ];
        assert_eq!(
            choose_platform(&index).unwrap().digest,
            format!("sha256:{}", "c".repeat(64))
        );
        let index = vec![entry("linux", "amd64", 'a'), entry("wasip2", "wasm32", 'd')];
        assert!(choose_platform(&index).unwrap().digest.contains('d'));
        let index = vec![entry("unknown", "wasm", 'e')];
        assert!(choose_platform(&index).is_some());
        assert!(choose_platform(&[entry("linux", "amd64", 'a')]).is_none());
    }

    #[test]
    fn an_attestation_manifest_is_never_the_platform() {
        let mut attestation = entry("unknown", "wasm", 'a');
        attestation.annotations = Some(
            [(
                "vnd.docker.reference.type".to_string(),
                "attestation-manifest".to_string(),
            )]
            .into(),
        );
        let index = vec![attestation, entry("wasi", "wasm", 'b')];
        assert!(choose_platform(&index).unwrap().digest.contains('b'));
        assert!(choose_platform(&index[..1]).is_none());
    }

    /// A spin.lock as `spin registry push` writes it: one http component whose source is the
    /// layer of digest `b...`; `edit` changes it first.
    fn spin_lock(edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let mut lock = serde_json::json!({
            "spin_lock_version": 1,
            "metadata": {"name": "hello", "version": "0.1.0"},
            "triggers": [{"id": "trigger--hello", "trigger_type": "http",
                "trigger_config": {"component": "hello", "route": "/..."}}],
            "components": [{"id": "hello", "metadata": {"allowed_outbound_hosts": []},
                "source": {"content_type": "application/wasm",
                    "digest": format!("sha256:{}", "b".repeat(64))}}],
        });
        edit(&mut lock);
        lock.to_string().into_bytes()
    }

    #[test]
    fn a_spin_app_of_one_http_component_runs_that_component() {
        let mut wasm = descriptor("application/vnd.wasm.content.layer.v1+wasm");
        wasm.digest = format!("sha256:{}", "b".repeat(64));
        let manifest = OciImageManifest {
            layers: vec![
                descriptor("application/vnd.wasm.content.layer.v1+wasm"),
                wasm,
            ],
            ..Default::default()
        };
        let chosen = select_spin_component(&spin_lock(|_| ()), &manifest).unwrap();
        assert!(
            chosen.digest.ends_with('b'),
            "the lock's source, not the first layer"
        );
        // The nested content form is read too.
        let nested = spin_lock(|l| {
            l["components"][0]["source"] = serde_json::json!({"content_type": "application/wasm",
                "content": {"digest": format!("sha256:{}", "b".repeat(64))}});
        });
        assert!(select_spin_component(&nested, &manifest)
            .unwrap()
            .digest
            .ends_with('b'));

        let refused = |edit: fn(&mut serde_json::Value), want: &str| {
            let err = select_spin_component(&spin_lock(edit), &manifest).unwrap_err();
            assert!(
                err.contains(want) && err.contains("exactly one component"),
                "{want}: {err}"
            );
        };
        refused(
            |l| {
                let other = l["components"][0].clone();
                l["components"].as_array_mut().unwrap().push(other);
                l["components"][1]["id"] = "two".into();
            },
            "2 components (hello, two)",
        );
        refused(
            |l| l["triggers"][0]["trigger_type"] = "redis".into(),
            "a \"redis\" trigger",
        );
        refused(
            |l| l["components"][0]["files"] = serde_json::json!([{"path": "/a", "digest": "x"}]),
            "component \"hello\" has files",
        );
        refused(
            |l| l["variables"] = serde_json::json!({"token": {"required": true}}),
            "application variables (token)",
        );
        refused(
            |l| {
                l["triggers"][0]["trigger_config"]["executor"] = serde_json::json!({"type": "wagi"})
            },
            "\"wagi\" executor",
        );
        refused(|l| l["components"] = serde_json::json!([]), "no components");
        refused(
            |l| {
                l["components"][0]["source"]["digest"] = format!("sha256:{}", "c".repeat(64)).into()
            },
            "is not a Wasm layer of the manifest",
        );
        refused(|l| l["spin_lock_version"] = 7.into(), "spin_lock_version 7");
        let err = select_spin_component(b"<html>", &manifest).unwrap_err();
        assert!(err.contains("not JSON"), "{err}");
    }

    #[test]
    fn verifies_sha256_digests() {
        // sha256("hello")
        let good = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        assert_eq!(verify_digest(good, b"hello"), Ok(()));
        assert!(verify_digest(good, b"hellO")
            .unwrap_err()
            .contains("mismatch"));
        assert!(verify_digest("sha512:abcd", b"hello").is_err());
        assert!(sha256_hex("sha256:../../etc/passwd").is_err());
        assert!(sha256_hex(&format!("sha256:{}", "A".repeat(64))).is_err());
    }

    #[test]
    fn plain_http_only_for_listed_registries() {
        // Loopback is no exception any more: an image reference must not reach the node's own
        // plain-http ports.
        for r in [
            "127.0.0.1:5000",
            "127.0.0.1:10248",
            "localhost:5000",
            "[::1]:5000",
            "ghcr.io",
        ] {
            assert!(!may_use_plain_http(r, &[]), "{r}");
        }
        let insecure = vec![
            "registry.lan:5000".to_string(),
            "127.0.0.1:5000".to_string(),
        ];
        assert!(may_use_plain_http("registry.lan:5000", &insecure));
        assert!(may_use_plain_http("127.0.0.1:5000", &insecure));
        assert!(!may_use_plain_http("registry.lan:5001", &insecure));
        assert!(!may_use_plain_http("127.0.0.1:10248", &insecure));
    }

    #[test]
    fn credentials_match_the_registry_host() {
        let auth = vec![
            RegistryAuth {
                registry: "127.0.0.1:5443".into(),
                username: "u1".into(),
                password: "p1".into(),
            },
            RegistryAuth {
                registry: "https://index.docker.io/v1/".into(),
                username: "u2".into(),
                password: "p2".into(),
            },
        ];
        assert_eq!(
            credentials_for("127.0.0.1:5443", &auth),
            OciAuth::Basic("u1".into(), "p1".into())
        );
        assert_eq!(
            credentials_for("docker.io", &auth),
            OciAuth::Basic("u2".into(), "p2".into())
        );
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
            let (path, data, kind, link): (&str, &[u8], tar::EntryType, Option<&str>) = match entry
            {
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
            match search.feed(i, &layers[i][..]) {
                Ok(Some(module)) => return (Ok(module), read),
                Ok(None) => continue,
                Err(e) => return (Err(e), read),
            }
        }
    }

    #[test]
    fn finds_the_entrypoint_in_tar_and_gzip_layers() {
        for gzip in [true, false] {
            let layers = vec![layer(
                &[E::Dir("app/"), E::File("app/hello.wasm", MODULE)],
                gzip,
            )];
            assert_eq!(find("app/hello.wasm", &layers).0, Ok(MODULE.to_vec()));
        }
        // Names as tar tools write them: with a leading ./ or /.
        let layers = vec![layer(&[E::File("./app/a.wasm", MODULE)], true)];
        assert_eq!(find("app/a.wasm", &layers).0, Ok(MODULE.to_vec()));
    }

    #[test]
    fn later_layers_win_and_only_needed_layers_are_read() {
        let layers = vec![
            layer(&[E::File("app/x.wasm", MODULE)], true),
            layer(&[E::File("etc/other", b"x")], true),
            layer(&[E::File("app/x.wasm", OTHER_MODULE)], true),
        ];
        assert_eq!(
            find("app/x.wasm", &layers),
            (Ok(OTHER_MODULE.to_vec()), vec![2])
        );
        let layers = vec![
            layer(&[E::File("app/x.wasm", MODULE)], true),
            layer(&[E::File("etc/other", b"x")], true),
        ];
        assert_eq!(
            find("app/x.wasm", &layers),
            (Ok(MODULE.to_vec()), vec![1, 0])
        );
    }

    #[test]
    fn whiteouts_hide_lower_layers() {
        let base = layer(&[E::File("app/x.wasm", MODULE)], true);
        for (whiteout, shown) in [
            ("app/.wh.x.wasm", "/app/.wh.x.wasm"),
            (".wh.app", "/.wh.app"),
            ("app/.wh..wh..opq", "/app/.wh..wh..opq"),
        ] {
            let layers = vec![base.clone(), layer(&[E::File(whiteout, b"")], true)];
            match find("app/x.wasm", &layers).0 {
                Err(EntrypointError::Deleted {
                    layer: 1,
                    whiteout: w,
                    ..
                }) => assert_eq!(w, shown),
                other => panic!("{whiteout}: {other:?}"),
            }
        }
        // A whiteout of a sibling hides nothing; one in the same layer as the file yields to it.
        let layers = vec![
            base.clone(),
            layer(&[E::File("app/.wh.x.wasmy", b"")], true),
        ];
        assert_eq!(find("app/x.wasm", &layers).0, Ok(MODULE.to_vec()));
        let layers = vec![
            base,
            layer(
                &[
                    E::File("app/.wh..wh..opq", b""),
                    E::File("app/x.wasm", OTHER_MODULE),
                ],
                true,
            ),
        ];
        assert_eq!(find("app/x.wasm", &layers).0, Ok(OTHER_MODULE.to_vec()));
    }

    #[test]
    fn links_are_followed_and_loops_end() {
        let layers = vec![
            layer(&[E::File("opt/app/x.wasm", MODULE)], true),
            layer(&[E::Sym("bin/app", "../opt/app/x.wasm")], true),
        ];
        assert_eq!(find("bin/app", &layers).0, Ok(MODULE.to_vec()));
        let layers = vec![layer(
            &[
                E::File("opt/x.wasm", MODULE),
                E::Hard("bin/app", "opt/x.wasm"),
            ],
            false,
        )];
        assert_eq!(find("bin/app", &layers).0, Ok(MODULE.to_vec()));
        let layers = vec![layer(&[E::Sym("a", "/b"), E::Sym("b", "a")], true)];
        assert!(matches!(
            find("a", &layers).0,
            Err(EntrypointError::TooManyLinks { .. })
        ));
    }

    #[test]
    fn what_is_not_a_wasm_file_is_named() {
        let layers = vec![layer(
            &[
                E::File("bin/app", b"\x7fELF\x02\x01\x01\0rest"),
                E::Dir("app/"),
            ],
            true,
        )];
        let err = find("bin/app", &layers).0.unwrap_err();
        assert!(
            matches!(err, EntrypointError::NotWasm { .. }) && err.to_string().contains("ELF"),
            "{err}"
        );
        let err = find("app", &layers).0.unwrap_err();
        assert_eq!(
            err,
            EntrypointError::NotAFile {
                path: "/app".into(),
                layer: 0,
                kind: "directory".into()
            }
        );
        let err = find("app/missing.wasm", &layers).0.unwrap_err();
        assert_eq!(
            err.to_string(),
            "the entrypoint /app/missing.wasm is in none of the image's 1 layers"
        );
        assert!(matches!(
            find("x", &[]).0,
            Err(EntrypointError::NotFound { layers: 0, .. })
        ));
        // Gzip magic and then garbage: the archive's own error, as a Layer error.
        assert!(matches!(
            find("x", &[vec![0x1f, 0x8b, 0, 0]]).0,
            Err(EntrypointError::Layer { layer: 0, .. })
        ));
    }

    #[test]
    fn the_image_config_names_the_program_and_its_defaults() {
        let c = ContainerDefaults::parse(br#"{"architecture":"wasm","config":{"Entrypoint":["/app/hello.wasm","-q"],"Cmd":["world"]}}"#).unwrap();
        assert_eq!(
            (c.program().unwrap(), c.entrypoint.len(), c.cmd.clone()),
            ("app/hello.wasm".into(), 2, vec!["world".to_string()])
        );
        let c = ContainerDefaults::parse(
            br#"{"config":{"Entrypoint":["hello.wasm"],"Cmd":null,"WorkingDir":"/srv/./app"}}"#,
        )
        .unwrap();
        assert_eq!(c.program().unwrap(), "srv/app/hello.wasm");
        assert!(c.cmd.is_empty());
        let err = ContainerDefaults::parse(br#"{"config":{"Cmd":["/app/hello.wasm"]}}"#)
            .unwrap()
            .program()
            .unwrap_err();
        assert!(
            err.to_string().contains("no Entrypoint")
                && err.to_string().contains("/app/hello.wasm"),
            "{err}"
        );
        assert!(matches!(
            ContainerDefaults::parse(b"{}").unwrap().program(),
            Err(EntrypointError::NoEntrypoint { .. })
        ));
        assert!(matches!(
            ContainerDefaults::parse(b"[1]"),
            Err(EntrypointError::Config(_))
        ));
        assert!(matches!(
            ContainerDefaults::parse(br#"{"config":{"Entrypoint":["/"]}}"#)
                .unwrap()
                .program(),
            Err(EntrypointError::BadPath(_))
        ));
        assert_eq!(normalise_path("/a/../../b/./c//d"), Some("b/c/d".into()));
    }

    #[test]
    fn command_and_args_replace_entrypoint_and_cmd() {
        let v = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let image = StoredImage {
            manifest_digest: String::new(),
            layer_digest: String::new(),
            size: 0,
            entrypoint: v(&["/app/x.wasm", "-q"]),
            cmd: v(&["world"]),
        };
        assert_eq!(
            with_image_defaults(&image, v(&[]), v(&[])),
            (v(&["/app/x.wasm", "-q"]), v(&["world"]))
        );
        assert_eq!(
            with_image_defaults(&image, v(&[]), v(&["moon"])),
            (v(&["/app/x.wasm", "-q"]), v(&["moon"]))
        );
        assert_eq!(
            with_image_defaults(&image, v(&["tool"]), v(&[])),
            (v(&["tool"]), v(&[]))
        );
        assert_eq!(
            with_image_defaults(&image, v(&["tool"]), v(&["a"])),
            (v(&["tool"]), v(&["a"]))
        );
        // A Wasm artifact has no defaults: the pod's values as given.
        let artifact = StoredImage {
            entrypoint: vec![],
            cmd: vec![],
            ..image
        };
        assert_eq!(
            with_image_defaults(&artifact, v(&[]), v(&["a"])),
            (v(&[]), v(&["a"]))
        );
    }

    #[test]
    fn a_registry_ca_file_must_hold_a_certificate() {
        let mut options = RegistryOptions::default();
        let err = options
            .add_ca_pem(Path::new("/ca.pem"), b"not a certificate\n")
            .unwrap_err();
        assert_eq!(err.to_string(), "/ca.pem: no PEM certificate in it");
        assert!(options
            .add_ca_file(Path::new("/nonexistent/ca.pem"))
            .is_err());
        assert!(options.extra_ca_certificates.is_empty());
    }

    #[test]
    fn the_index_survives_a_reopen() {
        let root = std::env::temp_dir().join(format!("wk-images-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let store = ImageStore::open(&root, RegistryOptions::default()).unwrap();
        let digest = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        write_atomically(&store.blob_path(digest).unwrap(), b"hello").unwrap();
        let image = StoredImage {
            manifest_digest: format!("sha256:{}", "b".repeat(64)),
            layer_digest: digest.into(),
            size: 5,
            entrypoint: vec!["/app/x.wasm".into()],
            cmd: vec!["-v".into()],
        };
        store
            .record("127.0.0.1:5000/hello:v1", image.clone())
            .unwrap();
        drop(store);
        let store = ImageStore::open(&root, RegistryOptions::default()).unwrap();
        assert_eq!(store.get("127.0.0.1:5000/hello:v1"), Some(image));
        assert_eq!(store.get("127.0.0.1:5000/hello:v2"), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    // ------------------------------------------------------------------ pulls against a fake registry

    /// What the fake registry answers for a path: status, body; `None` hangs (never answers).
    type Route = Arc<dyn Fn(&str) -> Option<(u16, Vec<u8>)> + Send + Sync>;

    /// A plain-http registry on 127.0.0.1 answering by `route`; counts manifest GETs.
    async fn fake_registry(route: Route) -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let manifest_gets = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = manifest_gets.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let (route, counter) = (route.clone(), counter.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                        // A TLS ClientHello (the https attempt) is not HTTP: hang up.
                        if head.first() == Some(&0x16) {
                            return;
                        }
                    }
                    let line = String::from_utf8_lossy(&head)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .to_string();
                    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                    if path.contains("/manifests/") {
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                    let Some((status, body)) = route(&path) else {
                        std::future::pending::<()>().await;
                        return;
                    };
                    let head = format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nConnection: close\r\n\r\n", body.len());
                    let _ = stream.write_all(head.as_bytes()).await;
                    let _ = stream.write_all(&body).await;
                });
            }
        });
        (port, manifest_gets)
    }

    fn sha(bytes: &[u8]) -> String {
        format!("sha256:{}", to_hex(&Sha256::digest(bytes)))
    }

    /// A Wasm artifact's manifest for `module` (declared `size`).
    fn wasm_manifest(module_digest: &str, size: usize) -> Vec<u8> {
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.wasm.config.v0+json", "digest": sha(b"{}"), "size": 2},
            "layers": [{"mediaType": "application/wasm", "digest": module_digest, "size": size}],
        })
        .to_string()
        .into_bytes()
    }

    /// A registry serving `module` as `r:t`, with the blob's bytes replaced by `served`.
    fn serving(module: &'static [u8], served: &'static [u8]) -> Route {
        let digest = sha(module);
        let manifest = wasm_manifest(&digest, module.len());
        Arc::new(move |path: &str| match path {
            "/v2/" => Some((200, b"{}".to_vec())),
            p if p.ends_with("/manifests/t") => Some((200, manifest.clone())),
            p if p.ends_with(&format!("/blobs/{digest}")) => Some((200, served.to_vec())),
            _ => Some((
                404,
                b"{\"errors\":[{\"code\":\"BLOB_UNKNOWN\",\"message\":\"blob unknown\"}]}".to_vec(),
            )),
        })
    }

    fn store_for(name: &str, port: u16) -> (PathBuf, ImageStore) {
        let dir = store_dir(name);
        let options = RegistryOptions {
            insecure_registries: vec![format!("127.0.0.1:{port}")],
            ..Default::default()
        };
        let store = ImageStore::open(&dir, options).unwrap();
        (dir, store)
    }

    fn blob_files(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir.join("images/blobs/sha256"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    }

    const GOOD: &[u8] = b"\0asm\x01\0\0\0";

    /// Each way a registry refuses a pull is its own typed error (the node words and retries
    /// each as the kubelet does); a failure none of them names stays a plain pull error.
    #[tokio::test]
    async fn pull_failures_are_typed_by_what_the_registry_said() {
        let route: Route = Arc::new(|path: &str| {
            match path {
            "/v2/" => Some((200, b"{}".to_vec())),
            p if p.ends_with("/manifests/missing") => Some((
                404,
                b"{\"errors\":[{\"code\":\"MANIFEST_UNKNOWN\",\"message\":\"manifest unknown\"}]}".to_vec(),
            )),
            p if p.ends_with("/manifests/secret") => Some((
                401,
                b"{\"errors\":[{\"code\":\"UNAUTHORIZED\",\"message\":\"authentication required\"}]}".to_vec(),
            )),
            p if p.ends_with("/manifests/denied") => Some((403, b"denied".to_vec())),
            _ => Some((500, b"oops".to_vec())),
        }
        });
        let (port, _) = fake_registry(route).await;
        let (dir, store) = store_for("typed-errors", port);
        let store = &store;
        let pull = |tag: &str| {
            let reference = format!("127.0.0.1:{port}/r:{tag}");
            async move { store.pull(&reference, &[]).await }
        };
        match pull("missing").await {
            Err(e @ ProviderError::ImageNotFound { .. }) => {
                assert!(
                    e.to_string().contains("not found")
                        && e.to_string().contains("MANIFEST_UNKNOWN"),
                    "{e}"
                )
            }
            other => panic!("{other:?}"),
        }
        for tag in ["secret", "denied"] {
            match pull(tag).await {
                Err(e @ ProviderError::Unauthorized { .. }) => {
                    assert!(e.to_string().contains("unauthorized"), "{e}")
                }
                other => panic!("{tag}: {other:?}"),
            }
        }
        assert!(matches!(pull("broken").await, Err(ProviderError::Pull(_))));
        let _ = std::fs::remove_dir_all(&dir);

        // Nothing listens: the registry is unavailable, whether or not plain http is allowed.
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let (dir, store) = store_for("typed-unavailable", closed);
        match store.pull(&format!("127.0.0.1:{closed}/r:t"), &[]).await {
            Err(e @ ProviderError::RegistryUnavailable { .. }) => {
                assert!(e.to_string().contains("unavailable"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn two_concurrent_pulls_of_one_image_make_one_request() {
        let (port, gets) = fake_registry(serving(GOOD, GOOD)).await;
        let (dir, store) = store_for("single-flight", port);
        let reference = format!("127.0.0.1:{port}/r:t");
        let (a, b) = tokio::join!(store.pull(&reference, &[]), store.pull(&reference, &[]));
        assert_eq!(a.unwrap().digest, b.unwrap().digest);
        assert_eq!(
            gets.load(Ordering::SeqCst),
            1,
            "one manifest request for two pulls at once"
        );
        // Once done, a new pull asks again (imagePullPolicy: Always must see a moved tag).
        store.pull(&reference, &[]).await.unwrap();
        assert_eq!(gets.load(Ordering::SeqCst), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn plain_http_is_not_tried_for_an_unlisted_loopback_registry() {
        let (port, gets) = fake_registry(serving(GOOD, GOOD)).await;
        let dir = store_dir("not-insecure");
        let store = ImageStore::open(&dir, RegistryOptions::default()).unwrap();
        let err = store
            .pull(&format!("127.0.0.1:{port}/r:t"), &[])
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("--insecure-registries"), "{err}");
        assert_eq!(gets.load(Ordering::SeqCst), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_manifest_over_the_cap_is_refused() {
        let huge = vec![b' '; (MAX_MANIFEST_BYTES + 1) as usize];
        let route: Route = Arc::new(move |path: &str| {
            if path == "/v2/" {
                Some((200, b"{}".to_vec()))
            } else {
                Some((200, huge.clone()))
            }
        });
        let (port, _) = fake_registry(route).await;
        let (dir, store) = store_for("manifest-cap", port);
        let err = store
            .pull(&format!("127.0.0.1:{port}/r:t"), &[])
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("more than the {MAX_MANIFEST_BYTES}")),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_blob_whose_digest_does_not_match_leaves_no_file() {
        // Same length, other bytes.
        let (port, _) = fake_registry(serving(GOOD, b"\0asm\x01\0\0\x01")).await;
        let (dir, store) = store_for("digest-mismatch", port);
        let err = store
            .pull(&format!("127.0.0.1:{port}/r:t"), &[])
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("digest"), "{err}");
        assert_eq!(
            blob_files(&dir),
            Vec::<String>::new(),
            "no partial or unverified blob is left"
        );
        assert!(store.get(&format!("127.0.0.1:{port}/r:t")).is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_blob_longer_than_declared_or_than_the_cap_is_refused() {
        let (port, _) = fake_registry(serving(GOOD, b"\0asm\x01\0\0\0 and then some more")).await;
        let (dir, store) = store_for("blob-longer", port);
        let err = store
            .pull(&format!("127.0.0.1:{port}/r:t"), &[])
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("more than the 8 bytes the manifest declares"),
            "{err}"
        );
        assert_eq!(blob_files(&dir), Vec::<String>::new());
        let _ = std::fs::remove_dir_all(&dir);

        let (port, _) = fake_registry(serving(GOOD, GOOD)).await;
        let (dir, store) = store_for("blob-cap", port);
        let store = store.with_limits(PullLimits {
            max_module_size: 4,
            ..Default::default()
        });
        let err = store
            .pull(&format!("127.0.0.1:{port}/r:t"), &[])
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("is 8 bytes, more than the 4 bytes --max-module-size allows"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_registry_error_body_is_cut() {
        let body = format!("{}TAIL-MARKER", "x".repeat(10_000));
        let route: Route = Arc::new(move |path: &str| {
            if path == "/v2/" {
                Some((200, b"{}".to_vec()))
            } else {
                Some((500, body.clone().into_bytes()))
            }
        });
        let (port, _) = fake_registry(route).await;
        let (dir, store) = store_for("error-body", port);
        let err = store
            .pull(&format!("127.0.0.1:{port}/r:t"), &[])
            .await
            .unwrap_err()
            .to_string();
        assert!(
            !err.contains("TAIL-MARKER") && err.len() < 1024,
            "{} bytes: {err}",
            err.len()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_pull_without_progress_is_cancelled() {
        let route: Route = Arc::new(|path: &str| {
            if path == "/v2/" {
                Some((200, b"{}".to_vec()))
            } else {
                None
            }
        });
        let (port, _) = fake_registry(route).await;
        let (dir, store) = store_for("stalled", port);
        let store = store.with_limits(PullLimits {
            progress_deadline: Duration::from_millis(300),
            ..Default::default()
        });
        let reference = format!("127.0.0.1:{port}/r:t");
        let err = store.pull(&reference, &[]).await.unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "Cancel pulling image {reference:?} because of no progress for 300ms"
            )),
            "{err}"
        );
        assert!(
            store.inflight.lock().unwrap().is_empty(),
            "the pull is no longer under way"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn durations_print_as_go_does() {
        assert_eq!(go_duration(Duration::from_secs(60)), "1m0s");
        assert_eq!(go_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(go_duration(Duration::from_millis(300)), "300ms");
        assert_eq!(go_duration(Duration::from_secs(3600)), "1h0m0s");
    }

    #[test]
    fn manifests_are_checked_before_use() {
        let digest = sha(GOOD);
        assert!(matches!(
            parse_manifest(&wasm_manifest(&digest, 8), None),
            Ok(OciManifest::Image(_))
        ));
        let index = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
        assert!(matches!(
            parse_manifest(index, None),
            Ok(OciManifest::ImageIndex(_))
        ));
        assert!(parse_manifest(br#"{"schemaVersion":1}"#, None)
            .unwrap_err()
            .contains("schemaVersion 1"));
        assert!(
            parse_manifest(br#"{"schemaVersion":2,"mediaType":"text/html"}"#, None)
                .unwrap_err()
                .contains("text/html")
        );
        assert!(parse_manifest(b"<html>", None).is_err());
        assert!(parse_manifest(&vec![b' '; (MAX_MANIFEST_BYTES + 1) as usize], None).is_err());
    }

    #[test]
    fn a_layer_is_read_no_further_than_its_cap() {
        let zeros = vec![0u8; 1 << 20];
        let layers = [layer(
            &[E::File("aaa", &zeros), E::File("app/x.wasm", MODULE)],
            true,
        )];
        let mut search = EntrypointSearch::new("app/x.wasm", 1)
            .unwrap()
            .with_limits(64 << 10, u64::MAX);
        assert_eq!(
            search.feed(0, &layers[0][..]),
            Err(EntrypointError::LayerTooLarge {
                layer: 0,
                limit: 64 << 10
            })
        );
        let mut search = EntrypointSearch::new("app/x.wasm", 1)
            .unwrap()
            .with_limits(4 << 20, 4);
        assert!(matches!(
            search.feed(0, &layers[0][..]),
            Err(EntrypointError::ModuleTooLarge {
                size: 8,
                limit: 4,
                ..
            })
        ));
        let mut search = EntrypointSearch::new("app/x.wasm", 1)
            .unwrap()
            .with_limits(4 << 20, 8);
        assert_eq!(search.feed(0, &layers[0][..]), Ok(Some(MODULE.to_vec())));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

            /// Whatever a registry sends as a manifest, parsing returns, never panics.
            #[test]
            fn any_manifest_bytes_parse_or_fail_cleanly(body in proptest::collection::vec(any::<u8>(), 0..2048), content_type in proptest::option::of("[a-z/.+;= 0-9-]{0,60}")) {
                let _ = parse_manifest(&body, content_type.as_deref());
            }

            /// JSON-shaped manifests with random fields: parsed or refused, never a panic.
            #[test]
            fn json_shaped_manifests_parse_or_fail_cleanly(version in -3i64..5, media_type in "[a-z./+-]{0,40}", layers in proptest::collection::vec(("[a-z./+-]{0,30}", "[a-z0-9:]{0,70}", -5i64..1_000_000_000_000), 0..5)) {
                let layers: Vec<serde_json::Value> = layers.iter().map(|(m, d, s)| serde_json::json!({"mediaType": m, "digest": d, "size": s})).collect();
                let doc = serde_json::json!({"schemaVersion": version, "mediaType": media_type, "config": {"mediaType": "x", "digest": "sha256:00", "size": 1}, "layers": layers, "manifests": layers});
                let _ = parse_manifest(doc.to_string().as_bytes(), None);
            }

            /// Random bytes as a layer (plain, or behind the gzip magic): no panic, and never a
            /// module over the cap.
            #[test]
            fn any_layer_bytes_are_searched_without_panic(body in proptest::collection::vec(any::<u8>(), 0..4096), gzip in any::<bool>()) {
                let bytes = if gzip { [&[0x1f, 0x8b][..], &body].concat() } else { body };
                let mut search = EntrypointSearch::new("app/x.wasm", 1).unwrap().with_limits(1 << 16, 16);
                if let Ok(Some(module)) = search.feed(0, &bytes[..]) {
                    prop_assert!(module.len() <= 16);
                }
            }

            /// A valid layer with bytes flipped: no panic; a module found is within the cap, and
            /// no more than the cap is inflated.
            #[test]
            fn corrupted_layers_are_searched_within_caps(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8), gzip in any::<bool>(), big in 0usize..200_000) {
                let filler = vec![7u8; big];
                let mut bytes = layer(&[E::File("aaa", &filler), E::Sym("bin/app", "../app/x.wasm"), E::File("app/x.wasm", MODULE)], gzip);
                for (at, value) in flips {
                    let i = at.index(bytes.len());
                    bytes[i] = value;
                }
                let mut search = EntrypointSearch::new("bin/app", 1).unwrap().with_limits(100_000, 8);
                let fed = search.feed(0, &bytes[..]);
                if let Ok(Some(module)) = &fed {
                    prop_assert!(module.len() <= 8);
                }
                if big > 100_000 + 1024 && !matches!(fed, Err(EntrypointError::Layer { .. })) {
                    prop_assert!(!matches!(fed, Ok(Some(_))), "a layer over the cap yielded a module: {fed:?}");
                }
            }

            /// Registry error text of any size and content becomes one bounded line.
            #[test]
            fn error_text_is_bounded(text in ".{0,2000}") {
                let cut = truncate_text(&text, MAX_ERROR_BODY_BYTES);
                prop_assert!(cut.len() <= MAX_ERROR_BODY_BYTES + 40);
                prop_assert!(!cut.contains('\n'));
            }
        }
    }
}
