//! Wasm images: pulled from OCI registries, stored content-addressed, indexed by reference.
//!
//! Start at [`ImageStore::pull`]. Layout under `<root>/images/`:
//! - `blobs/sha256/<hex>`: the Wasm layer, written only after its digest was verified;
//! - `index.json`: reference -> manifest digest, layer digest, size (replaced atomically), so
//!   `image_status` survives an agent restart.
//!
//! The OCI decisions (which layer, which platform of an index, digest checks, plain http or not,
//! which credentials) are small pure functions, tested without a registry.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::{ImageIndexEntry, OciDescriptor, OciImageManifest, OciManifest};
use oci_client::secrets::RegistryAuth as OciAuth;
use oci_client::{Client, Reference};
use provider_api::{ImageInfo, ProviderError, RegistryAuth};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Layer media types that hold a Wasm module or component.
pub const WASM_LAYER_TYPES: &[&str] = &["application/wasm", "application/vnd.wasm.content.layer.v1+wasm", "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm"];

/// Platform `os` values of an image index entry this provider runs.
const WASM_OSES: &[&str] = &["wasip1", "wasip2", "wasi"];

/// What the index records for one pulled reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredImage {
    /// The manifest digest the reference resolved to (of the index, for a multi-platform image).
    pub manifest_digest: String,
    /// `sha256:<hex>` of the Wasm layer.
    pub layer_digest: String,
    pub size: u64,
}

/// The local image store; one per provider.
pub struct ImageStore {
    dir: PathBuf,
    /// reference (canonical form) -> image. Held only for map access and the small index write.
    index: Mutex<BTreeMap<String, StoredImage>>,
}

impl ImageStore {
    /// Opens the store under `<root>/images`, reading its index if there is one.
    pub fn open(root: &Path) -> Result<Self, ProviderError> {
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
        Ok(Self { dir, index: Mutex::new(index) })
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
    /// store already holds it, verified against its digest.
    pub async fn pull(&self, reference: &str, auth: &[RegistryAuth]) -> Result<ImageInfo, ProviderError> {
        let parsed: Reference = reference.parse().map_err(|e| ProviderError::Pull(format!("invalid image reference {reference:?}: {e}")))?;
        let registry = parsed.resolve_registry().to_string();
        let client = Client::new(ClientConfig { protocol: protocol_for(&registry), ..Default::default() });
        let credentials = credentials_for(parsed.registry(), auth);
        let pull_err = |what: &str, e: oci_client::errors::OciDistributionError| ProviderError::Pull(format!("pulling {reference}: {what}: {e}"));

        let (manifest, manifest_digest) = client.pull_manifest(&parsed, &credentials).await.map_err(|e| pull_err("fetching the manifest", e))?;
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
        let layer = select_wasm_layer(&manifest).map_err(|found| ProviderError::UnsupportedImage(format!("image {reference} holds no Wasm layer (layer media types: {found}); expected one of {}", WASM_LAYER_TYPES.join(", "))))?;
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
        let stored = StoredImage { manifest_digest: manifest_digest.clone(), layer_digest: layer.digest.clone(), size };
        self.record(reference, stored)?;
        tracing::info!(reference, digest = %manifest_digest, size, "image pulled");
        Ok(ImageInfo { reference: reference.to_string(), digest: manifest_digest, size })
    }

    /// Stores `wasm` as the single layer of `reference`, as a pull would (tests use it in place
    /// of a registry).
    #[cfg(test)]
    pub(crate) fn import(&self, reference: &str, wasm: &[u8]) -> Result<StoredImage, ProviderError> {
        let layer_digest = format!("sha256:{}", to_hex(&Sha256::digest(wasm)));
        let blob = self.blob_path(&layer_digest).map_err(ProviderError::Io)?;
        write_atomically(&blob, wasm).map_err(|e| ProviderError::Io(e.to_string()))?;
        let image = StoredImage { manifest_digest: format!("sha256:{}", to_hex(&Sha256::digest(layer_digest.as_bytes()))), layer_digest, size: wasm.len() as u64 };
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

/// Plain http only for a registry on loopback (127.0.0.0/8, ::1, localhost); https otherwise.
pub fn protocol_for(registry: &str) -> ClientProtocol {
    if is_loopback_registry(registry) {
        ClientProtocol::HttpsExcept(vec![registry.to_string()])
    } else {
        ClientProtocol::Https
    }
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
        assert!(matches!(protocol_for("127.0.0.1:5056"), ClientProtocol::HttpsExcept(v) if v == ["127.0.0.1:5056"]));
        assert!(matches!(protocol_for("ghcr.io"), ClientProtocol::Https));
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

    #[test]
    fn the_index_survives_a_reopen() {
        let root = std::env::temp_dir().join(format!("wk-images-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let store = ImageStore::open(&root).unwrap();
        let digest = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        write_atomically(&store.blob_path(digest).unwrap(), b"hello").unwrap();
        let image = StoredImage { manifest_digest: format!("sha256:{}", "b".repeat(64)), layer_digest: digest.into(), size: 5 };
        store.record("127.0.0.1:5000/hello:v1", image.clone()).unwrap();
        drop(store);
        let store = ImageStore::open(&root).unwrap();
        assert_eq!(store.get("127.0.0.1:5000/hello:v1"), Some(image));
        assert_eq!(store.get("127.0.0.1:5000/hello:v2"), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
